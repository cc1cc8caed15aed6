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
        subprocess.run(["make", "-C", "parasite"], check=True)
        for arch, prefix in CROSS.items():
            if arch != platform.machine() and all(shutil.which(prefix + tool) for tool in TOOLS):
                subprocess.run(["make", "-C", "parasite", f"ARCH={arch}", f"CROSS_COMPILE={prefix}"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithParasite})
