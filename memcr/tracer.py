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
import time
from dataclasses import dataclass, field

from ptrace.binding import func as ptrace_func
from ptrace.error import PtraceError

from memcr import procfs
from memcr.arch import Arch
from memcr.errors import MemcrError, TargetError, TargetGone

PTRACE_CONT = 7
PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACECLONE = 1 << 3
PTRACE_O_EXITKILL = 1 << 20
OPTIONS = PTRACE_O_EXITKILL | PTRACE_O_TRACESYSGOOD
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
SYSCALL_STOP = signal.SIGTRAP | 0x80  # what PTRACE_O_TRACESYSGOOD reports at syscall entry and exit
WALL = 0x40000000  # __WALL: wait for threads as well as processes

ALL_SIGNALS = 2**64 - 1
# ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK: the kernel restarts these after a signal
RESTART = {-512, -513, -514, -516}
FREEZE_TIMEOUT = 2.0  # seconds a thread may take to stop for PTRACE_INTERRUPT
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
        """PTRACE_INTERRUPT's stop, or a group stop (SIGSTOP, SIGTSTP, ...) of a seized thread."""
        return os.WIFSTOPPED(self.status) and self.event == PTRACE_EVENT_STOP

    @property
    def syscall_stop(self) -> bool:
        return os.WIFSTOPPED(self.status) and self.event == 0 and self.signal == SYSCALL_STOP


@dataclass
class FrozenProcess:
    """Every thread of `pid` held in a ptrace stop by the calling thread."""

    pid: int
    arch: Arch
    tids: list[int] = field(default_factory=list)
    helpers: list[int] = field(default_factory=list)  # threads memcr started in it (the parasite), traced too
    owner: int = field(default_factory=threading.get_ident)
    leader: int = 0  # the thread that runs injected code: one seccomp leaves every system call
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
                frozen.tids += seized
                deadline = time.monotonic() + FREEZE_TIMEOUT
                for tid in seized:
                    if not frozen._wait_interrupted(tid, deadline):
                        frozen.tids.remove(tid)
            if not frozen.tids:
                raise TargetGone(f"process {pid} exited while being frozen")
            # only now that every thread is held: should memcr die from here on, the kernel kills the target
            for tid in frozen.tids:
                frozen.set_options(tid, OPTIONS)
            frozen.leader = procfs.unconfined_thread(pid, frozen.tids)
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

    def keep_running(self, tid: int) -> bool:
        """Resume a traced thread of ours if it stopped; False once it has exited (and is reaped).

        A thread memcr runs in the target (the parasite) is traced so that a
        group stop (SIGSTOP, or a process that was stopped already) cannot
        hold it: it reports the stop to memcr, which lets it go on. A SIGSTOP
        it dequeues is passed on, so the stop the user asked for still
        happens, to every other thread, when memcr lets them go.
        """
        try:
            got, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            got, status = tid, 0  # gone and reaped: an exit
        if got == 0:
            return True
        stop = Stop(tid, status)
        if stop.exited:
            self._gone(tid)
            return False
        self.cont(tid, stop.signal if stop.event == 0 and not stop.syscall_stop else 0)
        return True

    def interrupt(self, tid: int) -> bool:
        """Stop one traced thread; False if it exited first."""
        try:
            _raw(PTRACE_INTERRUPT, tid)
        except PtraceError as e:
            if e.errno != errno.ESRCH:
                raise
        if self._wait_interrupted(tid):
            return True
        self._gone(tid)
        return False

    def _gone(self, tid: int) -> None:
        for group in (self.tids, self.helpers):
            if tid in group:
                group.remove(tid)

    def _check_owner(self) -> None:
        if threading.get_ident() != self.owner:
            raise MemcrError("internal error: ptrace request from a thread that is not the tracer")

    def _seize(self, tid: int) -> bool:
        try:
            # no EXITKILL yet: a thread that never stops must not take the process with memcr
            _raw(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD)
            _raw(PTRACE_INTERRUPT, tid)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                return False  # the thread exited between listing and seizing
            if e.errno == errno.EPERM:
                tracer = procfs.read_status(f"{self.pid}/task/{tid}").get("TracerPid", "0")
                if tracer != "0":
                    raise TargetError(
                        f"process {self.pid} is already traced by process {tracer} "
                        "(another memcr or a debugger): detach it first"
                    ) from None
                raise procfs.trace_denied(self.pid) from None
            raise
        return True

    def _wait_interrupted(self, tid: int, deadline: float | None = None) -> bool:
        """Wait for the interrupt stop, passing on signals that come first; False if the thread exited.

        With a deadline, a thread that has not stopped by then (it waits in
        the kernel for a vfork child or a hung filesystem, where no
        interrupt reaches it) makes the freeze fail: it stays traced, without
        EXITKILL, until the tracing thread ends, and then simply runs on.
        """
        while True:
            stop = self.wait(tid) if deadline is None else self._wait_until(tid, deadline)
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

    def _wait_until(self, tid: int, deadline: float) -> Stop:
        pause = 0.00005
        while True:
            try:
                got, status = os.waitpid(tid, os.WNOHANG | WALL)
            except ChildProcessError:
                raise TargetGone(f"thread {tid} of process {self.pid} is gone") from None
            if got:
                return Stop(tid, status)
            if time.monotonic() > deadline:
                wchan = procfs.wait_channel(self.pid, tid)
                raise TargetError(
                    f"thread {tid} of process {self.pid} did not stop within {FREEZE_TIMEOUT:g} s: it waits "
                    f"in the kernel ({wchan}), for a vfork child or a hung filesystem. Nothing was changed; "
                    "try again later"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

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

    def run_syscall(self, tid: int, call_regs) -> tuple[object, int]:
        """Run the thread from call_regs (pc on a syscall instruction) through that one syscall.

        Returns its registers at the syscall's exit and, for a clone traced
        with PTRACE_O_TRACECLONE, the new thread's tid (else 0). The thread
        stops at syscall entry and exit (PTRACE_SYSCALL), not at a trap
        instruction: a trap raises SIGTRAP, which would reset a handler the
        target blocked and swallow a SIGTRAP it has pending. A signal that
        comes first is delivered with the thread's own registers in place,
        then the call is tried again.
        """
        saved = self.get_regs(tid)
        while True:
            self.set_regs(tid, call_regs)
            self._syscall(tid)
            stop = self.wait(tid)
            if stop.syscall_stop:
                regs, child = self._finish_syscall(tid)
                if self.arch.syscall_result(regs) not in RESTART:
                    self.set_regs(tid, saved)
                    return regs, child
                # a signal interrupted it (only SIGKILL and SIGSTOP get through the parasite's mask)
                stop = self._run_own_code_briefly(tid, saved)
            self.set_regs(tid, saved)
            self._let_through(tid, stop)

    def _finish_syscall(self, tid: int) -> tuple[object, int]:
        """From syscall entry to exit; the tid of a clone's child when PTRACE_O_TRACECLONE is on."""
        child = 0
        while True:
            self._syscall(tid)
            stop = self.wait(tid)
            if stop.syscall_stop:
                return self.get_regs(tid), child
            if stop.exited:
                raise TargetGone(f"process {self.pid} died while running injected code")
            if stop.event == PTRACE_EVENT_CLONE:
                child = self.event_message(tid)
            elif not stop.interrupt_stop:
                raise MemcrError(f"unexpected stop {stop.status:#x} of thread {tid} inside an injected syscall")

    def _run_own_code_briefly(self, tid: int, saved) -> Stop:
        """Resume the thread on its own registers until it stops again, so a pending signal is dequeued."""
        self.set_regs(tid, saved)
        self.cont(tid)
        _raw(PTRACE_INTERRUPT, tid)
        return self.wait(tid)

    def _syscall(self, tid: int) -> None:
        self._check_owner()
        try:
            _raw(PTRACE_SYSCALL, tid)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise TargetGone(f"process {self.pid} died while running injected code") from None
            raise

    def _let_through(self, tid: int, stop: Stop) -> None:
        """Deliver the signal of a signal-delivery stop, and stop the thread again."""
        if stop.exited:
            raise TargetGone(f"process {self.pid} died while running injected code")
        if stop.event == 0 and stop.signal:
            self.cont(tid, stop.signal)
            _raw(PTRACE_INTERRUPT, tid)
        if not stop.interrupt_stop and not self._wait_interrupted(tid):
            raise TargetGone(f"process {self.pid} died while running injected code")

    def event_message(self, tid: int) -> int:
        self._check_owner()
        value = ctypes.c_ulong()
        _raw(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
        return value.value

    def set_options(self, tid: int, options: int) -> None:
        self._check_owner()
        _raw(PTRACE_SETOPTIONS, tid, 0, options)

    def release(self) -> None:
        """Let every thread run on; tolerate threads that are already gone."""
        for tid in self.tids + self.helpers:
            try:
                _raw(PTRACE_DETACH, tid)
            except PtraceError as e:
                if e.errno != errno.ESRCH:
                    raise
        self.tids.clear()
        self.helpers.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1

    def exiting(self) -> bool:
        """Whether a thread of its own has reported its exit: the process was killed or exited."""
        for tid in self.tids:
            try:
                if os.waitid(os.P_PID, tid, os.WEXITED | os.WNOHANG | os.WNOWAIT | WALL) is not None:
                    return True
            except ChildProcessError:
                return True
        return False

    def forget(self) -> None:
        """The process died: collect what is left of its threads, hold nothing."""
        for tid in self._leader_last():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(tid, os.WNOHANG | WALL)
        self.tids.clear()
        self.helpers.clear()
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
        return sorted(self.tids + self.helpers, key=lambda tid: tid == self.pid)

    def reap(self) -> None:
        """Collect the exit of every thread of a process that is dying."""
        for tid in self._leader_last():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(tid, WALL)
        self.tids.clear()
        self.helpers.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
