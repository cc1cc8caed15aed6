"""The parts of a group park that need no ptrace: cgroup files, the summed report, the group's error, the
tree's walk (over this process's own children).

Rootless; the parks themselves are tested on real processes in tests/test_groups.py.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import subprocess

from memcr.errors import GroupError, StorageError, TargetError, TargetKilled
from memcr.group.cgroup import parse_events
from memcr.group.park import Tree, descendants
from memcr.report import GroupReport, Report, error_json
from memcr_client.protocol import ExitCode


def test_cgroup_events() -> None:
    assert parse_events("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}
    assert parse_events("") == {}


PAGE = mmap.PAGESIZE


def member(pid: int, pages: int, shared: int) -> Report:
    r = Report(pid, PAGE, threads=2, pages=pages, dropped_pages=pages, shared_pages=shared, dump_bytes=pages * PAGE)
    r.rss_before = {"VmRSS": 1000, "RssAnon": 800, "RssFile": 200}
    r.rss_after = {"VmRSS": 300, "RssAnon": 100, "RssFile": 200}
    return r


def test_group_report_sums_its_members() -> None:
    g = GroupReport.of("tree 10", [member(10, 100, 7), member(11, 50, 7)], park_ms=12.5)
    assert (g.members, g.threads, g.pages, g.dropped_pages, g.shared_pages) == ([10, 11], 4, 150, 150, 14)
    assert g.dump_bytes == 150 * PAGE
    assert g.rss_before == {"VmRSS": 2000, "RssAnon": 1600, "RssFile": 400}
    assert g.rss_after["RssAnon"] == 200
    line = json.loads(g.json("checkpoint"))
    assert line["event"] == "group-checkpoint" and line["group"] == "tree 10" and line["park_ms"] == 12.5


def test_group_error_takes_its_cause_data_and_exit_code() -> None:
    cause = StorageError("disk full", pid=11, path="/tmp/pages-11.img", errno=28, what="dump")
    e = GroupError("parking tree 10 failed at process 11: disk full", cause, 11)
    assert (e.pid, e.path, e.errno, e.what, e.exit_code) == (11, "/tmp/pages-11.img", 28, "dump", ExitCode.STORAGE)
    killed = GroupError("...", TargetError("refused", pid=12), 12, killed=[13])
    assert killed.exit_code == TargetKilled.exit_code and killed.killed == [13]
    internal = GroupError("...", RuntimeError("bug"), None)
    assert (internal.pid, internal.exit_code) == (None, ExitCode.FAILED)


def test_error_line_of_a_group() -> None:
    e = GroupError("parking cgroup /x failed", TargetError("refused"), None)
    line = json.loads(error_json(e.pid, "checkpoint", e, group="cgroup /x"))
    assert (line["pid"], line["group"], line["type"], line["exit_code"]) == (None, "cgroup /x", "GroupError", 3)


# a tree: 100 -> 101 -> 103, 100 -> 102, 200 -> 201 (another tree); zombies are not in the links
LINKS = {100: 1, 101: 100, 102: 100, 103: 101, 200: 1, 201: 200}


def test_descendants_follow_parent_links() -> None:
    assert descendants(100, LINKS) == {101, 102, 103}
    assert descendants(101, LINKS) == {103}
    assert descendants(103, LINKS) == set()
    assert descendants(200, LINKS) == {201}


def test_descendants_of_a_parent_link_loop_end() -> None:
    """pid reuse between two reads can make a loop of parent links: the walk still ends."""
    assert descendants(5, {5: 6, 6: 5}) == {6}


def test_a_tree_walk_finds_grandchildren_and_leaves_zombies_out() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    zombie = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and stays a zombie
        found = Tree(os.getpid()).walk()
        assert {os.getpid(), parent.pid, grandchild} <= found
        assert zombie.pid not in found
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
        parent.kill()
        parent.wait()
        zombie.wait()
