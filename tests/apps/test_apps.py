"""Real apps under load: parked and woken again and again, with every option set.

Each app loads a known dataset, serves requests from a client thread the
whole time, and answers a request sent while it is parked once it wakes.
Its whole state (a digest through its own interface) and its own logs
must come through unchanged. MEMCR_APP_CYCLES sets the round trips per
app (`make test` runs a few, `make test-apps` a hundred).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Lines, Memcr, reap

HERE = Path(__file__).parent
CYCLES = int(os.environ.get("MEMCR_APP_CYCLES", "2"))
OPTION_SETS = [[], ["-z"], ["-z", "zstd", "-c"], ["-e"], ["-m"], ["-f"], ["-z", "-c", "-e", "aes-256-cbc"]]
READY_TIMEOUT = 120
REQUEST_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = REQUEST_TIMEOUT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while piece := sock.recv(1 << 16):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
    return body


def redis_command(port: int, *args: str, timeout: float = REQUEST_TIMEOUT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(resp(*args))
        return read_reply(sock.makefile("rb"))


def resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_reply(stream) -> bytes:
    line = stream.readline().rstrip(b"\r\n")
    if line[:1] == b"$":
        return stream.read(int(line[1:]) + 2)[:-2]
    assert line[:1] in (b"+", b":"), line
    return line[1:]


class Load(threading.Thread):
    """A client sending requests the whole time; every one must be answered."""

    def __init__(self, request: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.request = request
        self.stopping = threading.Event()
        self.done = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set() and self.done < 1_000_000:
            try:
                self.request()
                self.done += 1
            except Exception as e:  # every failure is reported by the test
                self.failures.append(repr(e))
            time.sleep(0.005)

    def finish(self) -> None:
        self.stopping.set()
        self.join(REQUEST_TIMEOUT * 2)
        assert not self.failures, self.failures[:5]
        assert self.done > 0


def park_cycles(memcr: Memcr, pids: Callable[[], list[int]], request: Callable[[], None]) -> None:
    """Park and wake every member CYCLES times, cycling through the option sets.

    In every round trip a request is sent while the member is parked; it
    must be answered after the wake-up.
    """
    for cycle in range(CYCLES):
        options = OPTION_SETS[cycle % len(OPTION_SETS)]
        for pid in pids():
            session = memcr.interactive("-p", pid, *options)
            session.wait_prompt()
            answered: list[BaseException | None] = []

            def ask(out: list[BaseException | None] = answered) -> None:
                try:
                    request()
                    out.append(None)
                except BaseException as e:  # handed to the test
                    out.append(e)

            asking = threading.Thread(target=ask, daemon=True)
            asking.start()
            time.sleep(0.05)
            assert session.press_enter() == 0, f"cycle {cycle} {options}: {session.stderr()}"
            asking.join(REQUEST_TIMEOUT)
            assert answered == [None], f"cycle {cycle} {options}: the request sent while parked: {answered}"


class App:
    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.stderr_path = cwd / "stderr.log"
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self.stderr_path.open("w"), text=True, env=env
        )
        self.out = Lines(self.proc.stdout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Callable[..., App]]:
    started: list[App] = []

    def start(argv: list[str], **kwargs) -> App:
        app = App(argv, tmp_path, **kwargs)
        started.append(app)
        return app

    yield start
    for app in started:
        reap(app.proc)


@pytest.fixture(scope="session")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("java")
    subprocess.run(["javac", "-d", str(out), str(HERE / "Server.java")], check=True)
    return out


def test_jvm(apps, memcr: Memcr, java_classes: Path, tmp_path: Path) -> None:
    port = free_port()
    argv = ["java", "-Xmx1500m", "-XX:+UseG1GC", f"-XX:ErrorFile={tmp_path}/hs_err_%p.log", "-cp", str(java_classes)]
    app = apps([*argv, "Server", str(port)])
    app.out.wait_for(f"ready {app.proc.pid}", READY_TIMEOUT)
    before = http_get(port, "/digest")
    load = Load(lambda: http_get(port, "/ping"))
    load.start()
    park_cycles(memcr, lambda: [app.proc.pid], lambda: http_get(port, "/ping"))
    load.finish()
    assert http_get(port, "/digest") == before
    assert app.proc.poll() is None
    assert not list(tmp_path.glob("hs_err_*.log"))
    assert "Exception" not in app.stderr() and "Error" not in app.stderr(), app.stderr()[-3000:]


def test_node(apps, memcr: Memcr, tmp_path: Path) -> None:
    port = free_port()
    app = apps(["node", str(HERE / "server.js"), str(port)])
    app.out.wait_for(f"ready {app.proc.pid}", READY_TIMEOUT)
    before = http_get(port, "/digest")
    load = Load(lambda: http_get(port, "/ping"))
    load.start()
    park_cycles(memcr, lambda: [app.proc.pid], lambda: http_get(port, "/ping"))
    load.finish()
    assert http_get(port, "/digest") == before
    assert app.stderr() == ""


def test_redis(apps, memcr: Memcr, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "redis.log"
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    app = apps([*argv, "--enable-debug-command", "local", "--logfile", str(log), "--dir", str(tmp_path)])
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if redis_command(port, "PING", timeout=1) == b"PONG":
                break
        except OSError:
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
        stream = sock.makefile("rb")
        for batch in range(100):
            keys = range(batch * 1000, batch * 1000 + 1000)
            sock.sendall(b"".join(resp("SET", f"key-{i}", f"value-{i}-" + "x" * (i % 300)) for i in keys))
            for _ in keys:
                assert read_reply(stream) == b"OK"
    before = redis_command(port, "DEBUG", "DIGEST")
    load = Load(lambda: redis_command(port, "INCR", "counter"))
    load.start()
    park_cycles(memcr, lambda: [app.proc.pid], lambda: redis_command(port, "PING"))
    load.finish()
    redis_command(port, "DEL", "counter")
    assert redis_command(port, "DEBUG", "DIGEST") == before
    text = log.read_text()
    assert "# WARNING" not in text.split("Ready to accept connections")[-1], text[-2000:]


def test_nginx_member_by_member(apps, memcr: Memcr, tmp_path: Path) -> None:
    port = free_port()
    payload = os.urandom(8 << 20)
    (tmp_path / "file.bin").write_bytes(payload)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
        user root; master_process on; worker_processes 2; daemon off;
        pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log info;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
            server {{
                listen 127.0.0.1:{port};
                location = /ping {{ return 200 "pong"; }}
                location = /file {{ alias {tmp_path}/file.bin; }}
            }}
        }}
        """
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    app = apps([nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)])
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            http_get(port, "/ping", timeout=1)
            break
        except (OSError, AssertionError):
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)

    def members() -> list[int]:
        master = app.proc.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return [master, *map(int, children)]

    assert len(members()) == 3
    digest = hashlib.sha256(payload).digest()
    load = Load(lambda: http_get(port, "/ping"))
    load.start()
    park_cycles(memcr, members, lambda: http_get(port, "/ping"))
    load.finish()
    assert hashlib.sha256(http_get(port, "/file")).digest() == digest
    log = (tmp_path / "error.log").read_text().splitlines()
    errors = [line for line in log if any(level in line for level in ("[crit]", "[alert]", "[emerg]"))]
    assert not errors, errors
