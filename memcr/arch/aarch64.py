"""arm64: the register set, syscall numbers (the generic table), how a thread is made to run one syscall.

A syscall the freeze interrupted needs no care here, unlike on x86_64:
the kernel has already rewound the thread to its `svc` (pc - 4, x0 from
orig_x0) when the thread reports its stop, so the saved registers restart
the call when they are put back. Pointer authentication changes nothing
either: its keys are per process and the parasite thread shares them.
"""

from __future__ import annotations

import ctypes

name = "aarch64"
WORD = 8
_MASK = (1 << 8 * WORD) - 1
# PSTATE.BTYPE: the kind of indirect branch that led to pc. Zero, so that a jump to the blob
# on a BTI-guarded page (PROT_BTI) does not count as a branch to a non-landing pad.
_PSTATE_BTYPE = 0b11 << 10

SYS_CLOSE = 57
SYS_MMAP = 222
SYS_MUNMAP = 215
SYS_CLONE = 220
SYS_EXIT = 93
SYS_KILL = 129
SYS_KCMP = 272

# The SVE registers beyond their low 128 bits, and the predicates, are zero after any system call
# (the SVE ABI): a thread stopped in the middle of SVE code would lose them to memcr's calls.
# 16 KiB holds the set at the largest vector length the architecture allows (2048 bits).
NT_ARM_SVE = 0x405
KEPT_REGSETS = ((NT_ARM_SVE, 16 << 10),)


class Regs(ctypes.Structure):
    """struct user_pt_regs (<asm/ptrace.h>)."""

    _fields_ = (
        ("regs", ctypes.c_uint64 * 31),
        ("sp", ctypes.c_uint64),
        ("pc", ctypes.c_uint64),
        ("pstate", ctypes.c_uint64),
    )


def copy_regs(regs: Regs) -> Regs:
    return Regs.from_buffer_copy(regs)


def pc(regs: Regs) -> int:
    return int(regs.pc)


def prepare_syscall(regs: Regs, pc: int, nr: int, args: tuple[int, ...]) -> Regs:
    """Registers that make the thread run the syscall blob at pc: number in x8, arguments in x0-x5."""
    call = copy_regs(regs)
    call.pc = pc
    call.pstate &= ~_PSTATE_BTYPE
    call.regs[8] = nr
    for i, value in enumerate(args):
        call.regs[i] = value & _MASK
    return call


def syscall_result(regs: Regs) -> int:
    value = int(regs.regs[0])
    return value - (_MASK + 1) if value >> (8 * WORD - 1) else value
