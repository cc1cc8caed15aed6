"""Fixtures: compiled targets, real target processes and real memcr runs.

Every process a test starts is killed and reaped at teardown, also when the
test fails; so are mounts the tests make.

Every test outside tests/unit is an end-to-end test that needs root; run by
another user, those are skipped with the reason, and tests/unit runs alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from memcr.errors import TargetGone
from memcr.system import procfs
from memcr_client.protocol import CMD_CHECKPOINT, CMD_RESTORE, REQUEST, RESPONSE

TARGETS = Path(__file__).parent / "targets"
UNIT = Path(__file__).parent / "unit"
READY_TIMEOUT = 60
RUN_TIMEOUT = 180
PROMPT = "press enter to restore"
CGROUP2 = procfs.cgroup2_mount()
NEEDS_ROOT = (
    "needs root: ptrace of other processes, their /proc/<pid>/mem and pagemap, mounts, other users and capabilities"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: an end-to-end test that needs root (every test outside tests/unit)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test outside tests/unit as needing root; skip those when not root."""
    for item in items:
        if UNIT in item.path.parents:
            continue
        item.add_marker(pytest.mark.root)
        if os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=NEEDS_ROOT))


@pytest.fixture(scope="session")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("targets")
    built = {}
    for source in sorted(TARGETS.glob("*.c")):
        binary = out / source.stem
        subprocess.run(
            ["gcc", "-O2", "-pthread", "-Wall", "-Werror", "-o", str(binary), str(source)],
            check=True,
        )
        built[source.stem] = binary
    return built


WALL = 0x40000000  # waitpid's __WALL: a traced thread's end too


def reap(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Kill a process if it still runs, and collect it.

    A target that a failed test left traced by this process (memcr run as
    a library) leaves each thread a zombie until its tracer waits for it:
    those are collected first, or waiting for the process would never end.
    """
    if proc.poll() is None or proc.pid in _traced_by_us(proc.pid):  # poll() takes a traced leader's stop for its end
        os.kill(proc.pid, signal.SIGKILL)
    for tid in sorted(_traced_by_us(proc.pid), key=lambda t: t == proc.pid):  # the leader last: it waits for them
        status = _collect(tid)
        if tid == proc.pid and status is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)  # collected here: Popen cannot see it
    proc.wait()


def _collect(tid: int) -> int | None:
    """Wait for a traced thread's end, past a stop not yet waited for: its status (None: collected already)."""
    with contextlib.suppress(ChildProcessError):
        while not os.WIFEXITED(status := os.waitpid(tid, WALL)[1]) and not os.WIFSIGNALED(status):
            pass
        return status
    return None


def _traced_by_us(pid: int) -> list[int]:
    """The threads of `pid`, its leader too, that this process traces (no other process can have the pid then)."""
    ours = procfs.thread_ids(os.getpid())
    tids = []
    with contextlib.suppress(TargetGone):
        for tid in procfs.thread_ids(pid):
            with contextlib.suppress(TargetGone):
                if int(procfs.read_status(f"{pid}/task/{tid}").get("TracerPid", "0")) in ours:
                    tids.append(tid)
    return tids


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Ask a process to end with `sig` and return its exit code; it is killed if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(RUN_TIMEOUT)
    finally:
        reap(proc)


class Lines:
    """Lines of a child's pipe, read by a thread so waits can time out."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None  # a Popen's stdout: None unless it is a pipe
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float = READY_TIMEOUT) -> str:
        line = self.until(needle, timeout)
        if line is None:
            raise AssertionError(f"stream ended before a line with {needle!r}; got {self.seen}")
        return line

    def until(self, needle: str, timeout: float = READY_TIMEOUT) -> str | None:
        """The first line with `needle`, or None when the stream ends before one."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line with {needle!r} within {timeout}s; got {self.seen}") from None
            if line is None:
                self._queue.put(None)  # rest() and later waits see the end too
                return None
            self.seen.append(line)
            if needle in line:
                return line

    def rest(self, timeout: float = 10) -> list[str]:
        """Everything until the stream ends."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                return self.seen
            self.seen.append(line)


class Target:
    """A target process that reports `ready` and verifies itself on SIGUSR1."""

    def __init__(self, argv: list[str], stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out = Lines(self.proc.stdout)
        try:
            self.out.wait_for(f"ready {self.proc.pid}")
        except BaseException:
            self.stop()  # never registered with spawn(): reap it here
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def rss_kb(self) -> int:
        return int(self.status()["VmRSS"].split()[0])

    def running(self) -> bool:
        return self.proc.poll() is None

    def verify(self, timeout: float = 120) -> int:
        """Ask the target to check its memory; its exit code (0 = intact)."""
        self.proc.send_signal(signal.SIGUSR1)
        code = self.proc.wait(timeout)
        if code != 0:
            print("target stderr:", self.proc.stderr.read() if self.proc.stderr else "")
        return code

    def stop(self) -> None:
        reap(self.proc)
        if self.proc.stdin:
            self.proc.stdin.close()

    def said(self, word: str) -> list[list[str]]:
        """The other words of each line it printed that starts with `word`, such as "child 1234"."""
        return [line.split()[1:] for line in self.out.seen if line.startswith(word + " ")]


@pytest.fixture
def spawn(binaries: dict[str, Path]) -> Iterator[Callable[..., Target]]:
    """spawn("pattern", 64, 8) or spawn("pydict") starts a target.

    stdin=True gives it a pipe; user="name" starts it as that user, in the user's groups.
    """
    started: list[Target] = []

    def start(name: str, *args: object, stdin: bool = False, user: str | None = None) -> Target:
        argv = [sys.executable, str(TARGETS / "pydict.py")] if name == "pydict" else [str(binaries[name])]
        argv += [str(a) for a in args]
        target = Target(as_user(user, argv) if user else argv, stdin)
        started.append(target)
        return target

    yield start
    for target in started:
        target.stop()


def memcr_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "memcr", *[str(a) for a in args]]


# What systemd does for a .socket unit, in short: make the listening socket, with SocketUser=, SocketGroup=
# and SocketMode= when given, hand it over as descriptor 3 with LISTEN_FDS=1 and LISTEN_PID = the pid of
# the process it then executes (exec keeps the pid).
ACTIVATE = r"""
import os, shutil, socket, sys
path, user, group, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
if user or group:
    shutil.chown(path, user or None, group or None)
if mode:
    os.chmod(path, int(mode, 8))
sock.listen(16)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
    sock.close()
os.set_inheritable(3, True)  # Python made it close-on-exec; dup2 onto itself would not change that
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
print("socket ready", flush=True)
os.execvp(argv[0], argv)
"""


def activation(path: Path | str, argv: list[str], user: str = "", group: str = "", mode: str = "") -> list[str]:
    """argv started as systemd starts a service for its .socket unit (ACTIVATE)."""
    return [sys.executable, "-c", ACTIVATE, str(path), user, group, mode, *argv]


class Interactive:
    """memcr -p PID in interactive mode, driven through its stdin."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out = Lines(self.proc.stdout)

    def wait_prompt(self) -> str:
        return self.out.wait_for(PROMPT)

    def wait_report(self, event: str) -> dict[str, Any]:
        """With --json, where stdout holds the JSON lines alone (the prompt is in the log, on stderr)."""
        report: dict[str, Any] = json.loads(self.out.wait_for(f'{{"event":"{event}"'))
        return report

    def press_enter(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.wait(RUN_TIMEOUT)

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self) -> None:
        reap(self.proc)


class Memcr:
    """Runs memcr with its dump directory inside the test's tmp_path."""

    def __init__(self, dump_dir: Path) -> None:
        self.dump_dir = dump_dir
        self.started: list[Interactive] = []

    def run(self, *args: object, dump_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = memcr_argv(*args, "-d", dump_dir or self.dump_dir)
        return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)

    def raw(self, *args: object) -> subprocess.CompletedProcess[str]:
        """memcr exactly as given: no -d added."""
        return subprocess.run(memcr_argv(*args), capture_output=True, text=True, timeout=RUN_TIMEOUT)

    def interactive(self, *args: object) -> Interactive:
        session = Interactive(memcr_argv(*args, "-d", self.dump_dir))
        self.started.append(session)
        return session

    def dumps(self) -> list[Path]:
        return sorted(self.dump_dir.glob("pages-*.img"))


def round_trip(target: Target, memcr: Memcr, *args: object) -> str:
    """memcr -p PID -n with args: exit 0, no dump left, and the target finds itself intact."""
    result = memcr.run("-p", target.pid, "-n", *args)
    assert result.returncode == 0, result.stderr
    assert memcr.dumps() == []
    assert target.verify() == 0
    return result.stdout


@pytest.fixture
def memcr(tmp_path: Path) -> Iterator[Memcr]:
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()
    runner = Memcr(dump_dir)
    yield runner
    for session in runner.started:
        session.stop()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """tmpfs("size=16m") mounts a fresh tmpfs and unmounts it at teardown."""
    mounts: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


def reports(text: str) -> list[dict[str, Any]]:
    """The JSON lines memcr prints with --json (in its log, in service mode), in order."""
    found = []
    for line in text.splitlines():
        start = line.find('{"event":')
        if start >= 0:
            found.append(json.loads(line[start:]))
    return found


def log_value(lines: list[str] | str, pattern: str) -> re.Match[str]:
    text = lines if isinstance(lines, str) else "\n".join(lines)
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in memcr's output:\n{text}"
    return match


def as_user(user: str, argv: list[str], gid: int | None = None) -> list[str]:
    """argv run as `user`, in its groups, with the same pid (setpriv executes it).

    The program then runs as the user, without capabilities; but setpriv
    still holds root's until its execve(), so the kernel lets it execute a
    file the user could not (this is how the user reaches this checkout's
    interpreter under /root). A test of who may execute a file runs the
    user's command through runuser instead, as an administrator would.
    """
    import pwd

    primary = gid if gid is not None else pwd.getpwnam(user).pw_gid
    return ["setpriv", f"--reuid={user}", f"--regid={primary}", "--init-groups", *argv]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp dirs are 0700)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="memcr-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Accounts:
    """Users and groups made for a test, with names unique to this run; remove() takes them away again."""

    def __init__(self) -> None:
        self.suffix = str(os.getpid())[-5:]
        self.users: list[str] = []
        self.groups: list[str] = []

    def group(self, prefix: str) -> tuple[str, int]:
        """A new group named PREFIX + this run's suffix: its name and gid."""
        import grp

        name = prefix + self.suffix
        subprocess.run(["groupadd", name], check=True)
        self.groups.append(name)
        return name, grp.getgrnam(name).gr_gid

    def user(self, prefix: str, groups: list[str] | tuple[str, ...] = ()) -> tuple[str, int]:
        """A new user without a home, of primary group nogroup and in `groups`: its name and uid."""
        import pwd

        name = prefix + self.suffix
        subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", *(["-G", ",".join(groups)] if groups else []), name],
                       check=True)  # fmt: skip
        self.users.append(name)
        return name, pwd.getpwnam(name).pw_uid

    def remove(self) -> None:
        for user in reversed(self.users):
            # a process of the user still running would make userdel refuse
            subprocess.run(["pkill", "-KILL", "-u", user], check=False)
            subprocess.run(["userdel", "-f", user], check=False)
        for group in reversed(self.groups):
            subprocess.run(["groupdel", group], check=False)


@pytest.fixture
def made_accounts() -> Iterator[Accounts]:
    """Accounts for the test; removed afterwards, also when it fails."""
    made = Accounts()
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def accounts(made_accounts: Accounts) -> dict[str, int]:
    """A group and two users, one in the group and one outside; removed afterwards."""
    group, gid = made_accounts.group("mcg")
    inside, inside_uid = made_accounts.user("mci", [group])
    outside, outside_uid = made_accounts.user("mco")
    return {
        "gid": gid,
        "inside": inside_uid,
        "outside": outside_uid,
        "inside_name": inside,  # type: ignore[dict-item]
        "outside_name": outside,  # type: ignore[dict-item]
    }


CHECKPOINT, RESTORE = CMD_CHECKPOINT, CMD_RESTORE


class Daemon:
    def __init__(self, listen: str, *args: object, dump_dir: Path, prefix: list[str] | None = None) -> None:
        self.listen = listen
        self.dump_dir = dump_dir
        argv = [*(prefix or []), *memcr_argv("-l", listen, "-d", dump_dir, *args)]  # prefix: prlimit ...
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = Lines(self.proc.stdout)
        try:
            self.out.wait_for("listening on")
        except BaseException:
            reap(self.proc)  # never handed to the test or the daemon fixture: reap it here
            raise

    def request(self, cmd: int, pid: int, payload: bytes | None = None) -> bytes:
        """Send one raw request, return the raw reply (b"" if the daemon closed)."""
        with self.connect() as sock:
            sock.sendall(payload if payload is not None else REQUEST.pack(cmd, pid))
            return sock.recv(16, socket.MSG_WAITALL)

    def code(self, cmd: int, pid: int) -> int:
        reply = self.request(cmd, pid)
        assert len(reply) == RESPONSE.size, reply
        return int(RESPONSE.unpack(reply)[0])

    def connect(self) -> socket.socket:
        if self.listen.isdigit():
            sock = socket.create_connection(("127.0.0.1", int(self.listen)), timeout=RUN_TIMEOUT)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(RUN_TIMEOUT)
            sock.connect(self.listen)
        return sock

    def terminate(self) -> int:
        return stop(self.proc)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    dumps = tmp_path / "dumps"
    dumps.mkdir()

    def start(*args: object, listen: str | None = None, prefix: list[str] | None = None) -> Daemon:
        d = Daemon(listen or str(tmp_path / "memcr.sock"), *args, dump_dir=dumps, prefix=prefix)
        started.append(d)
        return d

    yield start
    for d in started:
        d.terminate()


@pytest.fixture
def cgroup() -> Iterator[Callable[[str], Path]]:
    """cgroup("name") makes a cgroup v2 for the test; its processes go back to the root and it is removed after."""
    assert CGROUP2 is not None
    made: list[Path] = []

    def make(name: str) -> Path:
        path = CGROUP2 / f"memcr-test-{os.getpid()}-{len(made)}-{name}"
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        for folder in [*sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True), path]:
            for pid in (folder / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # ended meanwhile
                    (CGROUP2 / "cgroup.procs").write_text(pid)
            folder.rmdir()
