"""The dump file's writers and reader, on real files, without root or a target."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import pytest

from memcr.dump.codec import FRAME_PLAIN, Coding
from memcr.dump.format import HEADER, RECORD, check_directory, dump_path
from memcr.dump.reader import DumpReader
from memcr.dump.writer import FramedWriter, PlainWriter, open_writer
from memcr.errors import DumpError, StorageError, TargetError
from memcr.park import incremental

PAGE = mmap.PAGESIZE
PID = 4242
CODINGS = {
    "plain": Coding(),
    "lz4+md5": Coding(compress="lz4", checksum=True),
    "zstd+gcm": Coding(compress="zstd", cipher="aes-256-gcm"),
    "cbc": Coding(cipher="aes-128-cbc"),
}


def pages(seed: int, count: int) -> bytes:
    """Half text, half noise: compressible and not."""
    text = (f"page {seed} " * PAGE)[: count * PAGE // 2].encode()
    return text + os.urandom(count * PAGE - len(text))


def write(directory: Path, coding: Coding, runs: dict[int, bytes], finish: bool = True) -> DumpReader:
    """A dump of `runs` (address -> bytes), every record marked dropped."""
    writer = open_writer(directory, PID, PAGE, coding)
    for addr, data in runs.items():
        group = writer.begin_group([(addr, len(data))])
        for offset in range(0, len(data), FRAME_PLAIN):
            piece = writer.buffer(min(FRAME_PLAIN, len(data) - offset))
            piece[:] = data[offset : offset + len(piece)]
            writer.write_payload(group.runs[0], piece)
        writer.end_group(group)
    writer.flush()
    for record in writer.completed():
        record.dropped = True
    return writer.finish() if finish else writer.abandon()


def read_back(dump: DumpReader) -> dict[int, bytes]:
    return {r.addr: b"".join(bytes(c) for c in dump.chunks(r)) for r in dump.verified_records()}


RUNS = {0x10000: pages(1, 3), 0x7F0000000000: pages(2, 600)}  # the second spans several frames


@pytest.mark.parametrize("name", CODINGS)
def test_round_trip(tmp_path: Path, name: str) -> None:
    dump = write(tmp_path, CODINGS[name], RUNS)
    try:
        assert dump.finished and dump.path == dump_path(tmp_path, PID)
        assert os.stat(dump.path).st_mode & 0o777 == 0o600
        assert read_back(dump) == RUNS
    finally:
        dump.remove()
    assert not dump.path.exists()


def test_plain_payloads_sit_on_page_boundaries(tmp_path: Path) -> None:
    """So that sendfile() hands whole page-cache pages to the parasite on restore."""
    dump = write(tmp_path, Coding(), RUNS)
    try:
        spans = [dump.file_span(r) for r in dump.records]
        assert all(span is not None and span[1] % PAGE == 0 for span in spans)
    finally:
        dump.remove()


def test_writer_kind_follows_the_coding(tmp_path: Path) -> None:
    for coding, kind in ((Coding(), PlainWriter), (Coding(checksum=True), FramedWriter)):
        writer = open_writer(tmp_path, PID, PAGE, coding)
        try:
            assert isinstance(writer, kind)
        finally:
            writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", CODINGS)
def test_a_changed_size_is_refused(tmp_path: Path, name: str) -> None:
    dump = write(tmp_path, CODINGS[name], RUNS)
    try:
        with open(dump.path, "ab") as f:
            f.write(b"x")
        with pytest.raises(DumpError, match="it was modified"):
            dump.verified_records()
    finally:
        dump.remove()


@pytest.mark.parametrize(
    ("where", "message"),
    [(0, "damaged header"), (HEADER.size + 8, "damaged record"), (-RECORD.size + 16, "damaged end record")],
)
def test_damaged_index_is_refused(tmp_path: Path, where: int, message: str) -> None:
    dump = write(tmp_path, Coding(checksum=True), {0x10000: pages(3, 2)})
    try:
        offset = where if where >= 0 else dump.size + where
        with open(dump.path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(DumpError, match=message):
            dump.verified_records()
    finally:
        dump.remove()


def test_a_plain_dump_written_to_is_refused(tmp_path: Path) -> None:
    """A plain dump has no checksum: a page's bytes changed in place (same size, header and records intact) are
    seen by the file's modification time, before any page goes back."""
    dump = write(tmp_path, Coding(), {0x10000: pages(3, 2)})
    try:
        offset = dump.records[0].offset
        with open(dump.path, "r+b") as f:
            f.seek(offset)
            f.write(b"changed")
        with pytest.raises(DumpError, match="was written to since memcr wrote it"):
            dump.verified_records()
    finally:
        dump.remove()


@pytest.mark.parametrize("name", ["lz4+md5", "zstd+gcm", "cbc"])
def test_damaged_payload_is_refused(tmp_path: Path, name: str) -> None:
    dump = write(tmp_path, CODINGS[name], {0x10000: pages(4, 8)})
    try:
        record = dump.records[0]
        with open(dump.path, "r+b") as f:
            f.seek(record.offset + record.stored - 5)
            f.write(b"\xff\x00\xff\x00\xff")
        with pytest.raises(DumpError):
            read_back(dump)
    finally:
        dump.remove()


def test_an_abandoned_dump_gives_back_what_was_dropped(tmp_path: Path) -> None:
    """A checkpoint that fails midway rolls back from an unfinished dump: no end record needed."""
    dump = write(tmp_path, Coding(compress="lz4"), RUNS, finish=False)
    try:
        assert not dump.finished
        assert read_back(dump) == RUNS
    finally:
        dump.remove()


def test_a_dump_left_by_a_dead_memcr_is_replaced(tmp_path: Path) -> None:
    dump_path(tmp_path, PID).write_bytes(b"MEMCRPY\0" + bytes(100))
    runs = {0x10000: pages(5, 1)}
    dump = write(tmp_path, Coding(), runs)
    try:
        assert read_back(dump) == runs
    finally:
        dump.remove()


def test_a_stranger_file_is_kept(tmp_path: Path) -> None:
    path = dump_path(tmp_path, PID)
    path.write_text("precious")
    with pytest.raises(StorageError, match="is not a dump memcr left behind") as caught:
        open_writer(tmp_path, PID, PAGE, Coding())
    assert caught.value.path == str(path)
    assert path.read_text() == "precious"


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    dump_path(tmp_path, PID).symlink_to(victim)
    with pytest.raises(StorageError):
        open_writer(tmp_path, PID, PAGE, Coding())
    assert victim.read_text() == "precious"


def test_directory_checks_carry_the_reason(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist") as missing:
        check_directory(tmp_path / "nowhere")
    assert (missing.value.what, missing.value.errno) == ("dump-dir", errno.ENOENT)
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="is not a directory") as not_dir:
        check_directory(tmp_path / "file")
    assert not_dir.value.errno == errno.ENOTDIR


def test_a_live_dump_is_not_taken_for_a_stale_one(tmp_path: Path) -> None:
    """A second memcr on the same pid must not delete the dump the first one is still writing.

    It is refused as the target of another memcr (exit 3), as its trace
    would refuse it a moment later: not as a failure of the disk (5).
    """
    first = open_writer(tmp_path, PID, PAGE, Coding())
    try:
        with pytest.raises(TargetError, match="another memcr holds") as caught:
            open_writer(tmp_path, PID, PAGE, Coding())
        assert (caught.value.errno, caught.value.what, caught.value.exit_code) == (errno.EBUSY, "another-memcr", 3)
        assert first.file.still_in_place()
    finally:
        first.close()


@pytest.mark.parametrize("name", CODINGS)
def test_many_runs_share_one_record(tmp_path: Path, name: str) -> None:
    """Sparse pages: one record, 16 bytes of table a run, no padding between runs."""
    runs = {0x100000 + i * 8 * PAGE: pages(i, 1 + i % 3) for i in range(300)}
    writer = open_writer(tmp_path, PID, PAGE, CODINGS[name])
    group = writer.begin_group([(addr, len(data)) for addr, data in runs.items()])
    for record, data in zip(group.runs, runs.values(), strict=True):
        piece = writer.buffer(len(data))
        piece[:] = data
        writer.write_payload(record, piece)
    writer.end_group(group)
    writer.flush()
    for record in writer.completed():
        record.dropped = True
    dump = writer.finish()
    try:
        assert read_back(dump) == runs
        data = sum(map(len, runs.values()))
        if name == "plain":
            assert all(r.offset % PAGE == 0 for r in dump.records)
            assert dump.size <= data + 2 * PAGE + 16 * len(runs) + 3 * RECORD.size
    finally:
        dump.remove()


@pytest.mark.parametrize("name", ["lz4+md5", "zstd+gcm", "cbc"])
def test_a_coded_dump_added_to_serves_parts_of_its_frames(tmp_path: Path, name: str) -> None:
    """What an incremental re-park does to a coded dump (memcr.park.incremental): the runs cut at the frames,
    parts of them taken again, pages written since appended in frames of the new park's epoch; every byte
    reads back from where it now lies, through the chunks and through the pages a copy maps."""
    base = 0x7F0000000000
    old = pages(3, 600)  # frames of 256, 256 and 88 pages
    dump = write(tmp_path, CODINGS[name], {base: old})
    index, frames = incremental._by_frame(dump, dump.verified_records())
    assert [r.length // PAGE for r in index] == [256, 256, 88] and sorted(frames.values()) == [88 * PAGE] + [
        FRAME_PLAIN
    ] * 2
    # pages 100 and 101 written since, 300..599 unmapped: the rest of the first two frames taken again
    fresh = {base + 100 * PAGE: pages(4, 2)}
    kept = incremental.Kept(PID, 0, dump, index, None, len(index), frames=frames)  # type: ignore[arg-type]
    reused = [
        incremental._clip(index[0], base, base + 100 * PAGE, coded=True),
        incremental._clip(index[0], base + 102 * PAGE, base + 256 * PAGE, coded=True),
        incremental._clip(index[1], base + 256 * PAGE, base + 300 * PAGE, coded=True),
    ]
    writer = open_writer(tmp_path, PID, PAGE, CODINGS[name], dump)
    assert isinstance(writer, FramedWriter) and writer.codec.epoch != dump.codec.epoch  # type: ignore[attr-defined]
    writer.include(reused)
    for addr, data in fresh.items():
        group = writer.begin_group([(addr, len(data))])
        piece = writer.buffer(len(data))
        piece[:] = data
        writer.write_payload(group.runs[0], piece)
        writer.end_group(group)
    writer.flush()
    for record in writer.completed() + reused:
        record.dropped = True
    again = writer.finish()
    try:
        back = read_back(again)
        whole = b"".join(back[addr] for addr in sorted(back))
        assert whole == old[: 100 * PAGE] + fresh[base + 100 * PAGE] + old[102 * PAGE : 300 * PAGE]
        records = again.verified_records()
        frames_read = [f for r in records for f in again.frames(r, FRAME_PLAIN)]
        with again.readable(frames_read) as mapped:
            for frame in frames_read:
                with mapped.at(frame, 0, frame.length) as address:
                    assert ctypes.string_at(address, frame.length) == whole[frame.addr - base :][: frame.length]
        # the third frame no record takes a page of is the garbage; the first two are not
        assert incremental.garbage(kept, reused) == [(index[2].offset, index[2].stored)]
    finally:
        again.remove()


@pytest.mark.parametrize("name", ["lz4+md5", "zstd+gcm", "cbc"])
def test_a_part_of_a_frame_past_its_end_is_refused(tmp_path: Path, name: str) -> None:
    """An index whose part of a frame runs past it (memcr's own bug, or a file cut) names the damage."""
    dump = write(tmp_path, CODINGS[name], {0x10000: pages(5, 3)})
    try:
        record = dump.verified_records()[0]
        (piece,), _ = incremental._by_frame(dump, [record])
        beyond = incremental._clip(piece, 0x10000 + PAGE, 0x10000 + 3 * PAGE, coded=True)
        beyond.length += PAGE
        with pytest.raises(DumpError, match="frame running past its record"):
            list(dump.frames(beyond, FRAME_PLAIN))
    finally:
        dump.remove()
