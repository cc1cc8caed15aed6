"""The process table and per-process figures through psutil, and psutil's failures as memcr's typed errors.

Rootless: the test's own process and children it starts.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from memcr.engine import admission
from memcr.errors import RightsError, TargetGone
from memcr.system import libc, processes, procfs


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def reaped_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: nothing answers to its pid now
    return proc.pid


def test_own_process() -> None:
    assert processes.alive(os.getpid())
    assert processes.real_uid(os.getpid()) == os.getuid()
    assert os.getpid() in processes.pids()


def test_descriptor_count_counts_those_opened() -> None:
    before = processes.descriptor_count()
    read, write = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        assert processes.descriptor_count() == before + 3
    finally:
        for fd in (read, write, null):
            os.close(fd)
    assert processes.descriptor_count() == before


def test_children_and_parent_links(child: subprocess.Popen[bytes]) -> None:
    assert child.pid in processes.children(os.getpid())
    links = processes.parent_links()
    assert links[child.pid] == os.getpid()
    assert links[os.getpid()] == os.getppid()


def test_a_zombie_is_dead_and_out_of_the_table() -> None:
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while processes.alive(proc.pid):  # exited, not reaped yet: a zombie
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        assert proc.pid not in processes.parent_links()
    finally:
        proc.wait()


def test_gone_is_target_gone() -> None:
    pid = reaped_pid()
    assert not processes.alive(pid)
    for read in (processes.children, processes.real_uid):
        with pytest.raises(TargetGone, match=f"^process {pid} is gone$") as gone:
            read(pid)
        assert (gone.value.pid, gone.value.what) == (pid, "read")
        assert gone.value.errno in (errno.ENOENT, errno.ESRCH)


def test_denied_is_procfs_rights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil's AccessDenied gives the message, path and errno a denied /proc read gives."""
    path = "/proc/4242/status"

    def denied(pid: int) -> None:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        except PermissionError as e:
            raise psutil.AccessDenied(pid) from e

    monkeypatch.setattr(psutil, "Process", denied)
    with pytest.raises(RightsError) as failed:
        processes.real_uid(4242)
    expected = procfs.typed_error(PermissionError(errno.EACCES, "Permission denied"), path, 4242, "read")
    assert str(failed.value) == str(expected)
    assert (failed.value.pid, failed.value.path, failed.value.errno, failed.value.what) == (
        4242,
        path,
        errno.EACCES,
        "read",
    )


def test_without_kcmp_the_vfork_child_shares(monkeypatch: pytest.MonkeyPatch, child: subprocess.Popen[bytes]) -> None:
    """Without kcmp(2), a process blocked in vfork() shares its memory with its children, found in the table."""

    def no_kcmp(*_args: int) -> int:  # a kernel built without CONFIG_KCMP
        raise libc.CallError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(libc, "syscall", no_kcmp)
    monkeypatch.setattr(admission, "_in_vfork", lambda pid: pid == os.getpid())
    assert child.pid in admission.mm_sharers(os.getpid())
