"""The target running again, traced, while its page server fills the pages it still misses."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from memcr.engine.running import RunningProcess
from memcr.errors import TargetKilled
from memcr.lazy.server import Failed, PageServer

Log = Callable[[str], None]


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
            self._watch(lambda: server.target_done or server.failed, lambda: not running.threads)
        except BaseException as e:
            server.fail(e)
        self.elapsed_ms = (time.monotonic() - self.started) * 1000
        if isinstance(state := server.state, Failed):
            self._end(kill=True)
            raise TargetKilled(
                f"pid {self.pid} was killed during its lazy restore: {state.error}", pid=self.pid
            ) from state.error
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
            self._watch(lambda: server.all_done or server.failed, lambda: not running.children)
        except BaseException as e:
            server.fail(e)
        killed = sorted(running.children) if server.failed else []
        self._end(kill=server.failed)
        if isinstance(state := server.state, Failed):
            raise TargetKilled(
                f"the processes {', '.join(map(str, killed))}, forked by pid {self.pid} during its lazy restore, "
                f"were killed: {state.error}",
                pid=self.pid,
            ) from state.error

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
