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


def write(pid: int, remote: int, local: int, length: int) -> None:
    """Copy `length` bytes at memcr's address `local` to the target's address `remote`."""
    mine, theirs = libc.Iovec(), libc.Iovec()
    done = 0
    while done < length:
        mine.base, mine.len = local + done, length - done
        theirs.base, theirs.len = remote + done, length - done
        try:
            n = libc.process_vm_writev(pid, mine, theirs)  # without the GIL: other threads run meanwhile
        except OSError as e:
            if e.errno == errno.ENOSYS:
                missing = "the kernel has no process_vm_writev (CONFIG_CROSS_MEMORY_ATTACH)"
                raise Unavailable(missing, errno=e.errno) from None
            where = f"process {pid} at {remote + done:#x}"
            raise OSError(e.errno, f"process_vm_writev to {where}: {e.strerror}") from None
        if n == 0:
            raise OSError(errno.EFAULT, f"process_vm_writev to process {pid} stopped at {remote + done:#x}")
        done += n
