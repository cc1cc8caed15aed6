"""Parking an app: a process tree (`-p PID --tree`) or a cgroup (`--cgroup PATH`), all or nothing.

The forking server (targets/forkserver.c) checks every process's memory,
threads and state after the round trip. A refused member, or a failure
while streaming, must leave every member running intact; a tree that forks
all the time is parked whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from memcr.system import procfs
from memcr_client import Client
from memcr_client.protocol import CMD_CHECKPOINT
from tests.conftest import CGROUP2, Memcr, memcr_argv, reap, reports

needs_cgroup2 = pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy mounted")


def members_of(target) -> set[int]:
    return {target.pid} | {int(pid) for [pid] in target.said("child")}


def tree(root: int) -> set[int]:
    """root and its live descendants, now, as psutil finds them (memcr's own walk is what is tested)."""
    found = {root}
    for child in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
    return found


def tracer(pid: int) -> str:
    return procfs.read_status(pid)["TracerPid"]


def assert_untouched(pids: set[int], memcr: Memcr) -> None:
    """Nobody traces them any more and no dump is left."""
    for pid in pids:
        assert tracer(pid) == "0", pid
    assert memcr.dumps() == []


def test_tree_round_trip(spawn, memcr: Memcr) -> None:
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    result = memcr.run("-p", target.pid, "--tree", "-n", "--json")
    assert result.returncode == 0, result.stderr
    lines = reports(result.stdout)
    parked = [r for r in lines if r["event"] == "checkpoint"]
    [group] = [r for r in lines if r["event"] == "group-checkpoint"]
    assert {r["pid"] for r in parked} == members and set(group["members"]) == members
    assert all(r["threads"] == 3 for r in parked)
    # the 16 MiB every worker shares with the parent since the fork stays in place, in each of them
    assert all(r["shared_pages"] * r["page_size"] >= 16 << 20 for r in parked)
    assert group["shared_pages"] == sum(r["shared_pages"] for r in parked)
    assert group["rss_after"]["RssAnon"] < group["rss_before"]["RssAnon"]
    assert [r["event"] for r in lines[-6:]] == ["restore"] * 5 + ["group-restore"]
    assert f"tree {target.pid}: 5 processes restored" in result.stderr  # the log, with --json
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_lazy_tree_is_restored_eagerly(spawn, memcr: Memcr) -> None:
    """--lazy restores one process: a group is accepted with it, restored eagerly, and the log says so."""
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    result = memcr.run("-p", target.pid, "--tree", "-n", "--lazy", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("eagerly") == 1, result.stderr
    assert f"restoring tree {target.pid} eagerly: a group's restore is never lazy (--lazy restores one process)" in (
        result.stderr
    )
    assert "lazily" not in result.stderr and "lazy restore took" not in result.stderr
    lines = reports(result.stdout)
    restored = [r for r in lines if r["event"] == "restore"]
    assert {r["pid"] for r in restored} == members
    assert all(r["lazy_ms"] == 0 and r["upload_ms"] > 0 and not r["options"]["lazy"] for r in restored)
    assert all(r["options"]["lazy"] for r in lines if r["event"] == "checkpoint")  # as asked
    [group] = [r for r in lines if r["event"] == "group-restore"]
    assert group["options"]["lazy"] is False
    assert_untouched(members, memcr)
    assert target.verify() == 0


@needs_cgroup2
def test_cgroup_round_trip_with_a_sub_cgroup(spawn, memcr: Memcr, cgroup) -> None:
    target = spawn("forkserver", 4, 2, 16, 8)
    top = cgroup("app")
    (top / "workers").mkdir()
    members = sorted(members_of(target))
    (top / "cgroup.procs").write_text(str(target.pid))
    for pid in members[1:3]:
        (top / "workers" / "cgroup.procs").write_text(str(pid))
    # members outside the cgroup (the other workers) are not parked
    session = memcr.interactive("--cgroup", top.relative_to(CGROUP2), "--json")
    session.wait_report("group-checkpoint")
    inside = {target.pid, *members[1:3]}
    for pid in inside:
        assert procfs.read_status(pid)["State"].startswith("t"), pid  # held by memcr
    for pid in set(members) - inside:
        assert tracer(pid) == "0", pid
    assert "frozen 0" in (top / "cgroup.events").read_text()  # thawed again: held by ptrace alone
    assert len(memcr.dumps()) == 3
    assert session.press_enter() == 0, session.stderr()
    [group] = [r for r in reports("\n".join(session.out.rest())) if r["event"] == "group-restore"]
    assert set(group["members"]) == inside and group["group"] == f"cgroup {top}"
    assert_untouched(set(members), memcr)
    assert target.verify() == 0


@needs_cgroup2
def test_cgroup_by_absolute_path(spawn, memcr: Memcr, cgroup) -> None:
    target = spawn("forkserver", 4, 1, 4, 4)
    top = cgroup("abs")
    for pid in members_of(target):
        (top / "cgroup.procs").write_text(str(pid))
    result = memcr.run("--cgroup", top, "-n")
    assert result.returncode == 0, result.stderr
    assert f"cgroup {top}: 5 processes restored" in result.stdout
    assert target.verify() == 0


def strace(pid: int) -> subprocess.Popen[bytes]:
    """Another tracer on `pid`, attached when this returns."""
    proc = subprocess.Popen(["strace", "-q", "-o", "/dev/null", "-p", str(pid)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while tracer(pid) == "0":
        if time.monotonic() > deadline:
            reap(proc)
            raise AssertionError("strace did not attach")
        time.sleep(0.01)
    return proc


@contextlib.contextmanager
def traced(pid: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = strace(pid)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # strace detaches
        try:
            proc.wait(10)
        finally:
            reap(proc)


@pytest.mark.parametrize("how", ["tree", "cgroup"])
def test_a_traced_member_fails_the_whole_park(spawn, memcr: Memcr, request: pytest.FixtureRequest, how: str) -> None:
    if how == "cgroup" and CGROUP2 is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    victim = max(members)
    if how == "cgroup":
        top = request.getfixturevalue("cgroup")("refused")
        for pid in members:
            (top / "cgroup.procs").write_text(str(pid))
        argv: list[object] = ["--cgroup", top]
    else:
        argv = ["-p", target.pid, "--tree"]
    with traced(victim) as other:
        result = memcr.run(*argv, "-n", "--json")
        assert result.returncode == 3, result.stderr
        assert f"failed at process {victim}: process {victim} is already traced by process {other.pid}" in (
            result.stderr
        )
        assert "every member runs on as it was" in result.stderr
        [error] = reports(result.stdout)
        assert (error["event"], error["pid"], error["type"]) == ("error", victim, "GroupError")
        assert_untouched(members - {victim}, memcr)
    if how == "cgroup":
        assert "frozen 0" in (top / "cgroup.events").read_text()
    assert target.verify() == 0


def test_a_member_waiting_for_its_vfork_child_fails_the_tree(spawn, memcr: Memcr) -> None:
    """A thread held in clone(CLONE_VFORK) does not stop: the tree (the vfork child with it) runs on."""
    target = spawn("states", "vfork-wait")
    members = tree(target.pid)
    assert len(members) == 2  # the process and its vfork child
    result = memcr.run("-p", target.pid, "--tree", "-n")
    assert result.returncode == 3, result.stderr
    assert f"failed at process {target.pid}" in result.stderr and "did not stop within" in result.stderr
    assert_untouched(members, memcr)
    assert target.verify() == 0


def test_a_full_disk_rolls_back_the_members_already_parked(spawn, memcr: Memcr, tmpfs) -> None:
    """Five 10 MiB members, a 24 MiB dump directory: the first ones fit and are put back when one does not."""
    target = spawn("forkserver", 4, 2, 4, 8)
    members = members_of(target)
    small = tmpfs("size=24m")
    result = memcr.run("-p", target.pid, "--tree", "-n", dump_dir=small)
    assert result.returncode == 5, result.stderr
    assert "every member runs on as it was" in result.stderr
    assert "use -d on a larger filesystem" in result.stderr  # the member's advice still applies
    for pid in members:
        assert tracer(pid) == "0", pid
    assert list(small.glob("pages-*.img")) == []
    assert target.verify() == 0


def test_a_tree_that_forks_all_the_time(spawn, memcr: Memcr) -> None:
    """Children come and go every few ms: the tree is parked whole, or the park fails and says so."""
    target = spawn("forkloop")
    outcomes = []
    for _ in range(3):
        session = memcr.interactive("-p", target.pid, "--tree", "--json")
        try:
            session.wait_report("group-checkpoint")
        except AssertionError:
            assert session.proc.wait(30) != 0  # failed: every member must run on
            outcomes.append("failed")
            assert_untouched({target.pid}, memcr)
            continue
        [group] = [r for r in reports("\n".join(session.out.seen)) if r["event"] == "group-checkpoint"]
        now = tree(target.pid)
        assert now <= set(group["members"]), now - set(group["members"])  # nobody runs beside the parked ones
        for pid in now:
            assert procfs.read_status(pid)["State"].startswith("t"), pid
        assert session.press_enter() == 0, session.stderr()
        outcomes.append(len(group["members"]))
        assert memcr.dumps() == []
    assert any(o != "failed" for o in outcomes), outcomes
    assert target.verify() == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tree"], "--tree needs -p PID"),
        (["-p", "1", "--cgroup", "x"], "-p/--pid and --cgroup exclude each other"),
        (["-l", "/tmp/memcr-test-none.sock", "--cgroup", "x"], "--tree and --cgroup are for interactive mode"),
        (["--cgroup", "memcr-test-no-such-cgroup"], "is not a cgroup"),
        (["--cgroup", "/tmp"], "is not in the cgroup v2 hierarchy"),
        (["--cgroup", "."], "the root cgroup holds every process"),
    ],
)
def test_bad_group_options(memcr: Memcr, argv: list[str], message: str) -> None:
    if "--cgroup" in argv and "-l" not in argv and "-p" not in argv and CGROUP2 is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    result = memcr.run(*argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_tree_whose_root_does_not_exist(memcr: Memcr) -> None:
    result = memcr.run("-p", 2**22 + 1, "--tree", "-n")
    assert result.returncode == 3, result.stderr
    assert f"no such process: {2**22 + 1}" in result.stderr


def test_a_tree_holding_memcr_is_refused_before_anything_is_held(binaries, memcr: Memcr) -> None:
    """The tree of memcr's parent holds memcr: refused at once, no member frozen even for a moment."""
    script = (
        f'{binaries["lazy"]} 16 touch >/dev/null 2>&1 & "$@" -p $$ --tree -n -d {memcr.dump_dir}; code=$?; '
        "kill $!; exit $code"
    )
    shell = subprocess.Popen(
        ["sh", "-c", script, "sh", *memcr_argv()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = shell.communicate(timeout=60)
    finally:
        reap(shell)
    assert shell.returncode == 3, err
    assert f"parking tree {shell.pid} failed: tree {shell.pid} holds memcr itself, pid " in err, err
    assert "which memcr never parks; every member runs on as it was" in err
    assert "seized" not in out
    assert memcr.dumps() == []


@needs_cgroup2
def test_a_cgroup_holding_the_daemons_parent_is_refused_before_its_freezer_runs(spawn, daemon, cgroup) -> None:
    """The daemon's parent (as pid 1 is under systemd) in the cgroup asked for: refused, never frozen."""
    served = daemon(prefix=["sh", "-c", '"$@"; exit $?', "sh"])  # the shell stays the daemon's parent
    try:
        _refused_with_the_daemon_s_parent(served, spawn, cgroup)
    finally:  # the fixture's SIGTERM reaches the shell only, which does not pass it on
        subprocess.run(["pkill", "-TERM", "-P", str(served.proc.pid)], check=False)


def _refused_with_the_daemon_s_parent(served, spawn, cgroup) -> None:
    group = cgroup("holds-parent")
    target = spawn("lazy", 16, "touch")
    for pid in (served.proc.pid, target.pid):
        (group / "cgroup.procs").write_text(str(pid))
    frozen: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            if "frozen 1" in (events := (group / "cgroup.events").read_text()):
                frozen.append(events)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        answer = Client(served.listen).request(CMD_CHECKPOINT, target.pid, cgroup=str(group))
    finally:
        watching.set()
        watcher.join()
    assert answer == -2  # a process memcr may not freeze, as for one pid
    refusal = served.out.wait_for("which memcr never parks")
    assert f"holds memcr's parent, pid {served.proc.pid}, which memcr never parks" in refusal
    assert frozen == []
    assert tracer(target.pid) == "0"
    assert target.verify() == 0


@pytest.mark.parametrize("delay", [random.uniform(0, 0.3) for _ in range(10)])
def test_a_member_killed_just_before_the_restore(spawn, memcr: Memcr, delay: float) -> None:
    """Killed `delay` s before Enter, whether memcr saw it yet or not: exit 7, a restore line per other member."""
    target = spawn("forkserver", 3, 2, 8, 8)
    members = members_of(target)
    victim = max(members - {target.pid})
    session = memcr.interactive("-p", target.pid, "--tree", "--json")
    session.wait_report("group-checkpoint")
    os.kill(victim, signal.SIGKILL)
    time.sleep(delay)
    assert session.press_enter() == 7, session.stderr()
    lines = reports("\n".join(session.out.rest()))
    assert sorted(r["pid"] for r in lines if r["event"] == "restore") == sorted(members - {victim}), lines
    [error] = [r for r in lines if r["event"] == "error"]
    assert error["exit_code"] == 7 and f"pid {victim} ended while parked" in error["error"], error
    assert_untouched(members - {victim}, memcr)
    code, complaints = verify_tree(target)
    assert code == 1
    assert complaints.strip().splitlines() == [f"worker {victim} failed (status 0x9)"], complaints


def verify_tree(target) -> tuple[int, str]:
    """Ask the forkserver and its workers to check their memory: its exit code and what it wrote to stderr."""
    target.proc.send_signal(signal.SIGUSR1)
    code = target.proc.wait(120)
    return code, target.proc.stderr.read() if target.proc.stderr else ""


def test_a_member_killed_while_the_tree_is_parked(spawn, memcr: Memcr) -> None:
    """Killed from outside while parked: memcr lets go of it at once, restores the rest, and says so (exit 7)."""
    target = spawn("forkserver", 3, 2, 8, 8)
    members = members_of(target)
    victim = max(members - {target.pid})
    session = memcr.interactive("-p", target.pid, "--tree")
    session.wait_prompt()
    assert tracer(victim) != "0"
    signal_killed = subprocess.run(["kill", "-KILL", str(victim)], check=False, timeout=10)
    assert signal_killed.returncode == 0
    # memcr, its tracer, collects its exit while the group stays parked: its parent may reap it (once it runs)
    session.out.wait_for(f"pid {victim}: ended while its group is parked (killed by SIGKILL), not by memcr's hand")
    status = procfs.read_status(victim)
    assert status["State"].startswith("Z") and status["TracerPid"] == "0", status
    for pid in members - {victim}:
        assert procfs.read_status(pid)["State"].startswith("t"), pid  # the others stay parked meanwhile
    assert session.press_enter() == 7  # ExitCode.TARGET_ENDED
    err = session.stderr()
    assert f"pid {victim} ended while parked (killed by SIGKILL), not by memcr's hand" in err, err
    assert f"the other {len(members) - 1} processes restored" in err, err
    assert_untouched(members - {victim}, memcr)
    # every other member finds itself intact; only the killed worker fails the parent's count
    code, complaints = verify_tree(target)
    assert code == 1
    assert complaints.strip().splitlines() == [f"worker {victim} failed (status 0x9)"], complaints
