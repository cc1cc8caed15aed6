"""Service-mode figures for `make bench`: the daemon's footprint and its parallelism.

* idle RSS/USS/PSS of `memcr -l`;
* its USS and PSS with 1, 16 and 64 processes checkpointed: what the first
  checkpoint costs once (code and libraries loaded on first use), and what
  each further checkpointed process costs;
* wall time to checkpoint 16 processes of 64 MiB in parallel against one
  after another.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from memcr_client import Client

MIB = 2**20


def _memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mib": info.rss / MIB, "uss_mib": info.uss / MIB, "pss_mib": info.pss / MIB}


def _start_targets(target_bin: Path, count: int, size_mib: int) -> list[subprocess.Popen[str]]:
    targets = []
    for _ in range(count):
        target = subprocess.Popen([target_bin, str(size_mib)], stdout=subprocess.PIPE, text=True)
        targets.append(target)
        assert target.stdout is not None
        target.stdout.readline()
    return targets


def _verify_and_reap(targets: list[subprocess.Popen[str]]) -> None:
    for target in targets:
        target.send_signal(signal.SIGUSR1)
    bad = [t.pid for t in targets if t.wait(timeout=300) != 0]
    if bad:
        raise SystemExit(f"bench: targets {bad} found damaged memory after the daemon restored them")


def _kill(targets: list[subprocess.Popen[str]]) -> None:
    for target in targets:
        if target.poll() is None:
            target.kill()
        target.wait()


def _timed_checkpoints(client: Client, pids: list[int], parallel: bool) -> float:
    started = time.monotonic()
    if parallel:
        threads = [threading.Thread(target=client.checkpoint, args=(pid,)) for pid in pids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for pid in pids:
            client.checkpoint(pid)
    return time.monotonic() - started


def measure(target_bin: Path, directory: Path) -> dict:
    sock = directory / "bench.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "memcr", "-l", str(sock), "-d", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    targets: list[subprocess.Popen[str]] = []
    try:
        assert daemon.stdout is not None
        daemon.stdout.readline()  # "listening on ..."
        client = Client(str(sock))
        idle = _memory(daemon.pid)
        results: dict = {"idle": idle, "checkpointed": {}}

        targets = _start_targets(target_bin, 64, 4)
        done, first = 0, idle
        for count in (1, 16, 64):
            for target in targets[done:count]:
                client.checkpoint(target.pid)
            done = count
            mem = _memory(daemon.pid)
            if count == 1:
                first = mem
            else:
                mem["uss_per_process_mib"] = (mem["uss_mib"] - first["uss_mib"]) / (count - 1)
                mem["pss_per_process_mib"] = (mem["pss_mib"] - first["pss_mib"]) / (count - 1)
            results["checkpointed"][count] = mem
        results["first_checkpoint_uss_mib"] = first["uss_mib"] - idle["uss_mib"]
        for target in targets:
            client.restore(target.pid)
        _verify_and_reap(targets)

        timing = {}
        for mode in ("sequential", "parallel"):
            targets = _start_targets(target_bin, 16, 64)
            pids = [t.pid for t in targets]
            timing[mode] = _timed_checkpoints(client, pids, parallel=mode == "parallel")
            for pid in pids:
                client.restore(pid)
            _verify_and_reap(targets)
        results["checkpoint_16x64mib_s"] = timing
        results["parallel_speedup"] = timing["sequential"] / timing["parallel"]
        return results
    finally:
        _kill(targets)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)


def print_table(r: dict) -> None:
    idle = r["idle"]
    print(f"\ndaemon idle: RSS {idle['rss_mib']:.1f} MiB, USS {idle['uss_mib']:.1f} MiB, PSS {idle['pss_mib']:.1f} MiB"
          f" ({'ok' if idle['rss_mib'] < 24 else 'over'} against 24 MiB RSS)")  # fmt: skip
    print(f"first checkpoint, once: USS +{r['first_checkpoint_uss_mib']:.2f} MiB (code loaded on first use)")
    print(f"{'checkpointed':>14}{'USS MiB':>10}{'PSS MiB':>10}{'USS/process':>14}{'PSS/process':>14}{'aim':>6}")
    for count, m in r["checkpointed"].items():
        if count == 1:
            print(f"{count:>14}{m['uss_mib']:10.1f}{m['pss_mib']:10.1f}")
            continue
        verdict = "ok" if m["uss_per_process_mib"] < 1 else "over"
        print(f"{count:>14}{m['uss_mib']:10.1f}{m['pss_mib']:10.1f}"
              f"{m['uss_per_process_mib']:13.2f} {m['pss_per_process_mib']:13.2f}{verdict:>6}")  # fmt: skip
    t = r["checkpoint_16x64mib_s"]
    print(f"16 x 64 MiB checkpoints: one after another {t['sequential']:.2f} s, in parallel {t['parallel']:.2f} s"
          f" ({r['parallel_speedup']:.2f}x)")  # fmt: skip
