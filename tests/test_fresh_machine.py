"""Issue 18: the documented command lines work verbatim on a fresh machine.

The README's first service example, typed as a new user types it: the
daemon makes the missing folder of its socket, and the client finds the
daemon without -l. Around it, the rules for that folder: made with 0755,
or 0750 and the -g group; refused when it is a symlink, writable by every
user or someone else's; removed at stop when memcr made it and it is empty.
"""

from __future__ import annotations

import fcntl
import grp
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RUN_TIMEOUT, Lines, as_user, stop

BIN = Path(sys.executable).parent  # the venv's memcr and memcr-client, as `make install` puts them
DOCUMENTED = Path("/tmp/memcr")
NOBODY = 65534


class Running:
    """A daemon started with `argv`, its log readable line by line."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.out = Lines(self.proc.stdout)

    def stop(self) -> int:
        return stop(self.proc, signal.SIGTERM)


@pytest.fixture
def daemons() -> Iterator[list[Running]]:
    """Every daemon a test starts, stopped (and reaped) at teardown, also when the test fails."""
    started: list[Running] = []
    yield started
    for d in started:
        d.stop()


def start(daemons: list[Running], *args: object, user: str | None = None) -> Running:
    argv = [str(BIN / "memcr"), *map(str, args)]
    d = Running(as_user(user, argv) if user else argv)
    daemons.append(d)
    return d


def client_env() -> dict[str, str]:
    """The environment of a new user's shell: no MEMCR_LOCATION."""
    return {key: value for key, value in os.environ.items() if key != "MEMCR_LOCATION"}


def client(
    *args: object, user: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """memcr-client as typed in a shell: the venv's, without MEMCR_LOCATION unless `env` says otherwise."""
    argv = [str(BIN / "memcr-client"), *map(str, args)]
    if user:
        argv = as_user(user, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env or client_env())


def refusal(*args: object, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """memcr run to its end, as `user` if given: for daemons that must refuse to start."""
    argv = [str(BIN / "memcr"), *map(str, args)]
    return subprocess.run(as_user(user, argv) if user else argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def documented_folder() -> Iterator[Path]:
    """/tmp/memcr absent for the test and removed after it; one test at a time on this machine."""
    # a lock on /tmp itself: nothing to create or leave behind, and every checkout's copy of this test shares it
    lock = os.open(DOCUMENTED.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of the suite may be here: wait for it
        if os.path.lexists(DOCUMENTED):
            pytest.skip(f"{DOCUMENTED} exists (a memcr daemon of this machine?): remove it to run this test")
        try:
            yield DOCUMENTED
        finally:
            if DOCUMENTED.is_symlink() or DOCUMENTED.is_file():
                DOCUMENTED.unlink()
            elif DOCUMENTED.exists():
                shutil.rmtree(DOCUMENTED)
    finally:
        os.close(lock)  # and with it the lock


# -- the README's first service example, verbatim --------------------------------


def test_documented_lines_verbatim(documented_folder: Path, daemons: list[Running], spawn) -> None:
    daemon = start(daemons, "-zc", "-l", "/tmp/memcr/memcr.sock")  # sudo memcr -zc -l /tmp/memcr/memcr.sock
    daemon.out.wait_for("listening on /tmp/memcr/memcr.sock")
    assert "memcr: created the folder /tmp/memcr for the socket (mode 0755)" in daemon.out.seen
    assert mode(documented_folder) == (0, 0, 0o755)
    target = spawn("pattern", 64, 2)
    rss = target.rss_kb()

    parked = client("-p", target.pid, "--checkpoint")  # memcr-client -p PID --checkpoint
    assert parked.returncode == 0, parked.stderr
    assert target.status()["TracerPid"] != "0"
    assert target.rss_kb() < rss - 32 * 1024  # its memory went to the dump
    woken = client("-p", target.pid, "--restore")
    assert woken.returncode == 0, woken.stderr
    assert target.verify() == 0  # every byte came back

    assert daemon.stop() == 0
    assert not os.path.lexists(documented_folder)  # memcr made it, memcr removed it
    assert "memcr: removed the folder /tmp/memcr" in daemon.out.rest()


def test_client_without_location_says_where_it_looked(tmp_path: Path) -> None:
    result = client("-p", os.getpid(), "-c", env={**client_env(), "MEMCR_LOCATION": str(tmp_path / "none.sock")})
    assert result.returncode == 1
    assert f"no memcr daemon listens on {tmp_path}/none.sock" in result.stderr
    shown = client("--help")
    assert "MEMCR_LOCATION" in shown.stdout and "/tmp/memcr/memcr.sock" in shown.stdout


# -- folders memcr makes ---------------------------------------------------------


def test_missing_folders_are_made_0755_and_removed(tmp_path: Path, daemons: list[Running]) -> None:
    sock = tmp_path / "a" / "b" / "memcr.sock"
    old = os.umask(0o077)  # a strict umask must not lock the clients out of the folder
    try:
        d = start(daemons, "-l", sock, "-d", tmp_path)
    finally:
        os.umask(old)
    d.out.wait_for("listening on")
    assert f"memcr: created the folders {tmp_path}/a, {tmp_path}/a/b for the socket (mode 0755)" in d.out.seen
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == (0, 0, 0o755)
    assert d.stop() == 0
    assert not (tmp_path / "a").exists()


def test_missing_folder_with_group_is_0750_and_only_the_group_reaches_it(
    public_dir: Path, daemons: list[Running], accounts, spawn
) -> None:
    folder = public_dir / "memcr"
    sock = folder / "memcr.sock"
    d = start(daemons, "-l", sock, "-g", accounts["gid"], "-d", public_dir)
    d.out.wait_for("listening on")
    assert f"memcr: created the folder {folder} for the socket (mode 0750, group {accounts['gid']})" in d.out.seen
    assert mode(folder) == (0, accounts["gid"], 0o750)
    assert mode(sock)[1:] == (accounts["gid"], 0o660)
    target = spawn("pattern", 8)
    inside = client("-l", sock, "-p", target.pid, "-c", "-r", user=accounts["inside_name"])
    assert inside.returncode == 0, inside.stderr
    outside = client("-l", sock, "-p", target.pid, "-c", user=accounts["outside_name"])
    assert outside.returncode == 1 and "permission denied" in outside.stderr
    assert target.verify() == 0


def test_a_folder_holding_other_files_is_kept(tmp_path: Path, daemons: list[Running]) -> None:
    folder = tmp_path / "run"
    d = start(daemons, "-l", folder / "memcr.sock", "-d", tmp_path)
    d.out.wait_for("listening on")
    (folder / "notes").write_text("not memcr's")
    assert d.stop() == 0
    assert (folder / "notes").exists() and not (folder / "memcr.sock").exists()
    assert any(line.startswith(f"memcr: kept the folder {folder}") for line in d.out.rest())


# -- folders that would not protect the socket -----------------------------------


def test_symlinked_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    result = refusal("-l", tmp_path / "link" / "memcr.sock")
    assert result.returncode == 5, result.stderr
    assert f"the socket's folder {tmp_path}/link is a symlink" in result.stderr
    assert f"give -l the real folder ({real})" in result.stderr
    assert list(real.iterdir()) == []


def test_folder_writable_by_everyone_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    result = refusal("-l", folder / "memcr.sock")
    assert result.returncode == 5, result.stderr
    assert f"the socket's folder {folder} is writable by every user (mode 0777)" in result.stderr
    assert f"chmod o-w {folder}" in result.stderr
    assert list(folder.iterdir()) == []


def test_sticky_folder_writable_by_everyone_is_accepted(tmp_path: Path, daemons: list[Running]) -> None:
    """As /tmp, where the C memcr's clients put their sockets (/tmp/memcrservice): others cannot remove ours."""
    folder = tmp_path / "sticky"
    folder.mkdir()
    folder.chmod(0o1777)
    d = start(daemons, "-l", folder / "memcr.sock", "-d", tmp_path)
    d.out.wait_for("listening on")
    assert d.stop() == 0
    assert folder.exists() and list(folder.iterdir()) == []  # not memcr's folder: only its socket goes


def test_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    result = refusal("-l", folder / "memcr.sock")
    assert result.returncode == 5, result.stderr
    assert f"the socket's folder {folder} belongs to" in result.stderr and f"uid {NOBODY}" in result.stderr
    assert list(folder.iterdir()) == []


def test_refusal_removes_the_folders_it_made(public_dir: Path, accounts) -> None:
    """A daemon user that may make the folders but not give them to a group it is not in: nothing is left."""
    home = public_dir / "home"
    home.mkdir()
    os.chown(home, accounts["inside"], -1)
    user = accounts["inside_name"]
    result = refusal("-l", home / "a" / "b" / "memcr.sock", "-g", "0", user=user)
    assert result.returncode == 4, result.stderr  # a missing right
    assert (
        f"memcr's user {user} (uid {accounts['inside']}) is not in group root (gid 0), so it cannot give the "
        f"folder {home}/a that group (-g): add it to the group (usermod -aG root {user}) and start memcr again"
    ) in result.stderr
    assert list(home.iterdir()) == []


def test_daemon_without_rights_for_the_folder_says_so(public_dir: Path, accounts, daemons: list[Running]) -> None:
    """A daemon user that may not create the folder: exit 5, the path, the reason, and the fix, which works."""
    user, sock = accounts["inside_name"], public_dir / "sub" / "memcr.sock"
    result = refusal("-l", sock, "-d", public_dir, user=user)
    assert result.returncode == 5, result.stderr
    fix = f"install -d -o {user} -m 0755 {public_dir}/sub"
    assert (
        f"cannot create the folder {public_dir}/sub for the socket: Permission denied: memcr's user {user} may not "
        f"write in {public_dir}: as root, make memcr's folders ({fix})"
    ) in result.stderr
    subprocess.run(fix.split(), check=True)
    start(daemons, "-l", sock, "-d", public_dir, user=user).out.wait_for("listening on")


def test_a_daemon_without_its_folders_is_told_each_one(
    public_dir: Path, made_accounts, daemons: list[Running], spawn
) -> None:
    """Issue 27's review: after a boot (/run emptied), the advice made the socket's folder alone, and the daemon
    then failed every checkpoint for want of the parasites' (-S). Outside an install, which lists them for
    systemd-tmpfiles, the advice names each missing folder with its owner, group and mode; they then serve."""
    group, gid = made_accounts.group("mcf")
    user, _ = made_accounts.user("mcd", [group])  # the daemon's: it joins -g's and -G's group
    app, _ = made_accounts.user("mca", [group])  # the targets' and the clients' at once, for this test
    run, dumps = public_dir / "run", public_dir / "dumps"
    dumps.mkdir()
    shutil.chown(dumps, user)
    args = ["-l", run / "memcr.sock", "-g", gid, "-S", run / "targets", "-G", gid, "-d", dumps]
    result = refusal(*args, user=user)
    assert result.returncode == 5, result.stderr
    make = f"install -d -o {user} -g {group} -m 0751 {run} && install -d -o {user} -g {group} -m 1770 {run}/targets"
    assert (
        f"the parasite socket folder {run}/targets (-S) does not exist: as root, make memcr's folders ({make})"
    ) in result.stderr
    for command in make.split(" && "):
        subprocess.run(command.split(), check=True)
    capable = ["--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace"]  # as the units give it, without a launcher
    argv = as_user(user, [str(BIN / "memcr"), *map(str, args)])
    daemon = Running([*argv[:4], *capable, *argv[4:]])
    daemons.append(daemon)
    daemon.out.wait_for("listening on")
    target = spawn("pattern", 8, user=app)
    parked = client("-l", run / "memcr.sock", "-p", target.pid, "-c", "-r", user=app)
    assert parked.returncode == 0, parked.stderr + "\n".join(daemon.out.seen)
    assert target.verify() == 0


def test_daemon_outside_the_clients_group_leaves_no_socket(public_dir: Path, accounts, daemons: list[Running]) -> None:
    """Issue 27: the daemon's user not in -g's group. The message says so; no socket file stays; the fix works."""
    run = public_dir / "run"
    run.mkdir()
    user, gid = accounts["outside_name"], accounts["gid"]
    shutil.chown(run, user)
    result = refusal("-l", run / "memcr.sock", "-g", gid, "-d", public_dir, user=user)
    assert result.returncode == 4, result.stderr
    group = grp.getgrgid(gid).gr_name
    assert (
        f"memcr's user {user} (uid {accounts['outside']}) is not in group {group} (gid {gid}), so it cannot give "
        f"its socket {run}/memcr.sock that group (-g): add it to the group (usermod -aG {group} {user}) and start "
        "memcr again"
    ) in result.stderr
    assert list(run.iterdir()) == []  # the socket it had bound is gone with it
    subprocess.run(["usermod", "-aG", group, user], check=True)
    start(daemons, "-l", run / "memcr.sock", "-g", gid, "-d", public_dir, user=user).out.wait_for("listening on")
    assert mode(run / "memcr.sock") == (accounts["outside"], gid, 0o660)


def test_daemon_outside_the_parasites_group_is_refused_at_start(public_dir: Path, accounts) -> None:
    """-G: the parasite sockets get that group and mode 0660, so a daemon outside it could park nobody."""
    user, gid = accounts["outside_name"], accounts["gid"]
    result = refusal("-l", public_dir / "run" / "memcr.sock", "-S", public_dir, "-G", gid, user=user)
    assert result.returncode == 4, result.stderr
    assert (
        f"is not in group {grp.getgrgid(gid).gr_name} (gid {gid}), so it could not connect to the parasite sockets, "
        "which get that group and mode 0660 (-G)"
    ) in result.stderr
    assert not (public_dir / "run").exists()


# -- the parasites' folder (-S) --------------------------------------------------


@pytest.mark.parametrize("wrong", ["symlink", "theirs", "open", "group"])
def test_a_parasite_folder_others_could_use_is_refused_at_start(tmp_path: Path, wrong: str) -> None:
    """Issue 27's review: memcr took a 0777 -S folder, where anyone could swap a target's socket as it was set up."""
    folder = tmp_path / "targets"
    if wrong == "symlink":
        (tmp_path / "real").mkdir()
        folder.symlink_to(tmp_path / "real")
    else:
        folder.mkdir()
    if wrong == "theirs":
        os.chown(folder, NOBODY, -1)
    elif wrong == "open":
        folder.chmod(0o777)
    result = refusal("-l", tmp_path / "memcr.sock", "-S", folder, *(["-G", NOBODY] if wrong == "group" else []))
    assert result.returncode == 5, result.stderr
    where = f"the parasite socket folder {folder} (-S)"
    assert {
        "symlink": f"{where} is a symlink, which whoever may change it could point elsewhere: give -S the real "
        f"folder ({tmp_path / 'real'})",
        "theirs": f"{where} belongs to user nobody (uid {NOBODY}), who could replace the sockets in it: give it to "
        f"root or memcr's user (chown root {folder})",
        "open": f"{where} is writable by every user (mode 0777), who could replace the sockets in it: make it "
        f"sticky (chmod +t {folder}) or take that right away (chmod o-w {folder})",
        "group": f"{where} is of group root (gid 0), not of -G's group nogroup (gid {NOBODY}): the targets' users, in "
        f"that group, make their sockets there (chgrp nogroup {folder})",
    }[wrong] in result.stderr
    assert not (tmp_path / "memcr.sock").exists()


def test_a_parasite_folder_opened_later_fails_the_checkpoint(tmp_path: Path, daemons: list[Running], spawn) -> None:
    """Checked again before each checkpoint: the target of one that cannot be safe is not touched."""
    folder, sock = tmp_path / "targets", tmp_path / "memcr.sock"
    folder.mkdir()
    d = start(daemons, "-l", sock, "-S", folder, "-d", tmp_path)
    d.out.wait_for("listening on")
    target = spawn("pattern", 8)
    folder.chmod(0o777)
    refused = client("-l", sock, "-p", target.pid, "-c")
    assert refused.returncode == 1
    assert f"the parasite socket folder {folder} (-S) is writable by every user" in d.out.wait_for("checkpoint failed")
    assert target.status()["TracerPid"] == "0"
    folder.chmod(0o1777)  # sticky, as /tmp: nobody may remove or replace another's socket
    assert client("-l", sock, "-p", target.pid, "-c", "-r").returncode == 0
    assert target.verify() == 0


def test_a_root_target_is_not_parked_through_an_open_parasite_folder(tmp_path: Path, spawn) -> None:
    folder = tmp_path / "targets"
    folder.mkdir()
    folder.chmod(0o777)
    target = spawn("pattern", 8)
    result = refusal("-p", target.pid, "-n", "-S", folder, "-d", tmp_path)
    assert result.returncode == 5, result.stderr
    assert f"the parasite socket folder {folder} (-S) is writable by every user" in result.stderr
    assert target.status()["TracerPid"] == "0"
    assert target.verify() == 0
