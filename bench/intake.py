"""The daemon's request intake for `make bench`: how soon a request is answered, idle connections or not.

* v1 latency: Thunder's client as it sends a request (connect, 8 bytes,
  read the 4-byte answer), a restore of a pid that is not parked, median
  of RUNS; the same against the C daemon when MEMCR_C names its binary,
  request for request in turn with ours, so that both meet the same load;
  and the floor of the same interpreter: a server that answers each
  request as it accepts it, doing nothing else (FLOOR_SERVER).
  Aim: within 1.5x the C daemon's.
* a checkpoint of a small target while IDLE connections are open and
  silent. Aim: answered within 1 s.
* what each idle connection costs the daemon: its USS with them open,
  less its USS before, per connection.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from bench.service_load import _kill, _start_targets, _verify_and_reap
from memcr_client.protocol import CMD_CHECKPOINT, CMD_RESTORE, REQUEST, RESPONSE

RUNS = 30
WARM_UP = 5  # requests before the timed ones: the daemon's first one loads code
IDLE = 1000
LATENCY_AIM = 1.5  # ours / the C daemon's
CHECKPOINT_AIM_S = 1.0
TARGET_MIB = 4
START_TIMEOUT = 30.0
# Python's floor for an answer: accept, read the 8 bytes, answer -2; no selector, thread, log or check
FLOOR_SERVER = """
import socket, struct, sys
with socket.socket(socket.AF_UNIX) as listener:
    listener.bind(sys.argv[1])
    listener.listen(128)
    while True:
        conn, _ = listener.accept()
        with conn:
            if conn.recv(8):  # nothing: the bench's probe whether it listens
                conn.sendall(struct.pack("i", -2))
"""


def measure(target_bin: Path, directory: Path) -> dict[str, float]:
    """The figures of the module docstring, as a dict (print_table shows them)."""
    _enough_descriptors(IDLE + 100)
    results: dict[str, float] = {}
    targets = _start_targets(target_bin, 1, TARGET_MIB)
    pid = targets[0].pid
    try:
        sock = directory / "intake.sock"
        with contextlib.ExitStack() as stack:
            daemon = stack.enter_context(
                _daemon([sys.executable, "-m", "memcr", "-l", str(sock), "-d", str(directory)], sock)
            )
            floor = directory / "intake-floor.sock"
            floor_server = stack.enter_context(_daemon([sys.executable, "-I", "-c", FLOOR_SERVER, str(floor)], floor))
            socks, servers = [sock, floor], [daemon.pid, floor_server.pid]
            if memcr_c := os.environ.get("MEMCR_C"):
                socks.append(directory / "intake-c.sock")
                servers.append(
                    stack.enter_context(_daemon([memcr_c, "-l", str(socks[2]), "-d", str(directory)], socks[2])).pid
                )
            medians = _latencies_ms(socks, servers, pid)
            results["v1_ms"], results["v1_floor_ms"] = medians[:2]
            if memcr_c:
                results["c_v1_ms"] = medians[2]
                results["v1_ratio"] = medians[0] / medians[2]
            _settled_descriptors(daemon.pid)
            idle_uss = psutil.Process(daemon.pid).memory_full_info().uss
            with _idle_connections(sock, IDLE, daemon.pid) as idle:
                per_connection = (psutil.Process(daemon.pid).memory_full_info().uss - idle_uss) / IDLE
                started = time.monotonic()
                checkpointed = _ask(sock, CMD_CHECKPOINT, pid)
                results["checkpoint_with_idle_s"] = time.monotonic() - started
                results["idle_still_open"] = sum(_open(conn) for conn in idle)
            if checkpointed != 0 or _ask(sock, CMD_RESTORE, pid) != 0:
                raise SystemExit(f"bench: the checkpoint or restore of pid {pid} with idle connections failed")
            results["uss_per_idle_connection_kib"] = per_connection / 1024
        _verify_and_reap(targets)
    finally:
        _kill(targets)
    return results


def print_table(r: dict[str, float]) -> None:
    if "v1_ratio" in r:
        verdict = "met" if r["v1_ratio"] <= LATENCY_AIM else "below"
        print(f"\nv1 request -> answer, median of {RUNS}: memcr-py {r['v1_ms']:.3f} ms, the C daemon "
              f"{r['c_v1_ms']:.3f} ms ({r['v1_ratio']:.2f}x; aim <= {LATENCY_AIM:g}x: {verdict})")  # fmt: skip
    else:
        print(f"\nv1 request -> answer, median of {RUNS}: memcr-py {r['v1_ms']:.3f} ms (MEMCR_C unset: no C figure)")
    if "v1_floor_ms" in r:
        print(f"  Python's floor, a server that answers as it accepts and does nothing else: {r['v1_floor_ms']:.3f} ms "
              f"(memcr-py {r['v1_ms'] / r['v1_floor_ms']:.2f}x it)")  # fmt: skip
    verdict = "met" if r["checkpoint_with_idle_s"] <= CHECKPOINT_AIM_S else "below"
    print(f"checkpoint of a {TARGET_MIB} MiB target with {IDLE} idle connections open: "
          f"{r['checkpoint_with_idle_s'] * 1000:.0f} ms (aim <= {CHECKPOINT_AIM_S:g} s: {verdict}); "
          f"{r['idle_still_open']} of them still open after it")  # fmt: skip
    print(f"daemon USS per idle connection: {r['uss_per_idle_connection_kib']:.2f} KiB")


def _enough_descriptors(count: int) -> None:
    """This process holds the idle connections: its soft RLIMIT_NOFILE up to `count` when the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            raise SystemExit(f"bench: {count} descriptors needed, RLIMIT_NOFILE's hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


@contextlib.contextmanager
def _daemon(argv: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon listening on `sock`, stopped (SIGTERM, then SIGKILL) and reaped afterwards."""
    # the memcr-py daemon raises its own soft RLIMIT_NOFILE; the C one gets this process's, raised above
    daemon = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until(lambda: _accepts(sock) or daemon.poll() is not None, f"no daemon on {sock}")
        if daemon.poll() is not None:
            raise SystemExit(f"bench: {argv[0]} ended at once ({daemon.returncode})")
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as conn:
        try:
            conn.connect(str(sock))
        except OSError:
            return False
    return True


def _until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} within {START_TIMEOUT:g} s")
        time.sleep(0.01)


def _ask(sock: Path, cmd: int, pid: int) -> int:
    """One v1 request as Thunder's client sends it, and its answer."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.sendall(REQUEST.pack(cmd, pid))
        return int(RESPONSE.unpack(conn.recv(RESPONSE.size, socket.MSG_WAITALL))[0])


def _latencies_ms(socks: list[Path], servers: list[int], pid: int) -> list[float]:
    """For each daemon, the median ms from connect to answer of a restore of `pid`, which none has parked.

    The client and the daemons (`servers`) on one CPU, so that the figure is
    each one's work: left to the scheduler, the same daemon's median moved
    between 0.03 and 0.10 ms from run to run, as it woke on the client's CPU or not.
    """
    before = os.sched_getaffinity(0)
    for process in [0, *servers]:  # a daemon's main thread: its accept loop, and the parent of its next threads
        os.sched_setaffinity(process, {min(before)})
    try:
        return _medians(socks, pid)
    finally:
        for process in [0, *servers]:
            os.sched_setaffinity(process, before)


def _medians(socks: list[Path], pid: int) -> list[float]:
    took: list[list[float]] = [[] for _ in socks]
    for i in range(WARM_UP + RUNS):
        for sock, times in zip(socks, took, strict=True):
            started = time.perf_counter()
            _ask(sock, CMD_RESTORE, pid)
            if i >= WARM_UP:
                times.append((time.perf_counter() - started) * 1000)
    return [statistics.median(times) for times in took]


@contextlib.contextmanager
def _idle_connections(sock: Path, count: int, daemon: int) -> Iterator[list[socket.socket]]:
    """`count` connections that send nothing, once the daemon has accepted them all (its descriptors say)."""
    before = _settled_descriptors(daemon)
    idle: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = socket.socket(socket.AF_UNIX)
            idle.append(conn)
            conn.connect(str(sock))  # blocking: waits while the daemon's backlog is full
        _until(lambda: len(os.listdir(f"/proc/{daemon}/fd")) >= before + count, f"{count} connections not accepted")
        yield idle
    finally:
        for conn in idle:
            conn.close()


def _settled_descriptors(pid: int) -> int:
    """How many descriptors `pid` holds once it has closed the connections of earlier requests."""
    count = len(os.listdir(f"/proc/{pid}/fd"))
    while True:
        time.sleep(0.2)
        if (now := len(os.listdir(f"/proc/{pid}/fd"))) == count:
            return count
        count = now


def _open(conn: socket.socket) -> bool:
    """Whether the daemon still holds `conn` open (nothing to read) rather than closed it (end of file)."""
    try:
        return conn.recv(1, socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
