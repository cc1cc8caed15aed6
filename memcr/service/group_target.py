"""A job's target when it is a group: a process tree or a cgroup parked all or nothing (V2 options 1000 and 1001).

The job touches no member itself: memcr.group.park gives each member a thread
of its own, which by the ptrace rule carries out every request for it.
The daemon knows the group under its id (the request's pid) and under
each member's pid, so that a RESTORE of any of them wakes the whole group,
and a CHECKPOINT of any of them is refused as for a pid already parked.
Members are claimed as the park finds them, before any is seized: a pid is
parked on its own or in one group, never twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager

from memcr.errors import Aborted, GroupError, MemcrError, TargetError
from memcr.group.park import Membership, ParkedGroup, Tree, park
from memcr.options import Cancel, Log, Options
from memcr.report import GroupReport, Report, error_json
from memcr.system.processes import alive
from memcr_client.protocol import Answer

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID


class Group:
    """A group under its id: the tree's root, or the process a cgroup request named.

    `claimed` (guarded by the daemon's lock) are its pids. `vet` refuses,
    by raising, members the client may not have parked; `claim` registers
    pids as the group's in the daemon, or raises (TargetError for a pid
    parked already, LimitError when descriptors lack); `release` forgets
    them but those it keeps.
    """

    def __init__(self, pid: int, membership: Membership, vet: Callable[[set[int]], None],
                 claim: Callable[[set[int]], None], release: Callable[[AbstractSet[int]], None]) -> None:  # fmt: skip
        self.pid = pid
        self.membership = membership
        self.vet = vet
        self.claim = claim
        self.release = release
        self.claimed = {pid}

    def __str__(self) -> str:
        # a tree's id is its root, which its name says; a cgroup's is the process its request named
        return str(self.membership) if isinstance(self.membership, Tree) else f"{self.membership} (pid {self.pid})"

    def park(self, options: Options, log: Log, cancel: Cancel) -> HeldGroup:
        group = park(Claimed(self), options, log, cancel)
        # processes that ended before memcr held them are no members: their pids are free again
        self.release({self.pid, *group.report.members})
        return HeldGroup(group, self)

    def answer(self, error: MemcrError) -> int:
        """A failed park's answer, as for one pid: -2 when a member may not or cannot be parked, -1 otherwise."""
        if isinstance(error, GroupError) and not error.killed and isinstance(error.cause, TargetError):
            return INVALID_PID
        return ERROR

    def aborted(self, error: MemcrError | None) -> int:
        """The answer to the RESTORE that aborted its park: every member runs on as it was, unless memcr had to
        kill one."""
        return ERROR if not isinstance(error, GroupError) or error.killed else OK

    def error_json(self, operation: str, error: MemcrError, options: dict[str, object]) -> str:
        return error_json(error.pid, operation, error, group=str(self.membership), options=options)

    def forget(self) -> None:
        self.release(frozenset())


class Claimed:
    """A group's membership whose processes are claimed in the daemon's registry as each walk finds them.

    A walk fails when a process found is already parked by the daemon (on
    its own or in another group), when the daemon lacks the descriptors for
    them all, or when the group's id is not among them: that is how a
    cgroup request's pid is checked to be one of the cgroup's.
    """

    def __init__(self, group: Group) -> None:
        self.group = group

    def __str__(self) -> str:
        return str(self.group.membership)

    def walk(self) -> set[int]:
        group = self.group
        pids = group.membership.walk()
        if group.pid not in pids:
            raise TargetError(
                f"process {group.pid} is not in {group.membership}: a cgroup request names one of its processes",
                pid=group.pid,
            )
        # every walk, and the last one finds every member held, when none can change its uids any more
        group.vet(pids)
        group.claim(pids)
        return pids

    def hold(self, log: Log) -> AbstractContextManager[None]:
        return self.group.membership.hold(log)


class HeldGroup:
    """Every member parked."""

    def __init__(self, parked: ParkedGroup, group: Group) -> None:
        self.parked = parked
        self.group = group

    def summary(self) -> str:
        g = self.parked.report
        return f": {len(g.members)} processes, {g.pages} pages in {g.park_ms:.0f} ms"

    def reports(self) -> Sequence[Report | GroupReport]:
        return [*self.parked.reports, self.parked.report]

    def dead(self) -> bool:
        return not any(_alive(pid) for pid in self.parked.report.members)

    def bury(self, log: Log) -> None:
        log(f"{self.group}: every member died while checkpointed: forgotten")
        with contextlib.suppress(GroupError):
            self.parked.restore()  # lets go of what memcr held for each

    def restore(self, lazy: bool | None, incremental: bool | None, log: Log) -> None:
        self.parked.restore()  # never lazy, nothing kept: the daemon said so when it took the request

    def tidy(self) -> None:
        """A group's dumps are written whole: nothing to tidy."""

    def rescue(self) -> None:
        self.parked.restore()

    def rollback(self, error: Aborted) -> None:
        self.parked.restore()  # before any client heard of the park: the members run on as they were


def _alive(pid: int) -> bool:
    try:
        return alive(pid)
    except OSError:
        return True  # out of descriptors, say: it may well be alive, look again later
