"""What one checkpoint and restore did, in figures: for the log lines and for `--json`.

The human lines are an interface too (the C memcr's "download took" and
"upload took" are what its users grep), but programs read the JSON: its
fields and their types are SCHEMA, documented in docs/reports.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from memcr.errors import MemcrError
from memcr.system.procfs import memory_kb

RSS_KEYS = ("VmRSS", "RssAnon", "RssFile")

# "schema" of every JSON line: raised when a field is removed or changes its meaning or type (a program
# that reads the lines checks it); a field added to a line leaves it as it is
SCHEMA_VERSION = 1


@dataclass
class Report:
    pid: int
    page_size: int
    threads: int = 0
    vmas: int = 0
    pages: int = 0  # planned: dumped, then dropped
    dropped_pages: int = 0  # of those, dropped (the kernel refuses locked pages)
    locked_vmas: int = 0  # mlock()ed mappings left in memory
    shared_pages: int = 0  # pages other processes map too, left in memory
    precopy_ms: float = 0.0  # an incremental re-park: copying what the target changed, while it still ran
    precopy_held_ms: float = 0.0  # of that, every thread held: the scan that lists what to copy
    setup_ms: float = 0.0  # seize, inject, scan: frozen time before the first page moves
    download_ms: float = 0.0
    upload_ms: float = 0.0
    release_ms: float = 0.0  # parasite out, threads let go: frozen time after the last page
    lazy_ms: float = 0.0  # a lazy restore: from the target running again until every page was back
    lazy_faults: int = 0  # of those pages, faults the target waited for
    lazy_children: int = 0  # processes it forked during the lazy phase (each served as it touched its pages)
    ended: str = ""  # it ended during the lazy phase, not by memcr's hand: "killed by SIGKILL", "exited with 3"
    rss_before: dict[str, int] = field(default_factory=dict)  # kB, RSS_KEYS
    rss_after: dict[str, int] = field(default_factory=dict)  # parked
    rss_restored: dict[str, int] = field(default_factory=dict)  # after the restore
    dump_path: str = ""
    dump_bytes: int = 0
    written_bytes: int = 0  # what this park wrote: all of the dump, or what an incremental one added to it
    kept_bytes: int = 0  # after a restore: the dump kept for an incremental re-park (0: deleted)
    # how the dump was made and the restore done: OPTION_FIELDS (memcr.options.Options.reported);
    # "lazy" in a restore's line: whether it was lazy, as asked and where it could be
    options: dict[str, object] = field(default_factory=dict)

    def json(self, event: str) -> str:
        """One line: {"event": "checkpoint" | "restore", "schema", ...every field}."""
        return _line(event, asdict(self))


@dataclass
class GroupReport:
    """A group's park or wake-up in one line: its members' figures summed, and its own wall time.

    shared_pages counts a page once per member that maps it: the pages a
    fork left shared stay in memory in every one of them.
    """

    group: str  # "tree 1234" or "cgroup /sys/fs/cgroup/unified/app"
    members: list[int]
    page_size: int
    threads: int = 0
    pages: int = 0
    dropped_pages: int = 0
    shared_pages: int = 0
    locked_vmas: int = 0
    dump_bytes: int = 0
    written_bytes: int = 0
    park_ms: float = 0.0  # from the first member's check to the last member parked
    wake_ms: float = 0.0  # from the restore request to the last member running
    rss_before: dict[str, int] = field(default_factory=dict)  # kB, summed over the members
    rss_after: dict[str, int] = field(default_factory=dict)
    rss_restored: dict[str, int] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)  # the members', "lazy" false: a group wakes eagerly

    @classmethod
    def of(cls, group: str, reports: list[Report], park_ms: float) -> GroupReport:
        page = reports[0].page_size if reports else 0
        summed = cls(group, [r.pid for r in reports], page, park_ms=park_ms)
        if reports:
            summed.options = {**reports[0].options, "lazy": False}
        for r in reports:
            summed.threads += r.threads
            summed.pages += r.pages
            summed.dropped_pages += r.dropped_pages
            summed.shared_pages += r.shared_pages
            summed.locked_vmas += r.locked_vmas
            summed.dump_bytes += r.dump_bytes
            summed.written_bytes += r.written_bytes
        summed.rss_before = _sum(r.rss_before for r in reports)
        summed.rss_after = _sum(r.rss_after for r in reports)
        return summed

    def restored(self, reports: list[Report], wake_ms: float) -> None:
        self.wake_ms = wake_ms
        self.rss_restored = _sum(r.rss_restored for r in reports)

    def json(self, event: str) -> str:
        """One line: {"event": "group-checkpoint" | "group-restore", "schema", ...every field}."""
        return _line(f"group-{event}", asdict(self))


def _line(event: str, fields: dict[str, object]) -> str:
    return json.dumps({"event": event, "schema": SCHEMA_VERSION, **fields}, separators=(",", ":"))


def _sum(figures: Iterable[dict[str, int]]) -> dict[str, int]:
    total = dict.fromkeys(RSS_KEYS, 0)
    for one in figures:
        for key in RSS_KEYS:
            total[key] += one.get(key, 0)
    return total


# The JSON lines' fields, as data: docs/reports.md documents each, and tests check every line memcr prints
# against it. Types: int, float, str, bool, list[int], rss (an object of RSS_KEYS, each an int in kB),
# options (an object of OPTION_FIELDS); "|null" when it may be null; a type ending in "?" marks a field
# that only some lines have.
OPTION_FIELDS: dict[str, str] = {
    "compress": "str|null",  # "lz4", "zstd", or null
    "checksum": "bool",
    "cipher": "str|null",  # "aes-256-gcm" ..., or null
    "lazy": "bool",
    "proc_mem": "bool",
    "rss_file": "bool",
}
_PROCESS: dict[str, str] = {
    "pid": "int",
    "page_size": "int",
    "threads": "int",
    "vmas": "int",
    "pages": "int",
    "dropped_pages": "int",
    "locked_vmas": "int",
    "shared_pages": "int",
    "precopy_ms": "float",
    "precopy_held_ms": "float",
    "setup_ms": "float",
    "download_ms": "float",
    "upload_ms": "float",
    "release_ms": "float",
    "lazy_ms": "float",
    "lazy_faults": "int",
    "lazy_children": "int",
    "ended": "str",
    "rss_before": "rss",
    "rss_after": "rss",
    "rss_restored": "rss",
    "dump_path": "str",
    "dump_bytes": "int",
    "written_bytes": "int",
    "kept_bytes": "int",
    "options": "options",
}
_GROUP: dict[str, str] = {
    "group": "str",
    "members": "list[int]",
    "page_size": "int",
    "threads": "int",
    "pages": "int",
    "dropped_pages": "int",
    "shared_pages": "int",
    "locked_vmas": "int",
    "dump_bytes": "int",
    "written_bytes": "int",
    "park_ms": "float",
    "wake_ms": "float",
    "rss_before": "rss",
    "rss_after": "rss",
    "rss_restored": "rss",
    "options": "options",
}
_COMMON = {"event": "str", "schema": "int"}
SCHEMA: dict[str, dict[str, str]] = {
    "checkpoint": {**_COMMON, **_PROCESS},
    "restore": {**_COMMON, **_PROCESS},
    "group-checkpoint": {**_COMMON, **_GROUP},
    "group-restore": {**_COMMON, **_GROUP},
    "error": {
        **_COMMON,
        "operation": "str",
        "pid": "int|null",
        "error": "str",
        "type": "str",
        "exit_code": "int",
        "options": "options|null",
        "group": "str?",
    },
}


def error_json(
    pid: int | None,
    operation: str,
    error: MemcrError,
    group: str | None = None,
    options: dict[str, object] | None = None,
) -> str:
    """One line: {"event": "error", "schema", "operation", "pid", "error" (the message), "exit_code", "type", ...}.

    For a group: "pid" is the member that failed (null when it was the
    group's own failure), and "group" names the group. "options" as in
    a report (null where the caller does not know them).
    """
    line: dict[str, object] = {
        "event": "error",
        "schema": SCHEMA_VERSION,
        "operation": operation,
        "pid": pid,
        "error": str(error),
        "type": type(error).__name__,
        "exit_code": error.exit_code,
        "options": options,
    }
    if group is not None:
        line["group"] = group
    return json.dumps(line, separators=(",", ":"))


def rss(status: dict[str, str]) -> dict[str, int]:
    """The RSS_KEYS of a /proc/<pid>/status, in kB."""
    return {key: memory_kb(status, key) for key in RSS_KEYS}


def rate(pages: int, page_size: int, ms: float) -> float:
    """MiB/s, for the log lines."""
    return pages * page_size / 2**20 / max(ms / 1000, 1e-6)
