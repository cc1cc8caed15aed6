"""Lazy restore (--lazy): the target runs at once and meets its missing pages while memcr fills them.

Each target keeps using its memory in one way (user faults, kernel faults,
fork, mremap/madvise/munmap, signal handlers) from the first instant after
the wake-up, and checks every byte and its own state afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Memcr, Target, as_user, log_value, memcr_argv, reap, reports

MODES = ["touch", "syscalls", "fork", "remap", "signals"]


@pytest.mark.parametrize("mode", MODES)
def test_lazy_round_trip(spawn, memcr: Memcr, mode: str) -> None:
    target = spawn("lazy", 128, mode)
    result = memcr.run("-p", target.pid, "-n", "--lazy", "--json")
    assert result.returncode == 0, result.stderr
    assert log_value(result.stdout, rf"pid {target.pid} runs again after [\d.]+ ms; its pages come back lazily")
    assert log_value(result.stdout, r"lazy restore took \d+ ms after the wake-up")
    _, restored = reports(result.stdout)
    assert restored["lazy_ms"] > 0
    assert memcr.dumps() == []
    assert target.verify() == 0


@pytest.mark.parametrize("coding", [["-z"], ["-z", "zstd", "-c"], ["-c", "-e"]], ids=" ".join)
def test_lazy_with_framed_dumps(spawn, memcr: Memcr, coding: list[str]) -> None:
    target = spawn("lazy", 64, "syscalls")
    result = memcr.run("-p", target.pid, "-n", "--lazy", *coding)
    assert result.returncode == 0, result.stderr
    assert "come back lazily" in result.stdout
    assert target.verify() == 0


@pytest.mark.parametrize("threads", [0, 8])
def test_lazy_pattern_workers(spawn, memcr: Memcr, threads: int) -> None:
    """Workers that rewrite their pages in passes find every page as they left it."""
    target = spawn("pattern", 128, threads)
    result = memcr.run("-p", target.pid, "-n", "--lazy")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


def test_stopped_target_is_restored_eagerly(spawn, memcr: Memcr) -> None:
    target = spawn("lazy", 16, "touch")
    os.kill(target.pid, signal.SIGSTOP)
    result = memcr.run("-p", target.pid, "-n", "--lazy")
    assert result.returncode == 0, result.stderr
    assert f"restoring pid {target.pid} eagerly, not lazily: it is stopped" in result.stdout
    assert target.status()["State"].startswith("T")
    os.kill(target.pid, signal.SIGCONT)
    assert target.verify() == 0


def test_group_stop_during_the_lazy_phase(spawn, memcr: Memcr) -> None:
    """SIGSTOP and SIGCONT while memcr still traces the target act as without memcr."""
    target = spawn("lazy", 512, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not target.status()["State"].startswith("T") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert target.status()["State"].startswith("T")
    os.kill(target.pid, signal.SIGCONT)
    assert session.proc.wait(60) == 0, session.stderr()
    assert target.verify() == 0


def test_killing_memcr_mid_stream_kills_the_target(spawn, memcr: Memcr) -> None:
    """The cardinal rule: no page may read as zeros because memcr is gone."""
    target = spawn("lazy", 1024, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    session.proc.kill()
    session.proc.wait(10)
    assert target.proc.wait(10) == -signal.SIGKILL
    assert not [line for line in target.out.seen if "wrong" in line]
    _no_guardian_left(session.proc.pid)


def _no_guardian_left(memcr_pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ours = subprocess.run(["pgrep", "-f", f"PR_SET_PDEATHSIG.* {memcr_pid} [0-9]+$"], capture_output=True)
        if ours.returncode != 0:
            return
        time.sleep(0.05)
    raise AssertionError("memcr's guardian outlived it")


def test_without_userfaultfd_the_restore_is_eager(binaries, memcr: Memcr, accounts, public_dir: Path) -> None:
    """An ordinary user's target may not make a userfaultfd, and this memcr sees no /dev/userfaultfd."""
    binary = public_dir / "lazy"
    shutil.copy(binaries["lazy"], binary)
    target = Target(as_user(str(accounts["outside_name"]), [str(binary), "16", "touch"]))
    try:
        argv = memcr_argv("-p", target.pid, "-n", "--lazy", "-d", memcr.dump_dir)
        hidden = f"mount --bind /dev/null /dev/userfaultfd && exec {shlex.join(argv)}"
        result = subprocess.run(["unshare", "-m", "sh", "-c", hidden], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert (
            f"restoring pid {target.pid} eagerly, not lazily: the target may not make a userfaultfd "
            "(Operation not permitted)" in result.stdout
        )
        assert memcr.dumps() == []
        assert target.verify() == 0
    finally:
        target.stop()


def test_lazy_with_group_is_a_usage_error(memcr: Memcr) -> None:
    result = memcr.raw("-p", str(os.getpid()), "--tree", "--lazy")
    assert result.returncode == 2
    assert "--lazy restores one process" in result.stderr


def test_lazy_for_an_ordinary_users_target(binaries, memcr: Memcr, accounts, public_dir: Path) -> None:
    """A target without CAP_SYS_PTRACE gets its userfaultfd from memcr's /dev/userfaultfd."""
    binary = public_dir / "lazy"
    shutil.copy(binaries["lazy"], binary)
    target = Target(as_user(str(accounts["outside_name"]), [str(binary), "64", "syscalls"]))
    try:
        result = memcr.run("-p", target.pid, "-n", "--lazy")
        assert result.returncode == 0, result.stderr
        assert "come back lazily" in result.stdout
        assert target.verify() == 0
    finally:
        target.stop()


@pytest.mark.parametrize("mode", ["plain", "handlers", "pending", "blocking", "seccomp-strict", "trap-thread"])
def test_odd_states_survive_a_lazy_round_trip(spawn, memcr: Memcr, mode: str) -> None:
    """Threads blocked in system calls when frozen resume them, not -ERESTARTSYS; signal state is kept."""
    target = spawn("states", mode)
    result = memcr.run("-p", target.pid, "-n", "--lazy")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


def test_blocked_reader_gets_its_bytes(binaries, memcr: Memcr) -> None:
    """A single-threaded target blocked in read(2) when frozen reads what was written while it was parked."""
    target = subprocess.Popen(
        [str(binaries["lazy"]), "64", "reader"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert target.stdout is not None and target.stdin is not None
        assert target.stdout.readline() == f"ready {target.pid}\n"
        session = memcr.interactive("-p", target.pid, "--lazy")
        session.wait_prompt()
        target.stdin.write("x\n")
        target.stdin.flush()
        assert session.press_enter() == 0, session.stderr()
        assert target.stdout.readline() == "read x\n"
        target.stdin.close()
        assert target.wait(60) == 0
    finally:
        reap(target)


def test_a_killed_guardian_is_replaced(spawn, memcr: Memcr) -> None:
    """Someone kills memcr's guardian mid-stream: memcr starts another and finishes, byte-exact."""
    target = spawn("lazy", 1024, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    killed = subprocess.run(["pkill", "-KILL", "-f", f"PR_SET_PDEATHSIG.* {session.proc.pid} [0-9]+$"])
    assert session.proc.wait(120) == 0, session.stderr()
    lines = session.out.rest()
    assert killed.returncode == 0, "no guardian to kill: the lazy phase of 1 GiB ended within a pkill"
    assert any("guardian process was killed; starting another" in line for line in lines), lines
    assert any(f"pid {target.pid} restored" in line for line in lines), lines
    _no_guardian_left(session.proc.pid)
    assert target.verify() == 0
