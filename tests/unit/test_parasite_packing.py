"""The parasite's start-up arguments and commands as memcr packs them, over a socket pair instead of a parasite."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from memcr.engine.parasite import PAGEMAP_ENTRY, Nonces, Parasite, SocketSpec, Stream, pack_args
from memcr.engine.parasite_protocol import (
    ARGS,
    ARGS_FDS,
    ARGS_MAGIC,
    ARGS_STATUS,
    CMD,
    OP_DROP,
    OP_END,
    OP_PAGEMAP,
    OP_RECV,
    OP_SEND,
    PAGEMAP_MAX,
    REPLY,
    STATUS_STARTING,
    SUN_PATH_LEN,
    send_command,
)
from memcr.errors import ParasiteError

NONCES = Nonces(b"i" * 16, b"o" * 16)
PAGE = 4096


def fields(args: bytes) -> dict[str, object]:
    names = (
        "magic status step errno addrlen mode gid listen_fd conn_fd pagemap_fd page_size nonce_in nonce_out family path"
    )
    return dict(zip(names.split(), ARGS.unpack(args), strict=True))


def test_abstract_socket_arguments() -> None:
    args = pack_args(SocketSpec(1234), NONCES, PAGE)
    assert len(args) == ARGS.size
    got = fields(args)
    address = b"\0memcr1234"
    assert got["path"] == address.ljust(SUN_PATH_LEN, b"\0")
    assert got["addrlen"] == 2 + len(address)  # no terminating NUL: the name is the bytes given
    assert (got["mode"], got["gid"], got["family"]) == (0, -1, socket.AF_UNIX)
    assert (got["magic"], got["status"], got["step"], got["errno"]) == (ARGS_MAGIC, STATUS_STARTING, 0, 0)
    assert (got["nonce_in"], got["nonce_out"], got["page_size"]) == (b"i" * 16, b"o" * 16, PAGE)
    # what memcr reads back while it waits, and what it closes if it must stop the parasite by force
    assert ARGS_STATUS.unpack(args[: ARGS_STATUS.size]) == (ARGS_MAGIC, STATUS_STARTING, 0, 0)
    assert ARGS_FDS.unpack(args[: ARGS_FDS.size]) == (-1, -1, -1)


def test_named_socket_arguments(tmp_path: Path) -> None:
    got = fields(pack_args(SocketSpec(99, tmp_path), NONCES, 65536))
    path = bytes(tmp_path / "memcr99")
    assert got["path"] == path.ljust(SUN_PATH_LEN, b"\0")
    assert got["addrlen"] == 2 + len(path) + 1  # with its NUL
    assert (got["mode"], got["gid"], got["page_size"]) == (0o600, -1, 65536)
    grouped = fields(pack_args(SocketSpec(99, tmp_path, gid=1001), NONCES, PAGE))
    assert (grouped["mode"], grouped["gid"]) == (0o660, 1001)


def test_a_socket_path_too_long_is_refused() -> None:
    spec = SocketSpec(1, Path("/" + "d" * (SUN_PATH_LEN - len("/memcr1") - 1)))
    with pytest.raises(ParasiteError, match="socket path too long"):
        pack_args(spec, NONCES, PAGE)
    fits = SocketSpec(1, Path("/" + "d" * (SUN_PATH_LEN - len("/memcr1") - 2)))
    assert fields(pack_args(fits, NONCES, PAGE))["addrlen"] == 2 + SUN_PATH_LEN


def test_send_command_is_a_header_and_a_run_table() -> None:
    packed = send_command([(0x1000, 0x2000), (0x5000, 0x1000)])
    assert CMD.unpack(packed[: CMD.size]) == (OP_SEND, 0, 0, 32)
    assert packed[CMD.size :] == (0x1000).to_bytes(8, "little") + (0x2000).to_bytes(8, "little") + (0x5000).to_bytes(
        8, "little"
    ) + (0x1000).to_bytes(8, "little")
    assert send_command([]) == CMD.pack(OP_SEND, 0, 0, 0)


class FakeThread:
    """The parasite's thread as Parasite sees it: it always runs on, and its cure is recorded."""

    def __init__(self) -> None:
        self.tid = 1
        self.infection = SimpleNamespace(read_args=lambda size: ARGS_FDS.pack(5, 6, -1)[:size])
        self.cured: list[tuple[float, tuple[int, ...]]] = []

    def keep_running(self) -> bool:
        return True

    def cure(self, timeout: float, open_fds: tuple[int, ...]) -> None:
        self.cured.append((timeout, open_fds))


@pytest.fixture
def wired() -> Iterator[tuple[Parasite, socket.socket]]:
    """A Parasite whose other end is a socket of the test's."""
    ours, theirs = socket.socketpair()
    yield Parasite(FakeThread(), ours, SocketSpec(1)), theirs  # type: ignore[arg-type]
    ours.close()
    theirs.close()


def commands(peer: socket.socket, count: int) -> list[tuple[int, int, int, int]]:
    data = b""
    while len(data) < count * CMD.size:
        data += peer.recv(count * CMD.size - len(data))
    return [CMD.unpack_from(data, i * CMD.size) for i in range(count)]


def test_drop_sends_its_command_and_reads_the_result(wired: tuple[Parasite, socket.socket]) -> None:
    parasite, peer = wired
    peer.sendall(REPLY.pack(0) + REPLY.pack(-16))
    assert parasite.drop(0x7F0000, 3 * PAGE)
    assert not parasite.drop(0x7F0000, PAGE)  # EBUSY: the kernel kept the pages
    assert commands(peer, 2) == [(OP_DROP, 0, 0x7F0000, 3 * PAGE), (OP_DROP, 0, 0x7F0000, PAGE)]


def test_request_pages_sends_the_run_table(wired: tuple[Parasite, socket.socket]) -> None:
    parasite, peer = wired
    runs = [(0x10000, PAGE), (0x30000, 2 * PAGE)]
    parasite.request_pages(runs)
    assert peer.recv(4096) == send_command(runs)


def test_pagemap_asks_at_most_pagemap_max_bytes_at_once(wired: tuple[Parasite, socket.socket]) -> None:
    parasite, peer = wired
    per_call = PAGEMAP_MAX // PAGEMAP_ENTRY
    first, rest = b"a" * PAGEMAP_MAX, b"b" * (3 * PAGEMAP_ENTRY)
    peer.sendall(REPLY.pack(len(first)) + first + REPLY.pack(len(rest)) + rest)
    assert parasite.pagemap(0x400000, per_call + 3, PAGE) == first + rest
    assert commands(peer, 2) == [
        (OP_PAGEMAP, 0, 0x400000, PAGEMAP_MAX),
        (OP_PAGEMAP, 0, 0x400000 + per_call * PAGE, 3 * PAGEMAP_ENTRY),
    ]


def test_a_store_that_stops_midway_tears_the_stream(wired: tuple[Parasite, socket.socket]) -> None:
    """The parasite waits for page bytes that will never come: nothing more may be sent, END neither."""
    parasite, peer = wired

    def chunks() -> Iterator[bytes]:
        yield b"x" * 100
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(ParasiteError, match="lost the connection to the parasite: Broken pipe"):
        parasite.store_chunks(0x1000, PAGE, chunks())
    assert parasite.stream is Stream.TORN
    assert commands(peer, 1) == [(OP_RECV, 0, 0x1000, PAGE)]
    with pytest.raises(ParasiteError, match="dropped mid-transfer"):
        parasite.drop(0x1000, PAGE)


def test_cure_ends_the_parasite_then_its_thread(wired: tuple[Parasite, socket.socket]) -> None:
    parasite, peer = wired
    assert parasite.stream is Stream.IN_STEP
    peer.sendall(REPLY.pack(0))
    parasite.cure()
    assert commands(peer, 1) == [(OP_END, 0, 0, 0)]
    assert parasite.thread.cured == [(2.0, (5, 6, -1))]  # type: ignore[attr-defined]


def test_cure_after_a_torn_stream_stops_the_thread_at_once(wired: tuple[Parasite, socket.socket]) -> None:
    parasite, peer = wired
    parasite.stream = Stream.TORN
    parasite.cure()
    assert peer.recv(CMD.size) == b""  # closed without an END, which would be read as page bytes
    assert parasite.thread.cured == [(0.0, (5, 6, -1))]  # type: ignore[attr-defined]
