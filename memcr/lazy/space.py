"""The pages memcr still has to fill in one mm: pieces, each with the dump address it came from."""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from memcr.system.uffd import Userfaultfd


class Filling(enum.Enum):
    """Whether memcr still fills a space."""

    LIVE = "live"
    GONE = "gone"  # its process exited or exec'd: nothing more to fill
    RETIRED = "retired"  # every page is back and memcr closed its userfaultfd


@dataclass
class Piece:
    start: int  # where the pages go now (a remap moves them)
    end: int
    origin: int  # the dump address of `start`


@dataclass
class Space:
    """One mm whose missing pages memcr fills: the target's, or that of a child it forked meanwhile."""

    uffd: Userfaultfd
    pieces: list[Piece]  # not yet copied, in address order
    streamed: bool  # filled in the background too; a child's pages come only as its threads touch them
    busy: list[Piece] = field(default_factory=list)  # being copied now
    faults: list[int] = field(default_factory=list)  # addresses a thread waits on, to serve again
    # pages a one-page copy found unmapped, and since when: the message of their unmap or move is due,
    # and until it is read they are not given up
    stuck: dict[int, float] = field(default_factory=dict)
    state: Filling = Filling.LIVE

    @property
    def live(self) -> bool:
        return self.state is Filling.LIVE

    def exited(self) -> None:
        """Its process exited or exec'd: nothing more to fill (a retired space stays retired)."""
        if self.state is Filling.LIVE:
            self.state = Filling.GONE

    @property
    def complete(self) -> bool:
        return not self.live or not (self.pieces or self.busy or self.faults)

    def take(self, addr: int, size: int) -> Piece | None:
        """The `size`-aligned part around addr of the piece that holds it; the rest stays."""
        i = bisect.bisect_right(self.pieces, addr, key=lambda p: p.start) - 1
        if i < 0 or addr >= self.pieces[i].end:
            return None
        return self._carve(i, max(self.pieces[i].start, addr - addr % size), size)

    def take_first(self, size: int) -> Piece:
        return self._carve(0, self.pieces[0].start, size)

    def _carve(self, i: int, lo: int, size: int) -> Piece:
        p = self.pieces.pop(i)
        hi = min(p.end, lo - lo % size + size)
        if hi < p.end:
            self.pieces.insert(i, Piece(hi, p.end, p.origin + hi - p.start))
        if p.start < lo:
            self.pieces.insert(i, Piece(p.start, lo, p.origin))
        return Piece(lo, hi, p.origin + lo - p.start)

    def put(self, piece: Piece) -> None:
        if piece.start < piece.end:
            bisect.insort(self.pieces, piece, key=lambda p: p.start)

    def cut(self, start: int, end: int) -> list[Piece]:
        """Take [start, end) out of every piece; the parts that were inside, in order."""
        inside: list[Piece] = []
        kept: list[Piece] = []
        for p in self.pieces:
            if p.end <= start or p.start >= end:
                kept.append(p)
                continue
            lo, hi = max(p.start, start), min(p.end, end)
            if p.start < lo:
                kept.append(Piece(p.start, lo, p.origin))
            inside.append(Piece(lo, hi, p.origin + lo - p.start))
            if hi < p.end:
                kept.append(Piece(hi, p.end, p.origin + hi - p.start))
        self.pieces = kept
        return inside

    def holds(self, addr: int) -> bool:
        i = bisect.bisect_right(self.pieces, addr, key=lambda p: p.start) - 1
        return i >= 0 and addr < self.pieces[i].end

    def is_busy(self, addr: int) -> bool:
        return any(p.start <= addr < p.end for p in self.busy)

    def clone(self, uffd: Userfaultfd) -> Space:
        """A forked child's: the pages still missing here are missing there too, and come as it touches them."""
        return Space(uffd, [Piece(p.start, p.end, p.origin) for p in self.pieces], streamed=False)
