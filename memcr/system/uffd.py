"""userfaultfd(2): fill a running process's missing pages on demand.

The ioctls and messages of <linux/userfaultfd.h>, the same on every
architecture memcr runs on. A userfaultfd serves the mm of the process that
made it, so memcr has the parasite make it inside the target and hand it
over (memcr.engine.parasite); this module only drives it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from memcr.errors import MemcrError
from memcr.system import libc

DEVICE_NEW = 0xAA00  # USERFAULTFD_IOC_NEW, _IO(0xAA, 0x00): /dev/userfaultfd's one request
NEW_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK  # no UFFD_USER_MODE_ONLY: the target's own system calls fault too
# write tracking takes no fault at all: any process may make such a userfaultfd, whatever
# vm.unprivileged_userfaultfd says, and writes the kernel makes for the process are tracked all the same
USER_MODE_ONLY = 1
TRACK_FLAGS = NEW_FLAGS | USER_MODE_ONLY

API = 0xAA
FEATURE_EVENT_FORK = 1 << 1
FEATURE_EVENT_REMAP = 1 << 2
FEATURE_EVENT_REMOVE = 1 << 3
FEATURE_EVENT_UNMAP = 1 << 6
# every change the target makes to its mappings is reported: no dump page lands where it no longer belongs
FEATURES = FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP
FEATURE_WP_UNPOPULATED = 1 << 13
# Linux 6.7: a write to a write-protected page lifts the protection by itself (no message), and
# PAGEMAP_SCAN reports the page as written until a scan protects it again
FEATURE_WP_ASYNC = 1 << 15
TRACKING = FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED

REGISTER_MODE_MISSING = 1
REGISTER_MODE_WP = 1 << 1

EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

MSG = struct.Struct("<B3xI24s")  # event, reserved, the event's arguments
MSG_BATCH = 64


def _iowr(nr: int, size: int, direction: int = 3) -> int:
    return (direction << 30) | (size << 16) | (API << 8) | nr


_API_STRUCT = struct.Struct("<QQQ")
_RANGE = struct.Struct("<QQ")
_REGISTER = struct.Struct("<QQQQ")
UFFDIO_API = _iowr(0x3F, _API_STRUCT.size)
UFFDIO_REGISTER = _iowr(0x00, _REGISTER.size)
UFFDIO_WAKE = _iowr(0x02, _RANGE.size, direction=2)


class _Copy(ctypes.Structure):
    _fields_ = (
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    )


class _Zeropage(ctypes.Structure):
    _fields_ = (
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("zeropage", ctypes.c_int64),
    )


UFFDIO_COPY = _iowr(0x03, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _iowr(0x04, ctypes.sizeof(_Zeropage))


class Unavailable(MemcrError):
    """This target cannot be restored lazily here: memcr restores it eagerly instead."""


@dataclass(frozen=True)
class Event:
    """One message: a page fault at `start`, or a change of the mappings."""

    kind: int
    start: int = 0
    end: int = 0  # REMOVE, UNMAP: the range; REMAP: the old range
    to: int = 0  # REMAP: the new start
    fd: int = -1  # FORK: the child's userfaultfd, now memcr's


def _event(raw: bytes) -> Event:
    kind, _, arg = MSG.unpack(raw)
    if kind == EVENT_PAGEFAULT:
        _, address, _ = struct.unpack("<QQQ", arg)
        return Event(kind, start=address)
    if kind == EVENT_FORK:
        return Event(kind, fd=struct.unpack_from("<I", arg)[0])
    if kind == EVENT_REMAP:
        old, new, length = struct.unpack("<QQQ", arg)
        return Event(kind, start=old, end=old + length, to=new)
    start, end = struct.unpack_from("<QQ", arg)
    return Event(kind, start=start, end=end)


class Userfaultfd:
    """A userfaultfd memcr holds for one mm of the target (the target's own, or a forked child's)."""

    def __init__(self, fd: int, page_size: int) -> None:
        self.fd = fd
        self.page_size = page_size

    def handshake(self, features: int = FEATURES) -> None:
        """UFFDIO_API: Unavailable unless the kernel offers every feature asked for (the events a lazy restore
        needs, or write tracking)."""
        buf = bytearray(_API_STRUCT.pack(API, features, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_API, buf)
        except OSError as e:
            raise Unavailable(
                f"the kernel refused the userfaultfd features memcr needs: {e.strerror}", errno=e.errno
            ) from None

    def register(self, start: int, end: int, mode: int = REGISTER_MODE_MISSING) -> None:
        buf = bytearray(_REGISTER.pack(start, end - start, mode, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf)
        except OSError as e:
            raise Unavailable(f"cannot watch {start:#x}-{end:#x} for faults: {e.strerror}", errno=e.errno) from None

    def copy(self, dst: int, src: int, length: int) -> tuple[int, int]:
        """UFFDIO_COPY, waking the threads that wait on the range: (bytes copied, errno or 0)."""
        arg = _Copy(dst, src, length, 0, 0)
        try:
            libc.ioctl(self.fd, UFFDIO_COPY, ctypes.byref(arg))  # without the GIL: other threads run meanwhile
        except libc.CallError as e:
            return max(arg.copy, 0), e.errno
        return length, 0

    def zeropage(self, start: int) -> int:
        """Map the zero page at `start`: a page the dump does not hold. errno or 0."""
        arg = _Zeropage(start, self.page_size, 0, 0)
        try:
            libc.ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.byref(arg))
        except libc.CallError as e:
            return e.errno
        return 0

    def wake(self, start: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, UFFDIO_WAKE, _RANGE.pack(start, length))
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.ENOENT):
                raise

    def events(self) -> list[Event]:
        """The messages waiting now (none: []); a mm that is gone reads as none."""
        try:
            raw = os.read(self.fd, MSG.size * MSG_BATCH)
        except BlockingIOError:
            return []
        return [_event(raw[i : i + MSG.size]) for i in range(0, len(raw), MSG.size)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
