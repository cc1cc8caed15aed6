"""SIGINT and SIGTERM for the one-shot CLI, acted on whatever the main thread is blocked in.

Python runs a signal's handler on the main thread only, between two
bytecodes. A signal that some other thread of memcr received, or that came
just before the main thread entered waitpid(), leaves that call blocked: the
handler waits for it to return, and in the lazy phase only the handler's
action would make it return. So the signals are written to a pipe (the
interpreter's wakeup fd, written by the C-level handler on any thread), and a
thread of its own reads the pipe and acts at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """While entered: each SIGINT or SIGTERM calls `act` (thread-safe and idempotent) on the relay's thread."""

    def __init__(self, act: Callable[[], None]) -> None:
        self.act = act

    def __enter__(self) -> Interrupts:
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write, False)  # the interpreter's demand: a full pipe must not block a handler
        self._relay = threading.Thread(target=self._run, name="memcr-interrupts", daemon=True)
        try:
            self._relay.start()
        except BaseException:
            os.close(self._read)
            os.close(self._write)
            raise
        # the pipe before the handlers: a signal between the two is written, not lost
        self._former = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._handlers = {sig: signal.signal(sig, lambda *_: None) for sig in SIGNALS}  # the byte on the pipe acts
        return self

    def _run(self) -> None:
        while data := os.read(self._read, 64):
            if any(byte in SIGNALS for byte in data):
                self.act()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        signal.set_wakeup_fd(self._former)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        os.close(self._write)  # the relay reads the end of the pipe and returns
        self._relay.join()
        os.close(self._read)
