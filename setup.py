"""Build the parasite blobs with make before packaging them.

The wheel carries a blob for this machine's CPU and for every other one
whose cross toolchain is installed (Debian: gcc-aarch64-linux-gnu), so one
build serves x86_64 and arm64 alike.
"""

import platform
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

CROSS = {"x86_64": "x86_64-linux-gnu-", "aarch64": "aarch64-linux-gnu-"}
TOOLS = ("gcc", "ld", "objcopy", "nm")


class BuildWithParasite(build_py):
    def run(self) -> None:
        missing = [tool for tool in ("make", *TOOLS) if shutil.which(tool) is None]
        if missing:
            raise SystemExit(
                f"memcr: building the parasite needs {', '.join(missing)}: "
                "install gcc, binutils and make (Debian: apt-get install gcc binutils make)"
            )
        native = platform.machine()
        # ARCH and CROSS_COMPILE named: a kernel build's environment must not steer this one
        subprocess.run(["make", "-C", "parasite", f"ARCH={native}", "CROSS_COMPILE="], check=True)
        for arch, prefix in CROSS.items():
            if arch == native or not all(shutil.which(prefix + tool) for tool in TOOLS):
                continue
            # another CPU's blob is a bonus: a partial cross toolchain (no kernel headers) must not fail the install
            if subprocess.run(["make", "-C", "parasite", f"ARCH={arch}", f"CROSS_COMPILE={prefix}"]).returncode:
                print(f"memcr: warning: the {arch} parasite did not build with {prefix}gcc; this build serves {native}")
        super().run()


setup(cmdclass={"build_py": BuildWithParasite})
