"""Build the parasite blobs with make before packaging them."""

import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithParasite(build_py):
    def run(self) -> None:
        missing = [tool for tool in ("make", "gcc", "ld", "objcopy", "nm") if shutil.which(tool) is None]
        if missing:
            raise SystemExit(
                f"memcr: building the parasite needs {', '.join(missing)}: "
                "install gcc, binutils and make (Debian: apt-get install gcc binutils make)"
            )
        subprocess.run(["make", "-C", "parasite"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithParasite})
