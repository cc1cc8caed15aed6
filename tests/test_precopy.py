"""An incremental re-park copies what the target changed while it still runs (docs/incremental.md): a target that
writes all through its parks loses no write, whenever the park comes; a copy that fails or is aborted leaves the
target as it was and the park whole."""

from __future__ import annotations

import random
import time

import pytest

from memcr.dump.format import HEADER
from memcr.errors import Aborted, StorageError
from memcr.options import Cancel
from memcr.park import incremental
from memcr.park.checkpoint import checkpoint
from tests.conftest import CHECKPOINT, RESTORE, reports
from tests.test_incremental import _quit
from tests.test_incremental_edges2 import _kept, _write

CYCLES = 12
PACES_US = [0, 0, 1, 20, 200]  # between the churning target's writes: as fast as it can, to now and then


def _say(target, line: str, answer: str) -> str:
    target.proc.stdin.write(line + "\n")
    target.proc.stdin.flush()
    said = target.out.wait_for(answer)
    assert said.startswith(answer), f"{line}: {said}; {target.proc.stderr.read()}"
    return said


def test_a_target_writing_through_its_parks_loses_no_write(spawn, daemon) -> None:
    """Each park comes at a random moment of a writer thread's work, its pace random too: the copy made while the
    target runs races its writes, page by page. After each wake-up the target replays every write it made and
    finds each page as the last one left it, its count no lower than it said before the park, and its state as
    it was."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = daemon("--incremental", "--json")
    target = spawn("churn", 32, seed, stdin=True)
    counted = 0
    for cycle in range(CYCLES):
        _say(target, f"go {rng.choice(PACES_US)}", "going")
        time.sleep(rng.uniform(0, 0.05))
        before = int(_say(target, "count", "count").split()[1])
        assert d.code(CHECKPOINT, target.pid) == 0, f"seed {seed}, cycle {cycle}"
        assert d.code(RESTORE, target.pid) == 0, f"seed {seed}, cycle {cycle}"
        done = _say(target, f"check {cycle}", f"done {cycle}").split()
        counted = int(done[2])
        assert counted >= before, f"seed {seed}, cycle {cycle}: {counted} writes after the park, {before} before"
        d.out.wait_for("is kept for its next park")
    target.proc.stdin.write("quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(10) == 0
    assert d.terminate() == 0
    parks = [r for r in reports("\n".join(d.out.rest())) if r["event"] == "checkpoint"]
    copied = [p for p in parks[1:] if p["precopy_ms"] > 0]
    # every re-park copied while the target ran, and wrote less than the whole dump
    assert len(copied) == CYCLES - 1, f"seed {seed}: {len(copied)} of {CYCLES - 1} re-parks copied first"
    assert counted > 0


@pytest.mark.parametrize("where", ["reading", "writing"])
def test_a_copy_that_fails_while_the_target_runs_parks_it_whole(spawn, tmp_path, monkeypatch, where: str) -> None:
    """The copy protects each written page again before it reads it: once it fails, pages may be protected whose
    bytes never reached the dump, which then serves no more. The park writes the dump anew, whole, says why, and
    the target comes back byte-exact."""
    from memcr.dump.format import DumpFile
    from memcr.system import process_vm

    dumps, options, target, kept = _kept(spawn, tmp_path, 16, 21)
    _write(target, 10)
    real_precopy = incremental.precopy

    def failing_read(pid, pieces):
        raise OSError(14, "injected: process_vm_readv failed")

    def failing_write(self, data, pieces):
        raise StorageError("injected: no space left for the dump", what="dump")

    def precopy_failing(*args):  # only the copy fails: the whole park after it writes the same file's headers
        with monkeypatch.context() as m:
            if where == "reading":
                m.setattr(process_vm, "read_many", failing_read)
            else:
                m.setattr(DumpFile, "rewrite_many", failing_write)
            return real_precopy(*args)

    monkeypatch.setattr(incremental, "precopy", precopy_failing)
    said: list[str] = []
    parked = checkpoint(target.pid, options, said.append, kept=kept)
    monkeypatch.undo()
    assert any("whole: copying what it changed while it ran failed" in line for line in said), said
    assert parked.report.written_bytes == parked.report.dump_bytes - HEADER.size, "a whole park writes all of it"
    parked.restore()
    _quit(target)  # it checks every page
    assert list(dumps.iterdir()) == []


def test_a_copy_aborted_while_the_target_runs_leaves_it_as_it_was(spawn, tmp_path) -> None:
    """A RESTORE of a pid whose park is still copying aborts it (Cancel): the target was never frozen, nothing of
    it was dropped, and the kept dump, which may now lack pages the copy protected, is deleted."""
    dumps, options, target, kept = _kept(spawn, tmp_path, 16, 22)
    _write(target, 10)
    cancel = Cancel()
    cancel.cancel()
    with pytest.raises(Aborted):
        checkpoint(target.pid, options, print, cancel=cancel, kept=kept)
    assert list(dumps.iterdir()) == []
    _quit(target)
