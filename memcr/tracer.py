"""The ptrace engine: freeze every thread of a process and run code in it.

python-ptrace supplies the raw request and register layout; the requests
it lacks (SEIZE, INTERRUPT, sigmask) are issued through the same binding.
All requests for a tracee must come from the thread that seized it, so a
FrozenProcess refuses calls from any other thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
from dataclasses import dataclass, field

from ptrace.binding import func as ptrace_func
from ptrace.error import PtraceError

from memcr import procfs
from memcr.arch import Arch
from memcr.errors import MemcrError, TargetError, TargetGone

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_O_EXITKILL = 1 << 20
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for threads as well as processes

ALL_SIGNALS = 2**64 - 1
WORD = 8  # bytes moved by one PTRACE_PEEKDATA or PTRACE_POKEDATA


def _raw(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    return ptrace_func.ptrace(request, tid, addr, data)


@dataclass
class Stop:
    """What waitpid reported for one thread."""

    tid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def signal(self) -> int:
        return os.WSTOPSIG(self.status) if os.WIFSTOPPED(self.status) else 0

    @property
    def event(self) -> int:
        return self.status >> 16

    @property
    def interrupt_stop(self) -> bool:
        return os.WIFSTOPPED(self.status) and self.event == PTRACE_EVENT_STOP


@dataclass
class FrozenProcess:
    """Every thread of `pid` held in a ptrace stop by the calling thread."""

    pid: int
    arch: Arch
    tids: list[int] = field(default_factory=list)
    owner: int = field(default_factory=threading.get_ident)
    _mem: int = -1

    @classmethod
    def freeze(cls, pid: int, arch: Arch) -> FrozenProcess:
        """Seize and stop every thread; repeat until no new thread appears."""
        frozen = cls(pid, arch)
        try:
            while True:
                new = procfs.thread_ids(pid) - set(frozen.tids)
                if not new:
                    break
                seized = [tid for tid in sorted(new) if frozen._seize(tid)]
                for tid in seized:
                    if frozen._wait_interrupted(tid):
                        frozen.tids.append(tid)
            if not frozen.tids:
                raise TargetGone(f"process {pid} exited while being frozen")
            try:
                frozen._mem = os.open(procfs.proc_path(pid, "mem"), os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                # /proc/<pid>/mem is 0600 and the target's: with CAP_SYS_PTRACE
                # alone, memcr reads and writes words through ptrace instead
                frozen._mem = -1
        except BaseException:
            frozen.release()
            raise
        return frozen

    @property
    def leader(self) -> int:
        """The thread that runs injected code."""
        return self.pid if self.pid in self.tids else self.tids[0]

    def adopt(self, tid: int) -> bool:
        """Seize and stop one more thread without adding it to the frozen set."""
        return self._seize(tid) and self._wait_interrupted(tid)

    def _check_owner(self) -> None:
        if threading.get_ident() != self.owner:
            raise MemcrError("internal error: ptrace request from a thread that is not the tracer")

    def _seize(self, tid: int) -> bool:
        try:
            _raw(PTRACE_SEIZE, tid, 0, PTRACE_O_EXITKILL)
            _raw(PTRACE_INTERRUPT, tid)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                return False  # the thread exited between listing and seizing
            if e.errno == errno.EPERM:
                tracer = procfs.read_status(self.pid).get("TracerPid", "0")
                if tracer != "0":
                    raise TargetError(
                        f"process {self.pid} is already traced by process {tracer} "
                        "(another memcr or a debugger): detach it first"
                    ) from None
                raise procfs.trace_denied(self.pid) from None
            raise
        return True

    def _wait_interrupted(self, tid: int) -> bool:
        """Wait for the interrupt stop, passing on signals that come first."""
        while True:
            stop = self.wait(tid)
            if stop.exited:
                return False
            if stop.interrupt_stop:
                return True
            if stop.event == 0 and stop.signal:
                # a signal-delivery stop came before our interrupt: deliver it
                self.cont(tid, stop.signal)
                _raw(PTRACE_INTERRUPT, tid)
            else:
                self.cont(tid)
                _raw(PTRACE_INTERRUPT, tid)

    def wait(self, tid: int) -> Stop:
        try:
            _, status = os.waitpid(tid, WALL)
        except ChildProcessError:
            raise TargetGone(f"thread {tid} of process {self.pid} is gone") from None
        return Stop(tid, status)

    def cont(self, tid: int, sig: int = 0) -> None:
        self._check_owner()
        _raw(PTRACE_CONT, tid, 0, sig)

    def get_regs(self, tid: int):
        self._check_owner()
        return ptrace_func.ptrace_getregs(tid)

    def set_regs(self, tid: int, regs) -> None:
        self._check_owner()
        ptrace_func.ptrace_setregs(tid, regs)

    def get_sigmask(self, tid: int) -> int:
        self._check_owner()
        mask = ctypes.c_uint64()
        _raw(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
        return mask.value

    def set_sigmask(self, tid: int, mask: int) -> None:
        self._check_owner()
        value = ctypes.c_uint64(mask)
        _raw(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))

    def read(self, addr: int, size: int) -> bytes:
        if self._mem >= 0:
            return os.pread(self._mem, size, addr)
        start = addr & ~(WORD - 1)
        words = b"".join(self._peek(at) for at in range(start, addr + size, WORD))
        return words[addr - start : addr - start + size]

    def write(self, addr: int, data: bytes) -> None:
        if self._mem >= 0:
            if os.pwrite(self._mem, data, addr) != len(data):
                raise MemcrError(f"short write into process {self.pid} at {addr:#x}")
            return
        start = addr & ~(WORD - 1)
        end = -(-(addr + len(data)) // WORD) * WORD
        # whole words: keep the bytes around `data` in the first and last word
        merged = bytearray(end - start)
        merged[:WORD] = self._peek(start)
        merged[-WORD:] = self._peek(end - WORD)
        merged[addr - start : addr - start + len(data)] = data
        self._check_owner()
        for at in range(start, end, WORD):
            word = int.from_bytes(merged[at - start : at - start + WORD], "little")
            self._word_request(ptrace_func.ptrace_pokedata, at, word)

    def _peek(self, at: int) -> bytes:
        self._check_owner()
        value = self._word_request(ptrace_func.ptrace_peekdata, at)
        return (value & (2**64 - 1)).to_bytes(WORD, "little")

    def _word_request(self, request, *args: int) -> int:
        try:
            return request(self.leader, *args) or 0
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise TargetGone(f"process {self.pid} is gone") from None
            raise MemcrError(f"cannot access the memory of process {self.pid}: {e}") from None

    @property
    def mem_fd(self) -> int:
        """/proc/<pid>/mem, open for reading and writing (-1 when memcr may not open it)."""
        return self._mem

    def run_until_trap(self, tid: int, call_regs, trap_pc: int) -> object:
        """Run the thread from call_regs until it traps at trap_pc; return its regs.

        A signal that arrives instead of the trap is delivered with the
        thread's own registers in place, then the call is retried.
        """
        saved = self.get_regs(tid)
        while True:
            self.set_regs(tid, call_regs)
            self.cont(tid)
            stop = self.wait(tid)
            if stop.exited:
                raise TargetGone(f"process {self.pid} died while running injected code")
            regs = self.get_regs(tid)
            self.set_regs(tid, saved)
            if stop.event == 0 and stop.signal == signal.SIGTRAP and self.arch.pc(regs) == trap_pc:
                return regs
            if stop.event == 0 and stop.signal in (signal.SIGTRAP, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL):
                raise MemcrError(
                    f"injected code failed in process {self.pid} (signal {stop.signal} "
                    f"at {self.arch.pc(regs):#x})"
                )
            if stop.event == 0 and stop.signal:
                # a signal arrived instead of the trap: deliver it, then retry
                self.cont(tid, stop.signal)
                _raw(PTRACE_INTERRUPT, tid)
            if not stop.interrupt_stop and not self._wait_interrupted(tid):
                raise TargetGone(f"process {self.pid} died while running injected code")

    def release(self) -> None:
        """Let every thread run on; tolerate threads that are already gone."""
        for tid in self.tids:
            try:
                _raw(PTRACE_DETACH, tid)
            except PtraceError as e:
                if e.errno != errno.ESRCH:
                    raise
        self.tids.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1

    def forget(self) -> None:
        """The process died: collect what is left of its threads, hold nothing."""
        for tid in self._leader_last():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(tid, os.WNOHANG | WALL)
        self.tids.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1

    def kill(self) -> None:
        """SIGKILL the whole process and reap its threads' ptrace state.

        PermissionError: memcr lacks CAP_KILL for another user's process.
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.reap()

    def kill_from_inside(self, regs) -> None:
        """Run the leader on `regs` (a kill of its own process) and collect the dead."""
        self.set_regs(self.leader, regs)
        self.cont(self.leader)
        self.reap()

    def _leader_last(self) -> list[int]:
        # the kernel reports a traced leader's exit only after its other threads'
        return sorted(self.tids, key=lambda tid: tid == self.pid)

    def reap(self) -> None:
        """Collect the exit of every thread of a process that is dying."""
        for tid in self._leader_last():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(tid, WALL)
        self.tids.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
