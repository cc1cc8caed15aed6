"""Service mode for a group: a process tree or a cgroup parked all or nothing (V2 options 1000 and 1001).

A GroupWorker sees one group from its park to its wake-up, as a Worker
does one pid. It touches no member itself: memcr.group gives each member a
thread of its own, which by the ptrace rule carries out every request for
it. The daemon knows the group under its id (the request's pid) and under
each member's pid, so that a RESTORE of any of them wakes the whole group,
and a CHECKPOINT of any of them is refused as for a pid already parked.
Members are claimed as the park finds them, before any is seized: a pid is
parked on its own or in one group, never twice.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from memcr import logs
from memcr.advice import explain
from memcr.errors import GroupError, TargetError
from memcr.group import Membership, ParkedGroup, Tree, park
from memcr.options import Cancel, Log, Options
from memcr.procfs import alive
from memcr.report import error_json
from memcr_client.protocol import Answer

if TYPE_CHECKING:
    from memcr.service.daemon import Service

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID
POLL = 1.0  # seconds between looks at whether the parked members still live


class Claimed:
    """A group's membership whose processes are claimed in the daemon's registry as each walk finds them.

    A walk fails when a process found is already parked by the daemon (on
    its own or in another group), when the daemon lacks the descriptors for
    them all, or when the group's id is not among them: that is how a
    cgroup request's pid is checked to be one of the cgroup's.
    """

    def __init__(self, membership: Membership, worker: GroupWorker) -> None:
        self.membership = membership
        self.worker = worker

    def __str__(self) -> str:
        return str(self.membership)

    def walk(self) -> set[int]:
        pids = self.membership.walk()
        if self.worker.pid not in pids:
            raise TargetError(
                f"process {self.worker.pid} is not in {self.membership}: a cgroup request names one of its processes",
                pid=self.worker.pid,
            )
        # every walk, and the last one finds every member held, when none can change its uids any more
        self.worker.vet(pids)
        self.worker.service.claim(self.worker, pids)
        return pids

    def hold(self, log: Log) -> AbstractContextManager[None]:
        return self.membership.hold(log)


def answer(error: GroupError) -> int:
    """A failed park's answer, as for one pid: -2 when a member may not or cannot be parked, -1 otherwise."""
    if error.killed:
        return ERROR
    return INVALID_PID if isinstance(error.cause, TargetError) else ERROR


class GroupWorker(threading.Thread):
    """One group from its park to its wake-up; `claimed` (guarded by the service's lock) are its pids.

    `vet` refuses, by raising, members the client may not have parked.
    """

    def __init__(self, service: Service, pid: int, membership: Membership, options: Options, timeout: float | None,
                 vet: Callable[[set[int]], None]) -> None:  # fmt: skip
        super().__init__(name=f"memcr-group-{pid}", daemon=True)
        self.service = service
        self.pid = pid  # the group's id: the tree's root, or the process a cgroup request named
        self.vet = vet
        self.membership = Claimed(membership, self)
        self.options = options
        self.timeout = timeout
        self.claimed = {pid}
        self.cancel = Cancel()  # of the park, until it has ended
        self.state = "checkpointing"
        self.lock = threading.Lock()  # guards state against requests handed over meanwhile
        self.checkpointed = threading.Event()  # set when the park has ended, well or not
        self.checkpoint_code: int = ERROR
        self.checkpoint_error: GroupError | None = None
        self.failure: str | None = None  # the line logged about the last failure: a V2 client's reason (1003)
        # the restore request: who gets the answer (None at shutdown), and its time limit
        self.requests: queue.Queue[tuple[Callable[[int], None] | None, float | None]] = queue.Queue()
        self.restore_asked = False

    def __str__(self) -> str:
        # a tree's id is its root, which its name says; a cgroup's is the process its request named
        return (
            str(self.membership)
            if isinstance(self.membership.membership, Tree)
            else f"{self.membership} (pid {self.pid})"
        )

    def run(self) -> None:
        timer = threading.Timer(self.timeout, self.cancel.cancel) if self.timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        group = None
        try:
            group = park(self.membership, self.options, self.service.log, self.cancel)
            self.checkpoint_code = OK
        except GroupError as e:
            self._note("checkpoint", e)
            self.checkpoint_code = answer(e)
            self.checkpoint_error = e
        except Exception:
            self.failure = f"{self}: internal error during checkpoint (the daemon's log has its traceback)"
            logs.error(self.service.log, f"{self}: internal error during checkpoint:\n{traceback.format_exc()}")
        finally:
            if timer:
                timer.cancel()
        if group is None:
            self._leave()  # before waking anyone: a later RESTORE must find nothing
            self.checkpointed.set()
            return
        # processes that ended before memcr held them are no members: their pids are free again
        self.service.release(self, keep={self.pid, *group.report.members})
        self.state = "checkpointed"
        g = group.report
        self.service.log(f"{self} checkpointed: {len(g.members)} processes, {g.pages} pages in {g.park_ms:.0f} ms")
        for report in group.reports:
            self.service.report(report, "checkpoint")
        self.service.report(g, "checkpoint")
        self.checkpointed.set()
        try:
            self._serve_restore(group)
        except BaseException:
            # no member may stay parked with nobody left to serve it
            logs.error(self.service.log, f"{self}: internal error while parked:\n{traceback.format_exc()}")
            with contextlib.suppress(Exception):
                group.restore()
            self._leave()

    def _note(self, operation: str, error: GroupError) -> None:
        self.failure = f"{self}: {operation} failed: {explain(error)}"
        logs.error(self.service.log, self.failure)
        if self.service.json_reports:
            line = error_json(error.pid, operation, error, group=str(self.membership), options=self.options.reported())
            logs.report(self.service.log, line)

    def _serve_restore(self, group: ParkedGroup) -> None:
        while True:
            try:
                reply, limit = self.requests.get(timeout=POLL)
                break
            except queue.Empty:
                if not any(_alive(pid) for pid in group.report.members):
                    self._leave()
                    self.service.log(f"{self}: every member died while checkpointed: forgotten")
                    with contextlib.suppress(GroupError):
                        group.restore()  # lets go of what memcr held for each
                    return
        with self.lock:
            self.state = "restoring"
        code, started = OK, time.monotonic()
        try:
            group.restore()
            elapsed = time.monotonic() - started
            self.service.log(f"{self} restored in {elapsed * 1000:.0f} ms")
            for report in group.reports:
                self.service.report(report, "restore")
            self.service.report(group.report, "restore")
            if limit and elapsed > limit:
                self.failure = f"{self}: restore took longer than its time limit of {limit:g} s (it completed)"
                logs.error(self.service.log, self.failure)
                code = ERROR
        except GroupError as e:
            self._note("restore", e)
            code = ERROR
        except Exception:
            self.failure = f"{self}: internal error during restore (the daemon's log has its traceback)"
            logs.error(self.service.log, f"{self}: internal error during restore:\n{traceback.format_exc()}")
            code = ERROR
        self.service.release(self)
        if reply:
            reply(code)

    def _leave(self) -> None:
        """Stop taking requests, free every pid claimed; answer any request that came in meanwhile."""
        with self.lock:
            self.state = "gone"
        self.service.release(self)
        while not self.requests.empty():
            reply, _ = self.requests.get()
            if reply:
                reply(INVALID_PID)

    def restore(self, reply: Callable[[int], None] | None, limit: float | None = None) -> bool:
        """Queue the group's restore (during the park, abort it first); False if too late."""
        with self.lock:
            if self.state in ("restoring", "gone") or self.restore_asked:
                return False  # one restore per park: a second request gets -2, not silence
            self.restore_asked = True
            self.cancel.cancel()
            self.requests.put((reply, limit))
            return True

    def wake(self, limit: float | None) -> int:
        """A client's RESTORE of any member's pid: the answer once every member runs again."""
        answered: queue.Queue[int] = queue.Queue(1)
        if not self.restore(answered.put, limit):
            self.service.refuse(f"answered -2 to a restore of {self}: it is being restored already")
            return INVALID_PID
        self.checkpointed.wait()
        if self.checkpoint_code != OK:
            # the aborted park rolled back: every member runs on as it was, unless memcr had to kill one
            error = self.checkpoint_error
            if error is None or error.killed:
                self.service.reason.text = self.failure
                return ERROR
            return OK
        code = answered.get()
        if code != OK:
            self.service.reason.text = self.failure  # set before the answer was put: the queue orders them
        return code


def _alive(pid: int) -> bool:
    try:
        return alive(pid)
    except OSError:
        return True  # out of descriptors, say: it may well be alive, look again later
