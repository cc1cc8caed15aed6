"""Putting dumped pages back into a stopped target: every core copies, nobody waits.

memcr writes straight into the target with process_vm_writev: a plain dump
from read-only mappings of the file, piece by piece (one copy, page cache
to the target's pages, which the kernel faults in on the way), a framed
one from each frame as it is decoded. The target is stopped, so its cores are free: each
memcr thread takes its own pieces. Kernels without process_vm_writev get
the parasite's RECV instead (memcr.parked), slower but the same bytes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from memcr import process_vm
from memcr.dump.format import Record
from memcr.dump.reader import DumpReader, Frame, FramedReader, PlainReader

PIECE = 2 << 20  # bytes per process_vm_writev: a huge page, small enough to share out evenly


def upload(pid: int, dump: DumpReader, records: list[Record]) -> None:
    """Write the pages of `records` into the target; process_vm.Unavailable before a byte moved if it cannot."""
    if not records:
        return
    if isinstance(dump, PlainReader):
        pieces = [
            (r.addr + at, r.offset + at, min(PIECE, r.length - at)) for r in records for at in range(0, r.length, PIECE)
        ]
        with dump.mapped() as (base, done):
            # the first piece alone: a kernel without process_vm_writev is found before anything is half done
            _write_piece(pid, base, done, *pieces[0])
            with ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="memcr-upload") as pool:
                _all([pool.submit(_write_piece, pid, base, done, *piece) for piece in pieces[1:]])
    elif isinstance(dump, FramedReader):
        # every frame located before any is written: a damaged index changes nothing in the target
        frames = [frame for r in records for frame in dump.frames(r)]
        _write_frame(pid, dump, frames[0])
        _all([dump.pool.submit(_write_frame, pid, dump, frame) for frame in frames[1:]])
    else:
        raise TypeError(f"no upload for {type(dump).__name__}")


def _write_piece(pid: int, base: int, done: Callable[[int, int], None], addr: int, offset: int, size: int) -> None:
    process_vm.write(pid, addr, base + offset, size)
    done(offset, size)


def _write_frame(pid: int, dump: FramedReader, frame: Frame) -> None:
    data = dump.decode(frame)
    if isinstance(data, memoryview):
        data = data.tobytes()  # ctypes gives the address of bytes, not of a view
    process_vm.write(pid, frame[3], ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0, len(data))


def _all(futures: list[Future[None]]) -> None:
    """Wait for every piece; then the first failure, if any, is raised."""
    wait(futures)
    for future in futures:
        future.result()
