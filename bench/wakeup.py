"""`make bench`, wake-up: how soon a parked target answers again, eager against lazy (--lazy).

One bench target per size (bench/target.c in ping mode) is parked and woken
again and again, eager and lazy in turns. The wake-up runs from the call to
restore until the target answers a ping written to it while it was parked:
the first instant it runs its own code. "complete" runs until memcr has
every page back and has let go. The target checks every page at the end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

from memcr.options import Cancel, Options
from memcr.park.checkpoint import checkpoint

SIZES = (64, 256, 1024, 2048)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _one(pid: int, ping: int, pong: int, lazy: bool, directory: Path) -> tuple[float, float]:
    parked = checkpoint(pid, Options(dump_dir=directory), lambda _: None, Cancel(), None)
    os.write(ping, b"p")  # waits in the pipe: the target is frozen
    started = time.monotonic()
    phase = parked.restore(lazy=lazy)
    returned = time.monotonic()
    answer = os.read(pong, 1)
    if answer != b"p":
        raise RuntimeError(f"bench target: {answer!r}, not the answer to its ping")
    woke = time.monotonic()
    if phase is not None:
        phase.finish()
        returned = time.monotonic()
    return (woke - started) * 1000, (returned - started) * 1000


def measure(
    target_bin: Path, directory: Path, runs: int = 10, sizes: tuple[int, ...] = SIZES
) -> dict[int, dict[str, dict[str, float]]]:
    """size MiB -> {eager, lazy} -> wake_p50, wake_p99, complete_p50 in ms."""
    results: dict[int, dict[str, dict[str, float]]] = {}
    for size in sizes:
        target = subprocess.Popen(
            [str(target_bin), str(size), "ping"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        try:
            assert target.stdin is not None and target.stdout is not None
            target.stdout.readline()  # ready <pid>
            ping, pong = target.stdin.fileno(), target.stdout.fileno()
            times: dict[str, list[tuple[float, float]]] = {"eager": [], "lazy": []}
            for _ in range(runs):
                for mode in times:
                    times[mode].append(_one(target.pid, ping, pong, mode == "lazy", directory))
            os.write(ping, b"v")
            if target.wait(300) != 0:
                raise RuntimeError(f"bench target of {size} MiB: memory changed by the round trips")
        finally:
            if target.poll() is None:
                target.kill()
                target.wait()
        results[size] = {
            mode: {
                "wake_p50": statistics.median(w for w, _ in pairs),
                "wake_p99": _percentile([w for w, _ in pairs], 0.99),
                "complete_p50": statistics.median(c for _, c in pairs),
            }
            for mode, pairs in times.items()
        }
    return results


def print_table(results: dict[int, dict[str, dict[str, float]]]) -> None:
    print("\nwake-up, ms (p50 / p99 over the runs; complete: every page back, memcr gone)")
    print(f"{'size':>8} {'eager wake':>16} {'lazy wake':>16} {'eager complete':>15} {'lazy complete':>14}")
    for size, r in sorted(results.items()):
        e, z = r["eager"], r["lazy"]
        print(
            f"{size:>5} MiB {e['wake_p50']:>8.1f}/{e['wake_p99']:<7.1f} {z['wake_p50']:>8.1f}/{z['wake_p99']:<7.1f}"
            f" {e['complete_p50']:>15.0f} {z['complete_p50']:>14.0f}"
        )
