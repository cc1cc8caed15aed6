"""Issue 16: V2 option 1002 (a restore lazy or eager, whatever the daemon's --lazy), as bytes, in the client,
its CLI and the daemon's refusals.

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
    assert Option.LAZY == 1002


@pytest.mark.parametrize(("lazy", "value"), [(True, 1), (False, 0)])
def test_lazy_request_bytes(lazy: bool, value: int) -> None:
    frame = encode_v2_request(Command.RESTORE, 31, lazy=lazy)
    assert frame == v2(i32(RESTORE, 31, 1002, value))
    request = decode_v2_payload(frame[8:])
    assert request == Request(RESTORE, 31, Dialect.V2, lazy=lazy)
    assert not request.options  # no checkpoint option: a restore may carry it


def test_without_the_option_the_daemon_decides() -> None:
    assert decode_v2_payload(i32(RESTORE, 31)).lazy is None
    assert encode_v2_request(Command.RESTORE, 31) == v2(i32(RESTORE, 31))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (i32(RESTORE, 5, 1002, 2), "the lazy restore (option 1002) is 1 (lazily) or 0 (eagerly), not 2"),
        (i32(RESTORE, 5, 1002, -1), "is 1 (lazily) or 0 (eagerly), not -1"),
        (i32(RESTORE, 5, 1002) + b"\x01\x00", "the lazy restore (option 1002) needs 4 bytes, 2 are left"),
        (i32(RESTORE, 5, 1002, 1, 1002, 0), "option 1002 is given twice"),
        (i32(RESTORE, 5, 1005, 1), "1002 (lazy restore), 1003 (reason wanted) and 1004 (incremental re-park)"),
    ],
)
def test_lazy_payloads_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_v2_payload(payload)
    assert reason in str(refused.value)


def test_client_sends_lazy_as_v2() -> None:
    client = Client("/run/memcr.sock")
    assert client.frames(RESTORE, 9, lazy=True) == [i32(102, 16), i32(RESTORE, 9, 1002, 1)]
    assert client.frames(RESTORE, 9, lazy=False) == [i32(102, 16), i32(RESTORE, 9, 1002, 0)]
    assert client.frames(RESTORE, 9, lazy=None) == [i32(RESTORE, 9)]  # the daemon's default: v1 carries that


@pytest.mark.parametrize(
    ("dialect", "options", "reason"),
    [
        (Dialect.V1, {"lazy": True}, "a lazy or eager restore, an incremental re-park, a tree or a cgroup needs a V2"),
        (Dialect.TIMED, {"lazy": False}, "needs a V2 request, not 12-byte"),
        (None, {"lazy": True, "time_limit": 2.0}, "without the V2 options (the daemon's -t holds)"),
    ],
)
def test_client_refuses_lazy_its_form_cannot_carry(dialect: Dialect | None, options: dict, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        Client("x.sock", dialect=dialect).frames(RESTORE, 9, **options)
    assert reason in str(refused.value)


def test_client_library_restores_lazily_or_eagerly(recorder: tuple[str, list[bytes]]) -> None:
    path, received = recorder
    client = Client(path, timeout=10)
    client.restore(15, lazy=True)
    client.restore(16, lazy=False)
    client.restore(17)
    assert received == [v2(i32(RESTORE, 15, 1002, 1)), v2(i32(RESTORE, 16, 1002, 0)), i32(RESTORE, 17)]


def test_cli_sends_lazy_and_eager(recorder: tuple[str, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    path, received = recorder
    code, out, _ = run_cli(["-l", path, "-p", "51", "-r", "--lazy"], capsys)
    assert (code, out) == (0, "pid 51 restored\n")
    assert run_cli(["-l", path, "-p", "52", "-r", "--eager"], capsys)[0] == 0
    assert run_cli(["-l", path, "-p", "53", "-c", "-r", "--lazy"], capsys)[0] == 0
    assert received == [
        v2(i32(RESTORE, 51, 1002, 1)),
        v2(i32(RESTORE, 52, 1002, 0)),
        v2(i32(CHECKPOINT, 53)),  # every request of a V2 run is V2; the option goes with the restore only
        v2(i32(RESTORE, 53, 1002, 1)),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "5", "-c", "--lazy"], "--lazy and --eager apply to -r/--restore only"),
        (["-p", "5", "-c", "--eager"], "--lazy and --eager apply to -r/--restore only"),
        (["-p", "5", "-r", "--v1", "--lazy"], "--v1 sends the 8-byte request, which carries no -d, -z, --tree, "),
        (["-p", "5", "-r", "-t", "3", "--eager"], "-t/--timeout goes in the 12-byte request, V2 (-d, -z, --tree, "),
        (["-p", "5", "-r", "--lazy", "--eager"], "argument --eager: not allowed with argument --lazy"),
    ],
)
def test_cli_lazy_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli([*argv, "-l", str(tmp_path / "nobody.sock")], capsys)
    assert code == 2
    assert f"memcr-client: error: {message}" in err


def test_daemon_refuses_lazy_with_a_checkpoint() -> None:
    code, logged = decided(Request(CHECKPOINT, NOBODY, Dialect.V2, lazy=True))
    assert code == Answer.ERROR
    assert logged == [
        f"refused the V2 checkpoint of pid {NOBODY}, which stays untouched: a lazy or eager restore "
        "(option 1002) and a kept dump (1004) go with its RESTORE, not with the CHECKPOINT"
    ]


def test_daemon_still_refuses_checkpoint_options_with_a_lazy_restore() -> None:
    code, logged = decided(Request(RESTORE, NOBODY, Dialect.V2, dump_dir="/tmp", lazy=True))
    assert code == Answer.ERROR
    assert logged[0].startswith(f"refused the V2 restore of pid {NOBODY}: a dump directory")


@pytest.mark.parametrize("lazy", [True, False])
def test_a_lazy_or_eager_restore_of_nothing_parked_is_minus_2(lazy: bool) -> None:
    assert decided(Request(RESTORE, NOBODY, Dialect.V2, lazy=lazy), lazy=not lazy)[0] == Answer.INVALID_PID


def test_a_misspelt_option_is_refused_not_lost() -> None:
    """The options are one keyword set (a TypedDict): a name outside it fails as with a plain signature."""
    with pytest.raises(TypeError, match="frames\\(\\) got an unexpected keyword argument 'lazzy'"):
        Client("x.sock").frames(RESTORE, 9, lazzy=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'dumpdir'"):
        encode_v2_request(Command.CHECKPOINT, 9, dumpdir="/d")  # type: ignore[call-arg]
