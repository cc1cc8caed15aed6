"""What a client names for a checkpoint: its dump directory and its cgroup, checked before memcr follows them."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from memcr.dump.format import check_directory
from memcr.errors import StorageError, UsageError
from memcr.group.cgroup import Cgroup
from memcr.system import accounts, procfs


def check_request_cgroup(text: str) -> Cgroup:
    """A cgroup a client named: in the cgroup v2 hierarchy by its plain path, as --cgroup takes it.

    Relative to the v2 mount or absolute under it; a ".." is refused rather
    than resolved, and so is a control character, which no log line may
    carry. The checks of --cgroup follow: it exists, is a cgroup and not
    the root one.
    """
    shown = quoted(text)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UsageError(f"the cgroup {shown} has a control character in it", path=text, what="cgroup")
    path = Path(text)
    if ".." in path.parts:
        raise UsageError(f"the cgroup {shown} has a '..' in it: give its plain path", path=text, what="cgroup")
    mount = procfs.cgroup2_mount()
    if path.is_absolute() and mount is not None and mount not in path.parents:
        raise UsageError(f"the cgroup {shown} is not under the cgroup v2 mount {mount}", path=text, what="cgroup")
    return Cgroup.find(text, label=f"the cgroup {shown}")


def check_request_directory(text: str) -> Path:
    """A dump directory a client named: -d's checks, and none of the folders on its way a trap.

    The client is not memcr's user, so memcr must not follow it somewhere
    else: the path must be absolute, without symlinks or "..", and every
    folder on it, the directory included, must belong to root or memcr's
    user and be writable by nobody else, unless sticky (as /tmp is): else
    its owner or its writers could swap a folder for a symlink between this
    check and the dump's creation, or remove the dump of a parked target.
    """
    path, shown = Path(text), quoted(text)
    if not path.is_absolute():
        raise StorageError(f"the dump directory {shown} is not an absolute path", path=text, what="dump-dir")
    if ".." in path.parts:
        raise StorageError(f"the dump directory {shown} has a '..' in it: give its plain path", path=text)
    folder = Path(path.anchor)
    _check_dump_folder(folder, os.lstat(folder), text)
    for name in path.parts[1:]:
        folder /= name
        where = quoted(folder)
        try:
            st = os.lstat(folder)
        except OSError as e:
            raise StorageError(f"dump directory {shown}: {where}: {e.strerror}", path=text, errno=e.errno) from None
        if stat.S_ISLNK(st.st_mode):
            raise StorageError(
                f"dump directory {shown}: {where} is a symlink, which memcr does not follow for a client: "
                f"give the real path ({quoted(os.path.realpath(path))})",
                path=text,
            )
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"dump directory {shown}: {where} is not a directory", path=text, errno=errno.ENOTDIR)
        _check_dump_folder(folder, st, text)
    check_directory(path)  # -d's own checks: a directory, writable
    return path


def _check_dump_folder(folder: Path, st: os.stat_result, text: str) -> None:
    shown, where = quoted(text), quoted(folder)
    if st.st_uid not in (0, os.geteuid()):
        raise StorageError(
            f"dump directory {shown}: {where} belongs to {accounts.user(st.st_uid)}, who could swap what is in it: "
            "use folders owned by root or by memcr's user",
            path=text,
        )
    others = stat.S_IWGRP | stat.S_IWOTH
    if st.st_mode & others and not st.st_mode & stat.S_ISVTX:
        raise StorageError(
            f"dump directory {shown}: {where} is writable by users other than its owner "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), who could swap what is in it: "
            f"take that right away (chmod go-w {where}) or make it sticky (chmod +t {where})",
            path=text,
        )


def quoted(value: object) -> str:
    """A client's path as the log shows it: quoted (a newline in it cannot start a line of its own), and short."""
    text = repr(str(value))
    return text if len(text) <= 300 else text[:290] + "...'"
