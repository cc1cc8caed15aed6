"""Self-hardening at start-up: memcr holds other processes' pages and the dump key.

Three steps, each fatal when it fails:
* core dumps off (RLIMIT_CORE 0): a crash must not write those pages to disk;
* undumpable (PR_SET_DUMPABLE 0): no same-user ptrace, /proc/<memcr>/ owned
  by root, no core dump even if the limit is raised again;
* no tracer attached at start (TracerPid): one that is already attached
  keeps seeing everything, whatever memcr does next.
"""

from __future__ import annotations

import resource

from memcr.errors import HardeningError
from memcr.system import libc, procfs

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def tracer_pid() -> int:
    return int(procfs.read_status("self").get("TracerPid", "0"))


def harden(allow_tracer: bool = False) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as e:
        raise HardeningError(f"cannot turn core dumps off (RLIMIT_CORE): {e}") from None
    try:
        libc.prctl(PR_SET_DUMPABLE, 0)
        dumpable = libc.prctl(PR_GET_DUMPABLE)
    except OSError as e:
        raise HardeningError(f"cannot make memcr undumpable (PR_SET_DUMPABLE): {e.strerror}") from None
    if dumpable:
        raise HardeningError("cannot make memcr undumpable (PR_SET_DUMPABLE): it is dumpable still")
    tracer = tracer_pid()
    if tracer and not allow_tracer:
        raise HardeningError(
            f"memcr is being traced by process {tracer} (a debugger or strace), which could read "
            "the memory memcr saves and its dump key: refusing to run "
            "(--allow-tracer runs anyway, for debugging only)"
        )


def raise_descriptor_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each parked process holds a few descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
