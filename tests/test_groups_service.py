"""Issue 19 through the daemon: a process tree (V2 option 1000) or a cgroup (1001) parked all or nothing.

The forking server of tests/test_groups.py (a parent, 4 workers, threads
in each, memory shared since the fork and memory of each one's own) checks
every process's memory, threads and state after the round trip. Whatever
fails, every member must run on intact, and the daemon must keep serving.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from memcr.system import procfs
from memcr_client import Client, MemcrClientError
from memcr_client.protocol import Answer, Command, Dialect
from tests.conftest import CGROUP2, CHECKPOINT, RESTORE, RUN_TIMEOUT, Daemon, reports
from tests.test_groups import members_of, traced, tracer, tree, verify_tree
from tests.test_service import client

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID
needs_cgroup2 = pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy mounted")


def held(pids: set[int]) -> bool:
    """Every one of them in a ptrace stop: parked."""
    return all(procfs.read_status(pid)["State"].startswith("t") for pid in pids)


def untouched(pids: set[int], d: Daemon) -> bool:
    """Nobody traces them and no dump is left."""
    return all(tracer(pid) == "0" for pid in pids) and list(d.dump_dir.iterdir()) == []


def park(d: Daemon, pid: int, **group: object) -> int:
    """A group CHECKPOINT through the client library; the daemon's answer."""
    return Client(d.listen, timeout=RUN_TIMEOUT).request(Command.CHECKPOINT, pid, **group)


def in_cgroup(path: Path, pids: set[int]) -> None:
    for pid in pids:
        (path / "cgroup.procs").write_text(str(pid))


def wait_traced(pid: int) -> None:
    deadline = time.monotonic() + 30
    while tracer(pid) == "0":
        assert time.monotonic() < deadline, f"nobody traced {pid}"
        time.sleep(0.002)


def test_tree_round_trip(daemon, spawn) -> None:
    d = daemon("--json")
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    worker = max(members)
    Client(d.listen).checkpoint(target.pid, tree=True)
    assert held(members)
    assert len(list(d.dump_dir.iterdir())) == 5
    # a member is parked: on its own, or as the root of another tree, it is refused as an already parked pid
    assert d.code(CHECKPOINT, worker) == INVALID_PID
    assert park(d, worker, tree=True) == INVALID_PID
    assert held(members)
    # the restore of any member's pid wakes the whole tree
    Client(d.listen).restore(worker)
    assert untouched(members, d)
    assert d.code(RESTORE, target.pid) == INVALID_PID  # woken already
    d.out.wait_for('"event":"group-restore"')
    lines = reports("\n".join(d.out.seen))
    [parked] = [r for r in lines if r["event"] == "group-checkpoint"]
    assert set(parked["members"]) == members and parked["group"] == f"tree {target.pid}"
    assert {r["pid"] for r in lines if r["event"] == "checkpoint"} == members
    assert {r["pid"] for r in lines if r["event"] == "restore"} == members
    assert target.verify() == 0


@needs_cgroup2
def test_cgroup_round_trip_with_memcr_client(daemon, spawn, cgroup) -> None:
    d = daemon()
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    top = cgroup("svc")
    (top / "workers").mkdir()
    in_cgroup(top, {target.pid})
    in_cgroup(top / "workers", members - {target.pid})
    worker = max(members)
    # the request's pid names one of the cgroup's processes, here a worker in a sub-cgroup
    result = client("-l", d.listen, "-p", worker, "-c", "--cgroup", top.relative_to(CGROUP2), "-z", "zstd")
    assert result.returncode == 0, result.stderr
    assert held(members)
    assert "frozen 0" in (top / "cgroup.events").read_text()  # thawed again: held by ptrace alone
    assert d.code(CHECKPOINT, target.pid) == INVALID_PID
    result = client("-l", d.listen, "-p", target.pid, "-r")  # another member's pid: the whole cgroup
    assert result.returncode == 0, result.stderr
    assert untouched(members, d)
    d.out.wait_for(f"cgroup {top} (pid {worker}) restored")
    assert target.verify() == 0


@pytest.mark.parametrize("how", ["tree", "cgroup"])
def test_a_traced_member_fails_the_whole_group(daemon, spawn, request: pytest.FixtureRequest, how: str) -> None:
    if how == "cgroup" and CGROUP2 is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    d = daemon("--json")
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    victim = max(members)
    group: dict[str, object] = {"tree": True}
    if how == "cgroup":
        top = request.getfixturevalue("cgroup")("refused")
        in_cgroup(top, members)
        group = {"cgroup": str(top)}
    with traced(victim) as other:
        assert park(d, target.pid, **group) == INVALID_PID  # a member memcr may not park: as for its pid alone
        line = d.out.wait_for("checkpoint failed")
        assert f"failed at process {victim}: process {victim} is already traced by process {other.pid}" in line
        assert "every member runs on as it was" in line
        [error] = reports(d.out.wait_for('"event":"error"'))
        assert (error["pid"], error["type"], error["operation"]) == (victim, "GroupError", "checkpoint")
        assert untouched(members - {victim}, d)
    if how == "cgroup":
        assert "frozen 0" in (top / "cgroup.events").read_text()
    assert d.code(RESTORE, target.pid) == INVALID_PID  # nothing parked, nothing remembered
    assert target.verify() == 0


def test_a_member_waiting_for_its_vfork_child_fails_the_tree(daemon, spawn) -> None:
    """A thread held in clone(CLONE_VFORK) does not stop: the tree (the vfork child with it) runs on."""
    d = daemon()
    target = spawn("states", "vfork-wait")
    members = tree(target.pid)
    assert len(members) == 2  # the process and its vfork child
    assert park(d, target.pid, tree=True) == INVALID_PID
    line = d.out.wait_for("checkpoint failed")
    assert f"failed at process {target.pid}" in line and "did not stop within" in line
    assert untouched(members, d)
    assert target.verify() == 0


def test_a_member_parked_on_its_own_refuses_the_group(daemon, spawn) -> None:
    d = daemon()
    target = spawn("forkserver", 4, 1, 4, 4)
    members = members_of(target)
    alone = max(members)
    assert d.code(CHECKPOINT, alone) == OK
    assert park(d, target.pid, tree=True) == INVALID_PID
    assert f"process {alone} is already checkpointed" in d.out.wait_for("checkpoint failed")
    assert all(tracer(pid) == "0" for pid in members - {alone})
    assert held({alone})  # still parked, by its own worker
    assert d.code(RESTORE, alone) == OK
    assert untouched(members, d)
    assert target.verify() == 0


@pytest.mark.parametrize("how", ["restore", "sigterm"])
def test_a_restore_or_sigterm_during_the_park_aborts_it(daemon, spawn, how: str) -> None:
    d = daemon("-z", "zstd", "-c", "-e")
    target = spawn("forkserver", 4, 1, 16, 256)
    members = members_of(target)
    replies: list[int] = []
    checkpoint = threading.Thread(target=lambda: replies.append(park(d, target.pid, tree=True)))
    checkpoint.start()
    try:
        wait_traced(max(members))
        if how == "restore":
            assert d.code(RESTORE, max(members)) == OK  # every member runs on, whole
        else:
            assert d.terminate() == 0
    finally:
        checkpoint.join(RUN_TIMEOUT)
    assert replies == [ERROR]  # the park did not happen, and the client heard so
    assert "was cancelled" in d.out.wait_for("checkpoint failed")
    assert untouched(members, d)
    assert target.verify() == 0


def test_time_limit_rolls_back_every_member(daemon, spawn) -> None:
    d = daemon("-t", 1, "-z", "zstd", "-c", "-e")
    target = spawn("forkserver", 4, 1, 16, 256)
    members = members_of(target)
    assert park(d, target.pid, tree=True) == ERROR
    d.out.wait_for("checkpoint failed")
    assert untouched(members, d)
    assert target.verify() == 0


def test_sigterm_restores_every_group(daemon, spawn) -> None:
    d = daemon()
    first, second = spawn("forkserver", 4, 2, 16, 8), spawn("forkserver", 2, 1, 4, 4)
    alone = spawn("pattern", 16, 2)
    assert park(d, first.pid, tree=True) == OK
    assert park(d, second.pid, tree=True) == OK
    assert d.code(CHECKPOINT, alone.pid) == OK
    assert d.terminate() == 0
    assert list(d.dump_dir.iterdir()) == []
    assert [first.verify(), second.verify(), alone.verify()] == [0, 0, 0]


def test_every_member_killed_while_parked_is_forgotten(daemon, spawn) -> None:
    d = daemon()
    target = spawn("forkserver", 2, 1, 4, 4)
    members = members_of(target)
    assert park(d, target.pid, tree=True) == OK
    for pid in members:
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
    d.out.wait_for("every member died while checkpointed: forgotten")
    deadline = time.monotonic() + 30
    while list(d.dump_dir.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert d.code(RESTORE, target.pid) == INVALID_PID


@needs_cgroup2
def test_bad_cgroups_are_refused_and_nothing_is_touched(daemon, spawn, cgroup) -> None:
    assert CGROUP2 is not None
    d = daemon()
    target = spawn("forkserver", 2, 1, 4, 4)
    members = members_of(target)
    top = cgroup("bad")
    in_cgroup(top, members)
    cases = [
        (f"{top.name}/../{top.name}", "has a '..' in it"),
        (f"{top}/../../../../tmp", "has a '..' in it"),
        ("/tmp", "is not under the cgroup v2 mount"),
        ("memcr-test-no-such-cgroup", "is not a cgroup"),
        (".", "the root cgroup holds every process"),
        (f"{top.name}\nmemcr: pid 1 restored", "has a control character in it"),
    ]
    for path, reason in cases:
        assert park(d, target.pid, cgroup=path) == ERROR, reason
        line = d.out.wait_for("refused the cgroup checkpoint")
        assert reason in line and "nothing touched" in line, line
    other = cgroup("other")  # a real cgroup, but the pid is not in it
    assert park(d, target.pid, cgroup=str(other)) == INVALID_PID
    assert f"process {target.pid} is not in cgroup {other}" in d.out.wait_for("checkpoint failed")
    assert untouched(members, d)
    assert "frozen 0" in (top / "cgroup.events").read_text()
    # a restore that carries a group option is refused, and what is parked stays parked
    assert park(d, target.pid, cgroup=str(top)) == OK
    with pytest.raises(MemcrClientError):
        Client(d.listen).checkpoint(target.pid, cgroup=str(top))  # already parked
    assert Client(d.listen).request(Command.RESTORE, target.pid, tree=True) == ERROR
    assert "applies to checkpoints" in d.out.wait_for("refused the V2 restore")
    assert held(members)
    assert d.code(RESTORE, min(members - {target.pid})) == OK
    assert untouched(members, d)
    assert target.verify() == 0


def test_the_descriptor_budget_counts_every_member(daemon, spawn) -> None:
    """A daemon with descriptors for one checkpoint, not five: the tree is refused, a single pid is not."""
    d = daemon(prefix=["prlimit", "--nofile=48:48"])
    target = spawn("forkserver", 4, 1, 4, 4)
    members = members_of(target)
    assert park(d, target.pid, tree=True) == ERROR
    line = d.out.wait_for("checkpoint failed")
    assert "file descriptors are left (RLIMIT_NOFILE)" in line and "Raise the limit" in line
    assert untouched(members, d)
    assert d.code(CHECKPOINT, target.pid) == OK
    assert d.code(RESTORE, target.pid) == OK
    assert target.verify() == 0


def test_a_member_killed_while_the_tree_is_parked(daemon, spawn) -> None:
    """The daemon lets go of a member killed from outside at once; the group's RESTORE wakes the others and is
    answered -1, with the log line as its reason for a V2 client that asks (option 1003)."""
    d = daemon()
    target = spawn("forkserver", 3, 2, 8, 8)
    members = members_of(target)
    victim = max(members - {target.pid})
    asking = Client(d.listen, timeout=RUN_TIMEOUT, dialect=Dialect.V2, reasons=True)
    asking.checkpoint(target.pid, tree=True)
    assert held(members)
    subprocess.run(["kill", "-KILL", str(victim)], check=True, timeout=10)
    d.out.wait_for(f"pid {victim}: ended while its group is parked (killed by SIGKILL), not by memcr's hand")
    assert tracer(victim) == "0"  # collected: its parent may reap it once it runs
    with pytest.raises(MemcrClientError) as failed:
        asking.restore(target.pid)
    ending = f"pid {victim} ended while parked (killed by SIGKILL), not by memcr's hand"
    assert failed.value.code == ERROR
    assert ending in (failed.value.reason or ""), failed.value
    assert f"tree {target.pid}: restore failed" in d.out.wait_for(ending)
    assert untouched(members - {victim}, d)
    code, complaints = verify_tree(target)  # the others intact: only the killed worker fails the count
    assert (code, complaints.strip().splitlines()) == (1, [f"worker {victim} failed (status 0x9)"])
