"""process_vm_writev(2): copy memcr's memory straight into a stopped target.

The kernel faults the target's pages in and copies into them once, from
any memcr thread: the right it checks is ptrace access (memcr traces the
target), not "the tracing thread". Kernels built without
CONFIG_CROSS_MEMORY_ATTACH (some embedded ones) answer ENOSYS: Unavailable.
"""

from __future__ import annotations

import errno

from memcr.errors import MemcrError
from memcr.system import libc


class Unavailable(MemcrError):
    """The kernel has no process_vm_writev (CONFIG_CROSS_MEMORY_ATTACH is off)."""


IOV_MAX = 1024  # buffers one call takes


def write_many(pid: int, pieces: list[tuple[int, int, int]]) -> None:
    """Copy each (remote, local, length): the target's address, memcr's, the bytes; in as few calls as can be."""
    pending = [piece for piece in pieces if piece[2]]
    while pending:
        batch = pending[:IOV_MAX]
        mine, theirs = (libc.Iovec * len(batch))(), (libc.Iovec * len(batch))()
        for i, (remote, local, length) in enumerate(batch):
            mine[i].base, mine[i].len = local, length
            theirs[i].base, theirs[i].len = remote, length
        try:
            n = libc.process_vm_writev(pid, mine, theirs)  # without the GIL: other threads run meanwhile
        except OSError as e:
            if e.errno == errno.ENOSYS:
                missing = "the kernel has no process_vm_writev (CONFIG_CROSS_MEMORY_ATTACH)"
                raise Unavailable(missing, errno=e.errno) from None
            where = f"process {pid} at {batch[0][0]:#x}"
            raise OSError(e.errno, f"process_vm_writev to {where}: {e.strerror}") from None
        if n == 0:
            raise OSError(errno.EFAULT, f"process_vm_writev to process {pid} stopped at {batch[0][0]:#x}")
        pending = _after(pending, n)


def _after(pieces: list[tuple[int, int, int]], done: int) -> list[tuple[int, int, int]]:
    """The pieces still to copy once `done` bytes of them, in order, are copied."""
    i = 0
    while i < len(pieces) and done >= pieces[i][2]:
        done -= pieces[i][2]
        i += 1
    if i < len(pieces) and done:
        remote, local, length = pieces[i]
        return [(remote + done, local + done, length - done), *pieces[i + 1 :]]
    return pieces[i:]
