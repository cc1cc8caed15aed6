"""Every ending of a checkpoint or a restore leaves the target intact, or dead and said so.

Some faults cannot be caused from outside (a write into the target that
fails after the parasite was mapped, a codec that runs out of memory):
those tests run memcr's library in the test process, on a real target,
and make that one step fail.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memcr.dump import codec
from memcr.dump.codec import Coding
from memcr.dump.reader import PlainReader
from memcr.engine import arch, infect
from memcr.engine.tracer import FrozenProcess
from memcr.errors import DumpError, LimitError, MemcrError, TargetKilled
from memcr.options import Options
from memcr.park import checkpoint as checkpoint_module
from memcr.park import parked
from memcr.park.checkpoint import checkpoint
from memcr.system import process_vm
from tests.conftest import CHECKPOINT, REQUEST, RESPONSE, RESTORE, RUN_TIMEOUT, Memcr, memcr_argv, reap, reports

Logs = list[str]


def rwx_mappings(pid: int) -> list[str]:
    """The parasite is the only rwx private mapping the test targets ever have."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if " rwxp " in line]


def intact(target, dumps: Path, blocked: str) -> None:
    """Running, untraced, its signal mask as it was, no trace of the parasite, no dump left, memory as it was."""
    assert target.running()
    status = target.status()
    assert status["TracerPid"] == "0"
    # the main thread waits in sigwait(SIGUSR1), which unblocks that one signal while it waits:
    # that bit alone may differ, by when the status is read
    usr1 = 1 << (signal.SIGUSR1 - 1)
    assert int(status["SigBlk"], 16) | usr1 == int(blocked, 16) | usr1
    assert rwx_mappings(target.pid) == []
    assert list(dumps.glob("pages-*")) == []
    assert target.verify() == 0


@pytest.fixture
def library(tmp_path: Path) -> Iterator[tuple[Callable[..., object], Logs, Path]]:
    """checkpoint() in this process, its log and its dump directory; descriptors are counted around it."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    logs: Logs = []
    before: list[int] = []

    def descriptors() -> int:
        gc.collect()  # what other tests left to the collector is not this test's leak
        return len(os.listdir("/proc/self/fd"))

    def run(pid: int, coding: Coding | None = None) -> object:
        before.append(descriptors())
        return checkpoint(pid, Options(dump_dir=dumps, coding=coding or Coding()), logs.append)

    yield run, logs, dumps
    assert descriptors() == before[0], "a descriptor of memcr's was left open"


def test_blob_write_failing_after_the_map_takes_the_mapping_out(spawn, library, monkeypatch) -> None:
    """The parasite's mapping exists once mmap has run: a failure after it must unmap it again."""
    run, _, dumps = library
    target = spawn("pattern", 16, 2)
    blocked = target.status()["SigBlk"]
    write = infect.FrozenProcess.write

    def failing(self, addr: int, data: bytes) -> None:
        if len(data) > 1000:  # the blob, not the syscall instruction
            raise MemcrError("injected: the blob could not be written")
        write(self, addr, data)

    monkeypatch.setattr(infect.FrozenProcess, "write", failing)
    with pytest.raises(MemcrError, match="injected"):
        run(target.pid)
    monkeypatch.undo()
    intact(target, dumps, blocked)


def test_a_codec_failure_mid_transfer_rolls_back(spawn, library, monkeypatch) -> None:
    """Not only a full disk: any failure while pages are in flight leaves the connection usable."""
    run, _, dumps = library
    target = spawn("pattern", 64, 2)
    blocked = target.status()["SigBlk"]
    encode, calls = codec.FrameCodec.encode, []

    def failing(self, plain, addr):
        calls.append(addr)
        if len(calls) == 20:
            raise MemoryError("injected")
        return encode(self, plain, addr)

    monkeypatch.setattr(codec.FrameCodec, "encode", failing)
    with pytest.raises(MemoryError):
        run(target.pid, Coding(compress="lz4"))
    monkeypatch.undo()
    intact(target, dumps, blocked)


def test_a_failure_after_the_dump_is_written_rolls_back(spawn, library, monkeypatch) -> None:
    """The last steps of a checkpoint (reading the parked RSS) come after the drops: a failure there rolls back."""
    run, _, dumps = library
    target = spawn("pattern", 32, 2)
    blocked = target.status()["SigBlk"]

    def no_descriptors(status: dict[str, str]) -> dict[str, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(checkpoint_module, "rss", no_descriptors)
    with pytest.raises(LimitError, match="ran out of file descriptors"):
        run(target.pid)
    monkeypatch.undo()
    intact(target, dumps, blocked)


def test_a_parasite_that_cannot_be_taken_out_on_restore_means_a_kill(spawn, library, monkeypatch) -> None:
    run, _, dumps = library
    target = spawn("pattern", 16, 2)
    handle = run(target.pid)
    assert isinstance(handle, parked.Parked)

    def failing(self, timeout: float, open_fds: object) -> None:
        raise MemcrError("injected: munmap failed")

    monkeypatch.setattr(infect.BlobThread, "cure", failing)
    with pytest.raises(TargetKilled, match="was killed"):
        handle.restore()
    monkeypatch.undo()
    # memcr, this process, traced it and collected its death: /proc is where to look
    assert not Path(f"/proc/{target.pid}").exists()
    assert list(dumps.glob("pages-*")) == []


def test_closed_stdout_does_not_cost_the_target(spawn, memcr: Memcr) -> None:
    """`memcr ... | head -1`: the log has nowhere to go, the work goes on."""
    target = spawn("pattern", 32, 2)
    blocked = target.status()["SigBlk"]
    proc = subprocess.Popen(
        memcr_argv("-p", target.pid, "-n", "-d", memcr.dump_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.stdout.close()
        code = proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    intact(target, memcr.dump_dir, blocked)


@pytest.fixture
def append_only(tmpfs) -> Iterator[Callable[[str], Path]]:
    """A directory on a fresh tmpfs where files can be created and written but not deleted."""
    made: list[Path] = []

    def make(size: str) -> Path:
        folder = tmpfs(f"size={size}") / "dumps"
        folder.mkdir()
        subprocess.run(["chattr", "+a", str(folder)], check=True)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        subprocess.run(["chattr", "-a", str(folder)], check=True)


def test_an_undeletable_dump_is_a_warning_not_a_failure(spawn, memcr: Memcr, append_only) -> None:
    folder = append_only("256m")
    target = spawn("pattern", 32, 2)
    result = memcr.run("-p", target.pid, "-n", dump_dir=folder)
    assert result.returncode == 0, result.stderr
    assert f"could not delete the dump {folder}/pages-{target.pid}.img" in result.stdout
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0


def test_a_rollback_whose_dump_cannot_be_deleted_leaves_the_target_running(spawn, memcr: Memcr, append_only) -> None:
    """A full disk rolls back; the dump's unlink then fails: the target must run on, not be killed."""
    folder = append_only("8m")
    target = spawn("pattern", 64, 2)
    result = memcr.run("-p", target.pid, "-n", dump_dir=folder)
    assert result.returncode == 5, result.stderr
    assert "no space left" in result.stderr
    assert "could not delete the dump" in result.stdout
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0


def test_a_daemon_out_of_descriptors_keeps_its_parked_target(spawn, tmp_path: Path) -> None:
    """Idle connections use up the daemon's descriptors: its parked target must survive, and be restored."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    sock = tmp_path / "memcr.sock"
    argv = ["prlimit", "--nofile=40:40", *memcr_argv("-l", sock, "-d", dumps, "--json")]
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        target = spawn("pattern", 16, 2)
        assert request(sock, CHECKPOINT, target.pid) == 0
        for _ in range(40):
            idle.append(connect(sock))
        time.sleep(2.5)  # the worker polls whether its target lives every second
        for conn in idle:
            conn.close()
        idle.clear()
        assert request(sock, RESTORE, target.pid) == 0
    finally:
        for conn in idle:
            conn.close()
        daemon.send_signal(signal.SIGTERM)
        try:
            out, _ = daemon.communicate(timeout=RUN_TIMEOUT)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    events = [r["event"] for r in reports(out)]
    assert events == ["checkpoint", "restore"], out[-2000:]
    assert out.count("accept failed") < 100  # it waits for descriptors instead of spinning
    assert target.verify() == 0


def connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(RUN_TIMEOUT)
    conn.connect(str(path))
    return conn


def request(path: Path, cmd: int, pid: int) -> int:
    with connect(path) as conn:
        conn.sendall(REQUEST.pack(cmd, pid))
        return int(RESPONSE.unpack(conn.recv(RESPONSE.size, socket.MSG_WAITALL))[0])


def test_json_reports_a_failure(memcr: Memcr) -> None:
    result = memcr.run("-p", 999999999, "-n", "--json")
    assert result.returncode == 3
    [error] = reports(result.stdout)
    assert error["event"] == "error" and error["operation"] == "checkpoint"
    assert error["exit_code"] == 3 and error["pid"] == 999999999
    assert "no such process" in error["error"]


@pytest.mark.parametrize("coding", [Coding(), Coding(compress="lz4", checksum=True)], ids=["plain", "framed"])
def test_restore_without_process_vm_writev_goes_through_the_parasite(spawn, library, monkeypatch, coding) -> None:
    """Kernels without CONFIG_CROSS_MEMORY_ATTACH: the parasite receives the pages instead."""
    run, _, dumps = library
    target = spawn("pattern", 32, 2)
    blocked = target.status()["SigBlk"]
    handle = run(target.pid, coding)
    assert isinstance(handle, parked.Parked)

    def unavailable(*_: object) -> None:
        raise process_vm.Unavailable("injected: no process_vm_writev")

    monkeypatch.setattr(process_vm, "write_many", unavailable)
    handle.restore()
    monkeypatch.undo()
    intact(target, dumps, blocked)


def test_no_room_to_map_the_dump_restores_through_the_parasite(spawn, library, monkeypatch) -> None:
    """A failure before the first byte moves (here: the dump cannot be mapped) is no reason to kill."""
    run, logs, dumps = library
    target = spawn("pattern", 32, 2)
    blocked = target.status()["SigBlk"]
    handle = run(target.pid)
    assert isinstance(handle, parked.Parked)

    def no_room(*_: object) -> None:
        raise DumpError("injected: cannot map the dump: Cannot allocate memory", errno=errno.ENOMEM)

    monkeypatch.setattr(PlainReader, "readable", no_room)
    handle.restore()
    monkeypatch.undo()
    assert any("through the parasite" in line for line in logs)
    intact(target, dumps, blocked)


@pytest.mark.parametrize("coding", [Coding(), Coding(compress="lz4")], ids=["plain", "framed"])
def test_an_upload_failing_midway_is_rolled_back_through_the_parasite(spawn, library, monkeypatch, coding) -> None:
    """Half the pages written back, then EFAULT: the rollback must not take memcr's own writes for a stranger's."""
    run, _, dumps = library
    target = spawn("pattern", 64, 2)
    blocked = target.status()["SigBlk"]
    handle = run(target.pid, coding)
    assert isinstance(handle, parked.Parked)
    write, calls = process_vm.write_many, []

    def failing(pid: int, pieces: list[tuple[int, int, int]]) -> None:
        calls.append(pieces[0][0])
        if len(calls) == 10:
            raise OSError(errno.EFAULT, "injected")
        write(pid, pieces)

    monkeypatch.setattr(process_vm, "write_many", failing)
    with pytest.raises(OSError, match="injected"):
        handle.restore()
    monkeypatch.undo()
    intact(target, dumps, blocked)


def refuse_decoding_threads(monkeypatch, refused: Callable[[int], bool]) -> list[int]:
    """Make the n-th decoding thread (from 1) fail to start where `refused(n)`, as under a task limit: the numbers
    refused so far."""
    start, tried, refusals = threading.Thread.start, [0], []

    def starting(thread: threading.Thread) -> None:
        if thread.name.startswith("memcr-codec"):
            tried[0] += 1
            if refused(tried[0]):
                refusals.append(tried[0])
                raise RuntimeError("can't start new thread (injected)")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", starting)
    return refusals


@pytest.mark.parametrize("run", range(10))
def test_no_write_outlives_an_upload_whose_thread_could_not_start(spawn, library, monkeypatch, run: int) -> None:
    """A thread pool's submit() that raises because its thread could not start (a task limit) has queued the work
    all the same, and _submit ran it here too: when a write then fails, the queued copy may still be writing in a
    pool thread once the upload is over and the rollback lets the target run. No write may end after the upload.
    Ten runs, the failure and the slow writes after it at random."""
    rng = random.Random(run)
    run_checkpoint, _, dumps = library
    target = spawn("pattern", 16, 2)
    blocked = target.status()["SigBlk"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # three decoding threads, not one
    handle = run_checkpoint(target.pid, Coding(compress="lz4"))
    assert isinstance(handle, parked.Parked)
    failing_call, stall = rng.randint(1, 3), rng.uniform(0.02, 0.1)
    lock, pool_calls, failed, ended = threading.Lock(), [0], threading.Event(), []
    write, upload, writes = process_vm.write_many, parked.upload, [0]

    def writing(pid: int, pieces: list[tuple[int, int, int]]) -> None:
        decoding = threading.current_thread().name.startswith("memcr-codec")
        with lock:
            pool_calls[0] += decoding
            fail = decoding and pool_calls[0] == failing_call
            writes[0] += 1
        if fail:
            failed.set()
            raise OSError(errno.EFAULT, "injected")
        if decoding and failed.is_set():
            time.sleep(stall)  # a queued drain is slow: the others end first, and the upload with them
        elif not decoding and writes[0] > 1:
            failed.wait(0.5)  # the drain run here leaves the pool thread its writes up to the failure
        write(pid, pieces)
        with lock:
            ended.append(time.monotonic())

    def uploading(*args, **kwargs) -> None:
        try:
            upload(*args, **kwargs)
        finally:
            with lock:
                ended.append(-time.monotonic())  # the upload's end, told apart by its sign

    refusals = refuse_decoding_threads(monkeypatch, lambda n: n == 2)
    monkeypatch.setattr(process_vm, "write_many", writing)
    monkeypatch.setattr(parked, "upload", uploading)
    with pytest.raises(OSError, match="injected"):
        handle.restore()
    time.sleep(0.3)  # a write the upload did not wait for ends by now, and is counted
    monkeypatch.undo()
    first_upload_end = next(-t for t in ended if t < 0)
    assert [t for t in ended if t > first_upload_end] == []
    assert refusals == [2]
    intact(target, dumps, blocked)


def test_a_coded_restore_with_no_thread_to_decode_on_goes_through_the_parasite(spawn, library, monkeypatch) -> None:
    """No decoding thread can start (a task limit) and the kernel has no process_vm_writev: the frames are decoded
    in memcr's own thread and go through the parasite's socket; the target comes back whole, not killed."""
    run, _, dumps = library
    target = spawn("pattern", 16, 2)
    blocked = target.status()["SigBlk"]
    handle = run(target.pid, Coding(compress="lz4"))
    assert isinstance(handle, parked.Parked)

    def no_process_vm(pid: int, pieces: list[tuple[int, int, int]]) -> None:
        raise process_vm.Unavailable("the kernel has no process_vm_writev (injected)", errno=errno.ENOSYS)

    refusals = refuse_decoding_threads(monkeypatch, lambda n: True)
    monkeypatch.setattr(process_vm, "write_many", no_process_vm)
    handle.restore()
    monkeypatch.undo()
    assert refusals
    intact(target, dumps, blocked)


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(not PIDS_CGROUP.is_dir(), reason="no cgroup v1 pids controller to limit the daemon's threads")
def test_a_daemon_out_of_threads_keeps_its_parked_target(spawn, tmp_path: Path) -> None:
    """Idle connections take every thread the daemon may start: it refuses them, and still restores."""
    group = PIDS_CGROUP / f"memcr-test-{os.getpid()}"
    group.mkdir()
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    sock = tmp_path / "memcr.sock"
    (group / "pids.max").write_text("40")
    argv = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *memcr_argv("-l", sock, "-d", dumps)]
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        target = spawn("pattern", 16, 2)
        assert request(sock, CHECKPOINT, target.pid) == 0
        for _ in range(60):
            idle.append(connect(sock))
        time.sleep(1)
        alive_meanwhile = daemon.poll() is None
        for conn in idle:
            conn.close()
        idle.clear()
        answer = None
        while answer is None and time.monotonic() < deadline:
            try:
                answer = request(sock, RESTORE, target.pid)
            except (OSError, struct.error):
                time.sleep(0.5)  # a connection it had no thread for: asked again
    finally:
        for conn in idle:
            conn.close()
        daemon.send_signal(signal.SIGTERM)
        try:
            out, _ = daemon.communicate(timeout=RUN_TIMEOUT)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            group.rmdir()
    assert alive_meanwhile, out[-2000:]
    assert answer == 0, out[-2000:]
    assert target.verify() == 0


def test_a_target_a_failed_test_left_frozen_in_this_process_is_still_reaped(spawn) -> None:
    """The suite's own teardown: each thread of a target traced here stays a zombie until its tracer waits
    for it, and a teardown that waited for the process alone hung the whole suite."""
    target = spawn("pattern", 16, 4)
    FrozenProcess.freeze(target.pid, arch.current())  # never released, as by a test that failed midway
    reaper = threading.Thread(target=reap, args=(target.proc,))
    reaper.start()
    reaper.join(RUN_TIMEOUT)
    assert not reaper.is_alive(), "the target's threads were never collected"
    assert target.proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("coding", [Coding(), Coding(compress="lz4")], ids=["plain", "framed"])
def test_a_page_server_that_cannot_start_leaves_nothing_behind(spawn, library, monkeypatch, coding) -> None:
    """A lazy restore whose server threads cannot start is rolled back eagerly, and memcr keeps neither the
    server's pipe nor its mapping of the dump (the fixture counts memcr's descriptors)."""
    run, _, dumps = library
    target = spawn("pattern", 32, 2)
    blocked = target.status()["SigBlk"]
    handle = run(target.pid, coding)
    assert isinstance(handle, parked.Parked)
    start = threading.Thread.start

    def no_threads(self: threading.Thread) -> None:
        if self.name == "memcr-lazy-fill":
            raise RuntimeError("injected: can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_threads)
    with pytest.raises(RuntimeError, match="injected"):
        handle.restore(lazy=True)
    monkeypatch.undo()
    intact(target, dumps, blocked)
    with open("/proc/self/maps") as maps:
        assert [line for line in maps if str(dumps) in line] == []
