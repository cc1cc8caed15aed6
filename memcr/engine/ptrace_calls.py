"""Typed ptrace requests and wait statuses: the layer the engine is built on.

The system call is python-ptrace's binding (`ptrace.binding.func.ptrace`);
this layer adds what it lacks: SEIZE, INTERRUPT, LISTEN, GET/SETSIGMASK by
name, and registers as the NT_PRSTATUS register set (PTRACE_GETREGSET) laid
out by the architecture's `Regs` structure, the same on every CPU (arm64
has no PTRACE_GETREGS; python-ptrace picks its layouts by the host CPU and
uses GETREGS on x86_64). Every failure becomes the OSError subclass of its
errno (ProcessLookupError for ESRCH, PermissionError for EPERM).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from memcr.system.libc import Iovec

PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B

O_TRACESYSGOOD = 1
O_TRACEFORK = 1 << 1
O_TRACEVFORK = 1 << 2
O_TRACECLONE = 1 << 3
O_TRACEEXEC = 1 << 4
O_EXITKILL = 1 << 20

EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_STOP = 128
SYSCALL_STOP = signal.SIGTRAP | 0x80  # what O_TRACESYSGOOD reports at syscall entry and exit
WALL = 0x40000000  # __WALL: wait for threads as well as processes
WNOTHREAD = 0x20000000  # __WNOTHREAD: only the calling thread's children and tracees
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
SIGSET_SIZE = 8  # bytes of the kernel's sigset_t that GET/SETSIGMASK move
NT_PRSTATUS = 1  # the general-purpose registers, as a register set

Regs = Any  # an instance of the architecture's Regs structure (memcr.engine.arch)
R = TypeVar("R", bound=ctypes.Structure)


class ShortRegset(OSError):
    """The kernel filled fewer bytes of a register set than the architecture's layout has.

    A 32-bit (compat) task: its registers come in the 32-bit layout.
    """


@cache
def _binding() -> tuple[Callable[..., int], type[Exception]]:
    """python-ptrace's call and its error, loaded on first use: a daemon that parks nothing never needs them."""
    from ptrace import PtraceError
    from ptrace.binding.func import ptrace

    return ptrace, PtraceError


def load() -> None:
    """Load the binding now: its first load takes milliseconds (ctypes looks libc up), which must not be frozen time."""
    _binding()


def _request(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """One ptrace call; its result, signed. A PEEK's result may be -1 as a value, hence errno."""
    call, error = _binding()
    ctypes.set_errno(0)  # python-ptrace reads errno after a -1 without clearing it first
    try:
        result = call(request, tid, addr, data, check_errno=True)
    except error as e:
        code = e.errno  # type: ignore[attr-defined]  # PtraceError's, untyped
        raise OSError(code, os.strerror(code)) from None
    return ctypes.c_long(result).value


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


def get_regs(tid: int, layout: type[R]) -> R:
    """The thread's general-purpose registers. ShortRegset: a 32-bit task's."""
    regs = layout()
    iov = Iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
    _request(PTRACE_GETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov))
    if iov.len != ctypes.sizeof(regs):
        raise ShortRegset(errno.EIO, f"thread {tid} has {iov.len} bytes of registers, not {ctypes.sizeof(regs)}")
    return regs


def set_regs(tid: int, regs: ctypes.Structure) -> None:
    iov = Iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
    _request(PTRACE_SETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov))


def get_regset(tid: int, kind: int, size: int) -> bytes:
    """Up to `size` bytes of another register set (NT_ARM_SVE ...), as the kernel lays it out."""
    buffer = ctypes.create_string_buffer(size)
    iov = Iovec(ctypes.addressof(buffer), size)
    _request(PTRACE_GETREGSET, tid, kind, ctypes.addressof(iov))
    return buffer.raw[: iov.len]


def set_regset(tid: int, kind: int, data: bytes) -> None:
    buffer = ctypes.create_string_buffer(data, len(data))
    iov = Iovec(ctypes.addressof(buffer), len(data))
    _request(PTRACE_SETREGSET, tid, kind, ctypes.addressof(iov))


def peek(tid: int, addr: int) -> int:
    """One word of the tracee's memory, as a signed int (mask it)."""
    return _request(PTRACE_PEEKDATA, tid, addr)


def poke(tid: int, addr: int, word: int) -> None:
    _request(PTRACE_POKEDATA, tid, addr, word)


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

    @property
    def ending(self) -> str:
        """How an exited thread's process ended, in words: "exited with 3", "killed by SIGKILL"."""
        if os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            try:
                return f"killed by {signal.Signals(sig).name}"
            except ValueError:
                return f"killed by signal {sig}"
        return f"exited with {os.WEXITSTATUS(self.status)}"


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
