"""The page server: threads that fill a target's missing pages, faults first, then the rest in address order."""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from memcr.errors import MemcrError
from memcr.lazy.guardian import DROP_TIMEOUT, Guardian
from memcr.lazy.source import Source
from memcr.lazy.space import Filling, Piece, Space
from memcr.system.uffd import EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, Event, Userfaultfd

POLL_MS = 1000  # a stop wakes the server through its pipe; this is only a safety net
STUCK_LIMIT = 10.0  # seconds a page may stay unmapped without a message saying so


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


class Serving:
    """Pages are being filled (or all are back): nothing failed."""


SERVING = Serving()


@dataclass(frozen=True, slots=True)
class Failed:
    """A page could not be put back: the target and its children are to be killed."""

    error: BaseException


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
        self.state: Serving | Failed = SERVING
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
            self._close_pipe()  # its own; what it was given stays the caller's until it exists
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
        if not self._retired.wait(DROP_TIMEOUT + 5) and not self.failed:
            self.fail(MemcrError("internal error: the page server did not let go of the target's userfaultfd"))

    def replace_guardian(self) -> None:
        """The guardian died with pages still missing (killed by someone): a new one holds the userfaultfds."""
        guardian = Guardian()
        with self._lock:
            for space in self.spaces:
                if space.state is not Filling.RETIRED:
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
        self._close_pipe()
        self.guardian.reap()

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            self._pipe_open = False
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- the threads -----------------------------------------------------------

    @property
    def failed(self) -> bool:
        return isinstance(self.state, Failed)

    def check(self) -> None:
        """Raise what failed the server, if anything did."""
        if isinstance(state := self.state, Failed):
            raise state.error

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if not self.failed:
                self.state = Failed(error)
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
        if self._retire.is_set() and self.own.state is not Filling.RETIRED:
            # the guardian's copy first: the kernel lets go of the mappings once the last copy is closed
            self.guardian.drop(self.own.uffd.fd)
            with self._lock:
                self.own.state = Filling.RETIRED
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
            space.exited()
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
                space.exited()
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
