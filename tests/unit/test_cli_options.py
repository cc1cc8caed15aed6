"""Option parsing of the `memcr` command: what each option becomes, and bad options refused with exit 2.

Rootless: the command runs in the test's process with its start-up
hardening (which would make the test process undumpable) and the work
itself (a checkpoint or a daemon) replaced by recorders; one test runs the
real entry point in a child process.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memcr import cli, oneshot
from memcr.dump.codec import CIPHERS, DEFAULT_CIPHER
from memcr.errors import EXIT_MEANINGS, UsageError
from memcr.logs import Level, Logger
from memcr.options import Options
from memcr.service import daemon
from memcr.service.peer import Scope


@pytest.mark.parametrize(
    ("argv", "split"),
    [
        (["-zc"], ["-z", "-c"]),
        (["-zcn"], ["-z", "-c", "-n"]),
        (["-ec"], ["-e", "-c"]),
        (["-p", "5", "-zcm"], ["-p", "5", "-z", "-c", "-m"]),
        (["-zzstd"], ["-zzstd"]),
        (["-zlz4"], ["-zlz4"]),
        (["-zLZ4"], ["-zLZ4"]),
        (["-eaes-128-cbc"], ["-eaes-128-cbc"]),
        (["-zq"], ["-z", "-q"]),
        (["-zx"], ["-zx"]),  # not only flags: a compressor name, refused later
        (["-z"], ["-z"]),
        (["-cz"], ["-cz"]),
        (["--zc"], ["--zc"]),
        (["-p", "-zc"], ["-p", "-z", "-c"]),
    ],
)
def test_split_optional_values(argv: list[str], split: list[str]) -> None:
    assert cli.split_optional_values(argv) == split


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    runs: list[tuple] = field(default_factory=list)  # ("interactive", pid, options, wait, log) or ("service", ...)

    @property
    def options(self) -> Options:
        [run] = self.runs
        return run[2]


@pytest.fixture
def memcr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Outcome]:
    """memcr(*argv) runs memcr's main() on argv: its exit code, output and what it would have started."""
    runs: list[tuple] = []
    monkeypatch.setattr(cli, "harden", lambda allow_tracer=False: None)
    monkeypatch.setattr(cli, "raise_descriptor_limit", lambda: None)
    monkeypatch.setattr(
        oneshot, "interactive", lambda pid, options, wait, log: runs.append(("interactive", pid, options, wait, log))
    )
    monkeypatch.setattr(daemon, "run", lambda *args, **kwargs: runs.append(("service", *args)))

    def run(*argv: object) -> Outcome:
        runs.clear()
        monkeypatch.setattr(sys, "argv", ["memcr", *map(str, argv)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return Outcome(code, out, err, list(runs))

    return run


def refused(outcome: Outcome, text: str) -> None:
    assert outcome.code == UsageError.exit_code == 2, outcome
    assert outcome.err.startswith("memcr: error: "), outcome.err
    assert text in outcome.err, outcome.err
    assert outcome.runs == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-n"], "give the process to checkpoint with -p PID, or -l to serve"),
        (["-p", "0"], "-p/--pid must be a positive process id, not 0"),
        (["-p", "-5"], "-p/--pid must be a positive process id, not -5"),
        (["-p", "abc"], "'abc' is not a valid integer"),
        (["--frobnicate"], "--frobnicate"),
        (["-p", "1", "-l", "9000"], "-p/--pid and -l/--listen exclude each other"),
        (["-p", "1", "-t", "5"], "-t/--timeout only applies to service mode (-l)"),
        (["-p", "1", "-g", "0"], "-g/--listen-gid only applies to service mode (-l)"),
        (["--cgroup", "app.slice", "-t", "5"], "-t/--timeout only applies to service mode (-l)"),
        (["--cgroup", "app.slice", "-g", "0"], "-g/--listen-gid only applies to service mode (-l)"),
        (["-p", "1", "--client-scope", "own"], "--client-scope only applies to service mode (-l)"),
        (["--cgroup", "a", "--client-scope", "any"], "--client-scope only applies to service mode (-l)"),
        (["-l", "9000", "--client-scope", "mine"], "'mine' is not one of 'any', 'own'"),
        (["-l", "9000", "-t", "0"], "-t/--timeout must be a positive number of seconds, not 0"),
        (["-p", "1", "--unload-after", "5"], "--unload-after only applies to service mode (-l)"),
        (["-l", "9000", "--unload-after", "-1"], "-1.0 is not in the range x>=0"),
        (["-l", "9000", "--unload-after", "soon"], "'soon' is not a valid float"),
        (["-l", "9000", "--unload-after", "nan"], "--unload-after must be a number of seconds (0: never), not nan"),
        (["-l", "9000", "--unload-after", "inf"], "--unload-after must be a number of seconds (0: never), not inf"),
        (["-p", "1", "-G", "4321"], "-G/--parasite-socket-gid needs -S/--parasite-socket-dir"),
        (["-p", "1", "-S", "/tmp", "-G", "no-such-group-memcr"], "no group named 'no-such-group-memcr'"),
        (["-p", "1", "-z", "gzip"], "unknown compression 'gzip': choose one of lz4, zstd"),
        (["-p", "1", "-zx"], "unknown compression 'x'"),
        (["-p", "1", "-q", "--log-level", "info"], "-q/--quiet is --log-level error: not with --log-level info"),
        (["-p", "1", "--log-level", "debug"], "'debug' is not one of 'error', 'info'"),
        (["-p", "1", "-e", "des"], "unknown cipher 'des': choose one of aes-128-cbc"),
    ],
)
def test_bad_options(memcr: Callable[..., Outcome], argv: list[str], message: str) -> None:
    refused(memcr(*argv), message)


@pytest.mark.parametrize(
    ("argv", "compress", "checksum", "cipher"),
    [
        ([], None, False, None),
        (["-z"], "lz4", False, None),
        (["-zc"], "lz4", True, None),
        (["-zzstd"], "zstd", False, None),
        (["-z", "zstd"], "zstd", False, None),
        (["--compress=zstd"], "zstd", False, None),
        (["-z", "LZ4"], "lz4", False, None),
        (["-c"], None, True, None),
        (["-e"], None, False, DEFAULT_CIPHER),
        (["-ec"], None, True, DEFAULT_CIPHER),
        (["-e", "aes-128-cbc"], None, False, "aes-128-cbc"),
        (["-z", "zstd", "-c", "-e"], "zstd", True, DEFAULT_CIPHER),
    ],
)
def test_dump_options(
    memcr: Callable[..., Outcome], argv: list[str], compress: str | None, checksum: bool, cipher: str | None
) -> None:
    outcome = memcr("-p", 1234, "-n", *argv)
    assert outcome.code == 0, outcome
    [(mode, pid, options, wait, _)] = outcome.runs
    assert (mode, pid, wait) == ("interactive", 1234, False)
    assert (options.coding.compress, options.coding.checksum, options.coding.cipher) == (compress, checksum, cipher)


def test_interactive_options(memcr: Callable[..., Outcome], tmp_path: Path) -> None:
    outcome = memcr("-p", 77, "-d", tmp_path, "-S", ".", "-G", 4321, "-N", "-m", "-f", "--allow-async-io")
    assert outcome.code == 0, outcome
    [(_, pid, options, wait, _)] = outcome.runs
    assert (pid, wait) == (77, True)
    assert options.dump_dir == tmp_path
    assert options.socket_dir == Path.cwd()  # made absolute: the parasite binds in the target's directory
    assert (options.socket_gid, options.netns, options.proc_mem, options.rss_file, options.allow_async_io) == (
        4321,
        True,
        True,
        True,
        True,
    )


def test_service_mode_starts_the_daemon(memcr: Callable[..., Outcome]) -> None:
    outcome = memcr("-l", "9000", "-z", "-t", "5")
    assert outcome.code == 0, outcome
    [(mode, settings)] = outcome.runs
    assert mode == "service"
    assert settings.options.coding.compress == "lz4" and settings.timeout == 5
    assert settings.scope is Scope.ANY  # the C memcr's model unless told otherwise
    assert memcr("-l", "9000", "--client-scope", "own").runs[0][1].scope is Scope.OWN
    assert settings.unload_after == 10  # unloaded after 10 s with nothing held, unless told otherwise
    assert memcr("-l", "9000", "--unload-after", "0").runs[0][1].unload_after == 0


def test_allow_tracer_warns(memcr: Callable[..., Outcome]) -> None:
    outcome = memcr("--allow-tracer", "-p", 1)
    assert outcome.code == 0
    assert "WARNING: --allow-tracer" in outcome.out and "dump key" in outcome.out


def test_help_and_version(memcr: Callable[..., Outcome]) -> None:
    shown = memcr("-h")
    assert shown.code == 0 and "Usage:" in shown.out and "--compress" in shown.out and shown.runs == []
    version = memcr("-V")
    assert version.code == 0 and version.out.startswith("memcr ") and version.runs == []
    assert f"({platform.machine()}, Linux " in version.out  # the CPU: x86_64 or aarch64


def test_help_lists_the_exit_codes_and_what_each_option_takes(memcr: Callable[..., Outcome]) -> None:
    shown = " ".join(memcr("-h").out.split())
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{int(code)} {meaning}" in shown, code
    for option in (
        "-z, --compress [lz4|zstd]",
        f"-e, --encrypt [{'|'.join(CIPHERS)}]",
        "-g, --listen-gid GROUP",
        "-G, --parasite-socket-gid GROUP",
        "-p, --pid PID",
        "-d, --dir DIR",
        "--log-level [error|info]",
    ):
        assert option in shown, option
    assert "a gid or a name" in shown
    assert "Exit codes 1 to 5 leave the target running intact." in shown


@pytest.mark.parametrize(
    ("argv", "level"),
    [([], Level.INFO), (["-q"], Level.ERROR), (["--quiet"], Level.ERROR), (["--log-level", "error"], Level.ERROR),
     (["--log-level", "info"], Level.INFO), (["-q", "--log-level", "error"], Level.ERROR), (["-zq"], Level.ERROR)],
)  # fmt: skip
def test_log_levels(memcr: Callable[..., Outcome], argv: list[str], level: Level) -> None:
    outcome = memcr("-p", 1234, "-n", *argv)
    assert outcome.code == 0, outcome
    [(_, _, _, _, log)] = outcome.runs
    assert isinstance(log, Logger) and log.level is level


def test_the_real_entry_point_refuses_bad_options() -> None:
    """`python -m memcr` as it is installed: hardening included, which any user may do."""
    for argv, message in ((["-p", "0", "-n"], "positive process id"), (["--frobnicate"], "frobnicate")):
        result = subprocess.run([sys.executable, "-m", "memcr", *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("memcr: error: ") and message in result.stderr, result.stderr
