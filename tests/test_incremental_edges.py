"""The edges of `memcr -l --incremental` (docs/incremental.md), found by a hostile review.

- a park refused before memcr opens the dump (the target traced by another
  process, io_uring, a vfork child, ...) frees the kept dump: else its file
  stayed open and locked in the daemon, and every later park of the pid was
  refused until the daemon stopped, which left the file behind;
- a kept dump modified in place (same size) while the target runs is not
  served: the next park writes the dump whole;
- one userfaultfd may watch a mapping: a target that holds a userfaultfd of
  its own at its restore is not tracked (it may register its memory), one
  that makes it later finds its memory watched (EBUSY) while the dump is
  kept: the documented limit;
- each re-park drops the whole region, and the daemon holds no more than the
  kept dump and one userfaultfd.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import CHECKPOINT, RESTORE, reap
from tests.test_groups_service import park
from tests.test_incremental import _cycle, _quit

SEIZE = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:  # PTRACE_SEIZE
    sys.exit(f"seize: errno {ctypes.get_errno()}")
print("seized", flush=True)
sys.stdin.read()
"""


def _tracer(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def test_a_refused_park_frees_the_kept_dump(spawn, daemon) -> None:
    d = daemon("--incremental")
    target = spawn("rewriter", 16, 5, stdin=True)
    _cycle(d, target, 0, 5, "none")
    d.out.wait_for("is kept for its next park")
    seizer = subprocess.Popen(
        [sys.executable, "-c", SEIZE, str(target.pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert seizer.stdout.readline().strip() == "seized"
        assert d.code(CHECKPOINT, target.pid) != 0  # traced by another process: refused, it runs on
    finally:
        seizer.stdin.close()
        reap(seizer)
    for _ in range(100):
        if not _tracer(target.pid):
            break
        time.sleep(0.05)
    # the refusal left nothing of memcr behind: the next park is an ordinary one
    assert d.code(CHECKPOINT, target.pid) == 0, [line for line in d.out.seen if "failed" in line]
    assert d.code(RESTORE, target.pid) == 0
    _quit(target)
    assert d.terminate() == 0
    assert list(d.dump_dir.iterdir()) == []


def test_a_kept_dump_modified_in_place_is_not_served(spawn, daemon) -> None:
    d = daemon("--incremental")
    target = spawn("rewriter", 16, 6, stdin=True)
    _cycle(d, target, 0, 5, "none")
    d.out.wait_for("is kept for its next park")
    dump = d.dump_dir / f"pages-{target.pid}.img"
    data = bytearray(dump.read_bytes())
    for page in range(4096, len(data) - 4096, 4096):  # payloads, and padding: a record's header ends its page
        for i in range(page, page + 64):
            data[i] ^= 0x5A
    with dump.open("r+b") as f:
        f.write(data)
    # memcr writes the dump whole (or kills the target): never restores it wrong
    _cycle(d, target, 1, 5, "none")
    _quit(target)


def test_a_target_holding_its_own_userfaultfd_is_not_tracked(spawn, daemon) -> None:
    """A program that serves its own faults (a garbage collector, a snapshotter) keeps its userfaultfd open:
    memcr does not watch it, so that it may still register its memory, and says so."""
    d = daemon("--incremental")
    target = spawn("ownuffd", 8, "hold", stdin=True)
    for _ in range(2):
        assert d.code(CHECKPOINT, target.pid) == 0
        assert d.code(RESTORE, target.pid) == 0
        d.out.wait_for(f"pid {target.pid} writes its dump whole: memcr cannot track its writes, as it has a")
        target.proc.stdin.write("try\ncheck\n")
        target.proc.stdin.flush()
        assert target.out.wait_for("registered") == "registered 0"
        assert target.out.wait_for("intact") == "intact"
    assert not (d.dump_dir / f"pages-{target.pid}.img").exists()


def test_a_target_that_makes_a_userfaultfd_later_finds_its_memory_watched(spawn, daemon) -> None:
    """The limit docs/incremental.md states: one userfaultfd may watch a mapping, so while memcr keeps a dump of
    a target that had none at its restore, the target's own registration of its memory fails with EBUSY."""
    d = daemon("--incremental")
    target = spawn("ownuffd", 8, stdin=True)
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    d.out.wait_for("is kept for its next park")
    target.proc.stdin.write("try\ncheck\n")
    target.proc.stdin.flush()
    assert target.out.wait_for("registered") == "registered 16"  # EBUSY
    assert target.out.wait_for("intact") == "intact"
    assert d.terminate() == 0  # the daemon's end ends the watch: the target's registration works again
    target.proc.stdin.write("try\n")
    target.proc.stdin.flush()
    assert target.out.wait_for("registered") == "registered 0"


def _daemon_descriptors(d) -> list[str]:
    folder = Path(f"/proc/{d.proc.pid}/fd")
    links = []
    for fd in folder.iterdir():
        try:
            links.append(str(fd.readlink()))
        except OSError:
            continue
    return [link for link in links if "userfaultfd" in link or link.startswith(str(d.dump_dir))]


def test_each_re_park_drops_the_whole_region_and_leaks_nothing(spawn, daemon) -> None:
    """A guard the hundred cycles lack: a re-park that leaves memcr's old watch in place sees the region as the
    target's own userfaultfd's and drops none of it (answering 0), and the daemon gathers userfaultfds."""
    import json

    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 16, 7, stdin=True)
    for cycle in range(6):
        _cycle(d, target, cycle, 5, "none")
        d.out.wait_for("is kept for its next park")
        held = _daemon_descriptors(d)
        assert len(held) <= 2, f"cycle {cycle}: the daemon holds {held}"
    _quit(target)
    assert d.terminate() == 0
    parks = [json.loads(line.split("memcr: ", 1)[1]) for line in d.out.rest() if '"event":"checkpoint"' in line]
    assert len(parks) == 6
    assert all(p["dropped_pages"] * p["page_size"] >= 16 << 20 for p in parks), [p["dropped_pages"] for p in parks]


def test_kept_dumps_give_way_to_a_checkpoint_that_needs_descriptors(spawn, daemon) -> None:
    """Each kept dump holds two of the daemon's descriptors: once they run short, the dumps kept longest are freed
    and every park still succeeds."""
    d = daemon("--incremental", prefix=["prlimit", "--nofile=64"])
    targets = [spawn("rewriter", 2, seed, stdin=True) for seed in range(30)]
    for target in targets:
        assert d.code(CHECKPOINT, target.pid) == 0, [line for line in d.out.seen if "refused" in line]
        assert d.code(RESTORE, target.pid) == 0
    for target in targets:
        _cycle(d, target, 0, 5, "none")
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert "freed its kept dump" in log and "memcr needs its descriptors for a checkpoint" in log
    for target in targets:
        _quit(target)


def test_kept_dumps_give_way_to_a_group_park_that_needs_descriptors(spawn, daemon) -> None:
    """A tree park needs descriptors for each member: kept dumps are freed for it, those kept longest first,
    rather than the park be refused."""
    d = daemon("--incremental", prefix=["prlimit", "--nofile=128"])
    targets = [spawn("rewriter", 2, seed, stdin=True) for seed in range(40)]
    for target in targets:
        assert d.code(CHECKPOINT, target.pid) == 0
        assert d.code(RESTORE, target.pid) == 0
    # a parent and 2 children: 48 descriptors at each walk of the tree, where 40 kept dumps leave fewer
    tree = spawn("forked", 2)
    code = park(d, tree.pid, tree=True)
    restored = d.code(RESTORE, tree.pid)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert (code, restored) == (0, 0), log[-3000:]
    assert tree.verify() == 0
    assert "freed its kept dump" in log and "memcr needs its descriptors for a checkpoint" in log
    for target in targets:
        _quit(target)
