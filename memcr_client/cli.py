"""The `memcr-client` command line (argparse: the client distribution has no dependencies)."""

from __future__ import annotations

import argparse
import sys

from memcr_client import __version__
from memcr_client.client import Client, MemcrClientError
from memcr_client.protocol import (
    DEFAULT_LOCATION,
    LOCATION_ENV,
    AddressError,
    Compression,
    Dialect,
    ExitCode,
    ProtocolError,
    compression_named,
    default_location,
)

PROG = "memcr-client"


def _compression(text: str) -> Compression:
    try:
        return compression_named(text)
    except ProtocolError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return seconds


class _NoShortV1(argparse.Action):
    """`-v`, which meant --v1 before; most programs read it as "verbose", which it never was: refused."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.error("-v is no option (it is not --verbose): to send the 8-byte v1 request, use --v1")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a memcr daemon to checkpoint and/or restore a process.",
        epilog="Without -d, -z, --tree, --cgroup, --lazy, --eager, -t or --v2 the request is the C memcr's 8 bytes "
        "(v1), which every memcr daemon understands. -d, -z, --tree, --cgroup, --lazy and --eager send Dobby's V2 "
        "request (every request of the run, as the C client variant does), -t Thunder's 12-byte one.",
    )
    p.add_argument(
        "-l",
        "--location",
        metavar="PORT|HOST:PORT|PATH",
        help=f"The daemon: TCP PORT on 127.0.0.1, HOST:PORT, or a UNIX socket PATH "
        f"(default: ${LOCATION_ENV}, else {DEFAULT_LOCATION}).",
    )
    p.add_argument(
        "-p", "--pid", type=int, required=True, help="Target process (with --cgroup: one of the cgroup's processes)."
    )
    p.add_argument("-c", "--checkpoint", action="store_true", help="Checkpoint the process.")
    p.add_argument("-r", "--restore", action="store_true", help="Restore the process.")
    p.add_argument("-d", "--dir", metavar="DIR", help="With -c: the daemon writes the dump into DIR (V2 request).")
    p.add_argument(
        "-z",
        "--compress",
        metavar="ALG",
        type=_compression,
        help="With -c: compress the dump with lz4 or zstd, or not at all with none (V2 request).",
    )
    p.add_argument(
        "--tree",
        action="store_true",
        help="With -c: the process and every descendant, parked all or nothing (V2 request, memcr-py's daemon).",
    )
    p.add_argument(
        "--cgroup",
        metavar="PATH",
        help="With -c: every process of this cgroup v2 (absolute, or under its mount), all or nothing; "
        "-p names one of them (V2 request, memcr-py's daemon). -r of any member's pid wakes the whole group.",
    )
    restores = p.add_mutually_exclusive_group()
    restores.add_argument(
        "--lazy",
        action="store_const",
        const=True,
        dest="lazy",
        help="With -r: the process runs again at once and its pages follow; the answer comes once it runs "
        "(V2 request, memcr-py's daemon; a group is restored eagerly).",
    )
    restores.add_argument(
        "--eager",
        action="store_const",
        const=False,
        dest="lazy",
        help="With -r: every page is back before the process runs again, whatever the daemon's --lazy "
        "(V2 request, memcr-py's daemon).",
    )
    keeps = p.add_mutually_exclusive_group()
    keeps.add_argument(
        "--incremental",
        action="store_const",
        const=True,
        dest="incremental",
        help="With -r: keep the dump and track the pages the process writes, so that its next checkpoint writes "
        "only those, whatever the daemon's --incremental (V2 request, memcr-py's daemon; not with --lazy).",
    )
    keeps.add_argument(
        "--no-incremental",
        action="store_const",
        const=False,
        dest="incremental",
        help="With -r: delete the dump, whatever the daemon's --incremental (V2 request, memcr-py's daemon).",
    )
    p.add_argument(
        "-t",
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        help="A checkpoint that takes longer is rolled back and answered -1; a restore that does is "
        "answered -1 (12-byte request, in milliseconds).",
    )
    forms = p.add_mutually_exclusive_group()
    forms.add_argument("--v1", action="store_true", help="Send only the 8-byte request, as the C memcr reads.")
    forms.add_argument("--v2", action="store_true", help="Send every request as V2, restores too (as Dobby does).")
    p.add_argument("-v", action=_NoShortV1)
    p.add_argument(
        "--reason",
        action="store_true",
        help="Send the request as V2 and ask for the reason of a failure with its answer (option 1003, "
        "memcr-py's daemon only: a daemon that does not know it refuses the request). Without it the daemon's "
        "log has the reason.",
    )
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return p


def run(argv: list[str] | None = None) -> None:
    """Parse `argv` and send the requests; usage errors exit through argparse with ExitCode.USAGE."""
    p = parser()
    args = p.parse_args(argv)
    if not (args.checkpoint or args.restore):
        p.error("give -c/--checkpoint, -r/--restore or both")
    if args.pid <= 0:
        p.error(f"-p/--pid must be a positive process id, not {args.pid}")
    if args.tree and args.cgroup is not None:
        p.error("--tree and --cgroup exclude each other: a process tree or a cgroup")
    group = args.tree or args.cgroup is not None
    checkpoint_options = args.dir is not None or args.compress is not None or group
    if checkpoint_options and not args.checkpoint:
        p.error(
            "-d/--dir, -z/--compress, --tree and --cgroup apply to -c/--checkpoint only "
            "(-r of any member's pid wakes the whole group)"
        )
    if args.lazy is not None and not args.restore:
        p.error("--lazy and --eager apply to -r/--restore only")
    if args.incremental is not None and not args.restore:
        p.error("--incremental and --no-incremental apply to -r/--restore only")
    if args.incremental and args.lazy:
        p.error("--incremental and --lazy exclude each other: a lazy restore keeps no dump")
    v2_options = checkpoint_options or args.lazy is not None or args.incremental is not None
    if args.v1 and (v2_options or args.timeout is not None):
        p.error(
            "--v1 sends the 8-byte request, which carries no -d, -z, --tree, --cgroup, --lazy, --eager, "
            "--incremental or -t"
        )
    if args.timeout is not None and (v2_options or args.v2):
        p.error(
            "-t/--timeout goes in the 12-byte request, V2 (-d, -z, --tree, --cgroup, --lazy, --eager, "
            "--incremental, --v2) has no field for it"
        )
    if args.v1 and args.reason:
        p.error("--v1 sends the 8-byte request, which has no room for --reason (a V2 option)")
    if args.timeout is not None and args.reason:
        p.error("-t/--timeout goes in the 12-byte request, which has no room for --reason (a V2 option)")
    dialect = Dialect.V1 if args.v1 else Dialect.V2 if args.v2 or v2_options or args.reason else None
    try:
        client = Client(args.location or default_location(), dialect=dialect, reasons=args.reason)
    except AddressError as e:
        p.error(f"-l/--location: {e}")
    what = " and its tree" if args.tree else f" and cgroup {args.cgroup}" if args.cgroup is not None else ""
    try:
        if args.checkpoint:
            client.checkpoint(
                args.pid,
                dump_dir=args.dir,
                compress=args.compress,
                time_limit=args.timeout,
                tree=args.tree,
                cgroup=args.cgroup,
            )
            print(f"pid {args.pid}{what} checkpointed", flush=True)
        if args.restore:
            client.restore(args.pid, time_limit=args.timeout, lazy=args.lazy, incremental=args.incremental)
            print(f"pid {args.pid}{what} restored", flush=True)
    except ProtocolError as e:  # a value no request can carry, such as a dump directory over 1023 bytes
        p.error(str(e))


def main() -> None:
    try:
        run()
    except MemcrClientError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(ExitCode.FAILED)
