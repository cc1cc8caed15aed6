"""Memory fidelity: every byte and every mapping as it was, whatever the mappings look like.

Each target checks its own memory and state (signal sets, dispositions,
seccomp, threads, /proc/self/maps and VmFlags) after the round trip.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import random
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memcr.park import scan
from memcr.system import procfs
from tests.conftest import Memcr, Target, log_value, memcr_argv, reap, round_trip
from tests.test_dump_pipeline import frozen_dump, mix

KERNEL = tuple(int(x) for x in platform.release().split(".")[:2])
PAGE = scan.PAGE

# (pattern, pages): sparse runs shorter and longer than the kernel's batches,
# more than 512 and more than 4096 runs in one mapping
SPARSE = [
    ("every-2", 16384),
    ("every-8", 4096),
    ("every-64", 65536),
    ("random-7-30", 8192),
    ("runs-1-1", 2048),
    ("runs-511-1", 4096),
    ("runs-513-3", 8192),
    ("runs-4097-5", 16384),
]


def written(pattern: str, page: int) -> bool:
    """The pages a shape writes (tests/targets/shapes.c)."""
    kind, *numbers = pattern.split("-")
    a, b = (int(n) for n in numbers) if len(numbers) == 2 else (int(numbers[0]) if numbers else 0, 0)
    if kind == "every":
        return page % a == 0
    if kind == "runs":
        return page % (a + b) < a
    if kind == "random":
        return mix(a * 1000003 + page) % 100 < b
    return True


def expected_runs(pattern: str, pages: int) -> list[range]:
    runs: list[range] = []
    for page in range(pages):
        if written(pattern, page):
            if runs and runs[-1].stop == page:
                runs[-1] = range(runs[-1].start, page + 1)
            else:
                runs.append(range(page, page + 1))
    return runs


@pytest.mark.skipif(KERNEL < (6, 7), reason="PAGEMAP_SCAN came with Linux 6.7")
@pytest.mark.parametrize("kind", ["anon", "file"])
@pytest.mark.parametrize(("pattern", "pages"), SPARSE, ids=[p for p, _ in SPARSE])
def test_both_scans_find_each_page_once(spawn, kind: str, pattern: str, pages: int) -> None:
    """Plain pagemap reads, PAGEMAP_SCAN with entries and PAGEMAP_SCAN's categories alone
    give exactly the pages the target wrote."""
    target = spawn("shapes", f"{kind}:{pages}:{pattern}:rw:nohuge")
    [[_, address]] = target.said("shape")
    start = int(address, 16)
    vma = next(v for v in procfs.read_maps(target.pid, flags=False) if v.start <= start < v.end)
    fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
    try:

        def read(addr: int, npages: int) -> bytes:
            return os.pread(fd, npages * 8, addr // PAGE * 8)

        by_entries = scan.scan_pages([vma], read, (0, 0), scan.zero_pfn())[vma.start, vma.end]
        by_scan = scan.scan_pages([vma], read, (0, 0), scan.zero_pfn(), fd)[vma.start, vma.end]
        alone = frozenset({(vma.start, vma.end)})  # classified by PAGEMAP_SCAN's categories alone
        by_category = scan.scan_pages([vma], read, (0, 0), scan.zero_pfn(), fd, alone)[vma.start, vma.end]
    finally:
        os.close(fd)
    first = (start - vma.start) // PAGE
    want = [range(first + r.start, first + r.stop) for r in expected_runs(pattern, pages)]
    assert by_entries.dump == want
    assert by_scan.dump == want
    assert by_category.dump == want
    assert by_category.drop == by_scan.drop == by_entries.drop
    assert by_category.found == by_scan.found == by_entries.found >= sum(map(len, want))
    [with_flags] = [v for v in procfs.read_maps(target.pid) if v.start == vma.start]
    plan = scan.build_plan([with_flags], {(vma.start, vma.end): by_scan}, (0, 0), True)
    assert plan.dump_bytes == sum(map(len, want)) * PAGE
    assert target.verify() == 0


@pytest.mark.parametrize("options", [[], ["-z", "-c"], ["-m"], ["-f"]], ids=lambda o: " ".join(o) or "plain")
def test_sparse_mappings_round_trip(spawn, memcr: Memcr, options: list[str]) -> None:
    shapes = [f"{kind}:{pages}:{pattern}:rw:default" for pattern, pages in SPARSE[:4] for kind in ("anon", "file")]
    target = spawn("shapes", *shapes)
    round_trip(target, memcr, *options)


def test_protections_and_huge_pages_round_trip(spawn, memcr: Memcr) -> None:
    target = spawn(
        "shapes",
        "anon:1024:all:none:default",
        "anon:1024:every-3:r:default",
        "anon:512:all:rx:default",
        "file:256:every-5:r:default",
        "file:256:runs-3-2:none:default",
        "anon:2048:all:rw:huge",
        "anon:2048:every-2:rw:huge",
    )
    round_trip(target, memcr)


# a mapping of 16 pages, page-aligned whatever the page size (0x10000-0x20000 with 4 KiB pages)
START, END = 16 * PAGE, 32 * PAGE


def test_plan_that_lists_a_page_twice_is_refused() -> None:
    vma = procfs.Vma(START, END, "rw-p", 0, 0, "")
    plan = scan.Plan(vmas=[vma], copy=[scan.Extent(START, 2 * PAGE, vma), scan.Extent(START + PAGE, PAGE, vma)])
    with pytest.raises(scan.PlanError, match="twice or out of order"):
        scan.check_plan(plan)
    plan.copy = [scan.Extent(END - PAGE, 2 * PAGE, vma)]
    with pytest.raises(scan.PlanError, match="outside its mapping"):
        scan.check_plan(plan)


def test_a_scan_that_missed_pages_is_refused() -> None:
    vma = procfs.Vma(START, END, "rw-p", 0, 0, "", resident=4 * PAGE)
    plan = scan.Plan(vmas=[vma], found={(vma.start, vma.end): 3})
    with pytest.raises(scan.PlanError, match=r"found 3 pages .* the kernel counts 4"):
        scan.confirm([vma], plan)
    plan.found[vma.start, vma.end] = 4
    scan.confirm([vma], plan)


@pytest.mark.skipif(KERNEL < (6, 13), reason="MADV_GUARD_INSTALL came with Linux 6.13")
def test_guard_pages_are_skipped(spawn, memcr: Memcr) -> None:
    target = spawn("shapes", "anon:256:guard-4:rw:default", "anon:64:guard-7:r:default", "file:64:guard-3:rw:default")
    round_trip(target, memcr)


def family_pss_kb(pids: list[int]) -> int:
    """The family's proportional share of anonymous memory: the libraries' share moves whenever another
    process that maps them starts or ends (a run of the suite once saw 258 kB more that way)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                total += int(line.split()[1])
    return total


def test_pages_shared_with_forked_children_stay(spawn, memcr: Memcr) -> None:
    target = spawn("forked", 3)
    family = [target.pid] + [int(pid) for [pid] in target.said("child")]
    before = family_pss_kb(family)
    for pid in family:
        result = memcr.run("-p", pid, "-n")
        assert result.returncode == 0, result.stderr
        kept = int(log_value(result.stdout, r"(\d+) pages \(\S+ MiB\) stay in memory: other processes").group(1))
        assert kept >= (32 << 20) // PAGE  # the parent's 32 MiB that the children share
    after = family_pss_kb(family)
    assert after <= before + 256, (before, after)  # restoring shared pages would duplicate 96 MiB
    assert target.verify() == 0


@pytest.mark.parametrize("which", ["parent", "child"])
def test_processes_sharing_memory_are_refused(spawn, memcr: Memcr, which: str) -> None:
    """A vfork child runs on its parent's memory while the parent's other threads run on too."""
    target = spawn("vforker")
    [[child]] = target.said("child")
    pid, other = (target.pid, int(child)) if which == "parent" else (int(child), target.pid)
    started = time.monotonic()
    result = memcr.run("-p", pid, "-n")
    assert time.monotonic() - started < 30
    assert result.returncode == 3, result.stderr
    assert f"process {pid} shares its memory with process {other}" in result.stderr
    assert memcr.dumps() == []
    assert procfs.read_status(target.pid)["TracerPid"] == "0"
    assert target.verify() == 0


def test_processes_sharing_memory_are_refused_where_kcmp_is_refused(spawn, binaries, memcr: Memcr) -> None:
    """A seccomp filter (a container's) may answer kcmp with EPERM for every pair: memcr must not take that
    for "shares nothing". Seen (review31b): memcr parked the vfork child, the child ended and its parent,
    running on the same memory, died of SIGSEGV."""
    target = spawn("vforker")
    [[child]] = target.said("child")
    argv = [str(binaries["nokcmp"]), *memcr_argv("-p", child, "-n", "-d", memcr.dump_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"process {child} shares its memory with process {target.pid}" in result.stderr
    assert procfs.read_status(target.pid)["TracerPid"] == "0"
    assert target.verify() == 0


def test_version_says_no_kcmp_where_kcmp_is_refused(binaries) -> None:
    """memcr -V lists what this memcr can use: a kcmp that answers EPERM to every call is of no use."""
    shown = subprocess.run([str(binaries["nokcmp"]), *memcr_argv("-V")], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if line.split()[:1] == ["kcmp"]]
    assert row.split()[1] == "no", row


def test_io_uring_is_refused_untouched(spawn, memcr: Memcr) -> None:
    target = spawn("uring", stdin=True)
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 3, result.stderr
    assert "io_uring" in result.stderr and "--allow-async-io" in result.stderr
    assert memcr.dumps() == []
    target.proc.stdin.write("parkedIO")
    target.proc.stdin.flush()
    assert target.verify() == 0


IO_WORKER_IDLE = ("io_wq_worker", "io_wqe_worker")  # where a worker waits for work: Linux 6.4 on, before


def io_worker_state(pid: int) -> tuple[str, str]:
    """The state and wait channel of the target's io_uring worker once it sleeps, and has for 0.2 s (one
    that has just taken a request on may still move on to poll)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
                if not (task / "comm").read_text().startswith("iou-wrk-"):
                    continue
                before = (task / "stat").read_text().rpartition(")")[2].split()[0]
                time.sleep(0.2)
                where = (task / "wchan").read_text()
                if before in "SD" and (task / "stat").read_text().rpartition(")")[2].split()[0] == before:
                    return before, where
        time.sleep(0.01)
    raise AssertionError(f"process {pid} has no sleeping io_uring worker after 10 s")


def refused_for_a_busy_worker(memcr: Memcr, pid: int) -> None:
    result = memcr.run("-p", pid, "-n", "--allow-async-io")
    assert result.returncode == 3, result.stderr
    assert f"of process {pid} is in the middle of a request (it waits in " in result.stderr
    assert "would end that request with EINTR" in result.stderr
    assert memcr.dumps() == []
    assert procfs.read_status(pid)["TracerPid"] == "0"


@pytest.mark.parametrize("mode", ["", "async"], ids=["task-work", "worker-thread"])
def test_io_uring_completion_while_parked_lands_after_restore(spawn, memcr: Memcr, mode: str) -> None:
    """The read completes in the target's own threads, which memcr holds: after the restore. A kernel that
    does the read in the worker thread, asleep in it (the 5.10 line), would see it end with EINTR at the
    freeze: memcr leaves such a target alone, and the read completes as if memcr had never come."""
    target = spawn("uring", *([mode] if mode else []), stdin=True)
    if mode and io_worker_state(target.pid)[1] not in IO_WORKER_IDLE:
        refused_for_a_busy_worker(memcr, target.pid)
        target.proc.stdin.write("parkedIO")
        target.proc.stdin.flush()
        assert target.verify() == 0
        return
    session = memcr.interactive("-p", target.pid, "--allow-async-io")
    session.wait_prompt()
    target.proc.stdin.write("parkedIO")
    target.proc.stdin.flush()
    time.sleep(0.3)
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0


def test_an_io_uring_worker_asleep_in_a_request_is_left_alone(spawn, memcr: Memcr, tmp_path: Path) -> None:
    """A worker thread that opens a FIFO waits for its writer, asleep: stopping it would end the open with
    EINTR. memcr refuses and leaves the process as it is; the open then completes as it would have."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = spawn("uring", "open", fifo)
    assert io_worker_state(target.pid)[1] not in IO_WORKER_IDLE
    refused_for_a_busy_worker(memcr, target.pid)
    with open(fifo, "wb") as writer:
        writer.write(b"parkedIO")
    assert target.verify() == 0


@pytest.mark.parametrize("mode", ["idle", "sqpoll"])
def test_io_urings_own_threads_waiting_for_work_are_parked(spawn, memcr: Memcr, mode: str) -> None:
    """An idle worker (its wait channel is io_wq_worker since Linux 6.4, io_wqe_worker before) and a
    sleeping SQPOLL thread are in no request: memcr stops them and parks the process."""
    target = spawn("uringwork", mode)
    time.sleep(0.3)  # past the SQPOLL thread's 100 ms of polling
    result = memcr.run("-p", target.pid, "-n", "--allow-async-io")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0


@pytest.mark.parametrize("run", range(10))
def test_a_worker_waiting_uninterruptibly_keeps_the_request_linked_after(
    spawn, binaries, memcr: Memcr, tmp_path: Path, run: int
) -> None:
    """A worker waits for a file's inode lock (D), and an open of a FIFO is linked after its write: a stop
    pending from then on would end the open with EINTR the moment the write is done. memcr waits for such a
    worker as for one asleep in a request, and leaves the process alone; both requests then complete. The
    lock goes at a random moment: before memcr looks at the worker, while it waits for it, or after."""
    held = random.uniform(0, 1.5)
    file, fifo = tmp_path / "file", tmp_path / "fifo"
    file.touch()
    os.mkfifo(fifo)
    holder = subprocess.Popen([binaries["lockholder"], file], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        target = spawn("uringwork", "linked", file, fifo)
        assert io_worker_state(target.pid)[0] == "D"
        park = subprocess.Popen(
            memcr_argv("-p", target.pid, "-n", "--allow-async-io", "-d", memcr.dump_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(held)
        holder.communicate(b"go\n", timeout=30)  # the write goes on, then the worker opens the FIFO
        _, stderr = park.communicate(timeout=120)
        assert park.returncode == 3, f"lock held {held:.2f} s: {stderr}"
        assert "is in the middle of a request (it waits in " in stderr
        assert memcr.dumps() == []
        with open(fifo, "wb") as writer:
            writer.write(b"parkedIO")
        assert target.verify() == 0
    finally:
        reap(holder)


def write_fifo(fifo: Path, data: bytes, timeout: float = 10) -> None:
    """Write to a FIFO once a reader has it open; fail, rather than hang, when none comes (a reader's open
    that a stop ended)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise AssertionError(f"nobody opened {fifo} to read within {timeout} s") from e
            time.sleep(0.01)
            continue
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return


def test_a_worker_named_like_the_sqpoll_thread_is_still_in_its_request(spawn, memcr: Memcr, tmp_path: Path) -> None:
    """A process may rename its own threads, io_uring's workers too (/proc/self/task/TID/comm): a worker
    asleep in an open of a FIFO and named iou-sqp-0 is in a request all the same, and a stop would end it
    (seen: -512 in the completion). memcr must not take a thread's name for what it is."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = spawn("uringwork", "renamed", fifo)
    refused_for_a_busy_worker(memcr, target.pid)
    write_fifo(fifo, b"parkedIO")
    assert target.verify() == 0


def dropped_page(target) -> int:
    [[_, address]] = target.said("shape")
    return int(address, 16) + 5 * PAGE


@pytest.mark.parametrize("content", ["data", "zeros"])
def test_page_written_while_parked(spawn, memcr: Memcr, content: str) -> None:
    """Another process writes a dropped page: zeros are what khugepaged leaves and go under
    the dump's bytes; anything else cannot be made right, and the target is killed."""
    target = spawn("shapes", "anon:64:all:rw:nohuge")
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    with open(f"/proc/{target.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(dropped_page(target))
        mem.write(b"\0" * PAGE if content == "zeros" else b"written while parked")
    code = session.press_enter()
    if content == "zeros":
        assert code == 0, session.stderr()
        assert target.verify() == 0
        return
    assert code == 6
    stderr = session.stderr()
    assert "1 of the pages memcr dropped were written while" in stderr, stderr
    assert target.proc.wait(30) == -signal.SIGKILL
    assert memcr.dumps() == []


@pytest.mark.parametrize("where", ["dropped", "gap"])
def test_a_sparse_mapping_s_page_written_while_parked(spawn, memcr: Memcr, where: str) -> None:
    """Every 4th page present: the restore looks for refilled pages with one scan over each stretch of the
    mapping, its gaps too (memcr.park.parked.SCAN_GAP). A dropped page written is found however far into the
    stretch; a page of a gap, which held nothing and was never memcr's, is the writer's to keep."""
    target = spawn("shapes", "anon:256:every-4:rw:nohuge")
    [[_, address]] = target.said("shape")
    page = int(address, 16) + (201 if where == "gap" else 200) * PAGE  # far into the stretch
    session = memcr.interactive("-p", target.pid)
    session.wait_prompt()
    with open(f"/proc/{target.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(page)
        mem.write(b"written while parked")
    code = session.press_enter()
    if where == "dropped":
        assert code == 6
        assert "1 of the pages memcr dropped were written while" in session.stderr()
        assert target.proc.wait(30) == -signal.SIGKILL
        return
    assert code == 0, session.stderr()
    with open(f"/proc/{target.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(page)
        assert mem.read(20) == b"written while parked"  # not the target's pattern: its own check would fail


FRAME = struct.Struct("<IIII")
RECORD = struct.Struct("<IIQQQ")
RUN = struct.Struct("<QQ")


def frames_of_first_record(dump: Path, digest: int) -> list[tuple[int, int]]:
    """(offset, size) of each frame of the dump's first run with two frames or more."""
    data = dump.read_bytes()
    at = 32
    while True:
        kind, runs, _, _, stored = RECORD.unpack_from(data, at)
        assert kind == 1, "no run with two frames"
        lengths = [RUN.unpack_from(data, at + RECORD.size + i * RUN.size)[1] for i in range(runs)]
        at += RECORD.size + RUN.size * runs
        offset = at
        for length in lengths:  # each run's frames in turn, none spanning two runs
            frames = []
            while length:
                plain_len, stored_len, _, _ = FRAME.unpack_from(data, offset)
                size = FRAME.size + digest + stored_len
                frames.append((offset, size))
                offset += size
                length -= plain_len
            if len(frames) >= 2:
                return frames
        at += stored


@pytest.mark.parametrize("how", ["swap", "replay"])
@pytest.mark.parametrize("options", [["-c"], ["-z", "-c"]], ids=" ".join)
def test_frames_are_bound_to_their_place(spawn, memcr: Memcr, options: list[str], how: str) -> None:
    target, session, dump = frozen_dump(spawn, memcr, "pattern", *options)
    (a, a_size), (b, b_size) = frames_of_first_record(dump, 16)[:2]
    data = bytearray(dump.read_bytes())
    first, second = bytes(data[a : a + a_size]), bytes(data[b : b + b_size])
    if how == "swap":
        data[a : b + b_size] = second + first  # adjacent: the record keeps its length
    else:
        if a_size != b_size:
            pytest.skip("replay in place needs frames of one size")
        data[b : b + b_size] = first
    before = dump.stat()
    dump.write_bytes(data)
    # the file's modification time would give the change away first (DumpFile.stamp): set back, as a writer who
    # knows that would, so that it is the frames' own binding that must catch it
    os.utime(dump, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert session.press_enter() == 6
    assert "checksum" in session.stderr()
    assert target.proc.wait(30) == -signal.SIGKILL
    reap(target.proc)


SHAPE = st.tuples(
    st.sampled_from(["anon", "file"]),
    st.integers(1, 3000),
    st.one_of(
        st.just("all"),
        st.integers(1, 70).map(lambda n: f"every-{n}"),
        st.tuples(st.integers(1, 600), st.integers(1, 40)).map(lambda r: f"runs-{r[0]}-{r[1]}"),
        st.tuples(st.integers(0, 999), st.integers(1, 99)).map(lambda r: f"random-{r[0]}-{r[1]}"),
    ),
    st.sampled_from(["rw", "r", "rx", "none"]),
    st.sampled_from(["huge", "nohuge", "default"]),
).map(lambda parts: ":".join(map(str, parts)))


@settings(
    max_examples=int(os.environ.get("MEMCR_LAYOUT_EXAMPLES", "40")),  # fewer under emulation (scripts/arm64/vm.py)
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    shapes=st.lists(SHAPE, min_size=1, max_size=6),
    options=st.sampled_from([(), ("-z",), ("-c",), ("-m",), ("-f",), ("-z", "zstd", "-c", "-e")]),
)
def test_random_layouts_round_trip(binaries, memcr: Memcr, shapes: list[str], options: tuple[str, ...]) -> None:
    """Any layout of sizes, holes, protections, file or anonymous, THP or not, comes back as it was."""
    target = Target([str(binaries["shapes"]), *shapes])
    try:
        round_trip(target, memcr, *options)
    finally:
        target.stop()


def test_userfaultfd_minor_range_is_left_alone(spawn, binaries, memcr: Memcr) -> None:
    """Faults in a minor-mode range go to the target's own handler, frozen: memcr must not drop its pages."""
    probe = subprocess.run([str(binaries["uffdminor"]), "probe"], capture_output=True, text=True, timeout=60)
    if probe.returncode == 3:  # no process can be in this state there
        pytest.skip(f"minor faults on shmem came with Linux 5.14 ({probe.stderr.strip()})")
    assert probe.returncode == 0, probe.stderr
    target = spawn("uffdminor")
    result = memcr.run("-p", target.pid, "-n")
    assert result.returncode == 0, result.stderr
    assert target.verify() == 0
