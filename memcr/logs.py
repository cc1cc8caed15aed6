"""Where memcr's lines go and which are shown: the log, its level, the JSON reports.

The interactive `memcr` writes its log on stdout, as the C memcr does;
with --json, stdout carries the JSON reports alone, one per line, and the
log goes to stderr, so that a program reads stdout as JSON without
sorting lines. The daemon's log is its journal: everything goes there
(stdout), the JSON reports too, prefixed as every line.

A closed stdout or stderr (a reader that went away, `memcr ... | head`)
loses the lines, never the work or the exit code: the first failed write
points that descriptor at /dev/null, so that later writes and the final
flush succeed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import TextIO

Log = Callable[[str], None]


class Level(IntEnum):
    """--log-level: the lines shown are those at this level or more severe."""

    ERROR = 0  # failures, warnings and the prompt to press Enter only (-q)
    INFO = 1  # every step, with its figures (the default)


def write(stream: TextIO, line: str) -> None:
    """One line on `stream`, flushed; a closed pipe swallows it (module docstring)."""
    try:
        stream.write(line + "\n")
        stream.flush()
    except OSError:
        with contextlib.suppress(OSError, ValueError):  # ValueError: a stream without a descriptor
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        with contextlib.suppress(OSError):
            stream.flush()  # what stayed buffered goes to /dev/null now, not to the exit's flush


class Logger:
    """memcr's log: call it for a step, .error() for what -q still shows, .json() for a report.

    The interactive prompt ("press enter to restore") goes through
    .always(): a program that waits for it must see it at every level.

    The streams are looked up at each line (sys.stdout may be replaced,
    as pytest does). A Logger is what memcr.park.checkpoint and the others call
    their `log`: any Callable[[str], None] serves them.
    """

    def __init__(self, level: Level = Level.INFO, json_reports: bool = False, service: bool = False) -> None:
        self.level = level
        self.json_reports = json_reports
        self.service = service

    @property
    def stream(self) -> TextIO:
        """Where the log goes: stderr when stdout is for the JSON reports alone."""
        return sys.stderr if self.json_reports and not self.service else sys.stdout

    def __call__(self, message: str) -> None:
        if self.level >= Level.INFO:
            self._line(f"memcr: {message}")

    def always(self, message: str) -> None:
        self._line(f"memcr: {message}")

    def _line(self, line: str) -> None:
        write(self.stream, line)

    error = always  # a failure or a warning: shown at every level

    def json(self, line: str) -> None:
        """A report, with --json only: unprefixed on stdout (`grep '^{'` finds it), or a line of the daemon's log."""
        if not self.json_reports:
            return
        if self.service:
            write(sys.stdout, f"memcr: {line}")
        else:
            write(sys.stdout, line)

    def shows_progress(self) -> bool:
        """A progress bar goes where the log goes, when that is a terminal and steps are shown."""
        return self.level >= Level.INFO and self.stream.isatty()


class Held(Logger):
    """A Logger's lines at its level, kept rather than written: to be written later, or by another image."""

    def __init__(self, logger: Logger) -> None:
        super().__init__(logger.level, logger.json_reports, logger.service)
        self.lines: list[str] = []

    def _line(self, line: str) -> None:
        self.lines.append(line)

    def replay(self) -> None:
        for line in self.lines:
            super()._line(line)


def always(log: Log, message: str) -> None:
    """A line shown at every level where `log` is a Logger (a plain callable takes it as is)."""
    if isinstance(log, Logger):
        log.always(message)
    else:
        log(message)


error = always  # a failure in the daemon's log


def report(log: Log, line: str) -> None:
    """A JSON report in `log` (the caller asked for --json): Logger.json, or the line itself for a plain callable."""
    if isinstance(log, Logger):
        log.json(line)
    else:
        log(line)
