"""The guardian: a process holding a copy of each userfaultfd, so none closes before the target is killed."""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import subprocess
import sys
import threading

from memcr.errors import MemcrError

_GUARD = """
import ctypes, os, resource, signal, socket, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the memcr thread that traces the target
if os.getppid() != int(sys.argv[1]):
    os._exit(0)  # that thread is gone already, and its exit killed the target
_, most = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
held, inbox = [], socket.socket(fileno=int(sys.argv[2]))
while True:  # no end: memcr closing its side must not end this
    message, fds, _, _ = socket.recv_fds(inbox, 16, 64)
    held += fds
    if message[:1] == b"d":  # memcr let go of that userfaultfd: so does this
        os.close(held[int(message[1:])])
        try:
            inbox.send(b"k")
        except OSError:
            pass
    elif message == b"r":  # a bell: the tracing thread waits for its children, and sees this stop
        os.kill(os.getpid(), signal.SIGSTOP)
"""

DROP_TIMEOUT = 10.0  # seconds the guardian may take to close a copy


class Guarding(enum.Enum):
    HOLDING = "holding"  # the copies it was handed are open in it
    ENDED = "ended"  # killed by memcr: it holds nothing any more


class Guardian:
    """A process holding a copy of each userfaultfd, so none closes before the target is killed.

    The copies travel over a socket; until the guardian takes them into
    its own descriptor table, the message holds them, and the message
    lives as long as the guardian's end of the socket. It is also the
    page server's bell: it stops itself when asked, which wakes the
    tracing thread (its parent) in waitpid.
    """

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-S", "-I", "-c", _GUARD, str(os.getpid()), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C for memcr must not reach it
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._sock = mine
        self._lock = threading.Lock()  # hold(), drop() and ring() from the page server, end() from any thread
        self._held: dict[int, int] = {}  # memcr's descriptor -> the place of its copy in the guardian's list
        self._sent = 0
        self.state = Guarding.HOLDING

    def hold(self, fd: int) -> None:
        """Keep `fd` open until the guardian ends or drops it; until then no page reads as zeros for want of it."""
        with self._lock:
            if self.state is Guarding.HOLDING:
                socket.send_fds(self._sock, [b"u"], [fd])
                self._held[fd] = self._sent
                self._sent += 1

    def drop(self, fd: int) -> None:
        """Close the guardian's copy of `fd`, and wait until it has: memcr is about to close its own."""
        with self._lock:
            place = self._held.pop(fd, None)
            if self.state is Guarding.ENDED or place is None:
                return
            try:
                self._sock.send(b"d%d" % place)
                self._sock.settimeout(DROP_TIMEOUT)
                self._sock.recv(1)
            except TimeoutError:
                raise MemcrError("memcr's guardian process did not answer within 10 s") from None
            except OSError:
                return  # it was killed: its copies went with it
            finally:
                self._sock.settimeout(None)

    def ring(self) -> None:
        """Wake the tracing thread in `RunningProcess.watch`."""
        with self._lock:
            if self.state is Guarding.HOLDING:
                with contextlib.suppress(OSError):  # killed: its exit wakes that thread all the same
                    self._sock.send(b"r")

    def end(self) -> None:
        """Kill it (which wakes the tracing thread, should it watch)."""
        with self._lock:
            self.state = Guarding.ENDED
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self._sock.close()

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            self.process.wait()
