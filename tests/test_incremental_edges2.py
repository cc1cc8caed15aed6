"""More edges of `memcr -l --incremental`, from a second hostile review: a quiet target's re-parks stay
incremental; a tracking failure leaves the restore good; a sparse target is re-parked incrementally; a dump
written to while parked is never restored (the target is killed); protections, file mappings at the same
addresses, thousands of small mappings, a tree park, another directory, compression, huge pages, a target
killed while re-parked, and a one-shot memcr on a kept pid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcr.dump.codec import Coding
from memcr.options import Options
from memcr.park import incremental
from memcr.park.checkpoint import checkpoint
from tests.conftest import CHECKPOINT, RESTORE, Memcr
from tests.test_incremental import _cycle, _quit


def _parks(d) -> list[dict]:
    return [json.loads(line.split("memcr: ", 1)[1]) for line in d.out.seen if '"event":"checkpoint"' in line]


def test_every_re_park_of_a_quiet_target_stays_incremental(spawn, daemon) -> None:
    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 16, 11, stdin=True)
    for cycle in range(12):
        _cycle(d, target, cycle, 5, "none")
        d.out.wait_for("is kept for its next park")
    _quit(target)
    assert d.terminate() == 0
    d.out.rest()
    # no re-park of a quiet target is judged changed, unsettled or worn
    whole = [line for line in d.out.seen if "whole" in line]
    assert not whole, whole


def test_re_parks_write_over_the_kept_dump_in_place(spawn, daemon) -> None:
    """A target that only writes (no mapping changes) leaves the kept dump as its whole park laid it out: each
    re-park writes what changed over the old copies, adds no pages to the file, and the restores read the same
    runs (a dump cut into one piece per written run made every wake-up slower)."""
    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 16, 12, stdin=True)
    for cycle in range(8):
        _cycle(d, target, cycle, 10, "none")
        d.out.wait_for("is kept for its next park")
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    _quit(target)
    assert d.terminate() == 0
    d.out.rest()
    parks = _parks(d)
    assert len(parks) == 9
    whole = parks[0]["dump_bytes"]
    for park in parks[1:]:
        assert 0 < park["written_bytes"] < whole * 0.2, park
        # the end records re-parks add: no page appended
        assert park["dump_bytes"] - whole < (64 << 10) * len(parks), park
    over = [line for line in d.out.seen if "MiB written over in place, 0.0 MiB added" in line]
    assert len(over) == len(parks) - 1, d.out.seen


def _uw_mappings(pid: int) -> int:
    return sum(
        1
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines()
        if line.startswith("VmFlags:") and " uw" in line
    )


def test_tracking_that_fails_otherwise_than_untracked_fails_the_restore(spawn, tmp_path, monkeypatch) -> None:
    """incremental.track after the pages are back, still frozen: any error but Untracked (the parasite's
    connection, an OSError of the handshake, /proc refused) goes to restore()'s rollback, which writes every page
    again, lets the target run and raises: the client hears its restore failed, though the target runs intact."""
    from memcr.engine.parasite import Parasite
    from memcr.errors import ParasiteError

    dumps = tmp_path / "dumps"
    dumps.mkdir()
    target = spawn("rewriter", 16, 4, stdin=True)
    parked = checkpoint(target.pid, Options(dump_dir=dumps, coding=Coding(), incremental=True), print)

    def lost(self, flags, device=None):
        raise ParasiteError("injected: lost the connection to the parasite")

    monkeypatch.setattr(Parasite, "userfaultfd", lost)
    try:
        parked.restore(keep=lambda kept: None)
    except Exception as e:
        failure = e
    else:
        failure = None
    monkeypatch.undo()
    _quit(target)
    assert failure is None, f"restore() raised {failure!r}, the target runs intact"


def test_a_sparse_target_is_re_parked_incrementally(spawn, daemon) -> None:
    """FRAGMENTS judges the dump worn by its runs against its pages: a target whose present pages are scattered
    (every 8th page of a heap) has a fresh full dump already 'worn', and every re-park of it is full."""
    d = daemon("--incremental", "--json")
    target = spawn("sparse")
    for _ in range(3):
        assert d.code(CHECKPOINT, target.pid) == 0
        assert d.code(RESTORE, target.pid) == 0
        d.out.wait_for("is kept for its next park")
    assert d.code(CHECKPOINT, target.pid) == 0
    assert d.code(RESTORE, target.pid) == 0
    assert target.verify() == 0
    assert d.terminate() == 0
    d.out.rest()
    whole = [line for line in d.out.seen if "whole" in line]
    parks = _parks(d)
    assert not whole, (whole, [(p["written_bytes"], p["dump_bytes"]) for p in parks])


def _write(target, percent: int) -> None:
    target.proc.stdin.write(f"write {percent}\n")
    target.proc.stdin.flush()
    assert target.out.wait_for("wrote").startswith("wrote")


def _written_after_the_copy(monkeypatch) -> None:
    """The target's writes as if made after the copy a re-park makes while the target runs (test_precopy.py):
    the frozen park writes them over the kept dump, the path these tests follow."""
    monkeypatch.setattr(incremental, "precopy", lambda *args: incremental.Copied(0, 0.0, None))


def _kept(
    spawn, tmp_path: Path, mib: int, seed: int, coding: Coding | None = None
) -> tuple[Path, Options, object, incremental.Kept]:
    """A rewriter target parked and restored by the Python API, its dump (coded as `coding`) kept: (folder,
    options, target, Kept)."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    options = Options(dump_dir=dumps, coding=coding or Coding(), incremental=True)
    target = spawn("rewriter", mib, seed, stdin=True)
    kept: list[incremental.Kept] = []
    checkpoint(target.pid, options, print).restore(keep=kept.append)
    return dumps, options, target, kept.pop()


def test_a_dump_written_to_while_parked_is_never_restored(spawn, tmp_path) -> None:
    """A plain dump carries no checksum: bytes someone wrote into it while the target was parked (here while its
    holes were punched, after an incremental park) would go back as the target's. memcr compares the file with
    what it left (DumpFile.stamp) before any page goes back: it kills the target rather than restore it wrong."""
    from memcr.errors import TargetKilled

    dumps, options, target, kept = _kept(spawn, tmp_path, 16, 5)
    _write(target, 5)
    parked = checkpoint(target.pid, options, print, kept=kept)
    parked.tidy()
    dump = dumps / f"pages-{target.pid}.img"
    with dump.open("r+b") as f:  # someone else's write, same size
        data = bytearray(f.read())
        for page in range(4096, len(data) - 4096, 4096):
            for i in range(page, page + 64):
                data[i] ^= 0x5A
        f.seek(0)
        f.write(data)
    with pytest.raises(TargetKilled, match="written to since memcr wrote it"):
        parked.restore()
    target.proc.wait(10)  # memcr, tracer and (in this test) parent, collected its exit
    assert not Path(f"/proc/{target.pid}").exists()


def _say(target, *commands: str) -> None:
    for command in commands:
        target.proc.stdin.write(command + "\n")
        target.proc.stdin.flush()
        said = target.out.wait_for("")
        assert said == "ok", f"{command}: {said}"


@pytest.mark.parametrize("maps", [0, 3000])
def test_protections_and_file_mappings_between_re_parks(spawn, daemon, maps: int) -> None:
    """Between parks the region turns PROT_NONE, read-only (read through /proc/PID/mem), read-write, and a private
    file mapping takes a quarter of it at the same addresses; with thousands of small mappings beside."""
    d = daemon("--incremental", "--json")
    target = spawn("protcycle", 4096, maps, stdin=True)

    def cycle() -> None:
        assert d.code(CHECKPOINT, target.pid) == 0
        assert d.code(RESTORE, target.pid) == 0
        d.out.wait_for("is kept for its next park")

    cycle()
    _say(target, "write 200", "prot none")
    cycle()
    cycle()
    _say(target, "check", "prot ro")
    cycle()
    _say(target, "check", "prot rw", "write 100", "file")
    cycle()
    _say(target, "check", "write 50")
    cycle()
    _say(target, "check")
    target.proc.stdin.write("quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(30) == 0
    assert d.terminate() == 0
    d.out.rest()
    parks = _parks(d)
    assert [p["written_bytes"] < p["dump_bytes"] // 2 for p in parks[1:]] == [True] * (len(parks) - 1)


def test_a_kept_pid_parked_in_a_tree_then_alone(spawn, daemon) -> None:
    """A pid with a kept dump is parked as a --tree group (V2 option 1000), then on its own again; between each,
    a V2 request with another dump directory, then back."""
    from memcr_client import Client

    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 16, 9, stdin=True)
    _cycle(d, target, 0, 5, "none")
    d.out.wait_for("is kept for its next park")
    Client(d.listen).checkpoint(target.pid, tree=True)
    Client(d.listen).restore(target.pid)
    d.out.wait_for('"event":"group-restore"')
    _cycle(d, target, 1, 5, "swap")
    d.out.wait_for("is kept for its next park")
    _cycle(d, target, 2, 5, "none")
    _quit(target)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert f"pid {target.pid}: freed its kept dump" in log and "it is parked in a group now" in log
    assert log.count("unchanged since the last restore") == 1  # the park after the group's wrote whole
    assert list(d.dump_dir.iterdir()) == []


def test_a_kept_pid_parked_elsewhere_and_compressed_then_back(spawn, daemon, tmp_path) -> None:
    from memcr_client import Client

    other = tmp_path / "other"
    other.mkdir()
    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 16, 10, stdin=True)
    _cycle(d, target, 0, 5, "none")
    d.out.wait_for("is kept for its next park")
    for kwargs in ({"dump_dir": str(other)}, {}, {"compress": "lz4"}, {}, {}):
        Client(d.listen).checkpoint(target.pid, **kwargs)
        Client(d.listen).restore(target.pid)
        target.proc.stdin.write("write 5\n")
        target.proc.stdin.flush()
        target.out.wait_for("wrote")
    _cycle(d, target, 1, 5, "none")
    _quit(target)
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert f"this park writes to {other}" in log
    assert "this park compresses, checksums or encrypts its dump" in log
    assert "unchanged since the last restore" in log  # back home, uncompressed: incremental again
    assert list(d.dump_dir.iterdir()) == [] and list(other.iterdir()) == []


def test_a_target_killed_while_re_parked_leaves_nothing(spawn, daemon) -> None:
    import signal

    d = daemon("--incremental", "--json")
    target = spawn("rewriter", 64, 12, stdin=True)
    _cycle(d, target, 0, 5, "none")
    d.out.wait_for("is kept for its next park")
    target.proc.stdin.write("write 5\n")
    target.proc.stdin.flush()
    target.out.wait_for("wrote")
    assert d.code(CHECKPOINT, target.pid) == 0
    d.out.wait_for("in the kept dump already")
    target.proc.send_signal(signal.SIGKILL)
    assert target.proc.wait(30) == -9
    assert d.code(RESTORE, target.pid) != 0
    assert d.terminate() == 0
    assert list(d.dump_dir.iterdir()) == []


def test_transparent_huge_pages_between_re_parks(spawn, daemon) -> None:
    """The suite's targets never have huge pages (THP is "madvise" here): a region asking for them
    (MADV_HUGEPAGE), restored into huge pages, tracked, written a page here and there between parks."""
    d = daemon("--incremental", "--json")
    target = spawn("protcycle", 8192, 0, "huge", stdin=True)

    def cycle() -> None:
        assert d.code(CHECKPOINT, target.pid) == 0
        assert d.code(RESTORE, target.pid) == 0
        d.out.wait_for("is kept for its next park")

    for _ in range(5):
        cycle()
        _say(target, "thp", "check", "write 20")
    cycle()
    _say(target, "check")
    target.proc.stdin.write("quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(30) == 0, target.proc.stderr.read()
    assert d.terminate() == 0
    d.out.rest()
    parks = _parks(d)
    assert all(p["written_bytes"] < p["dump_bytes"] // 2 for p in parks[1:]), [p["written_bytes"] for p in parks]


def test_a_one_shot_memcr_on_a_pid_whose_dump_a_daemon_keeps(spawn, daemon) -> None:
    """The kept dump stays locked while its app runs: a memcr -p on that pid with the same folder is refused, and
    told why (a daemon keeps the dump) and what to do; with another folder it parks, and says which mappings a
    userfaultfd watches (memcr's, from the daemon) stay in memory."""
    d = daemon("--incremental")
    target = spawn("rewriter", 16, 13, stdin=True)
    _cycle(d, target, 0, 5, "none")
    d.out.wait_for("is kept for its next park")
    result = Memcr(d.dump_dir).run("-p", target.pid, "-n")
    assert result.returncode == 3, result.stderr
    assert "or a daemon keeps the dump for its next park (--incremental)" in result.stderr
    elsewhere = d.dump_dir.parent / "elsewhere"
    elsewhere.mkdir()
    result = Memcr(elsewhere).run("-p", target.pid, "-n")
    assert result.returncode == 0, result.stderr
    assert "stay in memory: a userfaultfd watches them for writes" in result.stdout + result.stderr
    _quit(target)


def _re_park_failing_at(monkeypatch, target, options: Options, kept: incremental.Kept, pick) -> dict[str, int]:
    """A re-park whose write over the kept dump fails (a full disk) at the batch `pick(batches)` (from 1), which
    must raise StorageError: how many batches it had and how many drops it sent before."""
    from memcr.dump.writer import PlainWriter
    from memcr.engine.parasite import Parasite
    from memcr.errors import StorageError

    counts = {"batches": 0, "writes": 0, "drops": 0, "at": 0}
    real_batches, real_write, real_drop = incremental.batches, PlainWriter.write_over, Parasite.send_drop

    def counted_batches(*args):
        out = real_batches(*args)
        counts["batches"], counts["at"] = len(out), pick(len(out))
        return out

    def write_over(self, data, pieces):
        counts["writes"] += 1
        if counts["writes"] == counts["at"]:
            raise StorageError("injected: no space left for the dump", what="dump")
        real_write(self, data, pieces)

    def send_drop(self, addr, length):
        counts["drops"] += 1
        real_drop(self, addr, length)

    _written_after_the_copy(monkeypatch)
    monkeypatch.setattr(incremental, "batches", counted_batches)
    monkeypatch.setattr(PlainWriter, "write_over", write_over)
    monkeypatch.setattr(Parasite, "send_drop", send_drop)
    with pytest.raises(StorageError):
        checkpoint(target.pid, options, print, kept=kept)
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize("failing", ["first", "last"])
def test_a_re_park_that_fails_while_writing_over_the_dump_leaves_the_target_whole(
    spawn, tmp_path, monkeypatch, failing: str
) -> None:
    """A re-park drops each stretch of the target's memory as soon as the bytes written over its old copies are
    in the file, while it writes the next. A write that fails then (a full disk) rolls back: the stretches
    already dropped come back from the dump, the rest was never dropped, and the kept dump is deleted."""
    dumps, options, target, kept = _kept(spawn, tmp_path, 32, 6)
    _write(target, 10)
    counts = _re_park_failing_at(monkeypatch, target, options, kept, lambda n: 1 if failing == "first" else n)
    assert counts["batches"] > 2, "the target wrote too little to cut the writes over the dump into batches"
    if failing == "last":
        assert counts["drops"] > 0, "nothing was dropped before the failure: the test proves nothing"
    assert list(dumps.iterdir()) == []
    _quit(target)  # it checks every page
