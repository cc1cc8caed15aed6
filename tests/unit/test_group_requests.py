"""Issue 19: memcr-py's own V2 options, 1000 (process tree) and 1001 (cgroup), as bytes, in the client and its CLI.

Rootless and without a daemon: the frames are written here by hand from the
layouts (tests/unit/test_dialects.py's helpers), not with the encoders under
test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memcr.errors import UsageError
from memcr.service import paths
from memcr.system import procfs
from memcr_client import Client, Dialect, ProtocolError
from memcr_client.protocol import (
    PATH_MAX_V2,
    Command,
    Compression,
    Option,
    Request,
    decode_v2_payload,
    encode_v2_request,
)
from tests.unit.test_dialects import CHECKPOINT, RESTORE, i32, run_cli, v2

if sys.byteorder != "little":
    pytest.skip("the frames below are written little-endian: memcr supports x86_64 and arm64", allow_module_level=True)


def cgroup(path: str | bytes) -> bytes:
    raw = path if isinstance(path, bytes) else path.encode()
    return i32(1001) + raw + b"\0"


def test_ids() -> None:
    assert (Option.TREE, Option.CGROUP) == (1000, 1001)


def test_tree_request_bytes() -> None:
    frame = encode_v2_request(Command.CHECKPOINT, 31, tree=True)
    assert frame == v2(i32(CHECKPOINT, 31, 1000, 1))
    assert decode_v2_payload(frame[8:]) == Request(CHECKPOINT, 31, Dialect.V2, tree=True)
    assert decode_v2_payload(frame[8:]).group


def test_cgroup_request_bytes() -> None:
    frame = encode_v2_request(
        Command.CHECKPOINT, 31, dump_dir="/var/d", compression=Compression.LZ4, cgroup="app.slice/app"
    )
    # the RDK options first, as their senders order them, then memcr-py's
    assert frame == v2(i32(CHECKPOINT, 31, 200), b"/var/d\0", i32(201, 1), cgroup("app.slice/app"))
    request = decode_v2_payload(frame[8:])
    assert request == Request(
        CHECKPOINT, 31, Dialect.V2, dump_dir="/var/d", compression=Compression.LZ4, cgroup="app.slice/app"
    )
    assert request.group and request.options and not request.tree


def test_group_options_in_any_order() -> None:
    request = decode_v2_payload(i32(CHECKPOINT, 8) + cgroup(b"/sys/fs/cgroup/a\xff") + i32(201, 0))
    assert request.cgroup is not None and request.cgroup.encode(errors="surrogateescape") == b"/sys/fs/cgroup/a\xff"
    assert request.compression is Compression.NONE
    alone = decode_v2_payload(i32(CHECKPOINT, 8, 1000, 0))  # 0: the pid alone, as without the option
    assert not alone.tree and not alone.group and not alone.options


def test_a_plain_request_is_no_group() -> None:
    assert not Request(CHECKPOINT, 8).group


def test_cgroup_path_of_exactly_the_limit() -> None:
    longest = "/" + "c" * (PATH_MAX_V2 - 2)
    assert decode_v2_payload(i32(CHECKPOINT, 5) + cgroup(longest)).cgroup == longest
    with pytest.raises(ProtocolError, match="the cgroup \\(option 1001\\) is over 1024 bytes"):
        decode_v2_payload(i32(CHECKPOINT, 5) + cgroup(longest + "c"))
    with pytest.raises(ProtocolError, match="the cgroup is 1024 bytes: at most 1023"):
        encode_v2_request(Command.CHECKPOINT, 5, cgroup=longest + "c")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (i32(CHECKPOINT, 5, 1000, 2), "the process tree (option 1000) is 1 (or 0: the pid alone), not 2"),
        (i32(CHECKPOINT, 5, 1000) + b"\x01", "the process tree (option 1000) needs 4 bytes, 1 are left"),
        (i32(CHECKPOINT, 5, 1000, 1, 1000, 1), "option 1000 is given twice"),
        (i32(CHECKPOINT, 5, 1001) + b"/sys/fs/cgroup/app", "the cgroup (option 1001) is not NUL-terminated"),
        (i32(CHECKPOINT, 5, 1001) + b"\0", "the cgroup (option 1001) is empty"),
        (i32(CHECKPOINT, 5, 1000, 1) + cgroup("app"), "options 1000 (process tree) and 1001 (cgroup) exclude each"),
        (i32(CHECKPOINT, 5, 1000, 0) + cgroup("app"), "exclude each other"),  # even a tree of 0: one says which
        (
            i32(CHECKPOINT, 5, 1005, 0),
            "known are 200 (dump directory), 201 (compression), 1000 (process tree), 1001 (cgroup), 1002",
        ),
    ],
)
def test_group_payloads_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_v2_payload(payload)
    assert reason in str(refused.value)


def test_client_sends_a_group_as_v2() -> None:
    client = Client("/run/memcr.sock")
    assert client.frames(CHECKPOINT, 9, tree=True) == [i32(102, 16), i32(CHECKPOINT, 9, 1000, 1)]
    payload = i32(CHECKPOINT, 9) + cgroup("/sys/fs/cgroup/unified/app")
    assert client.frames(CHECKPOINT, 9, cgroup=Path("/sys/fs/cgroup/unified/app")) == [
        i32(102, len(payload)),
        payload,
    ]
    # the restore carries no option: any member's pid wakes the group
    assert client.frames(RESTORE, 9) == [i32(RESTORE, 9)]


@pytest.mark.parametrize(
    ("dialect", "options", "reason"),
    [
        (Dialect.V1, {"tree": True}, "a tree or a cgroup needs a V2 request, not v1"),
        (Dialect.TIMED, {"cgroup": "app"}, "needs a V2 request, not 12-byte"),
        (None, {"tree": True, "time_limit": 2.0}, "without the V2 options (the daemon's -t holds)"),
        (None, {"tree": True, "cgroup": "app"}, "a process tree or for a cgroup, not both"),
        (None, {"cgroup": ""}, "the cgroup is empty"),
        (None, {"cgroup": "a\0b"}, "the cgroup contains a NUL byte"),
    ],
)
def test_client_refuses_a_group_its_form_cannot_carry(dialect: Dialect | None, options: dict, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        Client("x.sock", dialect=dialect).frames(CHECKPOINT, 9, **options)
    assert reason in str(refused.value)


def test_cli_sends_groups(recorder: tuple[str, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    path, received = recorder
    code, out, _ = run_cli(["-l", path, "-p", "41", "-c", "-r", "--tree"], capsys)
    assert (code, out) == (0, "pid 41 and its tree checkpointed\npid 41 and its tree restored\n")
    code, out, _ = run_cli(["-l", path, "-p", "42", "-c", "--cgroup", "app.slice/app", "-z", "zstd"], capsys)
    assert (code, out) == (0, "pid 42 and cgroup app.slice/app checkpointed\n")
    assert received == [
        v2(i32(CHECKPOINT, 41, 1000, 1)),
        v2(i32(RESTORE, 41)),  # every request of a V2 run is V2, as the C client variant sends them
        v2(i32(CHECKPOINT, 42, 201, 2), cgroup("app.slice/app")),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "5", "-c", "--tree", "--cgroup", "app"], "--tree and --cgroup exclude each other"),
        (["-p", "5", "-r", "--tree"], "-d/--dir, -z/--compress, --tree and --cgroup apply to -c/--checkpoint only"),
        (["-p", "5", "-c", "--v1", "--cgroup", "app"], "--v1 sends the 8-byte request, which carries no"),
        (["-p", "5", "-c", "-t", "3", "--tree"], "-t/--timeout goes in the 12-byte request"),
        (["-p", "5", "-c", "--cgroup", "c" * 1100], "the cgroup is 1100 bytes: at most 1023 fit"),
    ],
)
def test_cli_group_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli([*argv, "-l", str(tmp_path / "nobody.sock")], capsys)
    assert code == 2
    assert f"memcr-client: error: {message}" in err


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("app/../../etc", "has a '..' in it: give its plain path"),
        ("/sys/fs/cgroup/../../tmp", "has a '..' in it"),
        ("app\nmemcr: pid 1 restored", "has a control character in it"),
        ("app\x7f", "has a control character in it"),
    ],
)
def test_a_client_s_cgroup_path_is_plain(text: str, reason: str) -> None:
    with pytest.raises(UsageError) as refused:
        paths.check_request_cgroup(text)
    assert reason in str(refused.value)
    assert "\n" not in str(refused.value)  # quoted: no line of the log is the client's


@pytest.mark.skipif(procfs.cgroup2_mount() is None, reason="no cgroup v2 hierarchy mounted")
def test_a_client_s_cgroup_is_under_the_mount() -> None:
    with pytest.raises(UsageError, match="is not under the cgroup v2 mount"):
        paths.check_request_cgroup("/tmp")
    with pytest.raises(UsageError, match="the root cgroup holds every process"):
        paths.check_request_cgroup(".")
