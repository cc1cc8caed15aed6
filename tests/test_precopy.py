"""An incremental re-park copies what the target changed while it still runs (docs/incremental.md): a target that
writes all through its parks loses no write, whenever the park comes; a copy that fails or is aborted leaves the
target as it was and the park whole."""

from __future__ import annotations

import os
import random
import time

import pytest

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


@pytest.mark.parametrize("how", ["toggle", "remap"])
def test_a_target_reshaping_what_it_writes_through_its_parks_keeps_its_kept_dump(spawn, daemon, how: str) -> None:
    """The writer makes the MiB around each page PROT_NONE for a moment before it writes the page (toggle), or
    maps a new page over it first (remap). A copy that meets such a page cannot read it and stops short; a walk
    that meets a mapping replaced since the maps were read fails (the kernel protected what it had passed by
    then). Either way the pages the copy protected and did not copy, the whole mapping for a failed walk, are
    the frozen park's: every park succeeds, the kept dump still serves (no park is whole but where the remapped
    pages wore it out), and every write is there after each wake-up, at random moments."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = daemon("--incremental")
    target = spawn("churn", 16, seed, stdin=True)
    for cycle in range(CYCLES):
        _say(target, f"go {rng.choice([20, 100, 500])} {how}", "going")
        time.sleep(rng.uniform(0.01, 0.05))
        assert d.code(CHECKPOINT, target.pid) == 0, f"seed {seed}, cycle {cycle}"
        assert d.code(RESTORE, target.pid) == 0, f"seed {seed}, cycle {cycle}"
        _say(target, f"check {cycle}", f"done {cycle}")
        d.out.wait_for("is kept for its next park")
    target.proc.stdin.write("quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(10) == 0
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    if how == "toggle":
        assert "stopped short" in log, f"seed {seed}: no copy met a page the target had protected"
    # a park is whole only where the target's remapping wore the kept dump out (its pages in many pieces)
    whole = [line for line in log.splitlines() if "whole" in line and "pieces" not in line]
    assert not whole, f"seed {seed}: {whole}"


DIO_CYCLES = 400


def test_a_direct_read_under_way_as_the_copy_begins_is_not_lost(spawn, daemon, tmp_path) -> None:
    """A thread of the target reads a file with O_DIRECT all through its parks: the kernel pins the buffer's
    pages for each read and the device writes into them later, past any page table, so a page can read as
    written long before its bytes land. The copy's walk holds every thread, and a thread stops only once its
    read is done: no such write is under way when the walk protects a page again, and one that starts after
    marks the page written anew. Each park comes at a random moment; after each wake-up the buffer must hold
    what the last read put there (without the hold, one wake-up in 40 to 110 lost it here)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as e:
        pytest.skip(f"{tmp_path} takes no O_DIRECT reads: {e.strerror}")
    d = daemon("--incremental")
    target = spawn("dio", tmp_path / "dio.dat", 16, stdin=True)
    for cycle in range(DIO_CYCLES):
        _say(target, "go", "going")
        time.sleep(rng.uniform(0, 0.02))
        assert d.code(CHECKPOINT, target.pid) == 0, f"seed {seed}, cycle {cycle}"
        assert d.code(RESTORE, target.pid) == 0, f"seed {seed}, cycle {cycle}"
        _say(target, f"check {cycle}", f"done {cycle}")
    target.proc.stdin.write("quit\n")
    target.proc.stdin.flush()
    assert target.proc.wait(10) == 0
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert log.count("written while it ran") >= DIO_CYCLES - 1, "the re-parks did not copy while the target ran"


def _mib(said: list[str], phrase: str) -> float:
    """The MiB figure that starts the line of `said` holding `phrase`, or that follows "; " before it."""
    line = next(line for line in said if phrase in line)
    return float(line.split(phrase)[0].split("; ")[-1].split()[0])


def test_what_a_waiting_target_changed_is_written_before_its_freeze(spawn, tmp_path) -> None:
    """The copy takes every page the target wrote since its restore and protects each again: frozen, the park
    finds them unchanged since and writes next to nothing over the dump (the mappings memcr does not watch, a
    private file mapping's pages, are written over each time)."""
    _dumps, options, target, kept = _kept(spawn, tmp_path, 32, 24)
    _write(target, 10)
    said: list[str] = []
    parked = checkpoint(target.pid, options, said.append, kept=kept)
    parked.restore()
    _quit(target)
    copied, frozen = _mib(said, "MiB it changed since its restore"), _mib(said, "MiB written over in place")
    assert copied >= 3.0, said
    assert frozen < 0.5, said


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("where", ["reading", "writing"])
def test_a_copy_that_stops_short_leaves_the_rest_to_the_frozen_park(
    spawn, tmp_path, monkeypatch, where: str, batch: int
) -> None:
    """The copy protects each written page again before it reads it: where a read or a write then fails (the
    target protected or unmapped a page meanwhile, the disk refused), pages are protected whose bytes are not
    in the dump. memcr no longer vouches for them: frozen, the park writes them over the dump as if the target
    had written them, the kept dump still serves, and the target comes back byte-exact."""
    from memcr.dump.format import DumpFile
    from memcr.system import process_vm

    dumps, options, target, kept = _kept(spawn, tmp_path, 32, 21)
    _write(target, 10)
    real_precopy, real_read, real_write = incremental.precopy, process_vm.read_many, DumpFile.rewrite_many
    calls = [0]

    def failing_read(pid, pieces):
        calls[0] += 1
        if calls[0] == batch:
            raise OSError(14, "injected: process_vm_readv failed")
        real_read(pid, pieces)

    def failing_write(self, data, pieces):
        calls[0] += 1
        if calls[0] == batch:
            raise StorageError("injected: no space left for the dump", what="dump")
        real_write(self, data, pieces)

    def precopy_failing(*args):  # only the copy fails: the frozen park writes into the same file
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
    assert any("stopped short (" in line and "injected" in line for line in said), said
    copied, frozen = _mib(said, "MiB it changed since its restore"), _mib(said, "MiB written over in place")
    assert copied == (batch - 1), said  # the batches before the failing one, a MiB each
    assert frozen >= 3.0 - copied, said  # the rest, written frozen
    assert parked.report.written_bytes < parked.report.dump_bytes // 4, "the park used the kept dump"
    parked.restore()
    _quit(target)  # it checks every page
    assert list(dumps.iterdir()) == []


def test_a_copy_aborted_while_the_target_runs_leaves_it_as_it_was(spawn, tmp_path) -> None:
    """A RESTORE of a pid whose park is still copying aborts it (Cancel): the target was never held, nothing of
    it was dropped, and the kept dump, which may lack pages the copy protected, is deleted."""
    dumps, options, target, kept = _kept(spawn, tmp_path, 16, 22)
    _write(target, 10)
    cancel = Cancel()
    cancel.cancel()
    said: list[str] = []
    with pytest.raises(Aborted):
        checkpoint(target.pid, options, said.append, cancel=cancel, kept=kept)
    assert not [line for line in said if line.startswith("seized")], said
    assert list(dumps.iterdir()) == []
    _quit(target)
