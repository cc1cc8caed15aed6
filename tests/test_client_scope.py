"""Issue 27: the daemon knows who asks (SO_PEERCRED), never parks the asker, and --client-scope own.

Clients are real processes of real users made for each test, talking to a
real daemon over its socket; their targets run as those users, as root,
or with mixed credentials (tests/targets/creds.c).
"""

from __future__ import annotations

import grp
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from memcr_client.protocol import Answer, Command
from tests.conftest import CGROUP2, RUN_TIMEOUT, Accounts, Daemon, Lines, Target, as_user, reap
from tests.test_groups import members_of, tracer
from tests.test_service import free_port

OK, ERROR = Answer.OK, Answer.ERROR
CHECKPOINT, RESTORE = Command.CHECKPOINT, Command.RESTORE
NOGROUP = grp.getgrnam("nogroup").gr_gid  # the primary group of the users made here

# One request from a process of its own, which prints its pid ("asker PID"), then the answer. PID may be
# "self", or "parent-tree": a child asks for the tree of its parent, which holds the child. With "wait" it
# waits for a line on stdin before asking, while the test moves it into a cgroup.
ASK = r"""
import json, os, sys
from memcr_client import Client
path, cmd, pid, options = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
if pid == "parent-tree" and os.fork():
    sys.exit(os.waitstatus_to_exitcode(os.wait()[1]))
print("asker", os.getpid(), flush=True)
if options.pop("wait"):
    sys.stdin.readline()
target = {"self": os.getpid(), "parent-tree": os.getppid()}.get(pid) or int(pid)
options["tree"] = options.get("tree", False) or pid == "parent-tree"
print("answer", Client(path, timeout=60).request(cmd, target, **options), flush=True)
"""


class Asker:
    """A client process that sends one request to the daemon of `sock`, as `user` (None: root)."""

    def __init__(self, sock: Path, cmd: int, pid: int | str, user: str | None, wait: bool, options: dict) -> None:
        argv = [sys.executable, "-c", ASK, str(sock), str(int(cmd)), str(pid), json.dumps({"wait": wait, **options})]
        self.proc = subprocess.Popen(
            as_user(user, argv) if user else argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.out = Lines(self.proc.stdout)
        self.pid = int(self.out.wait_for("asker").split()[1])

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def answer(self) -> int:
        """The daemon's answer; the asker ran on to print it and end, so it was not frozen."""
        code = int(self.out.wait_for("answer").split()[1])
        assert self.proc.wait(RUN_TIMEOUT) == 0
        return code


@dataclass
class Scene:
    """A root daemon whose socket admits the clients' group, users a and b in that group."""

    daemon: Daemon
    sock: Path
    a: str
    a_uid: int
    b: str
    b_uid: int
    started: list[Asker]

    def asker(self, cmd: int, pid: int | str, user: str | None = None, wait: bool = False, **options: object) -> Asker:
        asker = Asker(self.sock, cmd, pid, user, wait, options)
        self.started.append(asker)
        return asker

    def ask(self, cmd: int, pid: int | str, user: str | None = None, **options: object) -> int:
        return self.asker(cmd, pid, user, **options).answer()


@pytest.fixture
def scene(made_accounts: Accounts, public_dir: Path) -> Iterator[Callable[..., Scene]]:
    started: list[Daemon] = []
    askers: list[Asker] = []
    clients, gid = made_accounts.group("mcc")
    a, a_uid = made_accounts.user("mca", [clients])
    b, b_uid = made_accounts.user("mcb", [clients])

    def start(*args: object) -> Scene:
        sock = public_dir / f"memcr{len(started)}.sock"
        dumps = public_dir / f"dumps{len(started)}"
        dumps.mkdir()
        started.append(Daemon(str(sock), "-g", gid, *args, dump_dir=dumps))
        return Scene(started[-1], sock, a, a_uid, b, b_uid, askers)

    yield start
    # the daemons first: one that parked an asker (a failing test) restores it at its stop, and only then
    # can the asker end and be reaped
    for d in started:
        d.terminate()
    for asker in askers:
        reap(asker.proc)


def untouched(*targets: Target) -> bool:
    """Nobody traces them, and each finds its memory intact."""
    return all(tracer(t.pid) == "0" for t in targets) and all(t.verify() == 0 for t in targets)


# -- who asks ------------------------------------------------------------------------


def test_every_request_is_logged_with_its_client(scene, spawn) -> None:
    s = scene()
    target = spawn("pattern", 8, user=s.b)
    asker = s.asker(CHECKPOINT, target.pid, user=s.a)
    assert asker.answer() == OK  # --client-scope any, the default: any client, any process
    line = f"client pid {asker.pid} uid {s.a_uid} gid {NOGROUP} asks: checkpoint pid {target.pid} (v1)"
    s.daemon.out.wait_for(line)
    assert tracer(target.pid) != "0"
    restorer = s.asker(RESTORE, target.pid)
    assert restorer.answer() == OK
    s.daemon.out.wait_for(f"client pid {restorer.pid} uid 0 gid 0 asks: restore pid {target.pid} (v1)")
    assert untouched(target)


# -- never park the asker ----------------------------------------------------------------


@pytest.mark.parametrize("scope", ["any", "own"])
def test_a_client_asking_to_park_itself_is_refused(scene, scope: str) -> None:
    s = scene("--client-scope", scope)
    asker = s.asker(CHECKPOINT, "self", user=s.a)
    assert asker.answer() == ERROR  # it read its answer: it was never frozen
    line = s.daemon.out.wait_for(f"refused the checkpoint of pid {asker.pid}")
    assert f"nothing touched: process {asker.pid} is the client itself" in line
    assert s.daemon.proc.poll() is None


def test_a_tree_holding_the_client_is_refused(scene) -> None:
    s = scene()
    asker = s.asker(CHECKPOINT, "parent-tree")  # root, who may act on any process
    assert asker.answer() == ERROR
    line = s.daemon.out.wait_for(f"refused the checkpoint of tree {asker.proc.pid}")
    assert f"nothing touched: process {asker.pid} is the client itself" in line


@pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy mounted")
def test_a_cgroup_holding_the_client_is_refused(scene, spawn, cgroup) -> None:
    s = scene()
    target = spawn("pattern", 8)
    group = cgroup("asker")
    asker = s.asker(CHECKPOINT, target.pid, wait=True, cgroup=str(group))
    for pid in (target.pid, asker.pid):
        (group / "cgroup.procs").write_text(str(pid))
    asker.go()
    assert asker.answer() == ERROR
    assert f"process {asker.pid} is the client itself" in s.daemon.out.wait_for("refused the checkpoint of cgroup")
    assert "frozen 0" in (group / "cgroup.events").read_text()  # refused before the freezer
    assert untouched(target)


# -- --client-scope own ------------------------------------------------------------------


def test_own_scope_lets_a_client_park_its_own_processes(scene, spawn) -> None:
    s = scene("--client-scope", "own")
    s.daemon.out.wait_for("--client-scope own: a client that is not root may have memcr act on its own uid's")
    alone = spawn("pattern", 8, 2, user=s.a)
    server = spawn("forkserver", 2, 1, 4, 4, user=s.a)
    assert s.ask(CHECKPOINT, alone.pid, user=s.a) == OK
    assert s.ask(CHECKPOINT, server.pid, user=s.a, tree=True) == OK
    assert tracer(alone.pid) != "0" and all(tracer(pid) != "0" for pid in members_of(server))
    assert s.ask(RESTORE, alone.pid, user=s.a) == OK
    assert s.ask(RESTORE, max(members_of(server)), user=s.a) == OK  # any member's pid wakes the tree
    assert untouched(alone, server)


@pytest.mark.parametrize(
    ("started", "shown"),
    [
        (("user", "b"), "process: b/b/b/b"),  # another user's
        (("root",), "process: 0/0/0/0"),
        (("creds", "a", "b", "a"), "process: a/b/a/b"),  # the effective uid (and the filesystem one) not a
        (("creds", "a", "a", 0), "process: a/a/0/a"),  # the saved uid root: it can become root again
        (("creds", "a", "a", "a", "b"), "thread: b/b/b/b"),  # its own threads all a, one thread of b
    ],
)
def test_own_scope_refuses_a_process_not_all_the_client_s(scene, spawn, started: tuple, shown: str) -> None:
    s = scene("--client-scope", "own")
    ids = {"a": s.a_uid, "b": s.b_uid}
    if started[0] == "user":
        target = spawn("pattern", 8, user=s.b)
    elif started[0] == "root":
        target = spawn("pattern", 8)
    else:
        target = spawn("creds", *(ids.get(uid, uid) for uid in started[1:]))
    asker = s.asker(CHECKPOINT, target.pid, user=s.a)
    assert asker.answer() == ERROR
    line = s.daemon.out.wait_for(f"refused the checkpoint of pid {target.pid}")
    assert f"asked by client pid {asker.pid} uid {s.a_uid} gid {NOGROUP}, nothing touched" in line
    which, uids = shown.split(": ")
    uids = "/".join(str(ids.get(uid, uid)) for uid in uids.split("/"))
    who = rf"thread \d+ of process {target.pid}" if which == "thread" else f"process {target.pid}"
    assert re.search(rf"{who} runs as uids {uids} \(real/effective/saved/filesystem\)", line), line
    assert f"--client-scope own lets uid {s.a_uid} act only where all are {s.a_uid}" in line
    assert untouched(target)


def test_own_scope_vets_every_member_of_a_tree(scene, spawn) -> None:
    s = scene("--client-scope", "own")
    parent = spawn("creds", s.a_uid, s.a_uid, s.a_uid, -1, s.b_uid)  # a of a, with a child of b
    [child] = [int(pid) for [pid] in parent.said("child")]
    assert s.ask(CHECKPOINT, parent.pid, user=s.a, tree=True) == ERROR
    line = s.daemon.out.wait_for(f"refused the checkpoint of tree {parent.pid}")
    assert f"process {child} runs as uids {s.b_uid}/" in line
    assert tracer(child) == "0"
    assert untouched(parent)


@pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy mounted")
def test_own_scope_vets_every_member_of_a_cgroup(scene, spawn, cgroup) -> None:
    s = scene("--client-scope", "own")
    own, other = spawn("pattern", 8, user=s.a), spawn("pattern", 8, user=s.b)
    group = cgroup("mixed")
    for pid in (own.pid, other.pid):
        (group / "cgroup.procs").write_text(str(pid))
    assert s.ask(CHECKPOINT, own.pid, user=s.a, cgroup=str(group)) == ERROR
    line = s.daemon.out.wait_for("refused the checkpoint of cgroup")
    assert f"process {other.pid} runs as uids {s.b_uid}/" in line
    assert "frozen 0" in (group / "cgroup.events").read_text()
    assert untouched(own, other)


def test_own_scope_restore_only_by_root_or_the_owner(scene, spawn) -> None:
    s = scene("--client-scope", "own")
    target = spawn("pattern", 8, user=s.b)
    assert s.ask(CHECKPOINT, target.pid) == OK  # root may act on any process
    assert s.ask(RESTORE, target.pid, user=s.a) == ERROR
    assert "refused the restore of pid" in s.daemon.out.wait_for(f"refused the restore of pid {target.pid}")
    assert tracer(target.pid) != "0"  # still parked
    assert s.ask(RESTORE, target.pid, user=s.b) == OK
    assert untouched(target)


def test_own_scope_refuses_tcp_clients(spawn, tmp_path: Path) -> None:
    port = str(free_port())
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    d = Daemon(port, "--client-scope", "own", dump_dir=dumps)
    try:
        d.out.wait_for("--client-scope own: TCP clients carry no credentials, so each of their requests")
        target = spawn("pattern", 8)
        assert d.code(CHECKPOINT, target.pid) == ERROR
        line = d.out.wait_for(f"refused the checkpoint of pid {target.pid} asked by TCP client 127.0.0.1:")
        assert "which a TCP connection does not carry: serve such clients on a UNIX socket (-l PATH)" in line
        assert untouched(target)
    finally:
        assert d.terminate() == 0
