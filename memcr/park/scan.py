"""The memory map scan: which pages of a frozen target to dump and drop.

scan -> plan: the plan lists runs of pages ("extents") that hold data only
the target has (anonymous, heap, stack, copy-on-write copies of file pages)
and, with -f, runs of clean file pages that can simply be dropped because
the kernel re-reads them from their files.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from memcr.errors import PlanError, TargetError
from memcr.park import features
from memcr.system import libc, pagemap, procfs
from memcr.system.pagemap import IS_FILE, IS_GUARD, IS_PFNZERO, IS_PRESENT, IS_SWAPPED
from memcr.system.procfs import SPECIAL, Vma

PAGE = mmap.PAGESIZE
# pagemap entry bits
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62  # also set for guard regions, which hold no page
PM_FILE = 1 << 61  # file page or shared anonymous page
PM_GUARD = 1 << 58  # MADV_GUARD_INSTALL (Linux 6.15): touching it faults
PM_EXCLUSIVE = 1 << 56  # mapped by this process only
PM_PFN = (1 << 55) - 1

# VmFlags of mappings memcr must leave alone: device memory (io, pf), locked
# memory that madvise refuses to drop (lo), userfaultfd-managed ranges (um, uw, ui: their faults
# go to the frozen target's own handler), shadow stacks (ss: writable only by the CPU), arm64
# memory tagging (mt: a dropped page comes back with its tags cleared, and the target's tagged
# pointers would fault on it)
UNTOUCHABLE = frozenset({"io", "pf", "lo", "um", "uw", "ui", "ss", "mt"})
MAX_EXTENT = 8 << 20  # bytes per dump record: bounds memcr's buffers
WINDOW = 65536  # pagemap entries read at once (512 KiB)

PagemapReader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    vma: Vma
    # the pages between the previous extent of the same mapping and this one hold nothing (no page, no swap
    # entry): one madvise may drop both, and takes nothing that stays in memory
    joins: bool = False


@dataclass
class Pages:
    """What one mapping holds, as runs of page indexes from its start."""

    dump: list[range] = field(default_factory=list)  # only the target has them: dump, then drop
    drop: list[range] = field(default_factory=list)  # clean file pages: the kernel re-reads them
    shared: int = 0  # another process maps them too (fork, KSM): dropping would free nothing
    found: int = 0  # present or swapped, the zero page aside: what smaps counts as Rss + Swap
    # present or swapped (the zero page and guards too): between them, holes alone, which a drop may span
    occupied: list[range] = field(default_factory=list)


PageRuns = dict[tuple[int, int], Pages]  # by (start, end) of the mapping


@dataclass
class Plan:
    vmas: list[Vma] = field(default_factory=list)
    copy: list[Extent] = field(default_factory=list)  # only the target has them: copy to the dump, then drop
    drop_only: list[Extent] = field(default_factory=list)
    locked_vmas: int = 0
    shared_pages: int = 0
    found: dict[tuple[int, int], int] = field(default_factory=dict)  # pages by mapping, for confirm()

    @property
    def dump_bytes(self) -> int:
        return sum(e.length for e in self.copy)


def zero_pfn() -> int:
    """The frame of the kernel's shared zero page (0 when PFNs are hidden from us)."""
    addr = libc.mmap(PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        ctypes.string_at(addr, 1)  # a read fault maps the zero page
        entry = procfs.self_pagemap_entry(addr)
    finally:
        libc.munmap(addr, PAGE)
    if entry is None:
        return 0  # undumpable and not root: /proc/self is root's; PFNs would be hidden anyway
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


def scan_pages(
    vmas: list[Vma],
    read_pagemap: PagemapReader,
    exclude: tuple[int, int],
    zero: int,
    scan_fd: int | None = None,
    unshared: frozenset[tuple[int, int]] = frozenset(),
) -> PageRuns:
    """The pages of every mapping that may be a candidate.

    Needs only the layout from /proc/<pid>/maps, so it can walk the page
    tables on one core while smaps (which walks them too) is read on another.
    With `scan_fd` (the target's pagemap) PAGEMAP_SCAN finds where the pages
    are, where the kernel has it. Mappings in `unshared` (smaps counted no
    page another process maps) are classified by PAGEMAP_SCAN's categories
    alone; every other page by its own pagemap entry, whose bit 56 says
    whether another process maps it: 8 bytes a page, ~15 ms per GiB.
    """
    pages: PageRuns = {}
    for vma in vmas:
        if not _may_hold_data(vma, exclude):
            continue
        regions = None
        if scan_fd is not None:
            alone = (vma.start, vma.end) in unshared
            regions = _regions(vma.start, vma.end, scan_fd, _categories(vma) if alone else IS_PRESENT | IS_SWAPPED)
            # without PAGE_IS_GUARD a guard region looks swapped: only the entries tell it apart
            if regions is not None and alone and not features.PAGE_IS_GUARD.lacking:
                pages[vma.start, vma.end] = _by_category(vma, regions)
                continue
        if regions is None:
            scan_fd = None  # not supported here: read every entry instead
            regions = [(0, vma.size // PAGE, 0)]
        found = _classify(vma, _merged(regions), read_pagemap, zero)
        if scan_fd is not None:
            found.occupied = _merged(regions)  # the zero page's entries too, as _by_category has them
        pages[vma.start, vma.end] = found
    return pages


def same_layout(before: list[Vma], now: list[Vma], exclude: tuple[int, int]) -> bool:
    """Whether the mappings are those read before the freeze, the parasite's aside."""

    def key(vmas: list[Vma]) -> list[tuple[object, ...]]:
        return [(v.start, v.end, v.perms, v.offset, v.inode, v.path) for v in vmas if not _overlaps(v, exclude)]

    return key(before) == key(now)


def confirm(now: list[Vma], plan: Plan) -> None:
    """Raise unless every planned mapping may still lose its pages, and the scan saw all of them.

    `now` is smaps read while the target is frozen. The plan may come from
    VmFlags read before the freeze: an mlock or a userfaultfd registration
    in between changes nothing else that is visible. And smaps counts each
    mapping's pages by its own walk: a scan that found fewer missed some.
    """
    starts = [v.start for v in now]
    for vma in plan.vmas:
        i = bisect.bisect_right(starts, vma.start) - 1
        # a mapping may have merged with a neighbour (the parasite's, mapped next to it), never shrunk
        if i < 0 or now[i].end < vma.end or now[i].flags & UNTOUCHABLE:
            raise TargetError(
                f"the target locked or registered memory at {vma.start:#x} while memcr froze it: "
                "nothing was dropped, try again"
            )
        same = now[i].start == vma.start and now[i].end == vma.end
        found = plan.found.get((vma.start, vma.end), 0)
        if same and found * PAGE < now[i].resident:
            raise PlanError(
                f"the page scan found {found} pages in the mapping at {vma.start:#x} where the kernel "
                f"counts {now[i].resident // PAGE}: nothing was dropped"
            )


def build_plan(
    vmas: list[Vma],
    pages: PageRuns,
    exclude: tuple[int, int],
    rss_file: bool,
) -> Plan:
    """The plan from the mappings with their VmFlags and the pages found in them.

    Checked before it is returned: a plan that would dump a page twice or
    outside its mapping is a bug caught before any page is dropped.
    """
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
        plan.copy += _extents(found.dump, vma, MAX_EXTENT, found.occupied)
        if rss_file:
            plan.drop_only += _extents(found.drop, vma, vma.size)
        plan.shared_pages += found.shared
        plan.found[vma.start, vma.end] = found.found
    check_plan(plan)
    return plan


def check_plan(plan: Plan) -> None:
    """Every planned page lies inside its mapping and appears once, in address order."""
    for name, extents in (("dump", plan.copy), ("drop", plan.drop_only)):
        end = 0
        for e in extents:
            if e.start % PAGE or e.length <= 0 or e.length % PAGE:
                raise PlanError(f"the {name} plan holds a misaligned extent {e.start:#x}+{e.length:#x}")
            if not (e.vma.start <= e.start and e.start + e.length <= e.vma.end):
                raise PlanError(f"the {name} plan holds {e.start:#x}+{e.length:#x} outside its mapping")
            if e.start < end:
                raise PlanError(f"the {name} plan holds the page at {e.start:#x} twice or out of order")
            end = e.start + e.length
    starts = [e.start for e in plan.copy]
    for e in plan.drop_only:
        i = bisect.bisect_right(starts, e.start + e.length - 1) - 1
        if i >= 0 and plan.copy[i].start + plan.copy[i].length > e.start:
            raise PlanError(f"the plan both dumps and drops the page at {max(e.start, plan.copy[i].start):#x}")


def _categories(vma: Vma) -> int:
    # asking for IS_FILE makes the kernel look at every page's struct page: 3x
    # slower, and an anonymous mapping's pages are never file pages anyway
    return IS_PRESENT | IS_SWAPPED | IS_PFNZERO | IS_GUARD | (0 if vma.anonymous else IS_FILE)


def _regions(low: int, high: int, fd: int, wanted: int) -> list[tuple[int, int, int]] | None:
    """What PAGEMAP_SCAN says of [low, high) (memcr.system.pagemap.regions); None where the kernel lacks
    it or refuses this scan: the pagemap's entries are read instead. What a try finds out about the kernel
    is kept (memcr.park.features): a kernel without it is not asked again."""
    if features.PAGEMAP_SCAN.lacking:
        return None
    if features.PAGE_IS_GUARD.lacking:
        wanted &= ~IS_GUARD
    try:
        found = pagemap.regions(low, high, fd, wanted)
    except OSError as e:
        if e.errno == errno.EINVAL and wanted & IS_GUARD:  # a kernel before PAGE_IS_GUARD (6.14)
            features.PAGE_IS_GUARD.learn(False)
            return _regions(low, high, fd, wanted & ~IS_GUARD)
        if e.errno in (errno.ENOTTY, errno.EINVAL):  # a kernel before PAGEMAP_SCAN (6.7)
            features.PAGEMAP_SCAN.learn(False)
        return None
    features.PAGEMAP_SCAN.learn(True)
    if wanted & IS_GUARD:
        features.PAGE_IS_GUARD.learn(True)
    return found


def _merged(regions: list[tuple[int, int, int]]) -> list[range]:
    runs: list[range] = []
    for first, stop, _ in regions:
        _append(runs, range(first, stop))
    return runs


def _by_category(vma: Vma, regions: list[tuple[int, int, int]]) -> Pages:
    """The pages of a mapping no other process shares, from PAGEMAP_SCAN's categories.

    The same classes as _class_table gives an exclusive page's entry.
    """
    pages = Pages()
    for first, stop, category in regions:
        run = range(first, stop)
        if category & IS_GUARD:
            continue
        if category & IS_SWAPPED:
            _append(pages.dump, run)
        elif category & IS_PFNZERO:
            continue
        elif category & IS_FILE and not vma.anonymous:
            _append(pages.drop, run)
        else:
            _append(pages.dump, run)
        pages.found += len(run)
    pages.occupied = _merged(regions)
    return pages


def refilled(
    start: int, length: int, anonymous: bool, read_pagemap: PagemapReader, zero: int, scan_fd: int | None
) -> list[int]:
    """Addresses of dropped pages that hold data of their own again.

    A read fault maps the zero page (or the file's page) and changes
    nothing; a write, by the kernel or another process, puts a new page there.
    """
    regions = _regions(start, start + length, scan_fd, IS_PRESENT | IS_SWAPPED) if scan_fd is not None else None
    runs = [range(length // PAGE)] if regions is None else _merged(regions)
    return [
        start + (first + i) * PAGE
        for first, classes in _classes(start, anonymous, runs, read_pagemap, zero)
        for i, c in enumerate(classes)
        if c in b"ds"
    ]


def _append(runs: list[range], pages: range) -> None:
    if runs and runs[-1].stop == pages.start:
        runs[-1] = range(runs[-1].start, pages.stop)
    else:
        runs.append(pages)


def _class_table(anonymous: bool) -> bytes:
    """Map the top byte of a pagemap entry to a class.

    d: only the target has it, dump it; s: another process maps it too,
    keep it; f: a clean page of the mapped file; g: a guard; .: nothing
    (z, the zero page, comes from _skip_zero_pages).
    """
    present, swapped, file = PM_PRESENT >> 56, PM_SWAPPED >> 56, PM_FILE >> 56
    guard, exclusive = PM_GUARD >> 56, PM_EXCLUSIVE >> 56
    table = bytearray(b"." * 256)
    for top in range(256):
        if top & guard:
            table[top] = ord("g")
            continue
        if top & swapped:
            table[top] = ord("d")
        elif top & present and top & file and not anonymous:
            table[top] = ord("f")
        elif top & present:
            table[top] = ord("d" if top & exclusive else "s")
    return bytes(table)


_CLASSES = {True: _class_table(True), False: _class_table(False)}
_RUNS = {b"d": re.compile(rb"d+"), b"f": re.compile(rb"f+"), b"dsfgz": re.compile(rb"[dsfgz]+")}


def _classify(vma: Vma, runs: list[range], read_pagemap: PagemapReader, zero: int) -> Pages:
    """Sort the pages of `runs` (page indexes in vma) by their pagemap entries."""
    pages = Pages()
    for first, classes in _classes(vma.start, vma.anonymous, runs, read_pagemap, zero):
        shared = classes.count(b"s")
        pages.shared += shared
        pages.found += shared + classes.count(b"d") + classes.count(b"f")
        _add_runs(pages.dump, classes, b"d", first)
        _add_runs(pages.occupied, classes, b"dsfgz", first)
        if not vma.anonymous:
            _add_runs(pages.drop, classes, b"f", first)
    return pages


def _classes(
    start: int, anonymous: bool, runs: list[range], read_pagemap: PagemapReader, zero: int
) -> Iterator[tuple[int, bytearray]]:
    """For each window of pages in `runs` (indexes from start): its first index and one class letter a page."""
    table = _CLASSES[anonymous]
    for run in runs:
        for first in range(run.start, run.stop, WINDOW):
            count = min(WINDOW, run.stop - first)
            entries = read_pagemap(start + first * PAGE, count)
            if len(entries) != count * 8:
                raise PlanError(f"short pagemap read at {start + first * PAGE:#x}")
            # the flag bits sit in the top byte of each little-endian entry
            classes = bytearray(entries[7::8].translate(table))
            if zero:
                _skip_zero_pages(entries, classes, zero)
            yield first, classes


def _skip_zero_pages(entries: bytes, classes: bytearray, zero: int) -> None:
    """Pages still mapped to the shared zero page hold nothing worth saving."""
    needle = zero.to_bytes(6, "little")
    pos = entries.find(needle)
    while pos >= 0:
        if pos % 8 == 0 and entries[pos + 6] & 0x7F == 0 and entries[pos + 7] & (PM_PRESENT >> 56):
            classes[pos // 8] = ord("z")
        pos = entries.find(needle, pos + 1)


def _add_runs(runs: list[range], classes: bytearray, kind: bytes, first: int) -> None:
    for match in _RUNS[kind].finditer(classes):
        _append(runs, range(first + match.start(), first + match.end()))


def _extents(runs: list[range], vma: Vma, limit: int, occupied: list[range] | None = None) -> list[Extent]:
    """Cut runs of page indexes into extents of at most `limit` bytes.

    With `occupied`, each extent says whether only holes lie between it and
    the one before (Extent.joins); without, none does.
    """
    step = max(1, limit // PAGE)
    starts = [r.start for r in occupied or []]
    extents: list[Extent] = []
    stop = -1
    for run in runs:
        for i in range(run.start, run.stop, step):
            joins = occupied is not None and stop >= 0 and _only_holes(occupied, starts, stop, i)
            extents.append(Extent(vma.start + i * PAGE, (min(i + step, run.stop) - i) * PAGE, vma, joins))
            stop = min(i + step, run.stop)
    return extents


def _only_holes(occupied: list[range], starts: list[int], first: int, stop: int) -> bool:
    """Whether no page of `occupied` (sorted, disjoint) lies in [first, stop)."""
    i = bisect.bisect_left(starts, stop) - 1
    return i < 0 or occupied[i].stop <= first
