"""Start the real apps of the app suite, each with a known dataset, for the tests and the bench.

Each start_* returns a RunningApp once the app answers and holds its data;
stop() kills and reaps every process it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.conftest import Lines, reap

HERE = Path(__file__).parent
READY_TIMEOUT = 120
REQUEST_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = REQUEST_TIMEOUT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while piece := sock.recv(1 << 16):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    if not (head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]):
        raise OSError(f"GET {path}: {head[:200]!r}")
    return body


def resp(*args: str) -> bytes:
    """A redis command in its wire format."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_reply(stream: IO[bytes]) -> bytes:
    line = stream.readline().rstrip(b"\r\n")
    if line[:1] == b"$":
        return stream.read(int(line[1:]) + 2)[:-2]
    if line[:1] not in (b"+", b":"):
        raise OSError(f"redis answered {line!r}")
    return line[1:]


def redis_command(port: int, *args: str, timeout: float = REQUEST_TIMEOUT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(resp(*args))
        return read_reply(sock.makefile("rb"))


@dataclass
class RunningApp:
    name: str
    proc: subprocess.Popen[str]
    work: Path
    members: Callable[[], list[int]]  # the pids to park
    ping: Callable[[], object]  # one small request
    digest: Callable[[], bytes]  # the app's whole state, through its own interface
    problems: Callable[[], list[str]]  # what its own logs say went wrong

    def stop(self) -> None:
        """End the app and every member; an nginx worker outlives a SIGKILLed master."""
        try:
            members = self.members()
        except OSError:
            members = []
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(self.proc)


def _wait_until(ready: Callable[[], object], what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            ready()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                reap(proc)
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


def _spawn(argv: list[str], work: Path) -> subprocess.Popen[str]:
    stderr = (work / "stderr.log").open("w")
    try:
        return subprocess.Popen(argv, cwd=work, stdout=subprocess.PIPE, stderr=stderr, text=True)
    finally:
        stderr.close()


def _stderr(work: Path) -> str:
    return (work / "stderr.log").read_text()


def compile_java(out: Path) -> Path:
    subprocess.run(["javac", "-d", str(out), str(HERE / "Server.java")], check=True)
    return out


def start_jvm(work: Path, classes: Path) -> RunningApp:
    """OpenJDK with G1, ~300 MB of byte arrays in a HashMap, threads started and objects churned all the time."""
    port = free_port()
    argv = ["java", "-Xmx1500m", "-XX:+UseG1GC", f"-XX:ErrorFile={work}/hs_err_%p.log", "-cp", str(classes)]
    proc = _spawn([*argv, "Server", str(port)], work)
    try:
        Lines(proc.stdout).wait_for(f"ready {proc.pid}", READY_TIMEOUT)
    except BaseException:
        reap(proc)
        raise

    def problems() -> list[str]:
        text = _stderr(work)
        found = [str(p) for p in work.glob("hs_err_*.log")]
        return found + [line for line in text.splitlines() if "Exception" in line or "Error" in line]

    return RunningApp("jvm", proc, work, lambda: [proc.pid], lambda: http_get(port, "/ping"),
                      lambda: http_get(port, "/digest"), problems)  # fmt: skip


def start_node(work: Path) -> RunningApp:
    """Node.js holding 200k entries in a Map, allocating all the time."""
    port = free_port()
    proc = _spawn(["node", str(HERE / "server.js"), str(port)], work)
    try:
        Lines(proc.stdout).wait_for(f"ready {proc.pid}", READY_TIMEOUT)
    except BaseException:
        reap(proc)
        raise
    return RunningApp("node", proc, work, lambda: [proc.pid], lambda: http_get(port, "/ping"),
                      lambda: http_get(port, "/digest"), lambda: _stderr(work).splitlines())  # fmt: skip


def start_redis(work: Path) -> RunningApp:
    """redis with 100k keys."""
    port = free_port()
    log = work / "redis.log"
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = _spawn([*argv, "--enable-debug-command", "local", "--logfile", str(log), "--dir", str(work)], work)
    _wait_until(lambda: redis_command(port, "PING", timeout=1), "redis", proc)
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
        stream = sock.makefile("rb")
        for batch in range(100):
            keys = range(batch * 1000, batch * 1000 + 1000)
            sock.sendall(b"".join(resp("SET", f"key-{i}", f"value-{i}-" + "x" * (i % 300)) for i in keys))
            for _ in keys:
                read_reply(stream)

    def problems() -> list[str]:
        after_start = log.read_text().split("Ready to accept connections")[-1]
        return [line for line in after_start.splitlines() if "# WARNING" in line or "BUG" in line]

    return RunningApp("redis", proc, work, lambda: [proc.pid], lambda: redis_command(port, "PING"),
                      lambda: redis_command(port, "DEBUG", "DIGEST"), problems)  # fmt: skip


def start_nginx(work: Path) -> RunningApp:
    """nginx, a master and two workers, serving an 8 MiB file."""
    port = free_port()
    (work / "file.bin").write_bytes(os.urandom(8 << 20))
    conf = work / "nginx.conf"
    conf.write_text(f"""
        user root; master_process on; worker_processes 2; daemon off;
        pid {work}/nginx.pid; error_log {work}/error.log info;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
            fastcgi_temp_path {work}/fastcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
            server {{
                listen 127.0.0.1:{port};
                location = /ping {{ return 200 "pong"; }}
                location = /file {{ alias {work}/file.bin; }}
            }}
        }}
        """)  # fmt: skip
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = _spawn([nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)], work)
    _wait_until(lambda: http_get(port, "/ping", timeout=1), "nginx", proc)

    def members() -> list[int]:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        return [proc.pid, *map(int, children)]

    def problems() -> list[str]:
        log = (work / "error.log").read_text().splitlines()
        return [line for line in log if any(level in line for level in ("[crit]", "[alert]", "[emerg]"))]

    return RunningApp("nginx", proc, work, members, lambda: http_get(port, "/ping"),
                      lambda: http_get(port, "/file"), problems)  # fmt: skip
