"""The daemon's wire protocol: an 8-byte request, a 4-byte response, one per connection."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

CMD_CHECKPOINT = 100
CMD_RESTORE = 101
RESP_OK = 0
RESP_ERROR = -1
RESP_INVALID_PID = -2

REQUEST = struct.Struct("=ii")  # native byte order, as the C daemon reads it
RESPONSE = struct.Struct("=i")


class MemcrClientError(Exception):
    """A request failed; `code` is the daemon's response code, None if there was none."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Client:
    """Talks to `memcr -l`: `address` is a TCP port (on 127.0.0.1) or a UNIX socket path."""

    address: str
    timeout: float | None = None

    def _connect(self) -> socket.socket:
        try:
            if self.address.isdigit():
                return socket.create_connection(("127.0.0.1", int(self.address)), self.timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
            except BaseException:
                sock.close()
                raise
            return sock
        except PermissionError:
            raise MemcrClientError(f"permission denied on the memcr socket {self.address}") from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise MemcrClientError(f"no memcr daemon listens on {self.address}") from None
        except OSError as e:
            raise MemcrClientError(f"cannot connect to memcr at {self.address}: {e.strerror}") from None

    def request(self, cmd: int, pid: int) -> int:
        """Send one command and return the daemon's response code."""
        with self._connect() as sock:
            try:
                sock.sendall(REQUEST.pack(cmd, pid))
                reply = sock.recv(RESPONSE.size, socket.MSG_WAITALL)
            except OSError as e:
                raise MemcrClientError(f"lost the connection to memcr: {e.strerror}") from None
        if len(reply) != RESPONSE.size:
            raise MemcrClientError("memcr closed the connection without answering")
        return RESPONSE.unpack(reply)[0]

    def _checked(self, cmd: int, pid: int, invalid: str) -> None:
        code = self.request(cmd, pid)
        if code == RESP_INVALID_PID:
            raise MemcrClientError(f"pid {pid}: {invalid}", code)
        if code != RESP_OK:
            raise MemcrClientError(f"pid {pid}: memcr reported an error ({code})", code)

    def checkpoint(self, pid: int) -> None:
        self._checked(CMD_CHECKPOINT, pid, "already checkpointed or no such process")

    def restore(self, pid: int) -> None:
        self._checked(CMD_RESTORE, pid, "not checkpointed")
