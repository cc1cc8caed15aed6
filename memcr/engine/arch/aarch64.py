"""arm64: the register set, syscall numbers (the generic table), how a thread is made to run one syscall.

A syscall the freeze interrupted needs no care here, unlike on x86_64:
the kernel has already rewound the thread to its `svc` (pc - 4, x0 from
orig_x0) when the thread reports its stop, so the saved registers restart
the call when they are put back. Pointer authentication changes nothing
either: its keys are per process and the parasite thread shares them.
"""

from __future__ import annotations

import ctypes
import errno

from memcr.engine import ptrace_calls as pt
from memcr.errors import TargetError

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
SYS_USERFAULTFD = 282

NT_ARM_SYSTEM_CALL = 0x404  # the number of the system call the thread is in, -1 for none
NT_ARM_SVE = 0x405
NT_ARM_SSVE = 0x40B  # the SVE registers of SME's streaming mode
SVE_SET_SIZE = 16 << 10  # the set at the largest vector length the architecture allows (2048 bits)
SVE_PT_REGS_SVE = 1  # in the set's header flags: it holds SVE registers, not only the FPSIMD ones


class Regs(ctypes.Structure):
    """struct user_pt_regs (<asm/ptrace.h>)."""

    _fields_ = (
        ("regs", ctypes.c_uint64 * 31),
        ("sp", ctypes.c_uint64),
        ("pc", ctypes.c_uint64),
        ("pstate", ctypes.c_uint64),
    )


def prepare_syscall(regs: Regs, pc: int, nr: int, args: tuple[int, ...]) -> Regs:
    """Registers that make the thread run the syscall blob at pc: number in x8, arguments in x0-x5."""
    call = Regs.from_buffer_copy(regs)
    call.pc = pc
    call.pstate &= ~_PSTATE_BTYPE
    call.regs[8] = nr
    for i, value in enumerate(args):
        call.regs[i] = value & _MASK
    return call


def syscall_result(regs: Regs) -> int:
    value = int(regs.regs[0])
    return value - (_MASK + 1) if value >> (8 * WORD - 1) else value


def kept_state(tid: int) -> list[tuple[int, bytes]]:
    """The thread's system call number and, while it uses SVE, its SVE registers.

    The number is not in NT_PRSTATUS: left at that of memcr's last call, a
    thread whose x0 happens to hold -ERESTARTSYS would be rewound by 4 bytes
    when it runs on. The SVE registers beyond their low 128 bits, and the
    predicates, are zero after any system call (the SVE ABI); a set in
    FPSIMD form holds nothing a system call changes, and writing it back
    would cancel a vector length the thread chose for its next exec.

    A thread in SME streaming mode is refused (TargetError, before memcr
    has run anything in it): a system call ends that mode, and writing the
    registers back is not known to start it again (not tested: memcr's
    emulated CPU has no SME).
    """
    if _sve_in_use(tid, NT_ARM_SSVE) is not None:
        raise TargetError(
            f"thread {tid} is in SME streaming mode, which a system call memcr ran in it would end: "
            "try again once it has left that mode",
            what="sme",
        )
    kept = [(NT_ARM_SYSTEM_CALL, pt.get_regset(tid, NT_ARM_SYSTEM_CALL, 4))]
    if (sve := _sve_in_use(tid, NT_ARM_SVE)) is not None:
        kept.append((NT_ARM_SVE, sve))
    return kept


def _sve_in_use(tid: int, kind: int) -> bytes | None:
    """The register set `kind` if it holds live SVE state; None if not, or if the CPU lacks it (EINVAL)."""
    try:
        data = pt.get_regset(tid, kind, SVE_SET_SIZE)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None
    # struct user_sve_header: u32 size, u32 max_size, u16 vl, u16 max_vl, u16 flags
    return data if int.from_bytes(data[12:14], "little") & SVE_PT_REGS_SVE else None
