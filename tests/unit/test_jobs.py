"""A daemon's job (memcr.service.jobs) with a stand-in target: its states, its answers, restore once."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

from memcr.errors import Aborted, MemcrError, TargetError
from memcr.options import Cancel, Log, Options
from memcr.report import GroupReport, Report
from memcr.service.jobs import Job, State
from memcr_client.protocol import Answer

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID


class Host:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.log: Log = self.lines.append
        self.json_reports = False

    def report(self, report: Report | GroupReport, event: str) -> None:
        raise AssertionError("no reports without --json")

    def linger(self, job: Job[Any], phase: Any) -> None:
        raise AssertionError("never lazy")

    def unlinger(self, job: Job[Any]) -> None:
        raise AssertionError("never lazy")


class Held:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.alive = True

    def summary(self) -> str:
        return " (stand-in)"

    def reports(self) -> Sequence[Report | GroupReport]:
        return []

    def dead(self) -> bool:
        return not self.alive

    def bury(self, log: Log) -> None:
        self.events.append("buried")

    def tidy(self) -> None:
        """Nothing to tidy: the events below are the job's requests."""

    def restore(self, lazy: bool | None, incremental: bool | None, log: Log) -> None:
        self.events.append("restored")

    def rescue(self) -> None:
        self.events.append("rescued")

    def rollback(self, error: Aborted) -> None:
        self.events.append("rolled back")


class Target:
    """Parks at once, or when `go` is set; or fails with `error`."""

    def __init__(self, error: MemcrError | None = None, go: threading.Event | None = None) -> None:
        self.pid = 42
        self.error = error
        self.go = go
        self.held = Held()
        self.forgotten = 0

    def __str__(self) -> str:
        return f"pid {self.pid}"

    def park(self, options: Options, log: Log, cancel: Cancel) -> Held:
        if self.go is not None:
            self.go.wait()
        if self.error is not None:
            raise self.error
        return self.held

    def answer(self, error: MemcrError) -> int:
        return INVALID_PID if isinstance(error, TargetError) else ERROR

    def aborted(self, error: MemcrError | None) -> int:
        return OK

    def error_json(self, operation: str, error: MemcrError, options: dict[str, object]) -> str:
        return "{}"

    def forget(self) -> None:
        self.forgotten += 1


def _job(target: Target, timeout: float | None = None) -> tuple[Job[Target], Host]:
    host = Host()
    job = Job(host, target, Options(), timeout, name="memcr-test")
    job.start()
    return job, host


def test_a_parked_target_is_restored_once() -> None:
    target = Target()
    job, host = _job(target)
    job.checkpointed.wait(5)
    assert job.checkpoint_code == OK
    assert job.state is State.CHECKPOINTED
    answers: queue.Queue[int] = queue.Queue()
    assert job.restore(answers.put)
    assert not job.restore(answers.put)  # one restore per checkpoint: the second is told so
    assert answers.get(timeout=5) == OK
    job.join(5)
    assert target.held.events == ["restored"]
    assert target.forgotten == 1
    assert host.lines[0] == "pid 42 checkpointed (stand-in)"
    assert host.lines[1].startswith("pid 42 restored in ")


def test_a_failed_checkpoint_leaves_and_is_answered_by_its_target() -> None:
    target = Target(error=TargetError("no such process", pid=42))
    job, host = _job(target)
    job.join(5)
    assert job.checkpoint_code == INVALID_PID
    assert job.state is State.GONE
    assert job.failure == host.lines[-1]
    assert job.failure is not None and job.failure.startswith("pid 42: checkpoint failed: no such process")
    assert target.forgotten == 1
    assert not job.restore(None)  # gone: a later RESTORE finds nothing


def test_a_checkpoint_that_ends_after_its_expiry_is_rolled_back() -> None:
    go = threading.Event()
    target = Target(go=go)
    job, _ = _job(target, timeout=60.0)
    assert job.expire()  # still under way: bound to roll back
    go.set()
    job.join(5)
    assert target.held.events == ["rolled back"]
    assert job.checkpoint_code == ERROR
    assert isinstance(job.checkpoint_error, Aborted)
    assert not job.expire()  # ended: its own answer stands


def test_a_restore_asked_during_the_checkpoint_waits_for_it() -> None:
    go = threading.Event()
    target = Target(go=go)
    job, _ = _job(target)
    answers: queue.Queue[int] = queue.Queue()
    assert job.restore(answers.put)
    assert job.cancel.cancelled  # the checkpoint is asked to abort
    go.set()  # this stand-in parks all the same
    assert answers.get(timeout=5) == OK
    job.join(5)
    assert target.held.events == ["restored"]


def test_a_target_that_dies_while_parked_is_forgotten() -> None:
    target = Target()
    target.held.alive = False
    job, _ = _job(target)
    job.join(5)  # one poll
    assert job.state is State.GONE
    assert target.held.events == ["buried"]
    assert target.forgotten == 1
