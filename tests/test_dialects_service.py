"""Issue 15 against a real daemon: Thunder's and Dobby's requests, systemd socket activation, the client alone.

The frames are written here from the layouts (int32 fields in the CPU's
order, little-endian on x86_64 and arm64), and once by a compiled C sender
with its senders' packed structs, not with memcr_client's encoders.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from memcr.dump.codec import COMPRESSORS
from memcr.dump.format import HEADER
from memcr.service.daemon import MAX_CONNECTIONS
from memcr_client import Client
from memcr_client.protocol import Answer
from tests.conftest import CHECKPOINT, RESTORE, RUN_TIMEOUT, Daemon, Lines, activation, memcr_argv, reap, stop
from tests.test_service import free_port
from tests.unit.test_dialects import dump_dir, i32, v2  # the frames, written by hand from the layouts

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID
ROOT = Path(__file__).resolve().parent.parent

if sys.byteorder != "little":
    pytest.skip("the frames below are written little-endian: memcr supports x86_64 and arm64", allow_module_level=True)


def exchange(d: Daemon, *pieces: bytes, gap: float = 0.0, shut: bool = False, size: int = 16) -> bytes:
    """Write `pieces` on one connection, `gap` seconds apart, and return all the daemon sends back (up to `size`
    bytes: more than any answer without a reason)."""
    with d.connect() as sock:
        for i, piece in enumerate(pieces):
            if i and gap:
                time.sleep(gap)
            sock.sendall(piece)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        return sock.recv(size, socket.MSG_WAITALL)


def answer(reply: bytes) -> int:
    assert len(reply) == 4, f"not one answer: {reply!r}"
    return int(struct.unpack("<i", reply)[0])


def frozen(target) -> bool:
    return target.status()["TracerPid"] != "0"


# -- Thunder: 12 bytes with a time limit ----------------------------------------


def test_thunder_requests(daemon, spawn) -> None:
    d = daemon()
    target = spawn("pattern", 32, 2)
    assert answer(exchange(d, i32(CHECKPOINT, target.pid, 60_000))) == OK
    assert frozen(target)
    assert answer(exchange(d, i32(CHECKPOINT, target.pid, 60_000))) == INVALID_PID
    assert answer(exchange(d, i32(RESTORE, target.pid, 60_000))) == OK
    assert answer(exchange(d, i32(RESTORE, target.pid, 0))) == INVALID_PID  # 0: no limit of its own
    assert target.verify() == 0


def test_thunder_time_limit_expires(daemon, spawn) -> None:
    d = daemon("-z", "zstd", "-c", "-e")  # slow enough to outlast 200 ms on any machine
    target = spawn("pattern", 512)
    other = spawn("pattern", 8)
    started = time.monotonic()
    assert answer(exchange(d, i32(CHECKPOINT, target.pid, 200))) == ERROR
    assert time.monotonic() - started < 30
    d.out.wait_for(f"pid {target.pid}: checkpoint failed")
    assert not frozen(target)
    assert list(d.dump_dir.iterdir()) == []
    # the limit was that request's: the next one, in v1, has none
    assert d.code(CHECKPOINT, other.pid) == OK
    assert d.code(RESTORE, other.pid) == OK
    assert target.verify() == 0
    assert other.verify() == 0


def test_thunder_is_answered_by_its_time_limit(daemon, spawn) -> None:
    """Thunder gives up at its limit: the -1 must reach it by then, and the rollback of a large target follow."""
    d = daemon("-z", "zstd", "-c")  # 1 GiB through zstd and MD5: far longer than the limit on any machine
    target = spawn("pattern", 1024)
    limit_ms, margin = 300, 0.150  # generous: two loaded cores, and the answer crosses a socket
    for attempt in range(5):
        with d.connect() as sock:
            started = time.monotonic()  # the client's own clock, from its send
            sock.sendall(i32(CHECKPOINT, target.pid, limit_ms))
            reply = sock.recv(16, socket.MSG_WAITALL)
            took = time.monotonic() - started
        assert answer(reply) == ERROR, attempt
        assert took < limit_ms / 1000 + margin, f"attempt {attempt}: answered after {took * 1000:.0f} ms"
        d.out.wait_for(f"pid {target.pid}: checkpoint took longer than its time limit of 0.3 s: answered -1")
        d.out.wait_for(f"pid {target.pid}: checkpoint failed")  # the rollback, after the answer
        assert not frozen(target)
    assert list(d.dump_dir.iterdir()) == []
    assert target.verify() == 0


def test_a_sender_that_splits_its_12_bytes_is_read_as_v1(daemon, spawn) -> None:
    """Bytes that come after the first 8 were read are not waited for: the request was v1, with no time limit."""
    d = daemon()
    target = spawn("pattern", 8)
    with d.connect() as sock:
        sock.sendall(i32(CHECKPOINT, target.pid))
        d.out.wait_for(f"asks: checkpoint pid {target.pid} (v1)")
        sock.sendall(i32(1))  # 1 ms, which the checkpoint would outlast: too late to count
        assert answer(sock.recv(16, socket.MSG_WAITALL)) == OK
    assert frozen(target)
    assert d.code(RESTORE, target.pid) == OK
    assert target.verify() == 0


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_each_form_is_read_from_what_arrived(daemon, spawn, over: str) -> None:
    """A v1 client sends 8 bytes and waits with its connection open; Thunder writes 12 at once; both are answered."""
    d = daemon(listen=str(free_port())) if over == "tcp" else daemon()
    gone = gone_pid(spawn)
    assert answer(exchange(d, i32(RESTORE, gone))) == INVALID_PID
    d.out.wait_for(f"asks: restore pid {gone} (v1)")
    assert answer(exchange(d, i32(RESTORE, gone, 60_000))) == INVALID_PID
    d.out.wait_for(f"asks: restore pid {gone} (12-byte)")
    assert answer(exchange(d, v2(i32(RESTORE, gone)))) == INVALID_PID
    d.out.wait_for(f"asks: restore pid {gone} (v2)")


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_idle_connections_hold_up_no_request(daemon, spawn, over: str) -> None:
    """More connections that send nothing than the daemon reads at once: a real request is served meanwhile."""
    d = daemon(listen=str(free_port())) if over == "tcp" else daemon()
    target = spawn("pattern", 8)
    idle = [patiently(d.connect) for _ in range(300)]
    assert len(idle) > MAX_CONNECTIONS
    try:
        assert d.code(CHECKPOINT, target.pid) == OK
        assert frozen(target)
        assert d.code(RESTORE, target.pid) == OK
        for conn in idle:  # the daemon closed none of them to serve the requests
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):  # open and silent; a closed one would read b""
                conn.recv(1)
    finally:
        for conn in idle:
            conn.close()
    assert target.verify() == 0


def test_an_idle_connection_dropped_in_the_round_its_bytes_came_stops_nothing(daemon, spawn) -> None:
    """The oldest idle connection goes for a new one in the very round its first byte came (the daemon is
    stopped meanwhile, so both arrive at once): that round must skip its event, and the daemon serve on."""
    d = daemon(prefix=["prlimit", "--nofile=128:128"])  # half the descriptors: 64 idle connections kept
    assert d.code(RESTORE, 2**31 - 1) == INVALID_PID  # the service loaded: its descriptors, not the idle image's
    daemon_fds = psutil.Process(d.proc.pid)
    before = daemon_fds.num_fds()
    idle = [patiently(d.connect) for _ in range(64)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while daemon_fds.num_fds() < before + 64:  # every one accepted, none dropped yet
            assert time.monotonic() < deadline, "the daemon did not accept 64 connections"
            time.sleep(0.01)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            late = d.connect()  # waits in the backlog: the listener is ready first
            idle[0].send(b"\x01")  # then the oldest idle connection has a byte
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        d.out.wait_for("dropped a connection from")  # the oldest, one way or the other
        target = spawn("pattern", 8)
        assert d.code(CHECKPOINT, target.pid) == OK
        assert d.code(RESTORE, target.pid) == OK
        assert target.verify() == 0
        assert d.proc.poll() is None
        late.close()
    finally:
        for conn in idle:
            conn.close()


def test_clients_beyond_what_the_daemon_reads_wait_in_the_backlog(daemon, spawn) -> None:
    """Connections that sent a first byte and wait for a thread hold descriptors: at most MAX_CONNECTIONS
    wait so, as many as are read at once; the next wait in the kernel's listen backlog, as before."""
    d = daemon()
    daemon_fds = psutil.Process(d.proc.pid)
    bound = daemon_fds.num_fds() + 2 * MAX_CONNECTIONS + 8  # and the one or two accepted as the queue filled
    conns = []
    try:
        for _ in range(2 * MAX_CONNECTIONS + 64):
            conns.append(patiently(d.connect))
            conns[-1].send(b"\x01")  # a request's first byte; the rest never comes
        for _ in range(50):  # a while after the last connect: an unbounded daemon would go on accepting
            assert daemon_fds.num_fds() <= bound
            time.sleep(0.02)
    finally:
        for conn in conns:
            conn.close()
    target = spawn("pattern", 8)  # served again once they are gone
    assert d.code(CHECKPOINT, target.pid) == OK
    assert d.code(RESTORE, target.pid) == OK
    assert target.verify() == 0


def patiently(connect: Callable[[], socket.socket]) -> socket.socket:
    """A connection, asked again while the daemon's backlog is full (a UNIX connect under a timeout says EAGAIN)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        try:
            return connect()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def gone_pid(spawn) -> int:
    """The pid of a process that has ended and been reaped."""
    target = spawn("pattern", 1)
    target.stop()
    return target.pid


def reason_answer(reply: bytes) -> tuple[int, str]:
    """An answer to a request with option 1003: the code, then the reason's length and text, nothing more."""
    code, length = struct.unpack("<ii", reply[:8])
    assert len(reply) == 8 + length, reply
    return code, reply[8:].decode()


def test_reasons_for_v2_and_bare_codes_for_the_others(daemon, spawn, tmp_path: Path) -> None:
    """Option 1003 brings the daemon's reason; v1, 12-byte and V2 requests without it get the 4 bytes as ever."""
    d = daemon()
    missing = gone_pid(spawn)
    # the same failure in every form: the pid of no process
    assert d.request(CHECKPOINT, missing) == i32(INVALID_PID)
    assert exchange(d, i32(CHECKPOINT, missing, 60_000)) == i32(INVALID_PID)
    assert exchange(d, v2(i32(CHECKPOINT, missing))) == i32(INVALID_PID)
    code, reason = reason_answer(exchange(d, v2(i32(CHECKPOINT, missing, 1003, 1)), size=8192))
    assert code == INVALID_PID and f"pid {missing}: checkpoint failed" in reason and str(missing) in reason, reason
    assert "\n" not in reason.strip()
    code, reason = reason_answer(exchange(d, v2(i32(RESTORE, missing, 1003, 1)), size=8192))
    assert (code, reason) == (INVALID_PID, f"answered -2 to the restore of pid {missing}: it is not checkpointed")
    # a dump directory that does not exist, through the real client
    target = spawn("pattern", 16, 1)
    nowhere = tmp_path / "nonexistent"

    def client(*args: object) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "memcr_client", "-l", d.listen, "-p", str(target.pid), *map(str, args)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)

    done = client("-c", "-d", nowhere, "--reason")
    assert done.returncode == 1
    prefix = f"memcr-client: error: pid {target.pid}: memcr answered -1: refused the V2 checkpoint of pid {target.pid}"
    assert done.stderr.startswith(prefix), done.stderr
    assert str(nowhere) in done.stderr and "No such file or directory" in done.stderr, done.stderr
    assert not frozen(target)
    # the forms that carry no reason: where to look instead
    done = client("-c", "-d", nowhere)  # V2 without 1003, as the C daemon takes it
    assert done.stderr == (
        f"memcr-client: error: pid {target.pid}: memcr reported an error (-1): the daemon's log says why\n"
    )
    assert client("-r", "--v1").stderr == (
        f"memcr-client: error: pid {target.pid}: not checkpointed, or its lazy restore is still under way "
        "(the daemon's log says which)\n"
    )
    # a malformed 1003 makes a request the daemon cannot decode: the bare -1, the target untouched
    assert exchange(d, v2(i32(CHECKPOINT, target.pid, 1003, 2)), size=8192) == i32(ERROR)
    assert exchange(d, v2(i32(CHECKPOINT, target.pid, 1003, 1, 1003, 1)), size=8192) == i32(ERROR)
    assert exchange(d, v2(i32(CHECKPOINT, target.pid, 1003)), size=8192) == i32(ERROR)
    assert not frozen(target)
    # a request that succeeds: code 0 and an empty reason
    assert exchange(d, v2(i32(CHECKPOINT, target.pid, 1003, 1))) == i32(OK, 0)
    assert client("-r", "--v2").returncode == 0
    assert target.verify() == 0


# -- Dobby: V2 with a dump directory and a compression ---------------------------


def test_dobby_checkpoint_in_its_own_directory(daemon, spawn, tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir(0o700)
    d = daemon()
    target = spawn("pattern", 64, 2)
    payload = i32(CHECKPOINT, target.pid) + dump_dir(own) + i32(201, 2)
    # header and payload apart, the payload split too, each a while after the other
    assert answer(exchange(d, i32(102, len(payload)), payload[:10], payload[10:], gap=0.2)) == OK
    dump = own / f"pages-{target.pid}.img"
    assert list(own.iterdir()) == [dump]
    assert list(d.dump_dir.iterdir()) == []  # not the daemon's -d
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    flags = HEADER.unpack(dump.read_bytes()[: HEADER.size])[5]
    assert flags & 0xF == COMPRESSORS["zstd"]
    assert answer(exchange(d, v2(i32(RESTORE, target.pid)))) == OK  # Dobby sends restores as V2 too
    assert list(own.iterdir()) == []
    assert answer(exchange(d, v2(i32(RESTORE, target.pid)))) == INVALID_PID  # Dobby: "nothing to wake up"
    assert target.verify() == 0


def test_dobby_compression_none_overrides_the_daemon_s(daemon, spawn) -> None:
    d = daemon("-z", "lz4")
    target = spawn("pattern", 16)
    assert answer(exchange(d, v2(i32(CHECKPOINT, target.pid, 201, 0)))) == OK
    [dump] = d.dump_dir.iterdir()
    assert HEADER.unpack(dump.read_bytes()[: HEADER.size])[5] & 0xF == 0
    assert d.code(RESTORE, target.pid) == OK  # a V2 checkpoint, a v1 restore: any mix works
    assert target.verify() == 0


def test_bad_v2_requests_leave_the_target_untouched(daemon, spawn, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(0o700)
    (tmp_path / "link").symlink_to(good)
    (tmp_path / "file").write_text("")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    theirs = tmp_path / "theirs"
    theirs.mkdir(0o700)
    os.chown(theirs, 65534, 65534)
    d = daemon()
    target = spawn("pattern", 16)
    pid = target.pid
    cases = [
        (v2(i32(CHECKPOINT, pid, 999, 1)), "option 999 is unknown"),
        (v2(i32(CHECKPOINT, pid, 1000, 2)), "the process tree (option 1000) is 1"),
        (v2(i32(CHECKPOINT, pid, 200), str(good).encode()), "not NUL-terminated"),
        (v2(i32(CHECKPOINT, pid), dump_dir("/" + "d" * 1100)), "over 1024 bytes"),
        (v2(i32(CHECKPOINT, pid, 201, 9)), "compression 9 is none of"),
        (v2(i32(CHECKPOINT, pid, 201, 1, 201, 1)), "option 201 is given twice"),
        (i32(102, 9000), "over the limit of 8192"),
        (v2(i32(CHECKPOINT, pid)) + b"!", "more bytes after the V2 request"),
        (v2(i32(CHECKPOINT, pid), dump_dir("dumps")), "is not an absolute path"),
        (v2(i32(CHECKPOINT, pid), dump_dir(tmp_path / "missing")), "No such file or directory"),
        (v2(i32(CHECKPOINT, pid), dump_dir(tmp_path / "link")), "is a symlink"),
        (v2(i32(CHECKPOINT, pid), dump_dir(tmp_path / "file")), "is not a directory"),
        (v2(i32(CHECKPOINT, pid), dump_dir(open_dir)), "writable by users other than its owner"),
        (v2(i32(CHECKPOINT, pid), dump_dir(theirs)), "belongs to"),
    ]
    for frame, reason in cases:
        assert answer(exchange(d, frame)) == ERROR, reason
        assert reason in d.out.wait_for("refused")
        assert not frozen(target), reason
    # a payload cut short: the client stops writing and waits for the verdict
    assert answer(exchange(d, i32(102, 20), i32(CHECKPOINT, pid), shut=True)) == ERROR
    assert "stopped after 8 of 20 bytes" in d.out.wait_for("refused")
    assert [*d.dump_dir.iterdir(), *good.iterdir(), *open_dir.iterdir(), *theirs.iterdir()] == []
    # options belong to a checkpoint: a restore that carries one is refused and the target stays parked
    assert d.code(CHECKPOINT, pid) == OK
    assert answer(exchange(d, v2(i32(RESTORE, pid, 201, 1)))) == ERROR
    assert "applies to checkpoints" in d.out.wait_for("refused the V2 restore")
    assert frozen(target)
    assert answer(exchange(d, v2(i32(RESTORE, pid)))) == OK
    assert target.verify() == 0


# -- the senders' own C structs ----------------------------------------------------

SENDER = r"""
/* Sends one request as the programs that drive memcr lay it out: packed
 * structs of int-sized fields in the CPU's order. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

struct v1 { int cmd; pid_t pid; } __attribute__((packed));
struct timed { int cmd; pid_t pid; int timeout; } __attribute__((packed));

int main(int argc, char **argv)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    unsigned char buf[2048];
    size_t len = 0;
    int cmd = atoi(argv[3]), pid = atoi(argv[4]), fd, code = 99;

    strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
        return 98;
    if (!strcmp(argv[2], "v1")) {
        struct v1 r = { cmd, pid };
        if (write(fd, &r, sizeof(r)) != sizeof(r)) return 97;
    } else if (!strcmp(argv[2], "thunder")) {
        struct timed r = { cmd, pid, atoi(argv[5]) };
        if (write(fd, &r, sizeof(r)) != sizeof(r)) return 97;
    } else {
        struct v1 r = { cmd, pid }, header;
        int id;
        memcpy(buf, &r, sizeof(r));
        len = sizeof(r);
        if (argc > 5) {
            id = 200;
            memcpy(buf + len, &id, sizeof(id));
            len += sizeof(id);
            strcpy((char *)buf + len, argv[5]);
            len += strlen(argv[5]) + 1;
            id = 201;
            memcpy(buf + len, &id, sizeof(id));
            len += sizeof(id);
            id = atoi(argv[6]);
            memcpy(buf + len, &id, sizeof(id));
            len += sizeof(id);
        }
        header.cmd = 102;
        header.pid = (pid_t)len;
        if (write(fd, &header, sizeof(header)) != sizeof(header)) return 97;
        if (write(fd, buf, len) != (ssize_t)len) return 97;
    }
    if (read(fd, &code, sizeof(code)) != sizeof(code))
        return 96;
    printf("%d\n", code);
    return 0;
}
"""


def test_c_senders(daemon, spawn, tmp_path: Path) -> None:
    source = tmp_path / "sender.c"
    source.write_text(SENDER)
    sender = tmp_path / "sender"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(sender), str(source)], check=True)
    own = tmp_path / "own"
    own.mkdir(0o700)
    d = daemon()
    target = spawn("pattern", 16, 1)

    def send(*args: object) -> int:
        done = subprocess.run([sender, d.listen, *map(str, args)], capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, f"sender {args} failed with {done.returncode}"
        return int(done.stdout)

    assert send("v1", CHECKPOINT, target.pid) == OK
    assert send("dobby", RESTORE, target.pid) == OK
    assert send("thunder", CHECKPOINT, target.pid, 60_000) == OK
    assert send("thunder", RESTORE, target.pid, 60_000) == OK
    assert send("dobby", CHECKPOINT, target.pid, own, 1) == OK
    assert [p.name for p in own.iterdir()] == [f"pages-{target.pid}.img"]
    assert send("v1", RESTORE, target.pid) == OK
    assert target.verify() == 0


# -- systemd socket activation -------------------------------------------------------


def activated(socket_path: Path, *args: object) -> subprocess.Popen[str]:
    argv = activation(socket_path, memcr_argv(*args))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def test_socket_activation(spawn, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(0o755)  # made by systemd (DirectoryMode=) before the socket
    path = run / "memcr.sock"
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    target = spawn("pattern", 16, 2)
    proc = activated(path, "-l", path, "-d", dumps, "-g", 0)
    try:
        out = Lines(proc.stdout)
        out.wait_for("socket ready")
        # sent before memcr runs, as a first request starts a socket-activated service: it waits in the backlog
        Client(str(path), timeout=RUN_TIMEOUT).checkpoint(target.pid)
        out.wait_for("-g 0 left to systemd")  # the socket's group and mode are the .socket unit's
        assert "(socket from systemd)" in out.wait_for("listening on")
        assert frozen(target)
        Client(str(path), timeout=RUN_TIMEOUT).restore(target.pid)
        code = stop(proc)
    finally:
        reap(proc)
    assert code == 0
    assert stat.S_ISSOCK(path.lstat().st_mode)  # systemd's file: kept for the next start
    assert target.verify() == 0


def test_socket_activation_for_another_socket_is_refused(tmp_path: Path) -> None:
    passed, named = tmp_path / "passed.sock", tmp_path / "named.sock"
    proc = activated(passed, "-l", named, "-d", tmp_path)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        reap(proc)
    assert proc.returncode == 5  # ExitCode.STORAGE
    assert f"systemd passed the socket {passed} but -l says {named}" in out
    assert "make the .socket unit's ListenStream= and -l name the same socket" in out
    assert not named.exists()


# -- the client, installed alone ------------------------------------------------------


def test_client_installs_alone_and_talks_to_a_daemon(daemon, spawn, tmp_path: Path) -> None:
    # a copy of the folder: the install builds in it, and it must need nothing from the rest of the tree
    source = tmp_path / "src" / "memcr_client"
    shutil.copytree(ROOT / "memcr_client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_TIMEOUT)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=tmp_path,
    ).stdout
    names = {line.split("==")[0].lower() for line in listed.split()}
    assert "memcr-py-client" in names
    assert names <= {"memcr-py-client", "pip", "setuptools"}, names  # nothing of memcr's dependencies
    # run outside the tree, so that nothing of it is importable
    no_engine = subprocess.run([python, "-c", "import memcr"], capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'memcr'" in no_engine.stderr

    d = daemon()
    target = spawn("pattern", 16)
    own = tmp_path / "own"
    own.mkdir(0o700)
    client = venv / "bin" / "memcr-client"

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [client, "-l", d.listen, "-p", str(target.pid), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
        )

    checkpointed = run("-c", "-d", own, "-z", "lz4")
    assert checkpointed.returncode == 0, checkpointed.stderr
    assert [p.name for p in own.iterdir()] == [f"pages-{target.pid}.img"]
    restored = run("-r", "-t", 60)
    assert restored.returncode == 0, restored.stderr
    assert (run("-c", "-r").returncode, run("-r").returncode) == (0, 1)
    assert target.verify() == 0
