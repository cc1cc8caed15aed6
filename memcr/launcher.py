"""A system install's layout, for the advice memcr gives: its capability launcher, and its list of folders.

A Python script cannot carry a file capability, so non-root deployments
start memcr through a small C launcher (deploy/memcr-launch.c) that holds
CAP_SYS_PTRACE. deploy/install-system.sh installs it as PREFIX/bin/memcr
next to the virtual environment PREFIX/venv, whose python it runs with
`-I -m memcr`; so from inside memcr, sys.prefix is PREFIX/venv. The
launcher passes no trace of itself on (it replaces the environment and
argv[0]), which leaves that layout as the way to find it. Beside it,
PREFIX/share/memcr-tmpfiles.conf lists memcr's folders for systemd-tmpfiles.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from memcr.errors import MemcrError
from memcr.system import procfs

DEFAULT_PREFIX = Path("/opt/memcr")  # the Makefile's PREFIX, as docs/SECURITY.md shows it
CAP_SYS_PTRACE = 19  # <linux/capability.h>
ELF_MAGIC = b"\x7fELF"


def launcher_path(prefix: str | os.PathLike[str] | None = None) -> Path | None:
    """The launcher of the install whose venv is `prefix` (default: this interpreter's), or None."""
    venv = Path(sys.prefix if prefix is None else prefix)
    candidate = venv.parent / "bin" / "memcr"
    if venv.name != "venv" or not candidate.is_file():
        return None
    try:
        with open(candidate, "rb") as f:
            # a pip-installed `memcr` entry point is a Python script; the launcher is compiled
            return candidate if f.read(len(ELF_MAGIC)) == ELF_MAGIC else None
    except PermissionError:
        return candidate  # mode 0750 for its group only: no script is installed that way
    except OSError:
        return None


def folders_list(folders: Iterable[Path], prefix: str | os.PathLike[str] | None = None) -> Path | None:
    """The list of memcr's folders of the install whose venv is `prefix` (default: this interpreter's), or None
    unless it lists each of `folders` (a memcr started with other folders than the install's)."""
    venv = Path(sys.prefix if prefix is None else prefix)
    if venv.name != "venv":
        return None
    listed = venv.parent / "share" / "memcr-tmpfiles.conf"
    try:
        lines = listed.read_text().splitlines()
    except OSError:
        return None
    made = {fields[1] for fields in map(str.split, lines) if len(fields) > 1 and fields[0] == "d"}
    return listed if all(str(folder) in made for folder in folders) else None


def may_trace() -> bool:
    """Whether memcr holds CAP_SYS_PTRACE in its effective set (root normally does)."""
    try:
        effective = int(procfs.read_status("self").get("CapEff", "0"), 16)
    except (MemcrError, OSError, ValueError):
        return False
    return bool(effective >> CAP_SYS_PTRACE & 1)


def capability_advice(launcher: Path | None = None, capable: bool | None = None) -> str:
    """How memcr may get CAP_SYS_PTRACE without root, in terms of what this user may do.

    "" when memcr holds the capability already: then the kernel refused for
    another reason (Yama's ptrace_scope, a security module), which the
    error's message names. The launcher is named only to a user who may
    start it (memcr's own user); anyone else is sent to the daemon, whose
    clients an administrator chooses.
    """
    if may_trace() if capable is None else capable:
        return ""
    found = launcher if launcher is not None else launcher_path() or launcher_path(DEFAULT_PREFIX / "venv")
    if found is None:
        documented = DEFAULT_PREFIX / "bin" / "memcr"
        return (
            "without root, memcr needs its launcher, which holds the capability: an administrator installs it "
            f"with `make install-system`, as {documented} (docs/SECURITY.md)"
        )
    if not os.access(found, os.X_OK):
        return (
            "without root, only memcr's own user may start it with the capability: ask the memcr daemon instead "
            "(memcr-client); an administrator lets a user do so by adding it to the daemon's clients' group "
            "(docs/SECURITY.md)"
        )
    return (
        f"without root, start memcr through its launcher {found}, which must hold the capability: "
        f"setcap cap_sys_ptrace=ep {found}"
    )
