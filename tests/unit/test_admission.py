"""The admission decisions on given /proc status text: which thread may start the parasite, and the refusals.

Rootless: the statuses are canned, the process they name is the test's own.
"""

from __future__ import annotations

import errno
import os

import pytest

from memcr.engine import admission
from memcr.errors import TargetError
from memcr.system import procfs

STATUS = procfs.parse_status("Name:\tapp\nSeccomp:\t0\nTracerPid:\t0\n")
SECCOMP = procfs.parse_status("Name:\tapp\nSeccomp:\t2\nSeccomp_filters:\t1\nTracerPid:\t0\n")


def test_a_plain_thread_is_fit() -> None:
    me = os.getpid()
    assert admission._unfit(me, me, STATUS) is None
    assert admission._unfit(me, me, {}) is None  # a kernel without a Seccomp line


@pytest.mark.parametrize("mode", ["1", "2"])
def test_seccomp_is_unfit(mode: str) -> None:
    assert admission._unfit(os.getpid(), os.getpid(), {**STATUS, "Seccomp": mode}) == "seccomp"


def test_the_first_fit_thread_is_chosen() -> None:
    me = os.getpid()
    assert admission._injection_thread(me, [(me, SECCOMP), (me, STATUS)]) == me
    assert admission.injection_thread(me, {me}) == me


def causes(monkeypatch: pytest.MonkeyPatch, by_tid: dict[int, str | None]) -> None:
    monkeypatch.setattr(admission, "_unfit", lambda _pid, tid, _status: by_tid[tid])


def refusal(threads: list[int]) -> TargetError:
    with pytest.raises(TargetError) as refused:
        admission._injection_thread(100, [(tid, STATUS) for tid in threads])
    assert refused.value.pid == 100
    return refused.value


def test_no_thread_left() -> None:
    assert str(refusal([])) == "process 100 has no thread left (it is ending)"


def test_every_thread_under_seccomp(monkeypatch: pytest.MonkeyPatch) -> None:
    causes(monkeypatch, {100: "seccomp", 101: "seccomp"})
    error = refusal([100, 101])
    assert str(error).startswith("every thread of process 100 runs under seccomp: ")
    assert error.what is None


@pytest.mark.parametrize(
    ("cause", "code", "words"),
    [
        ("sched-deadline", errno.EAGAIN, "runs under SCHED_DEADLINE, which may not start a thread"),
        ("pid-namespace", errno.EINVAL, "called unshare(CLONE_NEWPID): the kernel starts no thread"),
    ],
)
def test_a_cause_the_user_can_lift(monkeypatch: pytest.MonkeyPatch, cause: str, code: int, words: str) -> None:
    causes(monkeypatch, {100: cause, 101: cause})
    alone = refusal([100])
    assert str(alone).startswith(f"process 100 {words}")
    assert (alone.errno, alone.what) == (code, cause)
    every = refusal([100, 101])
    assert str(every).startswith(f"every thread of process 100 {words}")


def test_mixed_causes_name_each_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    causes(monkeypatch, {100: "seccomp", 101: "sched-deadline", 102: "sched-deadline"})
    error = refusal([100, 101, 102])
    assert str(error) == (
        "no thread of process 100 can start memcr's parasite: "
        "thread 100 under seccomp; threads 101, 102 under SCHED_DEADLINE"
    )
    assert error.what == "sched-deadline"


@pytest.mark.parametrize(
    ("cmdline", "words"),
    [
        (["/usr/bin/memcr", "-p", "7"], "another memcr holds it; wait for that memcr to finish"),
        (["python3", "-m", "memcr", "-p", "7"], "another memcr holds it; wait for that memcr to finish"),
        (["gdb", "-p", "7"], "another memcr or a tracer (a debugger, strace) holds it"),
        ([""], "another memcr or a tracer (a debugger, strace) holds it"),  # gone, or not ours to read
    ],
)
def test_already_traced_names_the_tracer(monkeypatch: pytest.MonkeyPatch, cmdline: list[str], words: str) -> None:
    monkeypatch.setattr(procfs, "command_line", lambda _pid: cmdline)
    assert words in str(admission.already_traced(7, 7, 99))
    error = admission.already_traced(7, 8, 99)
    assert str(error).startswith("thread 8 of process 7 is already traced by process 99: ")
    assert (error.pid, error.what) == (7, "another-memcr")


def test_own_process_shares_its_memory_with_nobody() -> None:
    assert admission.mm_sharers(os.getpid()) == []
    assert admission.async_writers(os.getpid()) == []


def test_a_worker_seen_once_without_a_wait_channel_is_not_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/PID/task/TID/wchan reads "0" while the thread is on a run queue, its state S or not: between
    setting S and sleeping, or preempted there, as a worker does each time it goes to sleep in its next
    request. Seen (review31b): a worker in wait_for_partner for 50 ms, then one look of S, "0", S; memcr
    stopped it and the open it had just begun completed with -512. "0" once in the middle of a request
    says nothing of a hidden wait channel: the worker is still in one."""
    channels = iter(["wait_for_partner"] * 5 + ["0"] + ["wait_for_partner"] * 10_000)
    stat = procfs.Stat(pid=101, comm="iou-wrk-100", state="S", ppid=1, flags=0)
    monkeypatch.setattr(procfs, "read_stat", lambda _path: stat)
    monkeypatch.setattr(procfs, "wait_channel", lambda _pid, _tid=None: next(channels))
    monkeypatch.setattr(admission.time, "sleep", lambda _s: None)
    ticks = iter(range(10_000))
    monkeypatch.setattr(admission.time, "monotonic", lambda: next(ticks) / 100)  # 10 ms a look
    with pytest.raises(TargetError, match="in the middle of a request"):
        admission.wait_io_worker_idle(100, 101, deadline=0.5)
