"""`make bench`, groups: a 4-process 1 GiB app parked as one tree against its members parked one by one.

The app is tests/targets/forkserver.c: a parent and 3 forked workers, 2
threads each, 256 MiB private per process and 16 MiB shared since the
fork. "group" is `memcr -p PARENT --tree` (members streamed in parallel,
as many as there are cores); "one by one" is what drivers do today: one
`memcr -p PID` per member, each started once the one before has parked,
and woken in the same order. Times are wall clock as the driver sees them:
from the first memcr's start to the last prompt, and from the first Enter
to the last exit. The app checks every byte and its state after each run.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Lines, reap, reports

ROOT = Path(__file__).resolve().parent.parent
APP = ("3", "2", "16", "256")  # workers, threads each, shared MiB, private MiB each: 4 x 256 MiB


class App:
    """The forking server, until verify()."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([binary, *APP], stdout=subprocess.PIPE, text=True)
        self.out = Lines(self.proc.stdout)
        self.out.wait_for(f"ready {self.proc.pid}", 300)
        self.pids = [self.proc.pid] + [int(line.split()[1]) for line in self.out.seen if line.startswith("child ")]

    def verify(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)  # every process checks itself
        if self.proc.wait(300) != 0:
            raise RuntimeError("bench app: memory or state changed by the round trip")

    def stop(self) -> None:
        reap(self.proc)


def _memcr(args: list[str], dump_dir: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "memcr", *args, "--json", "-d", str(dump_dir)]
    return subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _enter(session: subprocess.Popen[str]) -> None:
    assert session.stdin is not None
    session.stdin.write("\n")
    session.stdin.flush()


def _park_and_wake(commands: list[list[str]], dump_dir: Path) -> tuple[float, float, int]:
    """(park ms, wake ms, bytes dumped) for memcr sessions run one after the other."""
    sessions: list[subprocess.Popen[str]] = []
    outputs: list[Lines] = []
    try:
        started = time.monotonic()
        for args in commands:
            sessions.append(_memcr(args, dump_dir))
            outputs.append(Lines(sessions[-1].stdout))
            # parked: its last report, on stdout, which holds the reports alone with --json
            outputs[-1].wait_for('{"event":"group-checkpoint"' if "--tree" in args else '{"event":"checkpoint"', 300)
        park_ms = (time.monotonic() - started) * 1000
        started = time.monotonic()
        for session in sessions:
            _enter(session)
            if session.wait(300) != 0:
                raise RuntimeError(f"memcr failed: {session.stderr.read() if session.stderr else ''}")
        wake_ms = (time.monotonic() - started) * 1000
    finally:
        for session in sessions:
            reap(session)
    parked = [r for out in outputs for r in reports("\n".join(out.rest())) if r["event"] == "checkpoint"]
    return park_ms, wake_ms, sum(r["pages"] * r["page_size"] for r in parked)


def measure(work: Path, runs: int = 3) -> dict[str, dict[str, float]]:
    binary = work / "forkserver"
    source = ROOT / "tests" / "targets" / "forkserver.c"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    figures: dict[str, list[tuple[float, float, int]]] = {"group": [], "one by one": []}
    for _ in range(runs):
        for how in figures:
            app = App(binary)
            try:
                tree = [["-p", str(app.pids[0]), "--tree"]]
                one_by_one = [["-p", str(pid)] for pid in app.pids]
                figures[how].append(_park_and_wake(tree if how == "group" else one_by_one, work))
                app.verify()
            finally:
                app.stop()
    return {
        how: {
            "park_ms": statistics.median(r[0] for r in results),
            "wake_ms": statistics.median(r[1] for r in results),
            "mib": results[0][2] / 2**20,
        }
        for how, results in figures.items()
    }


def print_table(results: dict[str, dict[str, float]]) -> None:
    print(f"\n4-process app, {results['group']['mib']:.0f} MiB dumped{'':4}{'park ms':>9}{'wake ms':>9}")
    for how, r in results.items():
        print(f"{how:34}{r['park_ms']:9.0f}{r['wake_ms']:9.0f}")
    print("park: first memcr started -> last member parked; wake: first Enter -> last member running (medians)")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memcr-bench-groups-", dir="/var/tmp") as work:
        print_table(measure(Path(work)))
