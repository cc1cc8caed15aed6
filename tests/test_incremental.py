"""Incremental re-park (`memcr -l --incremental`, docs/incremental.md): the zdtm module of issue #32.

A `rewriter` target is parked and woken 100 times through a daemon that
keeps its dump. Between cycles it writes a new pattern over a random 1-10 %
of its pages and reshapes part of its memory (maps over it, swaps two parts
with mremap, moves one away and back, protects it, forks, grows its heap,
unmaps and maps a part again with the same bytes, gives pages back, writes
bytes back unchanged); after each wake-up it checks every page, its signal
state, dispositions, threads, memory map and VmFlags.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from memcr.park import features
from tests.conftest import CHECKPOINT, RESTORE, memcr_argv, reports

CYCLES = int(os.environ.get("MEMCR_INCREMENTAL_CYCLES", "100"))
MIB = 64
OPS = ["none", "same", "dontneed", "mapover", "swap", "away", "mprotect", "fork", "grow", "reuse"]
CODINGS = {"plain": [], "z-c": ["-z", "-c"], "e": ["-e"]}


def _cycle(daemon, target, cycle: int, percent: int, op: str, lazy: bool = False, run: int = 1) -> None:
    assert daemon.code(CHECKPOINT, target.pid) == 0, f"cycle {cycle}: checkpoint failed"
    assert daemon.code(RESTORE, target.pid) == 0, f"cycle {cycle}: restore failed"
    if lazy:  # the target's VmFlags show memcr's lazy watch ("um") until every page is back
        daemon.out.wait_for(f"pid {target.pid}: lazy restore complete")
    target.proc.stdin.write(f"cycle {cycle} {percent} {op} {run}\n")
    target.proc.stdin.flush()
    said = target.out.wait_for(f" {cycle}")
    assert said == f"done {cycle}", f"cycle {cycle} ({op}, {percent} %): {said}; {target.proc.stderr.read()}"


def _quit(target) -> None:
    target.proc.stdin.write("quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(60) == 0, f"the target found itself wrong: {target.proc.stderr.read()}"


@pytest.mark.parametrize("coding", list(CODINGS))
def test_a_hundred_cycles_stay_byte_exact(spawn, daemon, coding: str) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = daemon("--incremental", "--json", *CODINGS[coding])
    target = spawn("rewriter", MIB, seed, stdin=True)
    for cycle in range(CYCLES):
        # a coded dump is added to where the target writes in a few places (incremental.too_costly): mostly runs
        # of 64 pages there, and every seventh cycle pages at random, after which the park is whole
        run = 1 if coding == "plain" or cycle % 7 == 6 else 64
        _cycle(d, target, cycle, rng.randint(1, 10), OPS[cycle % len(OPS)], run=run)
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    _quit(target)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    parks = [r for r in reports(log) if r["event"] == "checkpoint"]
    restores = [r for r in reports(log) if r["event"] == "restore"]
    assert len(parks) == CYCLES + 1
    full = parks[0]["written_bytes"]
    assert full >= MIB << 20
    added = [p for p in parks[1:] if p["written_bytes"] < p["dump_bytes"] // 2]
    # a coded dump's frames are not written over: the old copies it keeps make it worn sooner
    assert len(added) >= CYCLES // (2 if coding == "plain" else 3), (
        f"seed {seed}: only {len(added)} of {CYCLES} re-parks were incremental"
    )
    # each wrote what the target wrote: at most 10 % of its pages, and 1 MiB more where the operation maps anew
    assert max(p["written_bytes"] for p in added) < full * 0.2, f"seed {seed}"
    # the folder never holds much more than the target's memory, as the last park written whole found it (its
    # heap grows): a coded dump adds what the target wrote, and is written whole once 1/8 of it is old copies
    last_whole = full
    for park, restore in zip(parks, restores, strict=True):
        if park["written_bytes"] >= park["dump_bytes"] - (64 << 10):
            last_whole = park["dump_bytes"]
        assert restore["kept_bytes"] < last_whole * 1.3 + (2 << 20), f"seed {seed}"
    assert "freed its kept dump" in log


def test_the_kept_dump_is_freed_when_its_process_exits(spawn, daemon) -> None:
    d = daemon("--incremental")
    target = spawn("rewriter", 16, 1, stdin=True)
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    dump = d.dump_dir / f"pages-{target.pid}.img"
    assert dump.exists()
    d.out.wait_for("is kept for its next park")
    _quit(target)
    d.out.wait_for(f"pid {target.pid}: freed its kept dump", timeout=20)
    assert not dump.exists()


def test_a_daemon_that_stops_frees_the_kept_dumps(spawn, daemon) -> None:
    d = daemon("--incremental")
    target = spawn("rewriter", 16, 2, stdin=True)
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    assert d.terminate() == 0
    assert list(d.dump_dir.iterdir()) == []
    _quit(target)  # it runs on, intact


def test_the_dump_a_killed_daemon_kept_goes_at_the_next_start(spawn, daemon) -> None:
    d = daemon("--incremental")
    target = spawn("rewriter", 16, 7, stdin=True)
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    dump = d.dump_dir / f"pages-{target.pid}.img"
    assert dump.exists()
    d.proc.kill()
    d.proc.wait()
    again = daemon("--incremental")
    assert f"removed {dump}" in "\n".join(again.out.seen)
    assert not dump.exists()
    _cycle(again, target, 0, 5, "none")  # its watch ended with the daemon that held it: it ran on intact
    _quit(target)


def test_a_lazy_restore_keeps_no_dump(spawn, daemon) -> None:
    d = daemon("--incremental", "--lazy")
    target = spawn("rewriter", 16, 3, stdin=True)
    for cycle in range(3):
        _cycle(d, target, cycle, 5, "none", lazy=True)
    assert "a lazy restore keeps no dump" in "\n".join(d.out.seen)
    _quit(target)
    time.sleep(0.5)
    assert not any(p.name.startswith("pages-") for p in d.dump_dir.iterdir())


def test_a_pid_parked_again_after_a_plain_restore_is_parked_whole(spawn, daemon) -> None:
    """Without --incremental nothing is kept: each park writes everything, as ever."""
    d = daemon("--json")
    target = spawn("rewriter", 16, 4, stdin=True)
    for cycle in range(2):
        _cycle(d, target, cycle, 5, "none")
    _quit(target)
    assert d.terminate() == 0
    parks = [r for r in reports("\n".join(d.out.rest())) if r["event"] == "checkpoint"]
    assert all(p["written_bytes"] == p["dump_bytes"] - 32 for p in parks)


def _whole(daemon, target, cycles: int) -> str:
    """Park and wake `target` `cycles` times, each park written whole and nothing kept; the daemon's log."""
    for cycle in range(cycles):
        _cycle(daemon, target, cycle, 5, OPS[cycle % len(OPS)])
        assert not (daemon.dump_dir / f"pages-{target.pid}.img").exists(), "a dump was kept"
    _quit(target)
    assert daemon.terminate() == 0
    log = "\n".join(daemon.out.rest())
    parks = [r for r in reports(log) if r["event"] == "checkpoint"]
    assert all(p["written_bytes"] == p["dump_bytes"] - 32 for p in parks)
    return log


@pytest.mark.skipif(features.WRITE_TRACKING.present, reason="this kernel tracks writes (Linux 6.7, arm64 6.10)")
def test_where_the_kernel_cannot_track_writes_every_park_is_whole(spawn, daemon) -> None:
    """Debian's arm64 6.1 and 5.10: the daemon says at start what it lacks, each restore says why it keeps nothing."""
    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 16, 6, stdin=True)
    log = _whole(d, target, 3)
    assert "WP_ASYNC is not available here (Linux 6.7, arm64 6.10)" in log
    assert "memcr cannot track its writes, as this kernel cannot track writes" in log


def test_a_restore_asks_for_it_or_against_it(spawn, daemon) -> None:
    """V2 option 1004, whatever the daemon's --incremental."""
    from memcr_client import Client

    for default, asked in ((False, True), (True, False)):
        d = daemon(*(["--incremental"] if default else []))
        target = spawn("rewriter", 16, 8, stdin=True)
        client = Client(d.listen, timeout=60)
        for cycle in range(3):
            client.checkpoint(target.pid)
            client.restore(target.pid, incremental=asked)
            assert (d.dump_dir / f"pages-{target.pid}.img").exists() == asked
            target.proc.stdin.write(f"cycle {cycle} 5 none\n")
            target.proc.stdin.flush()
            assert target.out.wait_for(f" {cycle}") == f"done {cycle}"
        _quit(target)
        assert d.terminate() == 0
        assert ("unchanged since the last restore" in "\n".join(d.out.rest())) == asked


def test_incremental_is_for_the_daemon(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        memcr_argv("-p", os.getpid(), "-d", tmp_path, "--incremental"), capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "--incremental only applies to service mode (-l)" in done.stderr
