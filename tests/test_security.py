"""Self-hardening and non-root operation, with real users, groups and capabilities."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from memcr_client import Client
from tests.conftest import CHECKPOINT, RUN_TIMEOUT, Lines, as_user, memcr_argv, reap, stop

ROOT = Path(__file__).resolve().parent.parent
PTRACE_ATTACH = 16  # <sys/ptrace.h>
ATTACH = f"import ctypes,sys; sys.exit(ctypes.CDLL(None).ptrace({PTRACE_ATTACH}, int(sys.argv[1]), 0, 0) != 0)"


class Process:
    """A memcr started with `argv`, its output readable line by line, stopped at the end."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = Lines(self.proc.stdout)

    def stop(self) -> int:
        return stop(self.proc)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.stop()


def start(processes: list[Process], argv: list[str]) -> Process:
    p = Process(argv)
    processes.append(p)
    return p


# -- hardening ------------------------------------------------------------------


def test_daemon_is_hardened(accounts, public_dir: Path, processes) -> None:
    user = accounts["inside_name"]
    os.chmod(public_dir, 0o1777)  # sticky, as /tmp: memcr refuses a socket folder where others could replace it
    daemon = start(processes, as_user(user, memcr_argv("-l", public_dir / "d.sock", "-d", public_dir)))
    daemon.out.wait_for("listening on")
    pid = daemon.proc.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert [line.split()[-3:-1] for line in limits.splitlines() if line.startswith("Max core")] == [["0", "0"]]
    # undumpable: its /proc entries belong to root although it runs as the user
    assert Path(f"/proc/{pid}/status").stat().st_uid == 0
    assert int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]) == accounts["inside"]
    # and a process of the same user may not trace it
    attach = subprocess.run(as_user(user, [sys.executable, "-c", ATTACH, str(pid)]), timeout=60)
    assert attach.returncode == 1
    assert Path(f"/proc/{pid}/status").read_text().count("TracerPid:\t0") == 1


def test_refuses_to_run_traced(tmp_path: Path) -> None:
    argv = ["strace", "-f", "-o", "/dev/null", *memcr_argv("-l", tmp_path / "d.sock")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 4
    assert "is being traced by process" in result.stderr and "--allow-tracer" in result.stderr
    assert not (tmp_path / "d.sock").exists()


def test_allow_tracer_runs_and_says_what_it_gives_up() -> None:
    argv = ["strace", "-f", "-o", "/dev/null", *memcr_argv("--allow-tracer", "-p", 1)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert "WARNING: --allow-tracer" in result.stdout and "dump key" in result.stdout
    # past the tracer check, memcr goes on to its next refusal: pid 1
    assert result.returncode == 3
    assert "pid 1" in result.stderr


# -- non-root deployment, as docs/SECURITY.md describes it --------------------


@pytest.fixture(scope="module")
def system_install() -> Iterator[tuple[Path, str]]:
    """`make install-system` into a fresh prefix with its own launcher group."""
    group = f"mcl{os.getpid() % 100000}"
    prefix = Path(tempfile.mkdtemp(prefix="memcr-prefix-", dir="/tmp"))
    os.chmod(prefix, 0o755)
    try:
        subprocess.run(
            ["make", "-C", str(ROOT), "install-system", f"PREFIX={prefix}", f"MEMCR_GROUP={group}"],
            check=True,
            capture_output=True,
            timeout=900,
        )
        yield prefix, group
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        subprocess.run(["groupdel", group], check=False)


def test_launcher_holds_only_ptrace_for_its_group(system_install) -> None:
    prefix, group = system_install
    launcher = prefix / "bin" / "memcr"
    st = launcher.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, grp.getgrnam(group).gr_gid, 0o750)
    caps = subprocess.run(["getcap", str(launcher)], capture_output=True, text=True).stdout
    assert "cap_sys_ptrace=ep" in caps


@pytest.fixture
def deployment(system_install, accounts, public_dir: Path) -> Iterator[dict]:
    """Users as in docs/SECURITY.md: the daemon's user in the launcher's group and the
    targets' group; a target of another user in the targets' group; a run directory
    both may write."""
    prefix, launcher_group = system_install
    shared = accounts["gid"]  # the targets' group
    suffix = str(os.getpid())[-5:]
    daemon_user = f"mcd{suffix}"
    subprocess.run(["useradd", "-M", "-N", "-g", launcher_group, "-G", str(shared), daemon_user], check=True)
    try:
        run = public_dir / "run"
        run.mkdir()
        os.chown(run, 0, shared)
        os.chmod(run, 0o770)
        dumps = public_dir / "dumps"
        dumps.mkdir()
        shutil.chown(dumps, daemon_user)
        os.chmod(dumps, 0o700)
        yield {"prefix": prefix, "daemon_user": daemon_user, "target_user": accounts["inside_name"],
               "shared": shared, "run": run, "dumps": dumps}  # fmt: skip
    finally:
        subprocess.run(["pkill", "-KILL", "-u", daemon_user], check=False)
        subprocess.run(["userdel", "-f", daemon_user], check=False)


def start_target(deployment: dict, binaries: dict[str, Path]) -> subprocess.Popen[str]:
    argv = as_user(deployment["target_user"], [str(binaries["pattern"]), "16", "2"], deployment["shared"])
    target = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        Lines(target.stdout).wait_for("ready")
    except BaseException:
        reap(target)
        raise
    return target


def finish_target(target: subprocess.Popen[str]) -> int:
    """Let the target check its memory; its exit code (0: intact)."""
    return stop(target, signal.SIGUSR1)


def test_non_root_daemon_with_capability(binaries, deployment, processes) -> None:
    d = deployment
    sock = d["run"] / "memcr.sock"
    argv = [str(d["prefix"] / "bin" / "memcr"), "-l", str(sock), "-S", str(d["run"]), "-G", str(d["shared"]),
            "-d", str(d["dumps"])]  # fmt: skip
    daemon = start(processes, as_user(d["daemon_user"], argv))
    daemon.out.wait_for("listening on")
    caps = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    assert "CapEff:\t0000000000080000" in caps  # CAP_SYS_PTRACE and nothing else
    target = start_target(d, binaries)
    try:
        client = Client(str(sock))
        client.checkpoint(target.pid)
        parasite = (d["run"] / f"memcr{target.pid}").stat()
        assert (parasite.st_gid, parasite.st_mode & 0o777) == (d["shared"], 0o660)
        assert parasite.st_uid != 0 and parasite.st_uid == Path(f"/proc/{target.pid}").stat().st_uid
        client.restore(target.pid)
    finally:
        intact = finish_target(target)
    assert intact == 0


def test_non_root_daemon_without_capability(binaries, deployment, processes) -> None:
    d = deployment
    sock = d["run"] / "memcr.sock"
    plain_python = [str(d["prefix"] / "venv" / "bin" / "python"), "-I", "-m", "memcr"]
    daemon = start(processes, as_user(d["daemon_user"], [*plain_python, "-l", str(sock), "-d", str(d["dumps"])]))
    daemon.out.wait_for("listening on")
    target = start_target(d, binaries)
    try:
        assert Client(str(sock)).request(CHECKPOINT, target.pid) == -1
        line = daemon.out.wait_for("not permitted to trace")
        assert "CAP_SYS_PTRACE" in line
        assert line.endswith(f"setcap cap_sys_ptrace=ep {d['prefix']}/bin/memcr")  # the launcher, not the script
        assert Path(f"/proc/{target.pid}/status").read_text().count("TracerPid:\t0") == 1
    finally:
        intact = finish_target(target)
    assert intact == 0


def test_proc_mem_refused_without_root(deployment, binaries) -> None:
    d = deployment
    target = start_target(d, binaries)
    try:
        argv = [str(d["prefix"] / "bin" / "memcr"), "-p", str(target.pid), "-n", "-m", "-d", str(d["dumps"])]
        result = subprocess.run(as_user(d["daemon_user"], argv), capture_output=True, text=True, timeout=60)
        assert result.returncode == 4
        assert "needs root" in result.stderr
    finally:
        intact = finish_target(target)
    assert intact == 0


def test_non_root_kills_a_target_it_cannot_restore(binaries, deployment) -> None:
    """Without CAP_KILL memcr may not signal another user's process: it has the target kill itself."""
    d = deployment
    target = start_target(d, binaries)
    argv = [str(d["prefix"] / "bin" / "memcr"), "-p", str(target.pid), "-c", "-d", str(d["dumps"])]
    try:
        memcr = subprocess.Popen(as_user(d["daemon_user"], argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    except BaseException:
        reap(target)
        raise
    try:
        Lines(memcr.stdout).wait_for("press enter to restore")
        dump = d["dumps"] / f"pages-{target.pid}.img"
        with open(dump, "r+b") as f:
            f.seek(dump.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
        assert memcr.stdin is not None
        memcr.stdin.write("\n")
        memcr.stdin.flush()
        assert memcr.wait(RUN_TIMEOUT) == 6
        assert "was killed" in (memcr.stderr.read() if memcr.stderr else "")
        assert target.wait(60) == -signal.SIGKILL
        assert not dump.exists()
    finally:
        reap(memcr)
        reap(target)
