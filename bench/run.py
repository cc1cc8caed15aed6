"""`make bench`: memcr's checkpoint and restore speed and memory against this machine's limits.

Each figure stands beside a limit measured in the same run, in the same
dump directory:

* write limit: the bench target itself streams its pages from its memory
  over a UNIX socket to another process, which writes them into a file in
  the dump directory (the same bytes memcr moves: the page cache of this
  virtual machine is slower for some data than for other);
* read limit: that file goes back over a UNIX socket (sendfile) into fresh
  anonymous memory of another process, pre-faulted chunk by chunk with
  MADV_POPULATE_WRITE (the fastest plain receiver we know).

memcr runs `memcr -p PID -n` on a fresh target each time (half text-like,
half random pages), the target verifies every byte afterwards, and memcr's
peak RSS comes from wait4() in a small process that forks it. Rounds of limits, plain memcr and the -z/-c/-e
variants in turn; ratios are medians over --runs of each run against the
yardstick of its own round. Beside them, what one core codes per second
for each variant (bench/codec_speed.py): the CPU a variant adds to a transfer
that already takes about a core. Results go to stdout and to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import app_memory, groups, incremental, intake, plot, service_load, sparse, wakeup
from memcr.dump.codec import Coding
from tests.conftest import reports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the limits' pieces: the fastest of 8 MiB, 1 MiB and 256 KiB here (a piece
# that fits the CPU cache is written on before it leaves it)
WRITE_CHUNK = 256 << 10
READ_CHUNK = 1 << 20
MADV_POPULATE_WRITE = 23  # Linux 5.14; not in the mmap module of Python 3.11
CODED_REPARK = Coding(checksum=True)  # the incremental figures once more, with -c
CODED_REPARK_RUN = 64  # pages the app writes in a row then


@dataclass
class MemcrRun:
    download_ms: float
    upload_ms: float
    setup_ms: float
    release_ms: float
    peak_rss_mib: float
    dump_bytes: int
    wall_ms: float  # the whole `memcr -p PID -n`: start-up, checkpoint, restore, exit


def build_target(work: Path) -> Path:
    binary = work / "bench-target"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "target.c")], check=True)
    return binary


def write_limit(target_bin: Path, size_mib: int, directory: Path) -> tuple[float, Path]:
    """Seconds to stream the target's pages over a UNIX socket into a file."""
    size = size_mib << 20
    path = directory / "bench-limit.dat"
    ours, theirs = socket.socketpair()
    sender = subprocess.Popen([target_bin, str(size_mib), "send"], stdin=theirs.fileno())
    theirs.close()
    buf = memoryview(bytearray(WRITE_CHUNK))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        ours.recv(1)  # the sender has filled its memory: the clock may start
        ours.send(b"g")
        started = time.monotonic()
        done = 0
        while done < size:
            n = ours.recv_into(buf, min(len(buf), size - done), socket.MSG_WAITALL)
            if n == 0:
                raise SystemExit("bench: the limit's sender stopped early")
            os.write(fd, buf[:n])
            done += n
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
        ours.close()
        if sender.wait(timeout=60) != 0:
            raise SystemExit("bench: the limit's sender failed")
    return elapsed, path


def read_limit(size: int, path: Path) -> float:
    """Seconds to send the file over a UNIX socket into fresh memory of another process."""
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        ours.close()
        memory = mmap.mmap(-1, size)
        view = memoryview(memory)
        got = 0
        while got < size:
            # pre-fault each chunk in one call, as the best plain receiver would
            memory.madvise(MADV_POPULATE_WRITE, got, min(READ_CHUNK, size - got))
            got += theirs.recv_into(view[got:], min(READ_CHUNK, size - got), socket.MSG_WAITALL)
        theirs.send(b"k")
        os._exit(0)
    theirs.close()
    fd = os.open(path, os.O_RDONLY)
    started = time.monotonic()
    sent = 0
    while sent < size:
        sent += os.sendfile(ours.fileno(), fd, sent, size - sent)
    ours.recv(1)
    elapsed = time.monotonic() - started
    os.close(fd)
    os.waitpid(child, 0)
    ours.close()
    return elapsed


@contextlib.contextmanager
def ready_target(target_bin: Path, size_mib: int, who: str, mode: str = "") -> Iterator[subprocess.Popen[str]]:
    """A bench target whose memory is filled; checked for intact memory afterwards, and always reaped."""
    target = subprocess.Popen([target_bin, str(size_mib), *mode.split()], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout is not None
        target.stdout.readline()
        yield target
        target.send_signal(signal.SIGUSR1)
        if target.wait(timeout=300) != 0:
            raise SystemExit(f"{who}: the target found damaged memory after memcr: aborting")
    finally:
        if target.poll() is None:
            target.kill()
        target.wait()


# Starts argv[2:] and writes its wait status, peak RSS (KiB) and wall time (ns) to the descriptor argv[1]. A
# process's peak RSS starts from its parent's RSS at the fork (the copied mm's high-water mark survives the
# exec), so memcr is forked from this small interpreter and not from the bench, whose own ~34 MiB it would show.
_PEAK_SPAWNER = """
import os, sys, time
started = time.monotonic_ns()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), b"%d %d %d" % (status, usage.ru_maxrss, time.monotonic_ns() - started))
"""


def run_memcr(target_bin: Path, size_mib: int, directory: Path, extra: list[str], mode: str = "") -> MemcrRun:
    with ready_target(target_bin, size_mib, "bench", mode) as target:
        argv = [sys.executable, "-m", "memcr", "-p", str(target.pid), "-n", "--json", "-d", str(directory), *extra]
        figures_r, figures_w = os.pipe()
        try:
            try:
                done = subprocess.run(
                    [sys.executable, "-S", "-I", "-c", _PEAK_SPAWNER, str(figures_w), *argv],
                    capture_output=True,
                    text=True,
                    pass_fds=(figures_w,),
                )
            finally:
                os.close(figures_w)
            status, peak_kib, wall_ns = map(int, os.read(figures_r, 64).split())
        finally:
            os.close(figures_r)
        wall_ms = wall_ns / 1e6
        returncode = os.waitstatus_to_exitcode(status)
        out, err = done.stdout, done.stderr
        if returncode != 0:
            raise SystemExit(f"bench: memcr failed ({returncode}): {err.strip()}")
    found = {r["event"]: r for r in reports(out)}
    if set(found) != {"checkpoint", "restore"}:
        raise SystemExit(f"bench: memcr printed no checkpoint and restore reports:\n{out}")
    r = found["restore"]
    return MemcrRun(
        download_ms=r["download_ms"],
        upload_ms=r["upload_ms"],
        setup_ms=r["setup_ms"],
        release_ms=r["release_ms"],
        peak_rss_mib=peak_kib / 1024,
        dump_bytes=r["dump_bytes"],
        wall_ms=wall_ms,
    )


@dataclass
class CRun:
    download_ms: float
    upload_ms: float
    wall_ms: float


def run_c_memcr(memcr_c: str, target_bin: Path, size_mib: int, directory: Path) -> CRun:
    """The C memcr (MEMCR_C) on the same kind of target: its own "download took" and "upload took" lines."""
    with ready_target(target_bin, size_mib, "bench (C memcr)") as target:
        started = time.monotonic()
        done = subprocess.run(
            [memcr_c, "-p", str(target.pid), "-n", "-d", str(directory)], capture_output=True, text=True, timeout=600
        )
        wall_ms = (time.monotonic() - started) * 1000
        if done.returncode != 0:
            raise SystemExit(f"bench: the C memcr failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    out = done.stdout + done.stderr
    took = {}
    for word in ("download", "upload"):
        if not (match := re.search(rf"{word} took (\d+) ms", out)):
            raise SystemExit(f"bench: the C memcr printed no '{word} took' line:\n{out[-2000:]}")
        took[word] = float(match.group(1))
    return CRun(took["download"], took["upload"], wall_ms)


def against_c(ours: list[MemcrRun], theirs: list[CRun]) -> dict[str, float]:
    """Medians of ours/C for each figure, run against run (both ran in the same round)."""
    pairs = list(zip(ours, theirs, strict=True))
    return {
        "c_download_ms": statistics.median(c.download_ms for c in theirs),
        "c_upload_ms": statistics.median(c.upload_ms for c in theirs),
        "c_wall_ms": statistics.median(c.wall_ms for c in theirs),
        "download_ratio": statistics.median(o.download_ms / c.download_ms for o, c in pairs),
        "upload_ratio": statistics.median(o.upload_ms / c.upload_ms for o, c in pairs),
        "wall_ratio": statistics.median(o.wall_ms / c.wall_ms for o, c in pairs),
    }


def machine(directory: Path) -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(directory)], capture_output=True, text=True).stdout
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "dump_dir": str(directory),
        "dump_fs": fstype.strip(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="dump directory (default: a new one under /var/tmp)")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--memcr-args", default="", help="extra memcr options, e.g. '-m'")
    parser.add_argument("--no-variants", action="store_true", help="skip the -z/-c/-e runs")
    parser.add_argument("--no-service", action="store_true", help="skip the daemon figures")
    parser.add_argument("--no-apps", action="store_true", help="skip the real apps (tests/apps)")
    parser.add_argument("--no-groups", action="store_true", help="skip the 4-process app: as a tree, one by one")
    parser.add_argument(
        "--sparse-mib", type=int, default=256, help="data in the sparse figure's mapping, 8 times as large (0 to skip)"
    )
    parser.add_argument(
        "--sweep", default="64,128,256,512,1024,2048", help="target sizes in MiB for the throughput plot ('' to skip)"
    )
    parser.add_argument("--png", type=Path, default=HERE / "throughput.png")
    parser.add_argument("--no-wakeup", action="store_true", help="skip the wake-up figures, eager against lazy")
    parser.add_argument("--wake-runs", type=int, default=10, help="round trips per size and mode for the wake-up")
    parser.add_argument("--wake-png", type=Path, default=HERE / "wakeup.png")
    parser.add_argument("--no-intake", action="store_true", help="skip the daemon's request latency and idle figures")
    parser.add_argument(
        "--incremental-mib", type=int, default=1024, help="the incremental re-park figures' target (0 to skip)"
    )
    parser.add_argument(
        "--only", choices=["intake", "service"], help="these figures alone, printed (the JSON file is left as it is)"
    )
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="memcr-bench-", dir=args.dir or "/var/tmp") as work:
        directory = Path(work)
        target_bin = build_target(directory)
        if args.only == "intake":
            intake.print_table(intake.measure(target_bin, directory))
            return 0
        if args.only == "service":
            service_load.print_table(service_load.measure(target_bin, directory))
            return 0
        writes, reads, runs = [], [], []
        c_runs: list[CRun] = []
        memcr_c = os.environ.get("MEMCR_C")
        codec_speeds: dict[str, dict[str, float]] = {}
        variants: dict[str, list[MemcrRun]] = {" ".join(v): [] for v in ([] if args.no_variants else VARIANTS)}
        # a discarded warm-up round first; then in each round the limits, plain
        # memcr and every variant take turns, so that each figure meets the same
        # state of the page cache and of the (virtual) machine as its yardstick
        for i in range(args.runs + 1):
            seconds, path = write_limit(target_bin, args.size_mib, directory)
            read_seconds = read_limit(size, path)
            if i == 0:
                codec_speeds = one_core_codec_speeds(path)
            path.unlink()
            run = run_memcr(target_bin, args.size_mib, directory, args.memcr_args.split())
            c_run = run_c_memcr(memcr_c, target_bin, args.size_mib, directory) if memcr_c else None
            tried = {name: run_memcr(target_bin, args.size_mib, directory, args.memcr_args.split() + name.split())
                     for name in variants}  # fmt: skip
            if i:
                writes.append(seconds)
                reads.append(read_seconds)
                runs.append(run)
                if c_run:
                    c_runs.append(c_run)
                for name, variant_run in tried.items():
                    variants[name].append(variant_run)
        lazy_peak = run_memcr(target_bin, args.size_mib, directory, [*args.memcr_args.split(), "--lazy"]).peak_rss_mib
        daemon = None if args.no_service else service_load.measure(target_bin, directory)
        intake_figures = None if args.no_intake else intake.measure(target_bin, directory)
        app_figures = None if args.no_apps else app_memory.measure()
        group_figures = None if args.no_groups else groups.measure(directory)
        sparse_figures = (
            sparse.measure(target_bin, args.sparse_mib, directory, args.runs, args.memcr_args.split())
            if args.sparse_mib
            else None
        )
        wake = None if args.no_wakeup else wakeup.measure(target_bin, directory, args.wake_runs)
        repark = incremental.measure(directory, args.incremental_mib, args.runs) if args.incremental_mib else None
        # a coded dump is added to where the app writes in runs (a page here and there: written whole)
        repark_coded = (
            incremental.measure(directory, args.incremental_mib, args.runs, CODED_REPARK, CODED_REPARK_RUN)
            if args.incremental_mib
            else None
        )
        sweep = {int(mib): sweep_point(target_bin, int(mib), directory, args)
                 for mib in args.sweep.split(",") if mib}  # fmt: skip
        facts = machine(directory)
    results = summarise(args.size_mib, writes, reads, runs)
    results["lazy_peak_rss_mib"] = lazy_peak
    results["c_memcr"] = against_c(runs, c_runs) if c_runs else None
    results["variants"] = {name: compare(v, runs) for name, v in variants.items()}
    results["codec_one_core_mib_s"] = codec_speeds
    results["service"] = daemon
    results["intake"] = intake_figures
    results["apps"] = app_figures
    results["groups"] = group_figures
    results["sparse"] = sparse_figures
    results["wakeup"] = wake
    results["incremental"] = repark
    results["incremental_coded"] = repark_coded
    results["sweep"] = sweep
    results["machine"] = facts
    print_table(results)
    if daemon:
        service_load.print_table(daemon)
    if intake_figures:
        intake.print_table(intake_figures)
    if app_figures:
        app_memory.print_table(app_figures)
    if group_figures:
        groups.print_table(group_figures)
    if sparse_figures:
        sparse.print_table(sparse_figures)
    if repark:
        incremental.print_table(repark)
    if repark_coded:
        incremental.print_table(repark_coded, CODED_REPARK)
    if wake:
        wakeup.print_table(wake)
        plot.wakeup_png(wake, args.wake_png)
        print(f"bench: wake-up against size in {args.wake_png}")
    if sweep:
        plot.throughput_png(sweep, args.png)
        print(f"bench: throughput against size in {args.png}")
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"bench: results in {args.json}")
    return 0


def one_core_codec_speeds(path: Path) -> dict[str, dict[str, float]]:
    """MiB/s of each variant's frame coding on one core (bench/codec_speed.py, a process of its own
    so that its buffers do not swell the peak RSS wait4() reports for memcr runs started later)."""
    variants = json.dumps([" ".join(v) for v in VARIANTS])
    argv = [sys.executable, "-m", "bench.codec_speed", str(path), variants]
    out = subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    speeds: dict[str, dict[str, float]] = json.loads(out.stdout)
    return speeds


def sweep_point(target_bin: Path, size_mib: int, directory: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median MiB/s of memcr and of the limits at one target size (3 runs)."""
    writes, reads, runs = [], [], []
    for _ in range(3):
        seconds, path = write_limit(target_bin, size_mib, directory)
        writes.append(seconds)
        reads.append(read_limit(size_mib << 20, path))
        path.unlink()
        runs.append(run_memcr(target_bin, size_mib, directory, args.memcr_args.split()))
    return {
        "checkpoint": size_mib / (statistics.median(r.download_ms for r in runs) / 1000),
        "restore": size_mib / (statistics.median(r.upload_ms for r in runs) / 1000),
        "write_limit": size_mib / statistics.median(writes),
        "read_limit": size_mib / statistics.median(reads),
        "setup_ms": statistics.median(r.setup_ms for r in runs),
        "release_ms": statistics.median(r.release_ms for r in runs),
    }


def summarise(size_mib: int, writes: list[float], reads: list[float], runs: list[MemcrRun]) -> dict[str, Any]:
    def mib_s(seconds: float) -> float:
        return size_mib / seconds

    checkpoint = mib_s(statistics.median(r.download_ms for r in runs) / 1000)
    restore = mib_s(statistics.median(r.upload_ms for r in runs) / 1000)
    write_lim, read_lim = mib_s(statistics.median(writes)), mib_s(statistics.median(reads))
    # each run against the limit measured beside it: the machine drifts between rounds
    checkpoint_ratio = statistics.median(w / (r.download_ms / 1000) for w, r in zip(writes, runs, strict=True))
    restore_ratio = statistics.median(w / (r.upload_ms / 1000) for w, r in zip(reads, runs, strict=True))
    peak = [r.peak_rss_mib for r in runs]
    return {
        "size_mib": size_mib,
        "runs": [asdict(r) for r in runs],
        "checkpoint_mib_s": checkpoint,
        "restore_mib_s": restore,
        "write_limit_mib_s": write_lim,
        "read_limit_mib_s": read_lim,
        "checkpoint_ratio": checkpoint_ratio,
        "restore_ratio": restore_ratio,
        "peak_rss_mib_median": statistics.median(peak),
        "peak_rss_mib_max": max(peak),
        "freeze_overhead_ms": statistics.median(r.setup_ms + r.release_ms for r in runs),
    }


PEAK_AIM_MIB = 20  # of `memcr -n`, the largest of the rounds
LAZY_PEAK_AIM_MIB = 24  # of `memcr -n --lazy`
CHECKPOINT_FLOOR_AIM = 1.5  # checkpoint time over the write limit's
AGAINST_C_AIM = 0.5  # checkpoint and restore time over the C memcr's
VARIANTS = [["-z", "lz4"], ["-z", "zstd"], ["-c"], ["-e"], ["-z", "zstd", "-c", "-e"]]
VARIANT_AIMS = {"-z lz4": 1.0, "-z zstd": 1.5, "-c": 1.5, "-e": 1.5}  # checkpoint time against plain


def compare(variant: list[MemcrRun], plain: list[MemcrRun]) -> dict[str, float]:
    """Median times and dump size of a variant, and the median of its ratios to the plain run of each round."""
    out: dict[str, float] = {}
    for field in ("download_ms", "upload_ms", "dump_bytes", "peak_rss_mib"):
        out[field] = statistics.median(getattr(r, field) for r in variant)
        out[f"{field}_ratio"] = statistics.median(
            getattr(v, field) / getattr(p, field) for v, p in zip(variant, plain, strict=True)
        )
    return out


def print_table(r: dict[str, Any]) -> None:
    print(f"memcr bench: {r['size_mib']} MiB target, medians of {len(r['runs'])} rounds "
          "(a ratio: each run against its own round's limit or plain run)")  # fmt: skip
    print(f"{'':12}{'memcr MiB/s':>14}{'limit MiB/s':>14}{'ratio':>8}{'aim':>8}")
    for name, ours, limit, ratio in (
        ("checkpoint", r["checkpoint_mib_s"], r["write_limit_mib_s"], r["checkpoint_ratio"]),
        ("restore", r["restore_mib_s"], r["read_limit_mib_s"], r["restore_ratio"]),
    ):
        verdict = "ok" if ratio >= 0.8 else "below"
        print(f"{name:12}{ours:14.0f}{limit:14.0f}{ratio:8.2f}{verdict:>8}")
    floor = 1 / r["checkpoint_ratio"]  # checkpoint time over the time of the write limit
    print(f"aim: checkpoint time {floor:.2f}x the write limit's, at most {CHECKPOINT_FLOOR_AIM}x: "
          f"{'met' if floor <= CHECKPOINT_FLOOR_AIM else 'below'}")  # fmt: skip
    if c := r.get("c_memcr"):
        print(f"against the C memcr (MEMCR_C), ours/C per round: checkpoint {c['download_ratio']:.2f}, "
              f"restore {c['upload_ratio']:.2f}, whole `memcr -n` {c['wall_ratio']:.2f} "
              f"(C: download {c['c_download_ms']:.0f} ms, upload {c['c_upload_ms']:.0f} ms, "
              f"wall {c['c_wall_ms']:.0f} ms)")  # fmt: skip
        for what, ratio in (("checkpoint", c["download_ratio"]), ("restore", c["upload_ratio"])):
            print(f"aim: {what} time {ratio:.2f}x the C memcr's, at most {AGAINST_C_AIM}x: "
                  f"{'met' if ratio <= AGAINST_C_AIM else 'below'}")  # fmt: skip
    for what, peak, limit in (
        ("memcr -n", r["peak_rss_mib_max"], PEAK_AIM_MIB),
        ("memcr -n --lazy", r["lazy_peak_rss_mib"], LAZY_PEAK_AIM_MIB),
    ):
        print(f"aim: peak RSS of `{what}` on {r['size_mib']} MiB {peak:.1f} MiB, limit {limit} MiB: "
              f"{'met' if peak <= limit else 'below'}")  # fmt: skip
    freeze = r["freeze_overhead_ms"]
    print(f"frozen beyond the transfer (set-up + release): median {freeze:.1f} ms "
          f"({'ok' if freeze < 20 else 'over'} against 20 ms)")  # fmt: skip
    if r["variants"]:
        print(f"\n{'options':18}{'checkpoint':>12}{'restore':>10}{'dump size':>11}{'peak RSS':>10}"
              f"{'aim':>18}   (ratio to plain)")  # fmt: skip
        for name, v in r["variants"].items():
            aim = VARIANT_AIMS.get(name)
            verdict = "" if aim is None else f"{'ok' if v['download_ms_ratio'] <= aim else 'over'} at {aim:.1f}"
            print(f"{name:18}{v['download_ms_ratio']:12.2f}{v['upload_ms_ratio']:10.2f}"
                  f"{v['dump_bytes_ratio']:11.2f}{v['peak_rss_mib_ratio']:10.2f}{verdict:>18}")  # fmt: skip
        speeds = r["codec_one_core_mib_s"].items()
        print("coding on one core, MiB/s (encode/decode): "
              + ", ".join(f"{name} {c['encode']:.0f}/{c['decode']:.0f}" for name, c in speeds))  # fmt: skip
    print("machine: " + ", ".join(f"{k} {v}" for k, v in r["machine"].items()))


if __name__ == "__main__":
    sys.exit(main())
