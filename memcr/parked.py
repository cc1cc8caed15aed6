"""A parked target: frozen, its private pages in a dump. Restore it, or kill it.

Every ending keeps the cardinal rule: the target runs on only with every
dropped page back in place, byte-exact; when that cannot be done it is
killed, and the error says so.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import time
from collections.abc import Callable
from functools import cache

from memcr import arch, procfs, scan
from memcr.dump.format import Record
from memcr.dump.reader import DumpReader
from memcr.errors import MemcrError, TargetGone, TargetKilled, Uncured, WrittenWhileParked
from memcr.infect import Injector
from memcr.parasite import PAGEMAP_ENTRY, Parasite
from memcr.process_vm import Unavailable
from memcr.procfs import Vma
from memcr.report import Report, rss
from memcr.tracer import FrozenProcess
from memcr.upload import upload

RESERVE = 2  # descriptors a rollback may need: /proc reads

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
    ) -> None:
        self.frozen = frozen
        self.parasite = parasite
        self.dump = dump
        self.pagemap = pagemap
        self.vmas = vmas  # the planned mappings, in address order: where each record goes back
        self._starts = [v.start for v in vmas]
        self.reserve = reserve
        self.report = report
        self.log = log
        self._direct = True  # restore with process_vm_writev (memcr.upload), else through the parasite
        self._written: set[int] = set()  # records memcr has begun to write back

    @property
    def pid(self) -> int:
        return self.frozen.pid

    def restore(self) -> None:
        """Put every dropped page back and let the target run on."""
        started = time.monotonic()
        try:
            if not self.dump.file.still_in_place():
                self.log(
                    f"warning: {self.dump.path} was removed or replaced while pid {self.pid} was frozen; "
                    "restoring from the copy memcr holds open"
                )
            self._put_back()
            self.report.upload_ms = (time.monotonic() - started) * 1000
            self._let_run()
        except WrittenWhileParked as e:
            self.kill()
            raise TargetKilled(f"pid {self.pid} was killed: {e}", pid=self.pid) from e
        except BaseException as e:
            self.rollback(e)
            raise
        self._clean_up()
        with contextlib.suppress(MemcrError):  # it runs again: gone by now is its own business
            self.report.rss_restored = rss(procfs.read_status(self.pid))

    def rollback(self, error: BaseException) -> None:
        """After `error`: put back what was dropped and let the target run on.

        Returns when it runs on intact; raises TargetGone when it died, and
        TargetKilled when memcr had to kill it.
        """
        self.reserve.close()
        if _dead(self.frozen):
            self.close_dead()
            raise _gone(self.pid) from error
        dropped = any(r.dropped for r in self.dump.records)
        try:
            if dropped:
                self._put_back()
            self._let_run()
        except BaseException as cleanup:
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

    def _put_back(self) -> None:
        """Write every dropped page back from the dump, checked before use."""
        records = self.dump.verified_records()
        # pages memcr itself began to write back (an upload that failed midway) are not the kernel's doing
        self._check_untouched([r for r in records if r.addr not in self._written])
        writable: list[Record] = []
        read_only: list[Record] = []
        for record in records:
            (writable if self._containing(record.addr).prot & mmap.PROT_WRITE else read_only).append(record)
        self._written.update(r.addr for r in records)
        if self._direct:
            try:
                upload(self.pid, self.dump, writable)
                writable = []
            except Unavailable as e:
                self.log(f"restoring pid {self.pid} through the parasite: {e}")
            except BaseException:
                self._direct = False  # a second attempt (the rollback) takes the parasite's way
                raise
        self._upload_through_parasite(writable)
        # process_vm_writev and the parasite write a read-only mapping only after an mprotect, which
        # leaves a trace: /proc/<pid>/mem writes through the protection
        for record in read_only:
            at = record.addr
            for chunk in self.dump.chunks(record):
                self.frozen.write(at, chunk)
                at += len(chunk)

    def _upload_through_parasite(self, records: list[Record]) -> None:
        """Where the kernel has no process_vm_writev: the parasite receives the pages on its socket."""
        for record in records:
            span = self.dump.file_span(record)
            if span is not None:
                self.parasite.store_file(record.addr, record.length, *span)
            else:
                self.parasite.store_chunks(record.addr, record.length, self.dump.chunks(record))

    def _check_untouched(self, records: list[Record]) -> None:
        """Raise unless every dropped page is still empty, or was refilled with zeros.

        A page written while parked (io_uring, Linux AIO, another process
        writing this one's memory) holds bytes neither the dump nor the
        writer alone can account for: restoring over it would lose the
        write, keeping it would lose the rest of the page.
        """
        page, read = self.pagemap.page_size, self.pagemap.reader(self.parasite)
        written = []
        for record in records:
            anonymous = self._containing(record.addr).anonymous
            found = scan.refilled(record.addr, record.length, anonymous, read, self.pagemap.zero_pfn, self.pagemap.fd)
            # khugepaged may fill a dropped page with zeros; the dump's bytes go over those
            written += [addr for addr in found if self.frozen.read(addr, page).count(0) != page]
        if written:
            raise WrittenWhileParked(
                f"{len(written)} of the pages memcr dropped were written while pid {self.pid} was parked "
                f"(first at {written[0]:#x}): by io_uring, Linux AIO or another process. "
                "Neither the dump nor the new bytes alone make the page right",
                pid=self.pid,
            )

    def _containing(self, addr: int) -> Vma:
        """The mapping that holds addr, by bisection: a process may have 65530 mappings."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self.vmas[i].end:
            raise MemcrError(f"no planned mapping holds {addr:#x}", pid=self.pid)
        return self.vmas[i]

    def _let_run(self) -> None:
        """End the parasite, remove every trace of memcr and let the target run."""
        releasing = time.monotonic()
        self.parasite.cure()
        self.frozen.release()
        self.report.release_ms = (time.monotonic() - releasing) * 1000

    def _clean_up(self) -> None:
        """Remove memcr's files and close every descriptor it held for this target; never raises.

        It runs once the target runs again (or is dead): deleting a large
        dump is no longer the target's time, and a failure here must not
        be taken for a failure to restore.
        """
        self.reserve.close()
        self.pagemap.close()
        if problem := self.dump.remove():
            self.log(f"warning: {problem}")


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
        _kill(frozen, None)
        raise TargetKilled(
            f"pid {frozen.pid} was killed: memcr could not release it ({cleanup})", pid=frozen.pid
        ) from error


def _dead(frozen: FrozenProcess) -> bool:
    """Killed from outside, or it exited: nothing left to protect."""
    return frozen.exiting() or not procfs.alive(frozen.pid)


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
