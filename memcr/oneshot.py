"""`memcr -p` (and --tree, --cgroup): park a process or a group, wait for Enter, wake it.

What the command line asked is settled by memcr.cli; this is the run
itself, with its progress bar, its human lines and its JSON reports.
"""

from __future__ import annotations

import contextlib
import select
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

import click

from memcr.errors import GroupError, MemcrError, TargetEnded
from memcr.interrupts import Interrupts
from memcr.logs import Logger, write
from memcr.options import Cancel, Options
from memcr.report import Report, error_json, rate
from memcr.system import heap

# Each mode imports what it runs in the function that runs it: the daemon (memcr.service) holds no checkpoint
# engine while idle, and memcr -p no daemon
if TYPE_CHECKING:
    from memcr.group.park import Membership
    from memcr.lazy.restore import LazyRestore


def interactive(pid: int, options: Options, wait: bool, log: Logger) -> None:
    cancel = Cancel()
    with Interrupts(cancel.cancel) as interrupts:
        _interactive(pid, options, wait, log, cancel, interrupts)


def _interactive(pid: int, options: Options, wait: bool, log: Logger, cancel: Cancel, interrupts: Interrupts) -> None:
    from memcr.park.checkpoint import checkpoint

    heap.tune()
    if options.lazy:
        from memcr.park import features

        for line in features.lazy_restore():
            log(line)
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
