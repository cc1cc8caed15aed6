"""A group member's stages and outcomes, with checkpoint() replaced by a fake: no ptrace, no real targets.

Rootless; the parks of real processes are in tests/test_groups.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import pytest

from memcr.errors import GroupError, TargetError, TargetGone
from memcr.group import park as group
from memcr.options import Cancel, Log, Options
from memcr.report import Report

GONE = 4_000_000  # above any pid_max: a process that does not exist


class FakeParked:
    def __init__(self, pid: int) -> None:
        self.report = Report(pid, 4096, threads=1, pages=1, dropped_pages=1, shared_pages=0, dump_bytes=4096)
        self.report.rss_before = self.report.rss_after = {"VmRSS": 1, "RssAnon": 1, "RssFile": 0}
        self.calls: list[str] = []

    def restore(self) -> None:
        self.calls.append("restore")

    def rollback(self, error: BaseException) -> None:
        self.calls.append(f"rollback: {error}")

    def ended(self) -> str | None:
        return None


class Members:
    def __init__(self, pids: set[int]) -> None:
        self.pids = pids

    def __str__(self) -> str:
        return "fake group"

    def walk(self) -> set[int]:
        return self.pids

    def hold(self, log: Log) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.fixture
def checkpoints() -> dict[int, FakeParked]:
    """Each member's fake Parked, by pid, once its fake checkpoint returned it."""
    return {}


def fake(monkeypatch: pytest.MonkeyPatch, behave: dict[int, str], made: dict[int, FakeParked]) -> list[str]:
    """Replace checkpoint(): by pid, "park" (held, then parked), "fail" (once held) or "vanish" (before).
    Returns each member's stage as its checkpoint saw it once held."""
    stages: list[str] = []
    lock = threading.Lock()

    def checkpoint(pid: int, options: Options, log: Log, cancel: Cancel, seized: Callable[[], None]) -> FakeParked:
        if behave[pid] == "vanish":
            raise TargetGone(f"process {pid} is gone", pid=pid)
        seized()
        member = next(t for t in threading.enumerate() if t.name == f"memcr-{pid}")
        assert isinstance(member, group._Member)
        with lock:
            stages.append(f"{pid} {member.state.value}")
        if behave[pid] == "fail":
            raise TargetError(f"process {pid} refused", pid=pid)
        made[pid] = FakeParked(pid)
        return made[pid]

    monkeypatch.setattr(group, "checkpoint", checkpoint)
    return stages


def run(pids: set[int], lines: list[str]) -> group.ParkedGroup:
    return group.park(Members(pids), Options(), lines.append)


def test_members_go_from_seizing_to_checkpointed(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[int, FakeParked]
) -> None:
    pids = {GONE + 1, GONE + 2}
    stages = fake(monkeypatch, dict.fromkeys(pids, "park"), checkpoints)
    parked = run(pids, [])
    assert sorted(stages) == [f"{pid} streaming" for pid in sorted(pids)]  # held, then a slot
    assert [r.pid for r in parked.reports] == sorted(pids)
    parked.restore()
    assert all(p.calls == ["restore"] for p in checkpoints.values())
    cores = os.cpu_count() or 1
    assert all(parked._slots.acquire(blocking=False) for _ in range(cores))  # every slot given back


def test_a_failed_member_rolls_back_the_others(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[int, FakeParked]
) -> None:
    ok, bad = GONE + 1, GONE + 2
    fake(monkeypatch, {ok: "park", bad: "fail"}, checkpoints)
    with pytest.raises(GroupError) as failed:
        run({ok, bad}, [])
    assert str(failed.value) == (
        f"parking fake group failed at process {bad}: process {bad} refused; every member runs on as it was"
    )
    if ok in checkpoints:  # it may have been told to let go before its checkpoint ended
        assert checkpoints[ok].calls == [f"rollback: process {bad} refused"]


def test_one_that_ends_before_the_hold_is_no_member(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[int, FakeParked]
) -> None:
    ok, gone = GONE + 1, GONE + 2
    fake(monkeypatch, {ok: "park", gone: "vanish"}, checkpoints)
    lines: list[str] = []
    parked = run({ok, gone}, lines)
    assert [r.pid for r in parked.reports] == [ok]
    assert any(f"ended before memcr held them, so they are not part of it: {gone}" in line for line in lines)


def test_a_group_whose_members_all_vanish_fails(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[int, FakeParked]
) -> None:
    fake(monkeypatch, {GONE + 1: "vanish"}, checkpoints)
    with pytest.raises(GroupError, match="no process to park in fake group: every one ended"):
        run({GONE + 1}, [])


def test_stages() -> None:
    member = group._Member(GONE, object())  # type: ignore[arg-type]
    assert member.state is group.Stage.SEIZING and not member.done
    member.state = group.Stage.HELD
    assert not member.done
    member.state = group.Stage.VANISHED
    assert member.done
    member.state = group.Failed(TargetGone("gone"))
    assert member.done
