"""Who asks the daemon and what it may have done (memcr.service.peer): real sockets, this process's own /proc.

Rootless; run as root, the uid a client must not have is root's plus one.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from memcr.errors import ClientRefused
from memcr.service.peer import UNKNOWN, Peer, Policy, Scope

ELSEWHERE = os.getppid()  # a client that is not among the processes asked about


@pytest.fixture
def own_process() -> Iterator[int]:
    """A thread of this process's own: this process, with two threads to look at."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    yield os.getpid()
    done.set()
    thread.join()


def test_a_unix_client_is_known_by_its_credentials() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        peer = Peer.of(left, "")
    assert peer == Peer(os.getpid(), os.getuid(), os.getgid())
    assert str(peer) == f"client pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}"


@pytest.mark.parametrize(("family", "host", "shown"), [(socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                                      (socket.AF_INET6, "::1", "[::1]")])  # fmt: skip
def test_a_tcp_client_is_known_by_its_address_alone(family: socket.AddressFamily, host: str, shown: str) -> None:
    try:
        server = socket.socket(family)
        server.bind((host, 0))
    except OSError as e:
        pytest.skip(f"no {host} here: {e.strerror}")
    with server, socket.socket(family) as client:
        server.listen(1)
        client.connect(server.getsockname()[:2])
        conn, address = server.accept()
        with conn:
            peer = Peer.of(conn, address)
        port = client.getsockname()[1]
    assert peer == Peer(address=f"{shown}:{port}")
    assert str(peer) == f"TCP client {shown}:{port} (no credentials)"


@pytest.mark.parametrize("scope", list(Scope))
def test_the_asker_is_never_parked(scope: Scope) -> None:
    me = Peer(os.getpid(), os.getuid(), os.getgid())
    with pytest.raises(ClientRefused, match=f"process {os.getpid()} is the client itself"):
        Policy(scope).vet(me, {1, os.getpid()})


def test_any_scope_lets_every_client_act_on_every_pid() -> None:
    for peer in (UNKNOWN, Peer(address="127.0.0.1:5"), Peer(ELSEWHERE, os.getuid() + 1, 0)):
        Policy(Scope.ANY).vet(peer, {os.getpid(), 1})


def test_own_scope_matches_every_thread_s_uids(own_process: int) -> None:
    uid = os.getuid()
    Policy(Scope.OWN).vet(Peer(ELSEWHERE, uid, 0), {own_process})
    with pytest.raises(ClientRefused) as refused:
        Policy(Scope.OWN).vet(Peer(ELSEWHERE, uid + 1, 0), {own_process})
    assert str(refused.value) == (
        f"process {own_process} runs as uids {uid}/{uid}/{uid}/{uid} (real/effective/saved/filesystem), "
        f"and --client-scope own lets uid {uid + 1} act only where all are {uid + 1}"
    )


def test_own_scope_lets_root_act_on_any_pid(own_process: int) -> None:
    Policy(Scope.OWN).vet(Peer(ELSEWHERE, 0, 0), {own_process, 1})


@pytest.mark.parametrize("peer", [UNKNOWN, Peer(address="127.0.0.1:5")])
def test_own_scope_refuses_a_client_without_credentials(peer: Peer) -> None:
    with pytest.raises(ClientRefused, match="a TCP connection does not carry"):
        Policy(Scope.OWN).vet(peer, {os.getpid()})


def test_own_scope_passes_over_a_process_that_ended() -> None:
    ended = os.fork()
    if ended == 0:
        os._exit(0)
    os.waitpid(ended, 0)
    Policy(Scope.OWN).vet(Peer(ELSEWHERE, os.getuid() + 1, 0), {ended})  # nothing of it left to protect
