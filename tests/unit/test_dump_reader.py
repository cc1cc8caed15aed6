"""The reader's interface, the same for plain and coded dumps: frames, windows, readable pages."""

from __future__ import annotations

import ctypes
import itertools
from pathlib import Path

import pytest

from memcr.dump.codec import FRAME_PLAIN
from memcr.dump.reader import WHOLE, DumpReader
from memcr.errors import DumpError, MemcrError
from tests.unit.test_dump import CODINGS, PAGE, RUNS, write

PIECE = 64 * PAGE


@pytest.fixture(params=CODINGS)
def dump(request: pytest.FixtureRequest, tmp_path: Path) -> DumpReader:
    reader = write(tmp_path, CODINGS[request.param], RUNS)
    request.addfinalizer(reader.remove)
    return reader


def plain(dump: DumpReader) -> bool:
    return dump.file_span(dump.records[0]) is not None


def test_frames_cover_each_record_in_order(dump: DumpReader) -> None:
    for record in dump.verified_records():
        frames = list(dump.frames(record, PIECE))
        assert frames[0].addr == record.addr
        assert all(a.addr + a.length == b.addr for a, b in itertools.pairwise(frames))
        assert sum(f.length for f in frames) == record.length
        if plain(dump):
            assert all(f.length <= PIECE and f.stored == f.length and not f.header for f in frames)
            assert all(f.offset == record.offset + f.addr - record.addr for f in frames)
        else:
            assert all(0 < f.length <= FRAME_PLAIN and f.header for f in frames)


def test_decoded_frames_are_the_pages(dump: DumpReader) -> None:
    for record in dump.verified_records():
        assert b"".join(bytes(dump.decode(f)) for f in dump.frames(record, PIECE)) == RUNS[record.addr]


def test_copy_size_pool_and_windows(dump: DumpReader) -> None:
    frames = [f for r in dump.verified_records() for f in dump.frames(r, PIECE)]
    windows = dump.windows(frames, 2 * PIECE)
    assert [f for w in windows for f in w] == frames
    if plain(dump):
        assert (dump.copy_size(PIECE), dump.pool) == (PIECE, None)
        assert all(w[-1].offset + w[-1].length - w[0].offset <= 2 * PIECE for w in windows)
        assert len(windows) > 1
    else:
        assert dump.copy_size(PIECE) == WHOLE and dump.pool is not None
        assert windows == [frames]


def test_readable_pages_hold_the_dumps_bytes(dump: DumpReader) -> None:
    for record in dump.verified_records():
        data = RUNS[record.addr]
        frames = list(dump.frames(record, PIECE))
        with dump.readable(frames) as pages:
            for frame in frames:
                start = frame.addr - record.addr
                with pages.at(frame, 0, frame.length) as address:
                    assert ctypes.string_at(address, frame.length) == data[start : start + frame.length]
                with pages.at(frame, PAGE, PAGE) as address:
                    assert ctypes.string_at(address, PAGE) == data[start + PAGE : start + 2 * PAGE]


def test_no_frames_nothing_mapped(tmp_path: Path) -> None:
    dump = write(tmp_path, CODINGS["plain"], RUNS)
    try:
        frame = next(dump.frames(dump.records[0], PIECE))
        with dump.readable([]) as pages, pytest.raises(MemcrError, match="no frame holds"):
            pages.at(frame, 0, PAGE).__enter__()
    finally:
        dump.remove()


def test_a_coded_frame_is_read_only_within_itself(tmp_path: Path) -> None:
    dump = write(tmp_path, CODINGS["lz4+md5"], RUNS)
    try:
        frame = next(dump.frames(dump.records[0], PIECE))
        with dump.readable([frame]) as pages, pytest.raises(MemcrError, match="no frame holds"):
            pages.at(frame, frame.length - PAGE, 2 * PAGE).__enter__()
    finally:
        dump.remove()


def test_a_record_cut_short_is_refused_where_it_ends(tmp_path: Path) -> None:
    dump = write(tmp_path, CODINGS["plain"], RUNS)
    try:
        record = dump.records[-1]
        record.stored = 2 * PAGE
        frames = dump.frames(record, PAGE)
        assert bytes(dump.decode(next(frames))) == RUNS[record.addr][:PAGE]
        next(frames)
        with pytest.raises(DumpError, match="running past its record"):
            dump.decode(next(frames))
    finally:
        dump.remove()
