"""The capability launcher of a system install, for the advice memcr gives when it may not trace.

A Python script cannot carry a file capability, so non-root deployments
start memcr through a small C launcher (deploy/memcr-launch.c) that holds
CAP_SYS_PTRACE. deploy/install-system.sh installs it as PREFIX/bin/memcr
next to the virtual environment PREFIX/venv, whose python it runs with
`-I -m memcr`; so from inside memcr, sys.prefix is PREFIX/venv. The
launcher passes no trace of itself on (it replaces the environment and
argv[0]), which leaves that layout as the way to find it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from memcr import procfs
from memcr.errors import MemcrError

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


def may_trace() -> bool:
    """Whether memcr holds CAP_SYS_PTRACE in its effective set (root normally does)."""
    try:
        effective = int(procfs.read_status("self").get("CapEff", "0"), 16)
    except (MemcrError, OSError, ValueError):
        return False
    return bool(effective >> CAP_SYS_PTRACE & 1)


def capability_advice(launcher: Path | None = None, capable: bool | None = None) -> str:
    """How to give memcr CAP_SYS_PTRACE without root: which file gets it, with what command.

    "" when memcr holds the capability already: then the kernel refused for
    another reason (Yama's ptrace_scope, a security module), which the
    error's message names.
    """
    if may_trace() if capable is None else capable:
        return ""
    found = launcher_path() if launcher is None else launcher
    if found is not None:
        return (
            f"without root, start memcr through its launcher {found}, which must hold the capability: "
            f"setcap cap_sys_ptrace=ep {found}"
        )
    documented = DEFAULT_PREFIX / "bin" / "memcr"
    return (
        "without root, start memcr through its launcher, which must hold the capability: "
        f"`make install-system` installs it as {documented} and runs setcap cap_sys_ptrace=ep {documented} "
        "(docs/SECURITY.md)"
    )
