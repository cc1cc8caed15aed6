"""The /proc parsers on canned text, and the one mapping of /proc errors to typed ones.

Rootless: nothing here needs more than the test's own process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from memcr.engine import admission
from memcr.errors import MemcrError, RightsError, TargetError, TargetGone
from memcr.park import scan
from memcr.system import processes, procfs

MAPS = "".join(
    line + "\n"
    for line in (
        "55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234                       /usr/bin/cat",
        "55d0c0a02000-55d0c0a07000 r-xp 00002000 fd:01 1234                       /usr/bin/cat",
        "55d0c1e4f000-55d0c1e70000 rw-p 00000000 00:00 0                          [heap]",
        "7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0",
        "7f1c2a100000-7f1c2a121000 rw-p 00000000 00:00 0 ",  # padded, no path
        "7f1c2b000000-7f1c2b100000 rw-s 00000000 00:01 4242                       /memfd:ring buffer (deleted)",
        "7f1c2c000000-7f1c2c001000 rw-p 00001000 fd:01 99                         /tmp/my  file (deleted)",
        "7f1c2d000000-7f1c2d001000 r--p 00000000 fd:01 98                         /tmp/odd\r\x0c\u2028\\012name",
        "7ffd5a1e0000-7ffd5a201000 rw-p 00000000 00:00 0                          [stack]",
        "7ffd5a3f0000-7ffd5a3f2000 r-xp 00000000 00:00 0                          [vdso]",
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
    )
)

SMAPS = """\
55d0c1e4f000-55d0c1e70000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                  12 kB
Pss:                  10 kB
Shared_Clean:          4 kB
Shared_Dirty:          2 kB
Private_Clean:         0 kB
Private_Dirty:         6 kB
Swap:                  8 kB
SwapPss:               8 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr mr mw me ac sd lo
7f1c2c000000-7f1c2c001000 rw-p 00001000 fd:01 99                         /tmp/Rss: 1 kB (deleted)
Size:                  4 kB
Rss:                   0 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Size:                  4 kB
Rss:                   0 kB
VmFlags: ex
"""


def test_maps_lines_with_and_without_paths() -> None:
    vmas = procfs.parse_maps(MAPS)
    assert [v.path for v in vmas] == [
        "/usr/bin/cat",
        "/usr/bin/cat",
        "[heap]",
        "",
        "",
        "/memfd:ring buffer (deleted)",
        "/tmp/my  file (deleted)",
        "/tmp/odd\r\x0c\u2028\\012name",  # only a newline ends a line; the kernel escapes those in paths
        "[stack]",
        "[vdso]",
        "[vsyscall]",
    ]
    text, heap, anon = vmas[1], vmas[2], vmas[3]
    assert (text.start, text.end, text.size) == (0x55D0C0A02000, 0x55D0C0A07000, 0x5000)
    assert (text.perms, text.offset, text.inode) == ("r-xp", 0x2000, 1234)
    assert text.prot == mmap.PROT_READ | mmap.PROT_EXEC and text.private and not text.anonymous
    assert heap.anonymous and anon.anonymous and anon.prot == mmap.PROT_READ | mmap.PROT_WRITE
    # maps alone carries no VmFlags or page counts
    assert all(v.flags == frozenset() and v.resident == 0 and v.shared == 0 for v in vmas)


def test_deleted_and_shared_files() -> None:
    memfd, deleted = procfs.parse_maps(MAPS)[5:7]
    assert not memfd.private and not memfd.anonymous and memfd.inode == 4242
    assert deleted.private and deleted.offset == 0x1000 and deleted.path.endswith(" (deleted)")
    assert not deleted.anonymous  # a file page: the kernel cannot re-read it, but it is no anonymous mapping


def test_kernel_mappings() -> None:
    by_path = {v.path: v for v in procfs.parse_maps(MAPS)}
    vsyscall = by_path["[vsyscall]"]
    assert (vsyscall.start, vsyscall.end) == (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000)
    assert vsyscall.prot == mmap.PROT_EXEC and vsyscall.anonymous
    assert {"[vdso]", "[vsyscall]"} <= set(procfs.SPECIAL)
    assert not scan.is_candidate(vsyscall, (0, 0)) and not scan.is_candidate(by_path["[vdso]"], (0, 0))
    assert scan.is_candidate(by_path["[heap]"], (0, 0)) and scan.is_candidate(by_path["[stack]"], (0, 0))


def test_smaps_flags_and_counters() -> None:
    heap, deleted, vsyscall = procfs.parse_maps(SMAPS)
    assert heap.flags == frozenset({"rd", "wr", "mr", "mw", "me", "ac", "sd", "lo"})
    assert heap.resident == (12 + 8) * 1024  # Rss + Swap
    assert heap.shared == (4 + 2) * 1024  # Shared_Clean + Shared_Dirty
    # a path that looks like a counter is a path
    assert deleted.path == "/tmp/Rss: 1 kB (deleted)"
    assert (deleted.flags, deleted.resident, deleted.shared) == (frozenset({"rd", "wr", "mr", "mw", "me"}), 0, 0)
    assert vsyscall.flags == frozenset({"ex"})
    assert not scan.is_candidate(heap, (0, 0))  # lo: locked, madvise would refuse it


@pytest.mark.parametrize("flag", ["mt", "ss", "um", "io"])
def test_mappings_memcr_must_not_drop(flag: str) -> None:
    """arm64 memory tagging (mt) among them: a dropped page would come back with its tags cleared."""
    vma = procfs.Vma(0x10000, 0x20000, "rw-p", 0, 0, "", flags=frozenset({"rd", "wr", "mr", "mw", "me", "ac", flag}))
    assert not scan.is_candidate(vma, (0, 0))
    assert scan.is_candidate(dataclasses.replace(vma, flags=vma.flags - {flag}), (0, 0))


def test_own_maps_with_odd_file_names(tmp_path: Path) -> None:
    """Names that are not UTF-8 or hold a carriage return, form feed or newline: one mapping each."""
    names = [b"odd \xff\xfe name", b"cr\rff\x0c end", b"new\nline"]
    mapped = []
    try:
        for name in names:
            path = os.path.join(os.fsencode(tmp_path), name)
            with open(path, "wb") as f:
                f.write(b"x" * mmap.PAGESIZE)
            with open(path, "rb") as f:
                mapped.append((os.fstat(f.fileno()).st_ino, mmap.mmap(f.fileno(), mmap.PAGESIZE, prot=mmap.PROT_READ)))
        by_inode = {v.inode: v for v in procfs.read_maps(os.getpid(), flags=False)}
        found = [os.fsencode(by_inode[inode].path) for inode, _ in mapped]
    finally:
        for _, m in mapped:
            m.close()
    directory = os.fsencode(tmp_path)
    assert found[:2] == [os.path.join(directory, name) for name in names[:2]]
    assert found[2] == os.path.join(directory, b"new\\012line")  # the kernel's escape


def test_empty_maps_of_a_kernel_thread() -> None:
    assert procfs.parse_maps("") == []


def test_stat_with_a_command_name_holding_parentheses_and_newlines() -> None:
    text = "4242 (evil) R 1 (x\n) S 17 4242 4242 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 99 1 2\n"
    stat = procfs.parse_stat(text)
    assert stat == procfs.Stat(pid=4242, comm="evil) R 1 (x\n", state="S", ppid=17, flags=4194560, start=99)
    assert not stat.flags & procfs.PF_KTHREAD
    assert procfs.parse_stat("1 ((sd-pam)) S 0 1 1 0 -1 4194560 0\n").comm == "(sd-pam)"


def test_stat_of_a_kernel_thread() -> None:
    stat = procfs.parse_stat("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0\n")
    assert stat.flags & procfs.PF_KTHREAD and stat.ppid == 0 and stat.comm == "kthreadd"


STATUS = """\
Name:\tevil\\nVmRSS:\\t1 kB
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
NSpid:\t4242\t7
PPid:\t17
TracerPid:\t0
Uid:\t1000\t1000\t1000\t1000
VmRSS:\t    5120 kB
RssAnon:\t    4096 kB
RssFile:\t    1024 kB
RssShmem:\t       0 kB
Threads:\t3
Seccomp:\t0
"""

KTHREAD_STATUS = """\
Name:\tkthreadd
State:\tS (sleeping)
Tgid:\t2
PPid:\t0
TracerPid:\t0
Threads:\t1
"""


def test_status_with_an_escaped_newline_in_the_name() -> None:
    status = procfs.parse_status(STATUS)
    assert status["Name"] == "evil\\nVmRSS:\\t1 kB"  # the kernel's escape, one line
    assert procfs.memory_kb(status, "VmRSS") == 5120
    assert procfs.memory_kb(status, "RssAnon") == 4096
    assert (status["State"], status["Tgid"], status["NSpid"]) == ("S (sleeping)", "4242", "4242\t7")
    assert status["Uid"].split() == ["1000"] * 4


def test_kernel_thread_has_no_memory_fields() -> None:
    status = procfs.parse_status(KTHREAD_STATUS)
    assert "VmRSS" not in status
    assert procfs.memory_kb(status, "VmRSS") == 0
    assert procfs.memory_kb(status, "RssAnon") == 0


# -- reading: the one errno mapping ----------------------------------------------


@pytest.mark.parametrize("number", [errno.ENOENT, errno.ESRCH])
def test_gone_is_target_gone(number: int) -> None:
    e = procfs.typed_error(OSError(number, os.strerror(number)), "/proc/77/status", 77)
    assert isinstance(e, TargetGone) and isinstance(e, TargetError)
    assert str(e) == "process 77 is gone"
    assert (e.pid, e.path, e.errno, e.what) == (77, "/proc/77/status", number, "read")
    thread = procfs.typed_error(OSError(number, "gone"), "/proc/77/task/78/status", "77/task/78")
    assert str(thread) == "thread 78 of process 77 is gone" and thread.pid == 77


@pytest.mark.parametrize("number", [errno.EACCES, errno.EPERM])
def test_denied_is_rights_error(number: int) -> None:
    e = procfs.typed_error(OSError(number, os.strerror(number)), Path("/proc/77/smaps"), 77, "read")
    assert isinstance(e, RightsError)
    assert str(e).startswith("cannot read /proc/77/smaps: permission denied (run memcr as root or with CAP_SYS_PTRACE")
    assert (e.pid, e.path, e.errno, e.what, e.exit_code) == (77, "/proc/77/smaps", number, "read", 4)


def test_other_errors_stay_os_errors() -> None:
    """A descriptor limit is named by the caller (checkpoint's LimitError): left as it is."""
    original = OSError(errno.EMFILE, "Too many open files")
    assert procfs.typed_error(original, "/proc/77/maps", 77) is original


def reaped_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: nothing answers to its pid now
    return child.pid


def test_vanished_pid() -> None:
    pid = reaped_pid()
    for read, path in (
        (procfs.read_status, f"/proc/{pid}/status"),
        (procfs.read_stat, f"/proc/{pid}/stat"),
        (procfs.read_maps, f"/proc/{pid}/smaps"),
        (procfs.thread_ids, f"/proc/{pid}/task"),
    ):
        with pytest.raises(TargetGone, match=f"^process {pid} is gone$") as gone:
            read(pid)
        assert (gone.value.pid, gone.value.path, gone.value.errno) == (pid, path, errno.ENOENT)
    assert not processes.alive(pid)
    with pytest.raises(TargetError, match=f"^no such process: {pid}$") as refused:
        admission.check_target(pid)
    assert refused.value.pid == pid


@pytest.mark.parametrize(
    ("raised", "typed"),
    [
        (ProcessLookupError(errno.ESRCH, "No such process"), TargetGone),
        (PermissionError(errno.EACCES, "Permission denied"), RightsError),
    ],
)
def test_each_reader_maps_errors(monkeypatch: pytest.MonkeyPatch, raised: OSError, typed: type[MemcrError]) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(procfs, "open", fail, raising=False)  # the module's open(), ahead of the builtin
    for read in (procfs.read_status, procfs.read_stat, procfs.read_maps):
        with pytest.raises(typed) as failed:
            read(4242)
        assert (failed.value.pid, failed.value.errno, failed.value.what) == (4242, raised.errno, "read")


def test_pagemap_denied_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(procfs.os, "open", denied)
    assert procfs.open_pagemap(4242) is None
    assert procfs.open_mem(4242) is None
    assert procfs.self_pagemap_entry(0) is None


def test_own_status_and_threads() -> None:
    status = procfs.read_status("self")
    assert int(status["Tgid"]) == os.getpid()
    assert procfs.read_stat(os.getpid()).pid == os.getpid()
    assert os.getpid() in procfs.thread_ids(os.getpid())
    assert processes.descriptor_count() > 0
    with pytest.raises(TargetError, match="memcr itself") as refused:
        admission.check_target(os.getpid())
    assert refused.value.pid == os.getpid()


def test_own_pagemap_entry_and_zero_page() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    page[0] = 1  # present now
    cell = ctypes.c_char.from_buffer(page)
    try:
        entry = procfs.self_pagemap_entry(ctypes.addressof(cell))
    finally:
        del cell
        page.close()
    assert entry is not None and entry & scan.PM_PRESENT
    assert scan.zero_pfn() >= 0  # 0 where PFNs are hidden (not root)


# -- namespaces --------------------------------------------------------------------


def test_open_namespace() -> None:
    fd = procfs.open_namespace(os.getpid(), "net")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == os.readlink("/proc/self/ns/net")
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        os.close(fd)


def test_open_namespace_of_a_vanished_pid() -> None:
    pid = reaped_pid()
    with pytest.raises(TargetGone, match=f"process {pid} is gone") as gone:
        procfs.open_namespace(pid, "net")
    assert (gone.value.pid, gone.value.path, gone.value.errno, gone.value.what) == (
        pid,
        f"/proc/{pid}/ns/net",
        errno.ENOENT,
        "open",
    )


@pytest.mark.parametrize("kind", ["../../etc/passwd", "", "netns"])
def test_open_namespace_refuses_unknown_kinds(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown namespace kind"):
        procfs.open_namespace(os.getpid(), kind)


def test_namespace_the_kernel_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "NAMESPACES", procfs.NAMESPACES | {"bogus"})
    with pytest.raises(RightsError, match="the kernel has no bogus namespaces"):
        procfs.open_namespace(os.getpid(), "bogus")


def test_namespace_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(procfs.os, "open", denied)
    with pytest.raises(RightsError, match=r"^cannot open /proc/4242/ns/net: permission denied") as failed:
        procfs.open_namespace(4242, "net")
    assert (failed.value.pid, failed.value.errno, failed.value.what) == (4242, errno.EACCES, "open")


# -- the errors' data --------------------------------------------------------------


def test_errors_keep_their_plain_form() -> None:
    plain = TargetGone("process 5 is gone")
    assert str(plain) == "process 5 is gone" and plain.args == ("process 5 is gone",)
    assert (plain.pid, plain.path, plain.errno, plain.what) == (None, None, None, None)
    rich = RightsError("denied", pid=5, path=Path("/proc/5/mem"), errno=errno.EACCES, what="open")
    assert (str(rich), rich.pid, rich.path, rich.errno, rich.what) == ("denied", 5, "/proc/5/mem", errno.EACCES, "open")
    assert rich.exit_code == 4 and isinstance(rich, MemcrError)


def test_pid_list() -> None:
    assert procfs.parse_pids("12\n345\n") == {12, 345}
    assert procfs.parse_pids("") == set()


MOUNTINFO = "".join(
    line + "\n"
    for line in (
        "22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw",
        "25 22 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755",
        "26 25 0:24 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory",
        "27 25 0:25 / /sys/fs/cgroup/unified\\040v2 rw,nosuid,nodev,noexec,relatime shared:11 master:3 - cgroup2 "
        "cgroup2 rw,nsdelegate",
    )
)


def test_cgroup2_mount_point_with_tags_and_an_escaped_space() -> None:
    assert procfs.parse_cgroup2_mount(MOUNTINFO) == Path("/sys/fs/cgroup/unified v2")
    assert procfs.parse_cgroup2_mount(MOUNTINFO.replace("cgroup2", "tmpfs")) is None


def test_own_cgroup2_mount() -> None:
    mount = procfs.cgroup2_mount()
    assert mount is None or (mount / "cgroup.procs").is_file()
