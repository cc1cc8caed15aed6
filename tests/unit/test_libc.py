"""memcr.system.libc's wrappers: a failed call is an OSError carrying its errno.

Rootless: each call here fails before it could touch anything.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from memcr.engine import admission
from memcr.system import libc


def reaped_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_kcmp_on_a_gone_pid_is_esrch() -> None:
    with pytest.raises(libc.CallError) as failed:
        admission.shares_memory(os.getpid(), reaped_pid())
    assert isinstance(failed.value, OSError)
    assert failed.value.errno in (errno.ESRCH, errno.ENOSYS)  # ENOSYS: a kernel without CONFIG_KCMP


def test_kcmp_of_self_is_equal() -> None:
    try:
        assert admission.shares_memory(os.getpid(), os.getpid())
    except libc.CallError as e:
        assert e.errno in (errno.ENOSYS, errno.EPERM)  # no CONFIG_KCMP, or a seccomp sandbox


def test_mmap_errno_and_round_trip() -> None:
    with pytest.raises(libc.CallError) as failed:
        libc.mmap(mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd=-1)  # a shared file mapping without a file
    assert failed.value.errno == errno.EBADF
    assert failed.value.strerror == os.strerror(errno.EBADF)
    addr = libc.mmap(mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    libc.madvise(addr, mmap.PAGESIZE, mmap.MADV_DONTNEED)
    libc.munmap(addr, mmap.PAGESIZE)
    with pytest.raises(libc.CallError) as unaligned:
        libc.munmap(addr + 1, mmap.PAGESIZE)
    assert unaligned.value.errno == errno.EINVAL


def test_ioctl_and_setns_on_a_bad_descriptor() -> None:
    arg = libc.Iovec()
    with pytest.raises(libc.CallError) as failed:
        libc.ioctl(-1, 0, ctypes.byref(arg))
    assert failed.value.errno == errno.EBADF
    with pytest.raises(libc.CallError) as entered:
        libc.setns(-1, 0)
    assert entered.value.errno == errno.EBADF


def test_prctl_result_and_errno() -> None:
    pr_get_dumpable = 3
    assert libc.prctl(pr_get_dumpable) in (0, 1, 2)
    with pytest.raises(libc.CallError) as failed:
        libc.prctl(-1)
    assert failed.value.errno == errno.EINVAL


def test_process_vm_writev_to_a_gone_pid() -> None:
    buffer = ctypes.create_string_buffer(8)
    mine = (libc.Iovec * 1)(libc.Iovec(ctypes.addressof(buffer), 8))
    with pytest.raises(libc.CallError) as failed:
        libc.process_vm_writev(reaped_pid(), mine, (libc.Iovec * 1)(libc.Iovec(0x1000, 8)))
    assert failed.value.errno in (errno.ESRCH, errno.ENOSYS)
