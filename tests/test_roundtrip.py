"""Checkpoint and restore round trips on real targets, verified by the targets."""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RUN_TIMEOUT, Memcr, log_value, reports

MODES = [[], ["-m"], ["-f"], ["-m", "-f"]]


@pytest.mark.parametrize("threads", [0, 8])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: " ".join(m) or "plain")
def test_round_trip(spawn, memcr: Memcr, mode: list[str], threads: int) -> None:
    target = spawn("pattern", 64, threads)
    result = memcr.run("-p", target.pid, "-n", "--json", *mode)
    assert result.returncode == 0, result.stderr
    log = result.stderr  # with --json the log is on stderr, stdout holds the JSON lines alone
    # the human lines are an interface too: scripts written for the C memcr grep them
    assert log_value(log, rf"seized {threads + 1} threads")
    assert log_value(log, r"download took \d+ ms")
    assert log_value(log, r"upload took \d+ ms")
    assert log_value(log, rf"dump \S+/pages-{target.pid}\.img \(\d+ bytes\)")
    assert log_value(log, rf"pid {target.pid} restored")
    parked, restored = reports(result.stdout)
    assert (parked["event"], restored["event"]) == ("checkpoint", "restore")
    assert parked["pid"] == target.pid and parked["threads"] == threads + 1
    assert parked["pages"] >= 64 * 2**20 // parked["page_size"]
    assert parked["dump_path"].endswith(f"pages-{target.pid}.img") and parked["dump_bytes"] > 0
    assert restored["upload_ms"] > 0 and restored["download_ms"] == parked["download_ms"]
    before, after = parked["rss_before"], parked["rss_after"]
    assert after["VmRSS"] < before["VmRSS"]
    assert after["RssAnon"] < before["RssAnon"] / 10
    if "-f" in mode:
        assert after["RssFile"] < before["RssFile"]
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_interactive_frozen_state(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 256)
    before = target.rss_kb()
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    frozen = target.rss_kb()
    assert frozen <= before / 10, (before, frozen)
    assert target.status()["State"].startswith("t")  # tracing stop: frozen
    [dump] = memcr.dumps()
    assert dump.name == f"pages-{target.pid}.img"
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert dump.stat().st_size >= 256 << 20
    assert session.press_enter() == 0, session.stderr()
    assert log_value(session.out.rest(), rf"pid {target.pid} restored")
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_named_parasite_socket(spawn, memcr: Memcr, tmp_path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    target = spawn("pattern", 16)
    session = memcr.interactive("-p", target.pid, "-S", sockets)
    session.wait_prompt()
    path = sockets / f"memcr{target.pid}"
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert session.press_enter() == 0, session.stderr()
    assert not path.exists()
    assert target.verify() == 0


def test_named_parasite_socket_with_group(spawn, memcr: Memcr, tmp_path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    os.chown(sockets, -1, 4321)  # -G's group: the targets' users make their sockets there as its members
    target = spawn("pattern", 16)
    session = memcr.interactive("-p", target.pid, "-S", sockets, "-G", 4321)
    session.wait_prompt()
    st = (sockets / f"memcr{target.pid}").stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 0o660)
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0


IN_ATTRIB, IN_CREATE, IN_DELETE = 0x4, 0x100, 0x200  # <sys/inotify.h>
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows


def inotify(folder: Path) -> int:
    """A descriptor that reports each file made, changed in its mode, owner or group, or removed in `folder`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    assert libc.inotify_add_watch(fd, os.fsencode(folder), IN_ATTRIB | IN_CREATE | IN_DELETE) >= 0
    return fd


def changes(fd: int, name: str) -> list[int]:
    """The events of file `name` reported so far, in order."""
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return []
    masks, at = [], 0
    while at < len(data):
        _, mask, _, length = INOTIFY_EVENT.unpack_from(data, at)
        at += INOTIFY_EVENT.size
        if data[at : at + length].rstrip(b"\0").decode() == name:
            masks.append(mask)
        at += length
    return masks


@pytest.mark.parametrize("gid", [None, 4321])
def test_named_parasite_socket_is_born_with_its_mode(spawn, memcr: Memcr, tmp_path: Path, gid: int | None) -> None:
    """Issue 27's review: the parasite set its socket's mode through its path, which a user who may write in the
    folder could point elsewhere meanwhile. The file is born with its mode, whatever the target's umask, and
    only its group is given afterwards, through a descriptor of the file."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    if gid is not None:
        os.chown(sockets, -1, gid)
    old = os.umask(0o027)  # the target's: the socket's mode owes it nothing, and memcr leaves it as it was
    try:
        target = spawn("pattern", 16)
    finally:
        os.umask(old)
    name = f"memcr{target.pid}"
    watch = inotify(sockets)
    try:
        session = memcr.interactive("-p", target.pid, "-S", sockets, *(["-G", gid] if gid is not None else []))
        session.wait_prompt()
        st = (sockets / name).stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == ((0, 0o600) if gid is None else (gid, 0o660))
        assert target.status()["Umask"] == "0027"
        assert session.press_enter() == 0, session.stderr()
        events = changes(watch, name)
    finally:
        os.close(watch)
    assert events == [IN_CREATE, *([] if gid is None else [IN_ATTRIB]), IN_DELETE]
    assert target.status()["Umask"] == "0027"
    assert target.verify() == 0


def test_group_without_socket_dir_is_refused(memcr: Memcr) -> None:
    result = memcr.run("-p", 1, "-G", 4321)
    assert result.returncode == 2
    assert "-G/--parasite-socket-gid needs -S" in result.stderr


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_round_trip_loads_only_what_it_runs(spawn, memcr: Memcr, lazy: bool) -> None:
    """A device runs memcr to save memory: psutil (1 MiB of RSS) stays out of a single process's round trip,
    and lazy restore's machinery out of an eager one; so does importlib.resources (with zipfile, 1.2 MiB) for
    the parasite's blobs."""
    target = spawn("pattern", 16, 1)
    argv = [sys.executable, "-X", "importtime", "-m", "memcr", "-p", target.pid, "-n", "-d", memcr.dump_dir]
    result = subprocess.run([str(a) for a in argv + (["--lazy"] if lazy else [])], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "memcr.park.checkpoint" in loaded and "memcr.engine.parasite" in loaded
    assert [m for m in loaded if m.split(".")[0] == "psutil"] == []
    assert loaded.isdisjoint({"importlib.resources", "zipfile"})
    assert ("memcr.lazy.server" in loaded) == lazy
    assert target.verify() == 0
