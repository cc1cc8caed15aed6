"""The `memcr` command line. Failures become messages and exit codes here only."""

from __future__ import annotations

import grp
import math
import os
import platform
import sys
from pathlib import Path

import click

from memcr import __version__
from memcr.dump.codec import CIPHERS, COMPRESSORS, DEFAULT_CIPHER, Coding, cipher_name, compressor_name
from memcr.dump.format import remove_orphans
from memcr.errors import EXIT_MEANINGS, INTACT, UsageError
from memcr.exits import error, run_or_exit
from memcr.group.cgroup import Cgroup
from memcr.logs import Level, Logger, write
from memcr.options import Options
from memcr.service.peer import Scope
from memcr.system import accounts
from memcr.system.harden import harden, raise_descriptor_limit
from memcr_client.protocol import Address, ExitCode

# Each mode imports what it runs in the function that runs it: the daemon (memcr.service) holds no checkpoint
# engine while idle, and memcr -p no daemon


class GroupId(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click stubs
    """A group as a number or a name."""

    name = "GROUP"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) or str(value).isdigit():
            return int(str(value))
        try:
            return grp.getgrnam(str(value)).gr_gid
        except KeyError:
            self.fail(f"no group named {value!r}", param, ctx)


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from memcr.park import features

        write(sys.stdout, f"memcr {__version__} ({platform.machine()}, Linux {platform.release()})")
        write(sys.stdout, "kernel features memcr can use here (probed; docs/kernels.md: what it does without each):")
        for line in features.summary():
            write(sys.stdout, line)
        ctx.exit(0)


def _help(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """click's own -h, written as every line is: a closed stdout does not turn exit 0 into 1."""
    if value and not ctx.resilient_parsing:
        write(sys.stdout, ctx.get_help())
        ctx.exit(0)


def _exit_codes() -> str:
    """--help's epilog: memcr.errors.EXIT_MEANINGS, one code a line (\b keeps click from rewrapping them)."""
    lines = [f"  {int(code)}  {meaning}" for code, meaning in sorted(EXIT_MEANINGS.items())]
    intact = f"{min(INTACT)} to {max(INTACT)}"  # a range: tests/unit/test_exit_codes.py checks it is one
    return "\b\nExit codes:\n" + "\n".join(lines) + f"\n\nExit codes {intact} leave the target running intact."


@click.command(add_help_option=False, epilog=_exit_codes())
@click.option("-p", "--pid", type=int, metavar="PID", help="Process to checkpoint (interactive mode).")
@click.option("--tree", is_flag=True, help="With -p: PID and every descendant, parked all or nothing.")
@click.option(
    "--cgroup",
    metavar="PATH",
    help="Every process of this cgroup v2 and its sub-cgroups, parked all or nothing (absolute or under the mount).",
)
@click.option(
    "-d",
    "--dir",
    "dump_dir",
    type=click.Path(path_type=Path),
    metavar="DIR",
    default=Path("/tmp"),
    show_default=True,
    help="Directory for the dump pages-<pid>.img.",
)
@click.option(
    "-S",
    "--parasite-socket-dir",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Parasite socket is DIR/memcr<pid> instead of an abstract socket.",
)
@click.option(
    "-G",
    "--parasite-socket-gid",
    type=GroupId(),
    help="With -S: the parasite sockets get this group (a gid or a name) and mode 0660.",
)
@click.option(
    "-N", "--parasite-socket-netns", is_flag=True, help="Connect to the parasite from the target's network namespace."
)
@click.option(
    "-l",
    "--listen",
    metavar="PORT|HOST:PORT|PATH",
    help="Service mode: TCP PORT on 127.0.0.1, HOST:PORT, or a UNIX socket PATH.",
)
@click.option(
    "-g", "--listen-gid", type=GroupId(), help="Group of the UNIX listen socket, a gid or a name (mode 0660)."
)
@click.option(
    "--client-scope",
    type=click.Choice([scope.value for scope in Scope]),
    help="Service mode: which processes a client may park. any (the default): every one; own: a client "
    "that is not root, its own uid's only (UNIX socket clients only, by their credentials).",
)
@click.option(
    "--unload-after",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Service mode: once nothing is parked, kept or asked for SECONDS (default 10), unload the checkpoint "
    "code until the next request: the idle daemon weighs about 6 MiB rather than 17, and that request waits "
    "for the code to load again (about 0.2 s here). 0 keeps it loaded.",
)
@click.option("-n", "--no-wait", is_flag=True, help="Restore right after the checkpoint.")
@click.option("-m", "--proc-mem", is_flag=True, help="Read pages through /proc/<pid>/mem (root only).")
@click.option("-f", "--rss-file", is_flag=True, help="Also drop file-backed pages the kernel can re-read.")
@click.option(
    "-z",
    "--compress",
    is_flag=False,
    flag_value="lz4",
    metavar=f"[{'|'.join(COMPRESSORS)}]",
    help="Compress the dump: lz4 (the default) or zstd.",
)
@click.option("-c", "--checksum", is_flag=True, help="MD5 over the dump, checked on restore.")
@click.option(
    "-e",
    "--encrypt",
    is_flag=False,
    flag_value=DEFAULT_CIPHER,
    metavar=f"[{'|'.join(CIPHERS)}]",
    help=f"Encrypt the dump with this cipher (default {DEFAULT_CIPHER}).",
)
@click.option(
    "-t",
    "--timeout",
    type=int,
    metavar="SECONDS",
    help="Service mode: a checkpoint running longer is rolled back (and a slow restore answered -1).",
)
@click.option(
    "--lazy",
    is_flag=True,
    help="Restore lazily: the process runs again at once, each page comes back on its first touch "
    "or from a background stream (userfaultfd; eager where that cannot be). A group's restore (--tree, "
    "--cgroup) is eager. With -l: the default of every restore but a group's, which a request's V2 option "
    "1002 overrides.",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Service mode: keep a target's dump after an eager restore and track the pages it writes (Linux 6.7); "
    "its next park writes only those (docs/incremental.md). The dump takes its space in the dump directory "
    "while the target runs, until its next park or its end; meanwhile the target cannot register its memory "
    "with a userfaultfd it makes (EBUSY).",
)
@click.option(
    "--allow-async-io",
    is_flag=True,
    help="Park processes with io_uring or Linux AIO; one written while parked is killed.",
)
@click.option(
    "--json",
    "json_reports",
    is_flag=True,
    help="Print a JSON line per checkpoint, restore and failure (docs/reports.md) on stdout, and the log on "
    "stderr; with -l, in the log.",
)
@click.option("-q", "--quiet", is_flag=True, help="Log errors and warnings only: as --log-level error.")
@click.option(
    "--log-level",
    type=click.Choice([level.name.lower() for level in Level]),
    help="error: errors and warnings only; info (the default): every step, with its figures.",
)
@click.option(
    "--allow-tracer", is_flag=True, help="Debugging only: run even when a debugger or strace is attached to memcr."
)
@click.option(
    "-V",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Print version, architecture and kernel.",
)
@click.option(
    "-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=_help, help="Show this message and exit."
)
def command(pid: int | None, tree: bool, cgroup: str | None, dump_dir: Path, parasite_socket_dir: Path | None,
            parasite_socket_gid: int | None, parasite_socket_netns: bool, listen: str | None,
            listen_gid: int | None, client_scope: str | None, unload_after: float | None, no_wait: bool,
            proc_mem: bool, rss_file: bool,
            compress: str | None, checksum: bool, encrypt: str | None, timeout: int | None,
            lazy: bool, incremental: bool, allow_async_io: bool, json_reports: bool, quiet: bool, log_level: str | None,
            allow_tracer: bool) -> None:  # fmt: skip
    """Checkpoint the memory of a running process to a file and restore it."""
    if quiet and log_level not in (None, "error"):
        raise UsageError(f"-q/--quiet is --log-level error: not with --log-level {log_level}")
    level = Level.ERROR if quiet else Level[(log_level or "info").upper()]
    log = Logger(level, json_reports, service=listen is not None)
    harden(allow_tracer)
    raise_descriptor_limit()
    if allow_tracer:
        log.error("WARNING: --allow-tracer: a debugger attached to memcr can read every page it saves "
                  "and the dump key; use it only to debug memcr")  # fmt: skip
    if listen is not None and pid is not None:
        raise UsageError("-p/--pid and -l/--listen exclude each other: interactive mode or service mode")
    if listen is not None and (tree or cgroup is not None):
        raise UsageError("--tree and --cgroup are for interactive mode, not with -l/--listen")
    if client_scope is not None and listen is None:
        raise UsageError("--client-scope only applies to service mode (-l): it says whom the daemon serves")
    if cgroup is not None and pid is not None:
        raise UsageError("-p/--pid and --cgroup exclude each other: a process (tree) or a cgroup")
    if tree and pid is None:
        raise UsageError("--tree needs -p PID: the process at the top of the tree")
    if listen is None:
        for name, value in (("-g/--listen-gid", listen_gid), ("-t/--timeout", timeout),
                            ("--unload-after", unload_after)):  # fmt: skip
            if value is not None:
                raise UsageError(f"{name} only applies to service mode (-l)")
        if incremental:
            raise UsageError("--incremental only applies to service mode (-l): the daemon keeps the dumps")
    if incremental and allow_async_io:
        raise UsageError(
            "--incremental and --allow-async-io exclude each other: what the kernel writes for io_uring or "
            "Linux AIO into a parked target's pinned buffers leaves no trace a re-park could see"
        )
    if listen is None and cgroup is None:
        if pid is None:
            raise UsageError("give the process to checkpoint with -p PID, or -l to serve (see memcr -h)")
        if pid <= 0:
            raise UsageError(f"-p/--pid must be a positive process id, not {pid}")
    if unload_after is not None and not math.isfinite(unload_after):
        raise UsageError(f"--unload-after must be a number of seconds (0: never), not {unload_after}")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"-t/--timeout must be a positive number of seconds, not {timeout}")
    if parasite_socket_gid is not None and parasite_socket_dir is None:
        raise UsageError("-G/--parasite-socket-gid needs -S/--parasite-socket-dir")
    if parasite_socket_gid is not None and os.geteuid() != 0 and not accounts.in_group(parasite_socket_gid):
        # found now, not at the first checkpoint of a daemon that would fail every one
        raise accounts.not_in_group(
            parasite_socket_gid, "it could not connect to the parasite sockets, which get that group and mode 0660 (-G)"
        )
    options = Options(
        dump_dir=dump_dir,
        # the parasite binds in the target's working directory, memcr connects from its own
        socket_dir=parasite_socket_dir.absolute() if parasite_socket_dir else None,
        socket_gid=parasite_socket_gid,
        netns=parasite_socket_netns,
        proc_mem=proc_mem,
        rss_file=rss_file,
        allow_async_io=allow_async_io,
        lazy=lazy,
        incremental=incremental,
        coding=Coding(
            compress=compressor_name(compress) if compress else None,
            checksum=checksum,
            cipher=cipher_name(encrypt) if encrypt else None,
        ),
    )
    for path, size in remove_orphans(dump_dir):
        log(f"removed {path} ({size} bytes): the dump of a memcr that was killed (its target was killed with it)")
    if listen is not None:
        from memcr.service import daemon, handoff

        scope = Scope(client_scope or Scope.ANY.value)
        unload = UNLOAD_AFTER if unload_after is None else unload_after
        daemon.run(handoff.Daemon(Address.parse(listen), options, log, listen_gid, timeout, json_reports, scope,
                                  unload))  # fmt: skip
    elif cgroup is not None:
        from memcr.group.park import CgroupMembers
        from memcr.oneshot import interactive_group

        interactive_group(CgroupMembers(Cgroup.find(cgroup)), options, wait=not no_wait, log=log)
    elif pid is not None and tree:
        from memcr.group.park import Tree
        from memcr.oneshot import interactive_group

        interactive_group(Tree(pid), options, wait=not no_wait, log=log)
    elif pid is not None:
        from memcr.oneshot import interactive

        interactive(pid, options, wait=not no_wait, log=log)


BOOLEAN_SHORT = set("cnmfNhVq")
UNLOAD_AFTER = 10.0  # seconds: --unload-after's default


def split_optional_values(argv: list[str]) -> list[str]:
    """Read `-zc` as `-z -c`, as the C memcr does, but keep `-zzstd` a value.

    -z and -e take an optional value, so a parser would take the `c` of
    `-zc` for a compressor name; when the rest of the word is not a name
    but only flags without values, it is split into those flags.
    """
    out = []
    for arg in argv:
        if len(arg) > 2 and arg[0] == "-" and arg[1] in "ze" and arg[1] != "-":
            rest = arg[2:]
            names = COMPRESSORS if arg[1] == "z" else CIPHERS
            if rest.lower() not in names and set(rest) <= BOOLEAN_SHORT:
                out += [arg[:2]] + [f"-{flag}" for flag in rest]
                continue
        out.append(arg)
    return out


def _parse() -> None:
    try:
        command.main(args=split_optional_values(sys.argv[1:]), standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        error(e.format_message())
        sys.exit(ExitCode.USAGE)
    except click.Abort:
        sys.exit(ExitCode.FAILED)


def main() -> None:
    run_or_exit(_parse)
