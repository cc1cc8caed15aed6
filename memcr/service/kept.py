"""The dumps the daemon keeps for incremental re-parks (`memcr -l --incremental`), one per restored pid.

A kept dump is space taken in its folder while its app runs: the daemon
says how much at each restore, frees it when its process exits (looked at
every few seconds, and at the next request for the pid), and at its own
end. A daemon that dies leaves it unlocked, and the next memcr to start
with that folder deletes it (memcr.dump.format.remove_orphans).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from memcr import logs
from memcr.errors import MemcrError
from memcr.options import Log
from memcr.system import procfs

if TYPE_CHECKING:
    from memcr.park.incremental import Kept

SWEEP = 5.0  # seconds between looks at whether the processes of kept dumps still live


class KeptDumps:
    def __init__(self, log: Log) -> None:
        self.log = log
        self._kept: dict[int, Kept] = {}
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def keep(self, kept: Kept) -> None:
        """Hold `kept` until its pid's next checkpoint, or its process's end."""
        with self._lock:
            old = self._kept.pop(kept.pid, None)
            self._kept[kept.pid] = kept
        if old is not None:
            self._free(old, "a newer one replaces it")
        self.log(
            f"pid {kept.pid}: its dump {kept.dump.path} is kept for its next park ({kept.size / 2**20:.1f} MiB); "
            "from now on memcr tracks which pages it writes"
        )

    def take(self, pid: int) -> Kept | None:
        """The dump kept for `pid`, which the caller owns from now on; None if there is none."""
        with self._lock:
            return self._kept.pop(pid, None)

    def drop(self, pid: int, why: str) -> None:
        """Free the dump kept for `pid`, if any."""
        if (kept := self.take(pid)) is not None:
            self._free(kept, why)

    def evict(self) -> bool:
        """Free the dump kept longest (a checkpoint needs its descriptors); False when none is kept."""
        with self._lock:
            if not self._kept:
                return False
            kept = self._kept.pop(next(iter(self._kept)))
        self._free(kept, "memcr needs its descriptors for a checkpoint (RLIMIT_NOFILE)")
        return True

    def sweep(self) -> None:
        """Free the dumps of processes that ended; at most every SWEEP seconds (called from the accept loop)."""
        now = time.monotonic()
        if now - self._swept < SWEEP:
            return
        self._swept = now
        with self._lock:
            pids = list(self._kept)
        for pid in pids:
            with self._lock:
                kept = self._kept.get(pid)
            if kept is None or (why := _ended(kept)) is None:
                continue
            with self._lock:  # the pid may have been parked and restored again meanwhile: that dump stays
                if self._kept.get(pid) is not kept:
                    continue
                del self._kept[pid]
            self._free(kept, why)

    def close(self) -> None:
        """Free every kept dump (the daemon stops: nobody would track the writes any more)."""
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
        for one in kept:
            self._free(one, "the daemon stops")

    def _free(self, kept: Kept, why: str) -> None:
        size = kept.size
        problem = kept.close()
        self.log(f"pid {kept.pid}: freed its kept dump ({size / 2**20:.1f} MiB): {why}")
        if problem:
            logs.error(self.log, f"warning: {problem}")


def _ended(kept: Kept) -> str | None:
    try:
        stat = procfs.read_stat(kept.pid)
    except MemcrError:
        return "its process ended"
    if stat.start != kept.start_time or stat.state in ("Z", "X"):
        return "its process ended"
    return None
