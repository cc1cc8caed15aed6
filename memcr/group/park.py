"""Park an app, not a process: a process tree or a cgroup, all or nothing.

Each member gets a thread of its own: it runs checkpoint() on the member
and, by the ptrace rule, every later request for it (restore, rollback,
kill). A park goes in two steps:

1. hold: every member's threads are seized (checkpoint's `seized` hook
   waits there), then the membership is walked again and new members are
   seized, until a walk finds nobody new. A held process cannot fork, so
   the set is then closed. A cgroup is frozen meanwhile, so that nobody in
   it forks or exits while it is being seized.
2. stream: the members dump in parallel, as many at once as there are cores.

A failure of any member, before or after its pages went, rolls back every
other one: the group is either parked whole or runs on as it was. A
process that ended before memcr held it is no member (there is nothing of
it to park); one that dies once held fails the park.
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from memcr import logs
from memcr.errors import (
    Aborted,
    GroupError,
    MemcrError,
    TargetEnded,
    TargetError,
    TargetGone,
    TargetKilled,
)
from memcr.group.cgroup import Cgroup
from memcr.options import Cancel, Log, Options
from memcr.park.checkpoint import checkpoint
from memcr.park.parked import Parked
from memcr.report import GroupReport, Report
from memcr.system import processes

POLL = 0.1  # seconds between looks at a cancel request while waiting
WATCH = 0.25  # seconds between looks at whether a parked member still lives
EXIT_WAIT = 1.0  # seconds a process that said it is gone may take to show as ended


class Membership(Protocol):
    """Who belongs to the group now, and how to hold it still while it is seized."""

    def __str__(self) -> str: ...
    def walk(self) -> set[int]: ...
    def hold(self, log: Log) -> AbstractContextManager[None]: ...


class Tree:
    """A process and every descendant of it, by the parent links of the process table."""

    def __init__(self, root: int) -> None:
        self.root = root

    def __str__(self) -> str:
        return f"tree {self.root}"

    def walk(self) -> set[int]:
        parents = processes.parent_links()
        if self.root not in parents:
            raise TargetError(f"no such process: {self.root}", pid=self.root, what="look up")
        return {self.root} | descendants(self.root, parents)

    def hold(self, log: Log) -> AbstractContextManager[None]:
        # nothing freezes a tree at once: held members cannot fork, and the walks repeat until stable
        return contextlib.nullcontext()


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """Every process below `root` by the links of `parents` (pid -> parent pid)."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    below = list(children.get(root, []))
    while below:  # pid reuse between two reads can make a loop of links: `found` ends it
        pid = below.pop()
        if pid not in found and pid != root:
            found.add(pid)
            below += children.get(pid, [])
    return found


class CgroupMembers:
    """Every process of a cgroup v2 and its sub-cgroups, held by the cgroup's freezer."""

    def __init__(self, cgroup: Cgroup) -> None:
        self.cgroup = cgroup

    def __str__(self) -> str:
        return f"cgroup {self.cgroup}"

    def walk(self) -> set[int]:
        return self.cgroup.pids()

    def hold(self, log: Log) -> AbstractContextManager[None]:
        return self.cgroup.frozen(log)


class Stage(enum.Enum):
    """Where a member's checkpoint is, until it ends."""

    SEIZING = "seizing"  # its threads being seized
    HELD = "held"  # every thread seized: it can fork no more; waits for the group, then for a slot
    STREAMING = "streaming"  # holds one of the park's streaming slots
    VANISHED = "vanished"  # ended before memcr held it: no member (its checkpoint has ended)


@dataclass(frozen=True)
class Checkpointed:
    """Its checkpoint succeeded: its thread serves its last request."""

    parked: Parked


@dataclass(frozen=True)
class Failed:
    """Its checkpoint failed once it was a member: the park rolls back."""

    error: Exception


State = Stage | Checkpointed | Failed
_UNDER_WAY = (Stage.SEIZING, Stage.HELD, Stage.STREAMING)


class _Member(threading.Thread):
    """One member from its seize to its ending; the only thread that touches it."""

    def __init__(self, pid: int, park: _Park) -> None:
        super().__init__(name=f"memcr-{pid}", daemon=True)
        self.pid = pid
        self.park = park
        self.cancel = Cancel()
        self.state: State = Stage.SEIZING
        self.requests: queue.Queue[tuple[Callable[[Parked], None], Future[None]]] = queue.Queue()

    @property
    def done(self) -> bool:
        """checkpoint() has ended."""
        return self.state not in _UNDER_WAY

    def log(self, message: str) -> None:
        self.park.log(f"pid {self.pid}: {message}")

    def run(self) -> None:
        ended: State = Failed(Aborted(f"pid {self.pid}: its checkpoint was interrupted", pid=self.pid))
        try:
            ended = Checkpointed(checkpoint(self.pid, self.park.options, self.log, self.cancel, seized=self._seized))
        except Exception as e:
            # a process that exited (or turned zombie) before it was held was never part of the park
            ended = Stage.VANISHED if self.state is Stage.SEIZING and _ended(self.pid, e) else Failed(e)
        finally:
            if self.state is Stage.STREAMING:
                self.park.slots.release()
            self.park.ended(self, ended)
        if isinstance(ended, Checkpointed):
            self._serve(ended.parked)

    def _serve(self, parked: Parked) -> None:
        """Wait for this member's last request and carry it out, meanwhile watching it: one killed from
        outside while the group is parked is let go of at once, so that its parent can reap it (memcr, its
        tracer, holds its exit until then), and its ending is noted for the request."""
        ending = None  # how it ended while parked, not by memcr's hand ("killed by SIGKILL")
        while True:
            try:
                action, result = self.requests.get(timeout=WATCH)
                break
            except queue.Empty:
                if ending is None and (ending := parked.ended()) is not None:
                    logs.error(
                        self.park.log,
                        f"pid {self.pid}: ended while its group is parked ({ending}), not by memcr's hand: "
                        "memcr let go of it",
                    )
        if ending is not None:
            # nothing of it is left to restore or roll back: the request learns how it ended
            result.set_exception(
                TargetEnded(f"pid {self.pid} ended while parked ({ending}), not by memcr's hand", pid=self.pid)
            )
            return
        try:
            action(parked)
        except Exception as e:
            result.set_exception(e)
        else:
            result.set_result(None)

    def _seized(self) -> None:
        """checkpoint's hook: wait for the whole group to be held, then for a streaming slot."""
        park = self.park
        with park.changed:
            self.state = Stage.HELD
            park.changed.notify_all()
        park.decided.wait()
        while park.go and not park.aborting:
            if park.slots.acquire(timeout=POLL):
                self.state = Stage.STREAMING
                return
        raise Aborted(f"the park of {park.membership} failed: pid {self.pid} runs on as it was", pid=self.pid)

    def ask(self, action: Callable[[Parked], None]) -> Future[None]:
        """Have this member's thread carry out `action` on its parked process (its last request)."""
        result: Future[None] = Future()
        self.requests.put((action, result))
        return result


class _Park:
    """The park of one group under way."""

    def __init__(self, membership: Membership, options: Options, log: Log, cancel: Cancel) -> None:
        self.membership = membership
        self.options = options
        self.log = log
        self.cancel = cancel
        self.members: dict[int, _Member] = {}
        self.changed = threading.Condition()
        self.decided = threading.Event()  # set once go says whether the held members stream or let go
        self.go = False
        self.aborting = False
        self.failure: tuple[int | None, Exception] | None = None  # the first one: (member or None, error)
        self.slots = threading.Semaphore(os.cpu_count() or 1)

    def run(self) -> ParkedGroup:
        started = time.monotonic()
        try:
            self._refuse_never(self.membership.walk())  # before a cgroup's freezer too
            with self.membership.hold(self.log):
                self._hold_all()
        except Exception as e:  # the walk or the hold itself: no member is to blame
            self._fail(None, e)
        finally:
            # only now that the cgroup is thawed: a parasite cannot run in a frozen task
            with self.changed:
                self.go = not self.aborting
                self.decided.set()  # a member waiting in its hook must never wait for ever
        self._wait(lambda: all(m.done for m in self.members.values()))
        members = sorted((m for m in self.members.values() if m.state is not Stage.VANISHED), key=lambda m: m.pid)
        if vanished := sorted(m.pid for m in self.members.values() if m.state is Stage.VANISHED):
            shown = ", ".join(map(str, vanished[:10])) + (", ..." if len(vanished) > 10 else "")
            self.log(f"{len(vanished)} of the processes found in {self.membership} ended before memcr held them, "
                     f"so they are not part of it: {shown}")  # fmt: skip
        if self.failure is None and not self.aborting and not members:
            self._fail(None, TargetGone(f"no process to park in {self.membership}: every one ended"))
        if self.failure is not None:  # set with `aborting`
            raise self._roll_back(self.failure, members)
        parked = [(m, m.state.parked) for m in members if isinstance(m.state, Checkpointed)]
        report = GroupReport.of(
            str(self.membership), [p.report for _, p in parked], (time.monotonic() - started) * 1000
        )
        return ParkedGroup(str(self.membership), parked, report, self.slots)

    def _hold_all(self) -> None:
        """Seize members until a walk, made with every member held, finds nobody new."""
        while not self.aborting:
            if self.cancel.cancelled:
                self._fail(None, Aborted(f"the park of {self.membership} was cancelled"))
                return
            new = self.membership.walk() - self.members.keys()
            if not new:
                return
            self._refuse_never(new)
            for pid in sorted(new):
                if self.aborting:
                    break  # a member that failed already: no other is held for nothing
                member = self.members[pid] = _Member(pid, self)
                member.start()
            self._wait(lambda: all(m.state is not Stage.SEIZING for m in self.members.values()) or self.aborting)

    def _refuse_never(self, pids: set[int]) -> None:
        """Refuse a group holding a process no park may hold, before any member is: the rest of it (a tree
        under init: every process) would be frozen for nothing."""
        if (never := _never(pids)) is not None:
            raise TargetError(f"{self.membership} holds {never}, which memcr never parks")

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self.changed:
            while not ready():
                self.changed.wait(POLL)
                if self.cancel.cancelled and not self.aborting:
                    self._fail(None, Aborted(f"the park of {self.membership} was cancelled"))

    def ended(self, member: _Member, state: State) -> None:
        with self.changed:
            member.state = state
            if isinstance(state, Failed) and not self.aborting:
                self._fail(member.pid, state.error)
            self.changed.notify_all()

    def _fail(self, member: int | None, error: Exception) -> None:
        """The first failure: every member still under way lets go or rolls back."""
        with self.changed:
            if self.failure is None:
                self.failure = (member, error)
            self.aborting = True
            for other in self.members.values():
                other.cancel.cancel()
            self.changed.notify_all()

    def _roll_back(self, failure: tuple[int | None, Exception], members: list[_Member]) -> GroupError:
        """Put every parked member back; the error names the first failure and every member killed."""
        culprit, cause = failure
        parked = [m for m in members if isinstance(m.state, Checkpointed)]
        rollbacks = {m.pid: m.ask(lambda parked: parked.rollback(cause)) for m in parked}
        outcomes: dict[int, BaseException | None] = {
            m.pid: m.state.error for m in members if isinstance(m.state, Failed)
        }
        outcomes |= {pid: result.exception() for pid, result in rollbacks.items()}
        killed = sorted(pid for pid, e in outcomes.items() if isinstance(e, TargetKilled))
        ended = (TargetGone, TargetEnded)  # during its checkpoint, or killed from outside once parked
        gone = sorted(pid for pid, e in outcomes.items() if isinstance(e, ended) and pid != culprit)
        where = f" at process {culprit}" if culprit is not None else ""
        reason = str(cause) if isinstance(cause, MemcrError) else repr(cause)
        outcome = "every member runs on as it was"
        if killed:
            outcome = f"memcr had to kill process {', '.join(map(str, killed))}; the others run on as they were"
        if gone:
            outcome += f" (process {', '.join(map(str, gone))} ended meanwhile)"
        return GroupError(
            f"parking {self.membership} failed{where}: {reason}; {outcome}", cause, culprit, killed=killed, gone=gone
        )


def _never(pids: set[int]) -> str | None:
    """The process among `pids` that no park may hold, in words, or None."""
    for pid, what in ((1, "pid 1 (init)"), (os.getpid(), "memcr itself"), (os.getppid(), "memcr's parent")):
        if pid in pids:
            return f"{what}, pid {pid}" if pid != 1 else what
    return None


def _ended(pid: int, error: Exception) -> bool:
    """Whether `pid` has ended (or is a zombie), after `error` stopped its checkpoint before the hold.

    An exit is under way for a moment before /proc shows the zombie:
    after a TargetGone, look again for a while rather than count it as a
    live process that failed.
    """
    deadline = time.monotonic() + (EXIT_WAIT if isinstance(error, TargetGone) else 0)
    while processes.alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class ParkedGroup:
    """Every member of a group parked; restore() wakes them all."""

    def __init__(
        self, name: str, members: list[tuple[_Member, Parked]], report: GroupReport, slots: threading.Semaphore
    ) -> None:
        self.name = name
        self._members = members
        self.report = report
        self._slots = slots

    @property
    def reports(self) -> list[Report]:
        """Each member's own figures, by pid."""
        return [parked.report for _, parked in self._members]

    def restore(self) -> None:
        """Wake every member, as many at once as there are cores; raise GroupError naming those that failed.

        Each member keeps the cardinal rule on its own: one that cannot be
        restored is killed, and the others are restored all the same.
        """
        started = time.monotonic()
        results = {m.pid: m.ask(self._restore_one) for m, _ in self._members}
        failed = {pid: e for pid, result in results.items() if (e := result.exception()) is not None}
        self.report.restored(self.reports, (time.monotonic() - started) * 1000)
        if failed:
            killed = sorted(pid for pid, e in failed.items() if isinstance(e, TargetKilled))
            gone = sorted(pid for pid, e in failed.items() if isinstance(e, (TargetGone, TargetEnded)))
            # a member killed by memcr's hand speaks for the group (its exit code), then one that ended on its own
            first = min(failed, key=lambda pid: (not isinstance(failed[pid], TargetKilled), pid))
            reasons = "; ".join(f"process {pid}: {e}" for pid, e in sorted(failed.items()))
            others = len(self._members) - len(failed)
            if others:
                reasons += f"; the other {others} process{'' if others == 1 else 'es'} restored"
            raise GroupError(f"restoring {self.name} failed for {reasons}", failed[first], first, killed, gone)

    def _restore_one(self, parked: Parked) -> None:
        with self._slot():
            parked.restore()

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()


def park(membership: Membership, options: Options, log: Log, cancel: Cancel | None = None) -> ParkedGroup:
    """Park every member of the group, or none: raises GroupError (the members run on) when one fails."""
    return _Park(membership, options, log, cancel or Cancel()).run()
