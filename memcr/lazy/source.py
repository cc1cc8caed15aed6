"""The dump's bytes for the pieces of a lazy restore."""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
from collections.abc import Iterator

from memcr.dump.format import Record
from memcr.dump.reader import WHOLE, DumpReader
from memcr.errors import DumpError, MemcrError
from memcr.lazy.space import Piece

FAULT_PIECE = 256 << 10  # bytes a fault brings in: its neighbours come along, and it stays short
FILL_PIECE = 1 << 20  # bytes per background copy: 8 restores at once hold 8 MiB of the dump mapped, not 16


class Source:
    """The dump's bytes for a piece, at an address UFFDIO_COPY can read."""

    def __init__(self, dump: DumpReader, records: list[Record], page_size: int) -> None:
        self.dump = dump
        self.page_size = page_size
        # one frame per record where the dump is plain, one per coded frame
        self._frames = sorted((f for r in records for f in dump.frames(r, WHOLE)), key=lambda f: f.addr)
        self._open = contextlib.ExitStack()
        self._pages = self._open.enter_context(dump.readable(self._frames))

    @property
    def fault_piece(self) -> int:
        return self.dump.copy_size(FAULT_PIECE)

    @property
    def fill_piece(self) -> int:
        return self.dump.copy_size(FILL_PIECE)

    def pieces(self) -> list[Piece]:
        """One piece per record, or per frame: a copy never takes bytes from two."""
        return [Piece(f.addr, f.addr + f.length, f.addr) for f in self._frames]

    @contextlib.contextmanager
    def bytes_at(self, origin: int, length: int) -> Iterator[int]:
        """The address of `length` dump bytes for the pages at dump address `origin`, checked where the dump can be."""
        frame = self._frames[bisect.bisect_right(self._frames, origin, key=lambda f: f.addr) - 1]
        with self._pages.at(frame, origin - frame.addr, length) as address:
            yield address

    def unreadable(self, origin: int, length: int) -> MemcrError:
        """Why UFFDIO_COPY could not read the dump's bytes for `origin` (EFAULT): most likely it was cut short."""
        try:
            size = os.fstat(self.dump.file.fd).st_size
        except OSError as e:
            return DumpError(f"cannot read the dump {self.dump.path}: {e.strerror}", path=str(self.dump.path))
        if size < self.dump.size:
            return DumpError(
                f"the dump {self.dump.path} ends early: it is {size} bytes, memcr wrote {self.dump.size} "
                "(it was cut short while its pages were coming back)",
                path=str(self.dump.path),
            )
        return MemcrError(f"cannot read the dump's bytes for {origin:#x}+{length:#x}: {os.strerror(errno.EFAULT)}")

    def close(self) -> None:
        self._open.close()
