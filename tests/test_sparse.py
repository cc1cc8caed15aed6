"""Sparse mappings: runs packed into few records, their drops merged only across holes, every byte back."""

from __future__ import annotations

import mmap

import pytest

from tests.conftest import Memcr, reports

PAGE = mmap.PAGESIZE
CODINGS = [[], ["-z"], ["-c"], ["-e"], ["-z", "-c", "-e"]]


def park_and_wake(target, memcr: Memcr, *args: str) -> dict:
    """memcr -p PID -n with args; the restore report, once the target found every byte as it was."""
    result = memcr.run("-p", target.pid, "-n", "--json", *args)
    assert result.returncode == 0, result.stderr
    assert memcr.dumps() == []
    assert target.verify() == 0
    (restored,) = [r for r in reports(result.stdout) if r["event"] == "restore"]
    return restored


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: " ".join(c) or "plain")
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_sparse_round_trip(spawn, memcr: Memcr, mode: str, coding: list[str]) -> None:
    target = spawn("sparse")
    r = park_and_wake(target, memcr, *coding, *(["--lazy"] if mode == "lazy" else []))
    assert r["dropped_pages"] == r["pages"] > 2048
    # runs packed, not padded: a page of data costs 16 bytes of table, not a page of padding
    assert r["dump_bytes"] <= 1.1 * r["pages"] * PAGE


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_pages_shared_with_a_child_stay_between_dropped_ones(spawn, memcr: Memcr, mode: str) -> None:
    """A drop spans holes only: the child's pages between the target's own would be lost to the target."""
    target = spawn("sparse", "fork")
    r = park_and_wake(target, memcr, *(["--lazy"] if mode == "lazy" else []))
    assert r["shared_pages"] >= 4 * (64 << 20) // PAGE // 8
    # every 8th page of the first area is the target's own copy: dumped and dropped between shared ones
    assert r["dropped_pages"] == r["pages"] >= (64 << 20) // PAGE // 8
