"""What the daemon's first image hands its idle image (memcr.service.idle), and back into memcr's types.

Only marshal's types cross exec: the state is a dict of str, int, bool,
None, tuples, lists and dicts, written by `state` and read by `resumed`,
the two kept side by side so that they change together. A field added
to Options crosses as it is, when marshal can write it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any, NamedTuple

import memcr
import memcr_client
from memcr.dump.codec import Coding
from memcr.logs import Level, Logger
from memcr.options import Options
from memcr.service import idle
from memcr.service.listener import Listener
from memcr.service.peer import Scope
from memcr_client.protocol import Address

# where the idle image checks that memcr is still the one that wrote the handoff, before it loads more of it
FOLDERS = [os.path.abspath(package.__path__[0]) for package in (memcr, memcr_client)]


class Daemon(NamedTuple):
    """A daemon's settings: Service's arguments, and after how many seconds with nothing held it goes back to
    its idle image (--unload-after; 0: never)."""

    address: Address
    options: Options
    log: Logger
    gid: int | None
    timeout: float | None
    json_reports: bool
    scope: Scope
    unload_after: float


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def state(daemon: Daemon, listener: Listener, greeting: list[str], words: list[str]) -> dict[str, object]:
    """The handoff of `daemon`, listening on `listener`, whose first lines (`greeting`) the idle image writes;
    `words` end each idle image's command line (memcr.service.idle.become)."""
    options, coding = daemon.options, daemon.options.coding
    return {
        "address": (_path(daemon.address.path), daemon.address.host, daemon.address.port),
        "options": {
            **{field.name: getattr(options, field.name) for field in dataclasses.fields(Options)},
            "dump_dir": str(options.dump_dir),
            "socket_dir": _path(options.socket_dir),
            "coding": (coding.compress, coding.checksum, coding.cipher),
        },
        "log": (int(daemon.log.level), daemon.log.json_reports),
        "gid": daemon.gid,
        "timeout": daemon.timeout,
        "json_reports": daemon.json_reports,
        "scope": daemon.scope.value,
        "unload_after": daemon.unload_after,
        "listener": (listener.fileno(), _path(listener.path), [str(p) for p in listener.made], listener.inherited),
        "greeting": greeting,
        "comm": Path("/proc/self/comm").read_text().rstrip("\n"),
        "words": words,
        "folders": FOLDERS,
        "fingerprint": idle.fingerprint(FOLDERS),
    }


def resumed(state: dict[str, Any]) -> tuple[Daemon, Listener]:
    """The daemon and its listener from a handoff `state`; the listener's descriptor is no more inherited.

    Should the state not fit this version of memcr, the listener is
    closed (its socket file and folders removed) before the error goes on.
    """
    level, json_reports = state["log"]
    log = Logger(Level(level), json_reports, service=True)
    fd, socket_path, made, inherited = state["listener"]
    os.set_inheritable(fd, False)
    socket_file = None if socket_path is None else Path(socket_path)
    listener = Listener(socket.socket(fileno=fd), log, socket_file, [Path(p) for p in made], inherited)
    try:
        path, host, port = state["address"]
        plain = dict(state["options"])
        socket_dir, (compress, checksum, cipher) = plain.pop("socket_dir"), plain.pop("coding")
        options = Options(
            dump_dir=Path(plain.pop("dump_dir")),
            socket_dir=None if socket_dir is None else Path(socket_dir),
            coding=Coding(compress=compress, checksum=checksum, cipher=cipher),
            **plain,
        )
        daemon = Daemon(
            address=Address(path=None if path is None else Path(path), host=host, port=port),
            options=options,
            log=log,
            gid=state["gid"],
            timeout=state["timeout"],
            json_reports=state["json_reports"],
            scope=Scope(state["scope"]),
            unload_after=state["unload_after"],
        )
    except BaseException:
        listener.close()
        raise
    return daemon, listener
