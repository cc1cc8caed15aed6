"""The wire format, addresses and exit codes of memcr_client.protocol, and their use by client and daemon.

Rootless and without processes: pure functions, plus a socket pair or a
socket served by a thread where the bytes on a connection are the point.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memcr import errors
from memcr.service import requests
from memcr_client import Client, MemcrClientError
from memcr_client.protocol import (
    DEFAULT_LOCATION,
    LOCATION_ENV,
    REASON_MAX,
    REQUEST,
    RESPONSE,
    Address,
    AddressError,
    Answer,
    Command,
    Dialect,
    ExitCode,
    ProtocolError,
    Request,
    decode_answer,
    decode_reason_length,
    decode_request,
    decode_v2_payload,
    default_location,
    encode_answer,
    encode_request,
    encode_v2_payload,
)


def int32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder, signed=True)


# -- requests and answers ------------------------------------------------------


def test_codes_are_the_c_memcr_s() -> None:
    assert (Command.CHECKPOINT, Command.RESTORE) == (100, 101)
    assert (Answer.OK, Answer.ERROR, Answer.INVALID_PID) == (0, -1, -2)
    assert (REQUEST.size, RESPONSE.size) == (8, 4)


@pytest.mark.parametrize(("cmd", "pid"), [(Command.CHECKPOINT, 1234), (Command.RESTORE, 2**31 - 1), (7, -7), (0, 0)])
def test_request_bytes(cmd: int, pid: int) -> None:
    data = encode_request(cmd, pid)
    assert data == int32(cmd) + int32(pid)  # two native int32, no padding: the C struct
    assert decode_request(data) == Request(cmd, pid)
    assert decode_request(data).cmd == cmd  # an unknown command decodes: the daemon refuses it


def test_little_endian_on_the_supported_cpus() -> None:
    if sys.byteorder != "little":
        pytest.skip("a big-endian CPU: memcr supports x86_64")
    assert encode_request(Command.CHECKPOINT, 0x01020304) == b"\x64\x00\x00\x00\x04\x03\x02\x01"
    assert encode_answer(Answer.INVALID_PID) == b"\xfe\xff\xff\xff"


@pytest.mark.parametrize("size", [0, 4, 7, 9, 12])
def test_request_of_another_size_is_refused(size: int) -> None:
    with pytest.raises(ProtocolError, match=f"a request is 8 bytes, not {size}"):
        decode_request(bytes(size))


def test_request_values_beyond_int32_are_refused() -> None:
    with pytest.raises(ProtocolError, match="32 bits"):
        encode_request(Command.CHECKPOINT, 2**31)
    with pytest.raises(ProtocolError, match="32 bits"):
        encode_answer(-(2**31) - 1)


@pytest.mark.parametrize("code", [*Answer, -5, 17])
def test_answer_bytes(code: int) -> None:
    assert encode_answer(code) == int32(code)
    assert decode_answer(int32(code)) == code  # codes unknown here still come through


@pytest.mark.parametrize("size", [0, 3, 5, 8])
def test_answer_of_another_size_is_refused(size: int) -> None:
    with pytest.raises(ProtocolError, match=f"an answer is 4 bytes, not {size}"):
        decode_answer(bytes(size))


def test_exit_codes_are_memcr_s() -> None:
    """The CLI's exit codes come from memcr.errors: the protocol's names must say the same."""
    assert errors.MemcrError.exit_code == ExitCode.FAILED
    assert errors.UsageError.exit_code == ExitCode.USAGE
    assert errors.TargetError.exit_code == ExitCode.TARGET
    assert errors.RightsError.exit_code == ExitCode.RIGHTS
    assert errors.StorageError.exit_code == ExitCode.STORAGE
    assert errors.TargetKilled.exit_code == ExitCode.TARGET_KILLED


# -- addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("9000", Address(host="127.0.0.1", port=9000), "127.0.0.1:9000"),
        ("1", Address(port=1), "127.0.0.1:1"),
        ("65535", Address(port=65535), "127.0.0.1:65535"),
        ("0.0.0.0:9000", Address(host="0.0.0.0", port=9000), "0.0.0.0:9000"),
        ("localhost:80", Address(host="localhost", port=80), "localhost:80"),
        ("[::1]:9000", Address(host="::1", port=9000), "[::1]:9000"),
        ("[fe80::1%eth0]:9", Address(host="fe80::1%eth0", port=9), "[fe80::1%eth0]:9"),
        ("/tmp/memcr/memcr.sock", Address(path=Path("/tmp/memcr/memcr.sock")), "/tmp/memcr/memcr.sock"),
        ("memcr.sock", Address(path=Path("memcr.sock")), "memcr.sock"),
        ("run/memcr.sock", Address(path=Path("run/memcr.sock")), "run/memcr.sock"),
        ("./9000", Address(path=Path("9000")), "9000"),  # a file named 9000: say ./9000
        ("./a:1", Address(path=Path("a:1")), "a:1"),
        ("/run/x:2", Address(path=Path("/run/x:2")), "/run/x:2"),
        (".hidden:3", Address(path=Path(".hidden:3")), ".hidden:3"),
        ("name:sock", Address(path=Path("name:sock")), "name:sock"),
        ("/tmp/memcrservice", Address(path=Path("/tmp/memcrservice")), "/tmp/memcrservice"),
    ],
)
def test_address_parse(text: str, address: Address, shown: str) -> None:
    assert Address.parse(text) == address
    assert str(address) == shown


def test_path_objects_are_paths() -> None:
    assert Address.parse(Path("9000")) == Address(path=Path("9000"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "0 is not a TCP port (1-65535)"),
        ("65536", "65536 is not a TCP port (1-65535)"),
        ("99999999999", "99999999999 is not a TCP port"),
        ("localhost:0", "'localhost:0': 0 is not a TCP port (1-65535)"),
        ("[::1]:70000", "70000 is not a TCP port"),
        ("::1:9000", "write an IPv6 address in brackets, as in [::1]:9000"),
        (":9000", "no host before the port"),
        ("", "empty address"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(AddressError) as refused:
        Address.parse(text)
    assert message in str(refused.value)


def test_other_scripts_digits_are_no_port() -> None:
    assert Address.parse("٩٠٠٠") == Address(path=Path("٩٠٠٠"))  # str.isdigit() says yes, ports say no


# -- the default location --------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, DEFAULT_LOCATION), ("", DEFAULT_LOCATION), ("9000", "9000")])
def test_default_location(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str) -> None:
    if value is None:
        monkeypatch.delenv(LOCATION_ENV, raising=False)
    else:
        monkeypatch.setenv(LOCATION_ENV, value)
    assert default_location() == expected
    assert Client().address == expected
    assert DEFAULT_LOCATION == "/tmp/memcr/memcr.sock"  # the path of the README's first example


def test_client_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Client("127.0.0.1:9000").where == Address(port=9000)
    assert Client("[::1]:9000").where == Address(host="::1", port=9000)
    assert Client(Path("/run/memcr.sock")).where == Address(path=Path("/run/memcr.sock"))
    monkeypatch.setenv(LOCATION_ENV, "localhost:9000")
    assert Client().where == Address(host="localhost", port=9000)
    with pytest.raises(AddressError, match="not a TCP port"):
        Client("70000")  # at construction, not at the first request


# -- the bytes on a connection ---------------------------------------------------


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[tuple[Path, list[bytes], list[bytes]]]:
    """A UNIX socket served by a thread: it records each request and sends the next reply queued."""
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(10)
    received: list[bytes] = []
    replies: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed at teardown
            with conn:
                received.append(conn.recv(64))
                if replies:
                    conn.sendall(replies.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received, replies
    listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept(), which close() alone does not
    listener.close()
    thread.join(10)


def test_client_sends_and_reads_the_wire_format(fake_daemon: tuple[Path, list[bytes], list[bytes]]) -> None:
    path, received, replies = fake_daemon
    replies += [encode_answer(Answer.OK), encode_answer(Answer.INVALID_PID), encode_answer(Answer.ERROR), b"\x00"]
    client = Client(str(path), timeout=10)
    client.checkpoint(42)
    with pytest.raises(MemcrClientError, match="pid 43: not checkpointed") as invalid:
        client.restore(43)
    assert invalid.value.code == Answer.INVALID_PID
    with pytest.raises(MemcrClientError, match=r"memcr reported an error \(-1\)") as failed:
        client.checkpoint(44)
    assert failed.value.code == Answer.ERROR
    with pytest.raises(MemcrClientError, match="broken answer"):
        client.checkpoint(45)
    with pytest.raises(MemcrClientError, match="closed the connection without answering"):
        client.checkpoint(46)  # no reply left: the fake closes
    assert received == [encode_request(Command.CHECKPOINT, 42), encode_request(Command.RESTORE, 43)] + [
        encode_request(Command.CHECKPOINT, pid) for pid in (44, 45, 46)
    ]


def test_answer_with_a_reason() -> None:
    """Option 1003's answer: the code, the text's length, the text; the code alone without the option."""
    assert encode_answer(Answer.ERROR) == int32(-1)  # v1, 12-byte and V2 without 1003: as ever
    assert encode_answer(Answer.ERROR, "no dir") == int32(-1) + int32(6) + b"no dir"
    assert encode_answer(Answer.OK, "") == int32(0) + int32(0)
    # cut at REASON_MAX bytes, never inside a character (a 2-byte é straddles the limit here)
    cut = encode_answer(Answer.ERROR, "a" * (REASON_MAX - 1) + "é")
    assert cut == int32(-1) + int32(REASON_MAX - 1) + b"a" * (REASON_MAX - 1)
    # a path os.fsdecode made of bytes that are no UTF-8 still goes out
    assert encode_answer(Answer.ERROR, "/d\udcff")[8:] == b"/d?"
    assert decode_reason_length(int32(12)) == 12
    for bad in (int32(-1), int32(REASON_MAX + 1), b"\0"):
        with pytest.raises(ProtocolError):
            decode_reason_length(bad)


def test_reason_option_in_a_v2_payload() -> None:
    payload = encode_v2_payload(Command.RESTORE, 7, reason=True)
    assert payload == int32(101) + int32(7) + int32(1003) + int32(1)
    assert decode_v2_payload(payload) == Request(Command.RESTORE, 7, Dialect.V2, reason=True)
    assert not decode_v2_payload(payload).options  # a restore may carry it: it is no checkpoint option
    assert not decode_v2_payload(int32(101) + int32(7) + int32(1003) + int32(0)).reason
    with pytest.raises(ProtocolError, match=r"the reason wanted \(option 1003\) is 1 \(wanted\) or 0 \(not\)"):
        decode_v2_payload(int32(101) + int32(7) + int32(1003) + int32(2))


def test_client_reads_the_reason(tmp_path: Path) -> None:
    """A V2 client that asks (option 1003) reads the reason after the code; the code alone means "see the log"."""
    path = tmp_path / "fake.sock"
    replies = [encode_answer(Answer.ERROR, "the dump directory is gone"), encode_answer(Answer.ERROR)]
    received: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(2)
        listener.settimeout(10)

        def serve() -> None:
            for reply in replies:
                conn, _ = listener.accept()
                with conn:
                    header = conn.recv(8, socket.MSG_WAITALL)  # a V2 header, then its payload: all of it first
                    received.append(header + conn.recv(int.from_bytes(header[4:], sys.byteorder), socket.MSG_WAITALL))
                    conn.sendall(reply)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client = Client(str(path), timeout=10, dialect=Dialect.V2, reasons=True)
            with pytest.raises(MemcrClientError, match="pid 44: memcr answered -1: the dump directory is gone") as e:
                client.checkpoint(44)
            assert (e.value.code, e.value.reason) == (-1, "the dump directory is gone")
            # the code alone, then the end: a daemon that knows no option 1003 refused the request for it
            with pytest.raises(MemcrClientError, match=r"pid 45: memcr answered -1 without a reason: .* option 1003"):
                client.checkpoint(45)
        finally:
            thread.join(10)
    assert received[0].endswith(int32(1003) + int32(1))


def test_client_names_a_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(MemcrClientError, match=f"no memcr daemon listens on {tmp_path}/none.sock"):
        Client(str(tmp_path / "none.sock")).checkpoint(1)


def test_daemon_reads_one_request_and_answers() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(encode_request(Command.RESTORE, 77))
        theirs.settimeout(5)
        assert requests.read_request(theirs) == Request(Command.RESTORE, 77)
        requests.send(theirs, Answer.INVALID_PID)
        assert decode_answer(ours.recv(8)) == Answer.INVALID_PID


def test_daemon_refuses_short_and_long_requests() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(encode_request(Command.CHECKPOINT, 5) + b"junk!")  # 12 bytes would be Thunder's form
        theirs.settimeout(5)
        with pytest.raises(requests.Refusal, match="more bytes after the request") as long:
            requests.read_request(theirs)
        assert long.value.answer  # more than one request: not this protocol, and the client is told
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"\x64\x00")
        ours.shutdown(socket.SHUT_WR)
        theirs.settimeout(5)
        with pytest.raises(requests.Refusal, match="no complete request") as short:
            requests.read_request(theirs)
        assert not short.value.answer
