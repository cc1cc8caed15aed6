"""Lazy restore through the daemon: `memcr -l --lazy` and V2 option 1002, against a real daemon and real targets.

A lazy restore is answered once the target runs again; its pages come back
after that, on the worker thread that traces it. Until they all have, the
pid stays the daemon's: a CHECKPOINT or another RESTORE of it gets -2, and
SIGTERM waits for the lazy phase before the daemon exits.
"""

from __future__ import annotations

import signal
import time

import pytest

from memcr_client import Client, Dialect
from memcr_client.protocol import Answer, Command
from tests.conftest import CHECKPOINT, RESTORE, RUN_TIMEOUT, Daemon, reports
from tests.test_groups import members_of

OK, INVALID_PID = Answer.OK, Answer.INVALID_PID


def v2_client(d: Daemon) -> Client:
    """Every request as V2: answered at once, where a v1 request waits 50 ms for a 12-byte form's rest."""
    return Client(d.listen, timeout=RUN_TIMEOUT, dialect=Dialect.V2)


def logged(d: Daemon, needle: str) -> str:
    """The daemon's first log line with `needle`, seen already or waited for."""
    for line in d.out.seen:
        if needle in line:
            return line
    return d.out.wait_for(needle, RUN_TIMEOUT)


def has(lines: list[str], needle: str) -> bool:
    return any(needle in line for line in lines)


def position(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


@pytest.mark.parametrize("mode", ["touch", "syscalls"])
def test_lazy_daemon_answers_once_the_target_runs(daemon, spawn, mode: str) -> None:
    d = daemon("--lazy", "--json")
    logged(d, "restores are lazy unless a request asks otherwise")
    target = spawn("lazy", 256, mode)
    client = v2_client(d)
    client.checkpoint(target.pid)
    started = time.monotonic()
    client.restore(target.pid)
    answered_ms = (time.monotonic() - started) * 1000
    logged(d, f"pid {target.pid}: lazy restore complete in")
    assert has(d.out.seen, f"restoring pid {target.pid} lazily (the daemon's default)")
    assert logged(d, f"pid {target.pid} runs again after").endswith("ms; its pages come back lazily")
    restored = logged(d, '"event":"restore"')
    [report] = reports(restored)
    assert report["lazy_ms"] > 0
    # the answer came with the wake-up, before the pages were all back
    assert answered_ms < report["upload_ms"] + report["lazy_ms"]
    assert list(d.dump_dir.iterdir()) == []
    assert target.verify() == 0


def test_a_request_chooses_lazy_or_eager(daemon, spawn) -> None:
    eager = daemon()
    target = spawn("lazy", 64, "touch")
    v2_client(eager).checkpoint(target.pid)
    v2_client(eager).restore(target.pid, lazy=True)
    logged(eager, f"pid {target.pid}: lazy restore complete in")
    assert has(eager.out.seen, f"restoring pid {target.pid} lazily (as its request asks)")
    assert target.verify() == 0
    assert eager.terminate() == 0

    lazy = daemon("--lazy", listen=str(eager.dump_dir.parent / "lazy.sock"))
    target = spawn("lazy", 64, "syscalls")
    v2_client(lazy).checkpoint(target.pid)
    v2_client(lazy).restore(target.pid, lazy=False)
    logged(lazy, f"pid {target.pid} restored in")
    assert has(lazy.out.seen, f"restoring pid {target.pid} eagerly (as its request asks)")
    assert not [line for line in lazy.out.seen if "lazily" in line and str(target.pid) in line]
    assert target.verify() == 0


def test_checkpoint_and_restore_during_the_lazy_phase_get_minus_2(daemon, spawn) -> None:
    d = daemon("--lazy")
    target = spawn("lazy", 1024, "touch")
    client = v2_client(d)
    client.checkpoint(target.pid)
    client.restore(target.pid)
    # right after the answer: the lazy phase of 1 GiB takes a few hundred ms
    assert client.request(Command.CHECKPOINT, target.pid) == INVALID_PID
    assert client.request(Command.RESTORE, target.pid) == INVALID_PID
    logged(d, f"pid {target.pid}: lazy restore complete in")
    lines = d.out.seen
    refused = position(lines, f"answered -2 to another restore of pid {target.pid}: its first is still under way")
    assert refused < position(lines, f"pid {target.pid}: lazy restore complete")
    # the phase over, the pid is the daemon's no more: a new round trip is served whole
    assert d.code(CHECKPOINT, target.pid) == OK
    assert d.code(RESTORE, target.pid) == OK
    # the target checks its mappings' flags too, which show userfaultfd's watch until the phase ends
    d.out.wait_for(f"pid {target.pid}: lazy restore complete in", RUN_TIMEOUT)
    assert target.verify() == 0


def test_sigterm_waits_for_every_lazy_phase(daemon, spawn) -> None:
    d = daemon("--lazy")
    streaming = spawn("lazy", 1024, "touch")
    parked = spawn("lazy", 64, "syscalls")
    client = v2_client(d)
    client.checkpoint(streaming.pid)
    client.checkpoint(parked.pid)
    client.restore(streaming.pid)
    d.proc.send_signal(signal.SIGTERM)  # during the lazy phase of one, with the other still parked
    assert d.proc.wait(RUN_TIMEOUT) == 0
    lines = d.out.rest()
    stopped = lines.index("memcr: stopped")
    assert position(lines, f"pid {streaming.pid}: lazy restore complete") < stopped
    # SIGTERM restores what is parked as --lazy says, and waits for that lazy phase too
    assert has(lines, f"restoring pid {parked.pid} lazily (the daemon's default)")
    assert position(lines, f"pid {parked.pid}: lazy restore complete") < stopped
    assert list(d.dump_dir.iterdir()) == []
    assert streaming.verify() == 0
    assert parked.verify() == 0


def test_a_group_is_restored_eagerly(daemon, spawn) -> None:
    d = daemon("--lazy")
    target = spawn("forkserver", 4, 2, 16, 8)
    members = members_of(target)
    client = v2_client(d)
    client.checkpoint(target.pid, tree=True)
    client.restore(target.pid, lazy=True)
    logged(d, f"restoring tree {target.pid} eagerly: a group's restore is never lazy (option 1002 ignored)")
    assert not [line for line in d.out.seen if "come back lazily" in line]
    assert d.code(RESTORE, max(members)) == INVALID_PID  # woken, all of it
    assert target.verify() == 0


def test_a_lazy_daemon_says_at_start_what_lazy_restore_lacks_here(daemon, spawn) -> None:
    """No /dev/userfaultfd (hidden here, as a kernel before 6.1 has none): the daemon says so once, at start,
    with the kernel that has it; an ordinary user's target would be restored eagerly, root's stay lazy."""
    hide = '[ ! -e /dev/userfaultfd ] || mount --bind /dev/null /dev/userfaultfd; exec "$@"'
    d = daemon("--lazy", prefix=["unshare", "-m", "sh", "-c", hide, "sh"])
    d.out.wait_for("/dev/userfaultfd is not available here (Linux 6.1); without it memcr restores such a target")
    target = spawn("lazy", 64, "touch")
    v2_client(d).checkpoint(target.pid)
    v2_client(d).restore(target.pid)
    logged(d, f"pid {target.pid}: lazy restore complete in")
    assert target.verify() == 0
    assert len([line for line in d.out.seen if "/dev/userfaultfd is not available here" in line]) == 1
