"""Everything memcr reads from /proc, parsed in one place."""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from memcr.errors import RightsError, TargetError, TargetGone

PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    flags: frozenset[str] = frozenset()

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def prot(self) -> int:
        """The mapping's protection as PROT_* bits."""
        return (
            (1 if self.perms[0] == "r" else 0)
            | (2 if self.perms[1] == "w" else 0)
            | (4 if self.perms[2] == "x" else 0)
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


def global_tid(pid: int, ns_tid: int) -> int:
    """The tid memcr sees for a thread the target knows as ns_tid."""
    for tid in thread_ids(pid):
        try:
            nspid = read_status(f"{pid}/task/{tid}").get("NSpid", str(tid)).split()
        except TargetGone:
            continue
        if int(nspid[-1]) == ns_tid:
            return tid
    raise TargetGone(f"thread {ns_tid} of process {pid} is gone")


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
        raise TargetError(f"process {pid} is a zombie: it has exited and has no memory to save")
    if pid == 1:
        raise TargetError("refusing to freeze pid 1 (init): the whole system would stall")
    if stat_flags(pid) & PF_KTHREAD:
        raise TargetError(f"process {pid} is a kernel thread: it has no user memory to save")
    if pid == os.getpid():
        raise TargetError(f"process {pid} is memcr itself")
    if pid == os.getppid():
        raise TargetError(f"process {pid} is memcr's parent, which waits for memcr")
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise TargetError(
            f"process {pid} is already traced by process {tracer} "
            "(another memcr or a debugger): detach it first"
        )
    return status


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
