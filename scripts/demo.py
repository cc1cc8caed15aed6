"""The built-in demo: park a process holding 256 MiB of dirty memory, then wake it.

Starts the test suite's pattern target (4 threads that keep rewriting their
memory and check it on every pass), checkpoints it with memcr in interactive
mode, shows its RSS before, while frozen and after, restores it and lets the
target verify every byte itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 256
THREADS = 4


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        say("run as root (memcr needs ptrace rights and /proc/<pid>/pagemap)")
        return 1
    with tempfile.TemporaryDirectory(prefix="memcr-demo-") as work:
        target_bin = Path(work) / "pattern"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", target_bin, ROOT / "tests/targets/pattern.c"], check=True)
        target = subprocess.Popen([target_bin, str(MIB), str(THREADS)], stdout=subprocess.PIPE, text=True)
        try:
            return run(target, Path(work))
        finally:
            if target.poll() is None:
                target.kill()
            target.wait()


def run(target: subprocess.Popen[str], work: Path) -> int:
    assert target.stdout is not None
    target.stdout.readline()
    before = rss_kb(target.pid)
    say(f"target pid {target.pid}: {MIB} MiB of patterned memory, {THREADS} threads writing; RSS {before} kB")
    memcr = subprocess.Popen(
        [sys.executable, "-m", "memcr", "-p", str(target.pid), "-d", str(work)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert memcr.stdout is not None and memcr.stdin is not None
    for line in memcr.stdout:
        print(line, end="", flush=True)
        if "press enter to restore" in line:
            frozen = rss_kb(target.pid)
            say(f"frozen: target RSS {frozen} kB ({100 * frozen / before:.1f}% of before); restoring")
            memcr.stdin.write("\n")
            memcr.stdin.flush()
    if memcr.wait() != 0:
        say(f"memcr failed with exit code {memcr.returncode}")
        return 1
    say(f"restored: target RSS {rss_kb(target.pid)} kB")
    target.send_signal(signal.SIGUSR1)
    if target.wait(timeout=60) != 0:
        say("the target found damaged memory")
        return 1
    say("the target checked every byte of its memory: intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
