"""The architecture interface: registers, syscall numbers and blobs.

Everything that differs between CPUs lives in one module per architecture;
the rest of memcr talks to it only through `Arch`.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import memcr
from memcr.errors import MemcrError


class Arch(Protocol):
    name: str  # platform.machine() of the CPU, and the folder of its blobs in memcr/_blobs
    Regs: type[ctypes.Structure]  # the NT_PRSTATUS register set, as the kernel lays it out
    WORD: int  # bytes moved by one PTRACE_PEEKDATA or PTRACE_POKEDATA: the register width
    SYS_CLOSE: int
    SYS_MMAP: int
    SYS_MUNMAP: int
    SYS_CLONE: int
    SYS_EXIT: int
    SYS_KILL: int
    SYS_KCMP: int  # the host's number: memcr runs on the target's CPU
    SYS_USERFAULTFD: int  # the host's number too: memcr probes the kernel with it (memcr -V)

    def prepare_syscall(self, regs: Any, pc: int, nr: int, args: tuple[int, ...]) -> Any: ...
    def syscall_result(self, regs: Any) -> int: ...
    def kept_state(self, tid: int) -> list[tuple[int, bytes]]:
        """Register sets beyond NT_PRSTATUS (kind, bytes) that a system call memcr runs in the thread
        would change; they are put back after each one."""
        ...


def page_size() -> int:
    """Read at run time: arm64 kernels run with 4, 16 or 64 KiB pages."""
    return mmap.PAGESIZE


def word_mask(arch: Arch) -> int:
    """All bits of one register: -1 as the kernel sees it."""
    return (1 << 8 * arch.WORD) - 1


@dataclass(frozen=True)
class Blobs:
    """The compiled parasite and syscall blob with their symbol offsets."""

    parasite: bytes
    syscall: bytes
    offsets: dict[str, int]


@cache
def current() -> Arch:
    machine = platform.machine()
    try:
        module: Arch = importlib.import_module(f"memcr.engine.arch.{machine}")  # a module that follows the protocol
        return module
    except ModuleNotFoundError:
        raise MemcrError(f"memcr does not support the {machine} architecture yet") from None


@cache
def blobs() -> Blobs:
    # read beside the package's files, not through importlib.resources: that and the zipfile module it brings
    # took 1.2 MiB of memcr's peak RSS; memcr is never run from a zip archive
    import json

    name = current().name
    folder = Path(memcr.__file__).parent / "_blobs" / name
    try:
        return Blobs(
            parasite=(folder / "parasite.bin").read_bytes(),
            syscall=(folder / "syscall.bin").read_bytes(),
            offsets=json.loads((folder / "offsets.json").read_text()),
        )
    except FileNotFoundError:
        raise MemcrError(
            f"the parasite for {name} is not built: run `make` in the source tree "
            "(needs gcc and binutils) or reinstall memcr"
        ) from None
