"""One request off a connection, in any of its three forms (memcr_client.protocol: v1, Thunder's 12 bytes,
Dobby's V2), within a time limit so that a slow client stalls nobody; and its answer."""

from __future__ import annotations

import contextlib
import socket
import time

from memcr.service.paths import quoted
from memcr_client.protocol import (
    CMD_CHECKPOINT,
    CMD_RESTORE,
    CMDS_V2,
    REQUEST,
    TIMED_REQUEST,
    V2_PAYLOAD_MAX,
    ProtocolError,
    Request,
    decode_request,
    decode_timed_request,
    decode_v2_length,
    decode_v2_payload,
    encode_answer,
)

# for a connection's first bytes to arrive after its accept, then again for all of its request
REQUEST_TIMEOUT = 5.0


class Refusal(Exception):
    """Bytes on a connection that are no request: why, and whether the client still gets -1."""

    def __init__(self, reason: str, answer: bool) -> None:
        super().__init__(reason)
        self.answer = answer  # False: nothing the client could read (it left, or sent too little to be one)


def read_request(conn: socket.socket) -> Request:
    """One request in any of the three forms, all of it within REQUEST_TIMEOUT; Refusal otherwise.

    The first 8 bytes decide: a V2 header (102, length), else a v1 request,
    or the 12-byte form when more bytes came with them (its sender writes
    all 12 at once; a v1 client sends 8 and waits, so nothing more is waited
    for). Bytes beyond the request are refused: one request per connection.
    """
    deadline = time.monotonic() + REQUEST_TIMEOUT
    head = _receive(conn, REQUEST.size, deadline)
    if len(head) < REQUEST.size:
        raise Refusal(f"no complete request ({len(head)} of {REQUEST.size} bytes)", answer=False)
    if REQUEST.unpack(head)[0] == CMDS_V2:
        try:
            length = decode_v2_length(head)
        except ProtocolError as e:
            raise Refusal(f"V2 request: {e}", answer=True) from None
        payload = _receive(conn, length, deadline)
        if len(payload) < length:
            raise Refusal(f"V2 request: its payload stopped after {len(payload)} of {length} bytes", answer=True)
        _refuse_more(conn, "V2 request")
        try:
            return decode_v2_payload(payload)
        except ProtocolError as e:
            raise Refusal(f"V2 request: {e}", answer=True) from None
    more = TIMED_REQUEST.size - REQUEST.size
    rest = _arrived(conn, more)
    if not rest:
        return decode_request(head)  # v1: the client sent 8 bytes and waits for its answer
    if len(rest) < more:  # the 12-byte form has begun: it has the rest of the time to end
        rest += _receive(conn, more - len(rest), deadline)
        if len(rest) < more:
            raise Refusal(f"no complete request ({REQUEST.size + len(rest)} bytes, neither 8 nor 12)", answer=True)
    _refuse_more(conn, "request")
    try:
        return decode_timed_request(head + rest)
    except ProtocolError as e:
        raise Refusal(str(e), answer=True) from None


def arrived_request(conn: socket.socket) -> Request | None:
    """The request, read, when all of it has arrived and nothing more: the usual case, which needs no wait.

    None, with nothing read, for anything else (a part, too many bytes, a
    form that does not decode): read_request then waits, judges and says
    why, as for a connection read from the start. The forms are told apart
    as read_request does: 8 bytes alone are v1, 12 the timed form. `conn`
    is left non-blocking: no system call goes to switching it back and forth.
    """
    conn.setblocking(False)
    try:
        data, _, flags, _ = conn.recvmsg(REQUEST.size + V2_PAYLOAD_MAX + 1, 0, socket.MSG_PEEK)
    except OSError:
        return None  # nothing yet, or the client is gone: read_request finds out which
    if flags & socket.MSG_CTRUNC:  # descriptors came with a write (SCM_RIGHTS): a peek stops at its end
        return None
    try:
        if len(data) >= REQUEST.size and REQUEST.unpack_from(data)[0] == CMDS_V2:
            if len(data) != REQUEST.size + decode_v2_length(data[: REQUEST.size]):
                return None
            request = decode_v2_payload(data[REQUEST.size :])
        elif len(data) == REQUEST.size:
            request = decode_request(data)
        elif len(data) == TIMED_REQUEST.size:
            request = decode_timed_request(data)
        else:
            return None
    except ProtocolError:
        return None
    conn.recv(len(data))  # the bytes peeked at: they wait in the socket, all of them
    return request


def _receive(conn: socket.socket, size: int, deadline: float) -> bytes:
    """Up to `size` bytes, fewer if the client stops sending, hangs up or the deadline passes."""
    data = b""
    try:
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            piece = conn.recv(size - len(data))
            if not piece:
                break
            data += piece
    except OSError:
        pass  # a timeout, a reset: what came is all there is, and the caller judges it
    finally:
        conn.settimeout(REQUEST_TIMEOUT)
    return data


def _arrived(conn: socket.socket, size: int, flags: int = 0) -> bytes:
    """Up to `size` bytes already waiting, without waiting for any: b"" when none are, or the client is gone."""
    conn.setblocking(False)  # MSG_DONTWAIT alone would wait, under a timeout
    try:
        return conn.recv(size, flags)
    except OSError:
        return b""
    finally:
        conn.settimeout(REQUEST_TIMEOUT)


def _refuse_more(conn: socket.socket, what: str) -> None:
    """Refuse bytes already waiting beyond the request: more than one request's worth is not this protocol."""
    if _arrived(conn, 1, socket.MSG_PEEK):
        raise Refusal(f"more bytes after the {what}: one request per connection", answer=True)


def asked(request: Request) -> str:
    """A request as the log shows it."""
    verbs: dict[int, str] = {CMD_CHECKPOINT: "checkpoint", CMD_RESTORE: "restore"}
    verb = verbs.get(request.cmd, f"command {request.cmd}")
    if request.cgroup is not None:
        what = f"the cgroup {quoted(request.cgroup)} of pid"
    else:
        what = "the tree of pid" if request.tree else "pid"
    return f"{verb} {what} {request.pid} ({request.dialect.value})"


def send(conn: socket.socket, code: int, reason: str | None = None) -> None:
    with contextlib.suppress(OSError):  # the client may have gone: the operation stands
        conn.sendall(encode_answer(code, reason))
