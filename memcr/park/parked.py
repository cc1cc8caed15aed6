"""A parked target: frozen, its private pages in a dump. Restore it, or kill it.

Every ending keeps the cardinal rule: the target runs on only with every
dropped page back in place, byte-exact; when that cannot be done it is
killed, and the error says so.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import time
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from memcr import logs
from memcr.dump.format import Record
from memcr.dump.reader import DumpReader
from memcr.engine import arch
from memcr.engine.infect import Injector
from memcr.engine.parasite import PAGEMAP_ENTRY, Parasite
from memcr.engine.tracer import FrozenProcess
from memcr.errors import MemcrError, TargetEnded, TargetGone, TargetKilled, Uncured, WrittenWhileParked
from memcr.park import features, incremental, scan
from memcr.park.incremental import Kept
from memcr.park.upload import Progress, Tally, upload
from memcr.report import Report, rss
from memcr.system import processes, procfs, uffd
from memcr.system.process_vm import Unavailable
from memcr.system.procfs import Vma

# lazy restore's machinery loads when a restore is lazy: an eager one (memcr -n) does not hold it
if TYPE_CHECKING:
    from memcr.lazy.restore import LazyRestore

RESERVE = 2  # descriptors a rollback may need: /proc reads
SCAN_GAP = 32  # pages between two records that one PAGEMAP_SCAN of the dropped pages walks over rather than stop at

Log = Callable[[str], None]


class Reserve:
    """Descriptors held so that a rollback never lacks one: given up first thing when one starts."""

    def __init__(self) -> None:
        self._fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(RESERVE)]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


@cache
def _zero_pfn() -> int:
    return scan.zero_pfn()


class Pagemap:
    """The target's page table entries: read directly, or by the parasite where memcr may not.

    Opened before the freeze and kept open: checking the pages before a
    restore or a rollback must not need a new descriptor.
    """

    def __init__(self, pid: int, page_size: int) -> None:
        self.page_size = page_size
        self.zero_pfn = _zero_pfn()
        self.fd = procfs.open_pagemap(pid)  # None: refused to memcr, the parasite reads it

    def reader(self, parasite: Parasite) -> Callable[[int, int], bytes]:
        """read(addr, npages) -> the entries."""
        fd, page = self.fd, self.page_size
        if fd is None:
            return lambda addr, npages: parasite.pagemap(addr, npages, page)
        return lambda addr, npages: os.pread(fd, npages * PAGEMAP_ENTRY, addr // page * PAGEMAP_ENTRY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Parked:
    """A frozen target whose dropped pages are in `dump`; the parasite stays in it until the end."""

    def __init__(
        self,
        frozen: FrozenProcess,
        parasite: Parasite,
        dump: DumpReader,
        pagemap: Pagemap,
        vmas: list[Vma],
        reserve: Reserve,
        report: Report,
        log: Log,
        added: incremental.Added = incremental.WHOLE,
    ) -> None:
        self.frozen = frozen
        self.parasite = parasite
        self.dump = dump
        self.pagemap = pagemap
        self.vmas = vmas  # the planned mappings, in address order: where each record goes back
        self._starts = [v.start for v in vmas]
        # looked up per record, and a dump an incremental park added to holds thousands
        self._fillable = [_fillable(v) for v in vmas]
        self.reserve = reserve
        self.report = report
        self.log = log
        self._direct = True  # restore with process_vm_writev (memcr.park.upload), else through the parasite
        self._written: set[int] = set()  # records memcr has begun to write back
        self.added = added  # what an incremental park left: the file's garbage (`tidy`), the base for the next

    @property
    def pid(self) -> int:
        return self.frozen.pid

    def restore(
        self, lazy: bool = False, progress: Progress | None = None, keep: Callable[[Kept], None] | None = None
    ) -> LazyRestore | None:
        """Put every dropped page back and let the target run on.

        lazy: let it run first, and return the LazyRestore that puts the
        rest back (its `finish` must run on this thread). None when the
        restore is complete: eager, or lazy where it cannot be (logged).
        progress: called with the bytes written back so far and in all,
        as the checkpoint's, during an eager restore.
        keep: after an eager restore, called with the dump kept and the
        target's writes tracked from then on, for its next park
        (memcr.park.incremental); where that cannot be, memcr says why and
        deletes the dump as ever.
        """
        if (ending := self.ended()) is not None:  # killed from outside while parked: nothing left to put back
            raise TargetEnded(f"pid {self.pid} ended while parked ({ending}), not by memcr's hand", pid=self.pid)
        started = time.monotonic()
        phase: LazyRestore | None = None
        kept: Kept | None = None
        try:
            if not self.dump.file.still_in_place():
                logs.error(
                    self.log,
                    f"warning: {self.dump.path} was removed or replaced while pid {self.pid} was frozen; "
                    "restoring from the copy memcr holds open",
                )
            watched = self._watch_faults() if lazy else None
            self.report.options["lazy"] = watched is not None  # the report says how it was restored
            if watched is None:
                self._put_back(progress)
                kept = self._track() if keep is not None else None
            else:
                phase = self._start_lazy(watched)
            self.report.upload_ms = (time.monotonic() - started) * 1000
            if phase is None:
                self._let_run()
        except WrittenWhileParked as e:  # found before any tracking starts
            self.kill()
            raise TargetKilled(f"pid {self.pid} was killed: {e}", pid=self.pid) from e
        except BaseException as e:
            if kept is not None:
                kept.tracker.close()
            try:
                self.rollback(e)
            except TargetGone as gone:  # killed from outside while memcr put it back, or just before
                raise TargetEnded(
                    f"pid {self.pid} ended while parked (it died as memcr restored it), not by memcr's hand",
                    pid=self.pid,
                ) from gone
            raise
        if phase is not None:
            return phase
        self._restored(keep_dump=kept is not None)
        if kept is not None and keep is not None:
            self.report.kept_bytes = kept.size
            keep(kept)
        return None

    def tidy(self) -> None:
        """Give the pages of the dump file no record serves any more back to its filesystem (after an incremental
        park, while the target is parked: nobody waits for it). Never raises."""
        holes, self.added = self.added.garbage, self.added._replace(garbage=[])
        # only the file as memcr left it: a change by someone else must still show at the restore
        if holes and self.dump.file.fd >= 0 and self.dump.file.stamp() == self.dump.stamp:
            incremental.punch(self.dump.file.fd, holes)
            self.dump.stamp = self.dump.file.stamp()

    def _track(self) -> Kept | None:
        """Track the target's writes from now on, keeping the dump; None (said) where that cannot be.

        Any failure leaves the restore as it is: the target is back whole,
        only the next park is a full one.
        """
        try:
            start, page = procfs.read_stat(self.pid).start, self.pagemap.page_size
            fd = self.pagemap.fd
            return incremental.track(self.pid, self.parasite, fd, self.vmas, self.dump, page, start, self.added.base)
        except incremental.Untracked as e:
            self.log(f"the next park of pid {self.pid} writes its dump whole: memcr cannot track its writes, as {e}")
        except (MemcrError, OSError) as e:
            logs.error(self.log, f"warning: the next park of pid {self.pid} writes its dump whole: no tracking: {e}")
        return None

    def _restored(self, keep_dump_open: bool = False, keep_dump: bool = False) -> None:
        self._clean_up(keep_dump_open, keep_dump)
        with contextlib.suppress(MemcrError):  # it runs again: gone by now is its own business
            self.report.rss_restored = rss(procfs.read_status(self.pid))

    def _watch_faults(self) -> uffd.Userfaultfd | None:
        """A userfaultfd of the target watching each mapping with pages to fill lazily; None (logged) if none can."""
        try:
            if self.frozen.stopped:
                raise uffd.Unavailable("it is stopped (SIGSTOP): it would not run before all its pages are back")
            try:
                os.kill(self.pid, 0)
            except PermissionError:
                raise uffd.Unavailable(
                    "memcr may not kill it (CAP_KILL), which it must be able to should a page fail to come back"
                ) from None
            ranges = [(self.vmas[i].start, self.vmas[i].end) for i in sorted(set(map(self._index, self._lazy_addrs())))]
            if not ranges:
                return None
            watched = uffd.Userfaultfd(self._new_userfaultfd(), self.pagemap.page_size)
            try:
                watched.handshake()
                for start, end in ranges:
                    watched.register(start, end)
            except BaseException:
                watched.close()  # which also stops watching
                raise
            return watched
        except uffd.Unavailable as e:
            self.log(f"restoring pid {self.pid} eagerly, not lazily: {e}")
            return None

    def _lazy_addrs(self) -> list[int]:
        return [r.addr for r in self.dump.records if r.dropped and self._lazy(r)]

    def _lazy(self, record: Record) -> bool:
        return self._fillable[self._index(record.addr)]

    def _new_userfaultfd(self) -> int:
        """Made in the target: by the system call, or from memcr's /dev/userfaultfd where the target lacks the right."""
        fd = self.parasite.userfaultfd(uffd.NEW_FLAGS)
        if fd >= 0:
            return fd
        refused = os.strerror(-fd)
        try:
            device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            missing = f"there is none here: Linux {features.USERFAULTFD_DEVICE.since} added it"
            why = missing if e.errno == errno.ENOENT else e.strerror
            raise uffd.Unavailable(
                f"the target may not make a userfaultfd ({refused}) and memcr cannot open /dev/userfaultfd ({why})"
            ) from None
        try:
            fd = self.parasite.userfaultfd(uffd.NEW_FLAGS, device)
        finally:
            os.close(device)
        if fd < 0:
            raise uffd.Unavailable(
                f"the target may not make a userfaultfd ({refused}), nor with /dev/userfaultfd ({os.strerror(-fd)})"
            )
        return fd

    def _start_lazy(self, watched: uffd.Userfaultfd) -> LazyRestore:
        """Put back what cannot wait, start the guardian and the page server, let the target run."""
        from memcr.lazy.guardian import Guardian
        from memcr.lazy.restore import LazyRestore
        from memcr.lazy.server import PageServer
        from memcr.lazy.source import Source

        guardian = Guardian()
        source: Source | None = None
        server: PageServer | None = None
        try:
            now, later = self._split(self._lazy)
            guardian.hold(watched.fd)
            # faults are served before the writes below: a record that goes back now may lie in a watched
            # mapping (a page of it was refilled while parked), and writing its missing pages faults there
            source = Source(self.dump, later, self.pagemap.page_size)
            server = PageServer(self.pid, watched, guardian, source)
            self._written.update(r.addr for r in later)  # from now on the server writes them
            self._write_back(now)
            self.parasite.cure()
            server.check()
            running = self.frozen.resume_traced()  # the last step that may fail: then nothing runs yet
        except BaseException:
            if server is not None:
                server.stop()
                server.close()
            else:
                if source is not None:
                    source.close()
                guardian.end()
                guardian.reap()
                watched.close()
            raise
        server.stream()
        return LazyRestore(running, server, self.log, self._lazily_restored, self._lazily_closed)

    def _lazily_restored(self, phase: LazyRestore) -> None:
        self.report.lazy_ms = phase.elapsed_ms
        self.report.lazy_faults = phase.faults
        self.report.lazy_children = phase.forked
        self.report.ended = phase.ended or ""
        # children forked meanwhile may still need the dump: its name goes now, its bytes with them
        self._restored(keep_dump_open=phase.lingering)

    def _lazily_closed(self) -> None:
        if problem := self.dump.remove():
            logs.error(self.log, f"warning: {problem}")

    def rollback(self, error: BaseException) -> None:
        """After `error`: put back what was dropped and let the target run on.

        Returns when it runs on intact; raises TargetGone when it died, and
        TargetKilled when memcr had to kill it.
        """
        self.reserve.close()
        if _dead(self.frozen):
            self.close_dead()
            raise _gone(self.pid) from error
        if due := self.parasite.drops_due:  # the parasite may still drop pages a rollback would put back
            self.kill()
            raise TargetKilled(
                f"pid {self.pid} was killed: the answers to {due} drops were lost, and the parasite may still drop "
                f"pages memcr would put back, after: {error}",
                pid=self.pid,
            ) from error
        dropped = any(r.dropped for r in self.dump.records)
        try:
            if dropped:
                self._put_back()
            self._let_run()
        except BaseException as cleanup:
            if _dead(self.frozen, grace=1.0):  # killed from outside meanwhile: that is what happened
                self.close_dead()
                raise _gone(self.pid) from error
            self.kill()
            if dropped:
                raise TargetKilled(
                    f"pid {self.pid} was killed: its memory could not be put back ({cleanup}) after: {error}",
                    pid=self.pid,
                ) from error
            raise TargetKilled(
                f"pid {self.pid} was killed: memcr could not release it ({cleanup})", pid=self.pid
            ) from error
        self._clean_up()

    def kill(self) -> None:
        """Kill the target (from inside when memcr may not signal it) and remove what memcr held."""
        self.parasite.disconnect()
        _kill(self.frozen, self.parasite.infection.injector)
        self._clean_up()

    def close_dead(self) -> None:
        """The target died while parked: let go of everything memcr held for it."""
        self.parasite.disconnect()
        self.frozen.collect_dead()
        self._clean_up()

    def ended(self) -> str | None:
        """If the target died while parked (killed from outside): let go of everything memcr held for it,
        its exit included (so that its parent can reap it), and say how it ended; None while it lives.

        From the tracing thread, as every request for the target.
        """
        if not _dead(self.frozen):
            return None
        self.parasite.disconnect()
        ending = self.frozen.collect_ended()
        self._clean_up()
        return ending or "ended"

    def _put_back(self, progress: Progress | None = None) -> None:
        """Write every dropped page back from the dump, checked before use."""
        self._write_back(self._split(lambda record: False)[0], progress)

    def _split(self, later: Callable[[Record], bool]) -> tuple[list[Record], list[Record]]:
        """The records of dropped pages, checked, as (those to write back now, those `later` picks).

        A record that holds a page refilled while parked goes back now
        whatever `later` says: a present page takes no fault.
        """
        records = self.dump.verified_records()
        # pages memcr itself began to write back (an upload that failed midway) are not the kernel's doing
        refilled = self._check_untouched([r for r in records if r.addr not in self._written])
        deferred = [r for r in records if later(r) and r.addr not in refilled]
        skip = {r.addr for r in deferred}
        return [r for r in records if r.addr not in skip], deferred

    def _write_back(self, records: list[Record], progress: Progress | None = None) -> None:
        writable: list[Record] = []
        read_only: list[Record] = []
        for record in records:
            (writable if self._containing(record.addr).prot & mmap.PROT_WRITE else read_only).append(record)
        self._written.update(r.addr for r in records)
        tally = Tally(sum(r.length for r in records), progress)
        if self._direct:
            try:
                upload(self.pid, self.dump, writable, tally)
                writable = []
            except Unavailable as e:
                self.log(f"restoring pid {self.pid} through the parasite: {e}")
            except BaseException:
                self._direct = False  # a second attempt (the rollback) takes the parasite's way
                raise
        self._upload_through_parasite(writable, tally)
        # process_vm_writev and the parasite write a read-only mapping only after an mprotect, which
        # leaves a trace: /proc/<pid>/mem writes through the protection
        for record in read_only:
            at = record.addr
            for chunk in self.dump.chunks(record):
                self.frozen.write(at, chunk)
                at += len(chunk)
                tally.add(len(chunk))

    def _upload_through_parasite(self, records: list[Record], tally: Tally) -> None:
        """Where the kernel has no process_vm_writev: the parasite receives the pages on its socket."""
        for record in records:
            span = self.dump.file_span(record)
            if span is not None:
                self.parasite.store_file(record.addr, record.length, *span)
            else:
                self.parasite.store_chunks(record.addr, record.length, self.dump.chunks(record))
            tally.add(record.length)

    def _check_untouched(self, records: list[Record]) -> set[int]:
        """Raise unless every dropped page is still empty, or was refilled with zeros; the records with such zeros.

        A page written while parked (io_uring, Linux AIO, another process
        writing this one's memory) holds bytes neither the dump nor the
        writer alone can account for: restoring over it would lose the
        write, keeping it would lose the rest of the page.
        """
        page, read = self.pagemap.page_size, self.pagemap.reader(self.parasite)
        written = []
        zeroed: set[int] = set()
        # one scan a stretch of a mapping, its gaps too: a sparse heap's records are each a page or a few
        for span in self._spans(records, gap=SCAN_GAP * page):
            start, last = span[0].addr, span[-1]
            anonymous = self._containing(start).anonymous
            # a read while parked (ps reading /proc/PID/cmdline, a debugger) maps the zero page there, which
            # no fault would replace in a lazy restore: counted too (zero_pfn 0), it makes the record eager
            found = scan.refilled(start, last.addr + last.length - start, anonymous, read, 0, self.pagemap.fd)
            starts = [r.addr for r in span]
            for addr in found:
                record = span[bisect.bisect_right(starts, addr) - 1]
                if addr >= record.addr + record.length:
                    continue  # in a gap: a page memcr left where it was
                # khugepaged may fill a dropped page with zeros; the dump's bytes go over those
                if self.frozen.read(addr, page).count(0) != page:
                    written.append(addr)
                else:
                    zeroed.add(record.addr)
        if written:
            raise WrittenWhileParked(
                f"{len(written)} of the pages memcr dropped were written while pid {self.pid} was parked "
                f"(first at {written[0]:#x}): by io_uring, Linux AIO or another process. "
                "Neither the dump nor the new bytes alone make the page right",
                pid=self.pid,
            )
        return zeroed

    def _spans(self, records: list[Record], gap: int = 0) -> list[list[Record]]:
        """The records (in address order) in runs each in one mapping, with at most `gap` bytes between two:
        an incremental re-park's dump holds many small ones (memcr.park.incremental), a sparse heap's too."""
        spans: list[list[Record]] = []
        for record in records:
            last = spans[-1][-1] if spans else None
            if (
                last
                and 0 <= record.addr - (last.addr + last.length) <= gap
                and self._containing(last.addr).end > record.addr
            ):
                spans[-1].append(record)
            else:
                spans.append([record])
        return spans

    def _containing(self, addr: int) -> Vma:
        return self.vmas[self._index(addr)]

    def _index(self, addr: int) -> int:
        """The place in `vmas` of the mapping that holds addr, by bisection: a process may have 65530 mappings."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self.vmas[i].end:
            raise MemcrError(f"no planned mapping holds {addr:#x}", pid=self.pid)
        return i

    def _let_run(self) -> None:
        """End the parasite, remove every trace of memcr and let the target run."""
        releasing = time.monotonic()
        self.parasite.cure()
        self.frozen.release()
        self.report.release_ms = (time.monotonic() - releasing) * 1000

    def _clean_up(self, keep_dump_open: bool = False, keep_dump: bool = False) -> None:
        """Remove memcr's files and close every descriptor it held for this target; never raises.

        It runs once the target runs again (or is dead): deleting a large
        dump is no longer the target's time, and a failure here must not
        be taken for a failure to restore. `keep_dump_open`: the dump's
        name goes, the file stays open (and locked) for a lazy phase's
        children. `keep_dump`: the dump stays, kept for the next park.
        """
        self.reserve.close()
        self.pagemap.close()
        if keep_dump:
            return
        problem = self.dump.file.unlink() if keep_dump_open else self.dump.remove()
        if problem:
            logs.error(self.log, f"warning: {problem}")


def let_go(frozen: FrozenProcess, reserve: Reserve, error: BaseException) -> None:
    """After `error`, before any page was dropped: let the target run on as it was.

    Raises TargetGone when it died, TargetKilled when memcr could not take
    its traces out and had to kill it.
    """
    reserve.close()
    if _dead(frozen):
        frozen.collect_dead()
        raise _gone(frozen.pid) from error
    try:
        if isinstance(error, Uncured):
            raise error
        frozen.release()
    except BaseException as cleanup:
        if _dead(frozen, grace=1.0):  # killed from outside meanwhile: that, not the release, is what happened
            frozen.collect_dead()
            raise _gone(frozen.pid) from error
        _kill(frozen, None)
        raise TargetKilled(
            f"pid {frozen.pid} was killed: memcr could not release it ({cleanup})", pid=frozen.pid
        ) from error


def _dead(frozen: FrozenProcess, grace: float = 0.0) -> bool:
    """Killed from outside, or it exited: nothing left to protect.

    `grace`: seconds to wait for a death under way to show (after a
    ptrace request failed with ESRCH, a SIGKILL may have just arrived).
    """
    deadline = time.monotonic() + grace
    while not (frozen.exiting() or not processes.alive(frozen.pid)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _gone(pid: int) -> TargetGone:
    return TargetGone(f"pid {pid} ended while memcr was working on it (memcr did not kill it)", pid=pid)


def _kill(frozen: FrozenProcess, injector: Injector | None) -> None:
    try:
        frozen.kill()
    except PermissionError:
        # without CAP_KILL memcr may not signal another user's process, but the
        # process may signal itself: it runs kill(itself, SIGKILL) through the blob
        with contextlib.suppress(TargetGone):
            (injector or Injector(frozen, arch.blobs())).kill_process(procfs.ns_pid(frozen.pid))


def _fillable(vma: Vma) -> bool:
    """Whether userfaultfd may fill the mapping's pages: private anonymous ones (a read-only one is written through
    /proc/pid/mem)."""
    return vma.anonymous and vma.private and bool(vma.prot & mmap.PROT_WRITE) and "ht" not in vma.flags
