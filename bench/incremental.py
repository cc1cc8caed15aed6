"""`make bench`, incremental re-park (issue #32): what a park costs when only 5 % of the app changed.

One `rewriter` target (tests/targets/rewriter.c) of --incremental-mib MiB
is parked and woken in rounds. Between a wake-up and the next park it
writes a new pattern over 5 % of its pages, chosen at random, and says how
long that took. Each round, in the same state of the machine:

* a full park (nothing kept), then an eager restore that keeps the dump;
* a re-park of what changed, an eager restore that keeps the dump again;
* a re-park, a lazy restore (which keeps nothing);
* a full park and a lazy restore; a full park and an eager restore that keeps
  nothing, after which the target's 5 % write runs without tracking.

Figures are medians over the rounds of each round's ratio: the re-park's
frozen time (setup and download, and the walk of its copy before them,
which holds the target too) and bytes written against the full
park's; the wake-up (restore until the target runs) after a re-park
against after a full one, eager and lazy; the target's write with tracking
against without. The target checks every page at the end.

Beside the frozen time, the copy of what changed that the re-park makes
while the target still runs, and that copy's floor on this machine
(bench/scatter.c): as many pages as the re-park wrote, written each at
its own place in a file of the target's size in the same folder, from a
process's memory with one pwrite each, the file's pages clean in the page
cache beforehand.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from memcr.dump.codec import Coding
from memcr.options import Cancel, Options
from memcr.park.checkpoint import checkpoint
from memcr.park.incremental import Kept
from memcr.park.parked import Parked
from memcr.report import Report

ROOT = Path(__file__).resolve().parent.parent
PERCENT = 5
FROZEN_AIM = 0.15  # re-park frozen time over a full park's
BYTES_AIM = 0.10  # re-park bytes written over a full park's
WAKE_AIM = 1.0  # wake-up after a re-park over after a full park
TRACKING_AIM = 1.05  # the target's write with tracking over without


class _Target:
    def __init__(self, binary: Path, size_mib: int, run: int) -> None:
        self.run = run
        self.proc = subprocess.Popen(
            [str(binary), str(size_mib), "7"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.pid = int(self.stdout.readline().split()[1])

    def write(self) -> float:
        """Microseconds the target took to write its 5 %."""
        self.stdin.write(f"write {PERCENT} {self.run}\n")
        self.stdin.flush()
        return float(self.stdout.readline().split()[1])

    def check(self) -> None:
        self.stdin.write("quit\n")
        self.stdin.flush()
        if self.proc.wait(300) != 0:
            raise RuntimeError("bench: the rewriter target found its memory changed by the round trips")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _frozen(report: Report) -> float:
    """The time the target was held: the park's, and a re-park's walk before it (its copy then runs)."""
    return report.precopy_held_ms + report.setup_ms + report.download_ms


def _floor_ms(scatter: Path, directory: Path, size_mib: int, count: int) -> float:
    """bench/scatter.c: milliseconds to write `count` pages in place, at random, into a clean file of the size
    (at most every page of it: a re-park written whole, as of a coded dump the target wrote all over)."""
    count = min(count, (size_mib << 20) // os.sysconf("SC_PAGE_SIZE"))
    path = directory / "bench-scatter.dat"
    try:
        done = subprocess.run([str(scatter), str(path), str(size_mib), str(count)], capture_output=True, text=True)
    finally:
        path.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench: the in-place write floor failed ({done.returncode}): {done.stderr}")
    return float(done.stdout) / 1000


def _round(target: _Target, options: Options, floor: Callable[[int], float]) -> dict[str, float]:
    log, cancel = (lambda _: None), Cancel()
    box: list[Kept] = []
    held: list[Parked] = []

    def park(kept: Kept | None = None) -> Report:
        held.append(checkpoint(target.pid, options, log, cancel, None, kept=kept))
        return held[-1].report

    def wake(lazy: bool = False, keep: bool = False) -> float:
        started = time.monotonic()
        phase = held.pop().restore(lazy=lazy, keep=box.append if keep else None)
        woke = (time.monotonic() - started) * 1000
        if phase is not None:
            phase.finish()
        return woke

    full = park()
    eager_full = wake(keep=True)
    tracked = target.write()
    again = park(box.pop())
    eager_again = wake(keep=True)
    target.write()
    park(box.pop())
    lazy_again = wake(lazy=True)
    target.write()
    park()
    lazy_full = wake(lazy=True)
    target.write()
    park()
    wake()
    untracked = target.write()
    floor_ms = floor(again.written_bytes // again.page_size)
    return {
        "floor_ratio": floor_ms / _frozen(full),
        "floor_ms": floor_ms,
        "frozen_ratio": _frozen(again) / _frozen(full),
        "bytes_ratio": again.written_bytes / full.written_bytes,
        "eager_wake_ratio": eager_again / eager_full,
        "lazy_wake_ratio": lazy_again / lazy_full,
        "tracking_ratio": tracked / untracked,
        "precopy_ms": again.precopy_ms,
        "precopy_held_ms": again.precopy_held_ms,
        "full_frozen_ms": _frozen(full),
        "repark_frozen_ms": _frozen(again),
        "full_mib": full.written_bytes / 2**20,
        "repark_mib": again.written_bytes / 2**20,
        "eager_full_ms": eager_full,
        "eager_repark_ms": eager_again,
        "lazy_full_ms": lazy_full,
        "lazy_repark_ms": lazy_again,
        "write_tracked_ms": tracked / 1000,
        "write_untracked_ms": untracked / 1000,
    }


def measure(
    directory: Path, size_mib: int = 1024, runs: int = 3, coding: Coding | None = None, run: int = 1
) -> dict[str, float]:
    """Medians over `runs` rounds, after a discarded warm-up round; dumps coded as `coding` (-z, -c, -e), the
    target writing its pages in runs of `run` (1: each page at random)."""
    binary, scatter = directory / "rewriter", directory / "scatter"
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(binary), str(ROOT / "tests" / "targets" / "rewriter.c")], check=True
    )
    subprocess.run(["gcc", "-O2", "-o", str(scatter), str(ROOT / "bench" / "scatter.c")], check=True)
    target = _Target(binary, size_mib, run)
    rounds = []
    try:
        options = Options(dump_dir=directory, coding=coding or Coding())
        for i in range(runs + 1):
            one = _round(target, options, lambda count: _floor_ms(scatter, directory, size_mib, count))
            if i:
                rounds.append(one)
        target.check()
    finally:
        target.kill()
    figures = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    figures["size_mib"] = size_mib
    figures["run"] = run
    return figures


def _flags(coding: Coding) -> str:
    """The memcr options that code dumps so."""
    return " ".join(
        f
        for f in (
            coding.compress and f"-z {coding.compress}",
            coding.checksum and "-c",
            coding.cipher and f"-e {coding.cipher}",
        )
        if f
    )


def print_table(r: dict[str, float], coding: Coding | None = None) -> None:
    def verdict(met: bool) -> str:
        return "met" if met else "below"

    in_runs = f" in runs of {r['run']:.0f}" if r.get("run", 1) > 1 else ""
    print(
        f"\nincremental re-park, {r['size_mib']:.0f} MiB target writing {PERCENT} % of its pages between parks"
        f"{in_runs}"
        f"{f', dumps coded ({_flags(coding)})' if coding and coding.framed else ''}:"
    )
    print(
        f"  frozen {r['repark_frozen_ms']:.0f} ms against {r['full_frozen_ms']:.0f} ms for a full park: "
        f"{r['frozen_ratio']:.2f} (aim <= {FROZEN_AIM}) {verdict(r['frozen_ratio'] <= FROZEN_AIM)}"
    )
    print(
        f"    before the freeze: what it wrote copied in {r['precopy_ms']:.0f} ms, {r['precopy_held_ms']:.0f} ms of it "
        f"held (counted above), the rest while it ran; as many "
        f"pages written in place at random from memory: {r['floor_ms']:.0f} ms, {r['floor_ratio']:.2f} of a full park"
    )
    print(
        f"  written {r['repark_mib']:.1f} MiB against {r['full_mib']:.0f} MiB: "
        f"{r['bytes_ratio']:.3f} (aim <= {BYTES_AIM}) {verdict(r['bytes_ratio'] <= BYTES_AIM)}"
    )
    for mode in ("eager", "lazy"):
        ratio = r[f"{mode}_wake_ratio"]
        print(
            f"  {mode} wake-up {r[f'{mode}_repark_ms']:.1f} ms after a re-park, {r[f'{mode}_full_ms']:.1f} ms after "
            f"a full park: {ratio:.2f} (aim <= {WAKE_AIM}) {verdict(ratio <= WAKE_AIM)}"
        )
    print(
        f"  the target's write: {r['write_tracked_ms']:.1f} ms tracked, {r['write_untracked_ms']:.1f} ms not: "
        f"{r['tracking_ratio']:.2f} (aim <= {TRACKING_AIM}) {verdict(r['tracking_ratio'] <= TRACKING_AIM)}"
    )


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.incremental", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compress", choices=["lz4", "zstd"], help="as memcr's -z")
    parser.add_argument("--checksum", action="store_true", help="as memcr's -c")
    parser.add_argument("--cipher", help="as memcr's -e")
    parser.add_argument("--run", type=int, default=1, help="pages the target writes in a row (1: each at random)")
    args = parser.parse_args()
    coding = Coding(args.compress, args.checksum, args.cipher)
    with tempfile.TemporaryDirectory(prefix="memcr-bench-", dir="/var/tmp") as work:
        print_table(measure(Path(work), args.size_mib, args.runs, coding, args.run), coding)
