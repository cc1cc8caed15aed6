"""Checkpoint and restore round trips on real targets, verified by the targets."""

from __future__ import annotations

import os
import stat

import pytest

from tests.conftest import Memcr, log_value, reports

MODES = [[], ["-m"], ["-f"], ["-m", "-f"]]


@pytest.mark.parametrize("threads", [0, 8])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: " ".join(m) or "plain")
def test_round_trip(spawn, memcr: Memcr, mode: list[str], threads: int) -> None:
    target = spawn("pattern", 64, threads)
    result = memcr.run("-p", target.pid, "-n", "--json", *mode)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the human lines are an interface too: scripts written for the C memcr grep them
    assert log_value(out, rf"seized {threads + 1} threads")
    assert log_value(out, r"download took \d+ ms")
    assert log_value(out, r"upload took \d+ ms")
    assert log_value(out, rf"dump \S+/pages-{target.pid}\.img \(\d+ bytes\)")
    assert log_value(out, rf"pid {target.pid} restored")
    parked, restored = reports(out)
    assert (parked["event"], restored["event"]) == ("checkpoint", "restore")
    assert parked["pid"] == target.pid and parked["threads"] == threads + 1
    assert parked["pages"] >= 64 * 2**20 // parked["page_size"]
    assert parked["dump_path"].endswith(f"pages-{target.pid}.img") and parked["dump_bytes"] > 0
    assert restored["upload_ms"] > 0 and restored["download_ms"] == parked["download_ms"]
    before, after = parked["rss_before"], parked["rss_after"]
    assert after["VmRSS"] < before["VmRSS"]
    assert after["RssAnon"] < before["RssAnon"] / 10
    if "-f" in mode:
        assert after["RssFile"] < before["RssFile"]
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_interactive_frozen_state(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 256)
    before = target.rss_kb()
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    frozen = target.rss_kb()
    assert frozen <= before / 10, (before, frozen)
    assert target.status()["State"].startswith("t")  # tracing stop: frozen
    [dump] = memcr.dumps()
    assert dump.name == f"pages-{target.pid}.img"
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert dump.stat().st_size >= 256 << 20
    assert session.press_enter() == 0, session.stderr()
    assert log_value(session.out.rest(), rf"pid {target.pid} restored")
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_named_parasite_socket(spawn, memcr: Memcr, tmp_path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    target = spawn("pattern", 16)
    session = memcr.interactive("-p", target.pid, "-S", sockets)
    session.wait_prompt()
    path = sockets / f"memcr{target.pid}"
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert session.press_enter() == 0, session.stderr()
    assert not path.exists()
    assert target.verify() == 0


def test_named_parasite_socket_with_group(spawn, memcr: Memcr, tmp_path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    os.chown(sockets, -1, 4321)  # -G's group: the targets' users make their sockets there as its members
    target = spawn("pattern", 16)
    session = memcr.interactive("-p", target.pid, "-S", sockets, "-G", 4321)
    session.wait_prompt()
    st = (sockets / f"memcr{target.pid}").stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 0o660)
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0


def test_group_without_socket_dir_is_refused(memcr: Memcr) -> None:
    result = memcr.run("-p", 1, "-G", 4321)
    assert result.returncode == 2
    assert "-G/--parasite-socket-gid needs -S" in result.stderr
