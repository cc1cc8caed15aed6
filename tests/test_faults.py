"""Fault paths: running out of descriptors, a target killed from outside, a restore at shutdown.

Whatever fails, the target is left running intact (or was killed by someone
else, and memcr says so), nothing of memcr's is left behind, and every
request that reached the daemon gets its answer.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CHECKPOINT, REQUEST, RESPONSE, RESTORE, RUN_TIMEOUT, Memcr, memcr_argv


def test_descriptor_limit_leaves_the_target_intact(spawn, memcr: Memcr) -> None:
    """Whatever descriptor memcr fails to open, the target runs on whole and no dump stays."""
    target = spawn("pattern", 32, 2)
    outcomes = set()
    for limit in range(6, 30, 2):
        argv = ["prlimit", f"--nofile={limit}:{limit}", *memcr_argv("-p", target.pid, "-n", "-d", memcr.dump_dir)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        outcomes.add(result.returncode)
        assert result.returncode in (0, 4), result.stderr
        if result.returncode == 4:
            assert "ran out of file descriptors" in result.stderr, result.stderr
            assert "internal error" not in result.stderr
        assert memcr.dumps() == []
        assert target.running()
        assert target.status()["TracerPid"] == "0"
    assert outcomes == {0, 4}, outcomes  # the limits cut in somewhere, and enough was enough
    assert target.verify() == 0


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_target_killed_from_outside_is_reported_as_such(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 512)
    session = memcr.interactive("-p", target.pid)
    session.out.wait_for("candidate VMAs")
    target.proc.kill()
    code = session.proc.wait(RUN_TIMEOUT)
    stderr = session.stderr()
    assert code == 3, stderr
    assert "ended while memcr was working on it (memcr did not kill it)" in stderr, stderr
    assert "could not be put back" not in stderr
    assert target.proc.wait(30) == -signal.SIGKILL
    assert memcr.dumps() == []


@pytest.mark.parametrize("delay", [random.uniform(0, 0.3) for _ in range(10)])
def test_target_killed_while_parked_ends_with_7(spawn, memcr: Memcr, delay: float) -> None:
    """Killed at the prompt, `delay` s before Enter: exit 7 (3 would say it runs on intact), how it ended."""
    target = spawn("pattern", 16)
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    target.proc.kill()
    time.sleep(delay)
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    code = session.proc.wait(RUN_TIMEOUT)
    stderr = session.stderr()
    assert code == 7, stderr
    # how it ended, when its exit showed before the restore began
    assert re.search(
        rf"pid {target.pid} ended while parked \((killed by SIGKILL|it died as memcr restored it)\), "
        "not by memcr's hand",
        stderr,
    ), stderr
    assert target.proc.wait(30) == -signal.SIGKILL  # its parent could reap it: memcr let go of its exit
    assert memcr.dumps() == []


def test_daemon_keeps_no_descriptor_of_a_target_that_died(spawn, daemon) -> None:
    d = daemon()
    warm = spawn("pattern", 16)
    assert d.code(CHECKPOINT, warm.pid) == 0
    assert d.code(RESTORE, warm.pid) == 0
    assert warm.verify() == 0
    idle = open_descriptors(d.proc.pid)
    for _ in range(3):
        target = spawn("pattern", 512)
        answer: list[int] = []
        asking = threading.Thread(target=lambda t=target, a=answer: a.append(d.code(CHECKPOINT, t.pid)))
        asking.start()
        d.out.wait_for(f"seized 1 threads of pid {target.pid}")
        time.sleep(0.05)
        target.proc.kill()
        asking.join(RUN_TIMEOUT)
        assert answer in ([-1], [-2], [0]), answer
        target.proc.wait(30)
    deadline = time.monotonic() + 10
    while open_descriptors(d.proc.pid) > idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_descriptors(d.proc.pid) == idle
    assert list(d.dump_dir.iterdir()) == []


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2])
def test_restore_in_flight_at_sigterm_is_answered(spawn, daemon, delay: float) -> None:
    d = daemon()
    target = spawn("pattern", 128, 2)
    assert d.code(CHECKPOINT, target.pid) == 0
    with d.connect() as sock:
        sock.sendall(REQUEST.pack(RESTORE, target.pid))
        time.sleep(0.05)  # accepted: the request has reached the daemon
        time.sleep(delay)
        d.proc.send_signal(signal.SIGTERM)
        reply = sock.recv(16, socket.MSG_WAITALL)
    assert reply == RESPONSE.pack(0)  # restored: by this request, or by the shutdown
    assert d.proc.wait(RUN_TIMEOUT) == 0
    assert target.verify() == 0


def test_second_restore_of_one_pid_is_answered(spawn, daemon) -> None:
    d = daemon()
    target = spawn("pattern", 64, 2)
    assert d.code(CHECKPOINT, target.pid) == 0
    answers: list[int] = []
    asking = [threading.Thread(target=lambda: answers.append(d.code(RESTORE, target.pid))) for _ in range(2)]
    for thread in asking:
        thread.start()
    for thread in asking:
        thread.join(RUN_TIMEOUT)
    assert sorted(answers) == [-2, 0]  # one restored it; the other is told it is not checkpointed (any more)
    assert target.verify() == 0


# loaded first by the daemon's interpreter (PYTHONPATH): the first import of the checkpoint engine fails, as an
# import fails when the daemon is out of descriptors; the next one loads it
ENGINE_FAILS_ONCE = """
import errno, sys

class EngineFailsOnce:
    failed = False

    def find_spec(self, name, path=None, target=None):
        if name == "memcr.park.checkpoint" and not EngineFailsOnce.failed:
            EngineFailsOnce.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return None

sys.meta_path.insert(0, EngineFailsOnce())
"""


def test_a_checkpoint_whose_engine_fails_to_load_is_answered_and_frees_the_pid(spawn, daemon, tmp_path) -> None:
    """The daemon loads the checkpoint engine at its first checkpoint; a load that fails answers that client -1,
    leaves the target untouched and the pid free (it hung the client and held the pid for good)."""
    rig = tmp_path / "rig"
    rig.mkdir()
    (rig / "sitecustomize.py").write_text(ENGINE_FAILS_ONCE)
    d = daemon(prefix=["env", f"PYTHONPATH={rig}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"])
    target = spawn("pattern", 8)
    assert d.code(CHECKPOINT, target.pid) == -1
    d.out.wait_for(f"pid {target.pid}: internal error during checkpoint")
    assert target.status()["TracerPid"] == "0"
    assert d.code(CHECKPOINT, target.pid) == 0  # free again, and the engine loads this time
    assert d.code(RESTORE, target.pid) == 0
    assert target.verify() == 0


def test_relative_parasite_socket_dir(spawn, memcr: Memcr, tmp_path) -> None:
    """The parasite binds in the target's working directory, memcr connects from its own: -S . must mean memcr's."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    target = spawn("pattern", 16)
    argv = memcr_argv("-p", target.pid, "-n", "-S", ".", "-d", memcr.dump_dir)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=sockets)
    assert result.returncode == 0, result.stderr
    assert list(sockets.iterdir()) == []
    assert not Path(f"/proc/{target.pid}/cwd/memcr{target.pid}").exists()
    assert target.verify() == 0
