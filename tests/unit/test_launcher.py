"""The advice memcr gives when it may not trace: which file gets CAP_SYS_PTRACE, with what command.

Rootless: install layouts are made in tmp_path, the errors are built by hand.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
from pathlib import Path

import pytest

from memcr import advice, launcher
from memcr.engine import admission
from memcr.errors import Folder, MissingFolders, RightsError
from memcr.system import procfs


def install(prefix: Path, launcher_bytes: bytes, mode: int = 0o750) -> Path:
    """PREFIX/venv and PREFIX/bin/memcr, as deploy/install-system.sh lays them out."""
    (prefix / "venv").mkdir(parents=True)
    (prefix / "bin").mkdir()
    path = prefix / "bin" / "memcr"
    path.write_bytes(launcher_bytes)
    path.chmod(mode)
    return path


def test_the_launcher_next_to_the_venv_is_found(tmp_path: Path) -> None:
    elf = Path(sys.executable).resolve().read_bytes()[:64]  # any compiled program starts so
    path = install(tmp_path, elf)
    assert launcher.launcher_path(tmp_path / "venv") == path


def test_a_python_entry_point_is_not_the_launcher(tmp_path: Path) -> None:
    install(tmp_path, b"#!/usr/bin/python3\nfrom memcr.cli import main\nmain()\n", 0o755)
    assert launcher.launcher_path(tmp_path / "venv") is None


def test_no_launcher_outside_an_install(tmp_path: Path) -> None:
    assert launcher.launcher_path(tmp_path / "venv") is None  # nothing there
    (tmp_path / ".venv").mkdir()
    assert launcher.launcher_path(tmp_path / ".venv") is None  # a development venv


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_launcher_is_still_named(tmp_path: Path) -> None:
    path = install(tmp_path, b"\x7fELF", 0o000)  # as for a user outside the launcher's group
    assert launcher.launcher_path(tmp_path / "venv") == path


def test_advice_names_the_launcher_to_who_may_start_it(tmp_path: Path) -> None:
    path = install(tmp_path, b"\x7fELF")  # 0750, this user's: as for memcr's own user
    text = launcher.capability_advice(path, capable=False)
    assert f"launcher {path}" in text and f"setcap cap_sys_ptrace=ep {path}" in text


def test_advice_to_who_may_not_start_the_launcher_names_the_daemon(tmp_path: Path) -> None:
    path = install(tmp_path, b"\x7fELF", 0o640)  # as for a user outside its group: not even root may run it
    text = launcher.capability_advice(path, capable=False)
    assert str(path) not in text and "setcap" not in text
    assert "ask the memcr daemon instead (memcr-client)" in text and "clients' group" in text


def test_advice_without_an_install_names_the_administrator_s_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "launcher_path", lambda prefix=None: None)
    text = launcher.capability_advice(capable=False)
    assert "an administrator installs it with `make install-system`, as /opt/memcr/bin/memcr" in text


def test_no_advice_when_memcr_holds_the_capability() -> None:
    assert launcher.capability_advice(Path("/opt/memcr/bin/memcr"), capable=True) == ""


def test_may_trace_reads_memcr_s_own_capabilities() -> None:
    effective = int(procfs.read_status("self")["CapEff"], 16)
    assert launcher.may_trace() == bool(effective & 1 << launcher.CAP_SYS_PTRACE)


def test_trace_denied_gets_the_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `memcr -p PID` prints and the daemon logs, as a user without the capability."""
    monkeypatch.setattr(launcher, "may_trace", lambda: False)
    monkeypatch.setattr(launcher, "launcher_path", lambda prefix=None: install(tmp_path, b"\x7fELF"))
    text = advice.explain(admission.trace_denied(1234))
    assert text.startswith("not permitted to trace process 1234: memcr needs root or CAP_SYS_PTRACE")
    assert text.endswith(f"setcap cap_sys_ptrace=ep {tmp_path}/bin/memcr")
    monkeypatch.setattr(launcher, "may_trace", lambda: True)
    assert advice.explain(admission.trace_denied(1234)) == str(admission.trace_denied(1234))


def test_other_rights_get_their_own_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "may_trace", lambda: False)
    proc_mem = RightsError("reading /proc/<pid>/mem directly needs root", what="proc-mem")
    assert "setcap" not in advice.explain(proc_mem)


def test_install_layout_matches_install_system() -> None:
    """The layout launcher_path relies on is the one deploy/install-system.sh makes."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "install-system.sh"
    if not script.exists():
        pytest.skip("no deploy/install-system.sh in this tree")
    text = script.read_text()
    assert '-m venv --clear "$prefix/venv"' in text
    assert 'mv "$prefix/bin/memcr.new" "$prefix/bin/memcr"' in text


def test_missing_folders_are_made_by_the_install_s_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a boot, /run emptied: the command that makes every folder the daemon needs at once."""
    (tmp_path / "venv").mkdir()
    (tmp_path / "share").mkdir()
    listed = tmp_path / "share" / "memcr-tmpfiles.conf"
    listed.write_text("# Type Path Mode User Group Age\nd /run/memcr 0751 memcr memcr -\n"
                      "d /run/memcr/targets 1770 memcr memcr-targets -\n")  # fmt: skip
    run, targets = Path("/run/memcr"), Path("/run/memcr/targets")
    assert launcher.folders_list([run, targets], tmp_path / "venv") == listed
    assert launcher.folders_list([run, Path("/run/elsewhere")], tmp_path / "venv") is None  # not the install's -S
    assert launcher.folders_list([run], tmp_path / ".venv") is None  # a development venv
    monkeypatch.setattr(advice, "folders_list", lambda folders: launcher.folders_list(folders, tmp_path / "venv"))
    folders = [Folder(run, 0, 0, 0o751), Folder(targets, 0, 0, 0o1770)]
    missing = MissingFolders("the parasite socket folder /run/memcr/targets (-S) does not exist", folders,
                             path=targets, errno=2)  # fmt: skip
    assert advice.explain(missing) == (
        "the parasite socket folder /run/memcr/targets (-S) does not exist: as root, make memcr's folders as its "
        f"install lists them (systemd-tmpfiles --create {listed})"
    )


def test_missing_folders_outside_an_install_are_named_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(advice, "folders_list", lambda folders: None)
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    missing = MissingFolders("the parasite socket folder /srv/m/targets (-S) does not exist",
                             [Folder(Path("/srv/m"), os.getuid(), None, 0o755),
                              Folder(Path("/srv/m/targets"), os.getuid(), os.getgid(), 0o1770)],
                             path="/srv/m/targets", errno=2)  # fmt: skip
    assert advice.explain(missing).endswith(
        f": as root, make memcr's folders (install -d -o {user} -m 0755 /srv/m && "
        f"install -d -o {user} -g {group} -m 1770 /srv/m/targets)"
    )
