"""The target's limits as memcr reads them from /proc, and the commands its advice names to lift them."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

from memcr.advice import explain
from memcr.errors import TargetLimit
from memcr.system import procfs


def test_limits_are_those_the_process_has() -> None:
    found = procfs.limits(os.getpid())
    for name, which in (("Max open files", resource.RLIMIT_NOFILE), ("Max address space", resource.RLIMIT_AS)):
        expected = tuple(None if v == resource.RLIM_INFINITY else v for v in resource.getrlimit(which))
        assert found[name] == expected


def test_map_count_leaves_out_the_gate_area() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])  # maps that hold still between the two reads, once it sleeps
    try:
        while procfs.read_status(sleeper.pid)["State"][0] != "S":  # Popen returns while exec still maps
            time.sleep(0.001)
        lines = Path(f"/proc/{sleeper.pid}/maps").read_text().splitlines()
        counted = [line for line in lines if not line.endswith("[vsyscall]")]
        assert procfs.map_count(sleeper.pid) == len(counted)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_advice_raises_the_hard_limit_only_when_it_must() -> None:
    within = TargetLimit("x", pid=42, what="nofile", wanted=6, hard=4096)
    beyond = TargetLimit("x", pid=42, what="as", wanted=1 << 30, hard=1 << 20)
    unlimited = TargetLimit("x", pid=42, what="data", wanted=1 << 30, hard=None)
    assert "(prlimit --pid 42 --nofile=6:)" in explain(within)
    assert f"(prlimit --pid 42 --as={1 << 30}:{1 << 30})" in explain(beyond)
    assert f"(prlimit --pid 42 --data={1 << 30}:)" in explain(unlimited)
    assert "sysctl -w vm.max_map_count=70000" in explain(TargetLimit("x", pid=42, what="max-map-count", wanted=70000))
