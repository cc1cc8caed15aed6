"""Reading a dump back on restore, every record checked against what memcr wrote."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from memcr import heap, libc
from memcr.codec import FRAME, FRAME_PLAIN, FrameCodec, coding_pool
from memcr.dump.format import HEADER, RECORD, DumpFile, Record, end_record
from memcr.errors import DumpError

PIPELINE_DEPTH = 2  # frames being decoded ahead of the one being sent

Frame = tuple[bytes, int, int, int]  # header, offset and length of the stored bytes, page address


class DumpReader:
    """A dump memcr wrote, with the index of its records; owns the open file from here on."""

    def __init__(self, file: DumpFile, header: bytes, records: list[Record], page_bytes: int, finished: bool) -> None:
        self.file = file
        self.records = records
        self.page_bytes = page_bytes
        self.finished = finished  # False: a checkpoint that failed midway
        self._header = header

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def size(self) -> int:
        return self.file.size

    def _damaged(self, what: str) -> DumpError:
        return DumpError(f"the dump {self.path} {what}", path=str(self.path))

    def verified_records(self) -> list[Record]:
        """The runs holding dropped pages, after checking the file still says what we wrote.

        A finished dump is checked whole; an unfinished one (a checkpoint
        being rolled back) up to the records whose pages were dropped.
        """
        dropped = [r for r in self.records if r.dropped]
        fd = self.file.fd
        try:
            size = os.fstat(fd).st_size
            if size != self.size:
                raise self._damaged(f"is {size} bytes, memcr wrote {self.size}: it was modified")
            if os.pread(fd, HEADER.size, 0) != self._header:
                raise self._damaged("has a damaged header")
            for group in dict.fromkeys(r.group for r in dropped):
                head = group.header
                if os.pread(fd, len(head), group.offset - len(head)) != head:
                    raise self._damaged(f"has a damaged record at offset {group.offset}")
            if self.finished and os.pread(fd, RECORD.size, self.size - RECORD.size) != end_record(self.page_bytes):
                raise self._damaged("has a damaged end record")
        except OSError as e:
            raise DumpError(f"cannot read the dump {self.path}: {e.strerror}", path=str(self.path)) from None
        return dropped

    def file_span(self, record: Record) -> tuple[int, int] | None:
        """(descriptor, offset) of the record's pages as they are in the file, if they are stored plain."""
        return None

    def chunks(self, record: Record) -> Iterator[bytes | memoryview]:
        """The record's pages, in order, a frame's worth at a time, each checked before it is yielded."""
        raise NotImplementedError

    def _read_exact(self, offset: int, size: int, end: int) -> bytes:
        if offset + size > end:
            raise self._damaged("has a frame running past its record")
        data = os.pread(self.file.fd, size, offset)
        if len(data) != size:
            raise self._damaged("ends early")
        return data

    def remove(self) -> str | None:
        """Close and delete the dump (the target runs again, or is gone); why it could not be, or None."""
        return self.file.remove()


def _forget(addr: int, length: int) -> None:
    """Drop mapped dump pages from memcr's RSS (the page cache keeps them); a failure only leaves them counted."""
    with contextlib.suppress(OSError):
        libc.madvise(addr, length, mmap.MADV_DONTNEED)


class PlainReader(DumpReader):
    @contextlib.contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[tuple[int, Callable[[int, int], None]]]:
        """(address, done) of the file's bytes from `offset` (page-aligned), mapped read-only while the block runs.

        done(address, length) unmaps the pages of a piece once it is used,
        so that the mapping never counts much of the dump's page cache in
        memcr's RSS.
        """
        try:
            base = libc.mmap(length, mmap.PROT_READ, mmap.MAP_SHARED, self.file.fd, offset)
        except OSError as e:
            raise DumpError(
                f"cannot map the dump {self.path}: {e.strerror}", path=str(self.path), errno=e.errno
            ) from None
        try:
            yield base, _forget
        finally:
            libc.munmap(base, length)

    def file_span(self, record: Record) -> tuple[int, int] | None:
        return self.file.fd, record.offset

    def chunks(self, record: Record) -> Iterator[bytes | memoryview]:
        end = record.offset + record.stored
        for offset in range(0, record.length, FRAME_PLAIN):
            yield self._read_exact(record.offset + offset, min(FRAME_PLAIN, record.length - offset), end)


class FramedReader(DumpReader):
    """Frames are decoded on other cores while the previous ones go to the target."""

    def __init__(
        self, file: DumpFile, header: bytes, records: list[Record], page_bytes: int, finished: bool, codec: FrameCodec
    ) -> None:
        super().__init__(file, header, records, page_bytes, finished)
        self.codec = codec
        self._pool = coding_pool(codec, encoding=False)  # its threads start with the first frame

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The decoding threads: frames are decoded, and may be sent on, there."""
        return self._pool

    def chunks(self, record: Record) -> Iterator[bytes | memoryview]:
        decoding: deque[Future[bytes | memoryview]] = deque()
        for frame in self.frames(record):
            decoding.append(self._pool.submit(self.decode, frame))
            if len(decoding) > PIPELINE_DEPTH:
                yield decoding.popleft().result()
        while decoding:
            yield decoding.popleft().result()

    def remove(self) -> str | None:
        self._pool.shutdown(cancel_futures=True)
        heap.release()  # the frame buffers
        return super().remove()

    def frames(self, record: Record) -> Iterator[Frame]:
        """Where each frame of the record is: (header, offset and length of its stored bytes, page address).

        A damaged index raises once the frames read so far have been handed out.
        """
        offset, end, done = record.offset, record.offset + record.stored, 0
        head_len = FRAME.size + self.codec.digest_len
        while done < record.length:
            head = self._read_exact(offset, head_len, end)
            plain_len, stored_len, _ = self.codec.parse_header(head)
            if offset + head_len + stored_len > end or done + plain_len > record.length:
                break
            yield head, offset + head_len, stored_len, record.addr + done
            done += plain_len
            offset += head_len + stored_len
        if done != record.length or offset != end:
            raise self._damaged(f"has a damaged record at offset {record.offset}")

    def decode(self, frame: Frame) -> bytes | memoryview:
        """A frame's pages, checked; safe from any thread."""
        head, offset, stored_len, addr = frame
        stored = self._read_exact(offset, stored_len, offset + stored_len)
        return self.codec.decode(head, stored, addr)
