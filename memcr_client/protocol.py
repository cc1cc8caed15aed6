"""The memcr daemon's wire format, its addresses and the exit codes of its programs.

One definition for the daemon (`memcr -l`), the client and the tests. A
connection carries one request and one answer. Three request forms are in
use, and the daemon serves all of them on the same socket:

    v1, 8 bytes (the C memcr and its memcr-client):
        int32 command (100 CHECKPOINT, 101 RESTORE), int32 pid
    12 bytes (Thunder / rdkservices hibernate, socket /tmp/memcrservice):
        int32 command, int32 pid, int32 timeout in milliseconds
    V2 (RDK Dobby built with DOBBY_HIBERNATE_MEMCR_PARAMS_ENABLED, and the
        C memcr-client variant with -d/-z; socket /tmp/memcrcom):
        header  int32 102, int32 N (the payload's length)
        payload N bytes: int32 command, int32 pid, then options, each an
                int32 id and its value (Option below). memcr-py's own
                options park a group: 1000 the pid's process tree, 1001 a
                cgroup whose member the pid is (docs/groups.md); 1002
                makes a restore lazy or eager, whatever the daemon's
                default (--lazy); 1003 asks for the reason with the answer;
                1004 makes a restore keep the dump for an incremental
                re-park, or not, whatever the daemon's --incremental.

    answer, 4 bytes: int32 code (0 OK, -1 ERROR, -2 INVALID_PID)
    answer to a V2 request carrying option 1003 (docs/reasons.md):
        int32 code, int32 L (0 <= L <= REASON_MAX), then L bytes of UTF-8
        text: why the request failed, as the daemon logged it (L is 0
        with code 0). Every other request gets the 4 bytes alone, as ever.

Byte order: every sender is a C program writing packed structs of int32
in the CPU's own order, and the C daemon reads them the same way; so do we
(struct's "=" format). On the CPUs memcr supports (x86_64, arm64) that is
little-endian, which is what Thunder's and Dobby's "packed little-endian"
means. Only a TCP client on a CPU of the other order would differ, and it
cannot talk to the C daemon either.

The daemon tells the forms apart by the first 8 bytes: 102 starts V2;
otherwise more bytes that arrived with them make the 12-byte form, whose
senders write all 12 at once, while a v1 client sends 8 bytes and waits for
its answer. Nothing more is waited for: 12 bytes split after the 8th are
read as v1, without their time limit.

This module imports nothing of memcr, so the client installs alone.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import NamedTuple, TypedDict, Unpack


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
    TARGET_ENDED = 7  # the target ended while memcr held it, not by memcr's hand (killed by someone, exited)


class Dialect(Enum):
    """The three request forms (module docstring)."""

    V1 = "v1"  # the C memcr's 8 bytes
    TIMED = "12-byte"  # Thunder's: with a time limit
    V2 = "v2"  # Dobby's: header and payload with options


class Option(IntEnum):
    """Option ids of the V2 payload.

    200-299 are RDK's (Dobby and the C memcr-client variant); 1000-1999 are
    memcr-py's own, far from RDK's so that an id RDK adds next cannot
    collide. TREE and CGROUP make a CHECKPOINT park a group, all or nothing;
    they exclude each other, and a RESTORE carries neither: the restore of
    any member's pid wakes the whole group. LAZY and INCREMENTAL go with a RESTORE only,
    and none of the others does.
    """

    DUMP_DIR = 200  # the dump's directory: a NUL-terminated path, at most PATH_MAX_V2 bytes with its NUL
    COMPRESSION = 201  # int32 Compression
    TREE = 1000  # int32 1 (0: the pid alone, as without it): the pid and every descendant
    # a NUL-terminated cgroup v2 path, absolute or under the mount, at most PATH_MAX_V2 bytes with its NUL:
    # every process of it and its sub-cgroups; the request's pid must be one of them, and names the group
    CGROUP = 1001
    # int32 1: restore lazily (the target runs at once, its pages follow), 0: eagerly; without it the
    # daemon's default (memcr -l --lazy); a group's restore is eager either way
    LAZY = 1002
    # int32 1: the answer carries the reason of a failure after its code (REASON_LENGTH and the text); 0: it
    # does not, as without the option. Any command may carry it.
    REASON = 1003
    # int32 1: an eager restore keeps the dump and the kernel tracks the pages the target writes, so that its next
    # park writes only those (docs/incremental.md); 0: the dump is deleted, as ever; without it the daemon's
    # default (memcr -l --incremental). Not with LAZY 1: a lazy restore keeps nothing.
    INCREMENTAL = 1004


class Compression(IntEnum):
    """The value of Option.COMPRESSION."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2


# the names the client package has always exported
CMD_CHECKPOINT = Command.CHECKPOINT
CMD_RESTORE = Command.RESTORE
RESP_OK = Answer.OK
RESP_ERROR = Answer.ERROR
RESP_INVALID_PID = Answer.INVALID_PID

REQUEST = struct.Struct("=ii")  # native byte order and sizes, no padding: the C struct
TIMED_REQUEST = struct.Struct("=iii")  # Thunder's ServerRequest: command, pid, timeout in ms
V2_HEADER = REQUEST  # int32 CMDS_V2, int32 payload length: the same struct, as its senders write it
INT32 = struct.Struct("=i")
RESPONSE = INT32

CMDS_V2 = 102  # a V2 header's first int32 (MEMCR_CMDS_V2 of its senders)
DUMP_DIR_MAX = 1024  # bytes of a V2 dump directory, its NUL included (the senders' buffer)
PATH_MAX_V2 = DUMP_DIR_MAX  # bytes of any path option, its NUL included
# Dobby's longest payload is 1044 bytes; the rest is room for memcr-py's own options
V2_PAYLOAD_MAX = 8192
PATH_OPTIONS = {Option.DUMP_DIR: "the dump directory", Option.CGROUP: "the cgroup"}  # a NUL-terminated path
INT_OPTIONS = {  # an int32
    Option.COMPRESSION: "compression",
    Option.TREE: "the process tree",
    Option.LAZY: "the lazy restore",
    Option.REASON: "the reason wanted",
    Option.INCREMENTAL: "the incremental re-park",
}
REASON_LENGTH = INT32  # after the code of an answer to a request with Option.REASON: the text's length in bytes
REASON_MAX = 4096  # bytes of a reason at most: a longer one is cut (at a character's boundary)

LOCATION_ENV = "MEMCR_LOCATION"
DEFAULT_LOCATION = "/tmp/memcr/memcr.sock"
LOOPBACK = "127.0.0.1"


class ProtocolError(ValueError):
    """Bytes that are not a request or an answer, or a request that no form can carry."""


class AddressError(ValueError):
    """Text that is not a daemon address; the message says what is wrong with it."""


class Request(NamedTuple):
    """A decoded request. `cmd` stays an int: an unknown command is the daemon's to refuse."""

    cmd: int
    pid: int
    dialect: Dialect = Dialect.V1
    timeout_ms: int | None = None  # the 12-byte form's time limit; 0: none of its own
    dump_dir: str | None = None  # V2 Option.DUMP_DIR, decoded as os.fsdecode does
    compression: Compression | None = None  # V2 Option.COMPRESSION
    tree: bool = False  # V2 Option.TREE
    cgroup: str | None = None  # V2 Option.CGROUP, decoded as os.fsdecode does
    lazy: bool | None = None  # V2 Option.LAZY; None: the daemon's default
    reason: bool = False  # V2 Option.REASON: the answer carries the reason of a failure
    incremental: bool | None = None  # V2 Option.INCREMENTAL; None: the daemon's default

    @property
    def options(self) -> bool:
        """Whether the request carries V2 options that apply to a checkpoint only (all but LAZY, REASON and
        INCREMENTAL)."""
        return self.dump_dir is not None or self.compression is not None or self.group

    @property
    def group(self) -> bool:
        """Whether the request is for a process tree or a cgroup rather than its pid alone."""
        return self.tree or self.cgroup is not None


def _pack(layout: struct.Struct, *values: int) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error:
        raise ProtocolError(f"{', '.join(map(str, values))}: each value must fit in 32 bits") from None


def encode_request(cmd: int, pid: int) -> bytes:
    """The 8 bytes (v1) asking for `cmd` on `pid`."""
    try:
        return REQUEST.pack(cmd, pid)
    except struct.error:
        raise ProtocolError(f"command {cmd} and pid {pid} must each fit in 32 bits") from None


def decode_request(data: bytes) -> Request:
    """The v1 request in exactly REQUEST.size bytes."""
    if len(data) != REQUEST.size:
        raise ProtocolError(f"a request is {REQUEST.size} bytes, not {len(data)}")
    return Request(*REQUEST.unpack(data))


def encode_timed_request(cmd: int, pid: int, timeout_ms: int) -> bytes:
    """The 12 bytes (Thunder's form) asking for `cmd` on `pid` within `timeout_ms` milliseconds."""
    return _pack(TIMED_REQUEST, cmd, pid, timeout_ms)


def decode_timed_request(data: bytes) -> Request:
    """The 12-byte request; a negative time limit is refused, 0 means none of its own."""
    if len(data) != TIMED_REQUEST.size:
        raise ProtocolError(f"a 12-byte request is {TIMED_REQUEST.size} bytes, not {len(data)}")
    cmd, pid, timeout_ms = TIMED_REQUEST.unpack(data)
    if timeout_ms < 0:
        raise ProtocolError(f"the 12-byte request's time limit is {timeout_ms} ms: it must be 0 (none) or more")
    return Request(cmd, pid, Dialect.TIMED, timeout_ms=timeout_ms)


def time_limit_ms(seconds: float) -> int:
    """A time limit in seconds as the 12-byte form's milliseconds, rounded up so that it never shrinks to 0."""
    if not (seconds > 0 and seconds * 1000 < 2**31 - 1):  # also refuses NaN and infinity
        raise ProtocolError(f"a time limit must be more than 0 and under {2**31 // 1000} s, not {seconds}")
    return math.ceil(seconds * 1000)


def compression_named(name: str | int) -> Compression:
    """`none`, `lz4` or `zstd` (any case), or a Compression value."""
    if isinstance(name, int):
        try:
            return Compression(name)
        except ValueError:
            raise ProtocolError(f"compression {name} is none of {_compressions()}") from None
    try:
        return Compression[name.upper()]
    except KeyError:
        raise ProtocolError(f"unknown compression {name!r}: choose none, lz4 or zstd") from None


def _compressions() -> str:
    return ", ".join(f"{c.value} {c.name.lower()}" for c in Compression)


PathValue = str | bytes | os.PathLike[str]  # a path as a request carries it: bytes, as paths are


class V2Options(TypedDict, total=False):
    """The options of a V2 request by name, as encode_v2_payload and encode_v2_request take them."""

    dump_dir: PathValue | None  # Option.DUMP_DIR
    compression: int | None  # Option.COMPRESSION: a Compression value
    tree: bool  # Option.TREE
    cgroup: PathValue | None  # Option.CGROUP
    lazy: bool | None  # Option.LAZY; None: not sent, the daemon's default holds
    reason: bool  # Option.REASON: sent when True
    incremental: bool | None  # Option.INCREMENTAL; None: not sent, the daemon's default holds


def check_keywords(options: Mapping[str, object], known: type, where: str) -> None:
    """Refuse a keyword `known` (a TypedDict) does not name, as a signature would: else a typo'd option is lost."""
    unknown = sorted(set(options) - set(known.__annotations__))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")


def encode_v2_payload(cmd: int, pid: int, **options: Unpack[V2Options]) -> bytes:
    """The V2 payload: command, pid, then the options given (dump directory first, as its senders order them)."""
    check_keywords(options, V2Options, "encode_v2_payload")
    dump_dir, compression = options.get("dump_dir"), options.get("compression")
    tree, cgroup, lazy = options.get("tree", False), options.get("cgroup"), options.get("lazy")
    reason, incremental = options.get("reason", False), options.get("incremental")
    if tree and cgroup is not None:
        raise ProtocolError("a request is for a process tree or for a cgroup, not both")
    payload = _pack(REQUEST, cmd, pid)
    if dump_dir is not None:
        payload += _encode_path(Option.DUMP_DIR, dump_dir)
    if compression is not None:
        payload += INT32.pack(Option.COMPRESSION) + INT32.pack(compression_named(compression))
    if tree:
        payload += INT32.pack(Option.TREE) + INT32.pack(1)
    if cgroup is not None:
        payload += _encode_path(Option.CGROUP, cgroup)
    if lazy is not None:
        payload += INT32.pack(Option.LAZY) + INT32.pack(int(lazy))
    if reason:
        payload += INT32.pack(Option.REASON) + INT32.pack(1)
    if incremental is not None:
        payload += INT32.pack(Option.INCREMENTAL) + INT32.pack(int(incremental))
    return payload


def _encode_path(option: Option, value: PathValue) -> bytes:
    """A path option: its id, the path and its NUL."""
    what = PATH_OPTIONS[option]
    path = os.fsencode(value)
    if not path:
        raise ProtocolError(f"{what} is empty")
    if b"\0" in path:
        raise ProtocolError(f"{what} contains a NUL byte")
    if len(path) + 1 > PATH_MAX_V2:
        raise ProtocolError(f"{what} is {len(path)} bytes: at most {PATH_MAX_V2 - 1} fit in a V2 request")
    return INT32.pack(option) + path + b"\0"


def encode_v2_request(cmd: int, pid: int, **options: Unpack[V2Options]) -> bytes:
    """Header and payload of a V2 request (its senders write them in two writes; one is as good)."""
    payload = encode_v2_payload(cmd, pid, **options)
    return V2_HEADER.pack(CMDS_V2, len(payload)) + payload


def decode_v2_length(header: bytes) -> int:
    """The payload length a V2 header announces; refused unless it can hold a command and a pid and fits."""
    if len(header) != V2_HEADER.size:
        raise ProtocolError(f"a V2 header is {V2_HEADER.size} bytes, not {len(header)}")
    first: int
    length: int
    first, length = V2_HEADER.unpack(header)
    if first != CMDS_V2:
        raise ProtocolError(f"a V2 header starts with {CMDS_V2}, not {first}")
    if length < REQUEST.size:
        raise ProtocolError(f"a V2 payload of {length} bytes cannot hold its command and pid ({REQUEST.size} bytes)")
    if length > V2_PAYLOAD_MAX:
        raise ProtocolError(f"a V2 payload of {length} bytes is over the limit of {V2_PAYLOAD_MAX}")
    return length


def decode_v2_payload(payload: bytes) -> Request:
    """The V2 request in its payload; anything unknown, cut short, repeated or over a limit is refused."""
    if len(payload) < REQUEST.size:
        raise ProtocolError(f"a V2 payload of {len(payload)} bytes cannot hold its command and pid")
    cmd, pid = REQUEST.unpack_from(payload)
    paths: dict[Option, str] = {}
    compression: Compression | None = None
    tree = False
    lazy: bool | None = None
    incremental: bool | None = None
    reason = False
    at = REQUEST.size
    seen: set[int] = set()
    while at < len(payload):
        if len(payload) - at < INT32.size:
            raise ProtocolError(f"{len(payload) - at} bytes after the last option are no option id")
        (option,) = INT32.unpack_from(payload, at)
        at += INT32.size
        if option in seen:
            raise ProtocolError(f"option {option} is given twice")
        seen.add(option)
        if option in PATH_OPTIONS:
            what = f"{PATH_OPTIONS[Option(option)]} (option {option})"
            end = payload.find(b"\0", at, at + PATH_MAX_V2)
            if end < 0:
                if len(payload) - at >= PATH_MAX_V2:
                    raise ProtocolError(f"{what} is over {PATH_MAX_V2} bytes with its NUL")
                raise ProtocolError(f"{what} is not NUL-terminated")
            if end == at:
                raise ProtocolError(f"{what} is empty")
            paths[Option(option)] = os.fsdecode(payload[at:end])
            at = end + 1
        elif option in INT_OPTIONS:
            if len(payload) - at < INT32.size:
                what = f"{INT_OPTIONS[Option(option)]} (option {option})"
                raise ProtocolError(f"{what} needs 4 bytes, {len(payload) - at} are left")
            (value,) = INT32.unpack_from(payload, at)
            at += INT32.size
            if option == Option.COMPRESSION:
                compression = compression_named(value)
            elif value not in (0, 1):
                meaning = {
                    Option.TREE: "1 (or 0: the pid alone)",
                    Option.LAZY: "1 (lazily) or 0 (eagerly)",
                    Option.INCREMENTAL: "1 (keep the dump) or 0 (delete it)",
                }.get(Option(option), "1 (wanted) or 0 (not)")
                raise ProtocolError(f"{INT_OPTIONS[Option(option)]} (option {option}) is {meaning}, not {value}")
            elif option == Option.TREE:
                tree = value == 1
            elif option == Option.LAZY:
                lazy = value == 1
            elif option == Option.INCREMENTAL:
                incremental = value == 1
            else:
                reason = value == 1
        else:
            raise ProtocolError(
                f"option {option} is unknown: known are 200 (dump directory), 201 (compression), "
                "1000 (process tree), 1001 (cgroup), 1002 (lazy restore), 1003 (reason wanted) and 1004 "
                "(incremental re-park)"
            )
    if Option.TREE in seen and Option.CGROUP in seen:
        raise ProtocolError("options 1000 (process tree) and 1001 (cgroup) exclude each other")
    return Request(
        cmd,
        pid,
        Dialect.V2,
        dump_dir=paths.get(Option.DUMP_DIR),
        compression=compression,
        tree=tree,
        cgroup=paths.get(Option.CGROUP),
        lazy=lazy,
        reason=reason,
        incremental=incremental,
    )


def encode_answer(code: int, reason: str | None = None) -> bytes:
    """The 4 bytes of an answer; with `reason` (a request with Option.REASON): its length and text after them.

    A reason is sent whatever the code (empty with OK), so that the client
    knows the daemon read its option; it is cut to REASON_MAX bytes.
    """
    try:
        answer = RESPONSE.pack(code)
    except struct.error:
        raise ProtocolError(f"answer {code} does not fit in 32 bits") from None
    if reason is None:
        return answer
    text = reason.encode("utf-8", "replace")  # a lone surrogate from a path decoded by os.fsdecode
    if len(text) > REASON_MAX:
        text = text[:REASON_MAX].decode("utf-8", "ignore").encode()  # cut whole characters only
    return answer + REASON_LENGTH.pack(len(text)) + text


def decode_reason_length(data: bytes) -> int:
    """The length of the reason that follows an answer's code, refused when it is out of bounds."""
    if len(data) != REASON_LENGTH.size:
        raise ProtocolError(f"a reason's length is {REASON_LENGTH.size} bytes, not {len(data)}")
    length: int = REASON_LENGTH.unpack(data)[0]
    if not 0 <= length <= REASON_MAX:
        raise ProtocolError(f"a reason of {length} bytes: it is 0 to {REASON_MAX}")
    return length


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
