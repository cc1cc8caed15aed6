"""Fixtures of the rootless unit tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memcr_client.protocol import Answer, encode_answer


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A UNIX socket served by a thread: it records all a client sends (until it half-closes or waits) and answers 0."""
    path = tmp_path / "rec.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed at teardown
            with conn:
                conn.settimeout(0.3)  # a client sends its request at once, then waits for the answer
                data = b""
                try:
                    while piece := conn.recv(4096):
                        data += piece
                except TimeoutError:
                    pass
                received.append(data)
                conn.sendall(encode_answer(Answer.OK))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield str(path), received
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(10)
