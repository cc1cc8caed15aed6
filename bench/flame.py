"""`make profile`: a py-spy flame graph of one `memcr -p PID -n` on the bench target.

    make profile ARGS='-z lz4'                  # memcr options to profile with
    python -m bench.flame --size-mib 256 -- -c  # from the repository's root

Threads are shown apart and idle time is kept, so waiting on the parasite,
on the disk or on the codec threads is visible as such.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import HERE, build_target, ready_target


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flame", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--svg", type=Path, default=HERE / "profile.svg")
    parser.add_argument("memcr_args", nargs="*", help="extra memcr options, after --")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="memcr-profile-", dir="/var/tmp") as work,
        ready_target(build_target(Path(work)), args.size_mib, "profile") as target,
    ):
        memcr = [sys.executable, "-m", "memcr", "-p", str(target.pid), "-n", "-d", work, *args.memcr_args]
        spy = [Path(sys.executable).with_name("py-spy"), "record", "--threads", "--idle", "-o", args.svg, "--"]
        subprocess.run([*spy, *memcr], check=True)
    print(f"profile: flame graph in {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
