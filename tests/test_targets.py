"""Targets with special memory or many resources survive a round trip."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Memcr, log_value, round_trip


def test_thousand_open_fds(spawn, memcr: Memcr) -> None:
    target = spawn("fds")
    assert len(list(Path(f"/proc/{target.pid}/fd").iterdir())) >= 1000
    round_trip(target, memcr)


def test_mlocked_pages_are_skipped(spawn, memcr: Memcr) -> None:
    target = spawn("mlocked")
    out = round_trip(target, memcr)
    assert log_value(out, r"1 locked \(mlock\) VMAs stay in memory")
    # 32 MiB unlocked were dropped, the 8 MiB locked stayed
    before, after = map(int, log_value(out, r"RssAnon (\d+) kB -> (\d+) kB").groups())
    assert 8 * 1024 <= after < before - 30 * 1024


def test_memory_map_changing_up_to_the_freeze(spawn, memcr: Memcr) -> None:
    """VmFlags read before the freeze are not used once the layout moved: smaps is read again."""
    target = spawn("remapping")
    out = round_trip(target, memcr)
    assert "the memory map changed while freezing: reading it again" in out
    before, after = map(int, log_value(out, r"RssAnon (\d+) kB -> (\d+) kB").groups())
    assert after < before - 15 * 1024


def test_protected_mappings(spawn, memcr: Memcr) -> None:
    target = spawn("prot")
    out = round_trip(target, memcr)
    before, after = map(int, log_value(out, r"RssAnon (\d+) kB -> (\d+) kB").groups())
    assert after < before - 15 * 1024  # all four 4 MiB regions were dropped


def test_python_interpreter(spawn, memcr: Memcr) -> None:
    target = spawn("pydict")
    round_trip(target, memcr)
