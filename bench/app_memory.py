"""`make bench`, real apps: memory before and while parked, what stayed resident and why, wake-up time.

Each app of the app suite (tests/apps) is started with its dataset; every
member is parked at once with `memcr -p PID` (interactive), its status read
while parked, then all are woken together: the wake-up time is from Enter to
the last memcr's exit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

from tests.apps.launch import RunningApp, compile_java, start_jvm, start_nginx, start_node, start_redis
from tests.conftest import Lines, reap, reports

ROOT = Path(__file__).resolve().parent.parent

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


class AppFigures(TypedDict):
    """One app's figures; before_kb and parked_kb hold FIELDS summed over its members."""

    members: int
    before_kb: dict[str, int]
    parked_kb: dict[str, int]
    kept_shared_with_others_kb: int
    wake_ms: float
    restore_ms: list[float]  # each member's memcr, from its restore report


def status_kb(pids: list[int]) -> dict[str, int]:
    total = dict.fromkeys(FIELDS, 0)
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in total:
                total[key] += int(value.split()[0])
    return total


def park_and_wake(app: RunningApp, dump_dir: Path) -> AppFigures:
    pids = app.members()
    before = status_kb(pids)
    sessions = [
        subprocess.Popen([sys.executable, "-m", "memcr", "-p", str(pid), "--json", "-d", str(dump_dir)], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in pids
    ]  # fmt: skip
    try:
        outputs = [Lines(s.stdout) for s in sessions]
        for out in outputs:
            out.wait_for('{"event":"checkpoint"', 300)  # parked; with --json stdout holds the reports alone
        parked = status_kb(pids)
        started = time.monotonic()
        for s in sessions:
            assert s.stdin is not None
            s.stdin.write("\n")
            s.stdin.flush()
        codes = [s.wait(300) for s in sessions]
        wake_ms = (time.monotonic() - started) * 1000
        if any(codes):
            raise RuntimeError(f"{app.name}: memcr failed: {[s.stderr.read() for s in sessions if s.stderr]}")
        log = "\n".join("\n".join(out.rest()) for out in outputs)
    finally:
        for s in sessions:
            reap(s)
    restored = [r for r in reports(log) if r["event"] == "restore"]
    app.ping()
    return {
        "members": len(pids),
        "before_kb": before,
        "parked_kb": parked,
        "kept_shared_with_others_kb": sum(r["shared_pages"] * r["page_size"] // 1024 for r in restored),
        "wake_ms": wake_ms,
        "restore_ms": [r["upload_ms"] for r in restored],
    }


def measure() -> dict[str, AppFigures]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="memcr-bench-apps-") as work:
        root = Path(work)
        classes = compile_java(root)
        for name, start in (("jvm", lambda w: start_jvm(w, classes)), ("node", start_node),
                            ("redis", start_redis), ("nginx", start_nginx)):  # fmt: skip
            app_dir = root / name
            app_dir.mkdir()
            app = start(app_dir)
            try:
                results[name] = park_and_wake(app, root)
            finally:
                app.stop()
    return results


def print_table(results: dict[str, AppFigures]) -> None:
    print(f"\n{'app':8}{'members':>8}{'RSS MiB':>9}{'parked':>8}{'file':>7}{'shmem':>7}{'shared':>8}{'wake ms':>9}"
          "   (parked: RSS while parked; file, shmem, shared: what of it stayed and why)")  # fmt: skip
    for name, r in results.items():
        p = r["parked_kb"]
        print(f"{name:8}{r['members']:8}{r['before_kb']['VmRSS'] / 1024:9.1f}{p['VmRSS'] / 1024:8.1f}"
              f"{p['RssFile'] / 1024:7.1f}{p['RssShmem'] / 1024:7.1f}{r['kept_shared_with_others_kb'] / 1024:8.1f}"
              f"{r['wake_ms']:9.0f}")  # fmt: skip
    print("file: clean file pages (code, mapped files), dropped only with -f; shmem: shared memory, left in place;")
    print("shared: private pages other processes map too (fork, KSM), which dropping would not free")


if __name__ == "__main__":
    results = measure()
    print_table(results)
