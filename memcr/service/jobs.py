"""One job of the daemon: a target, one pid or a group, from its checkpoint to its restore.

A job's thread seizes its target (or, for a group, has memcr.group.park give
each member a thread), so by the ptrace rule it is the only thread that
touches it, and it lives until the target is released. What differs
between a pid and a group (how it is parked, what is logged and reported,
how it wakes) is the job's Target and the Held it parks
(memcr.service.pid_target, memcr.service.group_target). A job knows the
daemon only as a Host: it never imports it.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from memcr import logs
from memcr.advice import explain
from memcr.errors import Aborted, MemcrError, TargetKilled
from memcr.options import Cancel, Log, Options
from memcr.report import GroupReport, Report
from memcr_client.protocol import Answer

if TYPE_CHECKING:
    from memcr.lazy.restore import LazyRestore

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID
POLL = 1.0  # seconds between looks at whether a parked target still lives

Reply = Callable[[int], None]


class State(enum.Enum):
    CHECKPOINTING = "checkpointing"
    CHECKPOINTED = "checkpointed"
    RESTORING = "restoring"
    GONE = "gone"  # released, or never parked: it takes no more requests


@dataclass(frozen=True)
class Restore:
    """A restore request: who gets the answer (None at shutdown), its time limit, whether lazily (None: as
    --lazy says) and whether it keeps the dump for an incremental re-park (None: as --incremental says)."""

    reply: Reply | None
    limit: float | None
    lazy: bool | None = None
    incremental: bool | None = None


class Host(Protocol):
    """What a job needs of the daemon that runs it."""

    log: Log
    json_reports: bool

    def report(self, report: Report | GroupReport, event: str) -> None: ...
    def linger(self, job: Job[Any], phase: LazyRestore) -> None: ...
    def unlinger(self, job: Job[Any]) -> None: ...


class Held(Protocol):
    """A target parked, until it wakes."""

    def summary(self) -> str: ...
    def reports(self) -> Sequence[Report | GroupReport]: ...
    def dead(self) -> bool: ...
    def bury(self, log: Log) -> None: ...
    def tidy(self) -> None: ...
    def restore(self, lazy: bool | None, incremental: bool | None, log: Log) -> LazyRestore | None: ...
    def rescue(self) -> None: ...
    def rollback(self, error: Aborted) -> None: ...


class Target(Protocol):
    """What a job parks: one pid, or a group under an id; str() names it in log lines."""

    pid: int

    def park(self, options: Options, log: Log, cancel: Cancel) -> Held: ...
    def answer(self, error: MemcrError) -> int: ...
    def aborted(self, error: MemcrError | None) -> int: ...
    def error_json(self, operation: str, error: MemcrError, options: dict[str, object]) -> str: ...
    def forget(self) -> None: ...


T = TypeVar("T", bound=Target)


class Job(threading.Thread, Generic[T]):
    """One target from its checkpoint to its restore.

    `options` and `timeout` are the daemon's, or what the checkpoint's
    request made of them (a V2 dump directory or compression, a 12-byte
    time limit).
    """

    def __init__(self, host: Host, target: T, options: Options, timeout: float | None, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.host = host
        self.target = target
        self.pid = target.pid
        self.options = options
        self.timeout = timeout
        self.cancel = Cancel()  # of the checkpoint, until it has ended
        self.state = State.CHECKPOINTING
        self.lock = threading.Lock()  # guards state against requests handed over meanwhile
        self.checkpointed = threading.Event()  # set when the checkpoint has ended, well or not
        self.checkpoint_code: int = ERROR
        self.checkpoint_error: MemcrError | None = None  # why it failed, when it did
        self.failure: str | None = None  # the line logged about the last failure: a V2 client's reason (1003)
        # set (under `lock`) when the client was answered -1 at the time limit while the checkpoint still ran:
        # a checkpoint that ends well after that is rolled back, since the client was told it failed
        self.expired = False
        self.decided = False  # set (under `lock`) once a successful checkpoint has looked at `expired`
        self.requests: queue.Queue[Restore] = queue.Queue()
        self.restore_asked = False

    def __str__(self) -> str:
        return str(self.target)

    def run(self) -> None:
        timer = self._deadline()
        held = None
        try:
            held = self.target.park(self.options, self.host.log, self.cancel)
            with self.lock:
                expired = self.expired
                self.decided = True  # from here on expire() comes too late: the checkpoint's own answer stands
            if expired:
                # it ended between the client's -1 and the cancel taking effect: the -1 must stay true
                late, held = held, None
                late.rollback(Aborted(f"the checkpoint of pid {self.pid} took longer than {self.timeout:g} s"))
                raise Aborted(f"took longer than its time limit of {self.timeout:g} s; rolled back", pid=self.pid)
            self.checkpoint_code = OK
        except MemcrError as e:
            self.checkpoint_code = self.target.answer(e)
            self.checkpoint_error = e
        except Exception:
            self.failure = f"{self}: internal error during checkpoint (the daemon's log has its traceback)"
            logs.error(self.host.log, f"{self}: internal error during checkpoint:\n{traceback.format_exc()}")
        finally:
            if timer:
                timer.cancel()
        if held is None:
            with self.lock:
                self.decided = True  # a failure's own answer (-2, or -1 with its reason) stands from here on
            self._leave()  # before waking anyone: a later RESTORE must find nothing
            if self.checkpoint_error is not None:
                # after leaving: a client that reads this line (or was answered at its limit) and asks again
                # finds the pid free, not still "checkpointed"
                self._note("checkpoint", self.checkpoint_error)
            self.checkpointed.set()
            return
        self.state = State.CHECKPOINTED
        self.host.log(f"{self} checkpointed{held.summary()}")
        for report in held.reports():
            self.host.report(report, "checkpoint")
        self.checkpointed.set()
        try:
            held.tidy()  # while parked, the client answered: nobody waits for it
            self._serve_restore(held)
        except BaseException:
            # a target must not stay parked with nobody left to serve it
            logs.error(self.host.log, f"{self}: internal error while parked:\n{traceback.format_exc()}")
            with contextlib.suppress(Exception):
                held.rescue()
            self._leave()

    def _deadline(self) -> threading.Timer | None:
        if not self.timeout:
            return None
        timer = threading.Timer(self.timeout, self.abort)
        timer.daemon = True
        timer.start()
        return timer

    def abort(self) -> None:
        """Roll back the checkpoint if it is still under way (from any thread)."""
        self.cancel.cancel()

    def expire(self) -> bool:
        """At the client's time limit: True when the checkpoint still runs, and is now bound to roll back.

        The client is answered -1 at once: the rollback of a large target
        takes long, and a client with a time limit (Thunder's) has gone by
        the time it ends. False when the checkpoint has ended: its own
        answer stands.
        """
        with self.lock:
            if self.decided or self.checkpointed.is_set():
                return False
            self.expired = True
        self.abort()
        return True

    def _note(self, operation: str, error: MemcrError) -> None:
        self.failure = f"{self}: {operation} failed: {explain(error)}"
        logs.error(self.host.log, self.failure)
        self._report_error(operation, error)

    def _report_error(self, operation: str, error: MemcrError) -> None:
        if self.host.json_reports:
            logs.report(self.host.log, self.target.error_json(operation, error, self.options.reported()))

    def _serve_restore(self, held: Held) -> None:
        while True:
            try:
                request = self.requests.get(timeout=POLL)
                break
            except queue.Empty:
                if held.dead():
                    self._leave()
                    held.bury(self.host.log)
                    return
        with self.lock:
            self.state = State.RESTORING
        code, started = OK, time.monotonic()
        phase: LazyRestore | None = None
        try:
            phase = held.restore(request.lazy, request.incremental, self.host.log)
            elapsed = time.monotonic() - started
            if phase is None:
                self.host.log(f"{self} restored in {elapsed * 1000:.0f} ms")
                for report in held.reports():
                    self.host.report(report, "restore")
            else:
                self.host.log(f"{self} runs again after {elapsed * 1000:.0f} ms; its pages come back lazily")
            # of a lazy restore, the time limit bounds the wake-up: that is what the answer is about
            if request.limit and elapsed > request.limit:
                self.failure = f"{self}: restore took longer than its time limit of {request.limit:g} s (it completed)"
                logs.error(self.host.log, self.failure)
                code = ERROR
        except MemcrError as e:
            self._note("restore", e)
            code = ERROR
        except Exception:
            self.failure = f"{self}: internal error during restore (the daemon's log has its traceback)"
            logs.error(self.host.log, f"{self}: internal error during restore:\n{traceback.format_exc()}")
            code = ERROR
        if phase is None:
            self.target.forget()
            if request.reply:
                request.reply(code)
            return
        # the target runs again, which is what the client waits for; its pages follow on this thread, the
        # tracing one, and until they are all back the pid stays listed: a CHECKPOINT or another RESTORE of
        # it meanwhile is answered -2
        if request.reply:
            request.reply(code)
        self._finish_lazily(held, phase)

    def _finish_lazily(self, held: Held, phase: LazyRestore) -> None:
        """Watch the running target until every page is back, and log how that went; the client has its answer.

        Children it forked meanwhile are served after that, until each exits
        or execs; the pid is free for new requests by then.
        """
        try:
            phase.finish()
        except TargetKilled as e:
            self.target.forget()
            self._lazy_failed(e)
            return
        except Exception:
            self.target.forget()
            trace = traceback.format_exc()
            logs.error(self.host.log, f"{self}: internal error during its lazy restore:\n{trace}")
            return
        # the pid is free before a word of the outcome is logged: a client that reads "complete" and asks
        # again finds it free; a job with children to serve is listed among the lingering first, so that a
        # shutdown in between still waits for it
        if phase.lingering:
            self.host.linger(self, phase)
        self.target.forget()
        if phase.ended:
            self.host.log(
                f"{self} ended during its lazy restore ({phase.ended}), {phase.elapsed_ms:.0f} ms after "
                "the wake-up, not by memcr's hand"
            )
        else:
            self.host.log(f"{self}: lazy restore complete in {phase.elapsed_ms:.0f} ms ({phase.faults} faults)")
        for report in held.reports():
            self.host.report(report, "restore")
        if not phase.lingering:
            return
        children = ", ".join(map(str, sorted(phase.running.children)))
        self.host.log(
            f"{self} forked {children} during its lazy restore: their missing pages are served as they "
            "touch them, until each exits or execs"
        )
        try:
            phase.finish_children()
        except TargetKilled as e:
            self._lazy_failed(e)
        except Exception:
            trace = traceback.format_exc()
            logs.error(self.host.log, f"{self}: internal error serving its children:\n{trace}")
        else:
            self.host.log(f"{self}: let go of the processes it forked during its lazy restore")
        finally:
            self.host.unlinger(self)

    def _lazy_failed(self, error: TargetKilled) -> None:
        logs.error(
            self.host.log,
            f"{self}: restore failed during its lazy phase, after the client was answered "
            f"that it runs again: {explain(error)}",
        )
        self._report_error("restore", error)

    def _leave(self) -> None:
        """Stop taking requests, free its pids; answer any request that came in meanwhile."""
        with self.lock:
            self.state = State.GONE
        self.target.forget()
        while not self.requests.empty():
            reply = self.requests.get().reply
            if reply:
                reply(INVALID_PID)

    def restore(
        self, reply: Reply | None, limit: float | None = None, lazy: bool | None = None, incremental: bool | None = None
    ) -> bool:
        """Queue the restore (during a checkpoint, abort it first); False if too late.

        A restore that takes longer than `limit` seconds is answered -1; it
        cannot be stopped halfway, so the target is restored all the same.
        `lazy` (None: the daemon's --lazy): answer once the target runs
        again, and put its pages back after (-1 then means the wake-up took
        longer than `limit`).
        """
        with self.lock:
            if self.state in (State.RESTORING, State.GONE) or self.restore_asked:
                return False  # one restore per checkpoint (its lazy phase included): a second gets -2
            self.restore_asked = True
            self.abort()
            self.requests.put(Restore(reply, limit, lazy, incremental))
            return True
