"""Lazy restore: the target runs again at once, its pages arrive on first touch or from a background stream.

The parasite makes a userfaultfd inside the target (it must belong to the
target's mm) and hands it to memcr, which watches every mapping that holds
dumped pages for missing-page faults. Then the target runs, still traced
by the thread that froze it; that thread passes signals and stops on while
others here fill pages, first those a thread of the target waits for, then
the rest in address order. Once none is missing memcr lets go.

The cardinal rule in this phase: a page must never read as zeros because
memcr is gone. Closing the userfaultfd would make every missing page read
as zeros, and when memcr dies its descriptors close before the kernel
kills its tracees (EXITKILL), so a guardian process, started by the
tracing thread, holds a copy of each userfaultfd: it dies (PR_SET_PDEATHSIG)
only after that thread's exit has killed the target.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import mmap
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from memcr.codec import FRAME
from memcr.dump.format import Record
from memcr.dump.reader import DumpReader, Frame, FramedReader, PlainReader
from memcr.errors import MemcrError, TargetKilled
from memcr.tracer import RunningProcess
from memcr.uffd import EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, Event, Userfaultfd

FAULT_PIECE = 256 << 10  # bytes a fault brings in: its neighbours come along, and it stays short
FILL_PIECE = 2 << 20  # bytes per background copy: a huge page
WHOLE = 1 << 62  # a framed dump's piece is one frame: it is decoded whole anyway
POLL_MS = 1000  # a stop wakes the server through its pipe; this is only a safety net

Log = Callable[[str], None]


@dataclass
class Piece:
    start: int  # where the pages go now (a remap moves them)
    end: int
    origin: int  # the dump address of `start`


class _Shared:
    """Copies run side by side; reading the target's mapping changes waits for them all (a readers-writer lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._copies = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def copying(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._copies += 1
        try:
            yield
        finally:
            with self._cond:
                self._copies -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._copies:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class Space:
    """One mm whose missing pages memcr fills: the target's, or that of a child it forked meanwhile."""

    uffd: Userfaultfd
    pieces: list[Piece]  # not yet copied, in address order
    busy: list[Piece] = field(default_factory=list)  # being copied now
    faults: list[int] = field(default_factory=list)  # addresses a thread waits on, to serve again
    gone: bool = False  # its process exited or exec'd: nothing more to fill

    def take(self, addr: int, size: int) -> Piece | None:
        """The `size`-aligned part around addr of the piece that holds it; the rest stays."""
        i = bisect.bisect_right(self.pieces, addr, key=lambda p: p.start) - 1
        if i < 0 or addr >= self.pieces[i].end:
            return None
        return self._carve(i, max(self.pieces[i].start, addr - addr % size), size)

    def take_first(self, size: int) -> Piece:
        return self._carve(0, self.pieces[0].start, size)

    def _carve(self, i: int, lo: int, size: int) -> Piece:
        p = self.pieces.pop(i)
        hi = min(p.end, lo - lo % size + size)
        if hi < p.end:
            self.pieces.insert(i, Piece(hi, p.end, p.origin + hi - p.start))
        if p.start < lo:
            self.pieces.insert(i, Piece(p.start, lo, p.origin))
        return Piece(lo, hi, p.origin + lo - p.start)

    def put(self, piece: Piece) -> None:
        if piece.start < piece.end:
            bisect.insort(self.pieces, piece, key=lambda p: p.start)

    def cut(self, start: int, end: int) -> list[Piece]:
        """Take [start, end) out of every piece; the parts that were inside, in order."""
        inside: list[Piece] = []
        kept: list[Piece] = []
        for p in self.pieces:
            if p.end <= start or p.start >= end:
                kept.append(p)
                continue
            lo, hi = max(p.start, start), min(p.end, end)
            if p.start < lo:
                kept.append(Piece(p.start, lo, p.origin))
            inside.append(Piece(lo, hi, p.origin + lo - p.start))
            if hi < p.end:
                kept.append(Piece(hi, p.end, p.origin + hi - p.start))
        self.pieces = kept
        return inside

    def is_busy(self, addr: int) -> bool:
        return any(p.start <= addr < p.end for p in self.busy)

    def clone(self, uffd: Userfaultfd) -> Space:
        return Space(uffd, [Piece(p.start, p.end, p.origin) for p in self.pieces])


class Source:
    """The dump's bytes for a piece, at an address UFFDIO_COPY can read."""

    def __init__(self, dump: DumpReader, records: list[Record], page_size: int) -> None:
        self.dump = dump
        self.page_size = page_size
        self._records = sorted(records, key=lambda r: r.addr)
        self._base = 0
        self._size = 0
        self._frames: list[tuple[int, int, Frame]] = []  # dump address, plain length, frame
        self._framed = dump if isinstance(dump, FramedReader) else None
        if isinstance(dump, PlainReader):
            self._map_plain()
        elif isinstance(dump, FramedReader):
            head_len = FRAME.size
            for record in self._records:
                for frame in dump.frames(record):
                    plain_len = FRAME.unpack(frame[0][:head_len])[0]
                    self._frames.append((frame[3], plain_len, frame))

    def _map_plain(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        self._size = self.dump.size
        base = libc.mmap(None, self._size, mmap.PROT_READ, mmap.MAP_SHARED, self.dump.file.fd, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemcrError(f"cannot map the dump {self.dump.path}: {os.strerror(ctypes.get_errno())}")
        self._base = int(base)
        self._libc = libc

    @property
    def fault_piece(self) -> int:
        return WHOLE if self._framed is not None else FAULT_PIECE

    @property
    def fill_piece(self) -> int:
        return WHOLE if self._framed is not None else FILL_PIECE

    def pieces(self) -> list[Piece]:
        """One piece per record, or per frame: a copy never takes bytes from two."""
        if self._framed is not None:
            return [Piece(addr, addr + length, addr) for addr, length, _ in self._frames]
        return [Piece(r.addr, r.addr + r.length, r.addr) for r in self._records]

    @contextlib.contextmanager
    def bytes_at(self, origin: int, length: int) -> Iterator[int]:
        """The address of `length` dump bytes for the pages at dump address `origin`, checked where the dump can be."""
        if self._framed is not None:
            i = bisect.bisect_right(self._frames, origin, key=lambda f: f[0]) - 1
            addr, plain_len, frame = self._frames[i]
            if not (addr <= origin and origin + length <= addr + plain_len):
                raise MemcrError(f"internal error: no frame holds {origin:#x}+{length:#x}")
            data = self._framed.decode(frame)
            if isinstance(data, memoryview):
                data = data.tobytes()
            buffer = ctypes.c_char_p(data)
            yield (ctypes.cast(buffer, ctypes.c_void_p).value or 0) + origin - addr
            return
        i = bisect.bisect_right(self._records, origin, key=lambda r: r.addr) - 1
        record = self._records[i]
        offset = record.offset + origin - record.addr
        yield self._base + offset
        # the page cache stays; memcr's RSS does not count it once its use is over
        first = offset - offset % self.page_size
        self._libc.madvise(ctypes.c_void_p(self._base + first), ctypes.c_size_t(offset + length - first), 4)

    def close(self) -> None:
        if self._base:
            self._libc.munmap(ctypes.c_void_p(self._base), ctypes.c_size_t(self._size))
            self._base = 0


_GUARD = """
import ctypes, os, resource, signal, socket, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the memcr thread that traces the target
if os.getppid() != int(sys.argv[1]):
    os._exit(0)  # that thread is gone already, and its exit killed the target
_, most = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
held, inbox = [], socket.socket(fileno=int(sys.argv[2]))
while True:  # no end: memcr closing its side must not end this
    held += socket.recv_fds(inbox, 1, 64)[1]
"""


class Guardian:
    """A process holding a copy of each userfaultfd, so none closes before the target is killed.

    The copies travel over a socket; until the guardian takes them into
    its own descriptor table, the message holds them, and the message
    lives as long as the guardian's end of the socket.
    """

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-S", "-I", "-c", _GUARD, str(os.getpid()), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C for memcr must not reach it
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._sock = mine
        self._lock = threading.Lock()  # hold() from the page server, end() from any thread
        self.ended = False

    def hold(self, fd: int) -> None:
        """Keep `fd` open until the guardian ends; once it has, no page is missing any more (or the target dies)."""
        with self._lock:
            if not self.ended:
                socket.send_fds(self._sock, [b"u"], [fd])

    def end(self) -> None:
        """Kill it; `RunningProcess.watch`, which waits for its exit, returns."""
        with self._lock:
            self.ended = True
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self._sock.close()

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            self.process.wait()


class PageServer:
    """Threads that fill one target's missing pages: those a thread waits for first, then the rest in order.

    The fault server starts while the target is still frozen (memcr's own
    injected code may touch a missing page too), the background stream
    once it runs. The server ends the guardian once every page is back, or
    when a page cannot be put back.
    """

    def __init__(self, pid: int, uffd: Userfaultfd, guardian: Guardian, source: Source) -> None:
        self.pid = pid
        self.guardian = guardian
        self.source = source
        self.spaces = [Space(uffd, source.pieces())]
        self.faults = 0  # pages a thread of the target waited for
        self.error: BaseException | None = None
        self.complete = False  # every page is back
        self._lock = threading.Lock()  # the pieces of every space
        self._shared = _Shared()
        self._work = threading.Condition(self._lock)
        self._done = threading.Event()
        self._streaming = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # stop() wakes the server's poll
        # every thread is started here, before the target runs: one that cannot start fails the restore
        # while it can still be rolled back
        self._threads = [threading.Thread(target=self._serve, name="memcr-lazy-faults", daemon=True)]
        self._threads += [
            threading.Thread(target=self._fill, name="memcr-lazy-fill", daemon=True) for _ in os.sched_getaffinity(0)
        ]
        try:
            for thread in self._threads:
                thread.start()
        except BaseException:
            self.stop()
            raise

    def stream(self) -> None:
        """Let the fillers copy the pages nobody waits for: the target runs, its wake-up had the cores."""
        self._streaming.set()

    def replace_guardian(self) -> None:
        """The guardian died with pages still missing (killed by someone): a new one holds the userfaultfds."""
        guardian = Guardian()
        with self._lock:
            for space in self.spaces:
                guardian.hold(space.uffd.fd)
            old, self.guardian = self.guardian, guardian
        old.end()  # its socket: the process is gone and collected already
        if self.complete or self.error is not None:
            guardian.end()  # it ended meanwhile: the tracing thread must not wait for this one

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        self._done.set()
        self._streaming.set()
        self._wake()
        with self._lock:
            self._work.notify_all()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()
        self.guardian.end()

    def close(self) -> None:
        """Once the target was let go or killed: a userfaultfd closed while it runs would turn its missing
        pages into zeros."""
        for space in self.spaces:
            space.uffd.close()
        self.source.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.guardian.reap()

    # -- the threads -----------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self._done.set()
        self.guardian.end()  # wakes the tracing thread, which kills the target

    def _serve(self) -> None:
        """Read each userfaultfd: apply mapping changes, serve the faults."""
        try:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            watched: set[int] = set()
            while not self._done.is_set():
                for space in self.spaces:
                    if space.uffd.fd not in watched and not space.gone:
                        poller.register(space.uffd.fd, select.POLLIN)
                        watched.add(space.uffd.fd)
                waiting = any(space.faults for space in self.spaces)  # retried soon: a copy came first
                poller.poll(1 if waiting else POLL_MS)
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
                with self._shared.exclusive():
                    events = [(space, event) for space in list(self.spaces) for event in space.uffd.events()]
                    for space, event in events:
                        if event.kind != EVENT_PAGEFAULT:
                            self._changed(space, event)
                for space, event in events:
                    if event.kind == EVENT_PAGEFAULT:
                        self.faults += 1
                        space.faults.append(event.start - event.start % self.source.page_size)
                for space in self.spaces:
                    self._serve_faults(space)
                if not self.complete and self._complete():
                    self.complete = True
                    # wakes the tracing thread, which lets the target go; until then mapping changes
                    # (a fork waits for its message to be read) and faults on never-used pages go on
                    self.guardian.end()
        except BaseException as e:
            self.fail(e)

    def _changed(self, space: Space, event: Event) -> None:
        """The target changed its mappings (the thread that did so waits until this reads the message)."""
        with self._lock:
            if event.kind == EVENT_FORK:
                child = space.clone(Userfaultfd(event.fd, space.uffd.page_size))
                self.guardian.hold(event.fd)
                self.spaces.append(child)
            elif event.kind == EVENT_REMAP:
                for p in space.cut(event.start, event.end):
                    space.put(Piece(p.start - event.start + event.to, p.end - event.start + event.to, p.origin))
            else:  # REMOVE or UNMAP: those pages read as zeros now, or are gone
                space.cut(event.start, event.end)
            self._work.notify_all()

    def _serve_faults(self, space: Space) -> None:
        faults, space.faults = space.faults, []
        for addr in faults:
            with self._shared.copying():
                with self._lock:
                    piece = space.take(addr, self.source.fault_piece)
                    if piece is None and space.is_busy(addr):
                        space.faults.append(addr)  # a filler is copying it: served again should that copy fail
                        continue
                    if piece is not None:
                        space.busy.append(piece)
                if piece is not None:
                    if not self._copy(space, piece):
                        space.faults.append(addr)
                    continue
                # a page the dump does not hold (never touched, or given back since): zeros, as without memcr
                code = space.uffd.zeropage(addr)
            if code == errno.EAGAIN:
                space.faults.append(addr)
            elif code in (errno.EEXIST, errno.ENOENT):
                space.uffd.wake(addr, self.source.page_size)
            elif code == errno.ESRCH:
                space.gone = True
            elif code:
                raise MemcrError(f"cannot map a zero page at {addr:#x}: {os.strerror(code)}")

    def _fill(self) -> None:
        """Copy the pieces nobody waits for yet, in address order."""
        self._streaming.wait()
        try:
            while not self._done.is_set():
                with self._lock:
                    if not self._has_work():
                        self._work.wait(0.05)
                        continue
                # taken only inside copying(): a mapping change is never applied while a taken piece waits
                with self._shared.copying():
                    with self._lock:
                        found = self._next()
                        if found is None:
                            continue
                        space, piece = found
                        space.busy.append(piece)
                    copied = self._copy(space, piece)
                with self._lock:
                    last = not self._has_work()
                if last:
                    self._wake()  # that was the last piece: the server sees it is complete
                if not copied:
                    time.sleep(0.0002)  # the target is changing its mappings: the reader applies that first
        except BaseException as e:
            self.fail(e)

    def _has_work(self) -> bool:
        return any(space.pieces and not space.gone for space in self.spaces)

    def _next(self) -> tuple[Space, Piece] | None:
        for space in self.spaces:
            if space.pieces and not space.gone:
                return space, space.take_first(self.source.fill_piece)
        return None

    def _copy(self, space: Space, piece: Piece) -> bool:
        """Copy a taken piece into its space (inside copying()); False when mapping changes must be read first."""
        length = piece.end - piece.start
        with self.source.bytes_at(piece.origin, length) as src:
            done, code = space.uffd.copy(piece.start, src, length)
        page = self.source.page_size
        with self._lock:
            space.busy.remove(piece)
            rest = Piece(piece.start + done, piece.end, piece.origin + done)
            if code == errno.EAGAIN:
                space.put(rest)
                return False
            if code == errno.ESRCH:
                space.gone = True
            elif code == errno.ENOENT:
                # that page is no longer mapped (its unmap message comes next): the rest may be
                space.put(Piece(rest.start + page, rest.end, rest.origin + page))
            elif code == errno.EEXIST:
                raise MemcrError(
                    f"a page at {rest.start:#x} of process {self.pid} was filled by someone else while "
                    "its lazy restore ran: the dump's bytes cannot go there"
                )
            elif code:
                raise MemcrError(f"cannot put pages back at {rest.start:#x}: {os.strerror(code)}")
            return True

    def _complete(self) -> bool:
        with self._lock:
            return all(space.gone or not (space.pieces or space.busy or space.faults) for space in self.spaces)


class LazyRestore:
    """A target running again, traced, while its PageServer fills the pages it still misses."""

    def __init__(
        self, running: RunningProcess, server: PageServer, log: Log, ended: Callable[[LazyRestore], None]
    ) -> None:
        self.running = running
        self.server = server
        self.log = log
        self._ended = ended  # once every page is back and the target let go: memcr's own clean-up
        self.started = time.monotonic()
        self.elapsed_ms = 0.0

    @property
    def pid(self) -> int:
        return self.running.pid

    @property
    def faults(self) -> int:
        return self.server.faults

    def finish(self) -> None:
        """On the tracing thread: watch the target until every page is back, then let it go.

        Raises TargetKilled when a page could not be put back, after killing
        the target and every child it forked meanwhile.
        """
        server = self.server
        try:
            while self.running.watch(until=server.guardian.process.pid):
                if server.complete or server.error is not None:
                    break
                self.log(f"pid {self.pid}: memcr's guardian process was killed; starting another")
                server.replace_guardian()
            else:
                self.log(f"pid {self.pid} ended during its lazy restore")
        except BaseException as e:
            server.fail(e)
        try:
            if server.error is not None:
                self.running.kill()
            else:
                # the server still reads the target's messages: a thread in fork() waits for that
                self.running.detach()
        finally:
            server.stop()
            server.close()
            self.elapsed_ms = (time.monotonic() - self.started) * 1000
            self._ended(self)
        if server.error is not None:
            raise TargetKilled(
                f"pid {self.pid} was killed during its lazy restore: {server.error}", pid=self.pid
            ) from server.error
