"""A small typed client for the memcr daemon, in any of its three request forms."""

from __future__ import annotations

import grp
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

from memcr_client.protocol import (
    CMDS_V2,
    REASON_LENGTH,
    RESPONSE,
    V2_HEADER,
    Address,
    Answer,
    Command,
    Compression,
    Dialect,
    PathValue,
    ProtocolError,
    check_keywords,
    compression_named,
    decode_answer,
    decode_reason_length,
    default_location,
    encode_request,
    encode_timed_request,
    encode_v2_payload,
    time_limit_ms,
)

DumpDir = PathValue


def _admits(path: Path | None) -> str:
    """Whom a socket that refused this user admits, and how one is added: for its error message."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return ""  # its folder is closed to this user too: nothing more to tell
    if st is None or not st.st_mode & stat.S_IWGRP:
        return ""
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f": it admits group {group}, to which an administrator adds a user (usermod -aG {group} USER)"


class RequestOptions(TypedDict, total=False):
    """What a request may carry besides its command and pid, as Client.frames and Client.request take it."""

    dump_dir: DumpDir | None  # V2
    compress: str | int | None  # V2: none, lz4, zstd, or a Compression
    time_limit: float | None  # the 12-byte form, in seconds
    tree: bool  # V2
    cgroup: PathValue | None  # V2
    lazy: bool | None  # V2, restores only; None: the daemon's default
    incremental: bool | None  # V2, restores only; None: the daemon's default


class MemcrClientError(Exception):
    """A request failed; `code` is the daemon's answer code, None if there was none; `reason` the daemon's
    reason for it, when the request asked for one (Client.reasons) and the daemon sent it."""

    def __init__(self, message: str, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Client:
    """Talks to `memcr -l`.

    `address` is a TCP PORT (on 127.0.0.1), HOST:PORT, [IPv6]:PORT or a UNIX
    socket path; without one, $MEMCR_LOCATION or /tmp/memcr/memcr.sock. A
    malformed address raises AddressError (a ValueError) here, not at the
    first request.

    `dialect` None sends each request in the plainest form that carries it:
    v1 (which the C daemon understands), the 12-byte form when it has a time
    limit, V2 when it has a dump directory, a compression, a tree, a
    cgroup or a lazy or eager restore. Dialect.V2
    sends every request as V2, restores included, as Dobby does; Dialect.V1
    refuses anything v1 cannot carry. `timeout` (seconds) bounds connecting
    and waiting for each answer; None waits as long as the daemon works.

    `reasons`: a V2 request asks for the reason of a failure with its answer
    (option 1003, docs/reasons.md), which a MemcrClientError then carries.
    Off by default: a daemon that does not know the option (memcr-py before
    it, the RDK C memcr) refuses the whole request. v1 and 12-byte requests
    cannot carry it: their failures point at the daemon's log.
    """

    address: str | os.PathLike[str] = field(default_factory=default_location)
    timeout: float | None = None
    dialect: Dialect | None = None
    reasons: bool = False
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
            raise MemcrClientError(f"permission denied on the memcr socket {where}{_admits(where.path)}") from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise MemcrClientError(f"no memcr daemon listens on {where}") from None
        except OSError as e:
            raise MemcrClientError(f"cannot connect to memcr at {where}: {e.strerror or e}") from None

    def frames(self, cmd: int, pid: int, **options: Unpack[RequestOptions]) -> list[bytes]:
        """The writes a request is sent as: one, or a V2 header and its payload (as Dobby writes them).

        Raises ProtocolError (a ValueError) for a request no form can carry.
        """
        check_keywords(options, RequestOptions, "frames")
        compress, time_limit = options.get("compress"), options.get("time_limit")
        compression = None if compress is None else compression_named(compress)
        dump_dir, tree, cgroup, lazy, incremental = (
            options.get("dump_dir"),
            options.get("tree", False),
            options.get("cgroup"),
            options.get("lazy"),
            options.get("incremental"),
        )
        v2 = dump_dir is not None or compression is not None or tree or cgroup is not None
        v2 = v2 or lazy is not None or incremental is not None
        dialect = self.dialect
        if dialect is None:
            dialect = Dialect.V2 if v2 else Dialect.TIMED if time_limit is not None else Dialect.V1
        if v2 and dialect is not Dialect.V2:
            raise ProtocolError(
                "a dump directory, a compression, a lazy or eager restore, an incremental re-park, a tree or a cgroup "
                "needs a V2 request, "
                f"not {dialect.value}"
            )
        if time_limit is not None and dialect is not Dialect.TIMED:
            raise ProtocolError(
                f"a time limit goes only in the 12-byte request, not in {dialect.value}"
                + (" (which has no field for it): send it without the V2 options (the daemon's -t holds)" if v2 else "")
            )
        if dialect is Dialect.V2:
            payload = encode_v2_payload(
                cmd,
                pid,
                dump_dir=dump_dir,
                compression=compression,
                tree=tree,
                cgroup=cgroup,
                lazy=lazy,
                reason=self.reasons,
                incremental=incremental,
            )
            return [V2_HEADER.pack(CMDS_V2, len(payload)), payload]
        if dialect is Dialect.TIMED:
            # no time limit with the 12-byte form chosen: 0, none of its own (the daemon's -t still holds)
            return [encode_timed_request(cmd, pid, 0 if time_limit is None else time_limit_ms(time_limit))]
        return [encode_request(cmd, pid)]

    def request(self, cmd: int, pid: int, **options: Unpack[RequestOptions]) -> int:
        """Send one command and return the daemon's answer code.

        `dump_dir`, `compress` (none, lz4, zstd), `tree` and `cgroup` apply
        to a checkpoint and go in a V2 request; `time_limit` (seconds) goes
        in the 12-byte one, and the daemon rolls back a checkpoint that
        takes longer; `lazy` and `incremental` (True or False) apply to a
        restore and go in a V2 request.
        """
        return self.answer(cmd, pid, **options)[0]

    def answer(self, cmd: int, pid: int, **options: Unpack[RequestOptions]) -> tuple[int, str | None]:
        """Send one command and return the daemon's answer code and its reason.

        The reason is None unless the request asked for it (a V2 request of
        a Client with `reasons`) and the daemon sent it; "" with a code that
        needs none.
        """
        frames = self.frames(cmd, pid, **options)
        asked = self.reasons and len(frames) > 1  # only a V2 request carries option 1003
        # the C daemon knows only v1: it closes the connection on a V2 header (command 102)
        hint = "; a daemon that knows only v1 requests (the C memcr) does that: send v1 (--v1)"
        hint = hint if len(frames) > 1 else ""
        with self._connect() as sock:
            try:
                for frame in frames:
                    sock.sendall(frame)
                reply = sock.recv(RESPONSE.size, socket.MSG_WAITALL)
                if not reply:
                    raise MemcrClientError(f"memcr closed the connection without answering{hint}")
                try:
                    code = decode_answer(reply)
                except ProtocolError as e:
                    raise MemcrClientError(f"memcr sent a broken answer: {e}") from None
                reason = self._reason(sock) if asked else None
                if asked and reason is None and code != Answer.OK:
                    raise MemcrClientError(
                        f"pid {pid}: memcr answered {code} without a reason: that daemon does not know option 1003, "
                        "and refuses a request that carries it: send it without --reason (the daemon's log says why)",
                        code,
                    )
            except TimeoutError:
                raise MemcrClientError(f"memcr did not answer within {self.timeout:g} s") from None
            except OSError as e:
                raise MemcrClientError(f"lost the connection to memcr: {e.strerror or e}{hint}") from None
        return code, reason

    @staticmethod
    def _reason(sock: socket.socket) -> str | None:
        """The reason after the code; None when the daemon closed the connection instead (it knows no 1003)."""
        try:
            head = sock.recv(REASON_LENGTH.size, socket.MSG_WAITALL)
        except ConnectionResetError:  # it closed with the request's options unread
            return None
        if not head:
            return None
        try:
            length = decode_reason_length(head)
        except ProtocolError as e:
            raise MemcrClientError(f"memcr sent a broken answer: {e}") from None
        text = sock.recv(length, socket.MSG_WAITALL) if length else b""
        if len(text) < length:
            stopped = f"its reason stopped after {len(text)} of {length} bytes"
            raise MemcrClientError(f"memcr sent a broken answer: {stopped}")
        return text.decode("utf-8", "replace")

    def _check(self, code: int, reason: str | None, pid: int, invalid: str) -> None:
        if code == Answer.OK:
            return
        if reason:  # the daemon's own words: they name the cause, not a guess among several
            raise MemcrClientError(f"pid {pid}: memcr answered {code}: {reason}", code, reason)
        if code == Answer.INVALID_PID:
            raise MemcrClientError(f"pid {pid}: {invalid} (the daemon's log says which)", code)
        # a v1 or 12-byte answer has no room for a reason, and a V2 one has it only when asked for
        raise MemcrClientError(f"pid {pid}: memcr reported an error ({code}): the daemon's log says why", code)

    def checkpoint(
        self,
        pid: int,
        *,
        dump_dir: DumpDir | None = None,
        compress: str | Compression | None = None,
        time_limit: float | None = None,
        tree: bool = False,
        cgroup: PathValue | None = None,
    ) -> None:
        """Park `pid`; the options as for request().

        With `tree`, `pid` and every descendant; with `cgroup` (absolute or
        under the cgroup v2 mount), every process of that cgroup, `pid`
        being one of them. All or nothing: the daemon answers OK only when
        every member is parked. restore() of any member's pid wakes them all.
        """
        code, reason = self.answer(
            Command.CHECKPOINT,
            pid,
            dump_dir=dump_dir,
            compress=compress,
            time_limit=time_limit,
            tree=tree,
            cgroup=cgroup,
        )
        invalid = "already checkpointed or no such process"
        if tree or cgroup is not None:
            invalid = "no such process, not in that cgroup, or a member is already checkpointed"
        self._check(code, reason, pid, invalid)

    def restore(
        self,
        pid: int,
        *,
        time_limit: float | None = None,
        lazy: bool | None = None,
        incremental: bool | None = None,
    ) -> None:
        """Wake `pid`, and every member of the group it was parked with.

        With `time_limit`, a restore that takes longer is answered -1 (it still completes).
        `lazy` True or False (a V2 request, so no `time_limit` with it) restores
        lazily or eagerly whatever the daemon's default (memcr -l --lazy); a
        lazy restore is answered once the target runs again, before its pages
        are all back. A group's restore is eager either way. `incremental`
        True or False (V2) keeps the dump for an incremental re-park, or not,
        whatever the daemon's --incremental (docs/incremental.md).
        """
        code, reason = self.answer(Command.RESTORE, pid, time_limit=time_limit, lazy=lazy, incremental=incremental)
        self._check(code, reason, pid, "not checkpointed, or its lazy restore is still under way")
