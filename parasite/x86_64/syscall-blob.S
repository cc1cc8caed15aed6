/*
 * One system call, then a trap back to memcr. memcr writes this at the
 * start of the page holding a stopped thread's pc, loads the registers and
 * lets it run; the original bytes go back right after the trap.
 */
	.text
	.globl syscall_blob
	.globl syscall_trap
syscall_blob:
	syscall
syscall_trap:
	int3

	.section .note.GNU-stack, "", @progbits
