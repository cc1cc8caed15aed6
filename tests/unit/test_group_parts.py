"""The parts of a group park that need no process: cgroup files, the summed report, the group's error.

Rootless; the parks themselves are tested on real processes in tests/test_groups.py.
"""

from __future__ import annotations

import json
import mmap

from memcr.cgroup import parse_events
from memcr.errors import GroupError, StorageError, TargetError, TargetKilled
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
