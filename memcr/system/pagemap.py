"""PAGEMAP_SCAN (Linux 6.7): where a process's pages are, without 8 bytes per empty page.

The ioctl on /proc/<pid>/pagemap and its structs, nothing more: whether to
use it, and what its categories mean for a checkpoint, is memcr.park.scan's;
what the written pages mean for a re-park, memcr.park.incremental's.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import struct

PAGE = mmap.PAGESIZE
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
SCAN_ARG = struct.Struct("<12Q")
REGION = struct.Struct("<3Q")
IS_WRITTEN, IS_FILE, IS_PRESENT, IS_SWAPPED, IS_PFNZERO, IS_GUARD = 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 8
# PM_SCAN_WP_MATCHING: write-protect the pages found again (a userfaultfd in async WP mode watches them);
# PM_SCAN_CHECK_WPASYNC: fail (EPERM) where a range is not so watched, rather than skip it without a word
WP_MATCHING, CHECK_WPASYNC = 1 << 0, 1 << 1
SCAN_REGIONS = 4096  # regions per call


def regions(low: int, high: int, fd: int, wanted: int) -> list[tuple[int, int, int]]:
    """(first, stop, category) of the present or swapped pages in [low, high), as page indexes from
    `low`; OSError as the ioctl fails (ENOTTY: no PAGEMAP_SCAN; EINVAL: a category this kernel lacks)."""
    return scan(low, high, fd, anyof=IS_PRESENT | IS_SWAPPED, wanted=wanted)


def scan(
    low: int, high: int, fd: int, *, flags: int = 0, mask: int = 0, anyof: int = 0, wanted: int
) -> list[tuple[int, int, int]]:
    """(first, stop, category) of the pages in [low, high) that have every category of `mask` and one of
    `anyof`, as page indexes from `low`, with their categories of `wanted`; OSError as the ioctl fails.

    The kernel's walk_end can lie before the end of the regions it just
    returned (seen on 6.18 with more than 512 runs in a mapping): the next
    call starts after both, and no page is ever listed twice.
    """
    found: list[tuple[int, int, int]] = []
    vec = bytearray(REGION.size * SCAN_REGIONS)
    vec_addr = ctypes.addressof(ctypes.c_char.from_buffer(vec))
    start = low
    while start < high:
        arg = bytearray(
            SCAN_ARG.pack(SCAN_ARG.size, flags, start, high, 0, vec_addr, SCAN_REGIONS, 0, 0, mask, anyof, wanted)
        )
        count = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
        done = start
        for i in range(count):
            first, end, category = REGION.unpack_from(vec, i * REGION.size)
            first = max(first, done)
            if end > first:
                found.append(((first - low) // PAGE, (end - low) // PAGE, category))
                done = end
        following = max(SCAN_ARG.unpack(arg)[4], done)
        if following <= start:
            break
        start = following
    return found
