"""What one checkpoint and restore did, in figures: for the log lines and for `--json`.

The human lines are an interface too (the C memcr's "download took" and
"upload took" are what its users grep), but programs read the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from memcr.errors import MemcrError
from memcr.procfs import memory_kb

RSS_KEYS = ("VmRSS", "RssAnon", "RssFile")


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
    setup_ms: float = 0.0  # seize, inject, scan: frozen time before the first page moves
    download_ms: float = 0.0
    upload_ms: float = 0.0
    release_ms: float = 0.0  # parasite out, threads let go: frozen time after the last page
    rss_before: dict[str, int] = field(default_factory=dict)  # kB, RSS_KEYS
    rss_after: dict[str, int] = field(default_factory=dict)  # parked
    rss_restored: dict[str, int] = field(default_factory=dict)  # after the restore
    dump_path: str = ""
    dump_bytes: int = 0

    def json(self, event: str) -> str:
        """One line: {"event": "checkpoint" | "restore", ...every field}."""
        return json.dumps({"event": event, **asdict(self)}, separators=(",", ":"))


def error_json(pid: int, operation: str, error: MemcrError) -> str:
    """One line: {"event": "error", "operation": ..., "pid", "error" (the message), "exit_code", "type"}."""
    return json.dumps(
        {
            "event": "error",
            "operation": operation,
            "pid": pid,
            "error": str(error),
            "type": type(error).__name__,
            "exit_code": error.exit_code,
        },
        separators=(",", ":"),
    )


def rss(status: dict[str, str]) -> dict[str, int]:
    """The RSS_KEYS of a /proc/<pid>/status, in kB."""
    return {key: memory_kb(status, key) for key in RSS_KEYS}


def rate(pages: int, page_size: int, ms: float) -> float:
    """MiB/s, for the log lines."""
    return pages * page_size / 2**20 / max(ms / 1000, 1e-6)
