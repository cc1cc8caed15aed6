"""Refusals before anything is touched: clear message, exact exit code, target intact."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import RUN_TIMEOUT, Memcr, reap


def refused(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert text in result.stderr
    assert result.stderr.startswith("memcr: error: ")


@pytest.mark.parametrize("pid", ["0", "-5"])
def test_non_positive_pid(memcr: Memcr, pid: str) -> None:
    refused(memcr.run("-p", pid, "-n"), 2, "positive process id")


def test_missing_pid_option(memcr: Memcr) -> None:
    refused(memcr.run("-n"), 2, "-p PID")


def test_unknown_option(memcr: Memcr) -> None:
    result = memcr.run("--frobnicate")
    assert result.returncode == 2
    assert "frobnicate" in result.stderr


def test_no_such_process(memcr: Memcr) -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid is free
    refused(memcr.run("-p", child.pid, "-n"), 3, f"no such process: {child.pid}")


def test_pid_1(memcr: Memcr) -> None:
    refused(memcr.run("-p", 1, "-n"), 3, "pid 1")


def test_kernel_thread(memcr: Memcr) -> None:
    refused(memcr.run("-p", 2, "-n"), 3, "kernel thread")


def test_zombie(memcr: Memcr) -> None:
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused(memcr.run("-p", child.pid, "-n"), 3, "zombie")
    finally:
        child.wait()


def test_memcr_parent(memcr: Memcr) -> None:
    import os

    refused(memcr.run("-p", os.getpid(), "-n"), 3, "memcr's parent")


def test_memcr_itself(memcr: Memcr) -> None:
    script = f"exec {sys.executable} -m memcr -p $$ -n -d {memcr.dump_dir}"
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    refused(result, 3, "memcr itself")


def test_dump_dir_missing(spawn, memcr: Memcr, tmp_path: Path) -> None:
    target = spawn("pattern", 8)
    refused(memcr.run("-p", target.pid, "-n", dump_dir=tmp_path / "nope"), 5, "does not exist")
    assert target.verify() == 0


def test_dump_dir_is_a_file(spawn, memcr: Memcr, tmp_path: Path) -> None:
    target = spawn("pattern", 8)
    plain = tmp_path / "file"
    plain.write_text("")
    refused(memcr.run("-p", target.pid, "-n", dump_dir=plain), 5, "not a directory")
    assert target.verify() == 0


def test_dump_dir_read_only(spawn, memcr: Memcr, tmpfs) -> None:
    target = spawn("pattern", 8)
    read_only = tmpfs("ro,size=1m")
    refused(memcr.run("-p", target.pid, "-n", dump_dir=read_only), 5, "read-only")
    assert target.verify() == 0


def test_stranger_file_at_dump_path_is_kept(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 8)
    stranger = memcr.dump_dir / f"pages-{target.pid}.img"
    stranger.write_text("not a dump")
    refused(memcr.run("-p", target.pid, "-n"), 5, "move it away")
    assert stranger.read_text() == "not a dump"
    assert target.verify() == 0


def test_symlink_at_dump_path_is_not_followed(spawn, memcr: Memcr, tmp_path: Path) -> None:
    target = spawn("pattern", 8)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (memcr.dump_dir / f"pages-{target.pid}.img").symlink_to(victim)
    refused(memcr.run("-p", target.pid, "-n"), 5, "move it away")
    assert victim.read_text() == "precious"
    assert target.verify() == 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["-p", "1", "-l", "9000"], "exclude each other"),
        (["-p", "1", "-t", "5"], "only applies to service mode"),
        (["-p", "1", "-g", "0"], "only applies to service mode"),
        (["-l", "70000"], "is not a TCP port"),
        (["-l", "9000", "-t", "0"], "positive number of seconds"),
    ],
)
def test_service_option_rules(memcr: Memcr, option: list[str], message: str) -> None:
    refused(memcr.raw(*option), 2, message)


def test_listen_path_that_is_not_a_socket(memcr: Memcr, tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("keep me")
    refused(memcr.raw("-l", plain), 5, "is not a socket")
    assert plain.read_text() == "keep me"


def test_listen_path_symlink_is_not_followed(memcr: Memcr, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "memcr.sock"
    link.symlink_to(victim)
    refused(memcr.raw("-l", link), 5, "is not a socket")
    assert victim.read_text() == "precious" and link.is_symlink()


def test_stale_listen_socket_is_replaced(tmp_path: Path) -> None:
    import socket

    from tests.conftest import Lines, memcr_argv, stop

    path = tmp_path / "memcr.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    daemon = subprocess.Popen(memcr_argv("-l", path), stdout=subprocess.PIPE, text=True)
    try:
        Lines(daemon.stdout).wait_for("listening on")
    finally:
        stopped = stop(daemon)  # SIGTERM, and reaped whatever happens
    assert stopped == 0
    assert not path.exists()


# i386, no libc: say "ready", wait for a byte on stdin, exit 0 (a 32-bit task has no x86_64 syscalls)
COMPAT_TARGET = r"""
static const char ready[] = "ready\n";
static char byte;
void _start(void)
{
	long r;
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(4), "b"(1), "c"(ready), "d"(sizeof(ready) - 1) : "memory");
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(3), "b"(0), "c"(&byte), "d"(1) : "memory");
	__asm__ volatile("int $0x80" : : "a"(1), "b"(byte == 'x' ? 0 : 1));
	for (;;)
		;
}
"""


def compat_program(tmp_path: Path) -> Path:
    if platform.machine() != "x86_64":
        pytest.skip(
            f"a 32-bit target is built with gcc -m32 on x86_64; {platform.machine()} has no such toolchain here"
        )
    source, binary = tmp_path / "compat.c", tmp_path / "compat"
    source.write_text(COMPAT_TARGET)
    built = subprocess.run(
        ["gcc", "-m32", "-O1", "-nostdlib", "-static", "-ffreestanding", "-fno-pic", "-o", binary, source],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    return binary


def test_32_bit_program_is_refused_and_runs_on(memcr: Memcr, tmp_path: Path) -> None:
    """Its registers come in the 32-bit layout: memcr used to inject x86_64 code and kill it with SIGILL."""
    proc = subprocess.Popen([compat_program(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        refused(memcr.run("-p", proc.pid, "-n"), 3, f"process {proc.pid} is a 32-bit program")
        assert memcr.dumps() == []
        proc.communicate(b"x", timeout=RUN_TIMEOUT)
        assert proc.returncode == 0
    finally:
        reap(proc)
