"""Checkpoint of one target: check, freeze, infect, then scan -> plan -> stream -> file.

`checkpoint()` returns the target as a Parked handle (memcr.parked), which
restores it. The order keeps the cardinal rule: a page is dropped only
after its bytes are in the dump file; a failure before the target is
released either writes the dropped pages back (rollback) or, when that is
impossible, kills the target. Everything here runs on one thread: the
thread that seizes a target is the only one ptrace lets touch it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import resource
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from memcr import arch, codec, logs, procfs, ptrace_calls, scan
from memcr.codec import FRAME_PLAIN
from memcr.dump.format import Record, check_directory
from memcr.dump.writer import FramedWriter, PlainWriter, open_writer
from memcr.errors import Aborted, LimitError, RightsError, TargetError, UsageError
from memcr.infect import check_room
from memcr.options import Cancel, Log, Options, check_socket_dir
from memcr.parasite import Parasite, SocketSpec
from memcr.parked import Pagemap, Parked, Reserve, let_go
from memcr.procfs import Vma
from memcr.report import Report, rss
from memcr.scan import Plan
from memcr.tracer import FrozenProcess

CHUNK = FRAME_PLAIN  # bytes moved per read/write while streaming: one frame

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def preflight(pid: int, options: Options) -> dict[str, str]:
    """Every check that needs no change to the target; returns its status."""
    status = procfs.check_target(pid)
    check_directory(options.dump_dir)
    if options.socket_dir is not None:
        check_socket_dir(options.socket_dir, options.socket_gid)
    if options.proc_mem and os.geteuid() != 0:
        raise RightsError("reading /proc/<pid>/mem directly needs root", pid=pid, what="proc-mem")
    procfs.require_page_monitor()
    arch.blobs()
    ptrace_calls.load()
    refuse_shared_memory(pid)
    if not options.allow_async_io and (writers := procfs.async_writers(pid)):
        raise TargetError(
            f"process {pid} has {' and '.join(writers)}: the kernel may write into its memory while it is "
            "parked, and such a write would be lost",
            pid=pid,
            what="async-io",
        )
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
    sharers = procfs.mm_sharers(pid)
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
) -> Parked:
    """Freeze the target, dump and drop its private pages; it stays frozen, parked.

    `seized` is called once every thread is held, before anything in the
    target changes: a group park waits there until all its members are
    held, and an error it raises lets this target go as it was.
    """
    with _descriptor_limit():
        return _checkpoint(pid, options, log, cancel or Cancel(), progress, seized)


def _checkpoint(
    pid: int, options: Options, log: Log, cancel: Cancel, progress: Progress | None, seized: Callable[[], None] | None
) -> Parked:
    page_size = arch.page_size()
    report = Report(pid, page_size, rss_before=rss(preflight(pid, options)), options=options.reported())
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
        writer = open_writer(options.dump_dir, pid, page_size, options.coding)
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
    stream = _Stream(frozen, parasite, writer, pagemap, options, report, log)
    try:
        log(f"parasite ready (tid {parasite.tid})")
        plan, confirmed = stream.plan(before)
        started = time.monotonic()
        report.setup_ms = (started - frozen_at) * 1000
        stream.run(plan, confirmed, cancel, progress)
        report.download_ms = (time.monotonic() - started) * 1000
        dump = writer.finish()
    except BaseException as error:
        Parked(frozen, parasite, writer.abandon(), pagemap, stream.vmas, reserve, report, log).rollback(error)
        raise
    parked = Parked(frozen, parasite, dump, pagemap, plan.vmas, reserve, report, log)
    try:
        report.dump_path, report.dump_bytes = str(dump.path), dump.size
        report.dropped_pages = sum(r.length for r in dump.records if r.dropped) // page_size
        report.rss_after = rss(procfs.read_status(pid))
    except BaseException as error:
        parked.rollback(error)
        raise
    return parked


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
    ) -> None:
        self.frozen = frozen
        self.parasite = parasite
        self.writer = writer
        self.pagemap = pagemap
        self.options = options
        self.report = report
        self.log = log
        self.vmas: list[Vma] = []  # planned so far: where a rollback puts records back

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
            plan = scan.build_plan(before, pages, exclude, self.options.rss_file)
            confirmed = _in_background(lambda: scan.confirm(procfs.read_maps(pid), plan))
        else:
            self.log("the memory map changed while freezing: reading it again")
            now = procfs.read_maps(pid)
            plan = scan.build_plan(now, pages, exclude, self.options.rss_file)
            scan.confirm(now, plan)
        self.vmas = plan.vmas
        r, page = self.report, self.pagemap.page_size
        r.vmas, r.pages = len(plan.vmas), plan.dump_bytes // page
        r.locked_vmas, r.shared_pages = plan.locked_vmas, plan.shared_pages
        self.log(f"{r.vmas} candidate VMAs, {r.pages} pages ({plan.dump_bytes / 2**20:.1f} MiB) to dump")
        if plan.locked_vmas:
            self.log(f"{plan.locked_vmas} locked (mlock) VMAs stay in memory")
        if plan.shared_pages:
            self.log(
                f"{plan.shared_pages} pages ({plan.shared_pages * page / 2**20:.1f} MiB) stay in memory: "
                "other processes map them too (fork, KSM), so dropping them would free nothing"
            )
        return plan, confirmed

    def run(self, plan: Plan, confirmed: Future[None] | None, cancel: Cancel, progress: Progress | None) -> None:
        writer, pid = self.writer, self.frozen.pid
        done, total = 0, plan.dump_bytes
        written: list[Record] = []
        for extent in plan.copy:
            if cancel.cancelled:
                raise Aborted(f"checkpoint of pid {pid} aborted: its pages were put back, it runs on", pid=pid)
            record = writer.begin_pages(extent.start, extent.length)
            if self.options.proc_mem or not extent.vma.prot & mmap.PROT_READ:
                self._copy_from_mem(record)
            else:
                self._copy_from_parasite(record)
            writer.end_pages(record)
            # only pages whose bytes are in the file may go
            written += writer.completed()
            if confirmed is None or confirmed.done():
                self._drop(written, confirmed)
            done += extent.length
            if progress:
                progress(done, total)
        writer.flush()
        self._drop(written + writer.completed(), confirmed)
        for extent in plan.drop_only:
            self.parasite.drop(extent.start, extent.length)

    def _drop(self, written: list[Record], confirmed: Future[None] | None) -> None:
        """Drop the pages of records in the file, once the plan's VmFlags are confirmed."""
        if confirmed is not None:
            confirmed.result()  # raises if the plan no longer holds: nothing dropped yet
        for record in written:
            # counted as dropped until the parasite says otherwise: if its answer is lost, the pages
            # may be gone, and a rollback must then restore them (or, unable to, kill the target)
            record.dropped = True
            record.dropped = self.parasite.drop(record.addr, record.length)
        written.clear()

    def _copy_from_parasite(self, record: Record) -> None:
        writer, parasite, length = self.writer, self.parasite, record.length
        # everything that may fail on its own (a pipe needs descriptors) before the pages are asked for:
        # once they are, the connection is only usable again after every byte has been read
        pipe = writer.pipe() if isinstance(writer, PlainWriter) else None
        parasite.request_pages(record.addr, length)
        if pipe:
            assert isinstance(writer, PlainWriter)
            self._splice_from_parasite(writer, record, *pipe)
            return
        for offset in range(0, length, CHUNK):
            piece = writer.buffer(min(CHUNK, length - offset))
            parasite.recv_into(piece)
            try:
                writer.write_payload(record, piece)
            except BaseException:
                parasite.discard(length - offset - len(piece))  # the connection must stay usable for the rollback
                raise

    def _splice_from_parasite(self, writer: PlainWriter, record: Record, pipe: int, capacity: int) -> None:
        moved = 0
        while moved < record.length:
            n = self.parasite.splice_into(pipe, min(capacity, record.length - moved))
            moved += n
            try:
                writer.write_piped(record, n)
            except BaseException:
                self.parasite.discard(record.length - moved)  # the connection must stay usable for the rollback
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
