"""Lazy restore (--lazy): the target runs at once and meets its missing pages while memcr fills them.

Each target keeps using its memory in one way (user faults, kernel faults,
fork, mremap/madvise/munmap, signal handlers) from the first instant after
the wake-up, and checks every byte and its own state afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import shlex
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from memcr.park import scan
from memcr.system import procfs
from tests.conftest import CHECKPOINT, RESTORE, Daemon, Memcr, Target, as_user, log_value, memcr_argv, reap, reports
from tests.test_dump_pipeline import mix

MODES = ["touch", "syscalls", "fork", "remap", "signals"]


@pytest.mark.parametrize("mode", MODES)
def test_lazy_round_trip(spawn, memcr: Memcr, mode: str) -> None:
    target = spawn("lazy", 128, mode)
    result = memcr.run("-p", target.pid, "-n", "--lazy", "--json")
    assert result.returncode == 0, result.stderr
    # with --json the log is on stderr
    assert log_value(result.stderr, rf"pid {target.pid} runs again after [\d.]+ ms; its pages come back lazily")
    assert log_value(result.stderr, r"lazy restore took \d+ ms after the wake-up")
    parked, restored = reports(result.stdout)
    assert restored["lazy_ms"] > 0
    assert (parked["options"]["lazy"], restored["options"]["lazy"]) == (True, True)
    assert memcr.dumps() == []
    assert target.verify() == 0


@pytest.mark.parametrize("coding", [["-z"], ["-z", "zstd", "-c"], ["-c", "-e"]], ids=" ".join)
def test_lazy_with_framed_dumps(spawn, memcr: Memcr, coding: list[str]) -> None:
    target = spawn("lazy", 64, "syscalls")
    result = memcr.run("-p", target.pid, "-n", "--lazy", *coding)
    assert result.returncode == 0, result.stderr
    assert "come back lazily" in result.stdout
    assert target.verify() == 0


@pytest.mark.parametrize("threads", [0, 8])
def test_lazy_pattern_workers(spawn, memcr: Memcr, threads: int) -> None:
    """Workers that rewrite their pages in passes find every page as they left it."""
    target = spawn("pattern", 128, threads)
    result = memcr.run("-p", target.pid, "-n", "--lazy")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


def test_stopped_target_is_restored_eagerly(spawn, memcr: Memcr) -> None:
    target = spawn("lazy", 16, "touch")
    os.kill(target.pid, signal.SIGSTOP)
    result = memcr.run("-p", target.pid, "-n", "--lazy")
    assert result.returncode == 0, result.stderr
    assert f"restoring pid {target.pid} eagerly, not lazily: it is stopped" in result.stdout
    assert target.status()["State"].startswith("T")
    os.kill(target.pid, signal.SIGCONT)
    assert target.verify() == 0


def test_group_stop_during_the_lazy_phase(spawn, memcr: Memcr) -> None:
    """SIGSTOP and SIGCONT while memcr still traces the target act as without memcr."""
    target = spawn("lazy", 512, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not target.status()["State"].startswith("T") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert target.status()["State"].startswith("T")
    os.kill(target.pid, signal.SIGCONT)
    assert session.proc.wait(60) == 0, session.stderr()
    assert target.verify() == 0


def test_killing_memcr_mid_stream_kills_the_target(spawn, memcr: Memcr) -> None:
    """The cardinal rule: no page may read as zeros because memcr is gone."""
    target = spawn("lazy", 1024, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    session.proc.kill()
    session.proc.wait(10)
    assert target.proc.wait(10) == -signal.SIGKILL
    assert not [line for line in target.out.seen if "wrong" in line]
    _no_guardian_left(session.proc.pid)


def _no_guardian_left(memcr_pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ours = subprocess.run(["pgrep", "-f", f"PR_SET_PDEATHSIG.* {memcr_pid} [0-9]+$"], capture_output=True)
        if ours.returncode != 0:
            return
        time.sleep(0.05)
    raise AssertionError("memcr's guardian outlived it")


def test_without_userfaultfd_the_restore_is_eager(binaries, memcr: Memcr, accounts, public_dir: Path) -> None:
    """An ordinary user's target may not make a userfaultfd, and this memcr sees no /dev/userfaultfd (one
    the test hides, or a kernel before 6.1): memcr says so at start, and restores eagerly."""
    binary = public_dir / "lazy"
    shutil.copy(binaries["lazy"], binary)
    target = Target(as_user(str(accounts["outside_name"]), [str(binary), "16", "touch"]))
    try:
        argv = memcr_argv("-p", target.pid, "-n", "--lazy", "-d", memcr.dump_dir)
        hide = "mount --bind /dev/null /dev/userfaultfd && " if os.path.exists("/dev/userfaultfd") else ""
        hidden = f"{hide}exec {shlex.join(argv)}"
        result = subprocess.run(["unshare", "-m", "sh", "-c", hidden], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        said = result.stdout.splitlines()
        assert said[0] == (
            "memcr: /dev/userfaultfd is not available here (Linux 6.1); "
            "without it memcr restores such a target eagerly, and says why"
        )
        assert (
            f"restoring pid {target.pid} eagerly, not lazily: the target may not make a userfaultfd "
            "(Operation not permitted)" in result.stdout
        )
        assert memcr.dumps() == []
        assert target.verify() == 0
    finally:
        target.stop()


def test_lazy_for_an_ordinary_users_target(binaries, memcr: Memcr, accounts, public_dir: Path) -> None:
    """A target without CAP_SYS_PTRACE gets its userfaultfd from memcr's /dev/userfaultfd."""
    binary = public_dir / "lazy"
    shutil.copy(binaries["lazy"], binary)
    target = Target(as_user(str(accounts["outside_name"]), [str(binary), "64", "syscalls"]))
    try:
        result = memcr.run("-p", target.pid, "-n", "--lazy")
        assert result.returncode == 0, result.stderr
        if os.path.exists("/dev/userfaultfd"):
            assert "come back lazily" in result.stdout
        else:  # a kernel before 6.1: eager, and memcr names the kernel that would make it lazy
            assert (
                f"restoring pid {target.pid} eagerly, not lazily: the target may not make a userfaultfd "
                "(Operation not permitted) and memcr cannot open /dev/userfaultfd "
                "(there is none here: Linux 6.1 added it)" in result.stdout
            )
        assert target.verify() == 0
    finally:
        target.stop()


@pytest.mark.parametrize("mode", ["plain", "handlers", "pending", "blocking", "seccomp-strict", "trap-thread"])
def test_odd_states_survive_a_lazy_round_trip(spawn, memcr: Memcr, mode: str) -> None:
    """Threads blocked in system calls when frozen resume them, not -ERESTARTSYS; signal state is kept."""
    target = spawn("states", mode)
    result = memcr.run("-p", target.pid, "-n", "--lazy")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


def test_blocked_reader_gets_its_bytes(binaries, memcr: Memcr) -> None:
    """A single-threaded target blocked in read(2) when frozen reads what was written while it was parked."""
    target = subprocess.Popen(
        [str(binaries["lazy"]), "64", "reader"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert target.stdout is not None and target.stdin is not None
        assert target.stdout.readline() == f"ready {target.pid}\n"
        session = memcr.interactive("-p", target.pid, "--lazy")
        session.wait_prompt()
        target.stdin.write("x\n")
        target.stdin.flush()
        assert session.press_enter() == 0, session.stderr()
        assert target.stdout.readline() == "read x\n"
        target.stdin.close()
        assert target.wait(60) == 0
    finally:
        reap(target)


def test_a_killed_guardian_is_replaced(spawn, memcr: Memcr) -> None:
    """Someone kills memcr's guardian mid-stream: memcr starts another and finishes, byte-exact."""
    target = spawn("lazy", 1024, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    killed = subprocess.run(["pkill", "-KILL", "-f", f"PR_SET_PDEATHSIG.* {session.proc.pid} [0-9]+$"])
    assert session.proc.wait(120) == 0, session.stderr()
    lines = session.out.rest()
    assert killed.returncode == 0, "no guardian to kill: the lazy phase of 1 GiB ended within a pkill"
    assert any("guardian process was killed; starting another" in line for line in lines), lines
    assert any(f"pid {target.pid} restored" in line for line in lines), lines
    _no_guardian_left(session.proc.pid)
    assert target.verify() == 0


@pytest.mark.parametrize(
    ("op", "ending", "code"), [("kill", "killed by SIGKILL", -signal.SIGKILL), ("exit", "exited with 3", 3)]
)
def test_a_target_that_ends_during_the_lazy_phase_is_reported(
    spawn, memcr: Memcr, op: str, ending: str, code: int
) -> None:
    """Not "restored" and exit 0: exit code 7, the log and the JSON report say how it ended."""
    for _ in range(3):  # a run on a machine so busy that every page was back first tells nothing: again
        target = spawn("reshape", 256, op, 1)
        result = memcr.run("-p", target.pid, "-n", "--lazy", "--json")
        if target.proc.poll() is None and target.verify() == 0:
            continue  # it found every page back before it could look ("op kill late"), and ran on
        assert target.proc.wait(60) == code
        break
    else:
        pytest.fail("the target's pages were all back before it could end, three times")
    assert result.returncode == 7, result.stderr
    assert f"pid {target.pid} ended during its lazy restore ({ending}), not by memcr's hand" in result.stderr
    assert f"pid {target.pid} restored" not in result.stderr  # the log, with --json
    _, restored = reports(result.stdout)
    assert restored["event"] == "restore" and restored["ended"] == ending
    assert memcr.dumps() == []


def test_a_target_that_ends_during_the_lazy_phase_through_the_daemon(spawn, daemon) -> None:
    served = daemon("--lazy", "--json")
    for _ in range(3):  # as above: a run whose pages were all back before the target could end tells nothing
        target = spawn("reshape", 256, "kill", 1)
        assert served.code(CHECKPOINT, target.pid) == 0
        assert served.code(RESTORE, target.pid) == 0
        line = served.out.wait_for(f"pid {target.pid}")
        while "lazy restore complete" not in line and "ended during" not in line:
            line = served.out.wait_for(f"pid {target.pid}")
        if "lazy restore complete" not in line:
            break
        assert target.verify() == 0
    else:
        pytest.fail("the target's pages were all back before it could end, three times")
    assert f"pid {target.pid} ended during its lazy restore (killed by SIGKILL), " in line
    assert "not by memcr's hand" in line
    report = reports(served.out.wait_for('"event":"restore"'))[0]
    assert report["pid"] == target.pid and report["ended"] == "killed by SIGKILL"
    assert target.proc.wait(60) == -signal.SIGKILL


@pytest.mark.parametrize("coding", [[], ["-z"]], ids=["plain", "framed"])
def test_a_dump_cut_short_during_the_lazy_phase_says_so(spawn, memcr: Memcr, coding: list[str]) -> None:
    """The target is killed (its pages cannot all come back), and the message names the cause."""
    target = spawn("lazy", 1024, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy", *coding)
    session.wait_prompt()
    [dump] = memcr.dumps()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    os.truncate(dump, 1 << 20)
    assert session.proc.wait(120) == 6, session.stderr()
    assert f"the dump {dump} ends early" in session.stderr()
    assert target.proc.wait(60) == -signal.SIGKILL
    assert memcr.dumps() == []


def test_proc_pid_mem_of_a_missing_page_fails_with_eio_never_wrong_bytes(spawn, memcr: Memcr) -> None:
    """/proc/PID/mem cannot wait for a missing page (the kernel gives up: EIO); process_vm_readv waits.

    Pinned as docs/lazy.md says: a read during the lazy phase gives the
    page's own bytes or EIO, never zeros.
    """
    target = spawn("reshape", 1024, "dontdump", 7)
    maps = procfs.read_maps(target.pid, flags=False)
    start = next(v.start for v in maps if v.end - v.start == 1024 << 20 and v.prot & mmap.PROT_WRITE)
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    session.out.wait_for("come back lazily")
    outcomes = []
    fd = os.open(f"/proc/{target.pid}/mem", os.O_RDONLY)
    try:
        for page in range(262143, 0, -4099):  # from the end: the last pages to come back
            at = start + page * scan.PAGE
            try:
                data = os.pread(fd, scan.PAGE, at)
            except OSError as e:
                assert e.errno == errno.EIO, e
                outcomes.append("EIO")
                continue
            assert data == _pattern(page), f"page {page} read wrong bytes through /proc/PID/mem"
            outcomes.append("bytes")
    finally:
        os.close(fd)
    assert session.proc.wait(120) == 0, session.stderr()
    assert target.verify() == 0
    print("reads during the lazy phase:", {o: outcomes.count(o) for o in set(outcomes)})


def _pattern(page: int) -> bytes:
    """Page `page` of a target region filled by tests/targets/common.h fill(..., seed 1)."""
    words = scan.PAGE // 8
    return struct.pack(f"<{words}Q", *(mix(1 + page * words + i) for i in range(words)))


def test_orphaned_dumps_are_removed_at_start(spawn, memcr: Memcr) -> None:
    """A killed memcr leaves its dump; the next memcr (or daemon) in that directory removes it, and
    nothing else: not a live memcr's dump, not a file without memcr-py's magic, not an empty one."""
    orphaned = spawn("lazy", 64, "touch")
    session = memcr.interactive("-p", orphaned.pid)
    session.wait_prompt()
    [orphan] = memcr.dumps()
    session.proc.kill()
    session.proc.wait(10)
    assert orphaned.proc.wait(10) == -signal.SIGKILL  # the kernel killed the half-parked target
    parked = spawn("lazy", 16, "touch")
    live = memcr.interactive("-p", parked.pid)
    live.out.wait_for(f"removed {orphan} (")
    live.wait_prompt()
    assert not orphan.exists()
    foreign = memcr.dump_dir / "pages-999999.img"
    foreign.write_bytes(b"a C memcr's dump")
    empty = memcr.dump_dir / "pages-999998.img"
    empty.touch(mode=0o600)
    other = spawn("lazy", 16, "touch")
    result = memcr.run("-p", other.pid, "-n")
    assert result.returncode == 0, result.stderr
    assert "removed" not in result.stdout
    assert {p.name for p in memcr.dumps()} == {f"pages-{parked.pid}.img", foreign.name, empty.name}
    assert live.press_enter() == 0, live.stderr()
    assert parked.verify() == 0 and other.verify() == 0
    # a daemon does the same at start
    again = spawn("lazy", 16, "touch")
    session = memcr.interactive("-p", again.pid)
    session.wait_prompt()
    orphan = memcr.dump_dir / f"pages-{again.pid}.img"
    session.proc.kill()
    session.proc.wait(10)
    assert again.proc.wait(10) == -signal.SIGKILL and orphan.exists()
    served = Daemon(str(memcr.dump_dir.parent / "memcr.sock"), dump_dir=memcr.dump_dir)
    try:
        assert f"removed {orphan} (" in "\n".join(served.out.seen)
        assert not orphan.exists()
    finally:
        served.terminate()


@pytest.mark.parametrize("to", ["memcr", "one of its threads"])
def test_a_child_still_missing_pages_is_served_then_filled_on_sigterm(spawn, memcr: Memcr, to: str) -> None:
    """memcr -n --lazy waits for a child forked in the lazy phase; SIGTERM fills what it misses, then memcr exits.

    Sent to one of memcr's other threads, the signal does not interrupt the main thread's waitpid(): that
    is the moment a SIGTERM came just before the main thread entered it (a CI run waited for good)."""
    for seed in range(3):  # a fork after every page was back tells nothing: again
        target = spawn("reshape", 256, "fork-linger", seed)
        session = memcr.interactive("-p", target.pid, "-n", "--lazy")
        child = int(target.out.wait_for("child ").split()[1])
        if session.out.until(f"pid {target.pid} forked {child} during its lazy restore") is not None:
            break
        assert session.proc.wait(60) == 0, session.stderr()
        os.kill(child, signal.SIGUSR2)
        assert target.verify() == 0
    else:
        pytest.fail("the target's pages were all back before it forked, three times")
    assert f"memcr: pid {target.pid} restored" in session.out.seen
    assert _tracer(child) == session.proc.pid and _tracer(target.pid) == 0
    if to == "memcr":
        session.proc.send_signal(signal.SIGTERM)
    else:
        _sleeping_in_waitpid(session.proc.pid)
        threads = [int(tid) for tid in os.listdir(f"/proc/{session.proc.pid}/task") if int(tid) != session.proc.pid]
        _tgkill(session.proc.pid, random.choice(threads), signal.SIGTERM)
    assert session.proc.wait(60) == 0, session.stderr()
    assert _tracer(child) == 0
    os.kill(child, signal.SIGUSR2)  # it checks every page, and its parent collects it
    assert target.verify() == 0
    assert memcr.dumps() == []


def test_the_daemon_frees_the_pid_while_children_linger_and_fills_them_at_shutdown(spawn, daemon) -> None:
    served = daemon("--lazy")
    for seed in range(3):  # a fork after every page was back tells nothing: again
        target = spawn("reshape", 256, "fork-linger", seed)
        assert served.code(CHECKPOINT, target.pid) == 0
        assert served.code(RESTORE, target.pid) == 0
        child = int(target.out.wait_for("child ").split()[1])
        served.out.wait_for(f"pid {target.pid}: lazy restore complete")
        try:  # logged right after, when there is one
            served.out.wait_for(f"pid {target.pid} forked {child} during its lazy restore", timeout=10)
            break
        except AssertionError:
            os.kill(child, signal.SIGUSR2)
            assert target.verify() == 0
    else:
        pytest.fail("the target's pages were all back before it forked, three times")
    # the target itself is back and free for the next park, while memcr still serves its child
    assert served.code(CHECKPOINT, target.pid) == 0
    assert served.code(RESTORE, target.pid) == 0
    served.out.wait_for(f"pid {target.pid}: lazy restore complete")
    assert served.terminate() == 0
    assert any(f"pid {target.pid}: let go of the processes it forked" in line for line in served.out.rest())
    assert _tracer(child) == 0
    os.kill(child, signal.SIGUSR2)
    assert target.verify() == 0


def _tracer(pid: int) -> int:
    return int(procfs.read_status(pid)["TracerPid"])


def _sleeping_in_waitpid(pid: int) -> None:
    """Wait until pid's main thread sleeps in waitpid(), where only a signal of its own interrupts it."""
    wchan = Path(f"/proc/{pid}/wchan")
    deadline = time.monotonic() + 10
    while wchan.read_text() != "do_wait" and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a kernel that does not name it: it gets there all the same


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """A signal for one thread of another process (Python's pthread_kill reaches its own threads only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


@pytest.mark.parametrize("reader", ["cmdline", "environ"])
def test_reading_argv_of_a_parked_target_does_not_cost_its_bytes(spawn, memcr: Memcr, reader: str) -> None:
    """`ps` reads /proc/PID/cmdline (and environ): while parked, that maps the zero page over dropped
    argv pages. A lazy restore must put those pages back all the same (the target checks its argv)."""
    target = spawn("lazy", 64, "touch")
    session = memcr.interactive("-p", target.pid, "--lazy")
    session.wait_prompt()
    with contextlib.suppress(OSError):  # empty or an error: the page is not there, which is the point
        Path(f"/proc/{target.pid}/{reader}").read_bytes()
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0
