"""Incremental re-park: a restored target's dump kept, its writes tracked, its next park writing what changed.

At an eager restore in `--incremental` mode, while the target is still
frozen, the parasite makes a userfaultfd in it (UFFD_USER_MODE_ONLY: any
process may), memcr registers the target's private anonymous mappings with
it for write-protection in async mode (Linux 6.7), and one PAGEMAP_SCAN
protects every page just put back. From then on the kernel notes each page
the target writes, without a fault to memcr. memcr keeps the dump and that
userfaultfd: a Kept.

At the next park, while the target still runs, what it wrote since is
copied over the kept dump's pages, each protected again as it is listed
(`precopy`): frozen, the park then writes only what it wrote meanwhile.
Frozen, a page the plan dumps that the kept dump holds at the
same address keeps its place in the file: as it is where its mapping is
still one memcr's userfaultfd watches (registering it again succeeds: not
moved, not mapped anew, not the target's own userfaultfd's, not another
program after exec) and the kernel says it was not written since (the
dump's copy is then the target's page byte for byte); else with the
target's bytes written over it. Pages the dump does not hold at their
address are appended. The dump so keeps the runs of the park that wrote
it whole, whatever the target writes: a doubt makes a page rewritten, never
the reverse. A coded dump (-z, -c, -e) is not written over: its frames
are read whole, so a re-park takes the parts of them the target did not
write, and appends what it wrote, in frames of its own epoch. Facts and
measurements: docs/incremental.md.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import errno
import itertools
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from memcr.dump.codec import Coding
from memcr.dump.format import Record
from memcr.dump.reader import WHOLE as WHOLE_FRAMES
from memcr.dump.reader import DumpReader, FramedReader
from memcr.engine import admission
from memcr.engine.parasite import Parasite
from memcr.engine.seize import Seizing
from memcr.errors import Aborted, MemcrError
from memcr.options import Cancel
from memcr.park.scan import Extent, Plan
from memcr.system import libc, pagemap, process_vm, procfs, uffd
from memcr.system.procfs import Vma

# A kept dump whose file takes more than this much beyond the pages it still serves is written anew, whole:
# the folder never holds much more than the target's private memory. Pages no longer served are given back
# to the filesystem while the target is parked (holes punched: Parked.tidy), so this is reached only where
# the filesystem cannot punch holes, or where the file's apparent size runs away (SPREAD).
GARBAGE = 0.25
SPREAD = 4  # the file's size (holes included) at most this many times the pages it serves
# nor may its index hold more runs than this fraction of its pages, or this many times the runs of the dump
# written whole last (which a sparse target has many of): a restore reads run by run
FRAGMENTS = 1 / 4
PIECES = 4
SLACK = 1 << 20  # record headers and the padding that puts each payload on a page boundary
# A coded dump's frames are never written over: a page the target wrote is appended, its old copy stays in a
# frame the dump still takes other pages of. Each re-park so adds what the target wrote: the dump is written
# whole once such old copies come to this fraction of its pages, sooner than GARBAGE.
STALE_COPIES = 1 / 8


class Untracked(MemcrError):
    """Writes to this target cannot be tracked here: its next park is a full one."""


@dataclass(eq=False)
class Kept:
    """A restored target's dump, with the userfaultfd that has tracked the target's writes since.

    `index`: the runs of pages the dump holds, in address order; each was
    put back from the dump and protected before the target ran again. A
    coded dump's lie each in one frame (`frames`: the plain bytes of each,
    by its offset in the file).
    """

    pid: int
    start_time: int  # of the process, from /proc/PID/stat: a pid used again is another process
    dump: DumpReader
    index: list[Record]
    tracker: uffd.Userfaultfd
    base: int  # runs in the last dump written whole: the pieces the target's own layout makes
    frames: dict[int, int] = dataclasses.field(default_factory=dict)
    # ranges a copy while the target ran protected again without their bytes reaching the dump (precopy)
    unvouched: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes the dump takes in its folder (its holes aside)."""
        try:
            return os.fstat(self.dump.file.fd).st_blocks * 512
        except OSError:
            return self.dump.size

    @property
    def coded(self) -> bool:
        """Whether its pages are in coded frames (-z, -c, -e), which are never written over."""
        return isinstance(self.dump, FramedReader)

    @property
    def held(self) -> int:
        """Bytes of pages the dump still serves."""
        return sum(r.length for r in self.index)

    def worn(self, page_size: int) -> str | None:
        """Why the next park should write the dump anew, whole (None: it may add to it)."""
        held, size = self.held, self.size
        # what the file must hold for them: a coded dump's frames it takes a page of, as stored
        live = sum({r.offset: r.stored for r in self.index}.values()) if self.coded else held
        if size - live > GARBAGE * live + SLACK:
            return f"the dump holds {(size - live) / 2**20:.1f} MiB no page needs any more"
        if (framed := sum(self.frames.values())) - held > STALE_COPIES * held + SLACK:
            return f"the dump's frames hold {(framed - held) / 2**20:.1f} MiB of pages no page needs any more"
        if self.dump.size > SPREAD * live + SLACK:
            return f"the dump's file has grown to {self.dump.size / 2**20:.1f} MiB, holes included"
        if len(self.index) > self.pieces_allowed(page_size):
            return f"the dump's pages lie in {len(self.index)} pieces, {self.base} when it was written whole"
        return None

    def pieces_allowed(self, page_size: int) -> int:
        """The pieces its index may hold. A restore works piece by piece, and decodes a coded dump's frame for
        each: a coded dump's pieces are held to the runs of its last dump written whole, times PIECES."""
        if self.coded:
            return max(64, PIECES * self.base)
        return max(64, PIECES * self.base, int(self.held // page_size * FRAGMENTS))

    def close(self) -> str | None:
        """Stop tracking and delete the dump; why it could not be deleted, or None. Never raises."""
        self.tracker.close()
        return self.dump.remove()


def too_costly(kept: Kept, pid: int, pagemap_fd: int, page_size: int) -> str | None:
    """Why a re-park into a coded kept dump should write it whole (None: it may add to it), judged while the
    target runs from what it wrote since its restore. Each place it wrote cuts a piece of a frame in two and adds
    one: the dump must not lie in more pieces than it may (`Kept.pieces_allowed`), or its restore slows down.
    And each page it wrote leaves its old copy in a frame the dump may still take other pages of: those old
    copies must stay within STALE_COPIES of the pages the dump serves, or the folder fills (`Kept.worn` judges
    the park after). A target that writes in a few places (a heap's newest part, buffers) is re-parked at the
    cost of those."""
    vmas = procfs.read_maps(pid)
    ours = owned(kept, vmas)
    starts = [r.addr for r in kept.index]
    places = appended = 0
    still: dict[int, int] = {}  # by frame (its offset): the bytes of it the dump will still take
    for vma in vmas:
        held = _held(vma.start, vma.end, kept.index, starts)
        if not held:
            continue
        # unwatched, or not to be told: the frozen park takes the mapping whole, without cutting a piece
        written = _written_present(pagemap_fd, vma) if (vma.start, vma.end) in ours else None
        for lo, hi, record in held:
            if written is None:
                appended += hi - lo
                continue
            changed, present = written
            parts = _within(changed, lo, hi)
            places += len(parts)
            # a page given back (MADV_DONTNEED) reads as written: the park neither takes its old copy nor adds it
            appended += sum(b - a for a, b in _within(present, lo, hi))
            still[record.offset] = still.get(record.offset, 0) + (hi - lo) - sum(b - a for a, b in parts)
    pieces, allowed = len(kept.index) + 2 * places, kept.pieces_allowed(page_size)
    if pieces > allowed:
        return (
            f"it wrote in {places} places since its restore: its coded dump, added to, would lie in about {pieces} "
            f"pieces, more than the {allowed} a restore reads as fast as the dump written whole"
        )
    old = sum(kept.frames[offset] - taken for offset, taken in still.items() if taken > 0)
    served = sum(still.values()) + appended
    if old > STALE_COPIES * served + SLACK:
        return (
            f"its coded dump, added to, would hold old copies of {old / 2**20:.1f} MiB of pages, more than an "
            f"eighth of the {served / 2**20:.1f} MiB it serves"
        )
    return None


def trackable(vma: Vma) -> bool:
    """Mappings whose writes memcr tracks: private anonymous ones, where a page not written is the page put back.

    A private file mapping's page can turn back into the file's own
    without a write (MADV_DONTNEED drops the private copy): never tracked.
    """
    return vma.private and vma.anonymous


def track(
    pid: int,
    parasite: Parasite,
    pagemap_fd: int | None,
    vmas: list[Vma],
    dump: DumpReader,
    page_size: int,
    start_time: int,
    base: int,
) -> Kept:
    """Start tracking the writes of a frozen target whose pages are all back from `dump`: a Kept.

    Untracked when this target or kernel cannot: nothing changed then
    (a userfaultfd made and closed again), and the dump is not kept.
    """
    if not dump.finished:
        raise Untracked("its dump is not complete")
    if pagemap_fd is None:
        raise Untracked("memcr may not read its page map")
    if any(link == "anon_inode:[userfaultfd]" for _, link in procfs.descriptor_links(pid)):
        # one userfaultfd may watch a mapping: memcr's would keep the target's own from registering its memory
        raise Untracked("it has a userfaultfd of its own, which may need its mappings")
    index = [r for r in dump.records if r.dropped]
    frames: dict[int, int] = {}
    if isinstance(dump, FramedReader):  # read before anything is made: a dump cut short meanwhile changes nothing
        index, frames = _by_frame(dump, index)
        dump.rest()  # its threads are done: the next park codes on threads of its own
    made = parasite.userfaultfd(uffd.TRACK_FLAGS)
    if made in (-errno.EINVAL, -errno.ENOSYS):  # no userfaultfd, or none for user faults alone (Linux 5.11)
        raise Untracked(f"this kernel cannot track writes ({os.strerror(-made)})", errno=-made)
    if made < 0:
        raise Untracked(f"it may not make a userfaultfd ({os.strerror(-made)})", errno=-made)
    tracker = uffd.Userfaultfd(made, page_size)
    try:
        try:
            tracker.handshake(uffd.TRACKING)
        except uffd.Unavailable as e:
            raise Untracked(
                "this kernel cannot track writes (userfaultfd write-protection in async mode, Linux 6.7)",
                errno=e.errno,
            ) from None
        for vma in vmas:
            if trackable(vma):
                _protect(tracker, pagemap_fd, vma)
    except BaseException:
        tracker.close()  # which stops the tracking of every mapping registered so far
        raise
    return Kept(pid, start_time, dump, index, tracker, base or len(index), frames=frames)


def _by_frame(dump: FramedReader, records: list[Record]) -> tuple[list[Record], dict[int, int]]:
    """A coded dump's runs cut at its frames' bounds, and each frame's plain bytes by its offset in the file: a
    re-park takes parts of frames (`_clip`)."""
    index, frames = [], {}
    for record in records:
        for frame in dump.frames(record, WHOLE_FRAMES):
            head = len(frame.header)
            index.append(
                Record(
                    frame.addr,
                    frame.length,
                    record.group,
                    offset=frame.offset - head,
                    stored=head + frame.stored,
                    written=frame.length,
                    dropped=True,
                    skip=frame.skip,
                )
            )
            frames[frame.offset - head] = dump.codec.parse_header(frame.header)[0]
    return index, frames


def _protect(tracker: uffd.Userfaultfd, pagemap_fd: int, vma: Vma) -> None:
    """Register the mapping and protect its pages: each reads as not written until the target writes it.

    A mapping that cannot be tracked is left as it was: its pages read as
    written (never protected), or it is not registered at all.
    """
    try:
        tracker.register(vma.start, vma.end, uffd.REGISTER_MODE_WP)
        _protect_written(pagemap_fd, vma)
    except (uffd.Unavailable, OSError):
        pass


def _protect_written(pagemap_fd: int, vma: Vma) -> _Written:
    """Protect each present page of a registered `vma` that reads as written, in the walk that lists them: those.

    Present pages only: protecting a hole maps a marker in it (the scan
    then counts it as a page to dump) and page tables for a range never
    touched.
    """
    found = pagemap.scan(
        vma.start,
        vma.end,
        pagemap_fd,
        flags=pagemap.WP_MATCHING | pagemap.CHECK_WPASYNC,
        mask=pagemap.IS_WRITTEN | pagemap.IS_PRESENT,
        wanted=pagemap.IS_WRITTEN,
    )
    return _ranges(vma, found)


class Rewrite(NamedTuple):
    """Pages the kept dump holds at their address that the target wrote since its restore (or that memcr cannot
    vouch for): the target's bytes go over the dump's, in place."""

    addr: int
    length: int
    offset: int  # of the dump's copy in the file
    vma: Vma


@dataclass
class Split:
    """A plan's pages to dump, in address order: those the kept dump holds at their address and those it does
    not (`fresh`: appended to it).

    `reused`: the kept dump's runs, clipped to the plan; `rewrite`: their
    parts the target wrote since, written over in place, so that the dump
    keeps its runs and its order whatever the target writes.
    `continues`: the starts of pieces that follow the previous piece
    without a gap, in the same mapping: one drop may take both.
    """

    fresh: list[Extent]
    reused: list[Record]
    rewrite: list[Rewrite]
    continues: set[int]

    @property
    def reused_bytes(self) -> int:
        return sum(r.length for r in self.reused)

    @property
    def rewrite_bytes(self) -> int:
        return sum(r.length for r in self.rewrite)


def owned(kept: Kept, vmas: list[Vma]) -> frozenset[tuple[int, int]]:
    """The mappings (start, end) memcr's userfaultfd watches: registering them again succeeds.

    Only where smaps shows a watch ("uw"): one the target's own
    userfaultfd holds answers EBUSY, and after an exec the old address
    space is gone (ESRCH, ENOMEM). A mapping mapped, moved or grown anew
    since the restore has no "uw", and stays unwatched.
    """
    ours = set()
    for vma in vmas:
        if "uw" in vma.flags and trackable(vma):
            try:
                kept.tracker.register(vma.start, vma.end, uffd.REGISTER_MODE_WP)
            except uffd.Unavailable:
                continue
            ours.add((vma.start, vma.end))
    return frozenset(ours)


def relabel(vmas: list[Vma], ours: frozenset[tuple[int, int]]) -> list[Vma]:
    """`vmas` with memcr's own watch taken out of their VmFlags: for the plan, "uw" is the target's watch, and
    makes its mapping untouchable (memcr.park.scan.UNTOUCHABLE)."""
    return [dataclasses.replace(v, flags=v.flags - {"uw"}) if (v.start, v.end) in ours else v for v in vmas]


def split(kept: Kept, plan: Plan, pagemap_fd: int, ours: frozenset[tuple[int, int]]) -> Split:
    """The plan's extents cut into what the kept dump holds at the same address and what it does not; of the
    first, what the target wrote since its restore (or memcr cannot vouch for); `ours`: the mappings memcr's
    userfaultfd watches (`owned`)."""
    starts = [r.addr for r in kept.index]
    written: dict[int, _Written | None] = {}  # by mapping start; None: not tracked
    out = Split([], [], [], set())
    for extent in plan.copy:
        vma = extent.vma
        if vma.start not in written:
            found = _written(pagemap_fd, vma) if (vma.start, vma.end) in ours else None
            written[vma.start] = None if found is None else _with(found, kept.unvouched, vma)
        changed = written[vma.start]
        end = extent.start + extent.length
        at = extent.start
        for lo, hi, record in _held(extent.start, end, kept.index, starts):
            if lo > at:
                _fresh(out, extent, at, lo)
            wrote = [(lo, hi)] if changed is None else _within(changed, lo, hi)
            if not kept.coded:
                if lo > extent.start:
                    out.continues.add(lo)
                reused = _clip(record, lo, hi, coded=False)
                out.reused.append(reused)
                out.rewrite += [Rewrite(a, b - a, reused.offset + a - lo, vma) for a, b in wrote]
            else:  # a coded frame is never written over: what the target wrote is appended
                for a, b in _between(wrote, lo, hi):
                    if a > extent.start:
                        out.continues.add(a)
                    out.reused.append(_clip(record, a, b, coded=True))
                for a, b in wrote:
                    _fresh(out, extent, a, b)
            at = hi
        if at < end:
            _fresh(out, extent, at, end)
    return out


def garbage(kept: Kept, reused: list[Record]) -> list[tuple[int, int]]:
    """(offset, length) in the file of the pages of the kept dump that no record of the new one serves; of a
    coded dump, the frames no record takes a page of."""
    if kept.coded:
        taken = {r.offset for r in reused}
        return sorted({(r.offset, r.stored) for r in kept.index if r.offset not in taken})
    served = sorted((r.offset, r.offset + r.length) for r in reused)
    starts = [lo for lo, _ in served]
    holes = []
    for record in kept.index:
        at, end = record.offset, record.offset + record.length
        i = max(0, bisect.bisect_right(starts, at) - 1)
        while at < end:
            while i < len(served) and served[i][1] <= at:
                i += 1
            hole_end = end if i == len(served) else min(end, served[i][0])
            if hole_end > at:
                holes.append((at, hole_end - at))
            if i == len(served):
                break
            at = max(at, served[i][1])
    return holes


def batches(runs: list[Rewrite], size: int, count: int) -> list[list[Rewrite]]:
    """The runs cut to at most `size` bytes each and gathered, in order, into batches of at most `size` bytes
    and `count` runs: one buffer, read with one process_vm_readv."""
    out: list[list[Rewrite]] = []
    taken = 0
    for run in runs:
        pieces = [run] if run.length <= size else _cut(run, size)
        for piece in pieces:
            if not out or taken + piece.length > size or len(out[-1]) >= count:
                out.append([])
                taken = 0
            out[-1].append(piece)
            taken += piece.length
    return out


def _cut(run: Rewrite, size: int) -> list[Rewrite]:
    return [
        run._replace(addr=run.addr + at, length=min(size, run.length - at), offset=run.offset + at)
        for at in range(0, run.length, size)
    ]


class Copied(NamedTuple):
    """What `precopy` did: the bytes it wrote over the kept dump, `held_ms` of it with every thread held (the
    scan), and why it stopped short (None: it did not)."""

    bytes: int
    held_ms: float
    stopped: str | None


def precopy(kept: Kept, pid: int, pagemap_fd: int, cancel: Cancel, buffer: bytearray) -> Copied:
    """While the target still runs: write over the kept dump the pages it wrote since its restore.

    The frozen park then writes only what the target writes from here on.
    The scan that lists a written page protects it again in the same walk
    (PM_SCAN_WP_MATCHING), before memcr reads it: a write after that, even
    one during the read, marks it written again, and the frozen park
    writes it anew. The walk holds every thread of the target: the kernel
    may write into a page it pinned for a synchronous read of the target's
    (O_DIRECT) long after the pin marked it written, and a thread stops
    only once its read is done; a pin after the walk marks the page
    written again. Only pages the dump holds at their address, in
    readable mappings memcr's userfaultfd watches, are scanned.

    Where a page cannot be read or written (the target unmapped or
    protected it meanwhile, a write refused), memcr no longer vouches for
    the pages protected and not copied (`Kept.unvouched`): the frozen park
    writes them as if the target had. So for a whole mapping whose walk
    fails (part of it mapped anew since the maps were read, before the
    hold). Aborted when `cancel` is set.
    """
    vmas = procfs.read_maps(pid)
    ours = owned(kept, vmas)
    starts = [r.addr for r in kept.index]
    runs: list[Rewrite] = []
    if cancel.cancelled:
        raise Aborted(f"checkpoint of pid {pid} aborted: it runs on", pid=pid)
    started = time.monotonic()
    with _threads_held(pid):
        admission.refuse_async_writers(pid)  # one made since the checks: its writes leave no trace
        for vma in vmas:
            if (vma.start, vma.end) not in ours or not vma.prot & mmap.PROT_READ:
                continue
            if held := _held(vma.start, vma.end, kept.index, starts):
                try:
                    changed = _protect_written(pagemap_fd, vma)
                except OSError:  # a part mapped anew since the maps were read (EPERM): the walk may have
                    kept.unvouched.append((vma.start, vma.end))  # protected pages of the rest by then
                    continue
                runs += [
                    Rewrite(a, b - a, r.offset + a - r.addr, vma)
                    for lo, hi, r in held
                    for a, b in _within(changed, lo, hi)
                ]
    held_ms = (time.monotonic() - started) * 1000
    local = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    copied = 0
    todo = batches(runs, len(buffer), process_vm.IOV_MAX)
    for i, batch in enumerate(todo):
        try:
            if cancel.cancelled:
                raise Aborted(f"checkpoint of pid {pid} aborted: it runs on", pid=pid)
            places = list(itertools.accumulate((r.length for r in batch), initial=0))[:-1]  # each run's, in buffer
            process_vm.read_many(pid, [(r.addr, local + at, r.length) for r, at in zip(batch, places, strict=True)])
            pieces = [(at, r.length, r.offset) for r, at in zip(batch, places, strict=True)]
            kept.dump.file.rewrite_many(memoryview(buffer), pieces)
        except (OSError, MemcrError) as e:
            kept.unvouched += [(r.addr, r.addr + r.length) for rest in todo[i:] for r in rest]
            if isinstance(e, Aborted):
                raise
            return Copied(copied, held_ms, str(e))
        copied += sum(r.length for r in batch)
    return Copied(copied, held_ms, None)


@contextlib.contextmanager
def _threads_held(pid: int) -> Iterator[None]:
    """Every thread of `pid` held in a ptrace stop, and let go again, as it was."""
    seizing = Seizing(pid)
    try:
        seizing.seize_all()
        yield
    finally:
        seizing.let_go()


class Added(NamedTuple):
    """What an incremental park leaves its restore: where the file holds pages no record serves any more, and
    the runs of the last dump written whole (0: this one was)."""

    garbage: list[tuple[int, int]]
    base: int


WHOLE = Added([], 0)


def punch(fd: int, holes: Sequence[tuple[int, int]]) -> None:
    """Give the `garbage` of a dump back to its filesystem; a hole never lies where a page of the dump does.

    Where the filesystem cannot punch holes, the space stays taken until
    the dump is written anew (`Kept.worn`).
    """
    for offset, length in holes:
        try:
            libc.punch_hole(fd, offset, length)
        except OSError:
            return


def _fresh(out: Split, extent: Extent, lo: int, hi: int) -> None:
    out.fresh.append(Extent(lo, hi - lo, extent.vma, extent.joins if lo == extent.start else False))
    if lo > extent.start:
        out.continues.add(lo)


class _Written(NamedTuple):
    """The ranges of a mapping the target wrote, in address order, and their ends (for bisection)."""

    ranges: list[tuple[int, int]]
    ends: list[int]


def _written(pagemap_fd: int, vma: Vma) -> _Written | None:
    """The ranges of a watched `vma` the target wrote since its restore; None where memcr cannot tell."""
    found = _scan_written(pagemap_fd, vma, pagemap.IS_WRITTEN)
    return None if found is None else _ranges(vma, found)


def _written_present(pagemap_fd: int, vma: Vma) -> tuple[_Written, _Written] | None:
    """The ranges of a watched `vma` the target wrote since its restore, and of those, the ones present; None
    where memcr cannot tell."""
    found = _scan_written(pagemap_fd, vma, pagemap.IS_WRITTEN | pagemap.IS_PRESENT)
    if found is None:
        return None
    merged: list[tuple[int, int, int]] = []  # the scan cuts a written range where its pages' presence changes
    for first, stop, _ in found:
        if merged and merged[-1][1] == first:
            merged[-1] = (merged[-1][0], stop, 0)
        else:
            merged.append((first, stop, 0))
    return _ranges(vma, merged), _ranges(vma, [f for f in found if f[2] & pagemap.IS_PRESENT])


def _scan_written(pagemap_fd: int, vma: Vma, wanted: int) -> list[tuple[int, int, int]] | None:
    """The pages of a watched `vma` the target wrote since its restore, with their categories of `wanted`
    (pagemap.scan); None where memcr cannot tell."""
    try:
        return pagemap.scan(
            vma.start, vma.end, pagemap_fd, flags=pagemap.CHECK_WPASYNC, mask=pagemap.IS_WRITTEN, wanted=wanted
        )
    except OSError:
        return None


def _with(written: _Written, more: list[tuple[int, int]], vma: Vma) -> _Written:
    """`written` and the parts of the ranges `more` within `vma`, as one list of ranges that do not touch."""
    extra = [(max(lo, vma.start), min(hi, vma.end)) for lo, hi in more if lo < vma.end and vma.start < hi]
    if not extra:
        return written
    ranges: list[tuple[int, int]] = []
    for lo, hi in sorted(written.ranges + extra):
        if ranges and lo <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(hi, ranges[-1][1]))
        else:
            ranges.append((lo, hi))
    return _Written(ranges, [end for _, end in ranges])


def _ranges(vma: Vma, found: list[tuple[int, int, int]]) -> _Written:
    """A scan's pages of `vma` (pagemap.scan) as address ranges."""
    page = pagemap.PAGE
    ranges = [(vma.start + first * page, vma.start + stop * page) for first, stop, _ in found]
    return _Written(ranges, [end for _, end in ranges])


def _held(start: int, end: int, index: list[Record], starts: list[int]) -> list[tuple[int, int, Record]]:
    """The runs of [start, end) the dump holds at their address: (low, high, the record holding it)."""
    out: list[tuple[int, int, Record]] = []
    i = max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(index) and index[i].addr < end:
        record = index[i]
        i += 1
        lo, hi = max(start, record.addr), min(end, record.addr + record.length)
        if lo < hi:
            out.append((lo, hi, record))
    return out


def _within(changed: _Written, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) the target wrote."""
    written, ends = changed
    out = []
    k = bisect.bisect_right(ends, lo)
    while k < len(written) and written[k][0] < hi:
        out.append((max(lo, written[k][0]), min(hi, written[k][1])))
        k += 1
    return out


def _clip(record: Record, lo: int, hi: int, coded: bool) -> Record:
    """The part [lo, hi) of a record: where its pages lie in the same file (`coded`: in the same frame)."""
    if coded:
        skip = record.skip + lo - record.addr
        return Record(lo, hi - lo, record.group, record.offset, record.stored, hi - lo, skip=skip)
    return Record(lo, hi - lo, record.group, record.offset + (lo - record.addr), hi - lo, hi - lo)


def _between(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) outside `ranges` (in order, within it)."""
    out, at = [], lo
    for a, b in ranges:
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out


def stale(kept: Kept, directory: Path, coding: Coding) -> str | None:
    """Why the kept dump cannot serve a park into `directory`, coded as `coding`, at all (None: it may)."""
    if coding != (kept.dump.codec.coding if isinstance(kept.dump, FramedReader) else Coding()):
        return "this park compresses, checksums or encrypts its dump (-z, -c, -e) otherwise than the kept one"
    if not _same_directory(directory, kept.dump.path.parent):
        return f"this park writes to {directory}, the kept dump is in {kept.dump.path.parent}"
    try:
        if procfs.read_stat(kept.pid).start != kept.start_time:
            return "the pid is another process now"
    except MemcrError:
        return "the process is gone"
    if not kept.dump.file.still_in_place():
        return f"its dump {kept.dump.path} was removed or replaced"
    now = kept.dump.file.stamp()
    if now is None or kept.dump.stamp is None:
        return f"its dump {kept.dump.path} cannot be read"
    if now != kept.dump.stamp:  # the size too, as memcr left it
        return f"its dump {kept.dump.path} was modified since memcr wrote it"
    return None


def _same_directory(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False
