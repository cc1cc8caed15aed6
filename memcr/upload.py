"""Putting dumped pages back into a stopped target: every core copies, nobody waits.

memcr writes straight into the target with process_vm_writev: a plain dump
from read-only mappings of the file, piece by piece (one copy, page cache
to the target's pages, which the kernel faults in on the way), a framed
one from each frame as it is decoded. The target is stopped, so its cores are free: each
memcr thread takes its own pieces. Kernels without process_vm_writev get
the parasite's RECV instead (memcr.parked), slower but the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from memcr import process_vm
from memcr.dump.format import Record
from memcr.dump.reader import DumpReader, Frame, FramedReader, PlainReader
from memcr.errors import DumpError

PIECE = 2 << 20  # bytes per process_vm_writev: a huge page, small enough to share out evenly
WINDOW = 32 << 20  # bytes of the dump mapped at a time: a 32-bit memcr has little address space
INLINE = 4 << 20  # bytes written by the calling thread alone: starting threads would take longer

Piece = tuple[int, int, int]  # target address, file offset, length
Progress = Callable[[int, int], None]  # (bytes done, bytes in all), as memcr.checkpoint's


class Tally:
    """Bytes written back so far, summed over every thread that writes, for a Progress callback.

    The callback (a progress bar) is called under a lock, one call at a
    time, with figures that only grow.
    """

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            self.done += size
            self._progress(self.done, self.total)


def upload(pid: int, dump: DumpReader, records: list[Record], tally: Tally | None = None) -> None:
    """Write the pages of `records` into the target, adding each piece to `tally` once it is in.

    process_vm.Unavailable, before a byte moved, when this way cannot even
    start (no process_vm_writev, no room to map the dump): the caller then
    takes the parasite's way.
    """
    if not records:
        return
    if isinstance(dump, PlainReader):
        pieces = [
            (r.addr + at, r.offset + at, min(PIECE, r.length - at)) for r in records for at in range(0, r.length, PIECE)
        ]
        windows = _windows(pieces)
        if sum(r.length for r in records) <= INLINE:
            for i, window in enumerate(windows):
                _plain_window(pid, dump, window, None, tally, first=i == 0)
            return
        with ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="memcr-upload") as pool:
            for i, window in enumerate(windows):
                _plain_window(pid, dump, window, pool, tally, first=i == 0)
    elif isinstance(dump, FramedReader):
        # every frame located before any is written: a damaged index changes nothing in the target
        frames = [frame for r in records for frame in dump.frames(r)]
        _starting(lambda: _write_frame(pid, dump, frames[0], tally))
        _all([_submit(dump.pool, _write_frame, pid, dump, frame, tally) for frame in frames[1:]])
    else:
        raise TypeError(f"no upload for {type(dump).__name__}")


def _windows(pieces: list[Piece]) -> list[list[Piece]]:
    """Runs of pieces (in file order) whose span is about WINDOW bytes."""
    windows: list[list[Piece]] = [[]]
    for piece in pieces:
        current = windows[-1]
        if current and piece[1] + piece[2] - current[0][1] > WINDOW:
            windows.append(current := [])
        current.append(piece)
    return windows


def _plain_window(
    pid: int, dump: PlainReader, window: list[Piece], pool: ThreadPoolExecutor | None, tally: Tally | None, first: bool
) -> None:
    low = window[0][1]
    high = window[-1][1] + window[-1][2]

    def write(addr: int, offset: int, size: int) -> None:
        local = base + offset - low
        process_vm.write(pid, addr, local, size)
        done(local, size)
        if tally:
            tally.add(size)

    with _mapped(dump, low, high - low, first) as (base, done):
        rest = window
        if first:
            # the first piece alone: a way that cannot work is found before anything is half done
            _starting(lambda: write(*window[0]))
            rest = window[1:]
        _all([_submit(pool, write, *piece) for piece in rest])


def _mapped(
    dump: PlainReader, offset: int, length: int, first: bool
) -> contextlib.AbstractContextManager[tuple[int, Callable[[int, int], None]]]:
    try:
        return dump.mapped(offset, length)
    except DumpError as e:
        if first:
            raise process_vm.Unavailable(str(e), errno=e.errno) from e
        raise


def _starting(work: Callable[[], None]) -> None:
    """The first write: any failure there means this way does not work here, and nothing was written."""
    try:
        work()
    except process_vm.Unavailable:
        raise
    except OSError as e:
        raise process_vm.Unavailable(f"process_vm_writev failed: {e.strerror}", errno=e.errno) from e


def _submit(pool: ThreadPoolExecutor | None, work: Callable[..., None], *args: object) -> Future[None]:
    """Hand the work to a thread; without a pool, or where no thread can be started (a task limit), do it here."""
    try:
        if pool is not None:
            return pool.submit(work, *args)
    except RuntimeError:
        pass
    done: Future[None] = Future()
    try:
        work(*args)
        done.set_result(None)
    except BaseException as e:
        done.set_exception(e)
    return done


def _write_frame(pid: int, dump: FramedReader, frame: Frame, tally: Tally | None) -> None:
    data = dump.decode(frame)
    if isinstance(data, memoryview):
        data = data.tobytes()  # ctypes gives the address of bytes, not of a view
    process_vm.write(pid, frame[3], ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0, len(data))
    if tally:
        tally.add(len(data))


def _all(futures: list[Future[None]]) -> None:
    """Wait for every piece; then the first failure, if any, is raised."""
    wait(futures)
    for future in futures:
        future.result()
