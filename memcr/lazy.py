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
import enum
import errno
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from memcr.dump.format import Record
from memcr.dump.reader import WHOLE, DumpReader
from memcr.errors import DumpError, MemcrError, TargetKilled
from memcr.tracer import RunningProcess
from memcr.uffd import EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, Event, Userfaultfd

FAULT_PIECE = 256 << 10  # bytes a fault brings in: its neighbours come along, and it stays short
FILL_PIECE = 1 << 20  # bytes per background copy: 8 restores at once hold 8 MiB of the dump mapped, not 16
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


class Outcome(enum.Enum):
    """What one UFFDIO_COPY of a taken piece came to."""

    DONE = 1  # copied, or its process is gone
    SPLIT = 2  # it crossed a mapping's end (the target split the mapping): its parts go one by one, now
    RETRY = 3  # after the target's mapping changes are read: its pages are still to come


@dataclass
class Space:
    """One mm whose missing pages memcr fills: the target's, or that of a child it forked meanwhile."""

    uffd: Userfaultfd
    pieces: list[Piece]  # not yet copied, in address order
    streamed: bool  # filled in the background too; a child's pages come only as its threads touch them
    busy: list[Piece] = field(default_factory=list)  # being copied now
    faults: list[int] = field(default_factory=list)  # addresses a thread waits on, to serve again
    # pages a one-page copy found unmapped, and since when: the message of their unmap or move is due,
    # and until it is read they are not given up
    stuck: dict[int, float] = field(default_factory=dict)
    gone: bool = False  # its process exited or exec'd: nothing more to fill
    retired: bool = False  # every page is back and memcr closed its userfaultfd

    @property
    def live(self) -> bool:
        return not (self.gone or self.retired)

    @property
    def complete(self) -> bool:
        return not self.live or not (self.pieces or self.busy or self.faults)

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

    def holds(self, addr: int) -> bool:
        i = bisect.bisect_right(self.pieces, addr, key=lambda p: p.start) - 1
        return i >= 0 and addr < self.pieces[i].end

    def is_busy(self, addr: int) -> bool:
        return any(p.start <= addr < p.end for p in self.busy)

    def clone(self, uffd: Userfaultfd) -> Space:
        """A forked child's: the pages still missing here are missing there too, and come as it touches them."""
        return Space(uffd, [Piece(p.start, p.end, p.origin) for p in self.pieces], streamed=False)


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


_GUARD = """
import ctypes, os, resource, signal, socket, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the memcr thread that traces the target
if os.getppid() != int(sys.argv[1]):
    os._exit(0)  # that thread is gone already, and its exit killed the target
_, most = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
held, inbox = [], socket.socket(fileno=int(sys.argv[2]))
while True:  # no end: memcr closing its side must not end this
    message, fds, _, _ = socket.recv_fds(inbox, 16, 64)
    held += fds
    if message[:1] == b"d":  # memcr let go of that userfaultfd: so does this
        os.close(held[int(message[1:])])
        try:
            inbox.send(b"k")
        except OSError:
            pass
    elif message == b"r":  # a bell: the tracing thread waits for its children, and sees this stop
        os.kill(os.getpid(), signal.SIGSTOP)
"""

DROP_TIMEOUT = 10.0  # seconds the guardian may take to close a copy
STUCK_LIMIT = 10.0  # seconds a page may stay unmapped without a message saying so


class Guardian:
    """A process holding a copy of each userfaultfd, so none closes before the target is killed.

    The copies travel over a socket; until the guardian takes them into
    its own descriptor table, the message holds them, and the message
    lives as long as the guardian's end of the socket. It is also the
    page server's bell: it stops itself when asked, which wakes the
    tracing thread (its parent) in waitpid.
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
        self._lock = threading.Lock()  # hold(), drop() and ring() from the page server, end() from any thread
        self._held: dict[int, int] = {}  # memcr's descriptor -> the place of its copy in the guardian's list
        self._sent = 0
        self.ended = False

    def hold(self, fd: int) -> None:
        """Keep `fd` open until the guardian ends or drops it; until then no page reads as zeros for want of it."""
        with self._lock:
            if not self.ended:
                socket.send_fds(self._sock, [b"u"], [fd])
                self._held[fd] = self._sent
                self._sent += 1

    def drop(self, fd: int) -> None:
        """Close the guardian's copy of `fd`, and wait until it has: memcr is about to close its own."""
        with self._lock:
            place = self._held.pop(fd, None)
            if self.ended or place is None:
                return
            try:
                self._sock.send(b"d%d" % place)
                self._sock.settimeout(DROP_TIMEOUT)
                self._sock.recv(1)
            except TimeoutError:
                raise MemcrError("memcr's guardian process did not answer within 10 s") from None
            except OSError:
                return  # it was killed: its copies went with it
            finally:
                self._sock.settimeout(None)

    def ring(self) -> None:
        """Wake the tracing thread in `RunningProcess.watch`."""
        with self._lock:
            if not self.ended:
                with contextlib.suppress(OSError):  # killed: its exit wakes that thread all the same
                    self._sock.send(b"r")

    def end(self) -> None:
        """Kill it (which wakes the tracing thread, should it watch)."""
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
    once it runs. The server rings the guardian once the target's pages are
    all back, once every page is back (children included), and when a page
    cannot be put back.
    """

    def __init__(self, pid: int, uffd: Userfaultfd, guardian: Guardian, source: Source) -> None:
        self.pid = pid
        self.guardian = guardian
        self.source = source
        self.own = Space(uffd, source.pieces(), streamed=True)
        self.spaces = [self.own]
        self.faults = 0  # pages a thread of the target waited for
        self.error: BaseException | None = None
        self._rung = (False, False)  # target_done, all_done when the guardian last rang
        self._lock = threading.Lock()  # the pieces of every space
        self._shared = _Shared()
        self._work = threading.Condition(self._lock)
        self._done = threading.Event()
        self._streaming = threading.Event()
        self._stream_children = threading.Event()
        self._retire = threading.Event()
        self._retired = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # wakes the server's poll
        # close() against a late wake from another thread (a SIGTERM's): the number may be another file's by then
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
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

    @property
    def target_done(self) -> bool:
        """Every page of the target's own is back (or it is gone)."""
        with self._lock:
            return self.own.complete

    @property
    def all_done(self) -> bool:
        """Every page is back, the children's too."""
        with self._lock:
            return all(space.complete for space in self.spaces)

    def stream(self) -> None:
        """Let the fillers copy the pages nobody waits for: the target runs, its wake-up had the cores."""
        self._streaming.set()

    def stream_children(self) -> None:
        """Fill the children's missing pages too, so that memcr can let go of them (from any thread, any time)."""
        self._stream_children.set()
        self._wake()

    def retire_target(self) -> None:
        """The target's pages are all back: close its userfaultfd (memcr's copies), children's stay served."""
        self._retire.set()
        self._wake()
        if not self._retired.wait(DROP_TIMEOUT + 5) and self.error is None:
            self.fail(MemcrError("internal error: the page server did not let go of the target's userfaultfd"))

    def replace_guardian(self) -> None:
        """The guardian died with pages still missing (killed by someone): a new one holds the userfaultfds."""
        guardian = Guardian()
        with self._lock:
            for space in self.spaces:
                if not space.retired:
                    guardian.hold(space.uffd.fd)
            old, self.guardian = self.guardian, guardian
        old.end()  # its socket: the process is gone and collected already

    def _wake(self) -> None:
        with self._pipe_lock, contextlib.suppress(BlockingIOError):
            if self._pipe_open:
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
        """Once the target and its children were let go or killed: a userfaultfd closed while they run would
        turn their missing pages into zeros."""
        for space in self.spaces:
            space.uffd.close()
        self.source.close()
        with self._pipe_lock:
            self._pipe_open = False
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.guardian.reap()

    # -- the threads -----------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self._done.set()
        self.guardian.ring()  # the tracing thread wakes and kills the target

    def _serve(self) -> None:
        """Read each userfaultfd: apply mapping changes, serve the faults."""
        try:
            while not self._done.is_set():
                self._requests()
                live = [space for space in self.spaces if space.live]
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                for space in live:
                    poller.register(space.uffd.fd, select.POLLIN)
                waiting = any(space.faults or space.stuck for space in live)  # retried soon: a copy came first
                poller.poll(1 if waiting else POLL_MS)
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
                with self._shared.exclusive():
                    events = [(space, event) for space in live for event in space.uffd.events()]
                    for space, event in events:
                        if event.kind != EVENT_PAGEFAULT:
                            self._changed(space, event)
                for space, event in events:
                    if event.kind == EVENT_PAGEFAULT:
                        self.faults += 1
                        space.faults.append(event.start - event.start % self.source.page_size)
                for space in live:
                    self._serve_faults(space)
                    self._check_stuck(space)
                self._ring_on_change()
        except BaseException as e:
            self.fail(e)

    def _requests(self) -> None:
        """What other threads asked of this one since it last looked."""
        if self._stream_children.is_set():
            with self._lock:
                for space in self.spaces:
                    space.streamed = True
                self._work.notify_all()
        if self._retire.is_set() and not self.own.retired:
            # the guardian's copy first: the kernel lets go of the mappings once the last copy is closed
            self.guardian.drop(self.own.uffd.fd)
            with self._lock:
                self.own.retired = True
            self.own.uffd.close()
            self._retired.set()

    def _ring_on_change(self) -> None:
        state = (self.target_done, self.all_done)
        if state != self._rung:
            self._rung = state
            self.guardian.ring()

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
            outcome = Outcome.SPLIT
            while outcome is Outcome.SPLIT:  # the part that holds addr is smaller now: at once
                outcome = self._serve_fault(space, addr)
            if outcome is Outcome.RETRY:
                space.faults.append(addr)

    def _serve_fault(self, space: Space, addr: int) -> Outcome:
        # a child's fault brings back that page alone: a fork must cost no more than the child touches
        size = self.source.fault_piece if space.streamed else self.source.page_size
        with self._shared.copying():
            with self._lock:
                piece = space.take(addr, size)
                if piece is None and space.is_busy(addr):
                    return Outcome.RETRY  # a filler is copying it: served again should that copy fail
                if piece is not None:
                    space.busy.append(piece)
            if piece is not None:
                return self._copy(space, piece)
            # a page the dump does not hold (never touched, or given back since): zeros, as without memcr
            code = space.uffd.zeropage(addr)
        if code == errno.EAGAIN:
            return Outcome.RETRY
        if code in (errno.EEXIST, errno.ENOENT):
            space.uffd.wake(addr, self.source.page_size)
        elif code == errno.ESRCH:
            space.gone = True
        elif code:
            raise MemcrError(f"cannot map a zero page at {addr:#x}: {os.strerror(code)}")
        return Outcome.DONE

    def _check_stuck(self, space: Space) -> None:
        """A page still missing where the kernel says nothing is mapped, and no message says why: give up."""
        now = time.monotonic()
        with self._lock:
            for addr, since in list(space.stuck.items()):
                if not space.holds(addr):
                    del space.stuck[addr]  # its unmap or move message came: it is handled
                elif now - since > STUCK_LIMIT:
                    raise MemcrError(
                        f"memcr cannot tell where the page at {addr:#x} of process {self.pid} went: "
                        f"the kernel says nothing is mapped there, and no unmap or move of it came in "
                        f"{STUCK_LIMIT:g} s"
                    )

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
                    outcome = self._copy(space, piece)
                with self._lock:
                    last = not self._has_work()
                if last:
                    self._wake()  # that was the last piece: the server sees it is complete
                if outcome is Outcome.RETRY:
                    time.sleep(0.0002)  # the target is changing its mappings: the reader applies that first
        except BaseException as e:
            self.fail(e)

    def _has_work(self) -> bool:
        return any(space.pieces and space.streamed and space.live for space in self.spaces)

    def _next(self) -> tuple[Space, Piece] | None:
        for space in self.spaces:
            if space.pieces and space.streamed and space.live:
                return space, space.take_first(self.source.fill_piece)
        return None

    def _copy(self, space: Space, piece: Piece) -> Outcome:
        """Copy a taken piece into its space (inside copying()).

        ENOENT never means the pages are gone: the range may cross the end
        of a mapping the target split (mprotect, mlock, madvise), or the
        target may have unmapped or moved it, and then its message comes
        and says so. EAGAIN: the target is changing its mappings.
        """
        length = piece.end - piece.start
        with self.source.bytes_at(piece.origin, length) as src:
            done, code = space.uffd.copy(piece.start, src, length)
        page = self.source.page_size
        with self._lock:
            space.busy.remove(piece)
            rest = Piece(piece.start + done, piece.end, piece.origin + done)
            if code == 0:
                for addr in [a for a in space.stuck if piece.start <= a < piece.end]:
                    del space.stuck[addr]
                return Outcome.DONE
            if code == errno.ESRCH:
                space.gone = True
                return Outcome.DONE
            if code == errno.EAGAIN:
                space.put(rest)
                return Outcome.RETRY
            if code == errno.ENOENT and rest.end - rest.start > page:
                middle = rest.start + (rest.end - rest.start) // page // 2 * page
                space.put(Piece(rest.start, middle, rest.origin))
                space.put(Piece(middle, rest.end, rest.origin + middle - rest.start))
                return Outcome.SPLIT
            if code == errno.ENOENT:
                space.put(rest)
                space.stuck.setdefault(rest.start, time.monotonic())
                return Outcome.RETRY
            if code == errno.EEXIST:
                raise MemcrError(
                    f"a page at {rest.start:#x} of process {self.pid} was filled by someone else while "
                    "its lazy restore ran: the dump's bytes cannot go there"
                )
            if code == errno.EFAULT:
                raise self.source.unreadable(rest.origin, rest.end - rest.start)
            raise MemcrError(f"cannot put pages back at {rest.start:#x}: {os.strerror(code)}")


class LazyRestore:
    """A target running again, traced, while its PageServer fills the pages it still misses.

    `finish` watches it until its own pages are back and lets it go;
    children it forked meanwhile run on memory of the fork, so memcr serves
    their missing pages as they touch them until each exits or execs
    (`finish_children`), or fills them whole when asked to end sooner.
    """

    def __init__(
        self,
        running: RunningProcess,
        server: PageServer,
        log: Log,
        restored: Callable[[LazyRestore], None],
        closed: Callable[[], None],
    ) -> None:
        self.running = running
        self.server = server
        self.log = log
        self._restored = restored  # the target's pages are back: its report
        self._closed = closed  # memcr is done with it, children included: the dump goes
        self.started = time.monotonic()
        self.elapsed_ms = 0.0
        self.ended: str | None = None  # the target ended during the lazy phase, not by memcr's hand: how
        self.forked = 0  # children it forked during the lazy phase
        self.lingering = False  # children still need memcr after the target was let go

    @property
    def pid(self) -> int:
        return self.running.pid

    @property
    def faults(self) -> int:
        return self.server.faults

    def finish(self) -> None:
        """On the tracing thread: watch the target until its own pages are back, then let it go.

        Raises TargetKilled when a page could not be put back, after
        killing the target and every child it forked meanwhile. A target
        that ended meanwhile (killed by someone, or exited) is not an
        error here: `ended` says how. When `lingering` is set afterwards,
        `finish_children` must follow on this thread.
        """
        server, running = self.server, self.running
        try:
            self._watch(lambda: server.target_done or server.error is not None, lambda: not running.threads)
        except BaseException as e:
            server.fail(e)
        self.elapsed_ms = (time.monotonic() - self.started) * 1000
        if server.error is not None:
            self._end(kill=True)
            raise TargetKilled(
                f"pid {self.pid} was killed during its lazy restore: {server.error}", pid=self.pid
            ) from server.error
        # the server still reads the target's messages: a thread in fork() waits for that
        running.detach(set(running.threads))
        self.ended = running.ended  # its threads were gone, or went meanwhile
        self.forked = len(server.spaces) - 1
        self.lingering = bool(running.children) and not server.all_done
        if self.lingering:
            server.retire_target()
        else:
            self._end(kill=False)
        self._restored(self)

    def finish_children(self) -> None:
        """On the tracing thread: serve the children until each exits or execs, or `stream_children` filled
        them; then let them go. Raises TargetKilled when a page of theirs could not be put back."""
        server, running = self.server, self.running
        try:
            self._watch(lambda: server.all_done or server.error is not None, lambda: not running.children)
        except BaseException as e:
            server.fail(e)
        killed = sorted(running.children) if server.error is not None else []
        self._end(kill=server.error is not None)
        if server.error is not None:
            raise TargetKilled(
                f"the processes {', '.join(map(str, killed))}, forked by pid {self.pid} during its lazy restore, "
                f"were killed: {server.error}",
                pid=self.pid,
            ) from server.error

    def _watch(self, ready: Callable[[], bool], done: Callable[[], bool]) -> None:
        """Pass the target's stops on until `ready()` (the server rings), or `done()` when a task ended."""
        while not ready():
            status = self.running.watch(until=self.server.guardian.process.pid, done=done)
            if status is None:
                return
            if not os.WIFSTOPPED(status) and not ready():
                self.log(f"pid {self.pid}: memcr's guardian process was killed; starting another")
                self.server.replace_guardian()

    def _end(self, kill: bool) -> None:
        try:
            if kill:
                self.running.kill()
            else:
                self.running.detach()
        finally:
            self.server.stop()
            self.server.close()
            self._closed()
