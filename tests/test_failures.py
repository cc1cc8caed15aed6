"""Failures during a checkpoint leave the target intact, or dead, never damaged."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import Memcr


@pytest.mark.parametrize("options", [(), ("-c",)], ids=["spliced", "framed"])
def test_full_disk_rolls_back(spawn, memcr: Memcr, tmpfs, options: tuple[str, ...]) -> None:
    small = tmpfs("size=16m")
    target = spawn("pattern", 64, 2)
    result = memcr.run("-p", target.pid, "-n", *options, dump_dir=small)
    assert result.returncode == 5, result.stderr
    assert "no space left" in result.stderr
    assert list(small.iterdir()) == []
    assert target.running()
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0


def test_sigkill_of_memcr_kills_frozen_target(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 64, 2)
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    session.proc.kill()
    session.proc.wait()
    # PTRACE_O_EXITKILL: the kernel kills a target whose memcr died
    assert target.proc.wait(30) == -signal.SIGKILL


def test_second_memcr_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 32, 2)
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    second = memcr.run("-p", target.pid, "-n")
    assert second.returncode == 3
    assert "already traced" in second.stderr
    assert len(memcr.dumps()) == 1  # the first memcr's dump is untouched
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0


def test_sigterm_at_prompt_restores(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 32)
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    session.proc.send_signal(signal.SIGTERM)
    assert session.proc.wait(60) == 0, session.stderr()
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_dump_deleted_while_frozen_still_restores(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 32)
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    [dump] = memcr.dumps()
    dump.unlink()
    # memcr holds the file open: the pages are still there to put back
    assert session.press_enter() == 0, session.stderr()
    assert any("was removed or replaced" in line for line in session.out.rest())
    assert target.verify() == 0


def test_corrupted_dump_kills_target(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 32, 4)  # threads: the leader is reaped last
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    [dump] = memcr.dumps()
    with open(dump, "r+b") as f:
        f.truncate(dump.stat().st_size - 4096)
    assert session.press_enter() == 6
    assert "killed" in session.stderr()
    assert target.proc.wait(30) == -signal.SIGKILL
    assert memcr.dumps() == []


def test_sigint_during_dump_rolls_back(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 512)
    session = memcr.interactive("-p", target.pid)
    # streaming 512 MiB takes far longer than a signal takes to arrive
    session.out.wait_for("candidate VMAs")
    session.proc.send_signal(signal.SIGINT)
    assert session.proc.wait(120) == 1
    assert "aborted" in session.stderr()
    assert memcr.dumps() == []
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0
