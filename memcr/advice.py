"""What to do about a failure, in terms of memcr's options: for the CLI's messages and the daemon's log.

The library's errors say what went wrong and carry the data (pid, path,
errno, what); only here are they turned into flags to try.
"""

from __future__ import annotations

import errno

from memcr.errors import Folder, MemcrError, MissingFolders, RightsError, TargetLimit
from memcr.launcher import capability_advice, folders_list
from memcr.system.accounts import group_name, user_name

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def advice(error: MemcrError) -> str:
    """The fix for `error`, or "" when its message says it all."""
    what, code = error.what, error.errno
    if what == "dump-dir":
        if code == errno.ENOENT:
            return "create it or choose another with -d"
        if code == errno.ENOTDIR:
            return "choose a directory with -d"
        return "choose a writable directory with -d"
    if what == "dump":
        if code in _NO_SPACE:
            return "free space or use -d on a larger filesystem"
        if code in _NOT_WRITABLE:
            return "choose a writable directory with -d"
    if what == "proc-mem":
        return "run memcr as root, or leave out -m/--proc-mem"
    if what == "async-io":
        return (
            "--allow-async-io parks it anyway, at your risk: if a write lands while it is parked, "
            "memcr kills it rather than restore it wrong"
        )
    if what == "descriptors":
        return "Raise the limit (ulimit -n, LimitNOFILE=) or park fewer processes at once"
    if isinstance(error, TargetLimit):
        return _limit_advice(error)
    if what == "sched-deadline":
        return (
            "give one of its threads another policy (chrt --other -p 0 TID) or the reset-on-fork flag "
            "(chrt --reset-on-fork --deadline with its runtime, deadline and period), then retry"
        )
    if what == "pid-namespace":
        return (
            "this holds for the process's whole life: park the processes of its new pid namespace instead, "
            "or have it call unshare(CLONE_NEWPID) in a child (unshare --pid --fork)"
        )
    if what == "netns":
        if isinstance(error, RightsError):
            return "give memcr CAP_SYS_ADMIN, or instead of -N a folder both reach for the parasite's socket (-S DIR)"
        return "add -N (--parasite-socket-netns) to connect from inside it, or give a folder for its socket (-S DIR)"
    if isinstance(error, MissingFolders):
        return make_folders(error.folders)
    if isinstance(error, RightsError) and "CAP_SYS_PTRACE" in str(error):
        return capability_advice()  # which file gets the capability, and the command
    return ""


def _limit_advice(error: TargetLimit) -> str:
    """The command that lifts a target's limit, enough for the parasite (as root: it may raise a hard limit too)."""
    if error.what == "max-map-count":
        return f"raise it (sysctl -w vm.max_map_count={error.wanted}) or have the process unmap some, then retry"
    option = {"nofile": "--nofile", "as": "--as", "data": "--data"}.get(error.what or "")
    if option is None:
        return ""
    # SOFT: leaves the hard limit as it is; one below the new soft limit is raised with it
    value = f"{error.wanted}:" if error.hard is None or error.wanted <= error.hard else f"{error.wanted}:{error.wanted}"
    return f"raise it (prlimit --pid {error.pid} {option}={value}), then retry"


def make_folders(folders: list[Folder]) -> str:
    """The administrator's step that makes `folders`: the install's list of memcr's folders, when it has them all."""
    listed = folders_list(f.path for f in folders)
    if listed is not None:
        return f"as root, make memcr's folders as its install lists them (systemd-tmpfiles --create {listed})"
    commands = " && ".join(
        f"install -d -o {user_name(f.uid)}{'' if f.gid is None else ' -g ' + group_name(f.gid)} -m {f.mode:04o} "
        f"{f.path}"
        for f in folders
    )
    return f"as root, make memcr's folders ({commands})"


def explain(error: MemcrError) -> str:
    """The error's message with its advice."""
    fix = advice(error)
    if not fix:
        return str(error)
    return f"{error}{'. ' if fix[0].isupper() or fix.startswith('--') else ': '}{fix}"
