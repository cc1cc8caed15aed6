"""Reading a dump back on restore, every record checked against what memcr wrote."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from memcr.dump.codec import FRAME, FRAME_PLAIN, FrameCodec, coding_pool, submit
from memcr.dump.format import HEADER, RECORD, DumpFile, Record, end_record
from memcr.errors import DumpError, MemcrError
from memcr.system import heap, libc

PIPELINE_DEPTH = 2  # frames being decoded ahead of the one being sent
WHOLE = 1 << 62  # a size no record reaches: a copy of a coded frame takes it whole, it is decoded whole anyway


class Frame(NamedTuple):
    """A stretch of a record's pages stored in one place of the file: a coded frame, or pages as they are."""

    addr: int  # page address of its first byte
    length: int  # bytes of pages it holds
    offset: int  # where its stored bytes begin in the file
    stored: int  # how many bytes of it the file holds (plain: fewer than `length` in a record cut short)
    header: bytes = b""  # a coded frame's header, checked when it is decoded
    skip: int = 0  # a coded frame's bytes before `addr` that are not its record's (memcr.park.incremental)
    epoch: bytes = b""  # a coded frame's: of the park that wrote it (memcr.dump.codec)
    whole: int = 0  # a coded frame's: the bytes of pages it decodes to, `length` and more (0: `length`)


class Pages(ABC):
    """A window of the dump's frames, readable at an address of memcr's while it is open."""

    @abstractmethod
    def at(self, frame: Frame, start: int, length: int) -> contextlib.AbstractContextManager[int]:
        """The address of `length` page bytes of `frame` from `start` on, good while the block runs."""

    @contextlib.contextmanager
    def each(self, frames: list[Frame]) -> Iterator[list[int]]:
        """The address of each frame's page bytes (in file order), good while the block runs."""
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(self.at(f, 0, f.length)) for f in frames]


class DumpReader(ABC):
    """A dump memcr wrote, with the index of its records; owns the open file from here on.

    How its pages are stored (plain or in coded frames) stays in here:
    a consumer walks a record's `frames`, opens a window of them
    (`readable`) and copies from the addresses it gives.
    """

    def __init__(self, file: DumpFile, header: bytes, records: list[Record], page_bytes: int, finished: bool) -> None:
        self.file = file
        self.records = records
        self.page_bytes = page_bytes
        self.finished = finished  # False: a checkpoint that failed midway
        self._header = header
        self.stamp = file.stamp()  # as memcr left it (DumpFile.stamp): checked before any page goes back

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
            if self.file.stamp() != self.stamp:  # the checks above name the damage where they see it
                raise self._damaged("was written to since memcr wrote it")
        except OSError as e:
            raise DumpError(f"cannot read the dump {self.path}: {e.strerror}", path=str(self.path)) from None
        return dropped

    def file_span(self, record: Record) -> tuple[int, int] | None:
        """(descriptor, offset) of the record's pages as they are in the file, if they are stored plain."""
        return None

    @abstractmethod
    def frames(self, record: Record, size: int) -> Iterator[Frame]:
        """The record's pages in the stretches a copy takes from one place: plain, at most `size` bytes each;
        coded, one per frame (whatever `size`).

        A damaged index raises once the frames read so far have been handed out.
        """

    @abstractmethod
    def copy_size(self, wanted: int) -> int:
        """The bytes one copy should take where the caller would take `wanted`: a coded frame goes whole."""

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        """Threads the frames are best read on (they decode there), or None: the caller's choice."""
        return None

    @abstractmethod
    def windows(self, frames: list[Frame], limit: int) -> list[list[Frame]]:
        """`frames` (in file order) in runs to open one at a time: no run maps much more than `limit` bytes."""

    @abstractmethod
    def readable(self, frames: list[Frame]) -> contextlib.AbstractContextManager[Pages]:
        """The frames' bytes, readable in memcr while the block runs (mapped, or decoded as asked for)."""

    @abstractmethod
    def decode(self, frame: Frame) -> bytes | memoryview:
        """A frame's pages, checked; safe from any thread."""

    def chunks(self, record: Record) -> Iterator[bytes | memoryview]:
        """The record's pages, in order, a frame's worth at a time, each checked before it is yielded."""
        for frame in self.frames(record, FRAME_PLAIN):
            yield self.decode(frame)

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


class _Mapped(Pages):
    """Frames of a plain dump, mapped read-only from the file offset `low` on."""

    def __init__(self, base: int, low: int) -> None:
        self._base = base
        self._low = low

    @contextlib.contextmanager
    def at(self, frame: Frame, start: int, length: int) -> Iterator[int]:
        at = self._base + frame.offset - self._low + start
        try:
            yield at
        finally:
            # the page cache stays; memcr's RSS does not count it once its use is over
            first = at - at % mmap.PAGESIZE
            with contextlib.suppress(OSError):  # only a hint: a failure leaves the pages counted
                libc.madvise(first, at + length - first, mmap.MADV_DONTNEED)

    @contextlib.contextmanager
    def each(self, frames: list[Frame]) -> Iterator[list[int]]:
        """As `at` for each frame, with one madvise for them all: many are a page each."""
        if not frames:
            yield []
            return
        addresses = [self._base + f.offset - self._low for f in frames]
        try:
            yield addresses
        finally:
            first = min(addresses)
            first -= first % mmap.PAGESIZE
            end = max(a + f.length for a, f in zip(addresses, frames, strict=True))
            with contextlib.suppress(OSError):
                libc.madvise(first, end - first, mmap.MADV_DONTNEED)


class _Nothing(Pages):
    """No frames: nothing to read."""

    def at(self, frame: Frame, start: int, length: int) -> contextlib.AbstractContextManager[int]:
        raise MemcrError(f"internal error: no frame holds {frame.addr + start:#x}+{length:#x}")


class PlainReader(DumpReader):
    """Pages as they are: a copy reads them from a mapping of the file."""

    def file_span(self, record: Record) -> tuple[int, int] | None:
        return self.file.fd, record.offset

    def frames(self, record: Record, size: int) -> Iterator[Frame]:
        for at in range(0, record.length, size):
            length = min(size, record.length - at)
            yield Frame(record.addr + at, length, record.offset + at, max(0, min(length, record.stored - at)))

    def copy_size(self, wanted: int) -> int:
        return wanted

    def windows(self, frames: list[Frame], limit: int) -> list[list[Frame]]:
        windows: list[list[Frame]] = [[]]
        for frame in frames:
            current = windows[-1]
            if current and frame.offset + frame.length - current[0].offset > limit:
                windows.append(current := [])
            current.append(frame)
        return windows

    @contextlib.contextmanager
    def readable(self, frames: list[Frame]) -> Iterator[Pages]:
        """Mapped read-only; each piece's pages are unmapped once used (`Pages.at`), so that the mapping
        never counts much of the dump's page cache in memcr's RSS."""
        if not frames:
            yield _Nothing()
            return
        low = min(f.offset for f in frames)  # a record's payload starts on a page boundary of the file
        length = max(f.offset + f.length for f in frames) - low
        try:
            base = libc.mmap(length, mmap.PROT_READ, mmap.MAP_SHARED, self.file.fd, low)
        except OSError as e:
            raise DumpError(
                f"cannot map the dump {self.path}: {e.strerror}", path=str(self.path), errno=e.errno
            ) from None
        try:
            yield _Mapped(base, low)
        finally:
            libc.munmap(base, length)

    def decode(self, frame: Frame) -> bytes | memoryview:
        return self._read_exact(frame.offset, frame.length, frame.offset + frame.stored)


class _Decoded(Pages):
    """Frames of a coded dump, each decoded when asked for.

    Each thread keeps the two frames it decoded last: the records of a
    dump an incremental re-park added to may take a frame in several parts,
    which come one after another in the file, and by address with a page of
    a newer frame between two.
    """

    def __init__(self, dump: FramedReader) -> None:
        self._dump = dump
        self._last = threading.local()

    @contextlib.contextmanager
    def at(self, frame: Frame, start: int, length: int) -> Iterator[int]:
        if not 0 <= start <= start + length <= frame.length:
            raise MemcrError(f"internal error: no frame holds {frame.addr + start:#x}+{length:#x}")
        last: dict[int, bytes] = self._last.__dict__.setdefault("frames", {})
        data = last.get(frame.offset)
        if data is None:
            decoded = self._dump.decode_whole(frame)
            # ctypes gives the address of bytes, not of a view
            data = decoded.tobytes() if isinstance(decoded, memoryview) else decoded
            if len(last) >= 2:
                del last[next(iter(last))]
            last[frame.offset] = data
        buffer = ctypes.c_char_p(data)
        yield (ctypes.cast(buffer, ctypes.c_void_p).value or 0) + frame.skip + start


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
        for frame in self.frames(record, FRAME_PLAIN):
            # decoded here where no thread could start for it (a task limit): a restore that failed for want of a
            # thread would kill the target
            decoding.append(submit(self._pool, self.decode, frame))
            if len(decoding) > PIPELINE_DEPTH:
                yield decoding.popleft().result()
        while decoding:
            yield decoding.popleft().result()

    def remove(self) -> str | None:
        self._pool.shutdown(cancel_futures=True)
        heap.release()  # the frame buffers
        return super().remove()

    def rest(self) -> None:
        """Let the decoding threads end (a kept dump waits for its next park); new ones start when needed."""
        self._pool.shutdown()
        self._pool = coding_pool(self.codec, encoding=False)

    def frames(self, record: Record, size: int) -> Iterator[Frame]:
        """A record's frames; the first and the last may hold pages before and after it (`Record.skip`)."""
        offset, end, done = record.offset, record.offset + record.stored, 0
        head_len = FRAME.size + self.codec.digest_len
        need = record.skip + record.length  # bytes of its frames, from the first one's first
        while done < need:
            head = self._read_exact(offset, head_len, end)
            plain_len, stored_len, _ = self.codec.parse_header(head)
            low, high = max(done, record.skip), min(done + plain_len, need)
            if offset + head_len + stored_len > end or low >= high:
                break
            at = record.addr + low - record.skip
            yield Frame(at, high - low, offset + head_len, stored_len, head, low - done, record.group.epoch, plain_len)
            done += plain_len
            offset += head_len + stored_len
        if done < need or offset != end:
            raise self._damaged(f"has a damaged record at offset {record.offset}")

    def copy_size(self, wanted: int) -> int:
        return WHOLE

    def windows(self, frames: list[Frame], limit: int) -> list[list[Frame]]:
        return [frames]  # nothing is mapped

    @contextlib.contextmanager
    def readable(self, frames: list[Frame]) -> Iterator[Pages]:
        yield _Decoded(self)

    def decode(self, frame: Frame) -> bytes | memoryview:
        data = self.decode_whole(frame)
        if frame.skip == 0 and len(data) == frame.length:
            return data
        return memoryview(data)[frame.skip : frame.skip + frame.length]

    def decode_whole(self, frame: Frame) -> bytes | memoryview:
        """All the pages of the coded frame `frame` lies in, checked."""
        stored = self._read_exact(frame.offset, frame.stored, frame.offset + frame.stored)
        return self.codec.decode(frame.header, stored, frame.addr - frame.skip, frame.epoch)
