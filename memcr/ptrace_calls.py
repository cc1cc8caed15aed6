"""Typed ptrace requests and wait statuses: the binding the engine is built on.

python-ptrace supplies the raw system call and the register layout; this
module adds the requests it lacks (SEIZE, INTERRUPT, the signal mask) and
turns every failure into the OSError subclass of its errno
(ProcessLookupError for ESRCH, PermissionError for EPERM), so the engine
above never sees python-ptrace's types.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from ptrace.binding import func as _func
from ptrace.error import PtraceError

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B

O_TRACESYSGOOD = 1
O_TRACEFORK = 1 << 1
O_TRACEVFORK = 1 << 2
O_TRACECLONE = 1 << 3
O_EXITKILL = 1 << 20

EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_STOP = 128
SYSCALL_STOP = signal.SIGTRAP | 0x80  # what O_TRACESYSGOOD reports at syscall entry and exit
WALL = 0x40000000  # __WALL: wait for threads as well as processes
WNOTHREAD = 0x20000000  # __WNOTHREAD: only the calling thread's children and tracees
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
SIGSET_SIZE = 8  # bytes of the kernel's sigset_t that GET/SETSIGMASK move

Regs = Any  # the architecture's register structure, as python-ptrace lays it out
T = TypeVar("T")


def _checked(call: Callable[[], T]) -> T:
    try:
        return call()
    except PtraceError as e:
        code = e.errno or 0
        raise OSError(code, os.strerror(code)) from None


def _request(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    return int(_checked(lambda: _func.ptrace(request, tid, addr, data)))


def seize(tid: int, options: int) -> None:
    _request(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _request(PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    _request(PTRACE_CONT, tid, 0, sig)


def syscall(tid: int) -> None:
    """Resume until the next system call entry or exit."""
    _request(PTRACE_SYSCALL, tid)


def detach(tid: int, sig: int = 0) -> None:
    _request(PTRACE_DETACH, tid, 0, sig)


def listen(tid: int) -> None:
    """Leave a seized thread in its group stop, and report when the stop ends."""
    _request(PTRACE_LISTEN, tid)


def set_options(tid: int, options: int) -> None:
    _request(PTRACE_SETOPTIONS, tid, 0, options)


def event_message(tid: int) -> int:
    value = ctypes.c_ulong()
    _request(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


def get_sigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    _request(PTRACE_GETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    _request(PTRACE_SETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(value))


def get_regs(tid: int) -> Regs:
    return _checked(lambda: _func.ptrace_getregs(tid))


def set_regs(tid: int, regs: Regs) -> None:
    _checked(lambda: _func.ptrace_setregs(tid, regs))


def peek(tid: int, addr: int) -> int:
    """One word of the tracee's memory, as an unsigned or signed int (mask it)."""
    return int(_checked(lambda: _func.ptrace_peekdata(tid, addr)) or 0)


def poke(tid: int, addr: int, word: int) -> None:
    _checked(lambda: _func.ptrace_pokedata(tid, addr, word))


class Stop:
    """What waitpid reported for one thread."""

    __slots__ = ("status", "tid")

    def __init__(self, tid: int, status: int) -> None:
        self.tid = tid
        self.status = status

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
        return os.WIFSTOPPED(self.status) and self.event == EVENT_STOP

    @property
    def syscall_stop(self) -> bool:
        return os.WIFSTOPPED(self.status) and self.event == 0 and self.signal == SYSCALL_STOP

    @property
    def group_stop(self) -> bool:
        """A seized thread stopped by SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU (an interrupt stop reports SIGTRAP)."""
        return self.interrupt_stop and self.signal in STOP_SIGNALS

    @property
    def signal_delivery(self) -> bool:
        """A signal is about to be delivered: passing it on with cont() delivers it."""
        return self.event == 0 and bool(self.signal) and not self.syscall_stop


def wait(tid: int) -> Stop:
    """Block until the thread stops or exits. ChildProcessError: it is not (or no longer) ours."""
    _, status = os.waitpid(tid, WALL)
    return Stop(tid, status)


def poll(tid: int) -> Stop | None:
    """The thread's stop or exit if it has one to report, else None."""
    got, status = os.waitpid(tid, os.WNOHANG | WALL)
    return Stop(tid, status) if got else None


def has_exited(tid: int) -> bool:
    """Whether the thread has an exit to report, leaving it to be collected."""
    try:
        return os.waitid(os.P_PID, tid, os.WEXITED | os.WNOHANG | os.WNOWAIT | WALL) is not None
    except ChildProcessError:
        return True
