"""Real apps under load: parked and woken again and again, with every option set.

Each app loads a known dataset, serves requests from a client thread the
whole time, and answers a request sent while it is parked once it wakes.
Its whole state (a digest through its own interface) and its own logs
must come through unchanged. MEMCR_APP_CYCLES sets the round trips per
app (`make test` runs a few, `make test-apps` a hundred).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.apps.launch import REQUEST_TIMEOUT, RunningApp, compile_java, start_jvm, start_nginx, start_node, start_redis
from tests.conftest import Memcr

CYCLES = int(os.environ.get("MEMCR_APP_CYCLES", "2"))
OPTION_SETS = [
    [],
    ["--lazy"],
    ["-z", "zstd", "-c"],
    ["-z", "-c", "--lazy"],
    ["-e"],
    ["-m"],
    ["-f"],
    ["-e", "--lazy"],
    ["-z"],
    ["-z", "-c", "-e", "aes-256-cbc"],
]


class Load(threading.Thread):
    """A client sending requests the whole time; every one must be answered."""

    def __init__(self, request: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.request = request
        self.stopping = threading.Event()
        self.done = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set() and self.done < 1_000_000:
            try:
                self.request()
                self.done += 1
            except Exception as e:  # every failure is reported by the test
                self.failures.append(repr(e))
            time.sleep(0.005)

    def finish(self) -> None:
        self.stopping.set()
        self.join(REQUEST_TIMEOUT * 2)
        assert not self.failures, self.failures[:5]
        assert self.done > 0


def park_cycles(memcr: Memcr, pids: Callable[[], list[int]], request: Callable[[], object]) -> None:
    """Park and wake every member CYCLES times, cycling through the option sets.

    In every round trip a request is sent while the member is parked; it
    must be answered after the wake-up.
    """
    for cycle in range(CYCLES):
        options = OPTION_SETS[cycle % len(OPTION_SETS)]
        for pid in pids():
            session = memcr.interactive("-p", pid, *options)
            session.wait_prompt()
            answered: list[BaseException | None] = []

            def ask(out: list[BaseException | None] = answered) -> None:
                try:
                    request()
                    out.append(None)
                except BaseException as e:  # handed to the test
                    out.append(e)

            asking = threading.Thread(target=ask, daemon=True)
            asking.start()
            time.sleep(0.05)
            assert session.press_enter() == 0, f"cycle {cycle} {options}: {session.stderr()}"
            asking.join(REQUEST_TIMEOUT)
            assert answered == [None], f"cycle {cycle} {options}: the request sent while parked: {answered}"
            if "--lazy" in options:
                lines = session.out.rest()
                assert any("its pages come back lazily" in line for line in lines), lines


@pytest.fixture(scope="session")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java(tmp_path_factory.mktemp("java"))


@pytest.fixture
def started() -> Iterator[list[RunningApp]]:
    apps: list[RunningApp] = []
    yield apps
    for app in apps:
        app.stop()


STARTERS = {"jvm": start_jvm, "node": start_node, "redis": start_redis, "nginx": start_nginx}


@pytest.mark.parametrize("name", list(STARTERS))
def test_app(name: str, started: list[RunningApp], memcr: Memcr, tmp_path: Path, request) -> None:
    """nginx is parked member by member: its master and both workers."""
    args = (request.getfixturevalue("java_classes"),) if name == "jvm" else ()
    app = STARTERS[name](tmp_path, *args)
    started.append(app)
    if name == "nginx":
        assert len(app.members()) == 3
    before = app.digest()
    load = Load(app.ping)
    load.start()
    park_cycles(memcr, app.members, app.ping)
    load.finish()
    assert app.proc.poll() is None
    assert app.digest() == before
    assert app.problems() == []
