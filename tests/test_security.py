"""Self-hardening and non-root operation, with real users, groups and capabilities."""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from memcr.system import procfs
from memcr_client import Client
from memcr_client.protocol import CMD_RESTORE, REQUEST, RESPONSE
from tests.conftest import CHECKPOINT, RUN_TIMEOUT, Lines, activation, as_user, memcr_argv, reap, stop
from tests.test_client_scope import Asker

ROOT = Path(__file__).resolve().parent.parent
PTRACE_ATTACH = 16  # <sys/ptrace.h>
ATTACH = f"import ctypes,sys; sys.exit(ctypes.CDLL(None).ptrace({PTRACE_ATTACH}, int(sys.argv[1]), 0, 0) != 0)"


class Process:
    """A memcr started with `argv` (in `env`, or this one), its output readable line by line, stopped at the end."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.out = Lines(self.proc.stdout)

    def stop(self) -> int:
        return stop(self.proc)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.stop()


def start(processes: list[Process], argv: list[str], env: dict[str, str] | None = None) -> Process:
    p = Process(argv, env)
    processes.append(p)
    return p


# -- hardening ------------------------------------------------------------------


def test_daemon_is_hardened(accounts, public_dir: Path, processes) -> None:
    user = accounts["inside_name"]
    os.chmod(public_dir, 0o1777)  # sticky, as /tmp: memcr refuses a socket folder where others could replace it
    daemon = start(processes, as_user(user, memcr_argv("-l", public_dir / "d.sock", "-d", public_dir)))
    daemon.out.wait_for("listening on")
    pid = daemon.proc.pid
    # waiting for its first request, then serving. Here the user may not execute this checkout's interpreter, so
    # the daemon serves from its first image (memcr.service.idle could not be exec'd): the idle image's own
    # hardening, as a user, is test_by_hand_start_as_documented's, on the install's interpreter
    for phase in ("started", "serving"):
        if phase == "serving":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(RUN_TIMEOUT)
                client.connect(str(public_dir / "d.sock"))
                client.sendall(REQUEST.pack(CMD_RESTORE, 2**31 - 1))
                assert len(client.recv(16, socket.MSG_WAITALL)) == RESPONSE.size
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert [line.split()[-3:-1] for line in limits.splitlines() if line.startswith("Max core")] == [["0", "0"]]
        # undumpable: its /proc entries belong to root although it runs as the user
        assert Path(f"/proc/{pid}/status").stat().st_uid == 0, phase
        assert int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]) == accounts["inside"]
        # and a process of the same user may not trace it
        attach = subprocess.run(as_user(user, [sys.executable, "-c", ATTACH, str(pid)]), timeout=60)
        assert attach.returncode == 1, phase
        assert Path(f"/proc/{pid}/status").read_text().count("TracerPid:\t0") == 1


def test_refuses_to_run_traced(tmp_path: Path) -> None:
    argv = ["strace", "-f", "-o", "/dev/null", *memcr_argv("-l", tmp_path / "d.sock")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 4
    assert "is being traced by process" in result.stderr and "--allow-tracer" in result.stderr
    assert not (tmp_path / "d.sock").exists()


def test_allow_tracer_runs_and_says_what_it_gives_up() -> None:
    argv = ["strace", "-f", "-o", "/dev/null", *memcr_argv("--allow-tracer", "-p", 1)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert "WARNING: --allow-tracer" in result.stdout and "dump key" in result.stdout
    # past the tracer check, memcr goes on to its next refusal: pid 1
    assert result.returncode == 3
    assert "pid 1" in result.stderr


# -- non-root deployment, as docs/SECURITY.md describes it --------------------

DOCS = ROOT / "docs" / "SECURITY.md"
SUFFIX = str(os.getpid())[-5:]
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the environment systemd gives


@dataclass(frozen=True)
class Install:
    """A `make install-system` with names of its own; `said` is what it printed."""

    base: Path
    user: str = f"msd{SUFFIX}"
    group: str = f"msl{SUFFIX}"
    clients: str = f"msc{SUFFIX}"
    targets: str = f"mst{SUFFIX}"
    said: str = ""
    by_hand_only: bool = True  # MEMCR_ALLOW_TMP_PREFIX: the tests install under /tmp, which memcr.service cannot see

    @property
    def prefix(self) -> Path:
        return self.base / "opt"

    @property
    def run(self) -> Path:
        return self.base / "run"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def launcher(self) -> Path:
        return self.prefix / "bin" / "memcr"

    @property
    def sock(self) -> Path:
        return self.run / "memcr.sock"

    def variables(self) -> dict[str, str]:
        return {"PREFIX": str(self.prefix), "MEMCR_USER": self.user, "MEMCR_GROUP": self.group,
                "MEMCR_CLIENTS": self.clients, "MEMCR_TARGETS": self.targets, "MEMCR_RUN": str(self.run),
                "MEMCR_STATE": str(self.state), "MEMCR_ALLOW_TMP_PREFIX": "1" if self.by_hand_only else ""}  # fmt: skip

    def documented(self, start: str, **more: object) -> list[str]:
        """The line of docs/SECURITY.md that starts with `start`, in this install's names (and `more`), as argv."""
        [line] = [line.strip() for line in DOCS.read_text().splitlines() if line.strip().startswith(start)]
        names = {"/opt/memcr": str(self.prefix), "/run/memcr": str(self.run), "/var/lib/memcr": str(self.state),
                 "memcr-clients": self.clients, "memcr-targets": self.targets, "-u memcr ": f"-u {self.user} ",
                 **{key: str(value) for key, value in more.items()}}  # fmt: skip
        pattern = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
        return shlex.split(re.sub(pattern, lambda m: names[m.group()], line), comments=True)


def fresh(**fields: Any) -> Install:
    """An install in a folder of its own under /tmp, root's and 0755 (mkdtemp makes it 0700), with `fields`."""
    base = Path(tempfile.mkdtemp(prefix="memcr-system-", dir="/tmp"))
    os.chmod(base, 0o755)
    return Install(base, **fields)


OTHER_NAMES = {"user": f"msx{SUFFIX}", "group": f"msy{SUFFIX}", "clients": f"msv{SUFFIX}", "targets": f"msw{SUFFIX}"}


@contextlib.contextmanager
def installed(install: Install, script_only: bool = False) -> Iterator[subprocess.CompletedProcess[str]]:
    """Run make install-system (or its script alone); take away all it made afterwards, also on failure."""
    if script_only:
        argv = ["sh", str(ROOT / "deploy" / "install-system.sh")]
        env = {**os.environ, **install.variables()}
    else:
        argv = ["make", "-C", str(ROOT), "install-system", *(f"{k}={v}" for k, v in install.variables().items())]
        env = None
    try:
        yield subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", install.user], check=False)
        subprocess.run(["userdel", "-f", install.user], capture_output=True, check=False)
        for group in (install.group, install.clients, install.targets):
            subprocess.run(["groupdel", group], capture_output=True, check=False)
        shutil.rmtree(install.base, ignore_errors=True)


@pytest.fixture(scope="module")
def system_install() -> Iterator[Install]:
    install = fresh()
    with installed(install) as result:
        assert result.returncode == 0, result.stdout + result.stderr
        yield dataclasses.replace(install, said=result.stdout)


@pytest.fixture
def app(system_install: Install, made_accounts) -> str:
    """A user whose processes the daemon parks, in the group the docs tell such users to join."""
    name, _ = made_accounts.user("msa", [system_install.targets])
    return name


def owner_group_mode(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def groups_of(user: str) -> set[str]:
    return set(subprocess.run(["id", "-nG", user], capture_output=True, text=True, check=True).stdout.split())


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd's keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def runuser(user: str, argv: list[object]) -> list[str]:
    """As the user would run argv: with its rights from the start (as_user executes argv with root's)."""
    return ["runuser", "-u", user, "--", *map(str, argv)]


def run_as(user: str, argv: list[object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(runuser(user, argv), capture_output=True, text=True, timeout=RUN_TIMEOUT)


def test_install_makes_users_groups_and_folders(system_install: Install) -> None:
    i = system_install
    for group in (i.group, i.clients, i.targets):
        assert f"install-system: created group {group}: " in i.said
    assert f"install-system: created user {i.user}, the daemon's, of group {i.group}" in i.said
    for group in (i.clients, i.targets):
        assert f"install-system: added user {i.user} to group {group}" in i.said
    assert f"install-system: created the folders {i.run} {i.run}/targets {i.state}" in i.said
    assert "warning" not in i.said
    assert (
        f"install-system: WARNING: PREFIX={i.prefix} MEMCR_RUN={i.run} MEMCR_STATE={i.state}: memcr.service cannot "
        f"see /tmp, /var/tmp, /home, /root or /run/user, so the units in {i.prefix}/share cannot start this memcr: "
        "start it by hand only (MEMCR_ALLOW_TMP_PREFIX=1)\n"
    ) in i.said
    # the launcher: CAP_SYS_PTRACE for the launcher's group, which is the daemon's user's alone
    assert owner_group_mode(i.launcher) == ("root", i.group, 0o750)
    assert "cap_sys_ptrace=ep" in subprocess.run(["getcap", str(i.launcher)], capture_output=True, text=True).stdout
    gid = grp.getgrnam(i.group).gr_gid
    assert grp.getgrnam(i.group).gr_mem == [] and [u.pw_name for u in pwd.getpwall() if u.pw_gid == gid] == [i.user]
    assert groups_of(i.user) == {i.group, i.clients, i.targets}
    assert owner_group_mode(i.run) == (i.user, i.group, 0o751)
    assert owner_group_mode(i.run / "targets") == (i.user, i.targets, 0o1770)
    assert owner_group_mode(i.state) == (i.user, i.group, 0o700)
    # the units name this install's choices, each of them
    share = i.prefix / "share"
    for name in ("memcr.service", "memcr.socket", "memcr-tmpfiles.conf"):
        assert not re.search(r"@[A-Z]+@", (share / name).read_text()), name
    service, sock = unit(share / "memcr.service")["Service"], unit(share / "memcr.socket")["Socket"]
    assert (service["User"], service["Group"], service["SupplementaryGroups"]) == (
        i.user, i.group, f"{i.clients} {i.targets}"
    )  # fmt: skip
    assert (sock["SocketUser"], sock["SocketGroup"], sock["ListenStream"]) == (i.user, i.clients, str(i.sock))
    # and systemd's own reading of them finds nothing to say
    verify = subprocess.run(["systemd-analyze", "verify", str(share / "memcr.service"), str(share / "memcr.socket")],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_install_again_makes_nothing_new(system_install: Install) -> None:
    """An update: the same install over itself keeps the users, groups and folders, and says nothing about them."""
    i = system_install
    made = (i.prefix / "share" / "memcr-installed").read_text()
    assert made.splitlines() == [f"group {i.group}", f"group {i.clients}", f"group {i.targets}", f"user {i.user}",
                                 f"member {i.user} {i.clients}", f"member {i.user} {i.targets}", f"folder {i.run}",
                                 f"folder {i.run}/targets", f"folder {i.state}"]  # fmt: skip
    again = subprocess.run(["sh", str(ROOT / "deploy" / "install-system.sh")], env={**os.environ, **i.variables()},
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert not re.search(r"created|added|warning", again.stdout), again.stdout
    assert (i.prefix / "share" / "memcr-installed").read_text() == made  # for make uninstall-system, the first's
    assert groups_of(i.user) == {i.group, i.clients, i.targets}
    assert owner_group_mode(i.launcher) == ("root", i.group, 0o750)
    assert owner_group_mode(i.run / "targets") == (i.user, i.targets, 0o1770)


def refused_install(install: Install) -> str:
    """What the install says as it refuses: it must have made nothing, no user, group or file."""
    made = sorted(install.base.rglob("*"))
    with installed(install, script_only=True) as result:
        assert result.returncode == 1, result.stdout + result.stderr
        for name in {install.user, install.group, install.clients, install.targets}:
            assert subprocess.run(["getent", "group", name], capture_output=True).returncode == 2
        assert subprocess.run(["getent", "passwd", install.user], capture_output=True).returncode == 2
        assert sorted(install.base.rglob("*")) == made
        return result.stderr


@pytest.mark.parametrize("shared", ["MEMCR_CLIENTS", "MEMCR_TARGETS"])
def test_install_refuses_a_shared_launcher_group(shared: str) -> None:
    install = fresh(**{**OTHER_NAMES, shared.removeprefix("MEMCR_").lower(): OTHER_NAMES["group"]})
    assert (
        f"install-system: MEMCR_GROUP={install.group} may start the launcher, which holds CAP_SYS_PTRACE: the "
        "clients' group (MEMCR_CLIENTS) and the targets' group (MEMCR_TARGETS) must be other groups"
    ) in refused_install(install)


def test_install_refuses_one_group_for_clients_and_targets() -> None:
    """Each user whose processes memcr parks joins the targets' group: as the clients', it would drive the daemon."""
    install = fresh(**{**OTHER_NAMES, "targets": OTHER_NAMES["clients"]})
    assert (
        f"install-system: MEMCR_CLIENTS={install.clients} and MEMCR_TARGETS={install.clients} are one group: every "
        "user whose processes memcr parks would then drive the daemon, and so park any process, root's included: "
        "give the clients and the targets a group each"
    ) in refused_install(install)


def test_install_refuses_folders_the_units_cannot_see() -> None:
    """memcr.service has PrivateTmp=yes and ProtectHome=yes: installed under /tmp, it could not start memcr."""
    install = fresh(**OTHER_NAMES, by_hand_only=False)
    assert (
        f"install-system: PREFIX={install.prefix} MEMCR_RUN={install.run} MEMCR_STATE={install.state}: memcr.service "
        "cannot see /tmp, /var/tmp (PrivateTmp=yes), /home, /root or /run/user (ProtectHome=yes), so the units could "
        "not start memcr: choose other folders, or set MEMCR_ALLOW_TMP_PREFIX=1 to install for a start by hand only"
    ) in refused_install(install)


SWAP = "who could swap the programs the launcher runs with CAP_SYS_PTRACE in it"


@pytest.mark.parametrize("folder", ["prefix", "above", "group-writable", "sticky", "symlink", "state"])
def test_install_refuses_folders_others_could_swap(made_accounts, folder: str) -> None:
    """Issue 27's review: with PREFIX a folder a user made (mkdir /tmp/evil), that user could swap
    PREFIX/venv/bin/python for a script, which the launcher would run with CAP_SYS_PTRACE."""
    evil, uid = made_accounts.user("mse")
    install = fresh(**OTHER_NAMES)
    prefix, base = install.prefix, install.base
    if folder in ("prefix", "group-writable", "sticky"):
        prefix.mkdir()
        os.chown(prefix, uid if folder == "prefix" else 0, -1)
        prefix.chmod({"prefix": 0o755, "group-writable": 0o775, "sticky": 0o1777}[folder])
    elif folder == "above":
        os.chown(base, uid, -1)  # the user may make, rename or remove what it holds, PREFIX with the rest
    elif folder == "symlink":
        (base / "real").mkdir()
        prefix.symlink_to(base / "real")
    else:
        install.state.mkdir()
        os.chown(install.state, uid, -1)
    said = refused_install(install)
    wrong = {
        "prefix": f"PREFIX={prefix}: {prefix} belongs to user {evil} (uid {uid}), {SWAP}",
        "above": f"PREFIX={prefix}: {base} belongs to user {evil} (uid {uid}), {SWAP}",
        "group-writable": f"PREFIX={prefix}: {prefix} may be written by users other than its owner (mode 775), "
        f"{SWAP}: take that right away (chmod go-w {prefix})",
        "sticky": f"PREFIX={prefix}: {prefix} may be written by users other than its owner (mode 1777)",
        "symlink": f"PREFIX={prefix}: {prefix} is a symlink, which its owner or whoever may write in its folder "
        f"could point elsewhere: give the real path ({base / 'real'})",
        "state": f"MEMCR_STATE={install.state}: {install.state} belongs to user {evil} (uid {uid}), who could swap "
        "memcr's dumps in it",
    }[folder]
    assert f"install-system: {wrong}" in said


@pytest.mark.parametrize("prefix", ["opt/memcr", "/opt/../tmp/memcr", "/opt//memcr", "/opt/memcr/"])
def test_install_refuses_a_prefix_not_plainly_named(prefix: str) -> None:
    """The launcher runs PREFIX/venv/bin/python: relative, it would be looked up from wherever it was started."""
    install = fresh(**OTHER_NAMES)
    env = {**os.environ, **install.variables(), "PREFIX": prefix}
    try:
        result = subprocess.run(["sh", str(ROOT / "deploy" / "install-system.sh")], env=env, capture_output=True,
                                text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    finally:
        shutil.rmtree(install.base)
    assert result.returncode == 1 and not exists("passwd", install.user)
    assert (
        f"install-system: PREFIX={prefix}: give the folder as an absolute path without '.', '..', '//' or a "
        "trailing '/'\n"
    ) == result.stderr


@pytest.mark.parametrize("swap", ["writable", "owned", "script"])
def test_the_launcher_refuses_an_interpreter_others_could_swap(
    system_install: Install, made_accounts, public_dir: Path, swap: str
) -> None:
    """Whatever let another user swap PREFIX/venv/bin/python, the launcher does not run it with CAP_SYS_PTRACE."""
    i = system_install
    _, uid = made_accounts.user("mse")
    python = i.prefix / "venv" / "bin" / "python"
    folder, link = python.parent, os.readlink(python)
    kept = folder.stat()
    script = public_dir / "python"  # where the daemon's user may run it
    try:
        if swap == "writable":
            folder.chmod(0o777)
        elif swap == "owned":
            os.chown(folder, uid, -1)
        else:
            script.write_text("#!/bin/sh\ngrep CapEff /proc/self/status\n")
            script.chmod(0o755)
            os.chown(script, uid, -1)
            python.unlink()
            python.symlink_to(script)
        started = run_as(i.user, [i.launcher, "-V"])
    finally:
        python.unlink()
        python.symlink_to(link)
        os.chown(folder, kept.st_uid, kept.st_gid)
        folder.chmod(stat.S_IMODE(kept.st_mode))
    unsafe = {"writable": f"{folder} (uid 0, mode 0777)", "owned": f"{folder} (uid {uid}, mode 0755)",
              "script": f"{script} (uid {uid}, mode 0755)"}[swap]  # fmt: skip
    assert started.returncode == 1 and started.stdout == ""  # nothing ran
    assert started.stderr == (
        f"memcr launcher: refusing to run {python}: {unsafe} could be swapped by a user other than root, whose "
        "program would get CAP_SYS_PTRACE: make it root's and writable by root alone, or install memcr again "
        "(make install-system)\n"
    )
    assert run_as(i.user, [i.launcher, "-V"]).stdout.startswith("memcr ")  # as installed, it runs


def test_install_warns_when_others_may_start_the_launcher(made_accounts) -> None:
    shared, _ = made_accounts.group("msg")
    admin, _ = made_accounts.user("msh", [shared])
    install = fresh(**{**OTHER_NAMES, "group": shared})
    with installed(install, script_only=True) as result:
        assert result.returncode == 0, result.stderr
        assert (
            f"install-system: warning: besides {install.user}, these users are in group {shared} and so may start "
            f"the launcher, which holds CAP_SYS_PTRACE (they could freeze, read and kill any process): {admin} "
        ) in result.stdout


def uninstall(install: Install) -> subprocess.CompletedProcess[str]:
    argv = ["make", "-s", "-C", str(ROOT), "uninstall-system", f"PREFIX={install.prefix}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def exists(database: str, name: str) -> bool:
    return subprocess.run(["getent", database, name], capture_output=True).returncode == 0


@pytest.mark.parametrize("found", [False, True], ids=["made", "found"])
def test_uninstall_takes_away_what_the_install_made(made_accounts, found: bool) -> None:
    """Issue 27's review: nothing removed the install, its user and groups, its folders; the user deleted by hand,
    whoever got its uid next would own the dumps left. What the install found (a user, a group) stays as it was."""
    names = dict(OTHER_NAMES)
    if found:
        names["user"], _ = made_accounts.user("msf")
        names["clients"], _ = made_accounts.group("msk")
    install = fresh(**names)
    with installed(install, script_only=True) as result:
        assert result.returncode == 0, result.stderr
        (install.state / "pages-4242.img").write_bytes(b"a dump left")
        gone = uninstall(install)
        assert gone.returncode == 0, gone.stderr
        said = gone.stdout.splitlines()
        made_groups = [install.group, *([] if found else [install.clients]), install.targets]
        assert said == [
            f"uninstall-system: removed the folder {install.run} and what it held",
            f"uninstall-system: removed the folder {install.state} and what it held",
            *([f"uninstall-system: took user {install.user} out of group {install.clients}"] if found else []),
            *([] if found else [f"uninstall-system: removed user {install.user}"]),
            *(f"uninstall-system: removed group {group}" for group in made_groups),
            f"uninstall-system: removed the install in {install.prefix}: the launcher with CAP_SYS_PTRACE, the virtual "
            "environment, memcr-client, the units and the folders' list",
        ]
        assert not any(exists("group", group) for group in made_groups)
        assert exists("passwd", install.user) == found
        if found:
            assert exists("group", install.clients) and groups_of(install.user) == {"nogroup"}
        assert list(install.base.iterdir()) == []


@pytest.mark.parametrize("holder", ["user", "group"])
def test_uninstall_refuses_a_user_or_group_a_process_runs_with(made_accounts, holder: str) -> None:
    """Removed, its number could go to a new user or group, who would share the process's rights."""
    install = fresh(**OTHER_NAMES)
    with installed(install, script_only=True) as result:
        assert result.returncode == 0, result.stderr
        runner = install.user if holder == "user" else made_accounts.user("msa", [install.targets])[0]
        uid = pwd.getpwnam(runner).pw_uid
        proc = subprocess.Popen(as_user(runner, ["sleep", "600"]))
        try:
            for _ in range(100):  # setpriv becomes the user, then executes sleep
                if procfs.read_status(proc.pid)["Uid"].split()[0] == str(uid):
                    break
                time.sleep(0.05)
            refused = uninstall(install)
        finally:
            reap(proc)
        pid = proc.pid
        targets = grp.getgrnam(install.targets).gr_gid
        assert refused.returncode != 0 and refused.stdout == ""
        assert {
            "user": f"uninstall-system: user {runner} (uid {uid}) runs the processes {pid} (ps -fp '{pid}'): stop them "
            "(the daemon: systemctl stop memcr.socket memcr.service), then uninstall again",
            "group": f"uninstall-system: group {install.targets} (gid {targets}) is a group of the processes {pid} "
            f"(ps -fp '{pid}'): stop them, or start them again once their users are out of it (gpasswd -d USER "
            f"{install.targets}), then uninstall again",
        }[holder] in refused.stderr
        assert install.launcher.exists() and exists("passwd", install.user) and exists("group", install.targets)
        assert uninstall(install).returncode == 0  # once it has ended
        assert not exists("passwd", install.user) and not install.prefix.exists()


class ByHand(Process):
    """The documented start: runuser forks the daemon as its child and waits for it."""

    def daemon_pid(self) -> int:
        [child] = psutil.Process(self.proc.pid).children()
        return int(child.pid)

    def stop(self) -> int:
        """Stop the daemon; runuser's exit code, which is the daemon's. A SIGTERM to runuser would be its own."""
        with contextlib.suppress(ValueError, ProcessLookupError, psutil.NoSuchProcess):  # ended already
            os.kill(self.daemon_pid(), signal.SIGTERM)
        try:
            return self.proc.wait(RUN_TIMEOUT)
        finally:
            reap(self.proc)


def by_hand(processes: list[Process], install: Install, *more: str) -> ByHand:
    daemon = ByHand([*install.documented("runuser -u memcr -- /opt/memcr/bin/memcr -l"), *more])
    processes.append(daemon)
    daemon.out.wait_for("listening on")
    return daemon


def test_by_hand_start_as_documented(system_install: Install, made_accounts, spawn, processes) -> None:
    i = system_install
    app, _ = made_accounts.user("msa")
    client, _ = made_accounts.user("msq")
    for line in ("usermod -aG memcr-targets APPUSER", "usermod -aG memcr-clients CLIENTUSER"):
        subprocess.run(i.documented(line, APPUSER=app, CLIENTUSER=client), check=True)
    start = i.documented("runuser -u memcr -- /opt/memcr/bin/memcr -l")
    assert f"install-system:   {shlex.join(start)}\n" in i.said  # what the install tells to run next
    daemon = by_hand(processes, i)
    pid = daemon.daemon_pid()
    # waiting in its idle image (memcr.service.idle), which exec gave the capability and made dumpable again:
    # undumpable once more (its /proc entries are root's), it holds CAP_SYS_PTRACE still
    assert "memcr.service.idle" in procfs.proc_path(pid, "cmdline").read_text()
    assert procfs.proc_path(pid, "status").stat().st_uid == 0
    assert "CapEff:\t0000000000080000" in procfs.proc_path(pid, "status").read_text()
    target = spawn("pattern", 16, 2, user=app)
    ask = i.documented("runuser -u CLIENTUSER -- /opt/memcr/bin/memcr-client", CLIENTUSER=client, PID=target.pid)
    parked = subprocess.run(ask, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert parked.returncode == 0, parked.stderr
    assert owner_group_mode(i.run / "targets" / f"memcr{target.pid}") == (app, i.targets, 0o660)
    assert target.status()["TracerPid"] != "0"
    woken = subprocess.run([*ask[:-1], "-r"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert woken.returncode == 0, woken.stderr
    assert target.verify() == 0
    assert procfs.proc_path(pid, "status").stat().st_uid == 0  # and serving
    assert not [line for line in daemon.out.seen if "serving from the process that parsed" in line]
    assert daemon.stop() == 0
    assert not i.sock.exists() and i.run.is_dir()  # its socket went with it; the folder is the install's


def test_a_start_after_a_boot_is_told_the_install_s_list(
    system_install: Install, app: str, made_accounts, spawn, processes
) -> None:
    """Issue 27's review: /run emptied by a boot, the advice made the daemon socket's folder alone, and the daemon
    then failed every checkpoint for want of the parasites'. The advice is the install's list, which makes both."""
    i = system_install
    client, _ = made_accounts.user("msq", [i.clients])
    listed = i.prefix / "share" / "memcr-tmpfiles.conf"
    shutil.rmtree(i.run)
    try:
        start = i.documented("runuser -u memcr -- /opt/memcr/bin/memcr -l")
        refused = subprocess.run(start, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        fix = f"systemd-tmpfiles --create {listed}"
        assert (refused.returncode, refused.stderr) == (5, (
            f"memcr: error: the parasite socket folder {i.run}/targets (-S) does not exist: as root, make memcr's "
            f"folders as its install lists them ({fix})\n"
        ))  # fmt: skip
        subprocess.run(fix.split(), check=True)
        by_hand(processes, i)
        target = spawn("pattern", 16, 2, user=app)
        ask = [i.prefix / "bin" / "memcr-client", "-l", i.sock, "-p", target.pid]
        parked = run_as(client, [*ask, "-c"])
        assert parked.returncode == 0, parked.stderr
        assert run_as(client, [*ask, "-r"]).returncode == 0
        assert target.verify() == 0
    finally:
        subprocess.run(["systemd-tmpfiles", "--create", str(listed)], check=True)  # for the next tests


def test_a_target_user_gets_no_power(system_install: Install, app: str, spawn, processes) -> None:
    """In every group the docs tell targets to join, it cannot start the launcher nor park root's process."""
    i = system_install
    assert groups_of(app) == {"nogroup", i.targets}
    by_hand(processes, i)
    root_s = spawn("pattern", 16, 2)
    started = run_as(app, [i.launcher, "-p", root_s.pid, "-n"])
    assert started.returncode != 0 and "Permission denied" in started.stderr
    for memcr in ([i.prefix / "venv" / "bin" / "python", "-I", "-m", "memcr"], [i.prefix / "venv" / "bin" / "memcr"]):
        refused = run_as(app, [*memcr, "-p", root_s.pid, "-n"])
        assert refused.returncode == 4, refused.stderr
        assert f"not permitted to trace process {root_s.pid}" in refused.stderr
        assert str(i.launcher) not in refused.stderr  # it may not start it: no use naming it
        assert "ask the memcr daemon instead (memcr-client); an administrator lets a user do so" in refused.stderr
    asked = run_as(app, [i.prefix / "bin" / "memcr-client", "-l", i.sock, "-p", root_s.pid, "-c"])
    assert asked.returncode == 1
    assert (
        f"permission denied on the memcr socket {i.sock}: it admits group {i.clients}, to which an administrator "
        f"adds a user (usermod -aG {i.clients} USER)"
    ) in asked.stderr
    assert root_s.status()["TracerPid"] == "0"
    assert root_s.verify() == 0


def test_a_client_in_own_scope_parks_only_its_own(system_install: Install, made_accounts, spawn, processes) -> None:
    """The app manager runs as the apps' user, in both groups; another app user is in the targets' group."""
    i = system_install
    manager, manager_uid = made_accounts.user("msm", [i.clients, i.targets])
    other, _ = made_accounts.user("mso", [i.targets])
    daemon = by_hand(processes, i, "--client-scope", "own")
    own, foreign = spawn("pattern", 16, 2, user=manager), spawn("pattern", 16, 2, user=other)
    client = [i.prefix / "bin" / "memcr-client", "-l", i.sock, "-p"]
    assert run_as(manager, [*client, own.pid, "-c"]).returncode == 0
    assert own.status()["TracerPid"] != "0"
    refused = run_as(manager, [*client, foreign.pid, "-c"])
    assert refused.returncode == 1 and "-1" in refused.stderr
    line = daemon.out.wait_for(f"refused the checkpoint of pid {foreign.pid}")
    assert f"uid {manager_uid}" in line and f"process {foreign.pid} runs as uids" in line
    asker = Asker(i.sock, CHECKPOINT, "self", manager, wait=False, options={})
    try:
        assert asker.answer() == -1  # it read its answer: it was not frozen
    finally:
        reap(asker.proc)
    assert run_as(manager, [*client, own.pid, "-r"]).returncode == 0
    assert foreign.status()["TracerPid"] == "0"
    assert [own.verify(), foreign.verify()] == [0, 0]


# What systemd does with the units' lines, for the machine that runs the tests, where systemd is not process 1.
# A line not listed fails the test: no unit grows a line this emulation passes over unseen.
EMULATED = {"User", "Group", "SupplementaryGroups", "AmbientCapabilities", "CapabilityBoundingSet",
            "NoNewPrivileges", "ExecStartPre", "ExecStart"}  # fmt: skip
SANDBOX = {"ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "Restart"}  # systemd's, not memcr's
SOCKET_LINES = {"ExecStartPre", "ListenStream", "SocketUser", "SocketGroup", "SocketMode", "Accept"}


def capabilities(names: str) -> str:
    return ",".join("+" + name.removeprefix("CAP_").lower() for name in names.split())


def executed_as_systemd_would(service: configparser.SectionProxy) -> list[str]:
    """ExecStart= as User= and Group=, in the user's groups and SupplementaryGroups= (systemd sets both),
    with the capabilities and NoNewPrivileges= of the unit."""
    user, group = service["User"], service["Group"]
    groups = {grp.getgrgid(gid).gr_name for gid in os.getgrouplist(user, grp.getgrnam(group).gr_gid)}
    groups |= set(service["SupplementaryGroups"].split())
    ambient = capabilities(service["AmbientCapabilities"])
    return ["setpriv", f"--reuid={user}", f"--regid={group}", f"--groups={','.join(sorted(groups))}",
            f"--inh-caps={ambient}", f"--ambient-caps={ambient}",
            f"--bounding-set=-all,{capabilities(service['CapabilityBoundingSet'])}",
            *(["--no-new-privs"] if service["NoNewPrivileges"] == "yes" else []),
            "--", *shlex.split(service["ExecStart"])]  # fmt: skip


@pytest.mark.parametrize("activated", [False, True], ids=["service", "socket"])
def test_units_as_systemd_runs_them(
    system_install: Install, app: str, made_accounts, spawn, processes, activated: bool
) -> None:
    """After a boot, /run empty: memcr.service alone, or started by memcr.socket."""
    i = system_install
    service = unit(i.prefix / "share" / "memcr.service")["Service"]
    sock = unit(i.prefix / "share" / "memcr.socket")["Socket"]
    assert set(service) <= EMULATED | SANDBOX and set(sock) <= SOCKET_LINES
    assert {str(i.run), str(i.state)} <= set(service["ReadWritePaths"].split())
    client, _ = made_accounts.user("msq", [i.clients])
    env = {"PATH": SYSTEMD_PATH}
    shutil.rmtree(i.run)
    try:
        argv = executed_as_systemd_would(service)
        if activated:
            assert sock["Accept"] == "no"
            subprocess.run(shlex.split(sock["ExecStartPre"]), check=True, env=env)  # as root: the unit has no User=
            argv = activation(sock["ListenStream"], argv, sock["SocketUser"], sock["SocketGroup"], sock["SocketMode"])
        # "+": as root and outside the sandbox
        subprocess.run(shlex.split(service["ExecStartPre"].removeprefix("+")), check=True, env=env)
        daemon = start(processes, argv, env)
        daemon.out.wait_for("listening on")
        assert owner_group_mode(i.sock) == (i.user, i.clients, 0o660)
        target = spawn("pattern", 16, 2, user=app)
        ask = [i.prefix / "bin" / "memcr-client", "-l", i.sock, "-p", target.pid]
        parked = run_as(client, [*ask, "-c"])
        assert parked.returncode == 0, parked.stderr + "\n".join(daemon.out.seen)
        assert target.status()["TracerPid"] != "0"
        assert run_as(client, [*ask, "-r"]).returncode == 0
        assert target.verify() == 0
        assert daemon.stop() == 0
        assert i.sock.exists() == activated  # systemd's socket stays for the next start, memcr's own goes
    finally:
        subprocess.run(shlex.split(service["ExecStartPre"].removeprefix("+")), check=True)  # for the next tests
        i.sock.unlink(missing_ok=True)


def test_non_root_daemon_without_capability(system_install: Install, app: str, spawn, processes) -> None:
    """The daemon's user, started without its launcher: the advice names the launcher, which it may start."""
    i = system_install
    sock = i.run / "plain.sock"
    plain_python = [str(i.prefix / "venv" / "bin" / "python"), "-I", "-m", "memcr"]
    daemon = ByHand(runuser(i.user, [*plain_python, "-l", sock, "-d", i.state]))
    processes.append(daemon)
    daemon.out.wait_for("listening on")
    target = spawn("pattern", 16, 2, user=app)
    assert Client(str(sock)).request(CHECKPOINT, target.pid) == -1
    line = daemon.out.wait_for("not permitted to trace")
    assert "CAP_SYS_PTRACE" in line
    assert line.endswith(f"setcap cap_sys_ptrace=ep {i.launcher}")  # the launcher, not the script
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0


def test_proc_mem_refused_without_root(system_install: Install, app: str, spawn) -> None:
    i = system_install
    target = spawn("pattern", 16, 2, user=app)
    result = run_as(i.user, [i.launcher, "-p", target.pid, "-n", "-m", "-d", i.state])
    assert result.returncode == 4
    assert "needs root" in result.stderr
    assert target.verify() == 0


def test_non_root_kills_a_target_it_cannot_restore(system_install: Install, app: str, spawn) -> None:
    """Without CAP_KILL memcr may not signal another user's process: it has the target kill itself."""
    i = system_install
    target = spawn("pattern", 16, 2, user=app)
    argv = runuser(i.user, [i.launcher, "-p", target.pid, "-c", "-d", i.state])
    memcr = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        Lines(memcr.stdout).wait_for("press enter to restore")
        dump = i.state / f"pages-{target.pid}.img"
        with open(dump, "r+b") as f:
            f.seek(dump.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
        assert memcr.stdin is not None
        memcr.stdin.write("\n")
        memcr.stdin.flush()
        assert memcr.wait(RUN_TIMEOUT) == 6
        assert "was killed" in (memcr.stderr.read() if memcr.stderr else "")
        assert target.proc.wait(60) == -signal.SIGKILL
        assert not dump.exists()
    finally:
        reap(memcr)
