"""The process table and the per-process figures psutil reads, its failures mapped once to memcr's.

What psutil does not read stays in memcr.system.procfs: pagemap, smaps'
VmFlags, wchan, NSpid, TracerPid, per-thread status and uids, supplementary
groups, descriptors by number, the mem and ns descriptors, and the reports'
Rss figures (psutil has no RssFile: its `shared` counts shmem with the files).

psutil serves where it reads more than a folder listing: every process's
parent and status (a tree's walk), children, uids. Its import takes ~18 ms
and 1 MiB of RSS, so it happens inside those functions alone: the pid list,
liveness and memcr's own descriptor count, which a checkpoint and the
daemon ask for, read /proc as psutil would, and neither the idle daemon nor
a checkpoint of one process loads psutil.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from memcr.errors import RightsError, TargetGone
from memcr.system import procfs

if TYPE_CHECKING:
    import psutil


@contextlib.contextmanager
def _typed(pid: int, what: str) -> Iterator[None]:
    """psutil's NoSuchProcess (a ZombieProcess too) as TargetGone, AccessDenied as RightsError: procfs's messages."""
    import psutil

    try:
        yield
    except psutil.NoSuchProcess as e:
        raise _typed_error(e, pid, what, errno.ESRCH) from None
    except psutil.AccessDenied as e:
        raise _typed_error(e, pid, what, errno.EACCES) from None


def _typed_error(e: psutil.NoSuchProcess | psutil.AccessDenied, pid: int, what: str, number: int) -> Exception:
    # psutil raises from the OSError of the file it read: its path and errno are the data procfs gives
    cause = e.__cause__
    who = pid if e.pid is None else e.pid
    if not (isinstance(cause, OSError) and cause.filename):
        cause = OSError(number, os.strerror(number), str(procfs.proc_path(who)))
    return procfs.typed_error(cause, cause.filename, who, what)


def pids() -> list[int]:
    """Every process now: /proc's numbered folders, as psutil.pids() lists them, without its import."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def parent_links() -> dict[int, int]:
    """pid -> parent pid of every process now, zombies left out: they have exited and hold no memory (and
    no children: those went to a reaper when they exited). One that exits meanwhile is left out too."""
    import psutil

    gone = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    denied = object()
    links = {}
    for p in psutil.process_iter(["ppid", "status"], ad_value=denied):
        if p.info["status"] in gone:
            continue
        if denied in (p.info["ppid"], p.info["status"]):
            # left out, it might be a member that runs on while the rest is parked: not all or nothing
            raise RightsError(f"cannot read the parent of process {p.pid} (/proc is mounted hidepid?)", pid=p.pid)
        links[p.pid] = p.info["ppid"]
    return links


def children(pid: int) -> list[int]:
    """The process's children, by the parent links of the process table."""
    import psutil

    with _typed(pid, "read"):
        return [child.pid for child in psutil.Process(pid).children()]


def alive(pid: int) -> bool:
    """Running or stopped: a zombie waiting to be reaped is dead already. From the State line of
    /proc/<pid>/status, which psutil's status() reads too: a checkpoint asks this and pids() alone."""
    try:
        state = procfs.read_status(pid).get("State", "")
    except TargetGone:
        return False
    return not state.startswith(("Z", "X"))


def real_uid(pid: int) -> int:
    """The real uid of the process (of its main thread: threads carry their own, procfs.thread_uids)."""
    import psutil

    with _typed(pid, "read"):
        return psutil.Process(pid).uids().real


def descriptor_count() -> int:
    """How many file descriptors memcr itself has open (psutil's num_fds() counts the same folder)."""
    return len(os.listdir("/proc/self/fd"))
