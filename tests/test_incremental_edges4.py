"""Edges from a fourth hostile review: a refused group park leaves its members' kept dumps, and no run of a re-park
is dropped before every write over it is in the file (randomized, with reshapes and runs cut into batches)."""

from __future__ import annotations

import random
import time

import pytest

from tests.conftest import CHECKPOINT, RESTORE
from tests.test_groups import members_of
from tests.test_groups_service import park


def test_a_refused_group_park_leaves_the_kept_dumps_of_its_members(spawn, daemon) -> None:
    """A tree whose child is parked on its own is refused (-2), as before: nothing of the tree is touched, the
    kept dump of its root included, whose next park stays incremental."""
    d = daemon("--incremental")
    tree = spawn("forked", 2)
    child = max(members_of(tree) - {tree.pid})
    assert d.code(CHECKPOINT, tree.pid) == 0
    assert d.code(RESTORE, tree.pid) == 0
    d.out.wait_for(f"pid {tree.pid}: its dump")
    assert d.code(CHECKPOINT, child) == 0  # parked on its own
    refused = park(d, tree.pid, tree=True)
    assert d.code(RESTORE, child) == 0
    assert d.code(CHECKPOINT, tree.pid) == 0
    assert d.code(RESTORE, tree.pid) == 0
    assert d.terminate() == 0
    log = "\n".join(d.out.rest())
    assert refused == -2, log[-3000:]
    assert tree.verify() == 0
    assert "it is parked in a group now" not in log, log[-3000:]
    assert log.count("unchanged since the last restore") == 1, log[-3000:]  # the root's second park


@pytest.mark.parametrize("run", range(10))
def test_no_span_of_a_re_park_is_dropped_before_each_write_over_it_is_in_the_file(spawn, tmp_path, monkeypatch,
                                                                                  run: int) -> None:  # fmt: skip
    """56a9568 drops runs as the batches written over the kept dump pass them: at each drop sent, every page the
    re-park writes over inside the span is in the file already. Reshapes between re-parks append fresh runs
    among the reused ones; large writes make runs that batches cut at 1 MiB."""
    from memcr.dump.writer import PlainWriter
    from memcr.engine.parasite import Parasite
    from memcr.park import incremental
    from tests.test_incremental import _quit
    from tests.test_incremental_edges2 import _kept, _written_after_the_copy
    from tests.test_incremental_edges3 import _repark, _say_cycle

    rng = random.Random(run * 977 + int(time.time()))
    _dumps, options, target, kept = _kept(spawn, tmp_path, 48, run + 60)
    pending: list[tuple[int, int]] = []  # rewrites of the park under way not yet in the file
    drops = [0]
    real_split, real_write, real_send = incremental.split, PlainWriter.write_over, Parasite.send_drop

    def split(*args):
        out = real_split(*args)
        pending[:] = [(r.addr, r.addr + r.length) for r in out.rewrite]
        return out

    batches_seen: list[list[tuple[int, int]]] = []
    real_batches = incremental.batches

    def batches(*args):
        out = real_batches(*args)
        batches_seen[:] = [[(r.addr, r.addr + r.length) for r in b] for b in out]
        return out

    def write_over_in_order(self, data, pieces):
        real_write(self, data, pieces)
        done = batches_seen.pop(0)
        for lo, hi in done:
            for i, (a, b) in enumerate(pending):
                if a < hi and lo < b:  # the part written is done: keep what is left of the run
                    rest = [(x, y) for x, y in ((a, lo), (hi, b)) if x < y]
                    pending[i : i + 1] = rest
                    break

    def send_drop(self, addr, length):
        drops[0] += 1
        late = [(a, b) for a, b in pending if a < addr + length and addr < b]
        assert not late, f"drop {addr:#x}+{length:#x} before the writes over {late[:3]} were in the file"
        real_send(self, addr, length)

    _written_after_the_copy(monkeypatch)
    monkeypatch.setattr(incremental, "split", split)
    monkeypatch.setattr(incremental, "batches", batches)
    monkeypatch.setattr(PlainWriter, "write_over", write_over_in_order)
    monkeypatch.setattr(Parasite, "send_drop", send_drop)
    ops = ["none", "grow", "mapover", "dontneed", "reuse", "swap"]
    for n in range(3):
        _say_cycle(target, n, rng.choice([2, 10, 40, 90]), rng.choice(ops))
        kept = _repark(target, options, kept)
    monkeypatch.undo()
    _say_cycle(target, 9, 1, "none")
    kept.close()
    _quit(target)
    assert drops[0] > 0
