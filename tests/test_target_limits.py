"""A target memcr cannot infect as it is: refused before anything changes, naming why and the fix.

Each case was once a late failure of the injected mmap, clone or socket
(exit 1, "Cannot allocate memory", "Invalid argument" ...). Each test
drives the real memcr against a real target and checks the code (3; 2
for a missing -N), the message and that the target finds itself intact;
where the advice is a command, the test runs it and parks the target
after all. The late tests drive the engine itself, with real ptrace.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from memcr.dump.format import MAGIC
from memcr.engine import arch
from memcr.engine.parasite import Parasite, SocketSpec
from memcr.engine.tracer import FrozenProcess
from memcr.errors import TargetLimit
from tests.conftest import READY_TIMEOUT, RUN_TIMEOUT, Lines, Memcr, Target, memcr_argv, reap, round_trip
from tests.test_preflight import refused

# 2 ms of every 20 ms: admitted on any machine, and enough for the target to check 8 MiB when asked
DEADLINE = ["-T", "2000000", "-P", "20000000", "-D", "20000000"]


def chrt(*args: object) -> None:
    subprocess.run(["chrt", *map(str, args)], check=True, capture_output=True, text=True)


def advice_command(stderr: str) -> list[str]:
    """The command memcr's advice names in parentheses, such as `prlimit --pid 1234 --as=13631488:`."""
    match = re.search(r"\((prlimit [^)]*)\)", stderr)
    assert match, stderr
    return match.group(1).split()


def unchanged(target: Target, maps: str) -> None:
    """Nothing of memcr is left in the target: not traced, same mappings."""
    assert target.running()
    assert target.status()["TracerPid"] == "0"
    assert Path(f"/proc/{target.pid}/maps").read_text() == maps


def refused_untouched(target: Target, memcr: Memcr, code: int, said: str) -> str:
    """`memcr -p PID -n` refused with `code`, saying `said`; no dump left and the target as it was. Its stderr."""
    maps = Path(f"/proc/{target.pid}/maps").read_text()
    result = memcr.run("-p", target.pid, "-n")
    refused(result, code, said)
    assert memcr.dumps() == []
    unchanged(target, maps)
    return result.stderr


def test_sched_deadline_main_thread_parks_through_another(spawn, memcr: Memcr) -> None:
    """A SCHED_DEADLINE thread may not clone: memcr starts its parasite from a thread that may."""
    target = spawn("pattern", 8, 1)
    chrt("-d", *DEADLINE, "-p", 0, target.pid)  # the main thread only: its worker stays SCHED_OTHER
    round_trip(target, memcr)


def test_sched_deadline_everywhere_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 8)
    chrt("-d", *DEADLINE, "-p", 0, target.pid)
    said = refused_untouched(
        target, memcr, 3, f"process {target.pid} runs under SCHED_DEADLINE, which may not start a thread"
    )
    assert "chrt --reset-on-fork" in said
    # the advice: with reset-on-fork its new threads (the parasite) start as SCHED_OTHER
    chrt("-R", "-d", *DEADLINE, "-p", 0, target.pid)
    round_trip(target, memcr)


def test_descriptor_limit_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 8, 1)
    subprocess.run(["prlimit", "--pid", str(target.pid), "--nofile=3:"], check=True)
    said = refused_untouched(
        target, memcr, 3, "RLIMIT_NOFILE soft limit is 3: memcr's parasite needs 2 free for its socket, 0 are"
    )
    # two free are enough where memcr reads the pagemap itself (as root): the limit is not stricter than it is
    subprocess.run(["prlimit", "--pid", str(target.pid), "--nofile=5:"], check=True)
    assert memcr.run("-p", target.pid, "-n").returncode == 0
    # the target itself needs a descriptor to check its state: the advice first, then the round trip
    subprocess.run(advice_command(said), check=True)
    round_trip(target, memcr)


def test_address_space_limit_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 8, 1)
    used = int(target.status()["VmSize"].split()[0]) * 1024
    subprocess.run(["prlimit", "--pid", str(target.pid), f"--as={used}:"], check=True)
    result = memcr.run("-p", target.pid, "-n")
    refused(result, 3, f"its RLIMIT_AS soft limit is {used >> 10} KiB: memcr's parasite needs")
    assert target.status()["TracerPid"] == "0"
    subprocess.run(advice_command(result.stderr), check=True)
    round_trip(target, memcr)


def test_data_limit_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("pattern", 8)
    used = int(target.status()["VmData"].split()[0]) * 1024
    subprocess.run(["prlimit", "--pid", str(target.pid), f"--data={used}:"], check=True)
    result = memcr.run("-p", target.pid, "-n")
    refused(result, 3, f"its RLIMIT_DATA soft limit is {used >> 10} KiB")
    assert target.verify() == 0


def test_max_map_count_is_refused(spawn, memcr: Memcr) -> None:
    target = spawn("maplimit", 8)  # mapped until the kernel refused: past vm.max_map_count
    highest = int(Path("/proc/sys/vm/max_map_count").read_text())
    result = memcr.run("-p", target.pid, "-n")
    refused(result, 3, f"more than vm.max_map_count ({highest}) allows")
    assert "sysctl -w vm.max_map_count=" in result.stderr
    assert memcr.dumps() == []
    assert target.verify() == 0


def test_unshared_pid_namespace_is_refused(binaries, memcr: Memcr) -> None:
    """unshare(CLONE_NEWPID) without a fork: the process may start no thread, the parasite neither."""
    target = Target(["unshare", "--pid", str(binaries["pattern"]), "8"])
    try:
        said = refused_untouched(target, memcr, 3, f"process {target.pid} called unshare(CLONE_NEWPID)")
        assert "clone fails with EINVAL" in said and "unshare --pid --fork" in said
        assert target.verify() == 0
    finally:
        target.stop()


def test_tree_with_unshared_pid_namespace_is_refused(binaries, memcr: Memcr) -> None:
    """unshare --fork: the parent called unshare, its child is pid 1 of the new namespace; neither is touched."""
    parent = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", str(binaries["pattern"]), "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        Lines(parent.stdout).wait_for("ready", READY_TIMEOUT)
        [child] = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        result = memcr.run("-p", parent.pid, "--tree", "-n")
        refused(result, 3, f"process {parent.pid} called unshare(CLONE_NEWPID)")
        assert "every member runs on as it was" in result.stderr
        assert memcr.dumps() == []
        for pid in (parent.pid, int(child)):
            assert "TracerPid:\t0\n" in Path(f"/proc/{pid}/status").read_text()
        os.kill(int(child), signal.SIGUSR1)  # the child checks itself; unshare exits with its status
        assert parent.wait(RUN_TIMEOUT) == 0
    finally:
        reap(parent)  # --kill-child takes the child with it


def test_other_network_namespace_says_add_n(binaries, memcr: Memcr) -> None:
    target = Target(["unshare", "--net", str(binaries["pattern"]), "8"])
    try:
        said = refused_untouched(target, memcr, 2, f"process {target.pid} is in another network namespace")
        assert "add -N (--parasite-socket-netns)" in said
        round_trip(target, memcr, "-N")
    finally:
        target.stop()


def test_dump_held_by_another_memcr_is_exit_3(spawn, memcr: Memcr) -> None:
    """The other memcr's dump, locked as it holds it, gives the same ending as its trace would."""
    target = spawn("pattern", 8)
    dump = memcr.dump_dir / f"pages-{target.pid}.img"
    fd = os.open(dump, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, MAGIC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = memcr.run("-p", target.pid, "-n")
        refused(result, 3, f"another memcr holds process {target.pid}")
        assert dump.read_bytes() == MAGIC  # the other one's, untouched
    finally:
        os.close(fd)
        dump.unlink()
    assert target.verify() == 0


@pytest.mark.parametrize("same_dir", [True, False])
def test_a_parked_target_is_refused_to_a_second_memcr(spawn, memcr: Memcr, tmp_path: Path, same_dir: bool) -> None:
    """While one memcr holds the target parked, another exits 3 naming it, whatever its -d; the first restores."""
    target = spawn("pattern", 16, 3)
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    other = memcr.dump_dir if same_dir else tmp_path / "elsewhere"
    other.mkdir(exist_ok=True)
    result = memcr.run("-p", target.pid, "-n", "-d", other)
    refused(result, 3, "another memcr")
    session.proc.stdin.write("\n")
    session.proc.stdin.flush()
    assert session.proc.wait(RUN_TIMEOUT) == 0, session.stderr()
    assert memcr.dumps() == [] and list(other.glob("pages-*")) == []
    assert target.verify() == 0


def test_two_memcr_at_once_end_the_same_way(spawn, memcr: Memcr) -> None:
    """Whichever comes second, at whatever moment, exits 3 saying another memcr holds the process."""
    target = spawn("pattern", 96, 2)  # a round trip long enough for most starts to overlap it
    rng = random.Random()
    endings: list[tuple[int, str]] = []
    for _ in range(12):
        runs: list[subprocess.Popen[str]] = []
        try:
            for offset in (0.0, rng.uniform(0.0, 0.06)):  # within the first one's start-up: they overlap
                time.sleep(offset)
                argv = memcr_argv("-p", target.pid, "-n", "-d", memcr.dump_dir)
                runs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for run in runs:
                _, err = run.communicate(timeout=RUN_TIMEOUT)
                endings.append((run.returncode, err))
        finally:
            for run in runs:
                reap(run)
    for code, err in endings:
        assert code in (0, 3), (code, err)
        if code == 3:
            # the dump's lock, or the trace: by a memcr that may have ended just before memcr looked at it
            assert re.search(r"another memcr (or a tracer .*)?holds", err), err
    codes = [code for code, _ in endings]
    assert 3 in codes, f"no two runs overlapped, the race was not tried: {codes}"
    assert memcr.dumps() == []
    assert target.verify() == 0


def _late(target: Target, limit: str) -> TargetLimit:
    """Freeze `target` (real ptrace, in this process), impose `limit` on it only then, and start the parasite.

    The preflight saw no such limit: the injected mmap or the parasite's
    socket meets it. Returns the error Parasite.start raised; the target
    is released again either way.
    """
    frozen = FrozenProcess.freeze(target.pid, arch.current())
    try:
        subprocess.run(["prlimit", "--pid", str(target.pid), limit], check=True)
        with pytest.raises(TargetLimit) as caught:
            Parasite.start(frozen, arch.blobs(), SocketSpec(target.pid), False, arch.page_size()).cure()
    finally:
        frozen.release()
    return caught.value


def test_late_address_space_limit_names_the_limit(spawn) -> None:
    """A limit set while memcr holds the target: the mmap's ENOMEM is still told as RLIMIT_AS, not as errno."""
    target = spawn("pattern", 8, 1)
    used = int(target.status()["VmSize"].split()[0]) * 1024
    error = _late(target, f"--as={used}:")
    assert (error.what, error.exit_code) == ("as", 3)
    assert f"its RLIMIT_AS soft limit is {used >> 10} KiB" in str(error)
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0


def test_late_descriptor_limit_names_the_limit(spawn) -> None:
    """The parasite's socket() fails with EMFILE: told as RLIMIT_NOFILE, and the target keeps no descriptor."""
    target = spawn("pattern", 8, 1)
    fds = sorted(os.listdir(f"/proc/{target.pid}/fd"))
    error = _late(target, f"--nofile={len(fds)}:")
    assert (error.what, error.exit_code) == ("nofile", 3)
    assert "RLIMIT_NOFILE soft limit is" in str(error)
    assert sorted(os.listdir(f"/proc/{target.pid}/fd")) == fds
    subprocess.run(["prlimit", "--pid", str(target.pid), "--nofile=64:"], check=True)  # it needs one to check itself
    assert target.verify() == 0
