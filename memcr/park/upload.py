"""Putting dumped pages back into a stopped target: every core copies, nobody waits.

memcr writes straight into the target with process_vm_writev: a plain dump
from read-only mappings of the file, piece by piece (one copy, page cache
to the target's pages, which the kernel faults in on the way), a framed
one from each frame as it is decoded. The target is stopped, so its cores are free: each
memcr thread takes its own pieces. Kernels without process_vm_writev get
the parasite's RECV instead (memcr.park.parked), slower but the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

from memcr.dump.codec import submit
from memcr.dump.format import Record
from memcr.dump.reader import DumpReader, Frame, Pages
from memcr.errors import DumpError
from memcr.system import process_vm

# bytes per process_vm_writev: each thread holds that much of a plain dump's page cache mapped while it copies,
# which counts in memcr's RSS (2 MiB took 4 MiB more of it on 2 cores); much less costs a call more than it saves
PIECE = 512 << 10
WINDOW = 32 << 20  # bytes of the dump mapped at a time: a 32-bit memcr has little address space
INLINE = 4 << 20  # bytes written by the calling thread alone: starting threads would take longer

Progress = Callable[[int, int], None]  # (bytes done, bytes in all), as memcr.park.checkpoint's


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
    # every frame located before any is written: a damaged index changes nothing in the target
    # in file order, which an incremental re-park's dump does not keep in address order (memcr.park.incremental)
    frames = sorted((frame for r in records for frame in dump.frames(r, PIECE)), key=lambda f: f.offset)
    cores = len(os.sched_getaffinity(0))
    with contextlib.ExitStack() as stack:
        pool = dump.pool
        if pool is None and sum(r.length for r in records) > INLINE:
            pool = stack.enter_context(ThreadPoolExecutor(cores, thread_name_prefix="memcr-upload"))
        for i, window in enumerate(dump.windows(frames, WINDOW)):
            _window(pid, dump, window, pool, cores, tally, first=i == 0)


def _window(
    pid: int,
    dump: DumpReader,
    window: list[Frame],
    pool: ThreadPoolExecutor | None,
    workers: int,
    tally: Tally | None,
    first: bool,
) -> None:
    def write(batch: list[Frame]) -> None:
        with pages.each(batch) as addresses:
            process_vm.write_many(pid, [(f.addr, a, f.length) for f, a in zip(batch, addresses, strict=True)])
        if tally:
            tally.add(sum(f.length for f in batch))

    def drain() -> None:
        while (batch := handout.take()) is not None:
            try:
                write(batch)
            finally:
                handout.done()

    with _readable(dump, window, first) as pages:
        batches = _batches(window)
        rest = batches[1:] if first else batches
        handout = _Handout(rest)
        try:
            if first and batches:
                # the first batch alone: a way that cannot work is found before anything is half done
                _starting(lambda: write(batches[0]))
            threads = min(workers, len(rest)) if pool is not None else 1
            _all([submit(pool, drain) for _ in range(threads)])
        finally:
            handout.close()


class _Handout:
    """A window's batches, each to the thread that asks next, until the window closes.

    One lock, not a Future a batch: that cost more than a batch's own
    call. close() waits for the batches out to be written, so no write
    outlives its window: after a failure the target may run again (the
    rollback) while a drain the pool queued runs on, one whose submit()
    raised because its thread could not start, and which submit() ran here
    too.
    """

    def __init__(self, batches: list[list[Frame]]) -> None:
        self._rest = iter(batches)
        self._open = True
        self._out = 0
        self._settled = threading.Condition()

    def take(self) -> list[Frame] | None:
        with self._settled:
            batch = next(self._rest, None) if self._open else None
            self._out += batch is not None
            return batch

    def done(self) -> None:
        with self._settled:
            self._out -= 1
            self._settled.notify_all()

    def close(self) -> None:
        with self._settled:
            self._open = False
            self._settled.wait_for(lambda: self._out == 0)


def _batches(frames: list[Frame]) -> list[list[Frame]]:
    """The frames in runs of about PIECE bytes, each written with one call: the pieces of an incremental
    re-park's dump are often a page each (memcr.park.incremental). A coded frame counts whole, as the batch
    holds it decoded, and its parts go in one batch: a thread decodes it once (reader._Decoded)."""
    batches: list[list[Frame]] = []
    size = 0
    for frame in frames:
        parted = bool(batches) and batches[-1][-1].offset == frame.offset
        cost = 0 if parted else frame.whole or frame.length
        if not batches or (size + cost > PIECE and not parted) or len(batches[-1]) >= process_vm.IOV_MAX:
            batches.append([])
            size = 0
        batches[-1].append(frame)
        size += cost
    return batches


@contextlib.contextmanager
def _readable(dump: DumpReader, window: list[Frame], first: bool) -> Iterator[Pages]:
    """The window's pages; a first window that cannot be mapped means this way does not work here."""
    with contextlib.ExitStack() as stack:
        try:
            pages = stack.enter_context(dump.readable(window))
        except DumpError as e:
            if first:
                raise process_vm.Unavailable(str(e), errno=e.errno) from e
            raise
        yield pages


def _starting(work: Callable[[], None]) -> None:
    """The first write: any failure there means this way does not work here, and nothing was written."""
    try:
        work()
    except process_vm.Unavailable:
        raise
    except OSError as e:
        raise process_vm.Unavailable(f"process_vm_writev failed: {e.strerror}", errno=e.errno) from e


def _all(futures: list[Future[None]]) -> None:
    """Wait for every piece; then the first failure, if any, is raised."""
    wait(futures)
    for future in futures:
        future.result()
