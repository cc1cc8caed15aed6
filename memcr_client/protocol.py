"""The memcr daemon's wire format, its addresses and the exit codes of its programs.

One definition for the daemon (`memcr -l`), the client and the tests. A
connection carries one request and one answer, in native byte order as the
C memcr and its clients send them:

    request, 8 bytes: int32 command (100 CHECKPOINT, 101 RESTORE), int32 pid
    answer,  4 bytes: int32 code (0 OK, -1 ERROR, -2 INVALID_PID)

This module imports nothing of memcr, so the client installs alone.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple


class Command(IntEnum):
    """What a request asks for."""

    CHECKPOINT = 100
    RESTORE = 101


class Answer(IntEnum):
    """The daemon's reply, sent once the operation has finished."""

    OK = 0
    ERROR = -1
    INVALID_PID = -2  # already checkpointed, not checkpointed, or no such process


class ExitCode(IntEnum):
    """Exit codes of `memcr` (all of them) and `memcr-client` (OK, FAILED and USAGE)."""

    OK = 0
    FAILED = 1  # any failure without a code of its own; memcr-client: a request failed
    USAGE = 2  # a bad option or option value
    TARGET = 3  # the pid is not something memcr may or can freeze
    RIGHTS = 4  # a permission, capability or kernel feature is missing
    STORAGE = 5  # the dump or socket directory or file failed
    TARGET_KILLED = 6  # restoring was impossible, so the target was killed


# the names the client package has always exported
CMD_CHECKPOINT = Command.CHECKPOINT
CMD_RESTORE = Command.RESTORE
RESP_OK = Answer.OK
RESP_ERROR = Answer.ERROR
RESP_INVALID_PID = Answer.INVALID_PID

REQUEST = struct.Struct("=ii")  # native byte order and sizes, no padding: the C struct
RESPONSE = struct.Struct("=i")

LOCATION_ENV = "MEMCR_LOCATION"
DEFAULT_LOCATION = "/tmp/memcr/memcr.sock"
LOOPBACK = "127.0.0.1"


class ProtocolError(ValueError):
    """Bytes that are not a request or an answer of this protocol."""


class AddressError(ValueError):
    """Text that is not a daemon address; the message says what is wrong with it."""


class Request(NamedTuple):
    """A decoded request. `cmd` stays an int: an unknown command is the daemon's to refuse."""

    cmd: int
    pid: int


def encode_request(cmd: int, pid: int) -> bytes:
    """The 8 bytes asking for `cmd` on `pid`."""
    try:
        return REQUEST.pack(cmd, pid)
    except struct.error:
        raise ProtocolError(f"command {cmd} and pid {pid} must each fit in 32 bits") from None


def decode_request(data: bytes) -> Request:
    """The request in exactly REQUEST.size bytes."""
    if len(data) != REQUEST.size:
        raise ProtocolError(f"a request is {REQUEST.size} bytes, not {len(data)}")
    return Request(*REQUEST.unpack(data))


def encode_answer(code: int) -> bytes:
    """The 4 bytes of an answer."""
    try:
        return RESPONSE.pack(code)
    except struct.error:
        raise ProtocolError(f"answer {code} does not fit in 32 bits") from None


def decode_answer(data: bytes) -> int:
    """The code in exactly RESPONSE.size bytes; an int, since a daemon may send codes unknown here."""
    if len(data) != RESPONSE.size:
        raise ProtocolError(f"an answer is {RESPONSE.size} bytes, not {len(data)}")
    code: int = RESPONSE.unpack(data)[0]
    return code


def default_location() -> str:
    """Where the client looks for the daemon without -l: $MEMCR_LOCATION, else DEFAULT_LOCATION."""
    return os.environ.get(LOCATION_ENV) or DEFAULT_LOCATION


@dataclass(frozen=True)
class Address:
    """A daemon's address: a UNIX socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = LOOPBACK
    port: int = 0

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> Address:
        """PORT (on 127.0.0.1), HOST:PORT, [IPv6]:PORT, or a path (anything else, or any os.PathLike)."""
        if not isinstance(text, str):
            return cls(path=Path(text))
        if not text:
            raise AddressError("empty address: give a TCP PORT, HOST:PORT or a socket path")
        if _digits(text):
            return cls(port=_port(text, text))
        host, sep, port = text.rpartition(":")
        # a "/" before the colon makes it a path (./a:1, /run/x:2), as do a leading "." (.a:1, no host
        # name starts so) and letters after it (name:sock)
        if not sep or "/" in host or host.startswith(".") or not _digits(port):
            return cls(path=Path(text))
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise AddressError(f"{text!r}: write an IPv6 address in brackets, as in [::1]:{port}")
        if not host:
            raise AddressError(f"{text!r}: no host before the port: give PORT alone for {LOOPBACK}, or HOST:PORT")
        return cls(host=host, port=_port(port, text))

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes "²" and other scripts' digits


def _port(digits: str, text: str) -> int:
    port = int(digits)
    if not 0 < port < 65536:
        where = "" if digits == text else f"{text!r}: "
        raise AddressError(f"{where}{port} is not a TCP port (1-65535)")
    return port
