"""The memory map scan: which pages of a frozen target to dump and drop.

scan -> plan: the plan lists runs of pages ("extents") that hold data only
the target has (anonymous, heap, stack, copy-on-write copies of file pages)
and, with -f, runs of clean file pages that can simply be dropped because
the kernel re-reads them from their files.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from memcr.errors import TargetError
from memcr.procfs import Vma

PAGE = mmap.PAGESIZE
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61  # file page or shared anonymous page
PM_PFN = (1 << 55) - 1

SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
# VmFlags of mappings memcr must leave alone: device memory (io, pf), locked
# memory that madvise refuses to drop (lo), userfaultfd-managed ranges (um, uw)
UNTOUCHABLE = frozenset({"io", "pf", "lo", "um", "uw"})
MAX_EXTENT = 8 << 20  # bytes per dump record: bounds memcr's buffers
WINDOW = 65536  # pagemap entries read at once (512 KiB)

PagemapReader = Callable[[int, int], bytes]

# PAGEMAP_SCAN (Linux 6.7): runs of pages by category, without 8 bytes per page
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
SCAN_ARG = struct.Struct("<12Q")
REGION = struct.Struct("<3Q")
IS_FILE, IS_PRESENT, IS_SWAPPED, IS_PFNZERO = 1 << 2, 1 << 3, 1 << 4, 1 << 5
SCAN_REGIONS = 4096  # regions per call


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    vma: Vma


@dataclass
class Plan:
    vmas: list[Vma] = field(default_factory=list)
    dump: list[Extent] = field(default_factory=list)
    drop_only: list[Extent] = field(default_factory=list)
    locked_vmas: int = 0

    @property
    def dump_bytes(self) -> int:
        return sum(e.length for e in self.dump)


def zero_pfn() -> int:
    """The frame of the kernel's shared zero page (0 when PFNs are hidden from us)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    addr = libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        ctypes.string_at(addr, 1)  # a read fault maps the zero page
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            return 0  # undumpable and not root: /proc/self is root's; PFNs would be hidden anyway
        try:
            entry = int.from_bytes(os.pread(fd, 8, addr // PAGE * 8), "little")
        finally:
            os.close(fd)
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE))
    return entry & PM_PFN if entry & PM_PRESENT else 0


def is_candidate(vma: Vma, exclude: tuple[int, int]) -> bool:
    """Private memory memcr may dump; the parasite's own mapping excluded."""
    return _may_hold_data(vma, exclude) and not (vma.flags & UNTOUCHABLE)


def _may_hold_data(vma: Vma, exclude: tuple[int, int]) -> bool:
    """What /proc/<pid>/maps alone can tell of a candidate (VmFlags need smaps)."""
    if not vma.private or vma.path in SPECIAL:
        return False
    return not _overlaps(vma, exclude)


def _overlaps(vma: Vma, span: tuple[int, int]) -> bool:
    return vma.start < span[1] and span[0] < vma.end


Runs = tuple[list[range], list[range]]  # page indexes to dump, and to drop only
PageRuns = dict[tuple[int, int], Runs]  # by (start, end) of the mapping


def scan_pages(
    vmas: list[Vma],
    read_pagemap: PagemapReader,
    exclude: tuple[int, int],
    zero: int,
    scan_fd: int | None = None,
) -> PageRuns:
    """The page runs of every mapping that may be a candidate.

    Needs only the layout from /proc/<pid>/maps, so it can walk the page
    tables on one core while smaps (which walks them too) is read on another.
    With `scan_fd` (the target's pagemap) it uses PAGEMAP_SCAN where the kernel has it.
    """
    pages: PageRuns = {}
    for vma in vmas:
        if not _may_hold_data(vma, exclude):
            continue
        found = _scan_regions(vma, scan_fd) if scan_fd is not None else None
        if found is None:
            scan_fd = None  # not supported here: read pagemap entries instead
            found = _scan_vma(vma, read_pagemap, zero)
        pages[vma.start, vma.end] = found
    return pages


def same_layout(before: list[Vma], now: list[Vma], exclude: tuple[int, int]) -> bool:
    """Whether the mappings are those read before the freeze, the parasite's aside."""

    def key(vmas: list[Vma]) -> list[tuple]:
        return [
            (v.start, v.end, v.perms, v.offset, v.inode, v.path)
            for v in vmas
            if not _overlaps(v, exclude)
        ]

    return key(before) == key(now)


def confirm_flags(now: list[Vma], plan: Plan) -> None:
    """Raise unless every planned mapping may still lose its pages.

    The plan may come from VmFlags read before the freeze; mlock or a
    userfaultfd registration in between changes nothing else that is visible.
    """
    starts = [v.start for v in now]
    for vma in plan.vmas:
        i = bisect.bisect_right(starts, vma.start) - 1
        # a mapping may have merged with a neighbour (mprotect for the parasite), never shrunk
        if i < 0 or now[i].end < vma.end or now[i].flags & UNTOUCHABLE:
            raise TargetError(
                f"the target locked or registered memory at {vma.start:#x} while memcr froze it: "
                "nothing was dropped, try again"
            )


def build_plan(
    vmas: list[Vma],
    pages: PageRuns,
    exclude: tuple[int, int],
    rss_file: bool,
) -> Plan:
    """The plan from the mappings with their VmFlags and the page runs found in them."""
    plan = Plan()
    for vma in vmas:
        if "lo" in vma.flags and vma.private:
            plan.locked_vmas += 1
        if not is_candidate(vma, exclude):
            continue
        plan.vmas.append(vma)
        found = pages.get((vma.start, vma.end))
        if found is None:
            # a frozen target cannot do this; a process sharing its memory (CLONE_VM) can
            raise TargetError(f"the memory map of the target changed while it was frozen, at {vma.start:#x}")
        dump, drop = found
        plan.dump += _extents(dump, vma, MAX_EXTENT)
        if rss_file:
            plan.drop_only += _extents(drop, vma, vma.size)
    return plan


def _scan_regions(vma: Vma, fd: int) -> tuple[list[range], list[range]] | None:
    """Runs to dump and to drop only, from PAGEMAP_SCAN; None if the kernel lacks it."""
    dump: list[range] = []
    drop: list[range] = []
    vec = bytearray(REGION.size * SCAN_REGIONS)
    vec_addr = ctypes.addressof(ctypes.c_char.from_buffer(vec))
    # asking for IS_FILE makes the kernel look at every page's struct page: 3x
    # slower, and an anonymous mapping's pages are never file pages anyway
    wanted = IS_PRESENT | IS_SWAPPED | IS_PFNZERO | (0 if vma.anonymous else IS_FILE)
    start = vma.start
    while start < vma.end:
        arg = bytearray(SCAN_ARG.pack(
            SCAN_ARG.size, 0, start, vma.end, 0, vec_addr, SCAN_REGIONS, 0, 0, 0, IS_PRESENT | IS_SWAPPED, wanted,
        ))  # fmt: skip
        try:
            count = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
        except OSError:
            return None
        walk_end = SCAN_ARG.unpack(arg)[4]
        for i in range(count):
            first, end, category = REGION.unpack_from(vec, i * REGION.size)
            pages = range((first - vma.start) // PAGE, (end - vma.start) // PAGE)
            if category & IS_SWAPPED or (category & IS_PRESENT and not category & IS_PFNZERO
                                         and (vma.anonymous or not category & IS_FILE)):  # fmt: skip
                _append(dump, pages)
            elif category & IS_PRESENT and category & IS_FILE and not vma.anonymous:
                _append(drop, pages)
        if walk_end <= start:
            break
        start = walk_end
    return dump, drop


def _append(runs: list[range], pages: range) -> None:
    if runs and runs[-1].stop == pages.start:
        runs[-1] = range(runs[-1].start, pages.stop)
    else:
        runs.append(pages)


def _class_table(anonymous: bool) -> bytes:
    """Map the top byte of a pagemap entry to d (dump), f (file page) or . (skip)."""
    present, swapped, file = PM_PRESENT >> 56, PM_SWAPPED >> 56, PM_FILE >> 56
    table = bytearray(b"." * 256)
    for top in range(256):
        if top & swapped or (top & present and (anonymous or not top & file)):
            table[top] = ord("d")
        elif top & present:
            table[top] = ord("f")
    return bytes(table)


_CLASSES = {True: _class_table(True), False: _class_table(False)}
_RUNS = {b"d": re.compile(rb"d+"), b"f": re.compile(rb"f+")}


def _scan_vma(vma: Vma, read_pagemap: PagemapReader, zero: int) -> tuple[list[range], list[range]]:
    """Runs of page indexes to dump and, for file mappings, to drop only."""
    npages = vma.size // PAGE
    dump: list[range] = []
    drop: list[range] = []
    table = _CLASSES[vma.anonymous]
    for first in range(0, npages, WINDOW):
        entries = read_pagemap(vma.start + first * PAGE, min(WINDOW, npages - first))
        # the flag bits sit in the top byte of each little-endian entry
        classes = bytearray(entries[7::8].translate(table))
        if zero:
            _skip_zero_pages(entries, classes, zero)
        _add_runs(dump, classes, b"d", first)
        if not vma.anonymous:
            _add_runs(drop, classes, b"f", first)
    return dump, drop


def _skip_zero_pages(entries: bytes, classes: bytearray, zero: int) -> None:
    """Pages still mapped to the shared zero page hold nothing worth saving."""
    needle = zero.to_bytes(6, "little")
    pos = entries.find(needle)
    while pos >= 0:
        if pos % 8 == 0 and entries[pos + 6] & 0x7F == 0 and entries[pos + 7] & (PM_PRESENT >> 56):
            classes[pos // 8] = ord(".")
        pos = entries.find(needle, pos + 1)


def _add_runs(runs: list[range], classes: bytearray, kind: bytes, first: int) -> None:
    for match in _RUNS[kind].finditer(classes):
        _append(runs, range(first + match.start(), first + match.end()))


def _extents(runs: list[range], vma: Vma, limit: int) -> list[Extent]:
    """Cut runs of page indexes into extents of at most `limit` bytes."""
    step = max(1, limit // PAGE)
    return [
        Extent(vma.start + i * PAGE, (min(i + step, run.stop) - i) * PAGE, vma)
        for run in runs
        for i in range(run.start, run.stop, step)
    ]
