"""process_vm_writev(2) and process_vm_readv(2): copy between memcr's memory and a stopped target's.

The kernel faults the target's pages in and copies once, from any memcr
thread: the right it checks is ptrace access (memcr traces the target),
not "the tracing thread". Kernels built without CONFIG_CROSS_MEMORY_ATTACH
(some embedded ones) answer ENOSYS: Unavailable.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

from memcr.errors import MemcrError
from memcr.system import libc


class Unavailable(MemcrError):
    """The kernel has no process_vm_writev or process_vm_readv (CONFIG_CROSS_MEMORY_ATTACH is off)."""


IOV_MAX = 1024  # buffers one call takes

Piece = tuple[int, int, int]  # the target's address, memcr's, the bytes
_Call = Callable[[int, "ctypes.Array[libc.Iovec]", "ctypes.Array[libc.Iovec]"], int]


def write_many(pid: int, pieces: list[Piece]) -> None:
    """Copy each (remote, local, length) into the target, in as few calls as can be."""
    _copy(pid, pieces, libc.process_vm_writev, "process_vm_writev", "to")


def read_many(pid: int, pieces: list[Piece]) -> None:
    """Copy each (remote, local, length) out of the target, in as few calls as can be."""
    _copy(pid, pieces, libc.process_vm_readv, "process_vm_readv", "from")


def _copy(pid: int, pieces: list[Piece], call: _Call, name: str, way: str) -> None:
    pending = [piece for piece in pieces if piece[2]]
    while pending:
        batch = pending[:IOV_MAX]
        mine, theirs = (libc.Iovec * len(batch))(), (libc.Iovec * len(batch))()
        for i, (remote, local, length) in enumerate(batch):
            mine[i].base, mine[i].len = local, length
            theirs[i].base, theirs[i].len = remote, length
        try:
            n = call(pid, mine, theirs)  # without the GIL: other threads run meanwhile
        except OSError as e:
            if e.errno == errno.ENOSYS:
                raise Unavailable(f"the kernel has no {name} (CONFIG_CROSS_MEMORY_ATTACH)", errno=e.errno) from None
            raise OSError(e.errno, f"{name} {way} process {pid} at {batch[0][0]:#x}: {e.strerror}") from None
        if n == 0:
            raise OSError(errno.EFAULT, f"{name} {way} process {pid} stopped at {batch[0][0]:#x}")
        pending = _after(pending, n)


def _after(pieces: list[Piece], done: int) -> list[Piece]:
    """The pieces still to copy once `done` bytes of them, in order, are copied."""
    i = 0
    while i < len(pieces) and done >= pieces[i][2]:
        done -= pieces[i][2]
        i += 1
    if i < len(pieces) and done:
        remote, local, length = pieces[i]
        return [(remote + done, local + done, length - done), *pieces[i + 1 :]]
    return pieces[i:]
