"""Infection as a library: run system calls in a frozen process, start a blob as a thread in it, take it out.

What the parasite does once it runs is memcr.engine.parasite's business; this
module only maps a blob, starts it as a thread and, at the end, waits for
it to exit and removes every trace of it (the compel split).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import time
from collections.abc import Iterable

from memcr.engine import admission
from memcr.engine import ptrace_calls as pt
from memcr.engine.arch import Blobs, word_mask
from memcr.engine.tracer import OPTIONS, FrozenProcess
from memcr.errors import MemcrError, ParasiteError, RightsError, TargetError, TargetGone, TargetLimit, Uncured
from memcr.system import processes, procfs

STACK_SIZE = 64 * 1024
CLONE_FLAGS = (
    0x00000100  # CLONE_VM
    | 0x00000200  # CLONE_FS
    | 0x00000400  # CLONE_FILES
    | 0x00000800  # CLONE_SIGHAND
    | 0x00010000  # CLONE_THREAD
    | 0x00040000  # CLONE_SYSVSEM
    | 0x80000000  # CLONE_IO
)
PROT_RWX = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
MAP_PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
ALL_SIGNALS = (1 << 8 * pt.SIGSET_SIZE) - 1


def mapping_size(blobs: Blobs, page_size: int) -> int:
    """The bytes the parasite's mapping takes in the target: its code and bss, then its stack."""
    return -(-blobs.offsets["parasite_end"] // page_size) * page_size + STACK_SIZE


# the parasite's descriptors in the target: its listening socket and the connection, all the time
PARASITE_FDS = 2


def parasite_descriptors(pid: int, socket_gid: int | None) -> int:
    """How many descriptors the parasite opens in the target: one more with -G (an O_PATH of its socket
    file, for its group), one more where memcr may not read the target's pagemap (the parasite reads its own)."""
    extra = int(socket_gid is not None)
    fd = procfs.open_pagemap(pid)
    if fd is None:
        extra += 1
    else:
        os.close(fd)
    return PARASITE_FDS + extra


MIB = 1 << 20


def room_problems(pid: int, size: int, descriptors: int = PARASITE_FDS) -> list[TargetLimit]:
    """The target's limits that leave no room for a parasite mapping of `size` bytes and its descriptors.

    All are read from /proc, so that they are found before anything of the
    target changes; an injected mmap or the parasite's socket() would fail
    (ENOMEM, EMFILE) on any of them.
    """
    found = []
    limits = procfs.limits(pid)
    status = procfs.read_status(pid)
    for key, status_key, what, name in (
        ("Max address space", "VmSize", "as", "address space and its RLIMIT_AS"),
        ("Max data size", "VmData", "data", "data (private writable memory) and its RLIMIT_DATA"),
    ):
        soft, hard = limits.get(key, (None, None))
        used = procfs.memory_kb(status, status_key) * 1024
        if soft is not None and used + size > soft:
            found.append(
                TargetLimit(
                    f"process {pid} uses {used >> 10} KiB of {name} soft limit is {soft >> 10} KiB: "
                    f"memcr's parasite needs {size >> 10} KiB more",
                    pid=pid,
                    what=what,
                    wanted=-(-(used + size) // MIB) * MIB,  # whole MiB: a little room besides
                    errno=errno.ENOMEM,
                    hard=hard,
                )
            )
    # the kernel refuses a new mapping once the count is above the limit: the parasite is one new mapping
    highest, count = procfs.max_map_count(), procfs.map_count(pid)
    if highest is not None and count > highest:
        found.append(
            TargetLimit(
                f"process {pid} has {count} mappings, more than vm.max_map_count ({highest}) allows: "
                "the kernel maps no more for it, not even the parasite",
                pid=pid,
                what="max-map-count",
                wanted=count + 64,
                errno=errno.ENOMEM,
            )
        )
    soft, hard = limits.get("Max open files", (None, None))
    if soft is not None:
        used = procfs.descriptors_below(pid, soft)
        if soft - used < descriptors:
            found.append(
                TargetLimit(
                    f"process {pid} has {used} file descriptors open and its RLIMIT_NOFILE soft limit is {soft}: "
                    f"memcr's parasite needs {descriptors} free for its socket, {soft - used} are",
                    pid=pid,
                    what="nofile",
                    wanted=used + descriptors,
                    errno=errno.EMFILE,
                    hard=hard,
                )
            )
    return found


def check_room(pid: int, blobs: Blobs, page_size: int, socket_gid: int | None) -> None:
    """Refuse a target whose limits leave no room for the parasite, naming the first such limit."""
    try:
        problems = room_problems(pid, mapping_size(blobs, page_size), parasite_descriptors(pid, socket_gid))
    except RightsError as e:
        raise admission.trace_denied(pid, e) from None  # its maps and descriptors are for those who may trace it
    if problems:
        raise problems[0]


def room_error(pid: int, size: int, err: int, whats: tuple[str, ...], failed: str) -> MemcrError:
    """A late failure (`err` from the target's mmap or socket) as the limit that caused it, when one shows."""
    with contextlib.suppress(MemcrError, OSError):
        for problem in room_problems(pid, size):
            if problem.what in whats:
                return problem
    return ParasiteError(f"{failed}: {os.strerror(err)}", pid=pid, errno=err)


def injection_site(pid: int) -> int:
    """The start of a private executable mapping, where the syscall blob may go.

    Not the page at the thread's pc: in a shared mapping (a JIT's double
    mapping, code shared with a forked child) other processes would run
    the blob, or the write would be refused. Any executable page will do:
    the thread runs the blob from there and its pc is put back.
    """
    for vma in procfs.read_maps(pid, flags=False):
        if vma.private and vma.perms[2] == "x" and vma.path not in procfs.SPECIAL:
            return vma.start
    raise TargetError(f"process {pid} has no private executable mapping to run memcr's system calls from", pid=pid)


class Injector:
    """Runs single system calls in a frozen process through the syscall blob."""

    def __init__(self, frozen: FrozenProcess, blobs: Blobs) -> None:
        self.frozen = frozen
        self.blobs = blobs
        self.site = injection_site(frozen.pid)

    def syscall(self, nr: int, *args: int) -> int:
        """Run one system call on the leader; its result (-errno on failure)."""
        f, tid, at = self.frozen, self.frozen.leader, self.site
        code = self.blobs.syscall
        original = f.read(at, len(code))
        f.write(at, code)
        try:
            done, _ = f.run_syscall(tid, at, nr, args)
        finally:
            self._put_code_back(at, original)
        return f.arch.syscall_result(done)

    def kill_process(self, ns_pid: int) -> None:
        """Make the process SIGKILL itself (memcr may lack the right to signal it) and collect it."""
        f, at = self.frozen, self.site
        f.write(at, self.blobs.syscall)  # never put back: the process is about to die
        f.run_to_death(at, f.arch.SYS_KILL, (ns_pid, signal.SIGKILL))

    def _put_code_back(self, at: int, original: bytes) -> None:
        try:
            self.frozen.write(at, original)
        except (OSError, TargetGone):
            if processes.alive(self.frozen.pid):
                raise MemcrError(
                    f"could not restore the code of process {self.frozen.pid} at {at:#x}", pid=self.frozen.pid
                ) from None
            # the target died: the error that killed it is the one to report


class Infection:
    """A blob mapped into a frozen process, its thread not started yet.

    The leader's signal mask is all-blocked while it exists, so the thread
    inherits a mask under which no handler of the target runs.
    """

    def __init__(self, injector: Injector, base: int, size: int, sigmask: int) -> None:
        self.injector = injector
        self.frozen = injector.frozen
        self.base = base
        self.size = size
        self._sigmask = sigmask  # the leader's own

    @classmethod
    def map(cls, injector: Injector, page_size: int) -> Infection:
        """Map the blob (code, bss and a stack) into the process; the thread is not started yet."""
        f, blobs = injector.frozen, injector.blobs
        sigmask = f.get_sigmask(f.leader)
        f.set_sigmask(f.leader, ALL_SIGNALS)
        size = mapping_size(blobs, page_size)
        base = -1
        try:
            base = injector.syscall(f.arch.SYS_MMAP, 0, size, PROT_RWX, MAP_PRIVATE_ANON, word_mask(f.arch), 0)
            if base < 0:
                failed = f"could not map the parasite in process {f.pid}"
                raise room_error(f.pid, size, -base, ("as", "data", "max-map-count"), failed)
            f.write(base, blobs.parasite)
        except BaseException as error:
            try:
                if base >= 0 and injector.syscall(f.arch.SYS_MUNMAP, base, size) < 0:
                    raise MemcrError(f"munmap of {base:#x} failed", pid=f.pid)
                f.set_sigmask(f.leader, sigmask)
            except BaseException as cleanup:
                raise Uncured(f"{error}; then memcr could not undo the mapping: {cleanup}", pid=f.pid) from error
            raise
        return cls(injector, base, size, sigmask)

    @property
    def mapping(self) -> tuple[int, int]:
        return self.base, self.base + self.size

    def _args_at(self) -> int:
        return self.base + self.injector.blobs.offsets["parasite_args"]

    def write_args(self, args: bytes) -> None:
        self.frozen.write(self._args_at(), args)

    def read_args(self, size: int) -> bytes:
        return self.frozen.read(self._args_at(), size)

    def start(self) -> BlobThread:
        """Start the blob's thread at its clone trampoline."""
        f, tid = self.frozen, self.frozen.leader
        trampoline = self.base + self.injector.blobs.offsets["clone_trampoline"]
        args = (CLONE_FLAGS, self.base + self.size, 0, 0, 0)
        # traced from birth: a group stop must not hold it (see FrozenProcess.keep_running)
        f.set_options(tid, OPTIONS | pt.O_TRACECLONE)
        try:
            done, child = f.run_syscall(tid, trampoline, f.arch.SYS_CLONE, args)
        finally:
            f.set_options(tid, OPTIONS)
        result = f.arch.syscall_result(done)
        if result <= 0 or not child:
            why = os.strerror(-result)
            if result == -errno.EAGAIN:  # the preflight ruled out SCHED_DEADLINE: what is left is a count
                why += " (its user's process limit, RLIMIT_NPROC, or the system's kernel.threads-max is reached)"
            failed = f"could not start the parasite thread in process {f.pid}: {why}"
            raise ParasiteError(failed, pid=f.pid, errno=-result)
        f.helpers.append(child)  # killed and collected with the others if it comes to that
        return BlobThread(self, child)

    def cure(self) -> None:
        """Unmap the blob and restore the leader's signal mask; its thread never started, or has exited."""
        f = self.frozen
        result = self.injector.syscall(f.arch.SYS_MUNMAP, self.base, self.size)
        if result < 0:
            raise MemcrError(f"could not unmap the parasite: {os.strerror(-result)}", pid=f.pid)
        f.set_sigmask(f.leader, self._sigmask)


class BlobThread:
    """The blob's thread, running in the frozen process as a traced thread of memcr's."""

    def __init__(self, infection: Infection, tid: int) -> None:
        self.infection = infection
        self.frozen = infection.frozen
        self.tid = tid

    def keep_running(self) -> bool:
        """Let the thread go on if a stop caught it; False once it has exited."""
        return self.frozen.keep_running(self.tid)

    def cure(self, timeout: float, open_fds: Iterable[int]) -> None:
        """Wait up to `timeout` for the thread to exit, then cure the infection.

        A thread still running then is made to close `open_fds` (its
        descriptors belong to the whole process: left open, a listening
        socket would outlive it and block every later checkpoint) and exit.
        """
        deadline = time.monotonic() + timeout
        while (running := self.keep_running()) and time.monotonic() < deadline:
            time.sleep(0.0005)
        if running:
            self._force_exit(open_fds)
        self.infection.cure()

    def _force_exit(self, open_fds: Iterable[int]) -> None:
        f, tid, base = self.frozen, self.tid, self.infection.base
        if not f.interrupt(tid):
            return  # it exited meanwhile
        # the blob's own code page is ours to overwrite
        f.write(base, self.infection.injector.blobs.syscall)
        for fd in open_fds:
            if fd >= 0:
                f.run_syscall(tid, base, f.arch.SYS_CLOSE, (fd,))
        f.set_regs(tid, f.arch.prepare_syscall(f.own_regs(tid), base, f.arch.SYS_EXIT, (0,)))
        f.cont(tid)
        if not f.wait(tid).exited:
            raise ParasiteError(f"the parasite in process {f.pid} would not exit", pid=f.pid)
        f.helpers.remove(tid)
