"""Users and groups as memcr's messages name them, and the group memberships its options need.

memcr without root gives a file a group (-g for its socket and the socket's
folder; -G has the parasite do so for its socket) only as a member of that
group, and connects to a parasite socket of another user only through its
group: a missing membership is named with the command that adds it.
"""

from __future__ import annotations

import grp
import os
import pwd

from memcr.errors import RightsError
from memcr.system import processes


def user_name(uid: int) -> str:
    """The login name of `uid`, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user(uid: int) -> str:
    """As a message names a user: "user memcr (uid 999)", or "uid 999"."""
    name = user_name(uid)
    return f"user {name} (uid {uid})" if name != str(uid) else f"uid {uid}"


def group(gid: int) -> str:
    name = group_name(gid)
    return f"group {name} (gid {gid})" if name != str(gid) else f"gid {gid}"


def in_group(gid: int) -> bool:
    """Whether memcr runs with `gid` as its group or one of its supplementary groups."""
    return gid == os.getegid() or gid in os.getgroups()


def not_in_group(gid: int, consequence: str, target: int | None = None) -> RightsError:
    """The refusal for memcr's user (or with `target`, that process's) missing from `gid`: what it prevents, the fix.

    A process has the groups it started with: the fix takes a new start.
    """
    if target is None:
        uid, whose, restart = os.geteuid(), "memcr's", "memcr"
    else:
        uid, whose, restart = processes.real_uid(target), f"process {target}'s", f"process {target}"
    return RightsError(
        f"{whose} {user(uid)} is not in {group(gid)}, so {consequence}: add it to the group "
        f"(usermod -aG {group_name(gid)} {user_name(uid)}) and start {restart} again",
        pid=target,
        what="group",
    )
