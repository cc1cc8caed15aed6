"""The lazy restore's page arithmetic (Space) and its Source over a real dump, without root or a target."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from memcr.dump.reader import WHOLE
from memcr.lazy.source import FAULT_PIECE, FILL_PIECE, Source
from memcr.lazy.space import Filling, Piece, Space
from memcr.system.uffd import Userfaultfd
from tests.unit.test_dump import CODINGS, PAGE, RUNS, write

K = 0x1000


def space(*pieces: tuple[int, int, int]) -> Space:
    return Space(Userfaultfd(-1, PAGE), [Piece(*p) for p in pieces], streamed=True)


def spans(s: Space) -> list[tuple[int, int, int]]:
    return [(p.start, p.end, p.origin) for p in s.pieces]


def test_take_carves_the_aligned_part_around_the_address() -> None:
    s = space((0x10 * K, 0x30 * K, 0x90 * K))
    assert s.take(0x21 * K, 8 * K) == Piece(0x20 * K, 0x28 * K, 0xA0 * K)
    assert spans(s) == [(0x10 * K, 0x20 * K, 0x90 * K), (0x28 * K, 0x30 * K, 0xA8 * K)]


def test_take_stays_inside_its_piece() -> None:
    s = space((0x11 * K, 0x13 * K, 0x11 * K))
    assert s.take(0x12 * K, 16 * K) == Piece(0x11 * K, 0x13 * K, 0x11 * K)
    assert s.pieces == []


def test_take_of_an_address_no_piece_holds() -> None:
    s = space((0x10 * K, 0x20 * K, 0x10 * K))
    assert s.take(0x20 * K, K) is None
    assert s.take(0x0F * K, K) is None
    assert spans(s) == [(0x10 * K, 0x20 * K, 0x10 * K)]


def test_take_first_takes_from_the_lowest_piece() -> None:
    s = space((0x10 * K, 0x20 * K, 0x50 * K), (0x40 * K, 0x41 * K, 0x60 * K))
    assert s.take_first(4 * K) == Piece(0x10 * K, 0x14 * K, 0x50 * K)
    assert s.take_first(WHOLE) == Piece(0x14 * K, 0x20 * K, 0x54 * K)
    assert spans(s) == [(0x40 * K, 0x41 * K, 0x60 * K)]


def test_cut_returns_the_parts_inside_and_keeps_the_rest() -> None:
    s = space((0x10 * K, 0x20 * K, 0x10 * K), (0x30 * K, 0x40 * K, 0x80 * K))
    inside = s.cut(0x18 * K, 0x34 * K)
    assert [(p.start, p.end, p.origin) for p in inside] == [
        (0x18 * K, 0x20 * K, 0x18 * K),
        (0x30 * K, 0x34 * K, 0x80 * K),
    ]
    assert spans(s) == [(0x10 * K, 0x18 * K, 0x10 * K), (0x34 * K, 0x40 * K, 0x84 * K)]


def test_a_remap_moves_pieces_and_keeps_their_origin() -> None:
    """What the page server does with a REMAP message: cut, then put at the new place."""
    s = space((0x10 * K, 0x20 * K, 0x10 * K))
    for p in s.cut(0x10 * K, 0x20 * K):
        s.put(Piece(p.start - 0x10 * K + 0x70 * K, p.end - 0x10 * K + 0x70 * K, p.origin))
    assert spans(s) == [(0x70 * K, 0x80 * K, 0x10 * K)]


def test_put_keeps_address_order_and_drops_empty_pieces() -> None:
    s = space((0x30 * K, 0x40 * K, 0x30 * K))
    s.put(Piece(0x10 * K, 0x12 * K, 0x10 * K))
    s.put(Piece(0x50 * K, 0x50 * K, 0x50 * K))
    assert spans(s) == [(0x10 * K, 0x12 * K, 0x10 * K), (0x30 * K, 0x40 * K, 0x30 * K)]


def test_holds_and_is_busy() -> None:
    s = space((0x10 * K, 0x20 * K, 0x10 * K))
    assert s.holds(0x10 * K) and s.holds(0x20 * K - 1)
    assert not s.holds(0x20 * K) and not s.holds(0x0F * K)
    piece = s.take(0x10 * K, K)
    assert piece is not None
    s.busy.append(piece)
    assert s.is_busy(0x10 * K) and not s.holds(0x10 * K)


def test_a_clone_misses_the_same_pages_and_is_not_streamed() -> None:
    s = space((0x10 * K, 0x20 * K, 0x90 * K))
    child = s.clone(Userfaultfd(-2, PAGE))
    assert spans(child) == spans(s) and not child.streamed
    child.cut(0x10 * K, 0x20 * K)
    assert spans(s) == [(0x10 * K, 0x20 * K, 0x90 * K)]


def test_states() -> None:
    s = space((0x10 * K, 0x20 * K, 0x10 * K))
    assert s.live and not s.complete
    s.exited()
    assert s.state is Filling.GONE and s.complete
    s.state = Filling.RETIRED
    s.exited()
    assert s.state is Filling.RETIRED


def test_an_empty_space_is_complete() -> None:
    assert space().complete


@pytest.mark.parametrize("name", CODINGS)
def test_source_serves_the_dumps_bytes(tmp_path: Path, name: str) -> None:
    dump = write(tmp_path, CODINGS[name], RUNS)
    source = Source(dump, dump.verified_records(), PAGE)
    try:
        pieces = source.pieces()
        assert sum(p.end - p.start for p in pieces) == sum(len(data) for data in RUNS.values())
        if name == "plain":
            assert [(p.start, p.end) for p in pieces] == [(addr, addr + len(data)) for addr, data in RUNS.items()]
            assert (source.fault_piece, source.fill_piece) == (FAULT_PIECE, FILL_PIECE)
        else:
            assert len(pieces) > len(RUNS)  # one per frame
            assert (source.fault_piece, source.fill_piece) == (WHOLE, WHOLE)
        for addr, data in RUNS.items():
            for at in (0, PAGE, len(data) - PAGE):
                with source.bytes_at(addr + at, PAGE) as address:
                    assert ctypes.string_at(address, PAGE) == data[at : at + PAGE]
    finally:
        source.close()
        dump.remove()
