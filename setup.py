"""Build the parasite blobs with make before packaging them.

The wheel carries a blob for this machine's CPU and for every other one
whose cross toolchain is installed (Debian: gcc-aarch64-linux-gnu), so one
build serves x86_64 and arm64 alike.
"""

import platform
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

CROSS = {"x86_64": "x86_64-linux-gnu-", "aarch64": "aarch64-linux-gnu-"}
TOOLS = ("gcc", "ld", "objcopy", "nm")


def make(arch: str, prefix: str) -> subprocess.CompletedProcess[str]:
    """Build one CPU's blobs, with its output kept: pip shows a build's output only when the build fails."""
    # ARCH and CROSS_COMPILE named: a kernel build's environment must not steer this one; PYTHON: the build
    # scripts run on this interpreter, not on whatever `python3` is first on PATH (pip's isolated build)
    argv = ["make", "-C", "parasite", f"ARCH={arch}", f"CROSS_COMPILE={prefix}", f"PYTHON={sys.executable}"]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class BuildWithParasite(build_py):
    def run(self) -> None:
        missing = [tool for tool in ("make", *TOOLS) if shutil.which(tool) is None]
        if missing:
            raise SystemExit(
                f"memcr: building the parasite needs {', '.join(missing)}: "
                "install gcc, binutils and make (Debian: apt-get install gcc binutils make)"
            )
        native = platform.machine()
        built = make(native, "")
        if built.returncode:
            raise SystemExit(
                f"memcr: the {native} parasite did not build (make exited with {built.returncode}):\n{built.stdout}"
            )
        print(built.stdout, end="")
        for arch, prefix in CROSS.items():
            if arch == native or not all(shutil.which(prefix + tool) for tool in TOOLS):
                continue
            # another CPU's blob is a bonus: a partial cross toolchain (no kernel headers) must not fail the install
            cross = make(arch, prefix)
            print(cross.stdout, end="")
            if cross.returncode:
                print(f"memcr: warning: the {arch} parasite did not build with {prefix}gcc; this build serves {native}")
        super().run()


setup(cmdclass={"build_py": BuildWithParasite})
