"""Every /proc read memcr makes that psutil does not (memcr.system.processes), parsed in one place."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from memcr.errors import RightsError, TargetGone

PF_KTHREAD = 0x00200000
PF_IO_WORKER = 0x00000010  # an io_uring worker thread (iou-wrk-N) of the process
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


# -- reading, with one mapping of errors ----------------------------------------

GONE = (errno.ENOENT, errno.ESRCH)
DENIED = (errno.EACCES, errno.EPERM)


def _ids(pid: int | str) -> tuple[int | None, int | None]:
    """(process, thread) of a /proc entry: 1234, "1234", "1234/task/1240" or "self"."""
    if isinstance(pid, int):
        return pid, None
    if pid == "self":
        return os.getpid(), None
    parts = pid.split("/")
    if len(parts) == 3 and parts[1] == "task" and parts[0].isdigit() and parts[2].isdigit():
        return int(parts[0]), int(parts[2])
    return (int(pid), None) if pid.isdigit() else (None, None)


def typed_error(e: OSError, path: Path | str, pid: int | str | None, what: str = "read") -> Exception:
    """The typed error for a failed /proc access: the one mapping every reader here uses.

    ENOENT and ESRCH: the process (or thread) is gone, TargetGone.
    EACCES and EPERM: memcr lacks the right, RightsError.
    Anything else (EMFILE, ENOMEM, EIO ...) is returned as it is: the
    callers name a descriptor limit themselves.
    Each carries pid, path, errno and what (the operation: read, open, list).
    """
    number, thread = _ids(pid) if pid is not None else (None, None)
    if e.errno in GONE:
        who = f"thread {thread} of process {number}" if thread is not None else f"process {number}"
        return TargetGone(f"{who} is gone", pid=number, path=path, errno=e.errno, what=what)
    if e.errno in DENIED:
        return RightsError(
            f"cannot {what} {path}: permission denied (run memcr as root or with "
            "CAP_SYS_PTRACE and read access to the target's /proc entries)",
            pid=number,
            path=path,
            errno=e.errno,
            what=what,
        )
    return e


def _read(path: Path, pid: int | str | None) -> str:
    """The whole file as text; bytes that are not UTF-8 (a file or command name can hold any) survive
    as surrogate escapes, as os.fsdecode gives them."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise typed_error(e, path, pid, "read") from None
    return data.decode("utf-8", "surrogateescape")


def _read_or_none(path: Path) -> str | None:
    """For what memcr can do without: None whatever the failure."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return None


def _listdir(path: Path, pid: int | str | None) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise typed_error(e, path, pid, "list") from None


def _open(path: Path, pid: int | str | None, flags: int = os.O_RDONLY) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise typed_error(e, path, pid, "open") from None


# -- parsers: pure functions of a file's text -----------------------------------


def _lines(text: str) -> list[str]:
    """The lines of a /proc file: split at newlines only. The kernel escapes a newline
    in a path or a command name, but not a carriage return, form feed or U+2028,
    which str.splitlines() would also split at."""
    return [line for line in text.split("\n") if line]


def parse_maps(text: str) -> list[Vma]:
    """The mappings of /proc/<pid>/maps, or of smaps with their VmFlags, resident and shared bytes.

    A line per mapping, `start-end perms offset dev inode [path]`: the path
    may hold spaces, ends in " (deleted)" for a file removed since, and is
    [heap], [stack], [vdso], [vsyscall] ... for the kernel's own mappings.
    smaps follows each such line with counters (`Rss:  12 kB`) and VmFlags.
    """
    vmas: list[Vma] = []
    counters: dict[str, int] = {}
    flags: frozenset[str] = frozenset()

    def finish() -> None:
        if vmas and (counters or flags):
            resident = counters.get("Rss:", 0) + counters.get("Swap:", 0)
            shared = counters.get("Shared_Clean:", 0) + counters.get("Shared_Dirty:", 0)
            vmas[-1] = dataclasses.replace(vmas[-1], flags=flags, resident=resident * 1024, shared=shared * 1024)

    for line in _lines(text):
        first, _, rest = line.partition(" ")
        if first.endswith(":"):  # an smaps counter of the mapping above
            if first == "VmFlags:":
                flags = frozenset(rest.split())
            elif first in ("Rss:", "Swap:", "Shared_Clean:", "Shared_Dirty:"):
                counters[first] = int(rest.split()[0])
            continue
        fields = line.split(maxsplit=5)
        if "-" not in fields[0] or len(fields) < 5:
            continue
        finish()
        counters, flags = {}, frozenset()
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
    finish()
    return vmas


def parse_status(text: str) -> dict[str, str]:
    """/proc/<pid>/status as {field: value}, values stripped ("VmRSS" -> "1234 kB").

    The kernel escapes a newline (and a backslash) in Name: one line per field.
    """
    status = {}
    for line in _lines(text):
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/<pid>/stat that memcr uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    flags: int  # PF_* bits: PF_KTHREAD for a kernel thread
    start: int = 0  # clock ticks after boot: with the pid, it names one process (a pid is used again)


def parse_stat(text: str) -> Stat:
    """/proc/<pid>/stat: `pid (comm) state ppid ...`.

    comm is raw between the parentheses: it may hold spaces, ") " and
    newlines, so the fields after it start after the last ")".
    """
    head, _, tail = text.rpartition(")")
    pid, _, comm = head.partition(" (")
    fields = tail.split()
    start = int(fields[19]) if len(fields) > 19 else 0
    return Stat(pid=int(pid), comm=comm, state=fields[0], ppid=int(fields[1]), flags=int(fields[6]), start=start)


def parse_pids(text: str) -> set[int]:
    """A list of process ids, one a line (cgroup.procs)."""
    return {int(line) for line in _lines(text)}


def parse_cgroup2_mount(mountinfo: str) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo; None when it is not.

    A line is `id parent major:minor root mountpoint options [tags...] - fstype source super`:
    the tags vary in number, so the filesystem type is the word after the lone "-".
    The kernel writes a space, tab, newline or backslash in the mount point as \\040 style octal.
    """
    for line in _lines(mountinfo):
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        fstype = fields[fields.index("-", 6) + 1]
        if fstype == "cgroup2":
            return Path(_unescape_octal(fields[4]))
    return None


def _unescape_octal(text: str) -> str:
    parts = text.split("\\")
    return parts[0] + "".join(chr(int(part[:3], 8)) + part[3:] for part in parts[1:])


# -- readers ---------------------------------------------------------------------


def read_maps(pid: int, flags: bool = True) -> list[Vma]:
    """The target's mappings; with their VmFlags from smaps, whose page-table walk costs ~15 ms per GiB."""
    return parse_maps(_read(proc_path(pid, "smaps" if flags else "maps"), pid))


def read_status(pid: int | str) -> dict[str, str]:
    """The status of a process (1234), a thread ("1234/task/1240") or memcr itself ("self")."""
    return parse_status(_read(proc_path(pid, "status"), pid))


def memory_kb(status: dict[str, str], key: str) -> int:
    """A `NNN kB` field of /proc/<pid>/status, 0 when absent (kernel threads)."""
    return int(status.get(key, "0 kB").split()[0])


def read_stat(pid: int | str) -> Stat:
    return parse_stat(_read(proc_path(pid, "stat"), pid))


def stat_flags(pid: int) -> int:
    return read_stat(pid).flags


def thread_ids(pid: int) -> set[int]:
    return {int(name) for name in _listdir(proc_path(pid, "task"), pid)}


def io_workers(pid: int, tids: set[int]) -> set[int]:
    """Those of the threads that are io_uring's workers (gone ones are not)."""
    found = set()
    for tid in tids:
        with contextlib.suppress(TargetGone):
            if read_stat(f"{pid}/task/{tid}").flags & PF_IO_WORKER:
                found.add(tid)
    return found


def cgroup2_mount() -> Path | None:
    return parse_cgroup2_mount(_read(proc_path("self", "mountinfo"), "self"))


def ns_pid(pid: int) -> int:
    """The process's id in its own pid namespace."""
    return int(read_status(pid).get("NSpid", str(pid)).split()[-1])


def thread_statuses(pid: int, tids: list[int] | set[int]) -> list[tuple[int, dict[str, str]]]:
    """The status of each thread still there, the main thread first."""
    found = []
    for tid in sorted(tids, key=lambda t: (t != pid, t)):
        with contextlib.suppress(TargetGone):
            found.append((tid, read_status(f"{pid}/task/{tid}")))
    return found


def thread_uids(pid: int) -> dict[int, tuple[int, ...]]:
    """Each thread's uids by thread id: real, effective, saved and filesystem (the Uid: line of its status).

    Threads carry their own credentials: a raw setresuid() changes only the
    calling thread's. Threads that end meanwhile are left out.
    """
    return {
        tid: tuple(int(uid) for uid in status["Uid"].split()) for tid, status in thread_statuses(pid, thread_ids(pid))
    }


def groups(pid: int) -> set[int]:
    """The groups a process acts with on files: its effective gid and its supplementary groups."""
    status = read_status(pid)
    return {int(status["Gid"].split()[1]), *(int(gid) for gid in status.get("Groups", "").split())}


def exists(pid: int) -> bool:
    return proc_path(pid).exists()


def command_line(pid: int) -> list[str]:
    """The process's arguments; [""] when memcr may not read them, or the process is gone."""
    return (_read_or_none(proc_path(pid, "cmdline")) or "").split("\0")


def descriptor_links(pid: int) -> list[tuple[str, str]]:
    """(fd, what it links to) for each open descriptor of the process; those closed meanwhile left out."""
    # fdinfo, not fd: listing fd/ needs the target's uid, fdinfo/ only the right to trace it
    found = []
    for name in _listdir(proc_path(pid, "fdinfo"), pid):
        try:
            found.append((name, os.readlink(proc_path(pid, "fd", name))))
        except OSError:
            continue  # closed meanwhile
    return found


def starts_children_elsewhere(pid: int, tid: int) -> bool:
    """Whether the thread's new children go to another pid namespace than its own (it called
    unshare(CLONE_NEWPID)); False when memcr cannot tell: the freeze names the right that is missing."""
    ns = proc_path(pid, "task", str(tid), "ns")
    try:
        own = os.stat(ns / "pid").st_ino
    except OSError:
        return False
    try:
        return os.stat(ns / "pid_for_children").st_ino != own
    except FileNotFoundError:
        # a new pid namespace without its first process yet shows no link; a kernel before 4.12 none at all
        return proc_path("self", "ns", "pid_for_children").exists()
    except OSError:
        return False


def wait_channel(pid: int, tid: int | None = None) -> str:
    """The kernel function a thread sleeps in ('?' when unknown)."""
    path = proc_path(pid, "wchan") if tid is None else proc_path(pid, "task", str(tid), "wchan")
    return _read_or_none(path) or "?"


def open_pagemap(pid: int) -> int | None:
    """An fd on the target's pagemap, or None when memcr may not read it."""
    try:
        return _open(proc_path(pid, "pagemap"), pid)
    except RightsError:
        return None


def self_pagemap_entry(addr: int) -> int | None:
    """memcr's own pagemap entry (8 bytes, as a number) for the page at `addr`; None when memcr
    may not read its own pagemap (undumpable and not root: /proc/self is then root's)."""
    path = proc_path("self", "pagemap")
    try:
        fd = _open(path, "self")
    except RightsError:
        return None
    try:
        return int.from_bytes(os.pread(fd, 8, addr // mmap.PAGESIZE * 8), "little")
    finally:
        os.close(fd)


def open_mem(pid: int, flags: int = os.O_RDWR) -> int | None:
    """An fd on the target's /proc/<pid>/mem, or None when memcr may not open it: the file is
    the target's and 0600, so with CAP_SYS_PTRACE alone memcr goes through ptrace instead."""
    try:
        return _open(proc_path(pid, "mem"), pid, flags)
    except RightsError:
        return None


NAMESPACES = frozenset(
    {"cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time", "time_for_children", "user", "uts"}
)


def open_namespace(pid: int, kind: str) -> int:
    """An O_RDONLY|O_CLOEXEC fd on namespace `kind` ("net", "mnt" ...) of process `pid`, for setns(2).

    Opening it needs the right to trace the process: RightsError without,
    TargetGone when the process is gone, RightsError when the kernel lacks
    that kind of namespace. The caller closes the fd.
    """
    if kind not in NAMESPACES:
        raise ValueError(f"unknown namespace kind {kind!r}: one of {', '.join(sorted(NAMESPACES))}")
    path = proc_path(pid, "ns", kind)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT and not proc_path("self", "ns", kind).exists():
            raise RightsError(
                f"the kernel has no {kind} namespaces: {path} does not exist",
                pid=pid,
                path=path,
                errno=e.errno,
                what="open",
            ) from None
        raise typed_error(e, path, pid, "open") from None


def limits(pid: int) -> dict[str, tuple[int | None, int | None]]:
    """The process's resource limits by their /proc name ("Max open files"): (soft, hard), None = unlimited."""
    found: dict[str, tuple[int | None, int | None]] = {}
    for line in _read(proc_path(pid, "limits"), pid).splitlines()[1:]:
        # "Max open files            1024                 4096                 files     "
        name, values = line[:26].strip(), line[26:].split()
        if len(values) >= 2:
            soft, hard = (None if v == "unlimited" else int(v) for v in values[:2])
            found[name] = (soft, hard)
    return found


def map_count(pid: int) -> int:
    """How many mappings the process has, as the kernel counts them against vm.max_map_count."""
    lines = _read(proc_path(pid, "maps"), pid).splitlines()
    return sum(1 for line in lines if not line.endswith("[vsyscall]"))  # the gate area is no mapping of its own


def max_map_count() -> int | None:
    text = _read_or_none(Path("/proc/sys/vm/max_map_count"))
    return int(text) if text and text.strip().isdigit() else None


def descriptors_below(pid: int, limit: int) -> int:
    """How many of the process's descriptors are numbered below `limit` (those above it take no free slot)."""
    # fdinfo, not fd: listing fd/ needs the target's uid, fdinfo/ only the right to trace it (non-root memcr)
    return sum(1 for name in _listdir(proc_path(pid, "fdinfo"), pid) if int(name) < limit)


def in_own_namespace(pid: int, kind: str) -> bool:
    """Whether the process is in memcr's own namespace of `kind` ("net" ...); True when memcr cannot tell."""
    try:
        theirs, ours = os.stat(proc_path(pid, "ns", kind)), os.stat(proc_path("self", "ns", kind))
    except OSError:
        return True  # not ours to read, or gone: the freeze names the right that is missing
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
