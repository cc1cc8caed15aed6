"""Odd process states (zdtm style): each target checks its memory and its own state afterwards.

A state is either parked and restored with every byte and every bit of
it kept, or refused before the freeze (exit 3) with a message that names
it, the target untouched. Never killed, never hung.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from memcr.system import processes, procfs
from tests.conftest import Memcr, reap

KEPT = ["plain", "handlers", "trap-thread", "trap-process", "pending", "blocking", "seccomp-strict", "registers"]


def state(pid: int) -> str:
    return procfs.read_status(pid)["State"][0]


def wait_state(pid: int, wanted: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while (now := state(pid)) != wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    return now


@pytest.mark.parametrize("mode", KEPT)
def test_state_survives_a_round_trip(spawn, memcr: Memcr, mode: str) -> None:
    target = spawn("states", mode)
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


@pytest.mark.parametrize("mode", ["seccomp-kill", "seccomp-errno"])
def test_seccomp_filter_everywhere_is_refused(spawn, memcr: Memcr, mode: str) -> None:
    target = spawn("states", mode)
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 3, result.stderr
    assert f"every thread of process {target.pid} runs under seccomp" in result.stderr
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_leader_exited_is_refused_accurately(spawn, memcr: Memcr) -> None:
    target = spawn("states", "leader-exited")
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 3, result.stderr
    assert f"the main thread of process {target.pid} has exited while 2 other threads run on" in result.stderr
    assert target.verify() == 0


def test_stopped_target_is_parked_and_stays_stopped(spawn, memcr: Memcr) -> None:
    target = spawn("states", "plain")
    target.proc.send_signal(signal.SIGSTOP)
    assert wait_state(target.pid, "T") == "T"
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 0, result.stderr
    assert wait_state(target.pid, "T") == "T"
    assert procfs.read_status(target.pid)["TracerPid"] == "0"
    target.proc.send_signal(signal.SIGCONT)
    assert target.verify() == 0


@pytest.mark.parametrize("when", ["parked", "streaming"])
def test_sigstop_during_the_park_is_kept(spawn, memcr: Memcr, when: str) -> None:
    target = spawn("pattern", 512 if when == "streaming" else 16, 2)
    session = memcr.interactive("-p", target.pid)
    if when == "streaming":
        session.out.wait_for("candidate VMAs")
        target.proc.send_signal(signal.SIGSTOP)
        session.wait_prompt()
    else:
        session.wait_prompt()
        target.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
    started = time.monotonic()
    assert session.press_enter() == 0, session.stderr()
    assert time.monotonic() - started < 20
    assert wait_state(target.pid, "T") == "T"  # the stop the user asked for
    target.proc.send_signal(signal.SIGCONT)
    assert target.verify() == 0


def test_sigstop_while_parked_keeps_the_registers(spawn, memcr: Memcr) -> None:
    """The stop comes between memcr's system calls in the main thread: its registers must be its own after."""
    target = spawn("states", "registers")
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    target.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.3)
    assert session.press_enter() == 0, session.stderr()
    assert wait_state(target.pid, "T") == "T"
    target.proc.send_signal(signal.SIGCONT)
    assert target.verify() == 0


def test_thread_traced_by_another_tracer_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("states", "blocking")
    thread = max(procfs.thread_ids(target.pid))
    tracer = subprocess.Popen(["strace", "-q", "-o", "/dev/null", "-p", str(thread)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while procfs.read_status(f"{target.pid}/task/{thread}")["TracerPid"] == "0":
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        result = memcr.run("-p", target.pid, "-n")
        assert result.returncode == 3, result.stderr
        assert f"thread {thread} of process {target.pid} is already traced by process {tracer.pid}" in result.stderr
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches
        try:
            tracer.wait(10)
        finally:
            reap(tracer)
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_a_refused_freeze_lets_go_of_the_threads_it_held(spawn) -> None:
    """memcr seizes a process's threads in turn: when one is another tracer's, the freeze is refused, and the
    threads held before it are let go at once, not when memcr's tracing thread ends (here, the test's own: a
    daemon's job thread ends soon, a library caller's may never). The checks before a park refuse such a
    process already: a tracer that comes between them and the freeze meets the freeze itself, as here."""
    from memcr.engine import arch
    from memcr.engine.tracer import FrozenProcess
    from memcr.errors import TargetError
    from tests.test_groups import traced

    target = spawn("states", "blocking")
    thread = max(procfs.thread_ids(target.pid))
    with traced(thread):
        with pytest.raises(TargetError, match="already traced"):
            FrozenProcess.freeze(target.pid, arch.current())
        held = {
            tid: procfs.read_status(f"{target.pid}/task/{tid}")["TracerPid"]
            for tid in procfs.thread_ids(target.pid)
            if tid != thread
        }
        assert set(held.values()) == {"0"}, f"threads still traced after the refusal (tid: tracer): {held}"
    assert target.verify() == 0


@pytest.mark.parametrize("mode", ["memfd", "fork"])
def test_main_thread_running_shared_code(spawn, memcr: Memcr, mode: str) -> None:
    """memcr's system-call stub never goes into a shared page: a forked child running it lives on."""
    target = spawn("sharedcode", mode)
    children = [int(pid) for [pid] in target.said("child")]
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 0, result.stderr
    for child in children:
        assert processes.alive(child), f"the child {child} died"
    assert target.verify() == 0


def test_thread_that_cannot_stop_fails_the_freeze_in_time(spawn, memcr: Memcr) -> None:
    """A thread held in clone(CLONE_VFORK) ignores PTRACE_INTERRUPT: memcr gives up, the target runs on."""
    target = spawn("states", "vfork-wait")
    started = time.monotonic()
    result = memcr.run("-p", target.pid, "-n")
    assert time.monotonic() - started < 30
    assert result.returncode == 3, result.stderr
    assert "did not stop within" in result.stderr
    assert memcr.dumps() == []
    assert procfs.read_status(target.pid)["TracerPid"] == "0"
    assert target.verify() == 0
