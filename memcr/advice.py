"""What to do about a failure, in terms of memcr's options: for the CLI's messages and the daemon's log.

The library's errors say what went wrong and carry the data (pid, path,
errno, what); only here are they turned into flags to try.
"""

from __future__ import annotations

import errno

from memcr.accounts import group_name, user_name
from memcr.errors import Folder, MemcrError, MissingFolders, RightsError
from memcr.launcher import capability_advice, folders_list

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
    if isinstance(error, MissingFolders):
        return make_folders(error.folders)
    if isinstance(error, RightsError) and "CAP_SYS_PTRACE" in str(error):
        return capability_advice()  # which file gets the capability, and the command
    return ""


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
