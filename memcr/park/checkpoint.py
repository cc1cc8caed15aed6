"""Checkpoint of one target: check, freeze, infect, then scan -> plan -> stream -> file.

`checkpoint()` returns the target as a Parked handle (memcr.park.parked), which
restores it. The order keeps the cardinal rule: a page is dropped only
after its bytes are in the dump file; a failure before the target is
released either writes the dropped pages back (rollback) or, when that is
impossible, kills the target. Everything here runs on one thread: the
thread that seizes a target is the only one ptrace lets touch it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import mmap
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from memcr import logs
from memcr.dump import codec
from memcr.dump.codec import FRAME_PLAIN
from memcr.dump.format import Group, Record, check_directory
from memcr.dump.writer import FramedWriter, PlainWriter, Splice, open_writer
from memcr.engine import admission, arch, ptrace_calls
from memcr.engine.infect import check_room
from memcr.engine.parasite import Parasite, SocketSpec
from memcr.engine.parasite_protocol import SEND_RUNS
from memcr.engine.tracer import FrozenProcess
from memcr.errors import Aborted, LimitError, RightsError, TargetError, UsageError
from memcr.options import Cancel, Log, Options, check_socket_dir
from memcr.park import features, incremental, scan
from memcr.park.incremental import Kept
from memcr.park.parked import Pagemap, Parked, Reserve, let_go
from memcr.park.scan import MAX_EXTENT, Extent, Plan
from memcr.report import Report, rss
from memcr.system import process_vm, procfs
from memcr.system.procfs import Vma

CHUNK = FRAME_PLAIN  # bytes moved per read/write while streaming: one frame
AHEAD = 1 << 20  # bytes of pages asked of the parasite before memcr reads them
DROPS_AHEAD = 64  # drops sent before their answers are read: the answers never fill the parasite's socket

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def preflight(pid: int, options: Options) -> dict[str, str]:
    """Every check that needs no change to the target; returns its status."""
    status = admission.check_target(pid)
    check_directory(options.dump_dir)
    if options.socket_dir is not None:
        check_socket_dir(options.socket_dir, options.socket_gid)
    if options.proc_mem and os.geteuid() != 0:
        raise RightsError("reading /proc/<pid>/mem directly needs root", pid=pid, what="proc-mem")
    admission.require_page_monitor()
    arch.blobs()
    ptrace_calls.load()
    refuse_shared_memory(pid)
    if not options.allow_async_io:
        admission.refuse_async_writers(pid)
    if not options.netns and options.socket_dir is None and not procfs.in_own_namespace(pid, "net"):
        # an abstract socket exists only in the network namespace it was made in: connecting from memcr's
        # own would be refused once the target is frozen and infected. An option is missing (exit 2; the
        # daemon answers -1, as to a failure, not -2 as to a pid it may not park)
        raise UsageError(
            f"process {pid} is in another network namespace than memcr, where memcr cannot reach its parasite's "
            "abstract socket",
            pid=pid,
            what="netns",
        )
    check_room(pid, arch.blobs(), arch.page_size(), options.socket_gid)
    return status


def refuse_shared_memory(pid: int) -> None:
    """A process whose memory another process shares cannot be parked: the other one runs on it."""
    sharers = admission.mm_sharers(pid)
    if sharers:
        others = ", ".join(map(str, sharers))
        raise TargetError(
            f"process {pid} shares its memory with process {others} (vfork or clone with CLONE_VM): "
            f"dropping its pages would take them from under the other. Park it once {others} has "
            "called exec or exited",
            pid=pid,
        )


def checkpoint(
    pid: int,
    options: Options,
    log: Log,
    cancel: Cancel | None = None,
    progress: Progress | None = None,
    seized: Callable[[], None] | None = None,
    kept: Kept | None = None,
) -> Parked:
    """Freeze the target, dump and drop its private pages; it stays frozen, parked.

    `seized` is called once every thread is held, before anything in the
    target changes: a group park waits there until all its members are
    held, and an error it raises lets this target go as it was.
    `kept`: the dump kept at the target's last restore, whose unchanged
    pages this park takes instead of writing them again; the checkpoint
    owns it from here on, and deletes it when it cannot serve.
    """
    with _descriptor_limit():
        try:
            return _checkpoint(pid, options, log, cancel or Cancel(), progress, seized, kept)
        except BaseException:
            # refused before the dump was opened, or rolled back: either way the kept dump serves no more
            if kept is not None and (problem := kept.close()):
                logs.error(log, f"warning: {problem}")
            raise
        finally:
            if kept is not None:
                kept.tracker.close()  # its answers are taken; a restore that tracks again makes a new one


def _checkpoint(
    pid: int,
    options: Options,
    log: Log,
    cancel: Cancel,
    progress: Progress | None,
    seized: Callable[[], None] | None,
    kept: Kept | None,
) -> Parked:
    page_size = arch.page_size()
    if kept is not None and (why := _unfit(kept, options, page_size)):
        log(f"writing the dump of pid {pid} whole, not only what changed: {why}")
        # before the maps are read: memcr's watch ends with its userfaultfd, and with it the "uw" in VmFlags
        if problem := kept.close():
            logs.error(log, f"warning: {problem}")
        kept = None
    report = Report(pid, page_size, rss_before=rss(preflight(pid, options)), options=options.reported())
    if kept is not None and kept.coded:  # a coded frame is not written over: nothing to copy before the freeze
        kept = _unless_too_costly(pid, kept, page_size, log)
    elif kept is not None:
        _precopy(pid, kept, options, cancel, report, log)
    # smaps walks every page table (~15 ms per GiB): read it while the
    # target still runs; once frozen, it is confirmed before any drop
    try:
        before: list[Vma] | None = procfs.read_maps(pid)
    except RightsError:
        before = None  # the freeze names precisely which right is missing
    codec.preload(options.coding)
    with contextlib.ExitStack() as opened:  # closed again unless the freeze succeeds
        reserve = Reserve()
        opened.callback(reserve.close)
        writer = open_writer(options.dump_dir, pid, page_size, options.coding, kept.dump if kept else None)
        opened.callback(_discard, writer, log)
        pagemap = Pagemap(pid, page_size)
        opened.callback(pagemap.close)
        frozen_at = time.monotonic()
        frozen = FrozenProcess.freeze(pid, arch.current())
        opened.pop_all()
    report.threads = len(frozen.tids)
    try:
        log(f"seized {report.threads} threads of pid {pid}")
        if seized:
            seized()
        refuse_shared_memory(pid)  # a vfork() may have come between the check and the freeze
        spec = SocketSpec(pid, options.socket_dir, options.socket_gid)
        parasite = Parasite.start(frozen, arch.blobs(), spec, options.netns, page_size)
    except BaseException as error:
        try:
            let_go(frozen, reserve, error)
        finally:
            pagemap.close()
            _discard(writer, log)
        raise
    stream = _Stream(frozen, parasite, writer, pagemap, options, report, log, kept)
    size_before = writer.file.size
    try:
        log(f"parasite ready (tid {parasite.tid})")
        plan, confirmed = stream.plan(before)
        started = time.monotonic()
        report.setup_ms = (started - frozen_at) * 1000
        if kept is None:
            stream.run(plan, confirmed, cancel, progress)
        else:
            stream.run_incremental(plan, confirmed, cancel, progress, kept)
        report.download_ms = (time.monotonic() - started) * 1000
        dump = writer.finish()
    except BaseException as error:
        Parked(frozen, parasite, writer.abandon(), pagemap, stream.vmas, reserve, report, log).rollback(error)
        raise
    parked = Parked(frozen, parasite, dump, pagemap, plan.vmas, reserve, report, log, stream.added)
    try:
        report.dump_path, report.dump_bytes = str(dump.path), dump.size
        report.written_bytes += dump.size - size_before + stream.rewritten
        report.dropped_pages = sum(r.length for r in dump.records if r.dropped) // page_size
        report.rss_after = rss(procfs.read_status(pid))
    except BaseException as error:
        parked.rollback(error)
        raise
    return parked


def _precopy(pid: int, kept: Kept, options: Options, cancel: Cancel, report: Report, log: Log) -> None:
    """Write what the target changed into the kept dump while it still runs (incremental.precopy): the frozen
    park writes only what it changes from here on, and what the copy could not take."""
    fd = None if options.proc_mem else procfs.open_pagemap(pid)
    if fd is None:  # -m: every page through /proc/PID/mem, frozen; or the frozen park reads the page map itself
        return
    started = time.monotonic()
    try:
        copied = incremental.precopy(kept, pid, fd, cancel, bytearray(CHUNK))
    finally:
        os.close(fd)
    report.precopy_ms = (time.monotonic() - started) * 1000
    report.precopy_held_ms = copied.held_ms
    report.written_bytes = copied.bytes
    log(f"{copied.bytes / 2**20:.1f} MiB it changed since its restore written while it ran")
    if copied.stopped:
        log(f"copying what pid {pid} changed stopped short ({copied.stopped}): the frozen park writes the rest")


def _unless_too_costly(pid: int, kept: Kept, page_size: int, log: Log) -> Kept | None:
    """The coded kept dump, unless adding what the target wrote to it would cost its restore or its folder too
    much (incremental.too_costly): then closed, before the maps are read (as in _checkpoint)."""
    fd = procfs.open_pagemap(pid)
    if fd is None:  # the frozen park reads the page map itself, and says why it cannot
        return kept
    try:
        why = incremental.too_costly(kept, pid, fd, page_size)
    finally:
        os.close(fd)
    if why is None:
        return kept
    log(f"writing the dump of pid {pid} whole, not only what changed: {why}")
    if problem := kept.close():
        logs.error(log, f"warning: {problem}")
    return None


def _unfit(kept: Kept, options: Options, page_size: int) -> str | None:
    """Why the kept dump cannot take this park's changes (None: it can)."""
    if options.allow_async_io:
        return "the kernel may write its memory without a trace (--allow-async-io)"
    return incremental.stale(kept, options.dump_dir, options.coding) or kept.worn(page_size)


def _discard(writer: PlainWriter | FramedWriter, log: Log) -> None:
    if problem := writer.close():
        logs.error(log, f"warning: {problem}")


class _Stream:
    """The pages of a frozen, infected target on their way into the dump file."""

    def __init__(
        self,
        frozen: FrozenProcess,
        parasite: Parasite,
        writer: PlainWriter | FramedWriter,
        pagemap: Pagemap,
        options: Options,
        report: Report,
        log: Log,
        kept: Kept | None,
    ) -> None:
        self.frozen = frozen
        self.parasite = parasite
        self.writer = writer
        self.pagemap = pagemap
        self.options = options
        self.report = report
        self.log = log
        self.vmas: list[Vma] = []  # planned so far: where a rollback puts records back
        self.kept = kept
        self.ours: frozenset[tuple[int, int]] = frozenset()  # the mappings the kept dump's userfaultfd watches
        self.added = incremental.WHOLE  # an incremental park's: what it leaves its restore
        self._joins: set[int] = set()  # runs with only holes between them and the run before
        self._vm_reads = True  # process_vm_readv works here (memcr.system.process_vm)
        self.rewritten = 0  # bytes an incremental park wrote over the kept dump's, in place

    def plan(self, before: list[Vma] | None) -> tuple[Plan, Future[None] | None]:
        """The plan, and the pending confirmation of the VmFlags it was made with (None: read frozen)."""
        pid, exclude = self.frozen.pid, self.parasite.mapping
        layout = procfs.read_maps(pid, flags=False)
        # smaps read before the freeze: where no page was shared then, a fork since would only cost memory
        unshared = frozenset((v.start, v.end) for v in before or [] if not v.shared)
        read = self.pagemap.reader(self.parasite)
        pages = scan.scan_pages(layout, read, exclude, self.pagemap.zero_pfn, self.pagemap.fd, unshared)
        confirmed = None
        if before is not None and scan.same_layout(before, layout, exclude):
            plan_source = self._relabel(before)
            plan = scan.build_plan(plan_source, pages, exclude, self.options.rss_file)
            ours = self.ours
            confirmed = _in_background(lambda: scan.confirm(incremental.relabel(procfs.read_maps(pid), ours), plan))
        else:
            self.log("the memory map changed while freezing: reading it again")
            plan_source = self._relabel(procfs.read_maps(pid))
            plan = scan.build_plan(plan_source, pages, exclude, self.options.rss_file)
            scan.confirm(plan_source, plan)
        self.vmas = plan.vmas
        r, page = self.report, self.pagemap.page_size
        r.vmas, r.pages = len(plan.vmas), plan.dump_bytes // page
        r.locked_vmas, r.shared_pages = plan.locked_vmas, plan.shared_pages
        for line in features.untold():  # what the scan's first try found this kernel lacks
            self.log(line)
        self.log(f"{r.vmas} candidate VMAs, {r.pages} pages ({plan.dump_bytes / 2**20:.1f} MiB) to dump")
        if plan.locked_vmas:
            self.log(f"{plan.locked_vmas} locked (mlock) VMAs stay in memory")
        watched = [v for v in plan_source if "uw" in v.flags and v.private and v.resident]
        if watched:
            mib = sum(v.resident for v in watched) / 2**20
            self.log(
                f"{len(watched)} mappings ({mib:.1f} MiB) stay in memory: a userfaultfd watches them for writes "
                "(the target's own, or a memcr daemon's that keeps its dump: --incremental)"
            )
        if plan.shared_pages:
            self.log(
                f"{plan.shared_pages} pages ({plan.shared_pages * page / 2**20:.1f} MiB) stay in memory: "
                "other processes map them too (fork, KSM), so dropping them would free nothing"
            )
        return plan, confirmed

    def _relabel(self, vmas: list[Vma]) -> list[Vma]:
        """The mappings, those memcr's own userfaultfd watches no longer marked as watched by the target's."""
        if self.kept is None:
            return vmas
        self.ours = incremental.owned(self.kept, vmas)
        return incremental.relabel(vmas, self.ours)

    def run(self, plan: Plan, confirmed: Future[None] | None, cancel: Cancel, progress: Progress | None) -> None:
        writer, pid = self.writer, self.frozen.pid
        done, total = 0, plan.dump_bytes
        written: list[Record] = []
        # the kernel may write into a hole of a target with async I/O (--allow-async-io) while it is frozen:
        # a drop across holes would take such a write, so each run is dropped alone there
        self._joins = set() if self.options.allow_async_io else {e.start for e in plan.copy if e.joins}
        for extents in _groups(plan.copy, self.options.proc_mem):
            if cancel.cancelled:
                raise Aborted(f"checkpoint of pid {pid} aborted: its pages were put back, it runs on", pid=pid)
            self._write_group(extents)
            # only pages whose bytes are in the file may go
            written += writer.completed()
            if confirmed is None or confirmed.done():
                self._drop(written, confirmed)
            done += sum(e.length for e in extents)
            if progress:
                progress(done, total)
        writer.flush()
        self._drop(written + writer.completed(), confirmed)
        for extent in plan.drop_only:
            self.parasite.drop(extent.start, extent.length)

    def run_incremental(
        self, plan: Plan, confirmed: Future[None] | None, cancel: Cancel, progress: Progress | None, kept: Kept
    ) -> None:
        """As run, writing into the kept dump only the pages the target wrote since its restore (or that the dump
        lacks); the rest the dump holds already. Pages it holds at their address are written over in place
        (a plain dump's: a coded one's are appended with the new ones), new ones appended (first), then the
        runs written over, in address order. Each run is dropped once its pages are in the file, so that the
        target's thread frees pages while memcr writes the next."""
        fd = self.pagemap.fd
        assert fd is not None, "a kept dump is only made where memcr reads the page map"
        split = incremental.split(kept, plan, fd, self.ours)
        self.writer.include(split.reused)
        appended, over = sum(e.length for e in split.fresh), split.rewrite_bytes
        unchanged = split.reused_bytes - over
        self.log(
            f"{unchanged / 2**20:.1f} MiB unchanged since the last restore, in the kept dump already; "
            f"{over / 2**20:.1f} MiB written over in place, {appended / 2**20:.1f} MiB added"
        )
        self._joins = {e.start for e in split.fresh if e.joins} | split.continues
        done, total = unchanged, plan.dump_bytes
        pid = self.frozen.pid
        for extents in _groups(split.fresh, self.options.proc_mem):
            if cancel.cancelled:
                raise Aborted(f"checkpoint of pid {pid} aborted: it runs on", pid=pid)
            self._write_group(extents)
            done += sum(e.length for e in extents)
            if progress:
                progress(done, total)
        self.writer.flush()
        self.writer.completed()
        # each run is dropped once its pages are all in the file (those before it in one madvise, where they
        # may be): the target's thread frees its pages while memcr writes the next ones over the dump's
        waiting = deque(sorted(self.writer.records, key=lambda r: r.addr))
        with _Drops(self.parasite, confirmed) as drops:
            for batch in incremental.batches(split.rewrite, CHUNK, process_vm.IOV_MAX):
                assert isinstance(self.writer, PlainWriter), "a coded dump is not written over (incremental.split)"
                if cancel.cancelled:
                    raise Aborted(f"checkpoint of pid {pid} aborted: its pages were put back, it runs on", pid=pid)
                written = self._write_over(self.writer, batch)
                self.rewritten += written
                done += written
                if progress:
                    progress(done, total)
                reached = batch[-1].addr + batch[-1].length  # the runs to write over are in address order
                ready = []
                while waiting and waiting[0].addr + waiting[0].length <= reached:
                    ready.append(waiting.popleft())
                for span in self._spans(ready):
                    drops.send(span)
            for span in self._spans(list(waiting)):
                drops.send(span)
        for extent in plan.drop_only:
            self.parasite.drop(extent.start, extent.length)
        self.added = incremental.Added(incremental.garbage(kept, split.reused), kept.base)

    def _write_over(self, writer: PlainWriter, runs: list[incremental.Rewrite]) -> int:
        """Read what the target holds now in `runs` and write it over the kept dump's copies; the bytes."""
        places = list(itertools.accumulate((r.length for r in runs), initial=0))  # of each run in the buffer
        buffer = writer.buffer(places[-1])
        # process_vm_readv where the parasite could read too; /proc/PID/mem reads any protection (_by_mem)
        direct = (
            [] if not self._vm_reads else [i for i, r in enumerate(runs) if not _by_mem(r.vma, self.options.proc_mem)]
        )
        if direct:
            local = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
            try:
                process_vm.read_many(
                    self.frozen.pid, [(runs[i].addr, local + places[i], runs[i].length) for i in direct]
                )
            except process_vm.Unavailable:
                self._vm_reads = False
                direct = []
            except OSError as e:  # /proc/PID/mem names the page where it fails too
                self.log(f"reading pid {self.frozen.pid} through /proc/{self.frozen.pid}/mem: {e.strerror}")
                direct = []
        if len(direct) < len(runs):
            for i in sorted(set(range(len(runs))) - set(direct)):
                buffer[places[i] : places[i + 1]] = self.frozen.read(runs[i].addr, runs[i].length)
        writer.write_over(buffer, [(places[i], r.length, r.offset) for i, r in enumerate(runs)])
        return places[-1]

    def _write_group(self, extents: list[Extent]) -> None:
        group = self.writer.begin_group([(e.start, e.length) for e in extents])
        if _by_mem(extents[0].vma, self.options.proc_mem):
            for record in group.runs:
                self._copy_from_mem(record)
        else:
            self._copy_from_parasite(group)
        self.writer.end_group(group)

    def _drop(self, written: list[Record], confirmed: Future[None] | None) -> None:
        """Drop the pages of runs in the file, once the plan's VmFlags are confirmed.

        `written` follows the plan's order with none left out: runs the scan
        found only holes between go in one madvise, never runs with a page
        between them that stays (another process's, a file's).
        """
        with _Drops(self.parasite, confirmed) as drops:
            for span in self._spans(written):
                drops.send(span)
        written.clear()

    def _spans(self, written: list[Record]) -> list[list[Record]]:
        """The runs in the stretches one madvise drops (`_drop`)."""
        spans: list[list[Record]] = []
        for record in written:
            if spans and record.addr in self._joins:
                spans[-1].append(record)
            else:
                spans.append([record])
        return spans

    def _copy_from_parasite(self, group: Group) -> None:
        writer, parasite = self.writer, self.parasite
        # everything that may fail on its own (a pipe needs descriptors) before the pages are asked for:
        # once they are, the connection is only usable again after every byte has been read
        splice = writer.pipe()
        ahead = _Requests(parasite, group.runs)
        if splice is not None:
            self._splice_from_parasite(splice, group, ahead)
            return
        for record in group.runs:
            for offset in range(0, record.length, CHUNK):
                piece = writer.buffer(min(CHUNK, record.length - offset))
                parasite.recv_into(piece)
                ahead.received(len(piece))
                try:
                    writer.write_payload(record, piece)
                except BaseException:
                    parasite.discard(ahead.outstanding)  # the connection must stay usable for the rollback
                    raise

    def _splice_from_parasite(self, splice: Splice, group: Group, ahead: _Requests) -> None:
        # the runs' bytes come back to back, as the file takes them: one splice may carry many runs
        moved = 0
        while moved < group.length:
            n = self.parasite.splice_into(splice.fd, min(splice.capacity, group.length - moved))
            moved += n
            ahead.received(n)
            try:
                splice.take(group, n)
            except BaseException:
                self.parasite.discard(ahead.outstanding)  # the connection must stay usable for the rollback
                raise

    def _copy_from_mem(self, record: Record) -> None:
        """Read pages through /proc/<pid>/mem (or ptrace), which reads any protection.

        The parasite could read a PROT_NONE or write a read-only mapping
        only after an mprotect, and mprotect leaves a trace (VM_ACCOUNT).
        """
        for offset in range(0, record.length, CHUNK):
            piece = self.writer.buffer(min(CHUNK, record.length - offset))
            piece[:] = self.frozen.read(record.addr + offset, len(piece))
            self.writer.write_payload(record, piece)


class _Drops:
    """Drops sent to the parasite ahead of its answers: the target's thread frees pages while memcr goes on.

    A span counts as dropped from its command on, until the parasite says
    otherwise: if the answer is lost, the pages may be gone, and a rollback
    must then restore them (or, unable to, kill the target). Every answer
    is read before the block ends, so that the connection serves the next
    command, a rollback's too.
    """

    def __init__(self, parasite: Parasite, confirmed: Future[None] | None) -> None:
        self.parasite = parasite
        self._confirmed = confirmed  # the plan's VmFlags, confirmed before the first drop
        self._sent: deque[list[Record]] = deque()

    def __enter__(self) -> _Drops:
        return self

    def __exit__(self, *_: object) -> None:
        while self._sent:
            self._answer()

    def send(self, span: list[Record]) -> None:
        if self._confirmed is not None:
            self._confirmed.result()  # raises if the plan no longer holds: nothing dropped yet
            self._confirmed = None
        for record in span:
            record.dropped = True
        start, last = span[0].addr, span[-1]
        self.parasite.send_drop(start, last.addr + last.length - start)
        self._sent.append(span)
        if len(self._sent) > DROPS_AHEAD:
            self._answer()

    def _answer(self) -> None:
        span = self._sent.popleft()
        dropped = self.parasite.dropped()
        for record in span:
            record.dropped = dropped


class _Requests:
    """The parasite's SEND commands for a group's runs, written ahead of their bytes.

    One command asks for many runs, and the next goes out while memcr
    still takes the bytes of the last: a run costs neither a round trip nor
    a command of its own. A command goes out once fewer than AHEAD/2 bytes
    are asked for and not yet read, so the commands the parasite has not
    read yet never fill its socket buffer while it waits for memcr to take
    page bytes (each would wait for the other).
    """

    def __init__(self, parasite: Parasite, runs: list[Record]) -> None:
        self.parasite = parasite
        self.runs = runs
        self.next = 0  # runs asked for
        self.outstanding = 0  # bytes asked for and not read yet
        self._top_up()

    def received(self, length: int) -> None:
        self.outstanding -= length
        if self.outstanding < AHEAD // 2:
            self._top_up()

    def _top_up(self) -> None:
        first, asked = self.next, self.outstanding
        while self.next < len(self.runs) and asked < AHEAD and self.next - first < SEND_RUNS:
            asked += self.runs[self.next].length
            self.next += 1
        if self.next > first:
            self.parasite.request_pages([(r.addr, r.length) for r in self.runs[first : self.next]])
            self.outstanding = asked


def _by_mem(vma: Vma, proc_mem: bool) -> bool:
    """Whether memcr reads the mapping's pages itself: with -m, or where the parasite could not read them."""
    return proc_mem or not vma.prot & mmap.PROT_READ


def _groups(extents: list[Extent], proc_mem: bool) -> Iterator[list[Extent]]:
    """The extents cut into file records of at most MAX_EXTENT bytes, each read one way."""
    group: list[Extent] = []
    size, vma, by_mem = 0, None, False
    for extent in extents:
        if extent.vma is not vma:
            vma, was = extent.vma, by_mem
            by_mem = _by_mem(extent.vma, proc_mem)
            if group and by_mem != was:
                yield group
                group, size = [], 0
        if size + extent.length > MAX_EXTENT:
            yield group
            group, size = [], 0
        group.append(extent)
        size += extent.length
    if group:
        yield group


@contextlib.contextmanager
def _descriptor_limit() -> Iterator[None]:
    """Running out of file descriptors is the limit's fault, not a bug: say which limit."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        which = "the system's" if e.errno == errno.ENFILE else f"memcr's (RLIMIT_NOFILE {soft}, hard {hard})"
        raise LimitError(
            f"memcr ran out of file descriptors: {which} limit is reached; the target was left as it was",
            errno=e.errno,
            what="descriptors",
        ) from None


def _in_background(work: Callable[[], None]) -> Future[None]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="memcr-confirm")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the work
