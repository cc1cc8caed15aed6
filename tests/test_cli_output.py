"""What the `memcr` command says, and where: exit codes whatever becomes of its output, the JSON lines
(checked field by field against memcr.report.SCHEMA), the log levels, the progress bars.

Every test drives the real `memcr` on real targets.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from memcr.report import OPTION_FIELDS, RSS_KEYS, SCHEMA, SCHEMA_VERSION
from tests.conftest import CHECKPOINT, RESTORE, RUN_TIMEOUT, Memcr, memcr_argv, reap, reports


@contextlib.contextmanager
def started(argv: list[str], **streams: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child memcr, reaped whatever the test does."""
    proc = subprocess.Popen(argv, **streams)
    try:
        yield proc
    finally:
        reap(proc)


def closed_pipe() -> int:
    """The write end of a pipe whose read end is closed: every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


@pytest.mark.parametrize("json_reports", [False, True], ids=["log", "json"])
def test_closed_pipes_keep_the_exit_code(spawn, memcr: Memcr, json_reports: bool) -> None:
    """stdout and stderr whose readers went away: the documented code all the same, and the work done."""
    extra = ["--json"] if json_reports else []
    target = spawn("pattern", 16)
    for args, code in ((["-p", 999999999], 3), (["-p", target.pid], 0), (["-h"], 0), (["--bogus"], 2)):
        out, err = closed_pipe(), closed_pipe()
        try:
            with started(memcr_argv(*args, "-n", "-d", memcr.dump_dir, *extra), stdout=out, stderr=err) as proc:
                os.close(out)
                os.close(err)
                out = err = -1
                assert proc.wait(RUN_TIMEOUT) == code, args
        finally:
            for fd in (out, err):
                if fd >= 0:
                    os.close(fd)
    assert memcr.dumps() == []
    assert target.verify() == 0


def check_report(line: dict[str, Any]) -> None:
    """Every field SCHEMA names for the line's event, with its type, and no other."""
    fields = SCHEMA[line["event"]]
    required = {name for name, kind in fields.items() if not kind.endswith("?")}
    assert required <= set(line) <= set(fields), (line["event"], set(line) ^ set(fields))
    assert line["schema"] == SCHEMA_VERSION
    for name, value in line.items():
        assert is_a(value, fields[name].rstrip("?")), (line["event"], name, value, fields[name])


def is_a(value: object, kind: str) -> bool:
    if "|" in kind:
        return any(is_a(value, one) for one in kind.split("|"))
    simple: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool}
    if kind in simple:
        # bool is an int in Python, not in JSON; a float field may hold a whole number (json writes 0.0, not 0)
        return isinstance(value, simple[kind]) and (kind == "bool") == isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "list[int]":
        return isinstance(value, list) and all(is_a(v, "int") for v in value)
    if kind == "rss":  # {} before the figure exists (rss_restored of a checkpoint)
        return isinstance(value, dict) and set(value) <= set(RSS_KEYS) and all(is_a(v, "int") for v in value.values())
    if kind == "options":
        return (
            isinstance(value, dict)
            and set(value) == set(OPTION_FIELDS)
            and all(is_a(value[name], kind) for name, kind in OPTION_FIELDS.items())
        )
    raise AssertionError(f"SCHEMA names a type the test does not know: {kind}")


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """stdout of `memcr --json`: every line JSON, and SCHEMA's."""
    lines = [json.loads(line) for line in stdout.splitlines()]  # fails on any line that is not JSON
    for line in lines:
        check_report(line)
    return lines


def test_json_stdout_holds_the_reports_alone(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 16, 2)
    result = memcr.run("-p", target.pid, "-n", "--json", "-z", "zstd", "-c", "-e", "-m")
    assert result.returncode == 0, result.stderr
    parked, restored = json_lines(result.stdout)
    assert (parked["event"], restored["event"]) == ("checkpoint", "restore")
    options = {"compress": "zstd", "checksum": True, "cipher": "aes-256-gcm", "lazy": False, "proc_mem": True}
    assert parked["options"] == restored["options"] == {**options, "rss_file": False}
    assert "download took" in result.stderr and f"pid {target.pid} restored" in result.stderr  # the log
    assert target.verify() == 0

    failed = memcr.run("-p", 999999999, "-n", "--json", "-f")
    assert failed.returncode == 3
    [error] = json_lines(failed.stdout)
    assert (error["event"], error["exit_code"], error["options"]["rss_file"]) == ("error", 3, True)
    assert "group" not in error
    assert failed.stderr.startswith("memcr: error: no such process")


def test_json_of_a_tree(spawn, memcr: Memcr) -> None:
    app = spawn("forkserver", 2, 1, 4, 4)
    result = memcr.run("-p", app.pid, "--tree", "-n", "--json", "-z")
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert [line["event"] for line in lines] == ["checkpoint"] * 3 + ["group-checkpoint"] + ["restore"] * 3 + [
        "group-restore"
    ]
    assert all(line["options"]["compress"] == "lz4" for line in lines)
    assert app.verify() == 0


def test_json_of_the_daemon(spawn, daemon) -> None:
    """In its log, each line after the prefix, with the same schema."""
    served = daemon("--json", "-c")
    target = spawn("pattern", 8)
    assert served.code(CHECKPOINT, target.pid) == 0
    assert served.code(RESTORE, target.pid) == 0
    assert served.code(CHECKPOINT, 999999999) != 0
    served.terminate()
    log = served.out.rest()
    found = reports("\n".join(log))
    assert [r["event"] for r in found] == ["checkpoint", "restore", "error"]
    for line in found:
        check_report(line)
    assert all(line.startswith("memcr: ") for line in log if '{"event":' in line)  # lines of its log
    assert found[0]["options"]["checksum"] is True
    assert target.verify() == 0


def test_quiet_and_log_levels(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 8)
    quiet = memcr.run("-p", target.pid, "-n", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")
    info = memcr.run("-p", target.pid, "-n", "--log-level", "info")
    assert info.returncode == 0 and "download took" in info.stdout and "upload took" in info.stdout
    as_quiet = memcr.run("-p", target.pid, "-n", "--log-level", "error", "--json")
    assert as_quiet.returncode == 0 and as_quiet.stderr == ""
    assert [r["event"] for r in json_lines(as_quiet.stdout)] == ["checkpoint", "restore"]  # asked for: shown
    failed = memcr.run("-p", 999999999, "-n", "-q")
    assert failed.returncode == 3 and failed.stdout == ""
    assert failed.stderr.startswith("memcr: error: no such process")  # errors at every level

    session = memcr.interactive("-p", target.pid, "-q")
    prompt = session.wait_prompt()  # shown at -q too: a program waits for it
    assert prompt == f"memcr: pid {target.pid} checkpointed, press enter to restore"
    assert session.press_enter() == 0, session.stderr()
    assert session.out.rest() == [prompt]  # and nothing else
    # a warning is shown at -q too: the dump removed while parked (memcr restores from the copy it holds)
    session = memcr.interactive("-p", target.pid, "-q")
    session.wait_prompt()
    (memcr.dump_dir / f"pages-{target.pid}.img").unlink()
    assert session.press_enter() == 0, session.stderr()
    assert any("warning:" in line and "was removed or replaced" in line for line in session.out.rest())
    assert target.verify() == 0


def test_quiet_daemon_logs_failures_only(spawn, daemon) -> None:
    served = daemon("-q")  # its "listening on" line is shown at every level: the fixture waits for it
    target = spawn("pattern", 8)
    assert served.code(CHECKPOINT, target.pid) == 0
    assert served.code(RESTORE, target.pid) == 0
    assert served.code(CHECKPOINT, 999999999) != 0
    assert served.terminate() == 0
    log = served.out.rest()
    assert [line for line in log if "listening on" not in line] == [
        "memcr: pid 999999999: checkpoint failed: no such process: 999999999"
    ], log
    assert target.verify() == 0


def on_a_terminal(argv: list[str], json_reports: bool) -> tuple[int, str]:
    """memcr with its log on a pseudo-terminal (stdout, or stderr with --json): exit code and what it showed."""
    master, slave = pty.openpty()
    streams: dict[str, Any] = {"stdout": slave, "stderr": subprocess.DEVNULL}
    if json_reports:
        streams = {"stdout": subprocess.DEVNULL, "stderr": slave}
    shown = bytearray()
    try:
        with started(argv, **streams) as proc:
            os.close(slave)
            slave = -1
            deadline = time.monotonic() + RUN_TIMEOUT
            while time.monotonic() < deadline:  # read as it comes: a full terminal would stall memcr
                ready, _, _ = select.select([master], [], [], 1)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: every holder of the terminal closed it
                        raise
                    break
                if not chunk:
                    break
                shown += chunk
            return proc.wait(RUN_TIMEOUT), shown.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("json_reports", [False, True], ids=["stdout", "json-stderr"])
def test_restore_shows_a_progress_bar_as_the_dump_does(spawn, memcr: Memcr, json_reports: bool) -> None:
    """A dump of 256 MiB or more: a bar while dumping and one while restoring, where the log goes."""
    target = spawn("pattern", 256)
    extra = ["--json"] if json_reports else []
    code, shown = on_a_terminal(memcr_argv("-p", target.pid, "-n", "-d", memcr.dump_dir, *extra), json_reports)
    assert code == 0, shown
    assert "memcr: dumping" in shown and "memcr: restoring" in shown, shown
    assert shown.index("memcr: dumping") < shown.index("memcr: restoring")
    assert "100%" in shown.split("memcr: restoring", 1)[1], shown  # the bar reached its end
    assert target.verify() == 0


@pytest.mark.parametrize("stage", ["memcr: dumping", "memcr: restoring"])
def test_a_terminal_that_goes_away_mid_bar_costs_nothing(spawn, memcr: Memcr, stage: str) -> None:
    """The terminal closed while its bar is drawn (SIGHUP ignored, as under nohup): exit 0, target intact."""
    target = spawn("pattern", 512)
    master, slave = pty.openpty()
    argv = memcr_argv("-p", target.pid, "-n", "-z", "zstd", "-c", "-d", memcr.dump_dir)
    try:
        # SIGHUP ignored in memcr (kept through exec): the hang-up does not end it, its writes fail with EIO
        with started(argv, stdout=slave, stderr=slave, preexec_fn=_ignore_hang_up) as proc:
            os.close(slave)
            shown = b""
            while stage.encode() not in shown:
                ready, _, _ = select.select([master], [], [], RUN_TIMEOUT)
                assert ready, shown
                shown += os.read(master, 65536)
            os.close(master)
            master = -1
            assert proc.wait(RUN_TIMEOUT) == 0
    finally:
        if master >= 0:
            os.close(master)
    assert memcr.dumps() == []
    assert target.verify() == 0


def _ignore_hang_up() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
