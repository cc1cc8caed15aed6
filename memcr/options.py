"""What a checkpoint is asked to do, and the checks of the sockets' folders the daemon makes at its start.

Apart from memcr.park.checkpoint so that the daemon, idle, need not load the
checkpoint engine (ptrace, the parasite, the dump's writers) before its
first request.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memcr.dump.codec import Coding
from memcr.errors import Folder, MissingFolders, StorageError
from memcr.system import accounts

Log = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    dump_dir: Path = Path("/tmp")
    socket_dir: Path | None = None  # None: the parasite listens on an abstract socket
    socket_gid: int | None = None
    netns: bool = False
    proc_mem: bool = False
    rss_file: bool = False
    allow_async_io: bool = False
    coding: Coding = field(default_factory=Coding)
    lazy: bool = False  # on restore: run at once, pages on first touch (memcr.lazy)
    incremental: bool = False  # the daemon keeps a restored target's dump, its next park writes what changed

    def reported(self) -> dict[str, object]:
        """The options a report names (memcr.report.OPTION_FIELDS): those that change what the dump is."""
        return {
            "compress": self.coding.compress,
            "checksum": self.coding.checksum,
            "cipher": self.coding.cipher,
            "lazy": self.lazy,
            "proc_mem": self.proc_mem,
            "rss_file": self.rss_file,
        }


class Cancel:
    """Asks a checkpoint under way to roll back and let its target run on; usable from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def parasites_folder(folder: Path, gid: int | None) -> Folder:
    """The parasites' folder (-S) as an administrator makes it: the targets' users make their sockets in it, as
    members of -G's group or else as anyone, and its sticky bit keeps each from removing another's."""
    return Folder(folder, os.geteuid(), gid, 0o1770 if gid is not None else 0o1777)


def check_socket_dir(folder: Path, gid: int | None, besides: Sequence[Folder] = ()) -> None:
    """Refuse a parasites' folder (-S) in which someone other than root or memcr could swap a socket.

    The parasite of each target makes its socket there, as the target's
    user, and then gives it its group: whoever owns the folder, or every
    user where all may write in it without the sticky bit, could remove or
    replace that socket meanwhile. With -G, the targets' users make their
    sockets there as members of that group. A missing folder is named
    with those of `besides` that are missing too (the daemon socket's,
    which /run loses with it at each boot), for the advice to make them all.
    """
    where = f"the parasite socket folder {folder} (-S)"
    if not os.path.lexists(folder):
        needed = [*besides, parasites_folder(folder, gid)]
        raise MissingFolders(
            f"{where} does not exist",
            [f for f in needed if not os.path.lexists(f.path)],
            path=folder,
            errno=errno.ENOENT,
        )
    st = check_socket_folder(folder, where, "-S")
    if gid is not None and st.st_gid != gid:
        raise StorageError(
            f"{where} is of {accounts.group(st.st_gid)}, not of -G's {accounts.group(gid)}: the targets' users, "
            f"in that group, make their sockets there (chgrp {accounts.group_name(gid)} {folder})",
            path=folder,
        )


def check_socket_folder(folder: Path, where: str, option: str) -> os.stat_result:
    """Refuse a folder of sockets (the daemon's, -l; the parasites', -S) where others could replace one.

    That is a symlink, whose target whoever may change it could swap; a
    folder of a user other than root and memcr's; or one every user may
    write in without the sticky bit (as /tmp has, which keeps each from
    removing or renaming what is another's). Returns its status.
    """
    try:
        st = os.lstat(folder)
    except OSError as e:
        raise StorageError(f"cannot use {where}: {e.strerror}", path=folder, errno=e.errno) from None
    if stat.S_ISLNK(st.st_mode):
        raise StorageError(
            f"{where} is a symlink, which whoever may change it could point elsewhere: give {option} the real folder "
            f"({os.path.realpath(folder)})",
            path=folder,
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{where} is not a folder: choose another {option}", path=folder, errno=errno.ENOTDIR)
    if st.st_uid not in (0, os.geteuid()):
        raise StorageError(
            f"{where} belongs to {accounts.user(st.st_uid)}, who could replace the sockets in it: give it to "
            f"root or memcr's user (chown {accounts.user_name(os.geteuid())} {folder})",
            path=folder,
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise StorageError(
            f"{where} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}), who could replace the "
            f"sockets in it: make it sticky (chmod +t {folder}) or take that right away (chmod o-w {folder})",
            path=folder,
        )
    return st
