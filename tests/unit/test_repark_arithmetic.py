"""The arithmetic of an incremental re-park (memcr.park.incremental): which pages come from the kept dump,
which holes the file gets, and how many system calls a fragmented restore makes."""

from __future__ import annotations

import ctypes
import itertools
import os
import random

import pytest

from memcr.dump.format import Group, Record
from memcr.dump.reader import Frame
from memcr.park import incremental
from memcr.park.upload import PIECE, _batches
from memcr.system import process_vm

P = 4096


def _index(runs: list[tuple[int, int]], base: int = 1 << 20) -> list[Record]:
    """Records of a plain dump: the runs back to back in the file from `base` on."""
    group = Group(runs)
    at = base
    for record in group.runs:
        record.offset, record.stored, record.written = at, record.length, record.length
        at += record.length
    return group.runs


def _written(ranges: list[tuple[int, int]]) -> incremental._Written:
    return incremental._Written(ranges, [end for _, end in ranges])


def _pages(pieces: list[tuple[int, int, Record]]) -> dict[int, int]:
    """page address -> its offset in the file, as the pieces say."""
    out = {}
    for lo, hi, record in pieces:
        for addr in range(lo, hi, P):
            out[addr] = record.offset + addr - record.addr
    return out


def test_the_dump_serves_the_pages_it_holds_and_those_the_target_wrote_are_written_over() -> None:
    rng = random.Random(5)
    for _ in range(200):
        base = 0x7F0000000000
        held = sorted(rng.sample(range(64), 40))
        runs: list[tuple[int, int]] = []
        for page in held:  # the runs the kept dump holds, merged where they follow each other
            if runs and runs[-1][0] + runs[-1][1] == base + page * P:
                runs[-1] = (runs[-1][0], runs[-1][1] + P)
            else:
                runs.append((base + page * P, P))
        index = _index(runs)
        written_pages = sorted(rng.sample(range(64), 12))
        written = _written([(base + p * P, base + (p + 1) * P) for p in written_pages])
        lo, hi = base + rng.randrange(0, 32) * P, base + rng.randrange(32, 65) * P
        pieces = incremental._held(lo, hi, index, [r.addr for r in index])
        found = _pages(pieces)
        assert set(found) == {base + p * P for p in held if lo <= base + p * P < hi}
        for addr, offset in found.items():  # each page from the place in the file that holds it
            record = next(r for r in index if r.addr <= addr < r.addr + r.length)
            assert offset == record.offset + addr - record.addr
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(pieces))  # in order, apart
        over = [span for piece_lo, piece_hi, _ in pieces for span in incremental._within(written, piece_lo, piece_hi)]
        pages_over = {a for a_lo, a_hi in over for a in range(a_lo, a_hi, P)}
        assert pages_over == {a for a in found if (a - base) // P in written_pages}


def test_written_over_runs_go_in_batches_of_one_buffer() -> None:
    vma = None
    runs = [incremental.Rewrite(0x10000 + i * 2 * P, P, 1 << 20 | i * P, vma) for i in range(3000)]  # type: ignore[arg-type]
    runs.append(incremental.Rewrite(0x900000, 5 * (1 << 20) + P, 64 << 20, vma))  # type: ignore[arg-type]
    batches = incremental.batches(runs, 1 << 20, 1024)
    assert all(sum(r.length for r in b) <= 1 << 20 and len(b) <= 1024 for b in batches)
    pieces = [r for b in batches for r in b]
    assert pieces[:3000] == runs[:3000]
    tail = pieces[3000:]
    assert [r.length for r in tail] == [1 << 20] * 5 + [P]
    assert [(r.addr - 0x900000, r.offset - (64 << 20)) for r in tail] == [(i << 20, i << 20) for i in range(6)]


def test_the_garbage_is_every_old_page_no_new_record_serves() -> None:
    index = _index([(0x10000, 8 * P), (0x40000, 4 * P)])
    kept = incremental.Kept(1, 0, None, index, None, 0)  # type: ignore[arg-type]
    reused = [
        incremental._clip(index[0], 0x10000 + 2 * P, 0x10000 + 5 * P, coded=False),
        incremental._clip(index[1], 0x40000, 0x40000 + P, coded=False),
    ]
    holes = incremental.garbage(kept, reused)
    base = 1 << 20
    assert holes == [(base, 2 * P), (base + 5 * P, 3 * P), (base + 9 * P, 3 * P)]


def test_many_small_pieces_go_in_few_calls() -> None:
    frames = [Frame(0x1000 * i * 2, P, i * P, P) for i in range(3000)]
    batches = _batches(frames)
    assert [f for b in batches for f in b] == frames
    assert all(len(b) <= process_vm.IOV_MAX and sum(f.length for f in b) <= PIECE for b in batches)
    assert len(batches) == -(-3000 * P // PIECE)  # as many pages as fill a piece go in each call
    big = [Frame(0, PIECE, 0, PIECE), Frame(PIECE, PIECE, PIECE, PIECE)]
    assert _batches(big) == [[big[0]], [big[1]]]


def test_a_batch_holds_about_a_piece_of_coded_frames_decoded() -> None:
    """Parts of a page each of coded frames (a coded dump a re-park added to): each batch holds the frames of its
    parts decoded, so it takes about PIECE bytes of frames, not of parts; the parts of one frame, in a row, go in
    one batch."""
    frame = PIECE // 4
    parts = [
        Frame(frame * i + P * k, P, 2 * frame * i, frame, b"h", P * k, b"", frame) for i in range(64) for k in (3, 9)
    ]
    batches = _batches(parts)
    assert [f for b in batches for f in b] == parts
    assert all(len({f.offset for f in b}) <= PIECE // frame for b in batches)
    holding = [{i for i, b in enumerate(batches) for f in b if f.offset == o} for o in {f.offset for f in parts}]
    assert all(len(batch) == 1 for batch in holding)
    assert len(batches) == 64 * frame // PIECE


def test_a_short_copy_goes_on_where_it_stopped() -> None:
    pieces = [(100, 1000, 10), (200, 2000, 20), (300, 3000, 30)]
    assert process_vm._after(pieces, 0) == pieces
    assert process_vm._after(pieces, 10) == pieces[1:]
    assert process_vm._after(pieces, 15) == [(205, 2005, 15), (300, 3000, 30)]
    assert process_vm._after(pieces, 60) == []


@pytest.mark.parametrize("way", ["write", "read"])
def test_many_pieces_land_where_each_belongs(way: str) -> None:
    source = ctypes.create_string_buffer(os.urandom(3000 * 16), 3000 * 16)
    target = ctypes.create_string_buffer(3000 * 16)
    order = list(range(3000))
    random.Random(3).shuffle(order)
    mine, theirs = (source, target) if way == "write" else (target, source)  # (local, remote)
    pieces = [(ctypes.addressof(theirs) + i * 16, ctypes.addressof(mine) + i * 16, 16) for i in order]
    (process_vm.write_many if way == "write" else process_vm.read_many)(os.getpid(), pieces)
    assert target.raw == source.raw
