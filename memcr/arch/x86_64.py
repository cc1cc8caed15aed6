"""x86_64: registers as python-ptrace lays them out, syscall numbers."""

from __future__ import annotations

from ptrace.binding.linux_struct import user_regs_struct

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


def copy_regs(regs: user_regs_struct) -> user_regs_struct:
    return user_regs_struct.from_buffer_copy(regs)


def pc(regs: user_regs_struct) -> int:
    return int(regs.rip)


def prepare_syscall(regs: user_regs_struct, pc: int, nr: int, args: tuple[int, ...]) -> user_regs_struct:
    """Registers that make the thread run the syscall blob at pc."""
    call = copy_regs(regs)
    call.rip = pc
    call.rax = nr
    # orig_rax = -1: the kernel must not restart the syscall the thread was in
    call.orig_rax = _MASK
    for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
        setattr(call, reg, value & _MASK)
    return call


def syscall_result(regs: user_regs_struct) -> int:
    value = int(regs.rax)
    return value - (_MASK + 1) if value >> (8 * WORD - 1) else value
