"""memcr.park.features: each probe agrees with what this kernel really does, and `memcr -V` lists them all.

The product probes; these tests check the probes against the kernel's
version (a second, independent witness) and against the call itself.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys

import pytest

from memcr.park import features
from memcr.system import process_vm

KERNEL = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])


@pytest.mark.parametrize(("feature", "since"), [(features.PAGEMAP_SCAN, (6, 7)), (features.PAGE_IS_GUARD, (6, 14))])
def test_the_pagemap_probes_agree_with_the_kernel_version(feature: features.Feature, since: tuple[int, int]) -> None:
    assert feature.present == (since <= KERNEL)


def test_process_vm_writev_present_means_a_copy_works() -> None:
    source = ctypes.create_string_buffer(b"parked", 6)
    target = ctypes.create_string_buffer(6)
    if features.PROCESS_VM_WRITEV.present:
        process_vm.write(os.getpid(), ctypes.addressof(target), ctypes.addressof(source), 6)
        assert target.raw == b"parked"
    else:
        with pytest.raises(process_vm.Unavailable):
            process_vm.write(os.getpid(), ctypes.addressof(target), ctypes.addressof(source), 6)


def test_userfaultfd_probes_agree_with_the_system() -> None:
    assert features.USERFAULTFD.present == os.path.exists("/proc/sys/vm/unprivileged_userfaultfd")
    if features.USERFAULTFD_DEVICE.present:
        assert os.path.exists("/dev/userfaultfd") and KERNEL >= (6, 1)


def test_a_probe_runs_once() -> None:
    calls = []
    feature = features.Feature("probe", "1.0", "nothing", "nothing", lambda: calls.append(1) or True)
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
