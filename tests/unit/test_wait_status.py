"""Wait statuses as memcr.engine.ptrace_calls.Stop reads them, made the way the kernel encodes them."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from memcr.engine import ptrace_calls as pt
from memcr.engine.ptrace_calls import Stop


def exited(code: int) -> int:
    status = code << 8
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code
    return status


def killed(sig: int) -> int:
    status = sig
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    return status


def stopped(sig: int, event: int = 0) -> int:
    """A ptrace stop: the signal in bits 8-15, a PTRACE_EVENT_* above them."""
    status = event << 16 | sig << 8 | 0x7F
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == sig
    return status


def kinds(stop: Stop) -> set[str]:
    names = ("exited", "interrupt_stop", "syscall_stop", "group_stop", "signal_delivery")
    return {name for name in names if getattr(stop, name)}


def test_an_exit_is_no_stop() -> None:
    stop = Stop(7, exited(3))
    assert kinds(stop) == {"exited"}
    assert (stop.signal, stop.ending) == (0, "exited with 3")


def test_a_death_by_signal_is_an_exit_named_by_its_signal() -> None:
    stop = Stop(7, killed(signal.SIGKILL))
    assert kinds(stop) == {"exited"}
    assert (stop.signal, stop.ending) == (0, "killed by SIGKILL")
    assert Stop(7, killed(40)).ending == "killed by signal 40"  # a real-time signal has no name of its own


def test_the_interrupt_stop_reports_sigtrap() -> None:
    stop = Stop(7, stopped(signal.SIGTRAP, pt.EVENT_STOP))
    assert kinds(stop) == {"interrupt_stop"}
    assert (stop.event, stop.signal) == (pt.EVENT_STOP, signal.SIGTRAP)


@pytest.mark.parametrize("sig", sorted(pt.STOP_SIGNALS))
def test_a_group_stop_is_an_interrupt_stop_with_a_stop_signal(sig: int) -> None:
    assert kinds(Stop(7, stopped(sig, pt.EVENT_STOP))) == {"interrupt_stop", "group_stop"}


def test_a_syscall_stop_delivers_nothing() -> None:
    stop = Stop(7, stopped(pt.SYSCALL_STOP))
    assert kinds(stop) == {"syscall_stop"}
    assert stop.signal == signal.SIGTRAP | 0x80


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTRAP, signal.SIGSTOP, signal.SIGSEGV])
def test_a_signal_delivery_stop_carries_its_signal(sig: int) -> None:
    """Even SIGSTOP: before it becomes a group stop it is delivered like any other signal."""
    stop = Stop(7, stopped(sig))
    assert kinds(stop) == {"signal_delivery"}
    assert (stop.signal, stop.event) == (sig, 0)


@pytest.mark.parametrize("event", [pt.EVENT_FORK, pt.EVENT_VFORK, pt.EVENT_CLONE, pt.EVENT_EXEC])
def test_an_event_stop_is_neither_a_signal_nor_an_interrupt(event: int) -> None:
    stop = Stop(7, stopped(signal.SIGTRAP, event))
    assert kinds(stop) == set()
    assert stop.event == event


def test_poll_and_wait_on_a_child() -> None:
    """poll() has nothing while a child runs; wait() then reports its end; has_exited() once it is collected."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pt.poll(child.pid) is None
        assert not pt.has_exited(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while not pt.has_exited(child.pid):  # WNOWAIT: the exit stays to be collected
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stop = pt.wait(child.pid)
        assert (stop.tid, stop.exited, stop.ending) == (child.pid, True, "killed by SIGKILL")
        assert pt.has_exited(child.pid)  # collected: nothing of ours any more
    finally:
        child.kill()  # a no-op once collected above: Popen finds it gone
        child.wait()
