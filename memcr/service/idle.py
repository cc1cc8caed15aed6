"""The daemon while its service is not loaded: a small image that waits, and loads the service when work comes.

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

The service execs this image again once it has held nothing for
--unload-after seconds (memcr.service.daemon `_serve`). Nothing is parked
while this image runs, so nothing can be lost in it. Only the standard library's smallest parts and
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

TYPE_CHECKING = False  # typing itself, imported, would weigh about 0.9 MiB here
if TYPE_CHECKING:
    from typing import Any, TextIO

PR_SET_DUMPABLE = 4
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the memcr package's folder
# The image's program: the memcr package from the folder the first image loaded it from, whatever the working
# directory holds (-P keeps that directory off sys.path).
BOOT = (
    "import sys\nif sys.argv[1] not in sys.path: sys.path.insert(0, sys.argv[1])\n"
    "import memcr.service.idle as i\ni.main()"
)


def become(handoff: bytes, listener: int, stopped: Callable[[], bool], words: list[str]) -> None:
    """Exec the idle image with the `handoff` (memcr.service.handoff, marshalled) and the `listener` descriptor.

    `words` end its command line: the first image's, so that `pgrep -f "memcr -l"` finds the daemon in
    either image, each exec's the same.

    The stop signals are blocked across exec: one that comes meanwhile
    waits for the new image's handlers. Returns only when it did not
    exec: a stop came first (`stopped`), or exec failed (OSError); the
    signal mask and the descriptors are then as they were.
    """
    fd = os.memfd_create("memcr-handoff")  # close-on-exec until made inheritable below
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if stopped():
            return
        os.write(fd, handoff)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(listener, True)
        os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [sys.executable, *_interpreter_flags(), "-P", "-c", BOOT, ROOT, str(fd), *words]
        os.execv(sys.executable, argv)
    finally:  # only when it did not exec
        os.set_inheritable(listener, False)
        os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def fingerprint(folders: list[str]) -> list[tuple[str, int, int, int, int]]:
    """Each file under `folders` (sources, or the compiled modules of an install without them, the parasite's
    blobs) but the interpreter's caches, with its inode, size, and change and modification times: a new
    install changes them. A file that cannot be read is there with -1s, and so never found unchanged."""
    found = []
    for folder in folders:
        for top, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                path = os.path.join(top, name)
                try:
                    st = os.lstat(path)
                except OSError:  # gone since the listing: being replaced
                    found.append((path, -1, -1, -1, -1))
                    continue
                found.append((path, st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns))
    return found


def unchanged(state: dict[str, Any]) -> bool:
    """Whether memcr's files are those the first image read (an upgrade changes them)."""
    now = fingerprint(state["folders"])
    return -1 not in (entry[1] for entry in now) and now == state["fingerprint"]


def _interpreter_flags() -> list[str]:
    """The flags of this interpreter that decide where modules come from and how, for the next image."""
    flags = sys.flags
    chosen = [("-I", flags.isolated), ("-E", flags.ignore_environment and not flags.isolated),
              ("-s", flags.no_user_site and not flags.isolated), ("-S", flags.no_site),
              ("-B", flags.dont_write_bytecode), ("-" + "O" * flags.optimize, flags.optimize)]  # fmt: skip
    return [flag for flag, on in chosen if on]


def main() -> None:
    """The idle image's program: BOOT runs it with the memcr folder and the handoff's descriptor."""
    hardened = _undumpable()  # first: exec made it dumpable; else memcr.service.daemon's harden() says why, and exits
    with os.fdopen(int(sys.argv[2]), "rb") as handoff:
        state = marshal.load(handoff)
    # its name as the first image had it (`pgrep -x`, `killall`, the journal)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(state["comm"])
    stopped = []
    # A stop signal is served from now on (become() blocked them until here), and kept to be served by the
    # daemon once loaded; its byte on the wake-up pipe ends the wait.
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda number, _frame: stopped.append(number))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _unchanged(state, stopped)  # this module's own version reads the state it was handed
    if hardened:
        for line in state["greeting"]:
            _say(sys.stdout, line)
        waiting = select.poll()
        waiting.register(state["listener"][0], select.POLLIN)
        waiting.register(wake_read, select.POLLIN)
        while not stopped and not waiting.poll():
            pass
    signal.set_wakeup_fd(-1)
    os.close(wake_read)
    os.close(wake_write)
    _unchanged(state, stopped)  # what loads now is the version that started the daemon
    from memcr.exits import run_or_exit
    from memcr.service import daemon  # the service, loaded now that it has work

    run_or_exit(lambda: daemon.resume(state, lambda: bool(stopped)))


def _unchanged(state: dict[str, Any], stopped: list[int]) -> None:
    """Go on only while memcr's files are those the first image read.

    Changed (an upgrade), loading them could mix two versions: the daemon
    ends without them, its socket removed; nothing is parked. Asked to
    stop, it has stopped (exit 0); else it failed (exit 1), and a
    supervisor starts it again.
    """
    if unchanged(state):
        return
    _say(sys.stderr, "memcr: error: memcr's files changed since this daemon started (an upgrade?): it ends "
                     "without loading them, to be started again (systemd's Restart=on-failure does)")  # fmt: skip
    with contextlib.suppress(Exception):  # best effort: the socket's file and folders, as this version reads them
        _, path, made, inherited = state["listener"]
        if not inherited and path is not None:
            os.unlink(path)
            for folder in reversed(made):
                os.rmdir(folder)
    if stopped:
        _say(sys.stdout, "memcr: stopped")
        sys.exit(0)
    sys.exit(1)  # ExitCode.FAILED; memcr_client.protocol, which names it, may be of the other version


def _undumpable() -> bool:
    try:
        libc.prctl(PR_SET_DUMPABLE, 0)
    except OSError:
        return False
    return True


def _say(stream: TextIO, line: str) -> None:
    """One line, as memcr.logs.write does: a reader gone loses it, nothing else; a path in it as its bytes."""
    with contextlib.suppress(OSError):
        os.write(stream.fileno(), os.fsencode(line) + b"\n")
