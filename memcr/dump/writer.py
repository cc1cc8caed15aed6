"""Writing a dump while the target is frozen: plain (copied or spliced) or framed (coded on other cores).

Both writers take the pages a group of runs at a time (one file record,
`begin_group` .. `end_group`), hand out the runs whose record is wholly in
the file (`completed`), because only those pages may be dropped, and end
as a DumpReader over the same file (`finish`, or `abandon` for a rollback).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from memcr.dump.codec import FRAME_PLAIN, Coding, FrameCodec, coding_pool
from memcr.dump.format import DumpFile, Group, Record, end_record, header, storage_error
from memcr.dump.reader import DumpReader, FramedReader, PlainReader
from memcr.system import heap

PIPELINE_DEPTH = 2  # frames queued or being coded: bounds memory
PIPE_SIZE = 1 << 20  # the kernel's default limit for an unprivileged pipe


class Writer:
    """What both writers share: the file, the records, the header."""

    def __init__(self, file: DumpFile, pid: int, page_size: int, coding: Coding) -> None:
        self.file = file
        self.pid = pid
        self.page_size = page_size
        self.coding = coding
        self.records: list[Record] = []
        self.page_bytes = 0
        self._complete: list[Record] = []
        self._header = header(page_size, pid, coding.flags)
        if file.size == 0:  # else a kept dump, which this park adds to (memcr.park.incremental)
            file.append(self._header)

    @property
    def path(self) -> Path:
        return self.file.path

    def begin_group(self, runs: Sequence[tuple[int, int]]) -> Group:
        """A new record for these runs of pages, (address, length) in address order."""
        group = Group(runs)
        self.records += group.runs
        return group

    def include(self, records: list[Record]) -> None:
        """Runs of pages the file holds already, from an earlier park: this dump serves them too."""
        self.records += records

    def completed(self) -> list[Record]:
        """The runs whose pages are all in the file since the last call: theirs may be dropped."""
        done, self._complete = self._complete, []
        return done

    def _write_group_header(self, group: Group) -> None:
        group.offset = self.file.size + group.header_size
        self.file.append(group.header)  # stored length still 0: rewritten by _finish_group

    def _finish_group(self, group: Group) -> None:
        self.file.rewrite(group.header, group.offset - group.header_size)
        self._complete += group.runs

    def flush(self) -> None:
        """Write everything still on its way to the file."""

    def pipe(self) -> Splice | None:
        """A pipe into the file, for pages spliced from a socket; None where they must come through memcr."""
        return None

    def finish(self) -> DumpReader:
        """Write the end record; the dump is complete and is read back from here on."""
        self.flush()
        self.file.append(end_record(self.page_bytes))
        return self._reader(finished=True)

    def abandon(self) -> DumpReader:
        """Stop writing (a checkpoint failed): the dropped pages are read back from what is there."""
        return self._reader(finished=False)

    def _reader(self, finished: bool) -> DumpReader:
        raise NotImplementedError

    def close(self) -> str | None:
        """Give up the dump altogether (nothing was dropped); why it could not be deleted, or None."""
        return self.file.remove()


class Splice(NamedTuple):
    """A pipe into a plain dump: pages spliced into `fd` reach the file with `take`."""

    writer: PlainWriter
    fd: int
    capacity: int

    def take(self, group: Group, length: int) -> None:
        """Append the next `length` bytes of the group's pages, waiting in the pipe."""
        self.writer.write_piped(group, length)


class PlainWriter(Writer):
    """Pages as they are, each record's payload on a page boundary of the file (for sendfile on restore)."""

    def __init__(self, file: DumpFile, pid: int, page_size: int, coding: Coding) -> None:
        super().__init__(file, pid, page_size, coding)
        self._buffer = bytearray(FRAME_PLAIN)
        self._pipe: tuple[int, int, int] | None = None  # read end, write end, capacity
        self._splices = True

    def begin_group(self, runs: Sequence[tuple[int, int]]) -> Group:
        group = super().begin_group(runs)
        # zero padding puts the payload on a page boundary of the file, so
        # sendfile() hands whole page-cache pages to the socket on restore;
        # the runs follow one another, each on a page boundary too
        pad = -(self.file.size + group.header_size) % self.page_size
        if pad:
            self.file.append(bytes(pad))
        self._write_group_header(group)
        at = group.offset
        for run in group.runs:
            run.offset = at
            at += run.length
        return group

    def buffer(self, size: int) -> memoryview:
        """Where to put the next page bytes for write_payload: reused once written."""
        return memoryview(self._buffer)[:size]

    def write_payload(self, record: Record, data: memoryview) -> None:
        """Append the next bytes of the group's pages (`record` is the run they begin in)."""
        self.file.append(data)
        record.group.count(len(data))
        self.page_bytes += len(data)

    def end_group(self, group: Group) -> None:
        group.ended = True
        self._finish_group(group)

    def write_over(self, data: memoryview, pieces: list[tuple[int, int, int]]) -> None:
        """Write page bytes over those of runs the file holds already (an incremental park's): for each
        (start, length, offset), `length` bytes of `data` from `start` go to the file at `offset`."""
        self.file.rewrite_many(data, pieces)

    def pipe(self) -> Splice | None:
        """A pipe into the file (its write end, its capacity), whose bytes `write_piped` takes on.

        Pages can be spliced from the parasite's socket into it and on into
        the page cache: they never enter this process, one copy of the
        three that recv() and write() make. None where the filesystem takes
        no spliced writes: the pages are copied then.
        """
        if self._pipe is None and self._splices:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # beyond the user's pipe quota: the default size works too
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            self._pipe = read_end, write_end, fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
            self._splices = self._takes_splice(read_end, write_end)
            if not self._splices:
                self._close_pipe()
        return None if self._pipe is None else Splice(self, self._pipe[1], self._pipe[2])

    def _takes_splice(self, read_end: int, write_end: int) -> bool:
        """Since Linux 5.10 a filesystem without splice_write (jffs2 on some kernels) refuses spliced writes."""
        os.write(write_end, b"\0")
        try:
            os.splice(read_end, self.file.fd, 1, offset_dst=self.file.size)
        except OSError:
            return False  # a full disk fails again in the copy, with its own message
        try:
            os.ftruncate(self.file.fd, self.file.size)
        except OSError as e:
            raise storage_error(self.path, e) from None
        return True

    def write_piped(self, group: Group, length: int) -> None:
        """Append the next `length` bytes of the group's pages, waiting in the pipe."""
        assert self._pipe is not None, "write_piped without pipe()"
        try:
            while length:
                n = os.splice(self._pipe[0], self.file.fd, length)
                self.file.size += n
                group.count(n)
                self.page_bytes += n
                length -= n
        except OSError as e:
            self._close_pipe()  # it still holds bytes that no longer belong anywhere
            raise storage_error(self.path, e) from None

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    def _reader(self, finished: bool) -> DumpReader:
        self._close_pipe()
        self._buffer = bytearray()  # a daemon holds many dumps for hours: none keeps a megabyte
        heap.release()  # nor does its heap, which keeps what is freed (heap.tune)
        records = sorted(self.records, key=lambda r: r.addr)  # included runs come first
        return PlainReader(self.file, self._header, records, self.page_bytes, finished)

    def close(self) -> str | None:
        self._close_pipe()
        return super().close()


class FramedWriter(Writer):
    """Pages in frames (compressed, checksummed, encrypted), coded on other cores while memcr moves bytes."""

    def __init__(self, file: DumpFile, pid: int, page_size: int, coding: Coding, codec: FrameCodec) -> None:
        super().__init__(file, pid, page_size, coding)
        self.codec = codec
        self._pool: ThreadPoolExecutor = coding_pool(self.codec, encoding=True)
        # file writes in order: a group's header (no run), or a frame of one of its runs being coded from a buffer
        self._pending: deque[tuple[Group, Record | None, Future[list[bytes | memoryview]] | None, bytearray | None]] = (
            deque()
        )
        self._buffers: list[bytearray] = []

    def begin_group(self, runs: Sequence[tuple[int, int]]) -> Group:
        group = super().begin_group(runs)
        group.epoch = self.codec.epoch
        self._pending.append((group, None, None, None))  # after the frames still being coded
        return group

    def buffer(self, size: int) -> memoryview:
        """Where to put the next page bytes for write_payload: given back once its frame is written."""
        return memoryview(self._buffers.pop() if self._buffers else bytearray(FRAME_PLAIN))[:size]

    def write_payload(self, record: Record, data: memoryview) -> None:
        """The next bytes of one run, as one frame: a frame never spans runs, so it goes back to one place."""
        addr = record.addr + record.written
        record.written += len(data)
        self.page_bytes += len(data)
        buffer = data.obj
        assert isinstance(buffer, bytearray), "write_payload takes a view from buffer()"
        self._pending.append((record.group, record, self._pool.submit(self.codec.encode, data, addr), buffer))
        while len(self._pending) > PIPELINE_DEPTH:
            self._write_oldest()

    def end_group(self, group: Group) -> None:
        """No more bytes for this group: it is complete once its frames are written."""
        group.ended = True
        if not any(g is group for g, _, _, _ in self._pending):
            self._finish_group(group)

    def flush(self) -> None:
        while self._pending:
            self._write_oldest()

    def _write_oldest(self) -> None:
        group, record, encoding, buffer = self._pending.popleft()
        if record is None or encoding is None:
            self._write_group_header(group)
        else:
            before = self.file.size
            if record.offset < 0:
                record.offset = before
            for piece in encoding.result():
                self.file.append(piece)
            record.stored += self.file.size - before
            group.stored += self.file.size - before
            if buffer is not None:
                self._buffers.append(buffer)
        if group.ended and not (self._pending and self._pending[0][0] is group):
            self._finish_group(group)

    def _stop_pool(self) -> None:
        self._pool.shutdown(cancel_futures=True)  # while the target stays frozen, no thread waits for work
        self._buffers.clear()
        heap.release()  # the frame buffers

    def _reader(self, finished: bool) -> DumpReader:
        self._stop_pool()
        records = sorted(self.records, key=lambda r: r.addr)  # included runs come first
        return FramedReader(self.file, self._header, records, self.page_bytes, finished, self.codec)

    def close(self) -> str | None:
        self._stop_pool()
        return super().close()


def open_writer(
    directory: Path, pid: int, page_size: int, coding: Coding, kept: DumpReader | None = None
) -> PlainWriter | FramedWriter:
    """A writer of a new dump, or one that adds to `kept`, coded as it is (memcr.park.incremental)."""
    if isinstance(kept, FramedReader):
        return FramedWriter(kept.file, pid, page_size, coding, kept.codec.renewed())
    if kept is not None:
        return PlainWriter(kept.file, pid, page_size, coding)
    file = DumpFile.create(directory, pid)
    try:
        if coding.framed:
            return FramedWriter(file, pid, page_size, coding, FrameCodec(coding, pid))
        return PlainWriter(file, pid, page_size, coding)
    except BaseException:
        file.remove()
        raise
