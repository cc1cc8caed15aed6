"""The dump file: a header, one record per run of pages, an end record.

Layout (little-endian, see docs/dump-format.md):

    header  magic "MEMCRPY\\0", u16 version, u16 header size, u32 page size,
            u32 pid, u32 flags, u64 reserved                      (32 bytes)
    record  u32 kind, u32 flags, u64 addr, u64 length, u64 stored (32 bytes)
            followed by `stored` payload bytes; zero padding before each
            record puts its payload on a page boundary of the file
    end     a record of kind END: addr 0, length = page bytes, stored 0

A dump never outlives the memcr process that wrote it: memcr keeps the
index of what it wrote and checks every record against it before a byte
reaches the target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from memcr import heap
from memcr.codec import FRAME, FRAME_PLAIN, DumpOptions, FrameCodec
from memcr.errors import DumpError, StorageError

MAGIC = b"MEMCRPY\0"
VERSION = 1
HEADER = struct.Struct("<8sHHIIIQ")
RECORD = struct.Struct("<IIQQQ")
KIND_PAGES = 1
KIND_END = 2
PIPELINE_DEPTH = 2  # frames queued or being coded: bounds memory
PIPE_SIZE = 1 << 20  # the kernel's default limit for an unprivileged pipe


@dataclass
class Record:
    """One run of pages: where it lives in the target and in the file."""

    addr: int
    length: int
    offset: int = -1  # of the payload in the file, once its header is there
    stored: int = 0  # payload bytes in the file
    written: int = 0  # page bytes handed over so far
    ended: bool = False  # all its page bytes are handed over
    dropped: bool = False

    @property
    def header(self) -> bytes:
        return RECORD.pack(KIND_PAGES, 0, self.addr, self.length, self.stored)


def dump_path(directory: Path, pid: int) -> Path:
    return directory / f"pages-{pid}.img"


def storage_error(path: Path, e: OSError) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left for the dump {path}: free space or use -d on a larger filesystem")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write the dump {path}: {e.strerror}; choose a writable directory with -d")
    return StorageError(f"dump file {path}: {e.strerror}")


def check_directory(directory: Path) -> None:
    """The dump directory must exist, be a directory and be writable."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise StorageError(f"dump directory {directory} does not exist: create it or choose another with -d") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"dump directory {directory} is not a directory: choose a directory with -d")
    if not os.access(directory, os.W_OK | os.X_OK):
        reason = "is on a read-only filesystem" if _read_only(directory) else "is not writable"
        raise StorageError(f"dump directory {directory} {reason}: choose a writable directory with -d")


def _read_only(directory: Path) -> bool:
    return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)


def _create(path: Path) -> int:
    """Create the dump 0600, never through a symlink, never over a stranger's file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise storage_error(path, e) from None
    st = os.lstat(path)
    ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1
    if not ours or not _looks_like_dump(path):
        raise StorageError(f"{path} already exists and is not a dump memcr left behind: move it away and retry")
    # a dump whose memcr died (and whose target the kernel killed): stale
    os.unlink(path)
    return _create(path)


def _looks_like_dump(path: Path) -> bool:
    with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
        head = f.read(len(MAGIC))
    return head in (b"", MAGIC)


@dataclass
class DumpFile:
    """A dump being written, then read back, by one memcr process."""

    path: Path
    pid: int
    page_size: int
    options: DumpOptions
    fd: int = -1
    records: list[Record] = field(default_factory=list)
    size: int = 0
    page_bytes: int = 0
    finished: bool = False

    codec: FrameCodec | None = None
    _pool: ThreadPoolExecutor | None = None
    # file writes in order: a record's header (None), or one of its frames being coded from a buffer
    _pending: deque[tuple[Record, Future[list[bytes | memoryview]] | None, memoryview | None]] = field(
        default_factory=deque
    )
    _complete: list[Record] = field(default_factory=list)
    _buffers: list[bytearray] = field(default_factory=list)
    _pipe: tuple[int, int, int] | None = None  # read end, write end, capacity
    _splices: bool = True

    @classmethod
    def create(cls, directory: Path, pid: int, page_size: int, options: DumpOptions) -> DumpFile:
        path = dump_path(directory, pid)
        dump = cls(path, pid, page_size, options, _create(path))
        if options.framed:
            dump.codec = FrameCodec(options, pid)
        dump._write(dump._header)
        return dump

    @property
    def _header(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, HEADER.size, self.page_size, self.pid, self.options.flags, 0)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            raise storage_error(self.path, e) from None

    def begin_pages(self, addr: int, length: int) -> Record:
        record = Record(addr, length)
        self.records.append(record)
        if self.codec:
            self._pending.append((record, None, None))  # after the frames still being coded
            return record
        # zero padding puts the payload on a page boundary of the file, so
        # sendfile() hands whole page-cache pages to the socket on restore
        pad = -(self.size + RECORD.size) % self.page_size
        if pad:
            self._write(bytes(pad))
        self._write_record_header(record)
        return record

    def buffer(self, size: int) -> memoryview:
        """Where to put the next page bytes for write_payload: reused once written."""
        if not self._buffers:
            self._buffers.append(bytearray(FRAME_PLAIN))
        if self.codec:
            return memoryview(self._buffers.pop())[:size]  # given back once its frame is written
        return memoryview(self._buffers[0])[:size]

    def write_payload(self, record: Record, data: memoryview) -> None:
        """Append the next bytes of the record's pages, from buffer()."""
        addr = record.addr + record.written
        record.written += len(data)
        self.page_bytes += len(data)
        if self.codec is None:
            self._write(data)
            record.stored += len(data)
            return
        self._pending.append((record, self._codec_pool(encoding=True).submit(self.codec.encode, data, addr), data))
        while len(self._pending) > PIPELINE_DEPTH:
            self._write_oldest()

    def end_pages(self, record: Record) -> None:
        """No more bytes for this record: it is complete once its frames are written."""
        record.ended = True
        if not any(r is record for r, _, _ in self._pending):
            self._finish_record(record)

    def completed(self) -> list[Record]:
        """The records whose pages are all in the file since the last call: theirs may be dropped."""
        done, self._complete = self._complete, []
        return done

    def flush(self) -> None:
        """Write every frame still being coded."""
        while self._pending:
            self._write_oldest()

    def pipe(self) -> tuple[int, int] | None:
        """(write end, capacity) of a pipe into the file, for write_piped.

        A plain dump's pages can be spliced from the parasite's socket into
        it and on into the page cache: they never enter this process, one
        copy of the three that recv() and write() make. None where the
        filesystem takes no spliced writes: the pages are copied then.
        """
        assert self.codec is None
        if self._pipe is None and self._splices:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # beyond the user's pipe quota: the default size works too
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            self._pipe = read_end, write_end, fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
            self._splices = self._takes_splice()
            if not self._splices:
                self._close_pipe()
        return None if self._pipe is None else (self._pipe[1], self._pipe[2])

    def _takes_splice(self) -> bool:
        """Since Linux 5.10 a filesystem without splice_write (jffs2 on some kernels) refuses spliced writes."""
        assert self._pipe is not None
        os.write(self._pipe[1], b"\0")
        try:
            os.splice(self._pipe[0], self.fd, 1, offset_dst=self.size)
        except OSError:
            return False  # a full disk fails again in the copy, with its own message
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            raise storage_error(self.path, e) from None
        return True

    def write_piped(self, record: Record, length: int) -> None:
        """Append the next `length` bytes of the record's pages, waiting in the pipe."""
        assert self._pipe is not None
        try:
            while length:
                n = os.splice(self._pipe[0], self.fd, length)
                self.size += n
                record.stored += n
                record.written += n
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

    def _write_oldest(self) -> None:
        record, encoding, buffer = self._pending.popleft()
        if encoding is None:
            self._write_record_header(record)
        else:
            before = self.size
            for piece in encoding.result():
                self._write(piece)
            record.stored += self.size - before
            assert buffer is not None
            self._buffers.append(buffer.obj)  # type: ignore[arg-type]
        if record.ended and not (self._pending and self._pending[0][0] is record):
            self._finish_record(record)

    def _write_record_header(self, record: Record) -> None:
        record.offset = self.size + RECORD.size
        self._write(record.header)  # stored length still 0: rewritten by _finish_record

    def _finish_record(self, record: Record) -> None:
        try:
            os.pwrite(self.fd, record.header, record.offset - RECORD.size)
        except OSError as e:
            raise storage_error(self.path, e) from None
        self._complete.append(record)

    def finish(self) -> None:
        self.flush()
        self._write(RECORD.pack(KIND_END, 0, 0, self.page_bytes, 0))
        self.finished = True
        self._buffers.clear()  # a daemon holds many dumps for hours: none keeps a megabyte it no longer needs
        self._close_pipe()
        self._stop_pool()  # while the target stays frozen, no thread waits for work

    def _codec_pool(self, encoding: bool) -> ThreadPoolExecutor:
        """The codecs release the GIL: frames are coded on other cores while this thread moves bytes.

        Moving the bytes takes about one core (this thread and the parasite,
        mostly in the kernel). Coding that is faster leaves it that core: a
        thread more would only slow the transfer down. Slower coding takes
        every core.
        """
        assert self.codec is not None
        if self._pool is None:
            cores = len(os.sched_getaffinity(0))
            workers = cores if self.codec.slower_than_transfer(encoding) else max(1, cores - 1)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memcr-codec")
        return self._pool

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
            heap.release()  # the frame buffers

    def verified_records(self) -> list[Record]:
        """The records holding dropped pages, after checking the file still says what we wrote.

        A finished dump is checked whole; an unfinished one (a checkpoint
        being rolled back) up to the records whose pages were dropped.
        """
        dropped = [r for r in self.records if r.dropped]
        try:
            size = os.fstat(self.fd).st_size
            if size != self.size:
                raise DumpError(f"the dump {self.path} is {size} bytes, memcr wrote {self.size}: it was modified")
            if os.pread(self.fd, HEADER.size, 0) != self._header:
                raise DumpError(f"the dump {self.path} has a damaged header")
            for record in dropped:
                if os.pread(self.fd, RECORD.size, record.offset - RECORD.size) != record.header:
                    raise DumpError(f"the dump {self.path} has a damaged record at offset {record.offset}")
            if self.finished and os.pread(self.fd, RECORD.size, self.size - RECORD.size) != RECORD.pack(
                KIND_END, 0, 0, self.page_bytes, 0
            ):
                raise DumpError(f"the dump {self.path} has a damaged end record")
        except OSError as e:
            raise DumpError(f"cannot read the dump {self.path}: {e.strerror}") from None
        return dropped

    def plain_chunks(self, record: Record) -> Iterator[bytes | memoryview]:
        """A framed record's pages, in order, each frame checked before it is yielded."""
        pool = self._codec_pool(encoding=False)
        decoding: deque[Future[bytes | memoryview]] = deque()
        for frame in self._frames(record):
            decoding.append(pool.submit(self._decode, *frame))
            if len(decoding) > PIPELINE_DEPTH:
                yield decoding.popleft().result()
        while decoding:
            yield decoding.popleft().result()

    def plain_pieces(self, record: Record) -> Iterator[bytes]:
        """A plain record's pages, a frame's worth at a time."""
        end = record.offset + record.stored
        for offset in range(0, record.length, FRAME_PLAIN):
            yield self._read_exact(record.offset + offset, min(FRAME_PLAIN, record.length - offset), end)

    def _frames(self, record: Record) -> Iterator[tuple[bytes, int, int, int]]:
        """(header, offset and length of the stored bytes, page address) of each frame."""
        assert self.codec is not None
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
            raise DumpError(f"the dump {self.path} has a damaged record at offset {record.offset}")

    def _decode(self, head: bytes, offset: int, stored_len: int, addr: int) -> bytes | memoryview:
        assert self.codec is not None
        stored = self._read_exact(offset, stored_len, offset + stored_len)
        return self.codec.decode(head, stored, addr)

    def _read_exact(self, offset: int, size: int, end: int) -> bytes:
        if offset + size > end:
            raise DumpError(f"the dump {self.path} has a frame running past its record")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise DumpError(f"the dump {self.path} ends early")
        return data

    def close(self) -> None:
        self._stop_pool()
        self._close_pipe()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def still_in_place(self) -> bool:
        """Whether the dump's path still names the file memcr wrote."""
        try:
            now, ours = os.lstat(self.path), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)

    def remove(self) -> None:
        """Close and delete the dump; it is never needed once the target runs."""
        if self.fd < 0:
            return
        # someone may have replaced the file: delete only the one we wrote
        ours = self.still_in_place()
        self.close()
        if ours:
            os.unlink(self.path)
