"""Service-mode figures for `make bench`: the daemon's footprint and its parallelism.

* idle RSS/USS/PSS of `memcr -l`, against the Python floor: the same
  interpreter (`-I`) sleeping, measured in the same run; idle is the
  image that waits for the first connection (memcr.service.idle), and
  the figures once it has served, nothing parked, are shown beside it:
  right away, and once it has gone back to that image (--unload-after);
* its peak RSS (VmHWM) once 8 targets of 256 MiB come back lazily at once;
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
from typing import Any

import psutil

from memcr.cli import UNLOAD_AFTER
from memcr.service.daemon import POLL
from memcr_client import Client

MIB = 2**20
IDLE_AIM_MIB = 2  # idle daemon USS above the Python floor
LAZY_AIM_MIB = 48  # the daemon's peak RSS with 8 x 256 MiB lazy restores at once


def _memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mib": info.rss / MIB, "uss_mib": info.uss / MIB, "pss_mib": info.pss / MIB}


def _python_floor() -> dict[str, float]:
    """USS/RSS/PSS of this interpreter doing nothing: what no Python daemon can go below."""
    argv = [sys.executable, "-I", "-c", "import time; print(flush=True); time.sleep(60)"]
    floor = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert floor.stdout is not None
        floor.stdout.readline()
        return _memory(floor.pid)
    finally:
        floor.kill()
        floor.wait()


def _peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _lazy_peak(client: Client, target_bin: Path, daemon_pid: int) -> float:
    """The daemon's peak RSS once 8 targets of 256 MiB are checkpointed and restored lazily, all at once."""
    targets = _start_targets(target_bin, 8, 256)
    Path(f"/proc/{daemon_pid}/clear_refs").write_text("5")  # resets VmHWM: this phase's peak, not an earlier one
    try:
        for target in targets:
            client.checkpoint(target.pid)
        threads = [threading.Thread(target=client.restore, args=(t.pid,), kwargs={"lazy": True}) for t in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _verify_and_reap(targets)  # each target reads every page: every lazy restore runs to its end
        return _peak_mib(daemon_pid)
    finally:
        _kill(targets)


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


def measure(target_bin: Path, directory: Path) -> dict[str, Any]:
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
        results: dict[str, Any] = {"idle": idle, "python_floor": _python_floor(), "checkpointed": {}}

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
        results["idle_after_serving"] = _memory(daemon.pid)  # nothing parked; the service loaded

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
        results["lazy_8x256_peak_mib"] = _lazy_peak(client, target_bin, daemon.pid)
        time.sleep(UNLOAD_AFTER + 2 * POLL)  # nothing held: the daemon goes back to its idle image
        results["idle_after_unload"] = _memory(daemon.pid)
        return results
    finally:
        _kill(targets)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)


def print_table(r: dict[str, Any]) -> None:
    idle = r["idle"]
    floor = r["python_floor"]
    print(f"\ndaemon idle: RSS {idle['rss_mib']:.1f} MiB, USS {idle['uss_mib']:.1f} MiB, PSS {idle['pss_mib']:.1f} MiB;"
          f" Python floor (-I, sleeping): RSS {floor['rss_mib']:.1f} MiB, USS {floor['uss_mib']:.1f} MiB")  # fmt: skip
    limit = floor["uss_mib"] + IDLE_AIM_MIB
    print(f"aim: idle daemon USS {idle['uss_mib']:.1f} MiB, limit {limit:.1f} MiB (floor + {IDLE_AIM_MIB}): "
          f"{'met' if idle['uss_mib'] <= limit else 'below'}")  # fmt: skip
    peak = r["lazy_8x256_peak_mib"]
    print(f"aim: daemon peak RSS, 8 x 256 MiB lazy restores at once {peak:.1f} MiB, limit {LAZY_AIM_MIB} MiB: "
          f"{'met' if peak <= LAZY_AIM_MIB else 'below'}")  # fmt: skip
    print(f"first checkpoint, once: USS +{r['first_checkpoint_uss_mib']:.2f} MiB (code loaded on first use)")
    after = r["idle_after_serving"]
    unloaded = r["idle_after_unload"]
    print(f"idle again once it has served (nothing parked): USS {after['uss_mib']:.1f} MiB, "
          f"RSS {after['rss_mib']:.1f} MiB; {UNLOAD_AFTER:g} s on, back in its idle image: "
          f"USS {unloaded['uss_mib']:.1f} MiB, RSS {unloaded['rss_mib']:.1f} MiB")  # fmt: skip
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
