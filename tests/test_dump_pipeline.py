"""Compression, checksum and encryption: round trips, sizes, secrecy, tampering."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.conftest import Memcr

COMBINATIONS = [
    ["-z"],
    ["-z", "lz4"],
    ["-z", "zstd"],
    ["--compress=zstd"],
    ["-z", "LZ4"],
    ["-c"],
    ["-e"],
    ["-e", "aes-128-cbc"],
    ["-e", "aes-192-cbc"],
    ["-e", "aes-256-cbc"],
    ["-e", "aes-256-gcm"],
    ["-z", "zstd", "-c", "-e"],
    ["-zc"],
    ["-m", "-z", "-c", "-e", "aes-256-cbc"],
]


@pytest.mark.parametrize("options", COMBINATIONS, ids=" ".join)
def test_round_trip(spawn, memcr: Memcr, options: list[str]) -> None:
    target = spawn("pattern", 32, 2)
    result = memcr.run("-p", target.pid, "-n", *options)
    assert result.returncode == 0, result.stderr
    assert memcr.dumps() == []
    assert target.verify() == 0


def frozen_dump(spawn, memcr: Memcr, name: str, *options: object):
    """A target checkpointed in interactive mode, with the path of its dump."""
    target = spawn(name, 32)
    session = memcr.interactive("-p", target.pid, *options)
    session.wait_prompt()
    [dump] = memcr.dumps()
    return target, session, dump


def dump_size(spawn, memcr: Memcr, *options: str) -> int:
    target, session, dump = frozen_dump(spawn, memcr, "text", *options)
    size = dump.stat().st_size
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0
    return size


def test_compression_shrinks_text(spawn, memcr: Memcr) -> None:
    plain = dump_size(spawn, memcr)
    assert dump_size(spawn, memcr, "-z", "lz4") < plain * 0.5
    assert dump_size(spawn, memcr, "-z", "zstd") < plain * 0.3


def mix(x: int) -> int:
    """The targets' pattern function (tests/targets/common.h)."""
    m = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31) | 1


PATTERN_WORDS = [mix(1 + i).to_bytes(8, "little") for i in (0, 1, 1000, 100_000)]


@pytest.mark.parametrize("cipher", [None, "aes-256-gcm", "aes-128-cbc"])
def test_encrypted_dump_holds_no_plaintext(spawn, memcr: Memcr, cipher: str | None) -> None:
    options = ["-e", cipher] if cipher else []
    target, session, dump = frozen_dump(spawn, memcr, "pattern", *options)
    data = dump.read_bytes()
    found = [word in data for word in PATTERN_WORDS]
    # the plain dump shows the check can fail: the target's words are there
    assert found == ([False] * 4 if cipher else [True] * 4)
    assert session.press_enter() == 0, session.stderr()
    assert target.verify() == 0


def flip_byte(dump: Path, where: str) -> None:
    """Flip one byte and set the modification time back, as a writer who knows memcr looks at it would: the
    dump's own checks (structure, checksum, cipher) must catch the change, not DumpFile.stamp."""
    before = dump.stat()
    size = before.st_size
    offset = {"header": 10, "first record": 100, "middle": size // 2, "last byte": size - 1}[where]
    with open(dump, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(dump, ns=(before.st_atime_ns, before.st_mtime_ns))


def assert_killed(target, session, memcr: Memcr) -> None:
    assert session.press_enter() == 6
    stderr = session.stderr()
    assert "killed" in stderr and "dump" in stderr, stderr
    assert target.proc.wait(30) == -signal.SIGKILL
    assert memcr.dumps() == []


@pytest.mark.parametrize("where", ["header", "first record", "middle", "last byte"])
@pytest.mark.parametrize("options", [["-c"], ["-e"], ["-z", "-c"], ["-e", "aes-256-cbc"]], ids=" ".join)
def test_tampered_dump_is_refused(spawn, memcr: Memcr, where: str, options: list[str]) -> None:
    target, session, dump = frozen_dump(spawn, memcr, "pattern", *options)
    flip_byte(dump, where)
    assert_killed(target, session, memcr)


@pytest.mark.parametrize("where", ["header", "last byte"])
def test_structural_damage_caught_without_checksum(spawn, memcr: Memcr, where: str) -> None:
    target, session, dump = frozen_dump(spawn, memcr, "pattern")
    flip_byte(dump, where)
    assert_killed(target, session, memcr)


@pytest.mark.parametrize("options", [[], ["-c"], ["-z", "-e"]], ids=lambda o: " ".join(o) or "plain")
def test_truncated_dump_is_refused(spawn, memcr: Memcr, options: list[str]) -> None:
    target, session, dump = frozen_dump(spawn, memcr, "pattern", *options)
    with open(dump, "r+b") as f:
        f.truncate(dump.stat().st_size // 2)
    assert_killed(target, session, memcr)


def test_unknown_algorithm_lists_choices(memcr: Memcr) -> None:
    result = memcr.run("-p", 1, "-z", "gzip")
    assert result.returncode == 2
    assert "unknown compression 'gzip': choose one of lz4, zstd" in result.stderr
    result = memcr.run("-p", 1, "-e", "des")
    assert result.returncode == 2
    assert "aes-128-cbc" in result.stderr
