"""The lazy phase's zdtm module: a target reshapes its memory while its pages are still coming back.

Each run wakes a `reshape` target lazily; a worker of the target waits for
a random part of its region to be back (0-90 %: on 64 MiB that is 0-30 ms
after the wake-up, on a 1 GiB app 0-400 ms) and then protects, locks,
advises, moves, grows, shrinks, unmaps, maps over, forks, execs, starts
threads or registers its own userfaultfd on a range that is still missing.
Then it checks every page of the region as that operation leaves it, its
signal state, dispositions, threads and (where the operation undoes its
change) its memory map, and that memcr let go of it.

The moment is random and the races are real: every operation runs
MEMCR_LAZY_REPEATS times (12 unless told) through memcr, its runs plain,
with -z -c and with -e in turn, and as many times through a daemon, each
run with its own seed (in the failure message, to run it again:
`reshape 64 OP SEED`).
"""

from __future__ import annotations

import os
import random
import re

import pytest

from tests.conftest import CHECKPOINT, RESTORE, Memcr, Target

REPEATS = int(os.environ.get("MEMCR_LAZY_REPEATS", "12"))
MIB = 64
OPS = [
    "mprotect",
    "mprotect-none",
    "split-many",
    "mlock",
    "dontdump",
    "nohugepage",
    "populate",
    "dontneed",
    "free",
    "munmap",
    "mapover",
    "mremap-move",
    "mremap-whole",
    "mremap-grow",
    "mremap-shrink",
    "mremap-dontunmap",
    "fork",
    "fork-exec",
    "vfork-exec",
    "fork-idle",
    "exec",
    "threads",
    "uffd",
    "guard",
]
CODINGS = {"plain": [], "z-c": ["-z", "-c"], "e": ["-e"]}
ACTED = re.compile(r"^op \S+ (?:present \d+/\d+ missing (\d+)/\d+|late)$")


def _missing(target: Target) -> int:
    """How many pages of the range were still missing when the target acted on it (0: it came too late)."""
    return next(int(m.group(1) or 0) for line in target.out.rest() if (m := ACTED.match(line)))


def _checked(target: Target, op: str, seed: int, how: str) -> int:
    code = target.verify()
    assert code == 0, f"{op} ({how}, seed {seed}): the target found itself wrong: {target.out.rest()}"
    return _missing(target)


def _enough(hits: int, op: str, how: str) -> None:
    """Most runs must have acted on missing pages, else the test proved nothing about the lazy phase."""
    assert hits >= REPEATS // 2, f"{op} ({how}): only {hits} of {REPEATS} runs acted on pages still missing"


@pytest.mark.parametrize("op", OPS)
def test_reshape_during_the_lazy_phase(spawn, memcr: Memcr, op: str) -> None:
    hits = 0
    for run in range(REPEATS):
        coding = list(CODINGS)[run % len(CODINGS)]
        seed = random.randrange(1 << 31)
        target = spawn("reshape", MIB, op, seed)
        result = memcr.run("-p", target.pid, "-n", "--lazy", *CODINGS[coding])
        assert result.returncode == 0, f"{op} ({coding}, seed {seed}): {result.stderr}"
        assert "come back lazily" in result.stdout
        assert memcr.dumps() == []
        hits += _checked(target, op, seed, coding) > 0
    _enough(hits, op, "memcr")


@pytest.mark.parametrize("op", OPS)
def test_reshape_during_the_lazy_phase_through_the_daemon(spawn, daemon, op: str) -> None:
    served = daemon("--lazy", "-z", "-c")
    hits = 0
    for _ in range(REPEATS):
        seed = random.randrange(1 << 31)
        target = spawn("reshape", MIB, op, seed)
        assert served.code(CHECKPOINT, target.pid) == 0
        assert served.code(RESTORE, target.pid) == 0
        line = served.out.wait_for(f"pid {target.pid}")
        while "lazy restore complete" not in line and "ended during" not in line:
            line = served.out.wait_for(f"pid {target.pid}")
        hits += _checked(target, op, seed, f"daemon: {line}") > 0
    _enough(hits, op, "daemon")
