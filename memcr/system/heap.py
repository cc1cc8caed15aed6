"""glibc malloc settings for memcr's frame buffers (each up to 1 MiB, a few alive at a time).

By default glibc maps such a buffer afresh and unmaps it when freed, so
the kernel zeroes it page by page for every frame: that cost `-z lz4` a
quarter of its speed. memcr keeps them in the heap while it codes frames
and gives the memory back when a dump's coding is done.
"""

from __future__ import annotations

import contextlib

from memcr.system import libc

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP = 64 << 20  # above any frame buffer, below anything that must be mapped on its own


def tune(arenas: int | None = None) -> None:
    """Serve frame buffers from the heap and keep freed ones from now on; `arenas` caps per-thread heaps."""
    if arenas:
        libc.mallopt(M_ARENA_MAX, arenas)
    libc.mallopt(M_MMAP_THRESHOLD, KEEP)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP)
    # what is free by now (loading memcr's modules leaves ~2 MiB) would stay under that threshold for good
    release()


def release() -> None:
    """Give the freed heap back to the system."""
    with contextlib.suppress(OSError):
        libc.malloc_trim(0)
