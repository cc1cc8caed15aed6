"""Everything memcr reads from /proc, parsed in one place."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from memcr import arch
from memcr.errors import RightsError, TargetError, TargetGone

PF_KTHREAD = 0x00200000
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")  # the kernel's own mappings


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    flags: frozenset[str] = frozenset()
    resident: int = 0  # bytes present or swapped out (Rss + Swap in smaps)
    shared: int = 0  # bytes of pages other processes map too (Shared_Clean + Shared_Dirty in smaps)

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def prot(self) -> int:
        """The mapping's protection as PROT_* bits."""
        return (
            (1 if self.perms[0] == "r" else 0) | (2 if self.perms[1] == "w" else 0) | (4 if self.perms[2] == "x" else 0)
        )

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and (not self.path or self.path.startswith("["))

    @property
    def size(self) -> int:
        return self.end - self.start


def proc_path(pid: int | str, *parts: str) -> Path:
    return Path("/proc", str(pid), *parts)


def _read(path: Path, pid: int) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise TargetGone(f"process {pid} is gone") from None
    except PermissionError:
        raise RightsError(
            f"cannot read {path}: permission denied (run memcr as root or with "
            "CAP_SYS_PTRACE and read access to the target's /proc entries)"
        ) from None
    except ProcessLookupError:
        raise TargetGone(f"process {pid} is gone") from None


def read_maps(pid: int, flags: bool = True) -> list[Vma]:
    """The target's mappings; with their VmFlags from smaps, whose page-table walk costs ~15 ms per GiB."""
    vmas: list[Vma] = []
    for line in _read(proc_path(pid, "smaps" if flags else "maps"), pid).splitlines():
        if line.startswith("VmFlags:"):
            vmas[-1] = dataclasses.replace(vmas[-1], flags=frozenset(line.split()[1:]))
            continue
        if line.startswith(("Rss:", "Swap:")):
            vmas[-1] = dataclasses.replace(vmas[-1], resident=vmas[-1].resident + int(line.split()[1]) * 1024)
            continue
        if line.startswith(("Shared_Clean:", "Shared_Dirty:")):
            vmas[-1] = dataclasses.replace(vmas[-1], shared=vmas[-1].shared + int(line.split()[1]) * 1024)
            continue
        fields = line.split(maxsplit=5)
        if "-" not in fields[0] or len(fields) < 5:
            continue  # a counter line such as "Rss:  12 kB"
        start, end = fields[0].split("-")
        vmas.append(
            Vma(
                start=int(start, 16),
                end=int(end, 16),
                perms=fields[1],
                offset=int(fields[2], 16),
                inode=int(fields[4]),
                path=fields[5] if len(fields) > 5 else "",
            )
        )
    return vmas


def read_status(pid: int | str) -> dict[str, str]:
    text = _read(proc_path(pid, "status"), int(pid) if str(pid).isdigit() else 0)
    status = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


def memory_kb(status: dict[str, str], key: str) -> int:
    """A `NNN kB` field of /proc/<pid>/status, 0 when absent (kernel threads)."""
    return int(status.get(key, "0 kB").split()[0])


def stat_flags(pid: int) -> int:
    text = _read(proc_path(pid, "stat"), pid)
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[6])


def thread_ids(pid: int) -> set[int]:
    try:
        return {int(name) for name in os.listdir(proc_path(pid, "task"))}
    except FileNotFoundError:
        raise TargetGone(f"process {pid} is gone") from None


def alive(pid: int) -> bool:
    """Running or stopped: a zombie waiting to be reaped is dead already."""
    try:
        state = read_status(pid).get("State", "")
    except TargetGone:
        return False
    return not state.startswith(("Z", "X"))


def ns_pid(pid: int) -> int:
    """The process's id in its own pid namespace."""
    return int(read_status(pid).get("NSpid", str(pid)).split()[-1])


def check_target(pid: int) -> dict[str, str]:
    """Refuse pids that memcr must never freeze; return the target's status."""
    if not proc_path(pid).exists():
        raise TargetError(f"no such process: {pid}")
    status = read_status(pid)
    if int(status.get("Tgid", pid)) != pid:
        raise TargetError(f"{pid} is a thread of process {status['Tgid']}: give the process id")
    if status.get("State", "").startswith(("Z", "X")):
        threads = int(status.get("Threads", "1"))
        if threads > 1:
            raise TargetError(
                f"the main thread of process {pid} has exited while {threads - 1} other threads run on: "
                "memcr cannot park a process without its main thread"
            )
        raise TargetError(f"process {pid} is a zombie: it has exited and has no memory to save")
    if pid == 1:
        raise TargetError("refusing to freeze pid 1 (init): the whole system would stall")
    if stat_flags(pid) & PF_KTHREAD:
        raise TargetError(f"process {pid} is a kernel thread: it has no user memory to save")
    if pid == os.getpid():
        raise TargetError(f"process {pid} is memcr itself")
    if pid == os.getppid():
        raise TargetError(f"process {pid} is memcr's parent, which waits for memcr")
    threads = _thread_statuses(pid, thread_ids(pid))
    for tid, thread in threads:
        tracer = int(thread.get("TracerPid", "0"))
        if tracer:
            which = f"process {pid}" if tid == pid else f"thread {tid} of process {pid}"
            raise TargetError(
                f"{which} is already traced by process {tracer} (another memcr or a debugger): detach it first"
            )
    _unconfined(pid, threads)
    return status


def _thread_statuses(pid: int, tids: list[int] | set[int]) -> list[tuple[int, dict[str, str]]]:
    """The status of each thread still there, the main thread first."""
    found = []
    for tid in sorted(tids, key=lambda t: (t != pid, t)):
        with contextlib.suppress(TargetGone):
            found.append((tid, read_status(f"{pid}/task/{tid}")))
    return found


def unconfined_thread(pid: int, tids: list[int] | set[int]) -> int:
    """A thread (the main one if it can) under no seccomp mode: memcr's injected system calls run there.

    A seccomp filter may answer mmap, clone or socket with an error, a
    SIGSYS or death, and strict mode allows nothing but read and write.
    """
    return _unconfined(pid, _thread_statuses(pid, tids))


def _unconfined(pid: int, threads: list[tuple[int, dict[str, str]]]) -> int:
    for tid, thread in threads:
        if thread.get("Seccomp", "0") == "0":
            return tid
    raise TargetError(
        f"every thread of process {pid} runs under seccomp: memcr's injected system calls "
        "(mmap, clone, socket, madvise) could be refused or kill it, so memcr leaves it alone"
    )


def trace_denied(pid: int) -> RightsError:
    return RightsError(
        f"not permitted to trace process {pid}: memcr needs root or "
        "CAP_SYS_PTRACE (and /proc/sys/kernel/yama/ptrace_scope must allow it)"
    )


def async_writers(pid: int) -> list[str]:
    """What can make the kernel write into the process's memory on its own: io_uring, Linux AIO.

    Such a write into a page memcr dropped is lost on restore, or makes
    the restore impossible; a registered io_uring buffer is pinned and
    would not even be the page the process sees after its restore.
    """
    found = []
    try:
        vmas = read_maps(pid, flags=False)
    except RightsError:
        raise trace_denied(pid) from None
    for vma in vmas:
        if vma.path.startswith("/[aio]"):
            found.append("a Linux AIO context (io_setup)")
            break
    try:
        # fdinfo, not fd: listing fd/ needs the target's uid, fdinfo/ only the right to trace it
        names = os.listdir(proc_path(pid, "fdinfo"))
    except FileNotFoundError:
        raise TargetGone(f"process {pid} is gone") from None
    except PermissionError:
        raise trace_denied(pid) from None
    for name in names:
        try:
            link = os.readlink(proc_path(pid, "fd", name))
        except OSError:
            continue  # closed meanwhile
        if link == "anon_inode:[io_uring]":
            found.append(f"an io_uring instance (fd {name})")
    return found


KCMP_VM = 1


def mm_sharers(pid: int) -> list[int]:
    """Other processes that share the memory of `pid` (vfork, clone(CLONE_VM) without CLONE_THREAD).

    kcmp(2) compares the kernel's memory descriptors; where the kernel
    lacks it (no CONFIG_KCMP), a parent or child blocked in vfork()
    is found from its kernel wait channel.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    kcmp = arch.current().SYS_KCMP
    sharers = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == pid:
            continue
        other = int(name)
        if libc.syscall(kcmp, pid, other, KCMP_VM, 0, 0) == 0:
            sharers.append(other)
        elif ctypes.get_errno() == errno.ENOSYS:
            return _vfork_relatives(pid)
    return sharers


def _vfork_relatives(pid: int) -> list[int]:
    """Without kcmp: the vfork children of a target blocked in vfork(), or its parent so blocked.

    Coarser than kcmp (every child of a parent in vfork() counts), so it
    may refuse too much, never too little, for the vfork case.
    """
    parent = int(read_status(pid).get("PPid", "0"))
    if _in_vfork(pid):
        children: list[int] = []
        for tid in thread_ids(pid):
            with contextlib.suppress(OSError):
                children += [int(c) for c in proc_path(pid, "task", str(tid), "children").read_text().split()]
        return children
    return [parent] if parent and _in_vfork(parent) else []


def _in_vfork(pid: int) -> bool:
    return wait_channel(pid) in ("wait_for_vfork_done", "kernel_clone")  # the latter where the wait is inlined


def wait_channel(pid: int, tid: int | None = None) -> str:
    """The kernel function a thread sleeps in ('?' when unknown)."""
    path = proc_path(pid, "wchan") if tid is None else proc_path(pid, "task", str(tid), "wchan")
    try:
        return path.read_text() or "?"
    except OSError:
        return "?"


def require_page_monitor() -> None:
    """memcr finds pages through pagemap, which needs CONFIG_PROC_PAGE_MONITOR.

    /proc/kpageflags (root only) is not needed: locked memory shows as the
    `lo` flag in smaps, and madvise() refuses exactly those mappings.
    """
    if not os.path.exists("/proc/self/pagemap"):
        raise RightsError(
            "/proc/self/pagemap does not exist: the kernel lacks CONFIG_PROC_PAGE_MONITOR, "
            "which memcr needs to find the pages to save"
        )


def open_pagemap(pid: int) -> int | None:
    """An fd on the target's pagemap, or None when memcr may not read it."""
    try:
        return os.open(proc_path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        return None
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise TargetGone(f"process {pid} is gone") from None
        raise
