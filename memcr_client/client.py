"""A small typed client for the memcr daemon."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from memcr_client.protocol import (
    RESPONSE,
    Address,
    Answer,
    Command,
    ProtocolError,
    decode_answer,
    default_location,
    encode_request,
)


class MemcrClientError(Exception):
    """A request failed; `code` is the daemon's answer code, None if there was none."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Client:
    """Talks to `memcr -l`.

    `address` is a TCP PORT (on 127.0.0.1), HOST:PORT, [IPv6]:PORT or a UNIX
    socket path; without one, $MEMCR_LOCATION or /tmp/memcr/memcr.sock. A
    malformed address raises AddressError (a ValueError) here, not at the
    first request.
    """

    address: str | os.PathLike[str] = field(default_factory=default_location)
    timeout: float | None = None
    where: Address = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "where", Address.parse(self.address))  # frozen: set once, here

    def _connect(self) -> socket.socket:
        where = self.where
        try:
            if where.path is None:
                return socket.create_connection((where.host, where.port), self.timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(where.path))
            except BaseException:
                sock.close()
                raise
            return sock
        except PermissionError:
            raise MemcrClientError(f"permission denied on the memcr socket {where}") from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise MemcrClientError(f"no memcr daemon listens on {where}") from None
        except OSError as e:
            raise MemcrClientError(f"cannot connect to memcr at {where}: {e.strerror or e}") from None

    def request(self, cmd: int, pid: int) -> int:
        """Send one command and return the daemon's answer code."""
        request = encode_request(cmd, pid)
        with self._connect() as sock:
            try:
                sock.sendall(request)
                reply = sock.recv(RESPONSE.size, socket.MSG_WAITALL)
            except OSError as e:
                raise MemcrClientError(f"lost the connection to memcr: {e.strerror or e}") from None
        if not reply:
            raise MemcrClientError("memcr closed the connection without answering")
        try:
            return decode_answer(reply)
        except ProtocolError as e:
            raise MemcrClientError(f"memcr sent a broken answer: {e}") from None

    def _checked(self, cmd: Command, pid: int, invalid: str) -> None:
        code = self.request(cmd, pid)
        if code == Answer.INVALID_PID:
            raise MemcrClientError(f"pid {pid}: {invalid}", code)
        if code != Answer.OK:
            raise MemcrClientError(f"pid {pid}: memcr reported an error ({code})", code)

    def checkpoint(self, pid: int) -> None:
        self._checked(Command.CHECKPOINT, pid, "already checkpointed or no such process")

    def restore(self, pid: int) -> None:
        self._checked(Command.RESTORE, pid, "not checkpointed")
