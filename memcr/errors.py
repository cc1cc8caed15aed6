"""Typed failures, and the one table from each of them to the exit code the CLI returns for it (EXIT_CODES)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memcr_client.protocol import ExitCode


class MemcrError(Exception):
    """Base of every failure memcr reports; the message names the problem and the fix.

    Besides its message, a failure may carry data for a program to act on
    (psutil style), each None when unknown or beside the point:

    * pid: the process concerned;
    * path: the file concerned, such as /proc/1234/status;
    * errno: the error number of the system call that failed (errno.ENOENT ...);
    * what: the operation or thing that failed, in a word or two ("read",
      "open", "dump-dir", "proc-mem"): memcr.advice keys its advice on it.

    `raise TargetGone("...")` keeps working; the data are keyword-only.
    """

    exit_code: int = ExitCode.FAILED

    def __init__(
        self,
        *args: object,
        pid: int | None = None,
        path: str | os.PathLike[str] | None = None,
        errno: int | None = None,
        what: str | None = None,
    ) -> None:
        super().__init__(*args)
        self.pid = pid
        self.path = None if path is None else os.fspath(path)
        self.errno = errno
        self.what = what


class UsageError(MemcrError):
    """A bad option or option value."""


class TargetError(MemcrError):
    """The pid is not something memcr may or can freeze."""


class TargetGone(TargetError):
    """The target exited while memcr was working on it."""


class TargetLimit(TargetError):
    """A limit of the target's (an rlimit, vm.max_map_count) leaves no room for memcr's parasite.

    `what` names the limit ("nofile", "as", "data", "max-map-count"),
    `wanted` is the value that would make room and `hard` the rlimit's hard
    limit (None: unlimited, or no rlimit), for memcr.advice to name the fix.
    """

    def __init__(
        self, message: str, pid: int, what: str, wanted: int, errno: int | None = None, hard: int | None = None
    ) -> None:
        super().__init__(message, pid=pid, what=what, errno=errno)
        self.wanted = wanted
        self.hard = hard


class RightsError(MemcrError):
    """A permission, capability or kernel feature memcr needs is missing."""


class HardeningError(MemcrError):
    """memcr could not protect itself (memcr.system.harden) and refuses to run."""


class LimitError(RightsError):
    """A resource limit of memcr's (file descriptors) is reached."""


class StorageError(MemcrError):
    """The dump directory or file failed: missing, not writable, full."""


@dataclass(frozen=True)
class Folder:
    """A folder memcr needs, as an administrator makes it for memcr: owner, group (None: the owner's), mode."""

    path: Path
    uid: int
    gid: int | None
    mode: int


class MissingFolders(StorageError):
    """Folders memcr needs are missing, and it may not make them.

    `folders` are the missing ones, outermost first, as they should be
    (the one the message names, and the others memcr would miss next):
    memcr.advice names the command that makes them all.
    """

    def __init__(self, message: str, folders: list[Folder], path: str | os.PathLike[str], errno: int | None) -> None:
        super().__init__(message, path=path, errno=errno)
        self.folders = folders


class ClientRefused(MemcrError):
    """A client of the daemon may not have this done: it asked about itself, or --client-scope forbids it."""


class ParasiteError(MemcrError):
    """The parasite could not be started or stopped answering."""


class Uncured(ParasiteError):
    """memcr's traces (the parasite's mapping, the signal mask) could not be taken out: the target must not run on."""


class PlanError(MemcrError):
    """The page scan gave an answer that cannot be right; caught before any page was dropped."""


class DumpError(MemcrError):
    """The dump file is damaged or does not match the frozen target."""


class WrittenWhileParked(MemcrError):
    """Something wrote into pages memcr had dropped: they cannot be restored exactly."""


class Aborted(MemcrError):
    """The operation was cancelled (signal, restore request, timeout)."""


class TargetKilled(MemcrError):
    """Restoring was impossible, so the target was killed (the cardinal rule)."""


class TargetEnded(MemcrError):
    """The target ended after it ran again, while memcr still held it (its lazy phase): not by memcr's hand."""


class GroupError(MemcrError):
    """A group of processes could not be parked (or woken) as a whole; `cause` is the first member's failure.

    Its pid is that member's (None when the failure was the group's own,
    such as its cgroup), with the path, errno and what of its failure (so
    that its advice applies); `killed` lists the members memcr had to kill
    to keep the cardinal rule, `gone` those that died meanwhile. Its exit
    code is the cause's, or TargetKilled's when a member was killed.
    """

    def __init__(
        self,
        message: str,
        cause: BaseException,
        member: int | None,
        killed: list[int] | None = None,
        gone: list[int] | None = None,
    ) -> None:
        data = cause if isinstance(cause, MemcrError) else MemcrError()
        super().__init__(message, pid=member, path=data.path, errno=data.errno, what=data.what)
        self.cause = cause
        self.killed = killed or []
        self.gone = gone or []
        self.exit_code = TargetKilled.exit_code if self.killed else data.exit_code


# The exit code of each failure, in one place: the class attributes below come from it, `memcr --help`
# lists the codes and tests/unit/test_exit_codes.py checks the README against it. A new failure class
# (here or in another module) gets a row; a class without one takes the code of its nearest ancestor
# that has one. GroupError's code is its cause's (or TargetKilled's): its row is for a failure of its own.
EXIT_CODES: dict[type[MemcrError], ExitCode] = {
    MemcrError: ExitCode.FAILED,
    UsageError: ExitCode.USAGE,
    TargetError: ExitCode.TARGET,
    TargetGone: ExitCode.TARGET,
    TargetLimit: ExitCode.TARGET,
    RightsError: ExitCode.RIGHTS,
    HardeningError: ExitCode.RIGHTS,
    LimitError: ExitCode.RIGHTS,
    StorageError: ExitCode.STORAGE,
    MissingFolders: ExitCode.STORAGE,
    ClientRefused: ExitCode.FAILED,
    ParasiteError: ExitCode.FAILED,
    Uncured: ExitCode.FAILED,
    PlanError: ExitCode.FAILED,
    DumpError: ExitCode.FAILED,
    WrittenWhileParked: ExitCode.FAILED,
    Aborted: ExitCode.FAILED,
    TargetKilled: ExitCode.TARGET_KILLED,
    TargetEnded: ExitCode.TARGET_ENDED,
    GroupError: ExitCode.FAILED,
}

# What each exit code says, as `memcr --help` and the README put it (the README may say more after each).
EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.FAILED: "another failure",
    ExitCode.USAGE: "bad option",
    ExitCode.TARGET: "the pid cannot be frozen",
    ExitCode.RIGHTS: "a missing right or kernel feature, or memcr could not harden itself",
    ExitCode.STORAGE: "the dump directory or disk failed",
    ExitCode.TARGET_KILLED: "the target had to be killed",
    ExitCode.TARGET_ENDED: "the target ended while parked or during its lazy restore, not by memcr's hand",
}

# The codes of failures that leave the target running intact, as it was before memcr
INTACT = frozenset({ExitCode.FAILED, ExitCode.USAGE, ExitCode.TARGET, ExitCode.RIGHTS, ExitCode.STORAGE})

for _failure, _code in EXIT_CODES.items():
    _failure.exit_code = _code
