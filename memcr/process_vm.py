"""process_vm_writev(2): copy memcr's memory straight into a stopped target.

The kernel faults the target's pages in and copies into them once, from
any memcr thread: the right it checks is ptrace access (memcr traces the
target), not "the tracing thread". Kernels built without
CONFIG_CROSS_MEMORY_ATTACH (some embedded ones) answer ENOSYS: Unavailable.
"""

from __future__ import annotations

import ctypes
import errno
import os
from functools import cache
from typing import Any

from memcr.errors import MemcrError


class Unavailable(MemcrError):
    """The kernel has no process_vm_writev (CONFIG_CROSS_MEMORY_ATTACH is off)."""


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


@cache
def _call() -> Any:  # a ctypes function
    libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is released during the call
    func = libc.process_vm_writev
    func.restype = ctypes.c_ssize_t
    iov = ctypes.POINTER(_Iovec)
    func.argtypes = (ctypes.c_int, iov, ctypes.c_ulong, iov, ctypes.c_ulong, ctypes.c_ulong)
    return func


def write(pid: int, remote: int, local: int, length: int) -> None:
    """Copy `length` bytes at memcr's address `local` to the target's address `remote`."""
    func = _call()
    mine, theirs = _Iovec(), _Iovec()
    done = 0
    while done < length:
        mine.base, mine.len = local + done, length - done
        theirs.base, theirs.len = remote + done, length - done
        n = func(pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)
        if n < 0:
            code = ctypes.get_errno()
            if code == errno.ENOSYS:
                raise Unavailable("the kernel has no process_vm_writev (CONFIG_CROSS_MEMORY_ATTACH)", errno=code)
            raise OSError(code, f"process_vm_writev to process {pid} at {remote + done:#x}: {os.strerror(code)}")
        if n == 0:
            raise OSError(errno.EFAULT, f"process_vm_writev to process {pid} stopped at {remote + done:#x}")
        done += n
