"""Issue 32: V2 option 1004 (a restore keeps the dump for an incremental re-park, or not, whatever the daemon's
--incremental), as bytes, in the client, its CLI and the daemon's refusals.

Rootless and without a daemon: the frames are written here by hand from the
layouts (tests/unit/test_dialects.py's helpers), not with the encoders under
test; the daemon's refusals come from Service.decide, before any target.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memcr_client import Answer, Client, Dialect, ProtocolError
from memcr_client.protocol import Command, Option, Request, decode_v2_payload, encode_v2_request
from tests.unit.test_dialects import CHECKPOINT, RESTORE, decided, i32, run_cli, v2

if sys.byteorder != "little":
    pytest.skip("the frames below are written little-endian: memcr supports x86_64 and arm64", allow_module_level=True)

NOBODY = 4_000_000  # a pid no test process has (above the default pid_max): nothing may reach it anyway


def test_id() -> None:
    assert Option.INCREMENTAL == 1004


@pytest.mark.parametrize(("incremental", "value"), [(True, 1), (False, 0)])
def test_request_bytes(incremental: bool, value: int) -> None:
    frame = encode_v2_request(Command.RESTORE, 31, incremental=incremental)
    assert frame == v2(i32(RESTORE, 31, 1004, value))
    request = decode_v2_payload(frame[8:])
    assert request == Request(RESTORE, 31, Dialect.V2, incremental=incremental)
    assert not request.options  # no checkpoint option: a restore may carry it
    assert decode_v2_payload(i32(RESTORE, 31)).incremental is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (i32(RESTORE, 5, 1004, 2), "the incremental re-park (option 1004) is 1 (keep the dump) or 0 (delete it)"),
        (i32(RESTORE, 5, 1004) + b"\x01", "the incremental re-park (option 1004) needs 4 bytes, 1 are left"),
        (i32(RESTORE, 5, 1004, 1, 1004, 1), "option 1004 is given twice"),
    ],
)
def test_payloads_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_v2_payload(payload)
    assert reason in str(refused.value)


def test_client_library_and_cli(recorder: tuple[str, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    path, received = recorder
    Client(path, timeout=10).restore(15, incremental=True)
    Client(path, timeout=10).restore(16, incremental=False, lazy=False)
    assert run_cli(["-l", path, "-p", "17", "-r", "--incremental"], capsys)[0] == 0
    assert run_cli(["-l", path, "-p", "18", "-r", "--no-incremental", "--lazy"], capsys)[0] == 0
    assert received == [
        v2(i32(RESTORE, 15, 1004, 1)),
        v2(i32(RESTORE, 16, 1002, 0, 1004, 0)),
        v2(i32(RESTORE, 17, 1004, 1)),
        v2(i32(RESTORE, 18, 1002, 1, 1004, 0)),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "5", "-c", "--incremental"], "--incremental and --no-incremental apply to -r/--restore only"),
        (["-p", "5", "-r", "--incremental", "--lazy"], "--incremental and --lazy exclude each other"),
        (["-p", "5", "-r", "--v1", "--incremental"], "--v1 sends the 8-byte request, which carries no -d, -z"),
        (["-p", "5", "-r", "-t", "3", "--no-incremental"], "-t/--timeout goes in the 12-byte request"),
        (
            ["-p", "5", "-r", "--incremental", "--no-incremental"],
            "argument --no-incremental: not allowed with argument --incremental",
        ),
    ],
)
def test_cli_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli([*argv, "-l", str(tmp_path / "nobody.sock")], capsys)
    assert code == 2
    assert f"memcr-client: error: {message}" in err


def test_the_daemon_refuses_it_with_a_checkpoint() -> None:
    code, logged = decided(Request(CHECKPOINT, NOBODY, Dialect.V2, incremental=True))
    assert code == Answer.ERROR
    assert "a kept dump (1004) go with its RESTORE, not with the CHECKPOINT" in logged[0]


@pytest.mark.parametrize(("lazy", "lazy_daemon"), [(True, False), (None, True)])
def test_the_daemon_refuses_it_with_a_lazy_restore(lazy: bool | None, lazy_daemon: bool) -> None:
    code, logged = decided(Request(RESTORE, NOBODY, Dialect.V2, lazy=lazy, incremental=True), lazy=lazy_daemon)
    assert code == Answer.ERROR
    assert "option 1004 keeps the dump of an eager restore, and this one is lazy" in logged[0]


def test_the_daemon_refuses_it_beside_allow_async_io() -> None:
    code, logged = decided(Request(RESTORE, NOBODY, Dialect.V2, incremental=True), allow_async_io=True)
    assert code == Answer.ERROR
    assert "option 1004 needs a daemon without --allow-async-io" in logged[0]


@pytest.mark.parametrize("incremental", [True, False])
def test_a_restore_of_nothing_parked_is_minus_2(incremental: bool) -> None:
    assert decided(Request(RESTORE, NOBODY, Dialect.V2, incremental=incremental))[0] == Answer.INVALID_PID
