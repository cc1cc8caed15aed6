"""Service mode against a real daemon, real targets, real users, groups and namespaces."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memcr_client import Client, MemcrClientError
from memcr_client.protocol import REQUEST, RESPONSE, Answer
from tests.conftest import CHECKPOINT, RESTORE, RUN_TIMEOUT, Daemon, Lines, as_user, reap

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(*args: object, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "memcr_client", *[str(a) for a in args]]
    if user:
        argv = as_user(user, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def listens_on_loopback_only(port: int) -> bool:
    """From /proc/net/tcp: every listening socket on `port` is bound to 127.0.0.1."""
    addresses = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            addresses.append(ip)
    return addresses == ["0100007F"]


# -- the wire protocol --------------------------------------------------------


def test_exact_bytes_round_trip(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 32, 2)
    assert d.request(CHECKPOINT, target.pid) == struct.pack("<i", 0)
    assert target.status()["TracerPid"] != "0"
    assert d.request(RESTORE, target.pid) == struct.pack("<i", 0)
    assert target.verify() == 0


def test_invalid_pid_answers(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 16)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert d.code(RESTORE, target.pid) == INVALID_PID  # not checkpointed
    assert d.code(CHECKPOINT, gone.pid) == INVALID_PID  # no such process
    assert d.code(CHECKPOINT, 0) == INVALID_PID
    assert d.code(CHECKPOINT, -7) == INVALID_PID
    assert d.code(CHECKPOINT, d.proc.pid) == INVALID_PID  # the daemon itself
    assert d.code(CHECKPOINT, target.pid) == OK
    assert d.code(CHECKPOINT, target.pid) == INVALID_PID  # already checkpointed
    assert d.code(RESTORE, target.pid) == OK
    assert d.code(RESTORE, target.pid) == INVALID_PID
    assert target.verify() == 0


def test_garbage_is_refused_and_others_are_served(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 64, 2)
    assert d.code(7, target.pid) == ERROR  # unknown command
    assert d.request(0, 0, payload=b"\x64\x00") == b""  # short request: closed
    # 13 bytes: neither 8 (v1) nor 12 (Thunder's form)
    assert d.request(0, 0, payload=REQUEST.pack(CHECKPOINT, target.pid) + b"junk!") == RESPONSE.pack(ERROR)
    silent = d.connect()  # connects and says nothing
    half = d.connect()
    half.sendall(b"\x64\x00\x00")  # half a request, then hangs
    try:
        assert d.code(CHECKPOINT, target.pid) == OK
        assert d.code(RESTORE, target.pid) == OK
    finally:
        silent.close()
        half.close()
    assert target.verify() == 0
    assert d.proc.poll() is None


def test_client_cli_and_library(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 16)
    result = client("-l", d.listen, "-p", target.pid, "-c", "-r")
    assert result.returncode == 0, result.stderr
    result = client("-l", d.listen, "-p", target.pid, "--restore")
    assert result.returncode == 1
    assert "not checkpointed" in result.stderr
    api = Client(d.listen)
    api.checkpoint(target.pid)
    with pytest.raises(MemcrClientError) as again:
        api.checkpoint(target.pid)
    assert again.value.code == INVALID_PID
    api.restore(target.pid)
    assert target.verify() == 0
    refused = client("-l", str(Path(d.listen).parent / "nobody.sock"), "-p", target.pid, "-c")
    assert refused.returncode == 1
    assert "no memcr daemon listens" in refused.stderr


def test_client_takes_host_port_and_memcr_location(daemon, spawn) -> None:
    port = free_port()
    daemon(listen=f"127.0.0.1:{port}")
    target = spawn("pattern", 16)
    Client(f"127.0.0.1:{port}").checkpoint(target.pid)
    env = {**os.environ, "MEMCR_LOCATION": str(port)}
    argv = [sys.executable, "-m", "memcr_client", "-p", str(target.pid), "--restore"]  # no -l
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


def mapped_libraries(pid: int, *parts: str) -> set[str]:
    """The shared libraries and extension modules mapped into `pid` whose path has one of `parts` in it."""
    paths = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if ".so" in line}
    return {path for path in paths if any(part in path for part in parts)}


def test_idle_daemon_loads_codecs_on_first_use(daemon, spawn) -> None:
    """The codecs and the cipher are not in an idle daemon's memory; its first -z/-e checkpoint loads them."""
    d = daemon("-z", "zstd", "-e")
    # bz2 and lzma come with shutil and tempfile, which ctypes.util imports for python-ptrace: not idle either
    assert not mapped_libraries(d.proc.pid, "/zstandard/", "/lz4/", "/cryptography/", "_bz2", "_lzma")
    target = spawn("pattern", 32, 2)
    assert d.code(CHECKPOINT, target.pid) == OK
    assert d.code(RESTORE, target.pid) == OK
    assert target.verify() == 0
    assert mapped_libraries(d.proc.pid, "/zstandard/") and mapped_libraries(d.proc.pid, "/cryptography/")


# -- concurrency, aborts, time limits, deaths, shutdown ------------------------


def test_sixteen_targets_in_parallel(daemon, spawn) -> None:
    d = daemon()
    targets = [spawn("pattern", 16, 1) for _ in range(16)]
    codes: dict[int, list[int]] = {}

    def drive(pid: int) -> None:
        codes[pid] = [d.code(CHECKPOINT, pid)]
        time.sleep(0.2)
        codes[pid].append(d.code(RESTORE, pid))

    threads = [threading.Thread(target=drive, args=(t.pid,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RUN_TIMEOUT)
    assert all(codes[t.pid] == [OK, OK] for t in targets), codes
    assert [t.verify() for t in targets] == [0] * 16


def test_sixty_four_checkpointed_at_once(daemon, spawn) -> None:
    d = daemon()
    targets = [spawn("pattern", 4) for _ in range(64)]
    for t in targets:
        assert d.code(CHECKPOINT, t.pid) == OK
    assert len(list(d.dump_dir.iterdir())) == 64
    assert all(t.status()["TracerPid"] != "0" for t in targets)  # the tracer is a worker thread
    for t in targets:
        assert d.code(RESTORE, t.pid) == OK
    assert [t.verify() for t in targets] == [0] * 64


def test_restore_during_checkpoint_aborts_it(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 1024)
    replies: list[int] = []
    checkpoint = threading.Thread(target=lambda: replies.append(d.code(CHECKPOINT, target.pid)))
    checkpoint.start()
    deadline = time.monotonic() + 30
    while target.status()["TracerPid"] == "0":
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert d.code(RESTORE, target.pid) == OK  # the target runs on, whole
    checkpoint.join(RUN_TIMEOUT)
    assert replies == [ERROR]  # the checkpoint did not happen
    assert list(d.dump_dir.iterdir()) == []
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0


def test_timeout_rolls_back(daemon, spawn) -> None:
    d = daemon("-t", 1, "-z", "zstd", "-c", "-e")
    target = spawn("pattern", 1024)
    started = time.monotonic()
    assert d.code(CHECKPOINT, target.pid) == ERROR
    assert time.monotonic() - started < 30
    assert target.status()["TracerPid"] == "0"
    assert list(d.dump_dir.iterdir()) == []
    assert target.verify() == 0


@pytest.mark.parametrize("threads", [0, 4])
def test_target_killed_while_checkpointed_is_forgotten(daemon, spawn, threads: int) -> None:
    d = daemon()
    target = spawn("pattern", 16, threads)
    assert d.code(CHECKPOINT, target.pid) == OK
    target.proc.kill()
    deadline = time.monotonic() + 30
    while list(d.dump_dir.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert d.code(RESTORE, target.pid) == INVALID_PID
    d.out.wait_for("died while checkpointed")


def test_sigterm_restores_everything(daemon, spawn, tmp_path: Path) -> None:
    d = daemon()
    targets = [spawn("pattern", 32, 2) for _ in range(3)]
    for t in targets:
        assert d.code(CHECKPOINT, t.pid) == OK
    assert d.terminate() == 0
    assert not Path(d.listen).exists()
    assert list(d.dump_dir.iterdir()) == []
    assert [t.verify() for t in targets] == [0, 0, 0]


def test_other_network_namespace_needs_netns_option(daemon, binaries, tmp_path: Path) -> None:
    # a target in its own network namespace: its abstract socket is not ours
    proc = subprocess.Popen(["unshare", "-n", str(binaries["pattern"]), "16"], stdout=subprocess.PIPE, text=True)
    try:
        Lines(proc.stdout).wait_for("ready")
        without, with_netns = daemon(), daemon("-N", listen=str(tmp_path / "netns.sock"))
        assert without.code(CHECKPOINT, proc.pid) == ERROR
        assert Path(f"/proc/{proc.pid}/status").read_text().count("TracerPid:\t0") == 1
        assert with_netns.code(CHECKPOINT, proc.pid) == OK
        assert with_netns.code(RESTORE, proc.pid) == OK
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(60) == 0
    finally:
        reap(proc)


# -- the seed's three deployments: owners, groups, modes ----------------------


def test_example_1_tcp_on_loopback(daemon, spawn, accounts) -> None:
    port = str(free_port())
    d = daemon(listen=port)
    target = spawn("pattern", 16)
    result = client("-l", port, "-p", target.pid, "-c", "-r", user=accounts["outside_name"])
    assert result.returncode == 0, result.stderr
    assert listens_on_loopback_only(int(port))
    assert target.verify() == 0
    assert d.proc.poll() is None


def test_example_2_unix_socket_follows_umask(public_dir: Path, spawn, accounts) -> None:
    path = public_dir / "memcr.sock"
    dumps = public_dir / "d"
    dumps.mkdir()
    old = os.umask(0o022)
    try:
        d = Daemon(str(path), dump_dir=dumps)
    finally:
        os.umask(old)
    try:
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)
        target = spawn("pattern", 16)
        denied = client("-l", path, "-p", target.pid, "-c", user=accounts["inside_name"])
        assert denied.returncode == 1 and "permission denied" in denied.stderr
        assert client("-l", path, "-p", target.pid, "-c", "-r").returncode == 0
        assert target.verify() == 0
    finally:
        d.terminate()


def test_example_3_groups_on_every_socket(public_dir: Path, spawn, binaries, accounts) -> None:
    run_dir = public_dir / "run"
    run_dir.mkdir()
    # the target's user creates its parasite socket here; the group only, as docs/SECURITY.md
    # has it: a folder every user could write would not protect the daemon's socket in it
    os.chown(run_dir, 0, accounts["gid"])
    os.chmod(run_dir, 0o770)
    path = run_dir / "memcr.sock"
    gid = accounts["gid"]
    dumps = public_dir / "d"
    dumps.mkdir()
    d = Daemon(str(path), "-g", gid, "-S", run_dir, "-G", gid, dump_dir=dumps)
    target_user = accounts["inside_name"]
    argv = as_user(target_user, [str(binaries["pattern"]), "16"], gid)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        Lines(proc.stdout).wait_for("ready")
        st = path.stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
        denied = client("-l", path, "-p", proc.pid, "-c", user=accounts["outside_name"])
        assert denied.returncode == 1 and "permission denied" in denied.stderr
        assert client("-l", path, "-p", proc.pid, "-c", user=target_user).returncode == 0
        parasite = (run_dir / f"memcr{proc.pid}").stat()
        assert (parasite.st_uid, parasite.st_gid) == (accounts["inside"], gid)
        assert stat.S_IMODE(parasite.st_mode) == 0o660
        assert client("-l", path, "-p", proc.pid, "-r", user=target_user).returncode == 0
        assert not (run_dir / f"memcr{proc.pid}").exists()
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(60) == 0
    finally:
        reap(proc)
        stopped = d.terminate()
    assert stopped == 0


@pytest.mark.parametrize(("folder_mode", "step"), [(0o1770, "bind"), (0o1777, "set the owner and mode of")])
def test_a_target_outside_the_parasites_group_is_named(
    public_dir: Path, spawn, accounts, folder_mode: int, step: str
) -> None:
    """Its user may not make its socket in the folder of -S (1770, group GID), or give it group GID (-G)."""
    run_dir = public_dir / "run"
    run_dir.mkdir()
    os.chown(run_dir, 0, accounts["gid"])
    os.chmod(run_dir, folder_mode)
    dumps = public_dir / "d"
    dumps.mkdir()
    d = Daemon(str(public_dir / "memcr.sock"), "-S", run_dir, "-G", accounts["gid"], dump_dir=dumps)
    try:
        user = accounts["outside_name"]
        target = spawn("pattern", 8, user=user)
        assert d.code(CHECKPOINT, target.pid) == ERROR
        line = d.out.wait_for("checkpoint failed")
        group = grp.getgrgid(accounts["gid"]).gr_name
        assert (
            f"process {target.pid}'s user {user} (uid {accounts['outside']}) is not in group {group} "
            f"(gid {accounts['gid']}), so the parasite could not {step} its socket {run_dir}/memcr{target.pid}: "
        ) in line
        assert f"add it to the group (usermod -aG {group} {user}) and start process {target.pid} again" in line
        assert target.status()["TracerPid"] == "0"
        assert target.verify() == 0
    finally:
        d.terminate()


def test_sigkill_of_the_daemon_kills_its_frozen_targets(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 32, 2)
    bystander = spawn("pattern", 8)
    assert d.code(CHECKPOINT, target.pid) == OK
    d.proc.kill()
    d.proc.wait()
    # PTRACE_O_EXITKILL: no target runs on with its pages dropped
    assert target.proc.wait(30) == -signal.SIGKILL
    assert bystander.verify() == 0


def test_client_library_stands_alone() -> None:
    code = "import sys, memcr_client; sys.exit(any(m.split('.')[0] == 'memcr' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
