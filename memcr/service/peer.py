"""Who asks the daemon, and what it may have done: peer credentials and --client-scope.

A UNIX socket tells the daemon who connected: SO_PEERCRED gives the pid,
uid and gid of the process that called connect(), as they were then. A
TCP connection gives an address and nothing else. Two rules use them:

* nobody is parked at its own request: a request whose pid, tree or cgroup
  holds the asking process is refused whatever the scope, for that
  process would be frozen before it could read the answer (and, waiting
  for it, never ask for its restore);
* --client-scope own: a client that is not root may have memcr act only on
  processes each thread of which runs with the client's uid as its real,
  effective, saved and filesystem uid; a TCP client, of unknown uid, is
  refused. --client-scope any, the default and the C memcr's model, lets
  every client of the socket act on every pid.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from memcr.errors import ClientRefused, TargetGone
from memcr.system import procfs

UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


class Scope(enum.Enum):
    """Which processes a client may have memcr act on (--client-scope)."""

    ANY = "any"
    OWN = "own"


@dataclass(frozen=True)
class Peer:
    """A client: its credentials on a UNIX socket, its address on TCP; all None when unknown.

    `pid` is None also for a client in a pid namespace memcr cannot see
    into (the kernel then reports pid 0).
    """

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    address: str | None = None

    @classmethod
    def of(cls, conn: socket.socket, address: Any) -> Peer:
        """The client at the other end of `conn`, which accept() returned with `address` ((host, port, ...) on TCP)."""
        if conn.family == socket.AF_UNIX:
            pid, uid, gid = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
            return cls(pid or None, uid, gid)
        host, port = address[:2]
        return cls(address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def __str__(self) -> str:
        if self.uid is not None:
            return f"client pid {self.pid if self.pid is not None else '?'} uid {self.uid} gid {self.gid}"
        if self.address is not None:
            return f"TCP client {self.address} (no credentials)"
        return "client of unknown credentials"


UNKNOWN = Peer()


class Policy:
    """The rules above for one daemon."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    def note(self, tcp: bool) -> str | None:
        """What the daemon says at start about its scope; None for the default."""
        if self.scope is Scope.ANY:
            return None
        if tcp:
            return (
                "--client-scope own: TCP clients carry no credentials, so each of their requests will be refused; "
                "serve them on a UNIX socket (-l PATH)"
            )
        return "--client-scope own: a client that is not root may have memcr act on its own uid's processes only"

    def reads_proc(self, peer: Peer) -> bool:
        """Whether vetting `peer` reads /proc: for a client held to its own uid's processes."""
        return self.scope is Scope.OWN and peer.uid not in (0, None)

    def vet(self, peer: Peer, pids: Collection[int]) -> None:
        """Raise ClientRefused when `peer` may not have memcr act on `pids` (a pid, or a tree's or cgroup's members)."""
        if peer.pid is not None and peer.pid in pids:
            raise ClientRefused(
                f"process {peer.pid} is the client itself, which would be frozen before it could read the answer",
                pid=peer.pid,
            )
        if self.scope is Scope.ANY or peer.uid == 0:
            return
        if peer.uid is None:
            raise ClientRefused(
                "--client-scope own admits a client by its uid, which a TCP connection does not carry: "
                "serve such clients on a UNIX socket (-l PATH)"
            )
        for pid in sorted(pids):
            with contextlib.suppress(TargetGone):  # ended: nothing of it to protect, and nothing left to park
                for tid, uids in procfs.thread_uids(pid).items():
                    if set(uids) != {peer.uid}:
                        which = f"process {pid}" if tid == pid else f"thread {tid} of process {pid}"
                        raise ClientRefused(
                            f"{which} runs as uids {'/'.join(map(str, uids))} (real/effective/saved/filesystem), "
                            f"and --client-scope own lets uid {peer.uid} act only where all are {peer.uid}",
                            pid=pid,
                        )
