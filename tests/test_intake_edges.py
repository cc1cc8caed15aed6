"""The accept loop that decides whole requests itself (the daemon's intake, issue #29), against a real daemon.

A request that has arrived whole is decided in the accept loop, and
answered there when that takes no work. These tests hold it to what the
threads did before: the order of requests (a RESTORE after its pid's
CHECKPOINT waits for it, for none decided later, and not for ever), the
order of refusals, the forms of a request. Most come from a hostile
review; each failed on the first version of the change.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from memcr.service.daemon import MAX_CONNECTIONS
from memcr_client.protocol import Answer
from tests.conftest import CHECKPOINT, RESTORE, RUN_TIMEOUT, Daemon, stop
from tests.test_client_scope import scene  # noqa: F401  (its fixture: a daemon and users)
from tests.test_dialects_service import answer, exchange, frozen, gone_pid, patiently, reason_answer
from tests.unit.test_dialects import dump_dir, i32, v2

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID
LAZY, REASON, INCREMENTAL = 1002, 1003, 1004
ROUNDS = 30

if sys.byteorder != "little":
    pytest.skip("the frames below are written little-endian: memcr supports x86_64 and arm64", allow_module_level=True)


@contextmanager
def every_thread_busy(d: Daemon, half: bytes = b"\x01\x00\x00\x00") -> Iterator[list[socket.socket]]:
    """MAX_CONNECTIONS slow senders of `half` a request, each holding a connection thread (it waits up to 5 s
    for the rest); they hang up, and free their threads, when the block ends."""
    threads = psutil.Process(d.proc.pid)
    slow: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            slow.append(patiently(d.connect))
            slow[-1].send(half)
        deadline = time.monotonic() + RUN_TIMEOUT
        while threads.num_threads() <= MAX_CONNECTIONS:
            assert time.monotonic() < deadline, f"{threads.num_threads()} threads: not every slow sender has one"
            time.sleep(0.01)
        yield slow
    finally:
        for conn in slow:
            conn.close()


# -- what needs no work is answered in the accept loop; what waits there, not for ever ----------------------------


@pytest.mark.parametrize("form", ["v1", "12-byte", "v2"])
def test_a_request_that_takes_no_work_waits_for_no_thread(daemon, spawn, form: str) -> None:
    """A whole request whose answer is a refusal or "not parked" is answered in the accept loop: with every
    connection thread waiting for a slow sender's rest, it is answered at once, not when one of them gives up."""
    d = daemon()
    gone = gone_pid(spawn)
    frame = {"v1": i32(RESTORE, gone), "12-byte": i32(RESTORE, gone, 60_000), "v2": v2(i32(RESTORE, gone))}[form]
    with every_thread_busy(d) as slow:
        assert answer(exchange(d, frame)) == INVALID_PID
        for conn in slow:  # all still waiting: the answer did not wait for one of their threads to end
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
    d.out.wait_for(f"answered -2 to the restore of pid {gone}: it is not checkpointed")
    target = spawn("pattern", 8)  # and the work still goes to threads
    assert d.code(CHECKPOINT, target.pid) == OK
    assert d.code(RESTORE, target.pid) == OK
    assert target.verify() == 0


def test_restores_that_wait_for_a_checkpoint_with_no_thread_give_way(daemon, spawn) -> None:
    """Every connection thread holds a RESTORE of a pid whose CHECKPOINT came whole before them and waits for a
    thread: the RESTOREs wait for it a while (REQUEST_TIMEOUT), not for ever, or neither would ever end."""
    d = daemon()
    target, gone = spawn("pattern", 8), gone_pid(spawn)
    whole = i32(RESTORE, target.pid)
    with every_thread_busy(d, whole[:4]) as restores, d.connect() as checkpoint:
        checkpoint.sendall(i32(CHECKPOINT, target.pid))
        d.out.wait_for(f"asks: checkpoint pid {target.pid} (v1)")
        # the accept loop logs a request before it decides it, and decides one connection after the other: once a
        # later request is answered there, the CHECKPOINT is decided, and waits for a thread
        assert answer(exchange(d, i32(RESTORE, gone))) == INVALID_PID
        for conn in restores:
            conn.settimeout(RUN_TIMEOUT)
            conn.sendall(whole[4:])  # each RESTORE whole now, decided on its thread after the CHECKPOINT
        answers = [answer(conn.recv(16, socket.MSG_WAITALL)) for conn in restores]
        d.out.wait_for(f"the restore of pid {target.pid} waited")
        checkpoint.settimeout(RUN_TIMEOUT)
        checkpointed = answer(checkpoint.recv(16, socket.MSG_WAITALL))  # it found a thread once some ended
    # those answered before the CHECKPOINT had its pid found nothing parked; one after it may wake the target
    assert set(answers) <= {INVALID_PID, OK} and answers.count(OK) <= 1, answers
    assert checkpointed in (OK, ERROR)  # parked, or aborted by a RESTORE
    if frozen(target):
        assert d.code(RESTORE, target.pid) == OK
    assert target.verify() == 0


# -- a RESTORE that comes after its pid's CHECKPOINT is not answered "not checkpointed" --------------------------


@pytest.mark.parametrize("form", ["v1", "12-byte", "v2"])
def test_a_restore_after_a_checkpoint_waiting_for_its_thread_is_not_answered_not_parked(daemon, spawn, form) -> None:
    """SPEC: a RESTORE that arrives while the same pid's CHECKPOINT runs aborts it. The CHECKPOINT was read and
    decided first but waits for a thread (every one is busy, as any client of the socket can make them); the
    RESTORE that follows must not be answered -2 in the accept loop, which leaves the target parked for ever."""
    d = daemon()
    target = spawn("pattern", 8)
    frame = {
        "v1": lambda cmd: i32(cmd, target.pid),
        "12-byte": lambda cmd: i32(cmd, target.pid, 60_000),
        "v2": lambda cmd: v2(i32(cmd, target.pid)),
    }[form]
    with every_thread_busy(d):
        checkpoint = d.connect()
        checkpoint.sendall(frame(CHECKPOINT))
        d.out.wait_for(f"asks: checkpoint pid {target.pid} ({form})")  # read whole, and waits for a thread
        restore = d.connect()
        restore.sendall(frame(RESTORE))
        d.out.wait_for(f"asks: restore pid {target.pid} ({form})")
    with checkpoint, restore:
        restored = answer(restore.recv(16, socket.MSG_WAITALL))
        checkpointed = answer(checkpoint.recv(16, socket.MSG_WAITALL))
    if restored == INVALID_PID and frozen(target):
        assert d.code(RESTORE, target.pid) == OK  # leave nothing parked behind the failure
        pytest.fail(f"the restore was answered -2 and the checkpoint ({checkpointed}) left pid {target.pid} parked")
    assert restored == OK, restored
    assert checkpointed in (OK, ERROR)  # done, or aborted by the restore
    assert not frozen(target)
    assert target.verify() == 0


def test_a_restore_sent_right_after_its_checkpoint_is_never_answered_not_parked(daemon, spawn) -> None:
    """The same without a busy thread: a CHECKPOINT, then at once a RESTORE on a connection made after it was sent,
    as a client that wakes what it just sent to sleep. The CHECKPOINT came first, so its target must end up
    running: before the fix the RESTORE was answered -2 in about half the rounds (before ce73e68 too, by a race
    between two threads)."""
    d = daemon()
    target = spawn("pattern", 8)
    left_parked = 0
    for _ in range(ROUNDS):
        with d.connect() as checkpoint:
            checkpoint.sendall(i32(CHECKPOINT, target.pid))
            with d.connect() as restore:
                restore.sendall(i32(RESTORE, target.pid))
                restored = answer(restore.recv(16, socket.MSG_WAITALL))
            answer(checkpoint.recv(16, socket.MSG_WAITALL))
        if frozen(target):
            assert restored == INVALID_PID
            left_parked += 1
            assert d.code(RESTORE, target.pid) == OK
    assert left_parked == 0, f"{left_parked} of {ROUNDS} rounds left the target parked, its restore answered -2"
    assert target.verify() == 0


def test_a_stop_with_decided_requests_waiting_for_threads_starts_none(daemon, spawn) -> None:
    """SIGTERM while a CHECKPOINT and the RESTORE that waits for it wait for threads: the daemon stops (the RESTORE
    waits for nothing), their clients see the end, and the CHECKPOINT was never started."""
    d = daemon()
    target = spawn("pattern", 8)
    with every_thread_busy(d):
        checkpoint = d.connect()
        checkpoint.sendall(i32(CHECKPOINT, target.pid))
        d.out.wait_for(f"asks: checkpoint pid {target.pid} (v1)")
        restore = d.connect()
        restore.sendall(i32(RESTORE, target.pid))
        d.out.wait_for(f"asks: restore pid {target.pid} (v1)")
        assert stop(d.proc, signal.SIGTERM) == 0
    with checkpoint, restore:
        assert checkpoint.recv(16, socket.MSG_WAITALL) == b""
        assert restore.recv(16, socket.MSG_WAITALL) == b""
    assert "seized" not in "\n".join(d.out.rest())  # no checkpoint began
    assert not frozen(target)
    assert target.verify() == 0


def test_a_flood_of_checkpoints_of_a_parked_pid_delays_not_its_restore(daemon, spawn, tmp_path) -> None:
    """A RESTORE waits for the CHECKPOINTs of its pid decided before it, and for no later one: clients that keep
    asking to park the pid (each refused for its dump directory, once a thread reads it) cannot hold its restore
    back."""
    d = daemon()
    target = spawn("pattern", 8)
    assert d.code(CHECKPOINT, target.pid) == OK
    nowhere = dump_dir(tmp_path / "nonexistent")
    stop_flood = threading.Event()
    answered: list[int] = []

    def flood() -> None:
        while not stop_flood.is_set():
            with patiently(d.connect) as sock:
                sock.sendall(v2(i32(CHECKPOINT, target.pid), nowhere))
                answered.append(answer(sock.recv(16, socket.MSG_WAITALL)))

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    for thread in flooders:
        thread.start()
    try:
        while len(answered) < 200:  # under way
            time.sleep(0.01)
        with d.connect() as sock:
            sock.settimeout(30)  # the flood goes on meanwhile
            sock.sendall(i32(RESTORE, target.pid))
            assert answer(sock.recv(16, socket.MSG_WAITALL)) == OK
    finally:
        stop_flood.set()
        for thread in flooders:
            thread.join(RUN_TIMEOUT)
    assert set(answered) == {ERROR}
    assert not frozen(target)
    assert target.verify() == 0


# -- the order of the refusals of a RESTORE -----------------------------------------------------------------------


def test_a_client_restoring_itself_hears_that_first(daemon) -> None:
    """Before ce73e68 a RESTORE was vetted (nobody parks itself; --client-scope) before its options 1002/1004
    were judged; the accept loop judges the options first, and the client hears another reason."""
    d = daemon()
    with d.connect() as sock:  # the client itself is this process
        sock.sendall(v2(i32(RESTORE, os.getpid(), LAZY, 1, INCREMENTAL, 1, REASON, 1)))
        code, reason = reason_answer(sock.recv(8192))
    assert code == ERROR
    assert f"process {os.getpid()} is the client itself" in reason, reason


def test_own_scope_vets_a_restore_before_its_options(scene, spawn) -> None:  # noqa: F811
    """--client-scope own: a non-root client's RESTORE of another uid's process is refused for that, whatever
    else is wrong with it (docs/SECURITY.md: the log says which process runs as which uids)."""
    s = scene("--client-scope", "own")
    target = spawn("pattern", 8, user=s.b)
    assert s.ask(RESTORE, target.pid, user=s.a, lazy=True, incremental=True) == ERROR
    s.daemon.out.wait_for(f"asks: restore pid {target.pid} (v2)")
    line = s.daemon.out.wait_for(f"restore of pid {target.pid}")
    assert f"process {target.pid} runs as uids {s.b_uid}/" in line, line


# -- a request that carries descriptors does not hide the bytes after it ------------------------------------------


def test_bytes_after_a_request_that_carries_a_descriptor_are_still_refused(daemon, spawn) -> None:
    """A UNIX client may attach a descriptor (SCM_RIGHTS) to its write; a MSG_PEEK stops at such a write's end, so
    the accept loop saw 8 bytes alone, took them for a whole v1 request and answered it, leaving the rest unread:
    what followed is refused as before ("one request per connection"), and a 12-byte request stays one."""
    d = daemon()
    gone = gone_pid(spawn)
    with open(os.devnull) as null:
        fds = array.array("i", [null.fileno()])
        for more, form in [(b"junk" * 4, None), (struct.pack("=i", 60_000), "12-byte")]:
            os.kill(d.proc.pid, signal.SIGSTOP)  # both writes are in before the daemon looks: no race with the 2nd
            try:
                sock = d.connect()
                sock.sendmsg([i32(RESTORE, gone)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                sock.sendall(more)
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            with sock:
                reply = answer(sock.recv(16, socket.MSG_WAITALL))
            if form is None:
                assert reply == ERROR
                d.out.wait_for("more bytes after the request: one request per connection")
            else:
                assert reply == INVALID_PID
                d.out.wait_for(f"asks: restore pid {gone} ({form})")
