"""Checkpoint and restore of one target: scan -> plan -> stream -> file, and back.

The order keeps the cardinal rule: a page is dropped only after its bytes
are in the dump file; any failure before the target is released either
writes the dropped pages back (rollback) or, when that is impossible, kills
the target. A Session must be driven from a single thread (the ptrace rule).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from memcr import arch, codec, parasite, procfs, scan
from memcr.codec import FRAME_PLAIN, DumpOptions
from memcr.dumpfile import DumpFile, Record, check_directory
from memcr.errors import (
    Aborted,
    LimitError,
    MemcrError,
    RightsError,
    StorageError,
    TargetError,
    TargetGone,
    TargetKilled,
    WrittenWhileParked,
)
from memcr.infect import Infection
from memcr.parasite import Nonces, ParasiteChannel, SocketSpec, pack_args
from memcr.procfs import Vma, memory_kb
from memcr.scan import Plan
from memcr.tracer import FrozenProcess

PAGE = mmap.PAGESIZE
CHUNK = FRAME_PLAIN  # bytes moved per read/write while streaming: one frame
PROT_READ, PROT_WRITE = mmap.PROT_READ, mmap.PROT_WRITE

Log = Callable[[str], None]
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclass(frozen=True)
class Options:
    dump_dir: Path = Path("/tmp")
    socket_dir: Path | None = None
    socket_gid: int | None = None
    netns: bool = False
    proc_mem: bool = False
    rss_file: bool = False
    allow_async_io: bool = False
    dump: DumpOptions = field(default_factory=DumpOptions)


@dataclass
class Report:
    """Figures for the log lines."""

    threads: int = 0
    vmas: int = 0
    pages: int = 0
    setup_ms: float = 0.0  # seize, inject, scan: frozen time before the first page moves
    download_ms: float = 0.0
    upload_ms: float = 0.0
    release_ms: float = 0.0  # parasite out, threads let go: frozen time after the last page
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)


RSS_KEYS = ("VmRSS", "RssAnon", "RssFile")


def _rss(status: dict[str, str]) -> dict[str, int]:
    return {key: memory_kb(status, key) for key in RSS_KEYS}


@cache
def _zero_pfn() -> int:
    return scan.zero_pfn()


def preflight(pid: int, options: Options) -> dict[str, str]:
    """Every check that needs no change to the target; returns its status."""
    status = procfs.check_target(pid)
    check_directory(options.dump_dir)
    if options.socket_dir is not None and not options.socket_dir.is_dir():
        raise StorageError(f"parasite socket directory {options.socket_dir} is not an existing directory")
    if options.proc_mem and os.geteuid() != 0:
        raise RightsError("-m/--proc-mem reads /proc/<pid>/mem directly and needs root")
    procfs.require_page_monitor()
    arch.blobs()
    refuse_shared_memory(pid)
    if not options.allow_async_io and (writers := procfs.async_writers(pid)):
        raise TargetError(
            f"process {pid} has {' and '.join(writers)}: the kernel may write into its memory while it is "
            "parked, and such a write would be lost. --allow-async-io parks it anyway, at your risk: "
            "if a write lands while it is parked, memcr kills it rather than restore it wrong"
        )
    return status


def refuse_shared_memory(pid: int) -> None:
    """A process whose memory another process shares cannot be parked: the other one runs on it."""
    sharers = procfs.mm_sharers(pid)
    if sharers:
        others = ", ".join(map(str, sharers))
        raise TargetError(
            f"process {pid} shares its memory with process {others} (vfork or clone with CLONE_VM): "
            f"dropping its pages would take them from under the other. Park it once {others} has "
            "called exec or exited"
        )


class Session:
    """One target from freeze to release."""

    def __init__(
        self,
        pid: int,
        options: Options,
        log: Log,
        abort: threading.Event | None = None,
        progress: Progress | None = None,
    ):
        self.pid = pid
        self.progress = progress
        self.options = options
        self.log = log
        self.abort = abort or threading.Event()
        self.report = Report()
        self.frozen: FrozenProcess | None = None
        self.infection: Infection | None = None
        self.channel: ParasiteChannel | None = None
        self.dump: DumpFile | None = None
        self.spec = SocketSpec(pid, options.socket_dir, options.socket_gid)
        self._pagemap_fd: int | None = None  # None: the parasite reads the pagemap
        self._vmas: list[Vma] = []  # the planned mappings, in address order: where each record goes back
        self._starts: list[int] = []
        self._reserve: list[int] = []  # descriptors to give up so that a rollback never lacks one

    # -- checkpoint ---------------------------------------------------------

    def checkpoint(self) -> None:
        """Freeze the target, dump and drop its private pages; it stays frozen."""
        with _descriptor_limit():
            self._checkpoint()

    def _checkpoint(self) -> None:
        status = preflight(self.pid, self.options)
        self.report.rss_before = _rss(status)
        # smaps walks every page table (~15 ms per GiB): read it while the
        # target still runs; once frozen, it is confirmed before any drop
        try:
            vmas: list[Vma] | None = procfs.read_maps(self.pid)
        except RightsError:
            vmas = None  # the freeze names precisely which right is missing
        codec.preload(self.options.dump)
        self._reserve = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(RESERVE)]
        frozen_at = time.monotonic()
        try:
            self.frozen = FrozenProcess.freeze(self.pid, arch.current())
        except BaseException:
            self._clean_up()
            raise
        self.report.threads = len(self.frozen.tids)
        self.log(f"seized {self.report.threads} threads of pid {self.pid}")
        try:
            refuse_shared_memory(self.pid)  # a vfork() may have come between the check and the freeze
            self.dump = DumpFile.create(self.options.dump_dir, self.pid, PAGE, self.options.dump)
            self._start_parasite()
            plan, confirmed = self._plan(vmas)
            started = time.monotonic()
            self.report.setup_ms = (started - frozen_at) * 1000
            self._stream(plan, confirmed)
            self.report.download_ms = (time.monotonic() - started) * 1000
        except BaseException as e:
            self._fail(e)
            raise
        self.report.rss_after = _rss(procfs.read_status(self.pid))

    def _start_parasite(self) -> None:
        assert self.frozen is not None
        self.infection = Infection(self.frozen, arch.blobs())
        nonces = Nonces.fresh()
        self.spec.remove_stale()
        tid = self.infection.inject(pack_args(self.spec, nonces))
        self.channel = ParasiteChannel.connect(self.infection, self.spec, nonces, self.options.netns)
        self.log(f"parasite ready (tid {tid})")

    def _plan(self, before: list[Vma] | None) -> tuple[Plan, Future[None] | None]:
        """The plan, and the pending confirmation of the VmFlags it was made with (None: read frozen)."""
        assert self.infection is not None and self.channel is not None
        exclude = self.infection.mapping
        # kept open: checking the pages before a restore or a rollback must not need a new descriptor
        self._pagemap_fd = procfs.open_pagemap(self.pid)
        layout = procfs.read_maps(self.pid, flags=False)
        # smaps read before the freeze: where no page was shared then, a fork since would only cost memory
        unshared = frozenset((v.start, v.end) for v in before or [] if not v.shared)
        pages = scan.scan_pages(layout, self._read_pagemap, exclude, _zero_pfn(), self._pagemap_fd, unshared)
        confirmed = None
        if before is not None and scan.same_layout(before, layout, exclude):
            plan = scan.build_plan(before, pages, exclude, self.options.rss_file)
            confirmed = _in_background(lambda: scan.confirm(procfs.read_maps(self.pid), plan))
        else:
            self.log("the memory map changed while freezing: reading it again")
            now = procfs.read_maps(self.pid)
            plan = scan.build_plan(now, pages, exclude, self.options.rss_file)
            scan.confirm(now, plan)
        self._vmas = plan.vmas
        self._starts = [v.start for v in plan.vmas]
        self.report.vmas = len(plan.vmas)
        self.report.pages = plan.dump_bytes // PAGE
        self.log(
            f"{len(plan.vmas)} candidate VMAs, {self.report.pages} pages ({plan.dump_bytes / 2**20:.1f} MiB) to dump"
        )
        if plan.locked_vmas:
            self.log(f"{plan.locked_vmas} locked (mlock) VMAs stay in memory")
        if plan.shared_pages:
            self.log(
                f"{plan.shared_pages} pages ({plan.shared_pages * PAGE / 2**20:.1f} MiB) stay in memory: "
                "other processes map them too (fork, KSM), so dropping them would free nothing"
            )
        return plan, confirmed

    def _read_pagemap(self, addr: int, npages: int) -> bytes:
        if self._pagemap_fd is None:
            assert self.channel is not None
            return self.channel.pagemap(addr, npages, PAGE)
        return os.pread(self._pagemap_fd, npages * 8, addr // PAGE * 8)

    def _stream(self, plan: Plan, confirmed: Future[None] | None) -> None:
        assert self.channel is not None and self.dump is not None
        done, total = 0, plan.dump_bytes
        written: list[Record] = []
        for extent in plan.copy:
            if self.abort.is_set():
                raise Aborted(f"checkpoint of pid {self.pid} aborted: its pages were put back, it runs on")
            record = self.dump.begin_pages(extent.start, extent.length)
            if self.options.proc_mem or not extent.vma.prot & PROT_READ:
                self._copy_from_mem(record)
            else:
                self._copy_from_parasite(record)
            self.dump.end_pages(record)
            # only pages whose bytes are in the file may go
            written += self.dump.completed()
            if confirmed is None or confirmed.done():
                self._drop(written, confirmed)
            done += extent.length
            if self.progress:
                self.progress(done, total)
        self.dump.flush()
        self._drop(written + self.dump.completed(), confirmed)
        for extent in plan.drop_only:
            self.channel.drop(extent.start, extent.length)
        self.dump.finish()

    def _drop(self, written: list[Record], confirmed: Future[None] | None) -> None:
        """Drop the pages of records in the file, once the plan's VmFlags are confirmed."""
        assert self.channel is not None
        if confirmed is not None:
            confirmed.result()  # raises if the plan no longer holds: nothing dropped yet
        for record in written:
            record.dropped = self.channel.drop(record.addr, record.length)
        written.clear()

    def _copy_from_parasite(self, record: Record) -> None:
        assert self.channel is not None and self.dump is not None
        length = record.length
        # everything that may fail on its own (a pipe needs descriptors) before the pages are asked for:
        # once they are, the channel is only usable again after every byte has been read
        pipe = self.dump.pipe() if self.dump.codec is None else None
        self.channel.request_pages(record.addr, length)
        if pipe:
            self._splice_from_parasite(record, *pipe)
            return
        for offset in range(0, length, CHUNK):
            piece = self.dump.buffer(min(CHUNK, length - offset))
            self.channel.recv_into(piece)
            try:
                self.dump.write_payload(record, piece)
            except StorageError:
                self.channel.discard(length - offset - len(piece))  # the channel must stay usable for the rollback
                raise

    def _splice_from_parasite(self, record: Record, pipe: int, capacity: int) -> None:
        assert self.channel is not None and self.dump is not None
        moved = 0
        while moved < record.length:
            n = self.channel.splice_into(pipe, min(capacity, record.length - moved))
            moved += n
            try:
                self.dump.write_piped(record, n)
            except StorageError:
                self.channel.discard(record.length - moved)  # the channel must stay usable for the rollback
                raise

    def _copy_from_mem(self, record: Record) -> None:
        """Read pages through /proc/<pid>/mem (or ptrace), which reads any protection.

        The parasite could read a PROT_NONE or write a read-only mapping
        only after an mprotect, and mprotect leaves a trace (VM_ACCOUNT).
        """
        assert self.frozen is not None and self.dump is not None
        for offset in range(0, record.length, CHUNK):
            piece = self.dump.buffer(min(CHUNK, record.length - offset))
            piece[:] = self.frozen.read(record.addr + offset, len(piece))
            self.dump.write_payload(record, piece)

    # -- restore ------------------------------------------------------------

    def restore(self) -> None:
        """Put every dropped page back and let the target run on."""
        assert self.dump is not None
        if not self.dump.still_in_place():
            self.log(
                f"warning: {self.dump.path} was removed or replaced while pid {self.pid} was frozen; "
                "restoring from the copy memcr holds open"
            )
        started = time.monotonic()
        try:
            self._put_back()
        except WrittenWhileParked as e:
            self._kill()
            raise TargetKilled(f"pid {self.pid} was killed: {e}") from e
        except BaseException as e:
            self._fail(e)
            raise
        self.report.upload_ms = (time.monotonic() - started) * 1000
        self._release()

    def _put_back(self) -> None:
        """Write every dropped page back from the dump, checked before use."""
        assert self.channel is not None and self.dump is not None and self.frozen is not None
        records = self.dump.verified_records()
        self._check_untouched(records)
        for record in records:
            if _containing(self._vmas, self._starts, record.addr).prot & PROT_WRITE:
                if self.dump.codec:
                    self.channel.store_chunks(record.addr, record.length, self.dump.plain_chunks(record))
                else:
                    self.channel.store_pages(record.addr, record.length, self.dump.fd, record.offset)
                continue
            at = record.addr
            for chunk in self.dump.plain_chunks(record) if self.dump.codec else self.dump.plain_pieces(record):
                self.frozen.write(at, chunk)
                at += len(chunk)

    def _check_untouched(self, records: list[Record]) -> None:
        """Raise unless every dropped page is still empty, or was refilled with zeros.

        A page written while parked (io_uring, Linux AIO, another process
        writing this one's memory) holds bytes neither the dump nor the
        writer alone can account for: restoring over it would lose the
        write, keeping it would lose the rest of the page.
        """
        assert self.frozen is not None
        written = []
        for record in records:
            anonymous = _containing(self._vmas, self._starts, record.addr).anonymous
            found = scan.refilled(
                record.addr, record.length, anonymous, self._read_pagemap, _zero_pfn(), self._pagemap_fd
            )
            # khugepaged may fill a dropped page with zeros; the dump's bytes go over those
            written += [addr for addr in found if self.frozen.read(addr, PAGE).count(0) != PAGE]
        if written:
            raise WrittenWhileParked(
                f"{len(written)} of the pages memcr dropped were written while pid {self.pid} was parked "
                f"(first at {written[0]:#x}): by io_uring, Linux AIO or another process. "
                "Neither the dump nor the new bytes alone make the page right"
            )

    # -- teardown -----------------------------------------------------------

    def _release(self) -> None:
        """End the parasite, remove every trace of memcr and let the target run."""
        assert self.frozen is not None
        releasing = time.monotonic()
        ended = False
        try:
            if self.channel is not None:
                self.channel.end()
                ended = True
        finally:
            self._close_channel()
        if self.infection is not None:
            infection = self.infection
            # a parasite that never got END will not exit by itself: stop it at once
            infection.cure(lambda: parasite.open_fds(infection), timeout=2.0 if ended else 0.0)
        self.frozen.release()
        # the target runs from here: deleting a large dump is no longer its time
        self.report.release_ms = (time.monotonic() - releasing) * 1000
        self._clean_up()

    def _fail(self, error: BaseException) -> None:
        """Undo a failed operation: roll back, else kill the target."""
        self._give_up_reserve()
        if self.frozen is None:
            self._clean_up()
            return
        if self.frozen.exiting() or not procfs.alive(self.pid):
            # killed from outside, or it exited: nothing left to protect
            self._close_channel()
            self.frozen.reap()
            self._clean_up()
            raise TargetGone(f"pid {self.pid} ended while memcr was working on it (memcr did not kill it)") from error
        dropped = self.dump is not None and any(r.dropped for r in self.dump.records)
        try:
            if dropped:
                self._put_back()
            self._release()
        except BaseException as cleanup:
            self._kill()
            if dropped:
                raise TargetKilled(
                    f"pid {self.pid} was killed: its memory could not be put back ({cleanup}) after: {error}"
                ) from error
            raise TargetKilled(f"pid {self.pid} was killed: memcr could not release it ({cleanup})") from error

    def forget(self) -> None:
        """The target died while frozen: drop everything memcr held for it."""
        self._close_channel()
        if self.frozen is not None:
            self.frozen.forget()
        self._clean_up()

    def _kill(self) -> None:
        self._close_channel()
        if self.frozen is not None:
            try:
                self.frozen.kill()
            except PermissionError:
                self._kill_from_inside()
        self._clean_up()

    def _kill_from_inside(self) -> None:
        """Without CAP_KILL memcr may not signal another user's process, but the
        process may signal itself: it runs kill(itself, SIGKILL) through the blob."""
        assert self.frozen is not None
        killer = self.infection or Infection(self.frozen, arch.blobs())
        with contextlib.suppress(TargetGone):
            killer.kill_from_inside(procfs.ns_pid(self.pid))

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _give_up_reserve(self) -> None:
        for fd in self._reserve:
            os.close(fd)
        self._reserve = []

    def _clean_up(self) -> None:
        """Remove memcr's files and close every descriptor the session held."""
        self._give_up_reserve()
        if self._pagemap_fd is not None:
            os.close(self._pagemap_fd)
            self._pagemap_fd = None
        if self.dump is not None:
            self.dump.remove()
        path = self.spec.path
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()

    @property
    def dump_path(self) -> Path | None:
        return self.dump.path if self.dump else None


RESERVE = 2  # descriptors a rollback may need: /proc reads


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
            f"memcr ran out of file descriptors: {which} limit is reached; the target was left as it was. "
            "Raise the limit (ulimit -n, LimitNOFILE=) or park fewer processes at once"
        ) from None


def _in_background(work: Callable[[], None]) -> Future[None]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="memcr-confirm")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the work


def _containing(vmas: list[Vma], starts: list[int], addr: int) -> Vma:
    """The mapping that holds addr, by bisection: a process may have 65530 mappings."""
    i = bisect.bisect_right(starts, addr) - 1
    if i < 0 or addr >= vmas[i].end:
        raise MemcrError(f"no planned mapping holds {addr:#x}")
    return vmas[i]
