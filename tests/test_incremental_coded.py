"""Incremental re-parks of coded dumps (`-z`, `-c`, `-e`; docs/incremental.md, "A coded dump").

A coded frame is never written over: a re-park appends what the target
wrote, in frames of its own epoch, and takes the rest of each old frame
where it lies, unless the target wrote in so many places that the dump
would be read slower (incremental.too_costly). The target checks every
page and its own state after each wake-up, eager or lazy; a frame altered
behind memcr's back, its file's stamp put back, is never restored.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from memcr.dump.codec import Coding
from memcr.errors import TargetKilled
from memcr.options import Options
from memcr.park import features, incremental
from memcr.park.checkpoint import checkpoint
from memcr.system import procfs
from tests.conftest import CHECKPOINT, reports
from tests.test_incremental import OPS, _quit
from tests.test_incremental_edges2 import _kept

CODINGS = {"z-c": ["-z", "-c"], "e": ["-e"], "zstd-cbc": ["-z", "zstd", "-e", "aes-128-cbc"]}
pytestmark = pytest.mark.skipif(
    not features.WRITE_TRACKING.present, reason="this kernel cannot track writes (Linux 6.7, arm64 6.10)"
)


@pytest.mark.parametrize("coding", list(CODINGS))
def test_coded_re_parks_wake_byte_exact_eager_and_lazy(spawn, daemon, coding: str) -> None:
    """Cycles at random: the target writes 1-10 % in runs of 1-64 pages and reshapes its memory; a third of the
    wake-ups are lazy (from a dump a re-park added to), after which the next park is whole."""
    from memcr_client import Client

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = daemon("--incremental", "--json", *CODINGS[coding])
    target = spawn("rewriter", 32, seed, stdin=True)
    lazies = 0
    for cycle in range(15):
        assert d.code(CHECKPOINT, target.pid) == 0, f"seed {seed}, cycle {cycle}: checkpoint failed"
        lazy = cycle % 3 == 2
        Client(d.listen).restore(target.pid, lazy=lazy)
        if lazy:
            lazies += 1
            d.out.wait_for(f"pid {target.pid}: lazy restore complete")
        percent, op, run = rng.randint(1, 10), rng.choice(OPS), rng.choice([16, 32, 64])
        target.proc.stdin.write(f"cycle {cycle} {percent} {op} {run}\n")
        target.proc.stdin.flush()
        said = target.out.wait_for(f" {cycle}")
        assert said == f"done {cycle}", f"seed {seed}, cycle {cycle} ({op}, {percent} %): {said}"
    _quit(target)
    assert d.terminate() == 0
    parks = [r for r in reports("\n".join(d.out.rest())) if r["event"] == "checkpoint"]
    added = [p for p in parks[1:] if p["written_bytes"] < p["dump_bytes"] // 2]
    # every park after an eager restore may add (unless the target wrote in too many places); after a lazy one
    # it is whole
    assert len(added) >= 5, f"seed {seed}: {[(p['written_bytes'], p['dump_bytes']) for p in parks]}"
    assert all(p["written_bytes"] < parks[0]["written_bytes"] * 0.3 for p in added), f"seed {seed}"
    assert lazies == 5


def test_a_target_that_writes_everywhere_is_re_parked_whole(spawn, daemon) -> None:
    """Pages written at random, one here and one there: added to, the coded dump would lie in a piece per page,
    and its wake-up would slow down. memcr writes it whole and says why; a target that writes in runs again is
    re-parked at the cost of those."""
    from memcr_client import Client

    d = daemon("--incremental", "--json", "-c")
    target = spawn("rewriter", 32, 8, stdin=True)
    said = []
    for run in (1, 64, 1, 64):
        assert d.code(CHECKPOINT, target.pid) == 0
        Client(d.listen).restore(target.pid)
        d.out.wait_for("is kept for its next park")
        target.proc.stdin.write(f"write 5 {run}\n")
        target.proc.stdin.flush()
        said.append(target.out.wait_for("wrote"))
    assert d.code(CHECKPOINT, target.pid) == 0
    Client(d.listen).restore(target.pid)
    _quit(target)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    parks = [r for r in reports(log) if r["event"] == "checkpoint"]
    whole = [p["written_bytes"] >= p["dump_bytes"] - (64 << 10) for p in parks]
    assert whole == [True, True, False, True, False], [(p["written_bytes"], p["dump_bytes"]) for p in parks]
    assert log.count("places since its restore: its coded dump, added to, would lie in about") == 2


@pytest.mark.parametrize("percent, run", [(50, 128), (100, 128), (150, 160)])
def test_a_re_park_never_leaves_the_folder_much_fuller_than_the_target(spawn, daemon, percent, run) -> None:
    """Long runs over most frames: each frame keeps a part the target did not write, and the old copies of the
    rest. Added to, the dump would take up to twice the target's memory in the folder: memcr writes it whole
    and says why; what is kept after each park stays within 1.3 times the target's memory."""
    from memcr_client import Client

    d = daemon("--incremental", "--json", "-c")
    target = spawn("rewriter", 64, 13, stdin=True)
    for _ in range(3):
        assert d.code(CHECKPOINT, target.pid) == 0
        Client(d.listen).restore(target.pid)
        d.out.wait_for("is kept for its next park")
        target.proc.stdin.write(f"write {percent} {run}\n")
        target.proc.stdin.flush()
        target.out.wait_for("wrote")
    _quit(target)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    restores = [r for r in reports(log) if r["event"] == "restore"]
    assert max(r["kept_bytes"] for r in restores) < (64 << 20) * 1.3, [r["kept_bytes"] for r in restores]
    assert "would hold old copies of" in log


@pytest.mark.parametrize("coding", [Coding(checksum=True), Coding(cipher="aes-256-gcm")], ids=["c", "e"])
def test_a_frame_altered_in_a_kept_dump_is_never_restored(spawn, tmp_path, coding: Coding) -> None:
    """Someone flips a byte of a frame the next park takes parts of again, and puts the file's modification
    time back: the stamp memcr compares is the same. The frame's checksum or authentication refuses it at the
    restore, after its pages were dropped: the target is killed, as the cardinal rule wants."""
    _dumps, options, target, kept = _kept(spawn, tmp_path, 16, 21, coding)
    path = kept.dump.path
    before = os.stat(path)
    with path.open("r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0x20]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    target.proc.stdin.write("write 1 16\n")
    target.proc.stdin.flush()
    assert target.out.wait_for("wrote").startswith("wrote")
    said: list[str] = []
    parked = checkpoint(target.pid, options, said.append, kept=kept)
    assert any("unchanged since the last restore" in line for line in said), said
    with pytest.raises(TargetKilled, match=r"checksum|authentication"):
        parked.restore()
    target.proc.wait(10)
    assert not os.path.exists(f"/proc/{target.pid}")


def test_a_coded_dump_cut_short_before_the_tracking_leaves_nothing_behind(spawn, tmp_path) -> None:
    """The dump is cut in half once every page is back, before memcr reads its frames to keep it: the restore
    stands, memcr says it does not track, and no userfaultfd of memcr's is left watching the target's memory
    (which would refuse the target's own with EBUSY)."""
    options = Options(dump_dir=tmp_path, coding=Coding(checksum=True), incremental=True)
    target = spawn("rewriter", 16, 3, stdin=True)
    ours = _userfaultfds()
    parked = checkpoint(target.pid, options, print)
    path = parked.dump.path

    def progress(done: int, total: int) -> None:
        if done == total:
            os.truncate(path, os.path.getsize(path) // 2)

    kept: list[incremental.Kept] = []
    parked.restore(progress=progress, keep=kept.append)
    assert not kept
    assert _userfaultfds() == ours
    watched = [line for line in Path(f"/proc/{target.pid}/smaps").read_text().splitlines() if " uw" in line]
    assert not watched, watched
    target.proc.stdin.write("cycle 0 5 none 16\n")
    target.proc.stdin.flush()
    assert target.out.wait_for(" 0") == "done 0"
    _quit(target)


def _userfaultfds() -> list[str]:
    return [fd for fd, link in procfs.descriptor_links(os.getpid()) if link == "anon_inode:[userfaultfd]"]


def test_pages_given_back_are_not_counted_as_served(spawn, daemon) -> None:
    """The target gives back 56 of its 64 MiB whole, and all but the first page of each of the 8 MiB left: a page
    given back reads as written, but no park adds it. Counted as pages the dump serves, they hid the 8 MiB of old
    copies the re-park would leave in frames it takes one page of: it is written whole."""
    from memcr_client import Client

    d = daemon("--incremental", "--json", "-c")
    target = spawn("rewriter", 64, 14, stdin=True)
    assert d.code(CHECKPOINT, target.pid) == 0
    Client(d.listen).restore(target.pid)
    d.out.wait_for("is kept for its next park")
    for command in ("giveback 56 0", "giveback 64 1"):
        target.proc.stdin.write(command + "\n")
        target.proc.stdin.flush()
        assert target.out.wait_for("gave") == "gave"
    assert d.code(CHECKPOINT, target.pid) == 0
    Client(d.listen).restore(target.pid)
    _quit(target)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert "would hold old copies of" in log
    restores = [r for r in reports(log) if r["event"] == "restore"]
    assert restores[-1]["kept_bytes"] < 4 << 20, restores
