"""A cgroup v2 as a set of processes: its members (sub-cgroups included), held still by its freezer."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from memcr.errors import RightsError, TargetError, UsageError
from memcr.system import procfs

FREEZE_WAIT = 2.0  # seconds for every task of the cgroup to reach the freezer


def parse_events(text: str) -> dict[str, int]:
    """cgroup.events: `populated 1`, `frozen 0`, a key and a number a line."""
    events = {}
    for line in text.split("\n"):
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            events[key] = int(value)
    return events


class Cgroup:
    """A non-root cgroup of the v2 hierarchy, by its absolute directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def find(cls, spec: str | os.PathLike[str], label: str | None = None) -> Cgroup:
        """The cgroup at `spec`: absolute, or relative to the v2 mount (e.g. system.slice/app.service).

        `label` names `spec` in the messages (the daemon quotes a client's);
        by default, as the command line gave it.
        """
        label = label or f"--cgroup {spec}"
        mount = procfs.cgroup2_mount()
        if mount is None:
            raise RightsError(f"{label}: no cgroup v2 hierarchy is mounted (cgroup2)", what="cgroup")
        given = Path(spec)
        path = Path(os.path.realpath(given if given.is_absolute() else mount / given))
        if path != mount and mount not in path.parents:
            raise UsageError(f"{label}: {path} is not in the cgroup v2 hierarchy at {mount}", path=path)
        if not (path / "cgroup.procs").is_file():
            raise UsageError(f"{label}: {path} is not a cgroup", path=path, errno=errno.ENOENT)
        if path == mount:
            raise UsageError(f"{label}: the root cgroup holds every process of the system", path=path)
        return cls(path)

    def __str__(self) -> str:
        return str(self.path)

    def pids(self) -> set[int]:
        """Every process in the cgroup and its sub-cgroups, now."""
        found: set[int] = set()
        for folder, _, _ in os.walk(self.path):
            text = _read(Path(folder) / "cgroup.procs", missing_ok=folder != str(self.path))
            found |= procfs.parse_pids(text)
        return found

    @contextlib.contextmanager
    def frozen(self, log: Callable[[str], None]) -> Iterator[None]:
        """Freeze every task of the cgroup (and its sub-cgroups) for the block, and thaw it after, always.

        A task frozen so still stops for PTRACE_INTERRUPT (checked on Linux
        6.18), and stays in that ptrace stop once thawed: so the set can be
        seized while nobody in it can fork or move, and run again only under
        memcr's hold. A cgroup frozen before memcr came is refused: memcr
        could not run its parasite in it, nor decide to thaw it.
        """
        if os.getpid() in self.pids():
            raise TargetError(f"memcr itself is in cgroup {self.path}: it would freeze itself", path=self.path)
        if self._events().get("frozen"):
            raise TargetError(
                f"cgroup {self.path} is frozen: memcr cannot run its parasite in frozen processes. "
                f"Thaw it first (echo 0 > {self.path / 'cgroup.freeze'})",
                path=self.path,
            )
        self._write_freeze("1")
        try:
            deadline = time.monotonic() + FREEZE_WAIT
            while not self._events().get("frozen"):
                if time.monotonic() > deadline:
                    # a task held in the kernel; the membership walks, repeated until stable, still catch forks
                    log(f"cgroup {self.path} did not freeze within {FREEZE_WAIT:g} s: seizing it while it runs")
                    break
                time.sleep(0.001)
            yield
        finally:
            self._write_freeze("0")

    def _events(self) -> dict[str, int]:
        return parse_events(_read(self.path / "cgroup.events"))

    def _write_freeze(self, value: str) -> None:
        path = self.path / "cgroup.freeze"
        try:
            path.write_text(value)
        except OSError as e:
            raise RightsError(
                f"cannot write {value} into {path}: {e.strerror}", path=path, errno=e.errno, what="cgroup"
            ) from None


def _read(path: Path, missing_ok: bool = False) -> str:
    """A cgroup file; with missing_ok, "" for a sub-cgroup removed meanwhile."""
    try:
        return path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise TargetError(f"cgroup {path.parent} is gone", path=path, errno=errno.ENOENT) from None
    except OSError as e:
        raise RightsError(f"cannot read {path}: {e.strerror}", path=path, errno=e.errno, what="cgroup") from None
