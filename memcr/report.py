"""What one checkpoint and restore did, in figures: for the log lines and for `--json`.

The human lines are an interface too (the C memcr's "download took" and
"upload took" are what its users grep), but programs read the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

RSS_KEYS = ("VmRSS", "RssAnon", "RssFile")


@dataclass
class Report:
    pid: int
    page_size: int
    threads: int = 0
    vmas: int = 0
    pages: int = 0  # dumped and dropped
    locked_vmas: int = 0  # mlock()ed mappings left in memory
    shared_pages: int = 0  # pages other processes map too, left in memory
    setup_ms: float = 0.0  # seize, inject, scan: frozen time before the first page moves
    download_ms: float = 0.0
    upload_ms: float = 0.0
    release_ms: float = 0.0  # parasite out, threads let go: frozen time after the last page
    rss_before: dict[str, int] = field(default_factory=dict)  # kB, RSS_KEYS
    rss_after: dict[str, int] = field(default_factory=dict)
    dump_path: str = ""
    dump_bytes: int = 0

    def json(self, event: str) -> str:
        """One line: {"event": "checkpoint" | "restore", ...every field}."""
        return json.dumps({"event": event, **asdict(self)}, separators=(",", ":"))


def rate(pages: int, page_size: int, ms: float) -> float:
    """MiB/s, for the log lines."""
    return pages * page_size / 2**20 / max(ms / 1000, 1e-6)
