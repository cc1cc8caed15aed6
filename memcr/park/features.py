"""The kernel's optional features: which this memcr can use here, found by trying, never by a version string.

What a newer kernel adds makes memcr faster or lets it do more; without it
memcr takes the way each Feature names (docs/kernels.md). `memcr -V`
probes them all. The scan learns PAGEMAP_SCAN from its first try on a
target and does not try again where it failed; lazy restore, kcmp and
process_vm_writev try at each use and fall back there. memcr says once,
in its log, each feature it found missing (`untold`): lazy restore's at
start (`lazy_restore`), the scan's after its first try.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable

from memcr.engine import arch
from memcr.engine.admission import shares_memory
from memcr.system import libc, pagemap
from memcr.system.uffd import DEVICE_NEW, FEATURES, NEW_FLAGS, TRACK_FLAGS, TRACKING, Unavailable, Userfaultfd

# the answers of a kernel that lacks a feature, as opposed to one that refuses it to this memcr (EPERM, EACCES)
_ABSENT = frozenset({errno.ENOSYS, errno.ENOTTY, errno.EINVAL, errno.ENOENT})

Probe = Callable[[], int]  # 0 where memcr can use the feature, else the errno of the refusal


class Feature:
    """One optional feature: what it serves, the kernel that brought it, what memcr does without it."""

    def __init__(self, name: str, since: str, serves: str, without: str, probe: Probe) -> None:
        self.name = name
        self.since = since
        self.serves = serves
        self.without = without
        self._probe = probe
        self._refusal: int | None = None  # what a probe, or memcr's first real use, found out: 0, or an errno

    @property
    def present(self) -> bool:
        """Whether memcr can use it here: what its first use found, or a probe now (`memcr -V`)."""
        if self._refusal is None:
            self._refusal = self._probe()
        return self._refusal == 0

    @property
    def lacking(self) -> bool:
        """Known to be missing; never probes: a use that has not happened yet tries it for real."""
        return bool(self._refusal)

    def learn(self, present: bool, refusal: int = errno.ENOSYS) -> None:
        """What a real use found: later uses go by it (threads that race learn the same)."""
        self._refusal = 0 if present else refusal

    def missing(self) -> str:
        """The line that says memcr cannot use it here, why, and what memcr does instead."""
        if self._refusal in _ABSENT:
            return f"{self.name} is not available here (Linux {self.since}); without it memcr {self.without}"
        why = os.strerror(self._refusal or errno.EPERM)
        return f"{self.name} is refused to this memcr ({why}); without it memcr {self.without}"


def _scans(wanted: int) -> int:
    """Whether PAGEMAP_SCAN answers for a page of memcr's own, asking for the categories `wanted`.

    Only `memcr -V` asks before a scan has tried: memcr's own pagemap is
    not readable once it is hardened (undumpable) without root, and a
    checkpoint learns the answer from the target's instead (memcr.park.scan).
    """
    try:
        page = libc.mmap(mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        return e.errno or errno.ENOMEM
    try:
        ctypes.memset(page, 1, 1)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            pagemap.regions(page, page + mmap.PAGESIZE, fd, wanted)
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno or errno.EINVAL
    finally:
        libc.munmap(page, mmap.PAGESIZE)
    return 0


def _pagemap_scan() -> int:
    return _scans(pagemap.IS_PRESENT)


def _page_is_guard() -> int:
    return _scans(pagemap.IS_PRESENT | pagemap.IS_GUARD) if PAGEMAP_SCAN.present else errno.ENOTTY


def _makes_userfaultfd(flags: int, features: int) -> int:
    """Whether memcr may make a userfaultfd with `flags` that grants `features`."""
    try:
        fd = libc.syscall(arch.current().SYS_USERFAULTFD, flags)
    except OSError as e:
        return e.errno or errno.ENOSYS
    try:
        Userfaultfd(fd, mmap.PAGESIZE).handshake(features)
    except Unavailable as e:
        return e.errno or errno.EINVAL
    finally:
        os.close(fd)
    return 0


def _userfaultfd() -> int:
    """A userfaultfd, made as lazy restore makes one, that reports every event memcr needs: the fork
    event asks for CAP_SYS_PTRACE, which a memcr without it lacks for lazy restore too."""
    return _makes_userfaultfd(NEW_FLAGS, FEATURES)


def _write_tracking() -> int:
    """A userfaultfd as an incremental re-park makes one (any process may), in async write-protect mode."""
    return _makes_userfaultfd(TRACK_FLAGS, TRACKING)


def _userfaultfd_device() -> int:
    """/dev/userfaultfd opens and makes a userfaultfd: something else mounted there does not."""
    try:
        device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.errno or errno.ENOENT
    try:
        os.close(fcntl.ioctl(device, DEVICE_NEW, NEW_FLAGS))
    except OSError as e:
        return e.errno or errno.ENOTTY
    finally:
        os.close(device)
    return 0


def _process_vm_writev() -> int:
    try:
        libc.process_vm_writev(os.getpid(), (libc.Iovec * 1)(), (libc.Iovec * 1)())
    except OSError as e:
        return errno.ENOSYS if e.errno == errno.ENOSYS else 0
    return 0


def _kcmp() -> int:
    try:
        shares_memory(os.getpid(), os.getpid())
    except OSError as e:
        return e.errno or errno.ENOSYS
    return 0


PAGEMAP_SCAN = Feature(
    "PAGEMAP_SCAN",
    "6.7",
    "finds a mapping's pages in one call",
    "reads the pagemap entry of every page (~15 ms/GiB more)",
    _pagemap_scan,
)
PAGE_IS_GUARD = Feature(
    "PAGE_IS_GUARD",
    "6.14",
    "tells guard regions (MADV_GUARD_INSTALL) apart within PAGEMAP_SCAN",
    "reads the pagemap entry of each page PAGEMAP_SCAN finds (~15 ms per GiB of them)",
    _page_is_guard,
)
USERFAULTFD = Feature(
    "userfaultfd",
    "4.11",
    "lazy restore (--lazy): the target runs at once, its pages follow",
    "restores eagerly, and says why",
    _userfaultfd,
)
USERFAULTFD_DEVICE = Feature(
    "/dev/userfaultfd",
    "6.1",
    "lazy restore of a target that may not make a userfaultfd itself",
    "restores such a target eagerly, and says why",
    _userfaultfd_device,
)
WRITE_TRACKING = Feature(
    "WP_ASYNC",
    "6.7, arm64 6.10",
    "userfaultfd write tracking for incremental re-parks (--incremental): a park writes what changed",
    "writes every park whole, and says why",
    _write_tracking,
)
PROCESS_VM_WRITEV = Feature(
    "process_vm_writev",
    "3.2, CONFIG_CROSS_MEMORY_ATTACH",
    "restore copies on every core",
    "restores through the parasite's socket, one core",
    _process_vm_writev,
)
KCMP = Feature(
    "kcmp",
    "3.5, CONFIG_KCMP (CONFIG_CHECKPOINT_RESTORE before 5.12)",
    "finds every process that shares a target's memory (vfork, CLONE_VM)",
    "finds vfork() parents and children by their wait channel",
    _kcmp,
)
ALL = (PAGEMAP_SCAN, PAGE_IS_GUARD, USERFAULTFD, USERFAULTFD_DEVICE, WRITE_TRACKING, PROCESS_VM_WRITEV, KCMP)


_told: set[str] = set()
_telling = threading.Lock()  # the daemon's first checkpoints may end their scans at once


def untold() -> list[str]:
    """A line for each feature found missing that memcr has not said yet: each is said once a process."""
    with _telling:
        news = [f for f in ALL if f.lacking and f.name not in _told]
        _told.update(f.name for f in news)
    return [f.missing() for f in news]


def lazy_restore() -> list[str]:
    """Probe what lazy restore needs, at the start of a memcr that restores lazily; the lines to say of it.

    Each restore still tries for itself (a target may make its own userfaultfd where memcr may not open
    /dev/userfaultfd): these lines tell the kernel's part in advance, the restore's own line tells the rest.
    """
    all(f.present for f in (USERFAULTFD, USERFAULTFD_DEVICE))  # probes, up to the first that is missing
    return untold()


def incremental() -> list[str]:
    """Probe what an incremental re-park needs, at the start of a daemon with --incremental; the lines to say."""
    # PAGEMAP_SCAN, which it needs too, the first scan learns and says
    return [] if WRITE_TRACKING.present else untold()


def summary() -> list[str]:
    """One line a feature, for `memcr -V`."""
    width = max(len(f.name) for f in ALL)
    return [
        f"  {f.name:<{width}}  {'yes' if f.present else 'no ':<3}  Linux {f.since}: {f.serves}"
        + ("" if f.present else f"; without it memcr {f.without}")
        for f in ALL
    ]
