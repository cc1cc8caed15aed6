"""Issue 15: the three request forms (v1, Thunder's 12 bytes, Dobby's V2), as bytes, as the client sends them,
as the daemon reads them off a connection; the per-request dump directory's checks; systemd's socket.

Rootless and without a daemon: the frames are written here by hand from the
layouts (int32 fields, little-endian on the CPUs memcr supports), not with
the encoders under test; connections are socket pairs or a socket served
by a thread.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memcr.dump.codec import Coding
from memcr.errors import StorageError
from memcr.options import Options
from memcr.service import listener, paths, requests
from memcr.service.daemon import Service
from memcr_client import Client, Compression, Dialect, MemcrClientError, ProtocolError
from memcr_client import cli as client_cli
from memcr_client.protocol import (
    CMDS_V2,
    DUMP_DIR_MAX,
    V2_PAYLOAD_MAX,
    Address,
    Command,
    Option,
    Request,
    decode_timed_request,
    decode_v2_length,
    decode_v2_payload,
    encode_timed_request,
    encode_v2_request,
    time_limit_ms,
)

if sys.byteorder != "little":
    pytest.skip("the frames below are written little-endian: memcr supports x86_64 and arm64", allow_module_level=True)

CHECKPOINT, RESTORE = 100, 101


def i32(*values: int) -> bytes:
    return b"".join(struct.pack("<i", v) for v in values)


REASON = i32(1003, 1)  # memcr-client asks for the reason with --reason only


def v2(*payload: bytes) -> bytes:
    body = b"".join(payload)
    return i32(102, len(body)) + body


def dump_dir(path: str | bytes | os.PathLike[str]) -> bytes:
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return i32(200) + raw + b"\0"


def decided(request: Request, **options: bool) -> tuple[int, list[str]]:
    """The daemon's answer to a request it answers at once, with no target touched (a refusal, a pid not parked),
    and what it logged; keywords are the daemon's Options."""
    logged: list[str] = []
    code = Service(Address(port=1), Options(**options), logged.append).decide(request)  # type: ignore[arg-type]
    assert isinstance(code, int), "answered at once, with no work left"
    return code, logged


# -- the layouts --------------------------------------------------------------


def test_ids_are_rdk_s() -> None:
    assert CMDS_V2 == 102
    assert (Option.DUMP_DIR, Option.COMPRESSION) == (200, 201)
    assert (Compression.NONE, Compression.LZ4, Compression.ZSTD) == (0, 1, 2)
    assert DUMP_DIR_MAX == 1024
    # ours are far from RDK's 200s, so that the next id RDK adds cannot collide with them
    assert all(option >= 1000 for option in (Option.TREE, Option.CGROUP))


def test_timed_request_bytes() -> None:
    frame = encode_timed_request(Command.CHECKPOINT, 4321, 2500)
    assert frame == b"\x64\x00\x00\x00\xe1\x10\x00\x00\xc4\x09\x00\x00"
    assert decode_timed_request(frame) == Request(CHECKPOINT, 4321, Dialect.TIMED, timeout_ms=2500)
    assert decode_timed_request(i32(RESTORE, 7, 0)).timeout_ms == 0  # none of its own


def test_timed_request_refuses_a_negative_limit() -> None:
    with pytest.raises(ProtocolError, match="-5 ms"):
        decode_timed_request(i32(CHECKPOINT, 7, -5))


def test_v2_request_bytes() -> None:
    frame = encode_v2_request(Command.CHECKPOINT, 77, dump_dir="/var/d", compression=Compression.ZSTD)
    expected = v2(i32(CHECKPOINT, 77), dump_dir("/var/d"), i32(201, 2))
    assert frame == expected
    assert len(frame) == 8 + 8 + 4 + 7 + 8
    assert decode_v2_length(frame[:8]) == len(frame) - 8
    assert decode_v2_payload(frame[8:]) == Request(
        CHECKPOINT, 77, Dialect.V2, dump_dir="/var/d", compression=Compression.ZSTD
    )
    assert encode_v2_request(Command.RESTORE, 77) == i32(102, 8, RESTORE, 77)  # a restore as V2: no options


def test_v2_options_in_any_order_and_odd_bytes() -> None:
    payload = i32(CHECKPOINT, 5, 201, 0) + dump_dir(b"/d\xff")
    request = decode_v2_payload(payload)
    assert request.compression is Compression.NONE
    assert request.dump_dir is not None and os.fsencode(request.dump_dir) == b"/d\xff"  # bytes kept, as paths are


def test_v2_path_of_exactly_the_limit() -> None:
    longest = "/" + "a" * (DUMP_DIR_MAX - 2)  # 1023 bytes and the NUL
    assert decode_v2_payload(i32(CHECKPOINT, 5) + dump_dir(longest)).dump_dir == longest
    with pytest.raises(ProtocolError, match="over 1024 bytes"):
        decode_v2_payload(i32(CHECKPOINT, 5) + dump_dir(longest + "a"))
    with pytest.raises(ProtocolError, match="at most 1023"):
        encode_v2_request(Command.CHECKPOINT, 5, dump_dir=longest + "a")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (i32(CHECKPOINT, 5, 999, 1), "option 999 is unknown"),
        (i32(CHECKPOINT, 5, 200) + b"/tmp/d", "not NUL-terminated"),
        (i32(CHECKPOINT, 5, 200) + b"/" * 2000 + b"\0", "over 1024 bytes"),
        (i32(CHECKPOINT, 5, 200) + b"\0", "is empty"),
        (i32(CHECKPOINT, 5, 201, 7), "compression 7 is none of 0 none, 1 lz4, 2 zstd"),
        (i32(CHECKPOINT, 5, 201) + b"\x01\x00", "needs 4 bytes, 2 are left"),
        (i32(CHECKPOINT, 5, 201, 1, 201, 2), "option 201 is given twice"),
        (i32(CHECKPOINT, 5) + b"\xc8\x00", "2 bytes after the last option"),
        (i32(CHECKPOINT), "cannot hold its command and pid"),
    ],
)
def test_v2_payloads_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode_v2_payload(payload)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (i32(102, 7), "7 bytes cannot hold its command and pid"),
        (i32(102, -1), "cannot hold"),
        (i32(102, V2_PAYLOAD_MAX + 1), f"over the limit of {V2_PAYLOAD_MAX}"),
        (i32(100, 8), "starts with 102, not 100"),
    ],
)
def test_v2_headers_refused(header: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_v2_length(header)


def test_time_limits_in_milliseconds() -> None:
    assert time_limit_ms(2.5) == 2500
    assert time_limit_ms(0.0001) == 1  # rounded up: never 0, which would mean no limit
    for bad in (0, -1, float("nan"), float("inf"), 2**31):
        with pytest.raises(ProtocolError, match="time limit"):
            time_limit_ms(bad)


# -- what the client sends -----------------------------------------------------


def test_client_picks_the_plainest_form() -> None:
    client = Client("/run/memcr.sock")
    assert client.frames(CHECKPOINT, 9) == [i32(CHECKPOINT, 9)]
    assert client.frames(CHECKPOINT, 9, time_limit=1.5) == [i32(CHECKPOINT, 9, 1500)]
    # header and payload in two writes, as Dobby and the C client variant write them
    payload = i32(CHECKPOINT, 9) + dump_dir("/d") + i32(201, 1)
    assert client.frames(CHECKPOINT, 9, dump_dir="/d", compress="LZ4") == [i32(102, 23), payload]
    assert len(payload) == 23
    assert client.frames(CHECKPOINT, 9, compress="none") == [i32(102, 16), i32(CHECKPOINT, 9, 201, 0)]
    assert Client("x.sock", dialect=Dialect.V2).frames(RESTORE, 9) == [i32(102, 8), i32(RESTORE, 9)]
    assert Client("x.sock", dialect=Dialect.TIMED).frames(RESTORE, 9) == [i32(RESTORE, 9, 0)]


@pytest.mark.parametrize(
    ("dialect", "options", "reason"),
    [
        (Dialect.V1, {"dump_dir": "/d"}, "needs a V2 request, not v1"),
        (Dialect.V1, {"time_limit": 1.0}, "only in the 12-byte request, not in v1"),
        (Dialect.TIMED, {"compress": "zstd"}, "needs a V2 request, not 12-byte"),
        (Dialect.V2, {"time_limit": 1.0}, "only in the 12-byte request, not in v2"),
        (None, {"dump_dir": "/d", "time_limit": 1.0}, "has no field for it"),
        (None, {"compress": "gzip"}, "unknown compression 'gzip': choose none, lz4 or zstd"),
        (None, {"dump_dir": ""}, "the dump directory is empty"),
        (None, {"dump_dir": "/a\0b"}, "NUL"),
    ],
)
def test_client_refuses_what_its_form_cannot_carry(dialect: Dialect | None, options: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        Client("x.sock", dialect=dialect).frames(CHECKPOINT, 9, **options)


def test_client_library_sends_each_form(recorder: tuple[str, list[bytes]]) -> None:
    path, received = recorder
    client = Client(path, timeout=10)
    client.checkpoint(11)
    client.checkpoint(12, time_limit=0.25)
    client.checkpoint(13, dump_dir=Path("/srv/d"), compress=Compression.ZSTD)
    client.restore(13, time_limit=3)
    Client(path, timeout=10, dialect=Dialect.V2).restore(14)
    assert received == [
        i32(CHECKPOINT, 11),
        i32(CHECKPOINT, 12, 250),
        v2(i32(CHECKPOINT, 13), dump_dir("/srv/d"), i32(201, 2)),
        i32(RESTORE, 13, 3000),
        v2(i32(RESTORE, 14)),
    ]


def test_client_says_why_a_v1_daemon_drops_v2(tmp_path: Path) -> None:
    """The C daemon reads 8 bytes, finds command 102 unknown and closes: the client names the way out."""
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(8, socket.MSG_WAITALL)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with pytest.raises(MemcrClientError, match=r"the C memcr\) does that: send v1 \(--v1\)"):
                Client(str(path), timeout=10).checkpoint(5, compress="lz4")
        finally:
            thread.join(10)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        client_cli.run(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sends_each_form(recorder: tuple[str, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    path, received = recorder
    assert run_cli(["-l", path, "-p", "21", "-c", "-r"], capsys)[0] == 0
    assert run_cli(["-l", path, "-p", "22", "--checkpoint", "--timeout", "1.5"], capsys)[0] == 0
    code, out, _ = run_cli(["-l", path, "-p", "23", "-c", "-r", "-d", "/srv/d", "-z", "zstd"], capsys)
    assert (code, out) == (0, "pid 23 checkpointed\npid 23 restored\n")
    assert run_cli(["-l", path, "-p", "24", "--v2", "-r"], capsys)[0] == 0
    assert run_cli(["-l", path, "-p", "25", "--v1", "-r"], capsys)[0] == 0
    assert run_cli(["-l", path, "-p", "26", "-r", "--reason"], capsys)[0] == 0
    assert received == [
        i32(CHECKPOINT, 21),
        i32(RESTORE, 21),
        i32(CHECKPOINT, 22, 1500),
        v2(i32(CHECKPOINT, 23), dump_dir("/srv/d"), i32(201, 2)),
        v2(i32(RESTORE, 23)),  # every request of a V2 run is V2, as the C client variant sends them
        v2(i32(RESTORE, 24)),
        i32(RESTORE, 25),
        v2(i32(RESTORE, 26), REASON),  # asked for: V2 with option 1003, which only memcr-py's daemon knows
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "5"], "give -c/--checkpoint, -r/--restore or both"),
        (["-p", "0", "-c"], "-p/--pid must be a positive process id, not 0"),
        (["-p", "5", "-r", "-d", "/d"], "-d/--dir, -z/--compress, --tree and --cgroup apply to -c/--checkpoint only"),
        (["-p", "5", "-c", "--v1", "-z", "lz4"], "--v1 sends the 8-byte request, which carries no -d, -z, --tree,"),
        (["-p", "5", "-c", "--v1", "--v2"], "argument --v2: not allowed with argument --v1"),
        (["-p", "5", "-c", "--v1", "--reason"], "--v1 sends the 8-byte request, which has no room for --reason"),
        # -v was --v1's short form, which reads as "verbose": refused, with the way to what it did
        (["-p", "5", "-c", "-v"], "-v is no option (it is not --verbose): to send the 8-byte v1 request, use --v1"),
        (["-v", "-p", "5", "-r", "--v2"], "-v is no option (it is not --verbose): to send the 8-byte v1 request"),
        (["-p", "5", "-c", "-t", "2", "-d", "/d"], "-t/--timeout goes in the 12-byte request, V2 (-d, -z, --tree"),
        (["-p", "5", "-c", "-z", "gzip"], "argument -z/--compress: unknown compression 'gzip'"),
        (["-p", "5", "-c", "-t", "0"], "argument -t/--timeout: must be a positive number of seconds, not 0"),
        (["-p", "5", "-c", "-d", "/" + "d" * 1100], "the dump directory is 1101 bytes: at most 1023 fit"),
        (["-p", "5", "-c", "-l", "70000"], "-l/--location: 70000 is not a TCP port"),
    ],
)
def test_cli_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if "-l" not in argv:
        argv = [*argv, "-l", str(tmp_path / "nobody.sock")]  # never reached: the usage is refused first
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert f"memcr-client: error: {message}" in err


def test_cli_entry_point_version_and_failure(tmp_path: Path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "memcr_client", "-V"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (version.returncode, version.stdout) == (0, "memcr-client 0.1.0\n")
    nobody = str(tmp_path / "nobody.sock")
    failed = subprocess.run(
        [sys.executable, "-m", "memcr_client", "-l", nobody, "-p", "5", "-c"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr == f"memcr-client: error: no memcr daemon listens on {nobody}\n"


# -- what the daemon reads -------------------------------------------------------


def read_after(*pieces: bytes, gap: float = 0.0, close: bool = False) -> tuple[Request | requests.Refusal, float]:
    """What requests.read_request makes of `pieces` written with `gap` seconds between them, and how long it took."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.settimeout(requests.REQUEST_TIMEOUT)

        def write() -> None:
            for i, piece in enumerate(pieces):
                if i and gap:
                    time.sleep(gap)
                ours.sendall(piece)
            if close:
                ours.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        started = time.monotonic()
        writer.start()
        try:
            result: Request | requests.Refusal = requests.read_request(theirs)
        except requests.Refusal as e:
            result = e
        elapsed = time.monotonic() - started
        writer.join(10)
    return result, elapsed


def test_daemon_reads_v1_while_its_client_waits() -> None:
    request, _ = read_after(i32(CHECKPOINT, 42))  # and the connection stays open, for the answer
    assert request == Request(CHECKPOINT, 42, Dialect.V1)


def test_daemon_reads_v1_at_once_when_the_client_half_closes() -> None:
    request, _ = read_after(i32(RESTORE, 42), close=True)
    assert request == Request(RESTORE, 42)


def test_daemon_reads_the_12_byte_form() -> None:
    request, _ = read_after(i32(CHECKPOINT, 42, 900))  # in one write, as Thunder sends it
    assert request == Request(CHECKPOINT, 42, Dialect.TIMED, timeout_ms=900)


def test_a_12_byte_form_split_after_8_bytes_is_v1() -> None:
    """Only the bytes that came with the first 8 are looked at: the daemon waits for none a v1 client never sends."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(i32(CHECKPOINT, 42))
        request = requests.read_request(theirs)
        ours.sendall(i32(900))  # too late: the request was v1, without a time limit
    assert request == Request(CHECKPOINT, 42, Dialect.V1)


def test_daemon_waits_for_the_rest_of_a_begun_12_byte_form() -> None:
    whole = i32(RESTORE, 42, 900)
    request, _ = read_after(whole[:9], whole[9:], gap=0.2)
    assert request == Request(RESTORE, 42, Dialect.TIMED, timeout_ms=900)


@pytest.mark.parametrize(
    "pieces",
    [
        [v2(i32(CHECKPOINT, 42), dump_dir("/srv/d"), i32(201, 1))],
        # header and payload apart, the payload itself in pieces, each a while after the other
        [i32(102, 27), i32(CHECKPOINT, 42), dump_dir("/srv/d")[:5], dump_dir("/srv/d")[5:] + i32(201, 1)],
    ],
)
def test_daemon_reads_v2(pieces: list[bytes]) -> None:
    request, _ = read_after(*pieces, gap=0.1)
    assert request == Request(CHECKPOINT, 42, Dialect.V2, dump_dir="/srv/d", compression=Compression.LZ4)


def test_daemon_reads_a_restore_sent_as_v2() -> None:
    assert read_after(v2(i32(RESTORE, 42)))[0] == Request(RESTORE, 42, Dialect.V2)


@pytest.mark.parametrize(
    ("pieces", "close", "reason", "answer"),
    [
        ([b"\x64\x00"], True, "no complete request (2 of 8 bytes)", False),
        ([i32(CHECKPOINT, 42) + b"\x01\x02"], True, "no complete request (10 bytes, neither 8 nor 12)", True),
        ([i32(CHECKPOINT, 42, 900) + b"!"], False, "more bytes after the request", True),
        ([i32(CHECKPOINT, 42, 0, 0)], False, "more bytes after the request", True),
        ([i32(CHECKPOINT, 42, -1)], False, "-1 ms", True),
        ([i32(102, 20), i32(CHECKPOINT, 42)], True, "its payload stopped after 8 of 20 bytes", True),
        ([v2(i32(CHECKPOINT, 42)) + b"!"], False, "more bytes after the V2 request", True),
        ([i32(102, 100_000)], False, "over the limit of 8192", True),
        ([i32(102, 4)], False, "4 bytes cannot hold its command and pid", True),
        ([v2(i32(CHECKPOINT, 42, 999, 0))], False, "option 999 is unknown", True),
        ([v2(i32(CHECKPOINT, 42, 200), b"/no/nul")], False, "not NUL-terminated", True),
    ],
)
def test_daemon_refuses(pieces: list[bytes], close: bool, reason: str, answer: bool) -> None:
    refusal, _ = read_after(*pieces, close=close)
    assert isinstance(refusal, requests.Refusal), refusal
    assert reason in str(refusal)
    assert refusal.answer is answer


def test_a_silent_client_is_dropped_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests, "REQUEST_TIMEOUT", 0.3)
    refusal, elapsed = read_after(i32(102, 20), i32(CHECKPOINT))  # then says nothing more, and stays
    assert isinstance(refusal, requests.Refusal)
    assert "stopped after 4 of 20 bytes" in str(refusal)
    assert elapsed < 2


# -- the time limit a request gets ----------------------------------------------


@pytest.mark.parametrize(
    ("daemon", "request_ms", "limit"),
    [(None, None, None), (None, 0, None), (None, 1500, 1.5), (10.0, None, 10.0), (10.0, 1500, 1.5), (1.0, 5000, 1.0)],
)
def test_time_limit_is_the_shorter(daemon: float | None, request_ms: int | None, limit: float | None) -> None:
    svc = Service(Address(port=1), Options(), print, timeout=daemon)
    assert svc._time_limit(Request(CHECKPOINT, 5, Dialect.TIMED, timeout_ms=request_ms)) == limit


def test_v2_options_replace_the_daemon_s(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    options = Options(coding=Coding(compress="lz4", checksum=True))
    svc = Service(Address(port=1), options, print)
    made = svc._options(Request(CHECKPOINT, 5, Dialect.V2, dump_dir=str(tmp_path), compression=Compression.NONE))
    assert made.dump_dir == tmp_path
    assert (made.coding.compress, made.coding.checksum) == (None, True)  # none means none; -c stays
    assert svc._options(Request(CHECKPOINT, 5, Dialect.V2, compression=Compression.ZSTD)).coding.compress == "zstd"


# -- a dump directory named by a client ------------------------------------------


def refused_dir(text: str) -> str:
    with pytest.raises(StorageError) as refused:
        paths.check_request_directory(text)
    return str(refused.value)


def test_request_directory_plain(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    assert paths.check_request_directory(str(tmp_path)) == tmp_path
    assert paths.check_request_directory(str(tmp_path) + "/") == tmp_path
    assert paths.check_request_directory("/tmp") == Path("/tmp")  # sticky: others cannot swap what is memcr's


def test_request_directory_traps(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    real = tmp_path / "real"
    real.mkdir(0o700)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "file").write_text("")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (open_dir / "inner").mkdir(0o700)
    assert "not an absolute path" in refused_dir("relative/dir")
    assert "'..'" in refused_dir(f"{real}/../real")
    assert f"'{tmp_path}/link' is a symlink" in refused_dir(f"{tmp_path}/link")
    assert f"give the real path ('{real}')" in refused_dir(f"{tmp_path}/link")
    assert f"'{tmp_path}/link' is a symlink" in refused_dir(f"{tmp_path}/link/sub")  # on the way, too
    assert "No such file or directory" in refused_dir(f"{tmp_path}/missing")
    assert "is not a directory" in refused_dir(f"{tmp_path}/file")
    assert "mode 0777" in refused_dir(str(open_dir))
    assert "chmod go-w" in refused_dir(f"{open_dir}/inner")  # whoever may write open/ could swap inner
    os.chmod(open_dir, 0o1777)
    assert paths.check_request_directory(f"{open_dir}/inner") == open_dir / "inner"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a folder owned by another user")
def test_request_directory_of_another_user(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir(0o700)
    os.chown(theirs, 65534, 65534)
    assert "belongs to" in refused_dir(str(theirs))


# -- systemd's socket -------------------------------------------------------------


def listening_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_systemd_socket_must_be_the_one_l_names(tmp_path: Path) -> None:
    with listening_unix(tmp_path / "a.sock") as sock:
        listener._check_inherited(sock, Address.parse(str(tmp_path / "a.sock")))
        with pytest.raises(StorageError, match="ListenStream= and -l name the same socket"):
            listener._check_inherited(sock, Address.parse(str(tmp_path / "b.sock")))
        with pytest.raises(StorageError, match=r"-l says 127\.0\.0\.1:9000"):
            listener._check_inherited(sock, Address.parse("9000"))
    with socket.socket() as tcp:
        tcp.bind(("0.0.0.0", 0))
        tcp.listen(1)
        port = tcp.getsockname()[1]
        with pytest.raises(StorageError, match=f"write ListenStream=127.0.0.1:{port}"):
            listener._check_inherited(tcp, Address.parse(str(port)))  # every interface where -l means loopback
        listener._check_inherited(tcp, Address.parse(f"0.0.0.0:{port}"))
        with pytest.raises(StorageError, match=f"TCP port {port}"):
            listener._check_inherited(tcp, Address.parse(str(port + 1 if port < 65535 else port - 1)))


def test_listen_variables_for_another_process_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listener.inherited_socket(logged.append) is None
    assert logged == [f"ignored LISTEN_FDS: they are for process 1, not memcr ({os.getpid()})"]
    assert "LISTEN_FDS" not in os.environ  # not passed on, as sd_listen_fds(1) does
    assert listener.inherited_socket(logged.append) is None  # nothing set: nothing said
    assert len(logged) == 1


def test_listen_variables_of_two_sockets_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    with pytest.raises(StorageError, match="exactly one ListenStream="):
        listener.inherited_socket(print)


def test_a_client_path_cannot_forge_log_lines() -> None:
    """A newline in a client's dump directory must not start a line of its own in the daemon's log."""
    forged = '/nonexistent\nmemcr: pid 1 restored\n{"event":"restore","pid":1}'
    with pytest.raises(StorageError) as caught:
        paths.check_request_directory(forged)
    assert "\n" not in str(caught.value)
