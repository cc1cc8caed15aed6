"""The `memcr` command line. Failures become messages and exit codes here only."""

from __future__ import annotations

import contextlib
import grp
import os
import platform
import select
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from memcr import __version__
from memcr.advice import explain
from memcr.dump.codec import CIPHERS, COMPRESSORS, DEFAULT_CIPHER, Coding, cipher_name, compressor_name
from memcr.dump.format import remove_orphans
from memcr.errors import EXIT_MEANINGS, INTACT, GroupError, MemcrError, TargetEnded, UsageError
from memcr.group.cgroup import Cgroup
from memcr.interrupts import Interrupts
from memcr.logs import Level, Logger, write
from memcr.options import Cancel, Options
from memcr.report import Report, error_json, rate
from memcr.service.peer import Scope
from memcr.system import accounts, heap
from memcr.system.harden import harden, raise_descriptor_limit
from memcr_client.protocol import Address, AddressError, ExitCode

# Each mode imports what it runs in the function that runs it: the daemon (memcr.service) holds no checkpoint
# engine while idle, and memcr -p no daemon
if TYPE_CHECKING:
    from memcr.group.park import Membership
    from memcr.lazy.restore import LazyRestore


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
        write(sys.stdout, "kernel features (probed; docs/kernels.md says what memcr does without each):")
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
            listen_gid: int | None, client_scope: str | None, no_wait: bool, proc_mem: bool, rss_file: bool,
            compress: str | None, checksum: bool, encrypt: str | None, timeout: int | None,
            lazy: bool, allow_async_io: bool, json_reports: bool, quiet: bool, log_level: str | None,
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
        for name, value in (("-g/--listen-gid", listen_gid), ("-t/--timeout", timeout)):
            if value is not None:
                raise UsageError(f"{name} only applies to service mode (-l)")
    if listen is None and cgroup is None:
        if pid is None:
            raise UsageError("give the process to checkpoint with -p PID, or -l to serve (see memcr -h)")
        if pid <= 0:
            raise UsageError(f"-p/--pid must be a positive process id, not {pid}")
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
        coding=Coding(
            compress=compressor_name(compress) if compress else None,
            checksum=checksum,
            cipher=cipher_name(encrypt) if encrypt else None,
        ),
    )
    for path, size in remove_orphans(dump_dir):
        log(f"removed {path} ({size} bytes): the dump of a memcr that was killed (its target was killed with it)")
    if listen is not None:
        from memcr.service import daemon

        scope = Scope(client_scope or Scope.ANY.value)
        daemon.run(Address.parse(listen), options, log, listen_gid, timeout, json_reports, scope)
    elif cgroup is not None:
        from memcr.group.park import CgroupMembers

        interactive_group(CgroupMembers(Cgroup.find(cgroup)), options, wait=not no_wait, log=log)
    elif pid is not None and tree:
        from memcr.group.park import Tree

        interactive_group(Tree(pid), options, wait=not no_wait, log=log)
    elif pid is not None:
        interactive(pid, options, wait=not no_wait, log=log)


def interactive(pid: int, options: Options, wait: bool, log: Logger) -> None:
    cancel = Cancel()
    with Interrupts(cancel.cancel) as interrupts:
        _interactive(pid, options, wait, log, cancel, interrupts)


def _interactive(pid: int, options: Options, wait: bool, log: Logger, cancel: Cancel, interrupts: Interrupts) -> None:
    from memcr.park.checkpoint import checkpoint

    heap.tune()
    reported = options.reported()
    with ProgressBar.of("dumping", log) as bar:
        try:
            parked = checkpoint(pid, options, log, cancel, bar)
        except MemcrError as e:
            log.json(error_json(pid, "checkpoint", e, options=reported))
            raise
    r = parked.report
    phase: LazyRestore | None = None
    try:
        _checkpointed(r, log, log)
        if wait:
            log.always(f"pid {pid} checkpointed, press enter to restore")
            _wait_for_enter(cancel)
    finally:
        # whatever happened meanwhile, the target must not stay parked when memcr exits
        try:
            with ProgressBar.of("restoring", log) as bar:
                phase = parked.restore(lazy=options.lazy, progress=bar)
            if phase is not None:
                log(f"pid {pid} runs again after {r.upload_ms:.1f} ms; its pages come back lazily")
                phase.finish()
        except MemcrError as e:
            log.json(error_json(pid, "restore", e, options=r.options))
            raise
    _restored(r, log, log)
    if phase is not None and phase.lingering:
        _finish_children(phase, cancel, interrupts, log)
    if r.ended:
        raise TargetEnded(f"pid {pid} ended during its lazy restore ({r.ended}), not by memcr's hand", pid=pid)


def _finish_children(phase: LazyRestore, cancel: Cancel, interrupts: Interrupts, log: Logger) -> None:
    """Children forked during the lazy phase get their pages as they touch them, until each exits or execs."""
    interrupts.act = phase.server.stream_children  # before the line that tells they are served so
    if cancel.cancelled:  # asked to end during the target's own lazy phase
        phase.server.stream_children()
    children = ", ".join(map(str, sorted(phase.running.children)))
    log(
        f"pid {phase.pid} forked {children} during its lazy restore: memcr serves their missing pages as they "
        "touch them, until each exits or execs (SIGINT or SIGTERM: fill them now and exit)"
    )
    try:
        phase.finish_children()
    finally:
        log(f"let go of the processes pid {phase.pid} forked during its lazy restore")


def _checkpointed(r: Report, say: Callable[[str], None], log: Logger) -> None:
    say(f"set-up took {r.setup_ms:.1f} ms (seize, inject, scan)")
    say(f"download took {r.download_ms:.0f} ms ({rate(r.pages, r.page_size, r.download_ms):.0f} MiB/s)")
    before, after = r.rss_before, r.rss_after
    say(", ".join(f"{key} {before[key]} kB -> {after[key]} kB" for key in before))
    say(f"dump {r.dump_path} ({r.dump_bytes} bytes)")
    log.json(r.json("checkpoint"))


def _restored(r: Report, say: Callable[[str], None], log: Logger) -> None:
    if r.ended:
        say(f"lazy restore ended after {r.lazy_ms:.0f} ms: the process ended ({r.ended})")
    elif r.lazy_ms:
        say(f"lazy restore took {r.lazy_ms:.0f} ms after the wake-up ({r.lazy_faults} faults waited for a page)")
    else:
        say(f"upload took {r.upload_ms:.0f} ms ({rate(r.pages, r.page_size, r.upload_ms):.0f} MiB/s)")
        say(f"release took {r.release_ms:.1f} ms (parasite out, threads released)")
    if not r.ended:
        log(f"pid {r.pid} restored")
    log.json(r.json("restore"))


def interactive_group(membership: Membership, options: Options, wait: bool, log: Logger) -> None:
    """Park a tree or a cgroup all or nothing; the lines of each member, then one for the group."""
    cancel = Cancel()
    with Interrupts(cancel.cancel):
        _interactive_group(membership, options, wait, log, cancel)


def _interactive_group(membership: Membership, options: Options, wait: bool, log: Logger, cancel: Cancel) -> None:
    from memcr.group.park import park

    heap.tune()
    reported = options.reported()
    try:
        group = park(membership, options, log, cancel)
    except MemcrError as e:
        log.json(error_json(e.pid, "checkpoint", e, group=str(membership), options=reported))
        raise
    g = group.report
    try:
        for r in group.reports:
            _checkpointed(r, _member_log(r.pid, log), log)
        shared = g.shared_pages * g.page_size / 2**20
        log(f"{g.group}: {_processes(g.members)} parked in {g.park_ms:.0f} ms, {g.pages} pages "
            f"({g.pages * g.page_size / 2**20:.1f} MiB) dumped; {g.shared_pages} pages ({shared:.1f} MiB) stayed "
            "in memory because other processes map them too (fork, KSM); "
            f"VmRSS {g.rss_before['VmRSS']} kB -> {g.rss_after['VmRSS']} kB")  # fmt: skip
        log.json(g.json("checkpoint"))
        if wait:
            log.always(f"{g.group}: {_processes(g.members)} checkpointed, press enter to restore")
            _wait_for_enter(cancel)
    finally:
        # whatever happened meanwhile, no member may stay parked when memcr exits
        if options.lazy:
            log(f"restoring {g.group} eagerly: a group's restore is never lazy (--lazy restores one process)")
        try:
            group.restore()
        except GroupError as e:
            # the members that are back say so, as after a whole restore; then the failure of the others
            for r in group.reports:
                if r.pid not in e.killed and r.pid not in e.gone:
                    _restored(r, _member_log(r.pid, log), log)
            log.json(error_json(e.pid, "restore", e, group=g.group, options=g.options))
            raise
        except MemcrError as e:
            log.json(error_json(e.pid, "restore", e, group=g.group, options=g.options))
            raise
    for r in group.reports:
        _restored(r, _member_log(r.pid, log), log)
    log(f"{g.group}: {_processes(g.members)} restored in {g.wake_ms:.0f} ms")
    log.json(g.json("restore"))


def _processes(pids: list[int]) -> str:
    return f"{len(pids)} process{'' if len(pids) == 1 else 'es'}"


def _member_log(pid: int, log: Logger) -> Callable[[str], None]:
    return lambda message: log(f"pid {pid}: {message}")


class ProgressBar:
    """A bar on the terminal for dumps and eager restores big enough to take a noticeable time."""

    MIN_BYTES = 256 << 20

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = f"memcr: {label}"
        self._stream = stream
        self._bar: Any = None  # click's bar, once the work is big enough for one
        self._shown = 0
        self._gone = False  # its terminal went away

    @classmethod
    @contextlib.contextmanager
    def of(cls, label: str, log: Logger) -> Iterator[ProgressBar | None]:
        """A bar where the log goes when it is a terminal (Logger.shows_progress), else None; closed at the end."""
        bar = cls(label, log.stream) if log.shows_progress() else None
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()

    def __call__(self, done: int, total: int) -> None:
        if total < self.MIN_BYTES or self._gone:
            return
        try:
            if self._bar is None:
                self._bar = click.progressbar(length=total, label=self._label, file=self._stream)
                self._bar.__enter__()
            self._bar.update(done - self._shown)
        except OSError:
            # the terminal went away (EIO after a hang-up): the bar goes, the work and its exit code stay
            self._gone = True
            write(self._stream, "")  # points the stream at /dev/null (memcr.logs.write) for the lines to come
        self._shown = done

    def close(self) -> None:
        if self._bar is not None and not self._gone:
            with contextlib.suppress(OSError):  # the terminal went away: the bar with it
                self._bar.__exit__(None, None, None)


def _wait_for_enter(cancel: Cancel) -> None:
    """Return on a line (or end) of stdin, or on SIGINT/SIGTERM."""
    while not cancel.cancelled:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready:
            sys.stdin.readline()
            return


BOOLEAN_SHORT = set("cnmfNhVq")


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


def _error(message: str) -> None:
    """The last word, on stderr: a closed stderr loses it, not the exit code (memcr.logs.write)."""
    write(sys.stderr, f"memcr: error: {message}")


def main() -> None:
    try:
        command.main(args=split_optional_values(sys.argv[1:]), standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        _error(e.format_message())
        sys.exit(ExitCode.USAGE)
    except click.Abort:
        sys.exit(ExitCode.FAILED)
    except AddressError as e:  # from memcr_client, which knows no memcr errors
        _error(f"-l/--listen: {e}")
        sys.exit(ExitCode.USAGE)
    except MemcrError as e:
        _error(explain(e))
        sys.exit(e.exit_code)
    except Exception as e:
        write(sys.stderr, traceback.format_exc().rstrip("\n"))
        _error(f"internal error, please report it: {e!r}")
        sys.exit(ExitCode.FAILED)
