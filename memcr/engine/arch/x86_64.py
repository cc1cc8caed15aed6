"""x86_64: the register set, syscall numbers, how a thread is made to run one syscall."""

from __future__ import annotations

import ctypes

name = "x86_64"
WORD = 8
_MASK = (1 << 8 * WORD) - 1

SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MUNMAP = 11
SYS_CLONE = 56
SYS_EXIT = 60
SYS_KILL = 62
SYS_KCMP = 312
SYS_USERFAULTFD = 323


class Regs(ctypes.Structure):
    """struct user_regs_struct (<sys/user.h>)."""

    _fields_ = tuple(
        (field, ctypes.c_uint64)
        for field in (
            *("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8"),
            *("rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags"),
            *("rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"),
        )
    )


def prepare_syscall(regs: Regs, pc: int, nr: int, args: tuple[int, ...]) -> Regs:
    """Registers that make the thread run the syscall blob at pc."""
    call = Regs.from_buffer_copy(regs)
    call.rip = pc
    call.rax = nr
    # orig_rax = -1: the kernel must not restart the syscall the thread was in
    call.orig_rax = _MASK
    for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
        setattr(call, reg, value & _MASK)
    return call


def syscall_result(regs: Regs) -> int:
    value = int(regs.rax)
    return value - (_MASK + 1) if value >> (8 * WORD - 1) else value


def kept_state(tid: int) -> list[tuple[int, bytes]]:
    """Nothing: orig_rax is in the register set, and a system call keeps the vector registers."""
    return []
