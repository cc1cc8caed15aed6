"""PAGEMAP_SCAN (Linux 6.7): where a process's pages are, without 8 bytes per empty page.

The ioctl on /proc/<pid>/pagemap and its structs, nothing more: whether to
use it, and what its categories mean for a checkpoint, is memcr.park.scan's.
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
IS_FILE, IS_PRESENT, IS_SWAPPED, IS_PFNZERO, IS_GUARD = 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 8
SCAN_REGIONS = 4096  # regions per call


def regions(low: int, high: int, fd: int, wanted: int) -> list[tuple[int, int, int]]:
    """(first, stop, category) of the present or swapped pages in [low, high), as page indexes from
    `low`; OSError as the ioctl fails (ENOTTY: no PAGEMAP_SCAN; EINVAL: a category this kernel lacks).

    The kernel's walk_end can lie before the end of the regions it just
    returned (seen on 6.18 with more than 512 runs in a mapping): the next
    call starts after both, and no page is ever listed twice.
    """
    found: list[tuple[int, int, int]] = []
    vec = bytearray(REGION.size * SCAN_REGIONS)
    vec_addr = ctypes.addressof(ctypes.c_char.from_buffer(vec))
    anyof = IS_PRESENT | IS_SWAPPED
    start = low
    while start < high:
        arg = bytearray(SCAN_ARG.pack(SCAN_ARG.size, 0, start, high, 0, vec_addr, SCAN_REGIONS, 0, 0, 0, anyof, wanted))
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
