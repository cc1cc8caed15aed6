"""The daemon's handoff to its idle image: every setting crosses exec as it was (memcr.service.handoff)."""

from __future__ import annotations

import dataclasses
import marshal
import os
import socket
import subprocess
import sys
from pathlib import Path

import memcr
from memcr.dump.codec import Coding
from memcr.logs import Level, Logger
from memcr.options import Options
from memcr.service.handoff import Daemon, resumed, state
from memcr.service.listener import Listener
from memcr.service.peer import Scope
from memcr_client.protocol import Address


def _crossed(daemon: Daemon, listener: Listener, greeting: list[str]) -> tuple[Daemon, Listener, list[str]]:
    """`daemon` and `listener` through the bytes exec would carry, and back."""
    handed = marshal.loads(marshal.dumps(state(daemon, listener, greeting, ["memcr", "-l", "x"])))
    back, back_listener = resumed(handed)
    return back, back_listener, handed["greeting"]


def test_every_setting_crosses_as_it_was(tmp_path: Path) -> None:
    options = Options(
        dump_dir=tmp_path / "dumps \udcff",  # a name that is not UTF-8 crosses too
        socket_dir=tmp_path / "parasites",
        socket_gid=1234,
        netns=True,
        proc_mem=True,
        rss_file=True,
        allow_async_io=True,
        coding=Coding(compress="zstd", checksum=True, cipher="aes-128-cbc"),
        lazy=True,
        incremental=True,
    )
    defaults = Options()
    # the test is worth what its values are: each differs from its default
    assert all(getattr(options, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(Options))
    daemon = Daemon(Address(path=tmp_path / "d.sock"), options, Logger(Level.ERROR, json_reports=True, service=True),
                    gid=4321, timeout=7, json_reports=True, scope=Scope.OWN,
                    unload_after=2.5)  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener = Listener(sock, print, tmp_path / "d.sock", [tmp_path / "a", tmp_path / "a" / "b"], inherited=False)
    back, back_listener, greeting = _crossed(daemon, listener, ["memcr: listening on x", "memcr: note"])
    assert back[:2] == daemon[:2] and back[3:] == daemon[3:]
    assert (back.log.level, back.log.json_reports, back.log.service) == (Level.ERROR, True, True)
    assert (back_listener.path, back_listener.made, back_listener.inherited) == (listener.path, listener.made, False)
    assert back_listener.fileno() == sock.fileno()
    assert not os.get_inheritable(sock.fileno())
    assert greeting == ["memcr: listening on x", "memcr: note"]
    sock.detach()  # one descriptor, two socket objects: closed once
    back_listener.sock.close()


def test_a_tcp_daemon_with_the_defaults_crosses_too() -> None:
    daemon = Daemon(Address(host="::1", port=5555), Options(), Logger(service=True), None, None, False, Scope.ANY,
                    0)  # fmt: skip
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener = Listener(sock, print, inherited=True)
    back, back_listener, _ = _crossed(daemon, listener, [])
    assert back[:2] == daemon[:2] and back[3:] == daemon[3:]
    assert (back_listener.path, back_listener.made, back_listener.inherited) == (None, [], True)
    assert back_listener.sock.family == socket.AF_INET6
    sock.detach()
    back_listener.sock.close()


def test_the_idle_image_loads_nothing_it_does_not_use() -> None:
    """What memcr.service.idle imports, the idle daemon weighs (bench/service_load.py): beyond what the
    interpreter loads anyway, only ctypes (prctl), select and signal, and memcr's own few modules."""
    program = (
        "import sys; before = set(sys.modules); sys.path.insert(0, sys.argv[1]); import memcr.service.idle; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    root = Path(memcr.__file__).resolve().parent.parent
    argv = [sys.executable, "-I", "-c", program, str(root)]
    loaded = set(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split())
    standard = {"_ctypes", "_struct", "struct", "ctypes", "ctypes._endian", "select", "signal", "collections.abc"}
    own = {"memcr", "memcr.service", "memcr.service.idle", "memcr.system", "memcr.system.libc"}
    assert "memcr.service.idle" in loaded and loaded <= standard | own | {"__future__"}


def test_the_fingerprint_sees_every_file_of_an_install_but_the_caches(tmp_path: Path) -> None:
    from memcr.service.idle import fingerprint, unchanged

    package = tmp_path / "memcr"
    (package / "__pycache__").mkdir(parents=True)
    for name in ("a.py", "b.pyc", "blob.bin", "__pycache__/a.cpython-311.pyc"):
        (package / name).write_bytes(b"1")
    (package / ".#a.py").symlink_to("nowhere")  # an editor's lock: a dangling link
    state = {"folders": [str(package)], "fingerprint": fingerprint([str(package)])}
    assert [os.path.basename(entry[0]) for entry in state["fingerprint"]] == [".#a.py", "a.py", "b.pyc", "blob.bin"]
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"22")  # the interpreter's cache: not the install
    assert unchanged(state)
    for name in ("b.pyc", "blob.bin"):  # a module without its source, a parasite blob: replaced as installs do
        before = state["fingerprint"]
        (package / f"{name}.new").write_bytes(b"2")
        os.replace(package / f"{name}.new", package / name)
        assert not unchanged(state)
        state["fingerprint"] = fingerprint([str(package)])
        assert state["fingerprint"] != before
