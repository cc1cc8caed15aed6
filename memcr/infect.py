"""Infection as a library: put the parasite thread into a frozen process and take it out.

What the parasite does once it runs is memcr.parasite's business; this
module only maps it, starts it as a thread and, at the end, waits for it to
exit and removes every trace of it (the compel split).
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from memcr import procfs
from memcr.arch import Blobs
from memcr.errors import MemcrError, ParasiteError, TargetError, TargetGone
from memcr.tracer import ALL_SIGNALS, OPTIONS, PTRACE_O_TRACECLONE, FrozenProcess

PAGE = mmap.PAGESIZE
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


def _page_up(size: int) -> int:
    return (size + PAGE - 1) & ~(PAGE - 1)


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
    raise TargetError(f"process {pid} has no private executable mapping to run memcr's system calls from")


@dataclass
class Infection:
    """The parasite's mapping and thread inside a FrozenProcess."""

    frozen: FrozenProcess
    blobs: Blobs
    base: int = 0
    size: int = 0
    tid: int = 0
    site: int = 0  # where the syscall blob goes: the start of a private executable mapping
    _sigmask: int | None = None

    def __post_init__(self) -> None:
        self.site = injection_site(self.frozen.pid)

    def syscall(self, nr: int, *args: int) -> int:
        """Run one system call in the target through the syscall blob."""
        f, tid, at = self.frozen, self.frozen.leader, self.site
        regs = f.get_regs(tid)
        code = self.blobs.syscall
        original = f.read(at, len(code))
        f.write(at, code)
        try:
            done, _ = f.run_syscall(tid, f.arch.prepare_syscall(regs, at, nr, args))
        finally:
            self._put_code_back(at, original)
        return f.arch.syscall_result(done)

    def kill_from_inside(self, ns_pid: int) -> None:
        """Make the process SIGKILL itself (memcr may lack the right to signal it)."""
        f, tid, at = self.frozen, self.frozen.leader, self.site
        regs = f.get_regs(tid)
        f.write(at, self.blobs.syscall)  # never put back: the process is about to die
        f.kill_from_inside(f.arch.prepare_syscall(regs, at, f.arch.SYS_KILL, (ns_pid, signal.SIGKILL)))

    def _put_code_back(self, at: int, original: bytes) -> None:
        try:
            self.frozen.write(at, original)
        except (OSError, TargetGone):
            if procfs.alive(self.frozen.pid):
                raise MemcrError(f"could not restore the code of process {self.frozen.pid} at {at:#x}") from None
            # the target died: the error that killed it is the one to report

    @property
    def mapping(self) -> tuple[int, int]:
        return self.base, self.base + self.size

    def inject(self, args: bytes) -> int:
        """Map the parasite with `args` in place, start its thread, return its tid."""
        f, tid = self.frozen, self.frozen.leader
        self._sigmask = f.get_sigmask(tid)
        # the parasite inherits this mask: no signal handler of the target may run on it
        f.set_sigmask(tid, ALL_SIGNALS)
        code_size = _page_up(self.blobs.offsets["parasite_end"])
        size = code_size + STACK_SIZE
        base = self.syscall(f.arch.SYS_MMAP, 0, size, PROT_RWX, MAP_PRIVATE_ANON, 2**64 - 1, 0)
        if base < 0:
            raise ParasiteError(f"could not map the parasite in process {f.pid}: {os.strerror(-base)}")
        self.base, self.size = base, size
        f.write(base, self.blobs.parasite)
        f.write(base + self.blobs.offsets["parasite_args"], args)
        regs = f.get_regs(tid)
        call = f.arch.prepare_syscall(
            regs,
            base + self.blobs.offsets["clone_trampoline"],
            f.arch.SYS_CLONE,
            (CLONE_FLAGS, base + size, 0, 0, 0),
        )
        # traced from birth: a group stop must not hold it (see FrozenProcess.keep_running)
        f.set_options(tid, OPTIONS | PTRACE_O_TRACECLONE)
        try:
            done, child = f.run_syscall(tid, call)
        finally:
            f.set_options(tid, OPTIONS)
        result = f.arch.syscall_result(done)
        if result <= 0 or not child:
            raise ParasiteError(f"could not start the parasite thread: {os.strerror(-result)}")
        self.tid = child
        f.helpers.append(child)  # killed and reaped with the others if it comes to that
        return self.tid

    def read_args(self, size: int) -> bytes:
        return self.frozen.read(self.base + self.blobs.offsets["parasite_args"], size)

    def keep_running(self) -> bool:
        """Let the parasite go on if it stopped; False once it has exited."""
        return self.frozen.keep_running(self.tid)

    def cure(self, open_fds: Callable[[], Iterable[int]], timeout: float = 2.0) -> None:
        """Make sure the parasite thread is gone, unmap it, restore the signal mask.

        `open_fds` tells which descriptors a parasite that must be stopped
        by force still holds (the parasite's protocol knows, not this module).
        """
        f = self.frozen
        if self.tid:
            deadline = time.monotonic() + timeout
            while (running := self.keep_running()) and time.monotonic() < deadline:
                time.sleep(0.0005)
            if running:
                self._force_exit(open_fds)
            self.tid = 0
        if self.base:
            result = self.syscall(f.arch.SYS_MUNMAP, self.base, self.size)
            if result < 0:
                raise MemcrError(f"could not unmap the parasite: {os.strerror(-result)}")
            self.base = self.size = 0
        if self._sigmask is not None:
            f.set_sigmask(f.leader, self._sigmask)
            self._sigmask = None

    def _force_exit(self, open_fds: Callable[[], Iterable[int]]) -> None:
        """Stop a parasite that cannot be told to end: trace it, close its fds, make it exit.

        Its descriptors belong to the whole process (CLONE_FILES): left open,
        a listening socket would outlive the thread and block every later
        checkpoint of this target.
        """
        f = self.frozen
        if not f.interrupt(self.tid):
            return  # it exited meanwhile
        # the parasite's own code page is ours to overwrite
        f.write(self.base, self.blobs.syscall)
        regs = f.get_regs(self.tid)
        for fd in open_fds():
            if fd >= 0:
                f.run_syscall(self.tid, f.arch.prepare_syscall(regs, self.base, f.arch.SYS_CLOSE, (fd,)))
        f.set_regs(self.tid, f.arch.prepare_syscall(regs, self.base, f.arch.SYS_EXIT, (0,)))
        f.cont(self.tid)
        if not f.wait(self.tid).exited:
            raise ParasiteError(f"the parasite in process {f.pid} would not exit")
        f.helpers.remove(self.tid)
