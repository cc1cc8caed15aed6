"""The daemon until its first connection: a small image that waits, and loads the service when work comes.

`memcr -l` parses its options with click, checks them, makes its socket
and finds what it will say at its start, all in its first image; then it
execs this module (`become`), so that the waiting daemon holds none of
what that took (click alone is about 3.4 MiB). The new image gets the
listening socket and the rest of the state through descriptors, undoes
what exec undid (it makes itself undumpable again: exec made it
dumpable), writes the start-up lines (the "listening on" that programs
wait for comes only once that is done), and waits on the socket and the
stop signals without a thread or a timer. The first connection, or a
stop, loads memcr.service.daemon (`resume`), which serves or stops as a
daemon started in one image would.

Nothing is parked before the first request, so nothing can be lost in
this image. Only the standard library's smallest parts and
memcr.system.libc are imported here: what this module imports, the idle
daemon weighs (`make bench`, bench/service_load.py).
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import sys
from collections.abc import Callable

from memcr.system import libc

PR_SET_DUMPABLE = 4
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The image's program: the memcr package from the folder the first image loaded it from, whatever the working
# directory holds (-P keeps that directory off sys.path).
BOOT = (
    "import sys\nif sys.argv[1] not in sys.path: sys.path.insert(0, sys.argv[1])\n"
    "import memcr.service.idle as i\ni.main()"
)


def become(handoff: bytes, listener: int, stopped: Callable[[], bool]) -> None:
    """Exec the idle image with the `handoff` (memcr.service.handoff, marshalled) and the `listener` descriptor.

    The stop signals are blocked across exec: one that comes meanwhile
    waits for the new image's handlers. Returns only when it did not
    exec: a stop came first (`stopped`), or exec failed (OSError); the
    signals and descriptors are then as they were.
    """
    fd = os.memfd_create("memcr-handoff")  # close-on-exec until made inheritable below
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if stopped():
            return
        os.write(fd, handoff)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(listener, True)
        os.set_inheritable(fd, True)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sys.stdout.flush()
        sys.stderr.flush()
        # the first image's words last: `pgrep -f "memcr -l"` finds the daemon in either image
        argv = [sys.executable, *_interpreter_flags(), "-P", "-c", BOOT, root, str(fd), "memcr", *sys.argv[1:]]
        os.execv(sys.executable, argv)
    finally:  # only when it did not exec
        os.set_inheritable(listener, False)
        os.close(fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _interpreter_flags() -> list[str]:
    """The flags of this interpreter that decide where modules come from and how, for the next image."""
    flags = sys.flags
    chosen = [("-I", flags.isolated), ("-E", flags.ignore_environment and not flags.isolated),
              ("-s", flags.no_user_site and not flags.isolated), ("-S", flags.no_site),
              ("-B", flags.dont_write_bytecode), ("-" + "O" * flags.optimize, flags.optimize)]  # fmt: skip
    return [flag for flag, on in chosen if on]


def main() -> None:
    """The idle image's program: BOOT runs it with the memcr folder and the handoff's descriptor."""
    with os.fdopen(int(sys.argv[2]), "rb") as handoff:
        state = marshal.load(handoff)
    stopped = []
    # A stop signal from now on is kept, to be served by the daemon once loaded; its byte on the wake-up pipe
    # ends the wait.
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda number, _frame: stopped.append(number))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # become() blocked them: one pending is served now
    if _undumpable():  # else memcr.service.daemon's harden() says what is wrong, and exits
        for line in state["greeting"]:
            _say(line)
        waiting = select.poll()
        waiting.register(state["listener"][0], select.POLLIN)
        waiting.register(wake_read, select.POLLIN)
        while not stopped and not waiting.poll():
            pass
    signal.set_wakeup_fd(-1)
    os.close(wake_read)
    os.close(wake_write)
    from memcr.exits import run_or_exit
    from memcr.service import daemon  # the service, loaded now that it has work

    run_or_exit(lambda: daemon.resume(state, lambda: bool(stopped)))


def _undumpable() -> bool:
    try:
        libc.prctl(PR_SET_DUMPABLE, 0)
    except OSError:
        return False
    return True


def _say(line: str) -> None:
    """One start-up line on stdout, as memcr.logs.write does: a reader gone loses it, nothing else."""
    with contextlib.suppress(OSError):
        os.write(sys.stdout.fileno(), line.encode() + b"\n")
