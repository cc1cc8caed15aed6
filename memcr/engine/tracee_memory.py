"""A frozen process's memory, read and written whatever the protection of its pages."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Protocol

from memcr.engine import ptrace_calls as pt
from memcr.errors import MemcrError, TargetGone
from memcr.system import processes


class Memory(Protocol):
    """The frozen process's memory, whatever the protection of its pages."""

    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...


class ProcMem:
    """/proc/<pid>/mem: any size in one call."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd

    def read(self, addr: int, size: int) -> bytes:
        data = os.pread(self.fd, size, addr)
        if len(data) != size:
            if not processes.alive(self.pid):
                raise TargetGone(f"process {self.pid} is gone", pid=self.pid)
            raise MemcrError(f"short read from process {self.pid} at {addr:#x}: {len(data)} of {size} bytes")
        return data

    def write(self, addr: int, data: bytes | memoryview) -> None:
        if os.pwrite(self.fd, data, addr) != len(data):
            raise MemcrError(f"short write into process {self.pid} at {addr:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PtraceMem:
    """Word by word through PEEKDATA/POKEDATA: /proc/<pid>/mem is 0600 and the
    target's, so with CAP_SYS_PTRACE alone this is the way in."""

    def __init__(self, pid: int, tid: int, word: int, mask: int) -> None:
        self.pid = pid
        self.tid = tid
        self.word = word
        self.mask = mask

    def read(self, addr: int, size: int) -> bytes:
        start = addr & ~(self.word - 1)
        words = b"".join(self._peek(at) for at in range(start, addr + size, self.word))
        return words[addr - start : addr - start + size]

    def write(self, addr: int, data: bytes | memoryview) -> None:
        w = self.word
        start = addr & ~(w - 1)
        end = -(-(addr + len(data)) // w) * w
        # whole words: keep the bytes around `data` in the first and last word
        merged = bytearray(end - start)
        merged[:w] = self._peek(start)
        merged[-w:] = self._peek(end - w)
        merged[addr - start : addr - start + len(data)] = data
        for at in range(start, end, w):
            word = int.from_bytes(merged[at - start : at - start + w], "little")
            self._access(partial(pt.poke, self.tid, at, word))

    def _peek(self, at: int) -> bytes:
        value = self._access(lambda: pt.peek(self.tid, at))
        return (value & self.mask).to_bytes(self.word, "little")

    def _access(self, call: Callable[[], int | None]) -> int:
        try:
            return call() or 0
        except ProcessLookupError:
            raise TargetGone(f"process {self.pid} is gone", pid=self.pid) from None
        except OSError as e:
            raise MemcrError(f"cannot access the memory of process {self.pid}: {e.strerror}", pid=self.pid) from None

    def close(self) -> None:
        pass
