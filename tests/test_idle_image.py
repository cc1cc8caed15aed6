"""The daemon's two images (memcr.service.idle): `memcr -l` parses and listens, then execs a small image that
waits for the first connection and loads the service then. What crosses that exec, what the working
directory cannot slip in, a stop at any moment around the first connection, and a daemon whose exec fails."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memcr_client.protocol import REQUEST, RESPONSE, Answer
from tests.conftest import CHECKPOINT, RESTORE, RUN_TIMEOUT, Lines, memcr_argv, reap, reports

ROOT = Path(__file__).resolve().parent.parent


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _ask(sock_path: Path, cmd: int, pid: int) -> bytes:
    """One v1 request; the raw answer, b"" for a connection ended without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(RUN_TIMEOUT)
        sock.connect(str(sock_path))
        sock.sendall(REQUEST.pack(cmd, pid))
        try:
            return sock.recv(16, socket.MSG_WAITALL)
        except ConnectionResetError:  # a listener closed with the connection in its backlog
            return b""


def test_the_daemon_serves_from_its_idle_image_with_every_option_it_was_given(daemon, spawn) -> None:
    d = daemon("-z", "-c", "--json", "-q")
    pid = d.proc.pid
    words = _cmdline(pid)
    assert "memcr.service.idle" in " ".join(words)  # the small image, waiting
    assert " ".join(words).endswith(f"memcr -l {d.listen} -d {d.dump_dir} -z -c --json -q")  # pgrep -f "memcr -l"
    target = spawn("pattern", 32, 2)
    assert d.code(CHECKPOINT, target.pid) == Answer.OK
    assert d.code(RESTORE, target.pid) == Answer.OK
    assert target.verify() == 0
    assert d.terminate() == 0
    log = d.out.rest()
    # -q crossed: no step is logged; --json, -z and -c did too: the reports say what the dump was
    assert not [line for line in log if "asks:" in line or "seized" in line], log
    [checkpoint] = [r for r in reports("\n".join(log)) if r["event"] == "checkpoint"]
    options = checkpoint["options"]
    assert (options["compress"], options["checksum"], options["cipher"]) == ("lz4", True, None)
    assert [line for line in log if line == "memcr: stopped"] == []  # -q: "stopped" is a step too


@pytest.mark.parametrize("run", range(12))
def test_a_stop_at_any_moment_around_the_first_connection_ends_the_daemon_cleanly(tmp_path: Path, run: int) -> None:
    """Before the connection, between it and the request, or after the request, at a random moment: the
    daemon answers or ends the connection, exits 0, and leaves neither its socket nor the folder it made."""
    folder = tmp_path / "made"
    sock_path = folder / "d.sock"
    proc = subprocess.Popen(memcr_argv("-l", sock_path, "-d", tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        out = Lines(proc.stdout)
        out.wait_for("listening on")
        sig = (signal.SIGTERM, signal.SIGINT)[run % 2]
        moment = run % 3  # the signal before the connection, before the request, or after it
        answer = None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(RUN_TIMEOUT)
            try:
                if moment == 0:
                    proc.send_signal(sig)
                    time.sleep(random.uniform(0, 0.1))
                client.connect(str(sock_path))
                if moment == 1:
                    time.sleep(random.uniform(0, 0.05))
                    proc.send_signal(sig)
                    time.sleep(random.uniform(0, 0.2))
                client.sendall(REQUEST.pack(RESTORE, 2**31 - 1))
                if moment == 2:
                    time.sleep(random.uniform(0, 0.2))
                    proc.send_signal(sig)
                answer = client.recv(16, socket.MSG_WAITALL)
            except (FileNotFoundError, ConnectionRefusedError, BrokenPipeError, ConnectionResetError):
                pass  # the daemon ended first: its socket is gone, or the connection was ended
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
    log = out.rest()
    assert log[-1] == "memcr: stopped", log
    assert not [line for line in log if "Traceback" in line or "error" in line], log
    assert answer in (None, b"") or RESPONSE.unpack(answer)[0] < 0, answer  # no such pid parked: refused
    assert not folder.exists()


def test_a_memcr_in_the_working_directory_is_not_what_the_idle_image_loads(tmp_path: Path) -> None:
    """The idle image loads memcr from the folder the first image loaded it from, not from its working
    directory, where whoever may write there could have put a package of that name."""
    work = tmp_path / "work"
    (work / "memcr").mkdir(parents=True)
    (work / "memcr" / "__init__.py").write_text("raise SystemExit('a memcr from the working directory ran')\n")
    sock_path = tmp_path / "d.sock"
    # -P: the first image itself takes no module from there; memcr comes from PYTHONPATH, after where a plain
    # `python -c` would put the working directory
    argv = [sys.executable, "-P", "-m", "memcr", "-l", sock_path, "-d", tmp_path]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = Lines(proc.stdout)
        out.wait_for("listening on")
        assert RESPONSE.unpack(_ask(sock_path, RESTORE, 2**31 - 1))[0] < 0  # served by memcr's own service
        assert "memcr.service.idle" in " ".join(_cmdline(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
    assert not [line for line in out.rest() if "working directory ran" in line]


def test_a_daemon_whose_exec_fails_says_so_and_serves_from_its_first_image(tmp_path: Path, spawn) -> None:
    sock_path = tmp_path / "d.sock"
    program = "import sys; sys.executable = '/nonexistent/python'; from memcr.cli import main; main()"
    argv = [sys.executable, "-c", program, "-l", str(sock_path), "-d", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = Lines(proc.stdout)
        out.wait_for("listening on")
        warning = out.wait_for("warning: serving from the process that parsed the options")
        assert "No such file or directory" in warning
        target = spawn("pattern", 16, 2)
        assert _ask(sock_path, CHECKPOINT, target.pid) == RESPONSE.pack(Answer.OK)
        assert _ask(sock_path, RESTORE, target.pid) == RESPONSE.pack(Answer.OK)
        assert target.verify() == 0
        assert "memcr.service.idle" not in " ".join(_cmdline(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
    assert out.rest()[-1] == "memcr: stopped"
    assert not sock_path.exists()


# -- back to the idle image once nothing is held (--unload-after) --------------


def test_the_service_unloads_only_once_nothing_is_held_and_serves_again(daemon, spawn) -> None:
    d = daemon("--unload-after", "1")
    target = spawn("pattern", 16, 2)
    assert d.code(CHECKPOINT, target.pid) == Answer.OK
    time.sleep(2.5)  # parked: held
    assert d.code(RESTORE, target.pid) == Answer.OK
    words = _cmdline(d.proc.pid)
    d.out.wait_for("the service unloads until the next request", timeout=30)
    unloaded = len(d.out.seen)
    assert d.code(CHECKPOINT, target.pid) == Answer.OK  # served again: the service loaded at the request
    assert d.code(RESTORE, target.pid) == Answer.OK
    assert target.verify() == 0
    d.out.wait_for("the service unloads until the next request", timeout=30)
    again = len(d.out.seen)
    assert d.code(RESTORE, 2**31 - 1) == Answer.INVALID_PID  # served by the image the unload exec'd
    assert _cmdline(d.proc.pid) == words  # each exec's command line the first one's, not longer each time
    assert d.terminate() == 0
    log = d.out.rest()
    assert [i for i, line in enumerate(log) if "the service unloads" in line] == [unloaded - 1, again - 1], log
    assert log[-1] == "memcr: stopped"
    assert sum(f"pid {target.pid} restored" in line for line in log) == 2
    assert any(f"pid {target.pid} restored" in line for line in log[:unloaded])  # the first wake, then the unload


def test_a_kept_dump_holds_the_service_until_its_target_ends(daemon, spawn) -> None:
    d = daemon("--unload-after", "1", "--incremental")
    target = spawn("pattern", 16, 2)
    assert d.code(CHECKPOINT, target.pid) == Answer.OK
    assert d.code(RESTORE, target.pid) == Answer.OK
    time.sleep(2.5)  # its dump kept for its next park: held
    assert d.code(CHECKPOINT, target.pid) == Answer.OK
    line = d.out.wait_for(f"pid {target.pid} checkpointed")
    assert d.code(RESTORE, target.pid) == Answer.OK
    target.stop()  # (tracked, its VmFlags show it: its own check would fail) its end frees the kept dump
    d.out.wait_for("the service unloads until the next request", timeout=30)
    log = d.out.seen
    assert [s for s in log if "unchanged since the last restore, in the kept dump already" in s], log  # re-parked
    assert log.index(line) < len(log) - 1 and not [s for s in log[: log.index(line)] if "the service unloads" in s]
    assert d.terminate() == 0


def test_with_unload_after_0_the_service_stays_loaded(daemon, spawn) -> None:
    d = daemon("--unload-after", "0")
    target = spawn("pattern", 16, 2)
    assert d.code(CHECKPOINT, target.pid) == Answer.OK
    assert d.code(RESTORE, target.pid) == Answer.OK
    assert target.verify() == 0
    time.sleep(11)  # past the default's 10 s
    assert d.terminate() == 0
    assert not [line for line in d.out.rest() if "the service unloads" in line]


@pytest.mark.parametrize("run", range(16))
def test_a_request_or_a_stop_as_the_service_unloads_is_never_lost(daemon, spawn, run: int) -> None:
    """A request sent around the unload is answered, by the image before or after it; a stop sent then ends
    the daemon cleanly. Half the runs send it at a random moment of the second around the unload, half within
    40 ms of its line, logged just before the exec: while the idle image starts."""
    d = daemon("--unload-after", "1")
    target = spawn("pattern", 8, 2)
    assert d.code(CHECKPOINT, target.pid) == Answer.OK
    assert d.code(RESTORE, target.pid) == Answer.OK  # nothing held from now: the unload comes 1 s on
    if run % 4 < 2:
        time.sleep(random.uniform(0.6, 1.6))
    else:
        d.out.wait_for("the service unloads until the next request", timeout=30)
        time.sleep(random.uniform(0, 0.04))
    if run % 2:
        d.proc.send_signal((signal.SIGTERM, signal.SIGINT)[run % 8 // 4])
        assert d.proc.wait(RUN_TIMEOUT) == 0
        log = d.out.rest()
        assert log[-1] == "memcr: stopped", log
        assert not Path(d.listen).exists()
    else:
        assert d.code(RESTORE, 2**31 - 1) == Answer.INVALID_PID
        assert d.code(CHECKPOINT, target.pid) == Answer.OK
        assert d.code(RESTORE, target.pid) == Answer.OK
        assert d.terminate() == 0
        log = d.out.rest()
    assert not [line for line in log if "Traceback" in line or "error" in line], log
    assert target.verify() == 0


# -- the hostile review's findings ------------------------------------------------


@pytest.mark.parametrize("run", range(12))
def test_a_stop_while_the_daemon_starts_removes_its_socket_and_folders(tmp_path: Path, run: int) -> None:
    """From the socket's making to the idle image's handlers: the first image's last steps, exec, the idle
    image's start. A stop there killed the daemon and left its files; it now waits for the handlers. Every
    other run probes the kernel for --lazy and --incremental after the socket is made, a longer first step."""
    folder = tmp_path / "a" / "b"
    sock_path = folder / "d.sock"
    probes = ["--lazy", "--incremental"] if run % 4 >= 2 else []
    proc = subprocess.Popen(memcr_argv("-l", sock_path, "-d", tmp_path, *probes), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no socket"
            time.sleep(0.0005)
        time.sleep(random.uniform(0, 0.06))
        proc.send_signal((signal.SIGTERM, signal.SIGINT)[run % 2])
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
    log = Lines(proc.stdout).rest()
    assert log[-1] == "memcr: stopped", log
    assert not [line for line in log if "Traceback" in line or "Error" in line], log
    assert not (tmp_path / "a").exists()


def test_a_socket_path_that_is_not_utf_8_is_said_and_served(tmp_path: Path) -> None:
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/n\xff"))
    sock_path = folder / "d.sock"
    proc = subprocess.Popen(memcr_argv("-l", sock_path, "-d", tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert proc.stdout is not None
        listening = proc.stdout.readline()
        assert listening == b"memcr: created the folder " + bytes(folder) + b" for the socket (mode 0755)\n"
        assert proc.stdout.readline() == b"memcr: listening on " + bytes(sock_path) + b"\n"
        assert RESPONSE.unpack(_ask(sock_path, RESTORE, 2**31 - 1))[0] == Answer.INVALID_PID
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
    assert not os.path.lexists(folder)


def _copied_memcr(tmp_path: Path) -> Path:
    """memcr and its client copied to their own folder, which a test may change as an upgrade would."""
    copy = tmp_path / "install"
    for package in ("memcr", "memcr_client"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return copy


def _from_copy(tmp_path: Path, install: Path, *args: object) -> tuple[subprocess.Popen[str], Lines, Path]:
    """A daemon of the copy `install` (-P: its working directory's modules are not loaded), and its socket."""
    sock_path = tmp_path / "d.sock"
    argv = [sys.executable, "-P", "-m", "memcr", "-l", sock_path, "-d", tmp_path, *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(install)}
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(proc.stdout)
    try:
        out.wait_for("listening on")
    except BaseException:
        reap(proc)
        raise
    return proc, out, sock_path


def _upgrade(install: Path) -> None:
    with (install / "memcr" / "service" / "daemon.py").open("a") as changed:
        changed.write("# the next version\n")


@pytest.mark.parametrize("when", ["idle", "unloaded", "stopped"])
def test_an_upgrade_while_the_service_is_not_loaded_ends_the_daemon_cleanly(tmp_path: Path, spawn, when: str) -> None:
    """memcr's files changed under a daemon that has not loaded its service (at start, or unloaded since): the
    service of the new files with the settings of the old could not be trusted, so the daemon says so at the
    next request and ends, its socket removed, for its supervisor to start it again; or at a stop, as a stop."""
    install = _copied_memcr(tmp_path)
    proc, out, sock_path = _from_copy(tmp_path, install, "--unload-after", 1)
    try:
        if when == "unloaded":
            target = spawn("pattern", 8, 2)
            assert _ask(sock_path, CHECKPOINT, target.pid) == RESPONSE.pack(Answer.OK)
            assert _ask(sock_path, RESTORE, target.pid) == RESPONSE.pack(Answer.OK)
            assert target.verify() == 0
            out.wait_for("the service unloads until the next request")
        _upgrade(install)
        if when == "stopped":
            proc.send_signal(signal.SIGTERM)
        else:
            assert _ask(sock_path, RESTORE, 2**31 - 1) == b""  # ended without an answer
        assert proc.wait(RUN_TIMEOUT) == (0 if when == "stopped" else 1)
    finally:
        reap(proc)
    said = out.rest()
    assert [line for line in said if "memcr: error: memcr's files changed since this daemon started" in line], said
    assert said[-1] == "memcr: stopped" if when == "stopped" else "changed since" in said[-1]
    assert not sock_path.exists()


def test_an_upgrade_while_the_service_is_loaded_keeps_it_loaded(tmp_path: Path, spawn) -> None:
    """Its unload would exec the idle image of the new files: the daemon stays as it is, and says so."""
    install = _copied_memcr(tmp_path)
    proc, out, sock_path = _from_copy(tmp_path, install, "--unload-after", 1)
    try:
        target = spawn("pattern", 8, 2)
        assert _ask(sock_path, CHECKPOINT, target.pid) == RESPONSE.pack(Answer.OK)
        _upgrade(install)
        assert _ask(sock_path, RESTORE, target.pid) == RESPONSE.pack(Answer.OK)
        assert target.verify() == 0
        out.wait_for("warning: memcr's files changed since this daemon started (an upgrade?): its service stays")
        time.sleep(1.5)
        assert _ask(sock_path, RESTORE, 2**31 - 1) == RESPONSE.pack(Answer.INVALID_PID)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
    said = out.rest()
    assert said[-1] == "memcr: stopped" and not [line for line in said if "the service unloads" in line], said


def test_requests_answered_at_once_keep_the_service_loaded(daemon) -> None:
    """A request the accept loop answers without a thread (here a RESTORE of a pid not parked) is being asked:
    one every half second keeps a daemon that unloads after 2 s loaded."""
    d = daemon("--unload-after", "2")
    for _ in range(12):
        assert d.code(RESTORE, 2**31 - 1) == Answer.INVALID_PID
        time.sleep(0.5)
    assert d.terminate() == 0
    assert not [line for line in d.out.rest() if "the service unloads" in line]


def test_the_daemon_keeps_the_name_it_was_started_with(tmp_path: Path) -> None:
    """`pgrep -x memcr`, `killall memcr` and the journal's _COMM find it in either image."""
    sock_path = tmp_path / "d.sock"
    script = Path(sys.executable).parent / "memcr"  # the console script `make install` puts beside the interpreter
    proc = subprocess.Popen([script, "-l", sock_path, "-d", tmp_path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        Lines(proc.stdout).wait_for("listening on")
        comm = Path(f"/proc/{proc.pid}/comm")
        assert "memcr.service.idle" in " ".join(_cmdline(proc.pid)) and comm.read_text() == "memcr\n"
        assert RESPONSE.unpack(_ask(sock_path, RESTORE, 2**31 - 1))[0] == Answer.INVALID_PID
        assert comm.read_text() == "memcr\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        reap(proc)
