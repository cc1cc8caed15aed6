"""memcr.park.features: each probe agrees with what this kernel really does, and `memcr -V` lists them all.

The product probes; these tests check the probes against the kernel's
version (a second, independent witness) and against the call itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memcr.park import features, scan
from memcr.system import libc, pagemap, process_vm, procfs

PR_SET_DUMPABLE = 4
KERNEL = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])


@pytest.mark.parametrize(("feature", "since"), [(features.PAGEMAP_SCAN, (6, 7)), (features.PAGE_IS_GUARD, (6, 14))])
def test_the_pagemap_probes_agree_with_the_kernel_version(feature: features.Feature, since: tuple[int, int]) -> None:
    assert feature.present == (since <= KERNEL)


def test_process_vm_writev_present_means_a_copy_works() -> None:
    source = ctypes.create_string_buffer(b"parked", 6)
    target = ctypes.create_string_buffer(6)
    if features.PROCESS_VM_WRITEV.present:
        process_vm.write_many(os.getpid(), [(ctypes.addressof(target), ctypes.addressof(source), 6)])
        assert target.raw == b"parked"
    else:
        with pytest.raises(process_vm.Unavailable):
            process_vm.write_many(os.getpid(), [(ctypes.addressof(target), ctypes.addressof(source), 6)])


def test_the_write_tracking_probe_agrees_with_the_kernel_version() -> None:
    """Async write-protect came with Linux 6.7 on x86_64 and with 6.10 on arm64 (uffd-wp itself came then)."""
    since = (6, 10) if platform.machine() == "aarch64" else (6, 7)
    assert features.WRITE_TRACKING.present == (since <= KERNEL)


def test_userfaultfd_probes_agree_with_the_system() -> None:
    if os.geteuid() != 0:
        pytest.skip("the fork event memcr asks for needs CAP_SYS_PTRACE: without it the probe says no, rightly")
    assert features.USERFAULTFD.present == os.path.exists("/proc/sys/vm/unprivileged_userfaultfd")
    if features.USERFAULTFD_DEVICE.present:
        assert os.path.exists("/dev/userfaultfd") and KERNEL >= (6, 1)


def test_a_scan_learns_that_pagemap_scan_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file that is no pagemap answers PAGEMAP_SCAN with ENOTTY, as a kernel before 6.7 does: the scan
    falls back and does not ask again."""
    monkeypatch.setattr(features, "PAGEMAP_SCAN", features.Feature("PAGEMAP_SCAN", "6.7", "", "", lambda: 0))
    (tmp_path / "file").write_bytes(b"\0" * 4096)
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    try:
        assert scan._regions(0x10000, 0x20000, fd, pagemap.IS_PRESENT) is None
    finally:
        os.close(fd)
    assert features.PAGEMAP_SCAN.lacking
    assert scan._regions(0x10000, 0x20000, -1, pagemap.IS_PRESENT) is None  # not asked again: no EBADF


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to another user")
def test_an_undumpable_memcr_without_root_scans_a_target_it_may_read() -> None:
    """memcr makes itself undumpable, and then its own /proc/self/pagemap is root's: a memcr that is not
    root must find the target's pages all the same, and learn PAGEMAP_SCAN from the target's pagemap."""
    nobody = 65534
    ready_r, ready_w = os.pipe()
    target = os.fork()
    if target == 0:
        os.setgid(nobody)
        os.setuid(nobody)
        libc.prctl(PR_SET_DUMPABLE, 1)  # as any program started as that user: a uid change had cleared it
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        scanner = os.fork()
        if scanner == 0:
            code = 1
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                libc.prctl(PR_SET_DUMPABLE, 0)
                features.PAGEMAP_SCAN.__init__("PAGEMAP_SCAN", "6.7", "", "", features._pagemap_scan)  # unknown
                stack = next(v for v in procfs.read_maps(target, flags=False) if v.path == "[stack]")
                fd = os.open(f"/proc/{target}/pagemap", os.O_RDONLY)
                found = scan._regions(stack.start, stack.end, fd, pagemap.IS_PRESENT)
                code = 0 if (found is not None) == (KERNEL >= (6, 7)) else 2
            finally:
                os._exit(code)
        assert os.waitpid(scanner, 0)[1] == 0
    finally:
        os.kill(target, signal.SIGKILL)
        os.waitpid(target, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_a_probe_runs_once() -> None:
    calls = []
    feature = features.Feature("probe", "1.0", "nothing", "nothing", lambda: calls.append(1) or 0)
    assert feature.present and feature.present
    assert calls == [1]


def test_version_lists_every_feature() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "memcr", "-V"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert shown[0].startswith("memcr ") and "docs/kernels.md" in shown[1]
    for feature, line in zip(features.ALL, shown[2:], strict=True):
        assert line.split()[:2] == [feature.name, "yes" if feature.present else "no"]
        assert (feature.without in line) != feature.present


@pytest.mark.skipif(os.geteuid() != 0, reason="parks a process")
def test_a_checkpoint_says_which_scan_feature_this_kernel_lacks(tmp_path: Path) -> None:
    """A kernel before 6.7 scans the slow way, one before 6.14 reads more entries one by one: memcr says
    which, naming the kernel that has the feature."""
    target = subprocess.Popen(["sleep", "600"])
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "memcr", "-p", str(target.pid), "-n", "-d", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stderr
        said = [line for line in shown.stdout.splitlines() if "is not available here" in line]
        kernels = ((features.PAGEMAP_SCAN, (6, 7)), (features.PAGE_IS_GUARD, (6, 14)))
        lacking = [f for f, since in kernels if since > KERNEL]
        expected = [
            f"memcr: {f.name} is not available here (Linux {f.since}); without it memcr {f.without}" for f in lacking
        ]
        assert said == expected[:1]  # without PAGEMAP_SCAN, PAGE_IS_GUARD is never asked for
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_each_missing_feature_is_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = features.Feature("refused", "9.9", "", "does without", lambda: errno.EPERM)
    absent = features.Feature("absent", "9.9", "", "does without", lambda: errno.ENOSYS)
    monkeypatch.setattr(features, "ALL", (refused, absent))
    monkeypatch.setattr(features, "_told", set())
    assert features.untold() == []  # nothing known yet: untold() never probes
    assert not refused.present and not absent.present
    assert features.untold() == [
        "refused is refused to this memcr (Operation not permitted); without it memcr does without",
        "absent is not available here (Linux 9.9); without it memcr does without",
    ]
    assert features.untold() == []
