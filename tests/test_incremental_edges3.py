"""Hostile review of the in-place re-park (b0d9f82): a re-park cancelled or its target stopped at a random moment,
a write over the dump failing at a random batch with more drops in flight than DROPS_AHEAD, and re-parks read
through /proc/PID/mem (-m) across every reshaping the rewriter does. All held up: kept as regression tests."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from memcr.errors import Aborted
from memcr.options import Cancel
from memcr.park.checkpoint import checkpoint
from tests.test_incremental import _quit
from tests.test_incremental_edges2 import _kept, _re_park_failing_at, _write


@pytest.mark.parametrize("run", range(12))
def test_a_re_park_cancelled_at_a_random_moment_leaves_the_target_whole(spawn, tmp_path, run: int) -> None:
    rng = random.Random(run * 7919 + int(time.time()))
    _dumps, options, target, kept = _kept(spawn, tmp_path, 128, run + 1)
    _write(target, 30)
    cancel = Cancel()
    delay = rng.uniform(0.0, 0.06)
    timer = threading.Timer(delay, cancel.cancel)
    timer.start()
    try:
        parked = checkpoint(target.pid, options, print, cancel=cancel, kept=kept)
    except Aborted as e:
        print("outcome: rolled back:", e)
        parked = None
    timer.cancel()
    if parked is not None:
        parked.restore()
    _quit(target)


@pytest.mark.parametrize("run", range(10))
def test_a_re_park_of_a_target_stopped_at_a_random_moment(spawn, tmp_path, run: int) -> None:
    rng = random.Random(run * 31 + int(time.time()))
    _dumps, options, target, kept = _kept(spawn, tmp_path, 128, run + 3)
    _write(target, 30)
    delay = rng.uniform(0.0, 0.25)
    # os.kill, not Popen.send_signal: its poll() waits for the target, and this process traces it too, so that
    # wait may take the ptrace stop memcr waits for (memcr then waits for good)
    timer = threading.Timer(delay, os.kill, (target.pid, signal.SIGSTOP))
    timer.start()
    try:
        parked = checkpoint(target.pid, options, print, kept=kept)
        parked.restore()
    finally:
        timer.join()
        os.kill(target.pid, signal.SIGCONT)
    _quit(target)


def _repark(target, options, kept):
    held: list = []
    checkpoint(target.pid, options, print, kept=kept).restore(keep=held.append)
    return held.pop()


def _say_cycle(target, n: int, percent: int, op: str) -> None:
    target.proc.stdin.write(f"cycle {n} {percent} {op}\n")
    target.proc.stdin.flush()
    said = target.out.wait_for(f" {n}")
    assert said == f"done {n}", said


@pytest.mark.parametrize("run", range(10))
def test_a_re_park_failing_at_a_random_batch_with_many_spans(spawn, tmp_path, monkeypatch, run: int) -> None:
    rng = random.Random(run * 13 + int(time.time()))
    dumps, options, target, kept = _kept(spawn, tmp_path, 64, run + 20)
    _say_cycle(target, 0, 1, "dontneed")
    kept = _repark(target, options, kept)
    _say_cycle(target, 1, 1, "dontneed")
    kept = _repark(target, options, kept)
    _say_cycle(target, 2, rng.randint(5, 40), "none")
    counts = _re_park_failing_at(monkeypatch, target, options, kept, lambda n: rng.randint(1, n))
    print("counts", counts)
    assert list(dumps.iterdir()) == []
    _say_cycle(target, 3, 1, "none")
    _quit(target)


@pytest.mark.parametrize("op", ["none", "swap", "mapover", "reuse", "dontneed", "fork", "grow", "mprotect"])
def test_re_parks_read_through_proc_mem(spawn, tmp_path, op: str) -> None:
    import dataclasses

    _dumps, options, target, kept = _kept(spawn, tmp_path, 32, 40)
    options = dataclasses.replace(options, proc_mem=True)
    for n in range(4):
        _say_cycle(target, n, 10, op)
        kept = _repark(target, options, kept)
    _say_cycle(target, 9, 1, "none")
    kept.close()
    _quit(target)


@pytest.mark.parametrize("incremental", [False, True])
def test_a_drop_whose_answer_is_lost_kills_the_target(spawn, tmp_path, monkeypatch, incremental: bool) -> None:
    """Drops go to the parasite ahead of their answers. Once an answer is lost, the drops asked for after it may
    still run, after a rollback put the pages back: the target is killed rather than let run on with pages
    the parasite may yet take away."""
    from memcr.engine.parasite import Parasite
    from memcr.errors import ParasiteError, TargetKilled
    from memcr.options import Options

    dumps, options, target, kept = _kept(spawn, tmp_path, 32, 3)
    _write(target, 10)
    real_result, real_send = Parasite._result, Parasite.send_drop
    sent = [0]

    def send_drop(self, addr, length):
        sent[0] += 1
        real_send(self, addr, length)

    def result(self):
        if sent[0]:
            raise ParasiteError("injected: lost the answer to a drop")
        return real_result(self)

    monkeypatch.setattr(Parasite, "send_drop", send_drop)
    monkeypatch.setattr(Parasite, "_result", result)
    with pytest.raises(TargetKilled, match="drops were lost, and the parasite may still drop pages"):
        if incremental:
            checkpoint(target.pid, options, print, kept=kept)
        else:
            kept.close()
            checkpoint(target.pid, Options(dump_dir=dumps), print)
    monkeypatch.undo()
    target.proc.wait(10)  # memcr, its tracer in this process, collected its exit already
    assert not Path(f"/proc/{target.pid}").exists()
    assert sent[0] >= 1
    assert list(dumps.iterdir()) == []
