"""The dump file's layout, and the file itself as memcr holds it open.

Layout (little-endian, see docs/dump-format.md):

    header  magic "MEMCRPY\\0", u16 version, u16 header size, u32 page size,
            u32 pid, u32 flags, u64 reserved                      (32 bytes)
    record  u32 kind, u32 runs, u64 addr, u64 length, u64 stored (32 bytes),
            then `runs` entries of u64 addr, u64 length: the runs of pages it
            carries, back to back in `stored` payload bytes; zero padding
            before each record puts a plain payload on a page boundary
    end     a record of kind END: runs 0, addr 0, length = page bytes, stored 0

A dump never outlives the memcr process that wrote it: memcr keeps the
index of what it wrote and checks every record against it before a byte
reaches the target.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memcr.errors import StorageError, TargetError

MAGIC = b"MEMCRPY\0"
VERSION = 2  # dumps never outlive the memcr that wrote them: no reader of another version is needed
HEADER = struct.Struct("<8sHHIIIQ")
RECORD = struct.Struct("<IIQQQ")
RUN = struct.Struct("<QQ")
KIND_PAGES = 1
KIND_END = 2


@dataclass(eq=False, slots=True)  # a kept dump may index many thousands (memcr.park.incremental)
class Record:
    """One run of pages: where it lives in the target and in the file."""

    addr: int
    length: int
    group: Group = field(repr=False)  # the file record that carries it
    offset: int = -1  # of its first byte in the file, once known
    stored: int = 0  # bytes of its in the file (a framed run: its frames)
    written: int = 0  # page bytes handed over so far
    dropped: bool = False
    skip: int = 0  # bytes of its first coded frame before its first (a part of a frame a re-park reused)


class Group:
    """One pages record of the file: the runs it carries, its pages back to back after their table."""

    def __init__(self, runs: Sequence[tuple[int, int]]) -> None:
        self.runs = [Record(addr, length, self) for addr, length in runs]
        self.length = sum(length for _, length in runs)
        self._table = struct.pack(f"<{2 * len(runs)}Q", *(n for run in runs for n in run))
        self.offset = -1  # of the payload in the file, once the header is there
        self.stored = 0  # payload bytes in the file
        self.filled = 0  # runs whose every byte is handed over
        self.ended = False  # all its page bytes are handed over
        self.epoch = b""  # of the park that coded its frames (memcr.dump.codec)

    @property
    def header_size(self) -> int:
        return RECORD.size + RUN.size * len(self.runs)

    @property
    def header(self) -> bytes:
        return RECORD.pack(KIND_PAGES, len(self.runs), self.runs[0].addr, self.length, self.stored) + self._table

    def count(self, length: int) -> None:
        """`length` more bytes of the payload are in the file: they belong to the runs in order (plain)."""
        self.stored += length
        while length:
            run = self.runs[self.filled]
            n = min(length, run.length - run.written)
            run.written += n
            run.stored += n
            length -= n
            if run.written == run.length:
                self.filled += 1


def header(page_size: int, pid: int, flags: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, HEADER.size, page_size, pid, flags, 0)


def end_record(page_bytes: int) -> bytes:
    return RECORD.pack(KIND_END, 0, 0, page_bytes, 0)


def dump_path(directory: Path, pid: int) -> Path:
    return directory / f"pages-{pid}.img"


def storage_error(path: Path, e: OSError) -> StorageError:
    """The StorageError for a failed write of the dump: the errno says whether it is space or rights."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        message = f"no space left for the dump {path}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = f"cannot write the dump {path}: {e.strerror}"
    else:
        message = f"dump file {path}: {e.strerror}"
    return StorageError(message, path=str(path), errno=e.errno, what="dump")


def check_directory(directory: Path) -> None:
    """The dump directory must exist, be a directory and be writable."""
    where = str(directory)
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise StorageError(
            f"dump directory {directory} does not exist", path=where, errno=errno.ENOENT, what="dump-dir"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(
            f"dump directory {directory} is not a directory", path=where, errno=errno.ENOTDIR, what="dump-dir"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        reason = "is on a read-only filesystem" if read_only else "is not writable"
        code = errno.EROFS if read_only else errno.EACCES
        raise StorageError(f"dump directory {directory} {reason}", path=where, errno=code, what="dump-dir")


class DumpFile:
    """The open dump: appended to while writing, read back on restore, deleted at the end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0  # bytes memcr wrote

    @classmethod
    def create(cls, directory: Path, pid: int) -> DumpFile:
        path = dump_path(directory, pid)
        return cls(path, _create(path, pid))

    def append(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            raise storage_error(self.path, e) from None

    def rewrite(self, data: bytes, offset: int) -> None:
        self.rewrite_many(memoryview(data), [(0, len(data), offset)])

    def rewrite_many(self, data: memoryview, pieces: list[tuple[int, int, int]]) -> None:
        """For each (start, length, offset): `length` bytes of `data` from `start` over the file's at `offset`."""
        try:
            for start, length, offset in pieces:
                end = start + length
                while start < end:  # a write cut short by a signal goes on
                    n = os.pwrite(self.fd, data[start:end], offset)
                    start, offset = start + n, offset + n
        except OSError as e:
            raise storage_error(self.path, e) from None

    def stamp(self) -> tuple[int, ...] | None:
        """What changes with any write to the file: inode, size and modification time (None: unreadable).

        A plain dump carries no checksum: a file whose stamp is not the one
        memcr left is someone else's work. Not the change time: deleting
        or renaming the file changes it, and memcr restores from the file
        it holds open then. Times are as fine as the filesystem keeps them
        (since Linux 6.13 ext4 and tmpfs tell writes a tick apart).
        """
        try:
            st = os.fstat(self.fd)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def still_in_place(self) -> bool:
        """Whether the dump's path still names the file memcr wrote."""
        try:
            now, ours = os.lstat(self.path), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)

    def remove(self) -> str | None:
        """Close and delete the dump; it is never needed once the target runs.

        Never raises: it runs while memcr lets a target go. Returns why the
        file could not be deleted (for a warning), or None.
        """
        if self.fd < 0:
            return None
        problem = self.unlink()
        os.close(self.fd)
        self.fd = -1
        return problem

    def unlink(self) -> str | None:
        """Delete the dump's name, if it still names the file memcr wrote; the open file stays readable."""
        if self.fd < 0 or not self.still_in_place():  # someone may have replaced the file: only ours goes
            return None
        try:
            os.unlink(self.path)
        except OSError as e:
            return f"could not delete the dump {self.path}: {e.strerror}; delete it by hand"
        return None


def _create(path: Path, pid: int) -> int:
    """Create the dump 0600, never through a symlink, never over a stranger's file.

    The dump stays locked (flock) while memcr holds it, so that a second
    memcr on the same pid cannot take a live dump for a stale one.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            _remove_stale(path, pid)
            continue  # removed, by this memcr or by the one that finished with it meanwhile
        except OSError as e:
            raise storage_error(path, e) from None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and ours alone: cannot fail
        return fd


def _remove_stale(path: Path, pid: int) -> None:
    """Delete a dump whose memcr died (and whose target the kernel killed with it); refuse anything else.

    A dump another memcr holds locked means that memcr holds the process:
    the refusal is the one its trace gives a memcr that comes a moment
    later (a TargetError, exit 3), so that two memcr started at once on
    one pid end the same way whichever gets where first. The lock is
    tried before the content is judged: the other memcr may not have
    written its header yet.
    """
    try:
        st = os.lstat(path)
        if not _ours(st):
            raise _stranger(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # its memcr finished and removed it
    except OSError as e:
        raise storage_error(path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TargetError(
                f"another memcr holds process {pid}'s dump {path}: it parks that process, or a daemon keeps the "
                "dump for its next park (--incremental); wait for it, park the process through that daemon, or "
                "use another dump directory",
                pid=pid,
                path=str(path),
                errno=errno.EBUSY,
                what="another-memcr",
            ) from None
        if os.pread(fd, len(MAGIC), 0) not in (b"", MAGIC):
            raise _stranger(path)
        # its memcr may have just finished and deleted it, and another made a new one under the same name
        now, locked = os.lstat(path), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
            os.unlink(path)  # while locked: no memcr can take this one for its own meanwhile
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _stranger(path: Path) -> StorageError:
    return StorageError(
        f"{path} already exists and is not a dump memcr left behind: move it away and retry",
        path=str(path),
        errno=errno.EEXIST,
    )


def remove_orphans(directory: Path) -> list[tuple[Path, int]]:
    """Delete the dumps in `directory` that no memcr holds any more (it was killed); each one's path and size.

    A live memcr holds its dump locked (flock) from its creation on, so
    only a dump without a lock is an orphan; an empty file may be one
    being created, and a file without memcr-py's magic is none of its
    business (the C memcr names its dumps the same way).
    """
    removed = []
    try:
        names = sorted(directory.glob("pages-*.img"))
    except OSError:
        return []
    for path in names:
        try:
            st = os.lstat(path)
            if _ours(st) and st.st_size > 0 and _looks_like_dump(path) and _remove_if_orphaned(path):
                removed.append((path, st.st_size))
        except OSError:
            continue  # gone meanwhile, or not ours to read: left alone
    return removed


def _ours(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def _remove_if_orphaned(path: Path) -> bool:
    """Delete `path` if no memcr holds it; False when one does."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # its memcr may have just finished and deleted it, and another made a new one under the same name
        now, locked = os.lstat(path), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
            os.unlink(path)  # while locked: no memcr can take this one for its own meanwhile
        return True
    finally:
        os.close(fd)


def _looks_like_dump(path: Path) -> bool:
    with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
        head = f.read(len(MAGIC))
    return head in (b"", MAGIC)
