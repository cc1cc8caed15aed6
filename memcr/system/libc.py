"""The one binding to the C library: the calls Python's os, mmap and fcntl modules lack.

The library is loaded and its prototypes set on the first call, not on
import: an idle daemon makes none of these calls but the malloc tuning.
Each wrapper raises CallError (an OSError) with the call's errno. Calls
through ctypes.CDLL release the GIL, so a long copy (UFFDIO_COPY,
process_vm_writev) lets memcr's other threads run meanwhile; the bindings
stay on CDLL for that.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

_ADDR = ctypes.c_void_p
_SIZE = ctypes.c_size_t
MAP_FAILED = ctypes.c_void_p(-1).value


class CallError(OSError):
    """A failed call: an OSError whose errno is always set."""

    errno: int


class Iovec(ctypes.Structure):
    """struct iovec."""

    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = _ADDR
    libc.mmap.argtypes = (_ADDR, _SIZE, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (_ADDR, _SIZE)
    libc.madvise.argtypes = (_ADDR, _SIZE, ctypes.c_int)
    libc.ioctl.restype = ctypes.c_int
    libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, _ADDR)
    iov = ctypes.POINTER(Iovec)
    libc.process_vm_writev.restype = ctypes.c_ssize_t
    libc.process_vm_writev.argtypes = (ctypes.c_int, iov, ctypes.c_ulong, iov, ctypes.c_ulong, ctypes.c_ulong)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    libc.process_vm_readv.argtypes = (ctypes.c_int, iov, ctypes.c_ulong, iov, ctypes.c_ulong, ctypes.c_ulong)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return libc


def _error() -> CallError:
    code = ctypes.get_errno()
    return CallError(code, os.strerror(code))


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2) at an address the kernel picks: the address of the new mapping."""
    base = _libc().mmap(None, length, prot, flags, fd, offset)
    if base in (None, MAP_FAILED):
        raise _error()
    return int(base)


def munmap(addr: int, length: int) -> None:
    if _libc().munmap(addr, length) != 0:
        raise _error()


def madvise(addr: int, length: int, advice: int) -> None:
    if _libc().madvise(addr, length, advice) != 0:
        raise _error()


def ioctl(fd: int, request: int, arg: ctypes._CArgObject) -> None:
    """ioctl(2) with a pointer argument (ctypes.byref of a structure), without the GIL."""
    if _libc().ioctl(fd, request, arg) != 0:
        raise _error()


def process_vm_writev(pid: int, local: ctypes.Array[Iovec], remote: ctypes.Array[Iovec]) -> int:
    """One process_vm_writev(2): how many bytes it copied, the local buffers' bytes into the remote ones in
    order."""
    n = int(_libc().process_vm_writev(pid, local, len(local), remote, len(remote), 0))
    if n < 0:
        raise _error()
    return n


def process_vm_readv(pid: int, local: ctypes.Array[Iovec], remote: ctypes.Array[Iovec]) -> int:
    """One process_vm_readv(2): how many bytes it copied, the remote buffers' bytes into the local ones in
    order."""
    n = int(_libc().process_vm_readv(pid, local, len(local), remote, len(remote), 0))
    if n < 0:
        raise _error()
    return n


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
TMPFS_MAGIC, RAMFS_MAGIC = 0x01021994, 0x858458F6


def filesystem_type(path: str | os.PathLike[str]) -> int:
    """statfs(2)'s f_type of the filesystem `path` is on (the first field, a long on every Linux ABI memcr runs on)."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64 and arm64
    if _libc().statfs(os.fsencode(path), buffer) != 0:
        raise _error()
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give a file's blocks in [offset, offset + length) back to its filesystem; they read zeros, the size stays."""
    if _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _error()


def setns(fd: int, nstype: int) -> None:
    if _libc().setns(fd, nstype) != 0:
        raise _error()


def prctl(option: int, arg: int = 0) -> int:
    """prctl(2) with one argument (the others 0): its result."""
    result = int(_libc().prctl(option, arg, 0, 0, 0))
    if result == -1:
        raise _error()
    return result


def syscall(number: int, *args: int) -> int:
    """A system call glibc has no wrapper for (kcmp): its result. The caller knows its number on this CPU."""
    result = int(_libc().syscall(number, *args))
    if result == -1:
        raise _error()
    return result


@cache
def _malloc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only (musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


def mallopt(param: int, value: int) -> None:
    """glibc's mallopt(3); nothing elsewhere."""
    if (libc := _malloc()) is not None:
        libc.mallopt(param, value)


def malloc_trim(pad: int = 0) -> None:
    """glibc's malloc_trim(3); nothing elsewhere."""
    if (libc := _malloc()) is not None:
        libc.malloc_trim(pad)
