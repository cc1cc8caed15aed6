"""A process that runs again, still traced by the thread that froze it (lazy restore)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from memcr.engine import ptrace_calls as pt
from memcr.engine.ptrace_calls import Stop
from memcr.engine.seize import check_tracer


class RunningProcess:
    """A process that runs again while the thread that froze it still traces it.

    That thread passes on every signal and group stop (`watch`) until memcr
    lets go of the process (`detach`) or kills it (`kill`). Threads it
    starts meanwhile are traced too, and so are the processes it forks, as
    `children`, until they exec: until then they run on memory of the
    fork, whose missing pages memcr serves.
    """

    def __init__(self, pid: int, tasks: set[int], owner: int) -> None:
        self.pid = pid
        self.threads = tasks  # the target's own traced threads
        self.children: set[int] = set()  # tasks of processes forked since (by it or by them), not exec'd yet
        self.owner = owner
        self.ended: str | None = None  # how the target ended, once every thread of it has
        # a new task's first stop can come before its creator's event, which says what it is: it waits here
        self._early: dict[int, Stop] = {}
        self._others: dict[int, int] = {}  # wait statuses of this thread's other children, reaped meanwhile

    def watch(self, until: int, done: Callable[[], bool]) -> int | None:
        """Pass on stops until `until` (a child of this thread) stops or exits: its wait status. None once
        `done()` holds after a task of the target or a child ended or exec'd, or no traced task is left."""
        self._tracer()
        if until in self._others:
            return self._others.pop(until)
        while self.threads or self.children:
            try:
                pid, status = os.waitpid(-1, pt.WALL | pt.WNOTHREAD | os.WUNTRACED)
            except ChildProcessError:
                self.threads.clear()
                self.children.clear()
                break
            if pid == until:
                if os.WIFSTOPPED(status):
                    os.kill(pid, signal.SIGCONT)  # a bell: it stopped itself to wake this thread
                return status
            if self._pass_on(Stop(pid, status)) and done():
                return None
        return None

    def _pass_on(self, stop: Stop) -> bool:
        """Pass one stop on; True when a task left the set memcr cares about (exit, or a child's exec)."""
        tid = stop.tid
        if stop.exited:
            if tid == self.pid:
                self.ended = stop.ending
            known = tid in self.threads or tid in self.children
            self.threads.discard(tid)
            self.children.discard(tid)
            if not known:
                self._others[tid] = stop.status
            return known
        try:
            if stop.event == pt.EVENT_EXEC:  # before the next test: its tid may look new (below)
                return self._exec(stop)
            if tid not in self.threads and tid not in self.children:
                self._early[tid] = stop  # left stopped until its creator's event says what it is
                return False
            if stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK):
                self._adopt(pt.event_message(tid), self.children)
            elif stop.event == pt.EVENT_CLONE:
                # a new thread (or a process sharing the memory): it belongs where its creator does
                self._adopt(pt.event_message(tid), self.threads if tid in self.threads else self.children)
            self._resume(stop)
        except ProcessLookupError:
            self.threads.discard(tid)  # killed meanwhile: its exit is reported next
            self.children.discard(tid)
            return True
        return False

    def _adopt(self, tid: int, into: set[int]) -> None:
        into.add(tid)
        first = self._early.pop(tid, None)
        if first is not None:
            self._pass_on(first)

    def _exec(self, stop: Stop) -> bool:
        """A task ran execve(); True when that was a child, which memcr lets go of: its memory is new.

        A thread other than the leader that runs it takes over the leader's
        tid, and the leader's end may have been reported meanwhile: that
        was the exec's doing, not the process's end.
        """
        tid = stop.tid
        former = pt.event_message(tid)
        child = former in self.children or tid in self.children or (tid != self.pid and tid not in self.threads)
        for tasks in (self.threads, self.children):
            tasks.discard(former)
            tasks.discard(tid)
        if child:
            pt.detach(tid)
            return True
        self.threads.add(tid)
        if tid == self.pid:
            self.ended = None
        self._resume(stop)
        return False

    @staticmethod
    def _resume(stop: Stop) -> None:
        if stop.group_stop:
            pt.listen(stop.tid)
        else:
            pt.cont(stop.tid, stop.signal if stop.signal_delivery else 0)

    def detach(self, tids: set[int] | None = None) -> None:
        """Let `tids` (default: every traced task) go, each with the signal it was about to receive.

        A thread they start meanwhile goes too. A child they fork meanwhile
        goes along only when every task goes; else it stays traced, as one
        of the `children`: its fork may have begun while pages were still
        missing, which it then misses too.
        """
        self._tracer()
        every = tids is None
        pending = set(self.threads | self.children) if tids is None else set(tids)
        for tid in list(pending):
            try:
                pt.interrupt(tid)
            except ProcessLookupError:
                pending.discard(tid)
        stops: list[Stop] = []  # first stops of new tasks that go too, taken from _early
        while pending:
            if stops:
                stop = stops.pop()
            else:
                # any task's: a leader's exit is reported only after its other threads' were collected
                try:
                    stop = Stop(*os.waitpid(-1, pt.WALL | pt.WNOTHREAD))
                except ChildProcessError:
                    break
            tid = stop.tid
            if stop.event == pt.EVENT_EXEC and (former := pt.event_message(tid)) in pending:
                pending.discard(former)  # the thread that ran it took over this tid, whatever was said of it
                pending.add(tid)
            if tid not in pending:
                self._pass_on(stop)  # a task that stays, or a new one: waits in _early for its creator's event
                continue
            pending.discard(tid)
            self.threads.discard(tid)
            self.children.discard(tid)
            if stop.exited:
                if tid == self.pid:
                    self.ended = stop.ending
                continue
            with contextlib.suppress(ProcessLookupError):
                if stop.event == pt.EVENT_CLONE or (every and stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK)):
                    new = pt.event_message(tid)
                    pending.add(new)  # its first stop, come or to come, lets it go too
                    if new in self._early:
                        stops.append(self._early.pop(new))
                elif stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK):
                    self._adopt(pt.event_message(tid), self.children)
                elif stop.event == pt.EVENT_EXEC and tid == self.pid:
                    self.ended = None  # the leader's end, if reported, was the exec's
                pt.detach(tid, stop.signal if stop.signal_delivery else 0)

    def kill(self) -> None:
        """SIGKILL the process and every child it forked, and collect them.

        PermissionError: memcr lacks CAP_KILL for another user's process.
        """
        self._tracer()
        tasks = self.threads | self.children | set(self._early)
        self._early.clear()
        for tid in list(tasks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(tid, signal.SIGKILL)
        while tasks:
            try:
                pid, status = os.waitpid(-1, pt.WALL | pt.WNOTHREAD)
            except ChildProcessError:
                break
            stop = Stop(pid, status)
            if stop.exited:
                if pid not in tasks:
                    self._others[pid] = status
                tasks.discard(pid)
            elif stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK, pt.EVENT_CLONE):
                child = pt.event_message(pid)
                tasks.add(child)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        self.threads.clear()
        self.children.clear()

    def _tracer(self) -> None:
        check_tracer(self.owner)
