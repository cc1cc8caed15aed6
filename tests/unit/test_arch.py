"""The architecture modules against the kernel's own headers, for every CPU memcr supports.

Each module's syscall numbers are compared with <asm/unistd.h> and its
register structure with the C one, by that CPU's compiler: the machine's
own gcc, or the cross compiler (Debian's gcc-aarch64-linux-gnu) for the
other CPU. Nothing runs on the other CPU: the compiler checks the layout.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from memcr.engine.arch import aarch64, x86_64

# the C structure each Regs mirrors, and the header it is in
LAYOUTS = {
    "x86_64": (x86_64, "struct user_regs_struct", "sys/user.h"),
    "aarch64": (aarch64, "struct user_pt_regs", "asm/ptrace.h"),
}


def compiler(arch: str) -> str:
    """The C compiler that builds for `arch`; skips the test when none is installed."""
    names = ["gcc"] if arch == platform.machine() else []
    names.append(f"{arch}-linux-gnu-gcc")
    for name in names:
        if shutil.which(name):
            return name
    pytest.skip(f"no C compiler for {arch} ({arch}-linux-gnu-gcc): install gcc-{arch.replace('_', '-')}-linux-gnu")


def syscall_numbers(cc: str) -> dict[str, int]:
    """Every __NR_x the kernel headers define as a plain number."""
    defined = subprocess.run(
        [cc, "-E", "-dM", "-include", "asm/unistd.h", "-x", "c", "/dev/null"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define __NR_(\w+) (\d+)$", defined, re.M)} | {
        # the generic table names mmap through __NR3264_mmap
        m[1]: int(m[2])
        for m in re.finditer(r"^#define __NR3264_(\w+) (\d+)$", defined, re.M)
    }


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_syscall_numbers_are_the_kernels(arch: str) -> None:
    module = LAYOUTS[arch][0]
    numbers = syscall_numbers(compiler(arch))
    ours = {name[4:].lower(): getattr(module, name) for name in dir(module) if name.startswith("SYS_")}
    assert len(ours) >= 7
    assert ours == {name: numbers[name] for name in ours}


def layout_checks(module: ModuleType, struct: str) -> str:
    """C static assertions that the ctypes structure has the C structure's size, field offsets and widths."""
    regs: type[ctypes.Structure] = module.Regs
    lines = [f'_Static_assert(sizeof({struct}) == {ctypes.sizeof(regs)}, "size");']
    for name, *_ in regs._fields_:
        field = getattr(regs, name)
        lines.append(f'_Static_assert(__builtin_offsetof({struct}, {name}) == {field.offset}, "{name} offset");')
        lines.append(f'_Static_assert(sizeof((({struct} *)0)->{name}) == {field.size}, "{name} size");')
    return "\n".join(lines)


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_register_layout_is_the_kernels(arch: str, tmp_path: Path) -> None:
    module, struct, header = LAYOUTS[arch]
    source = tmp_path / "layout.c"
    source.write_text(f"#include <{header}>\n{layout_checks(module, struct)}\n")
    done = subprocess.run([compiler(arch), "-fsyntax-only", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_the_module_names_its_folder(arch: str) -> None:
    assert LAYOUTS[arch][0].name == arch
