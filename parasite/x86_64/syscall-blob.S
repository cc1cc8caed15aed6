/*
 * One system call. memcr writes this at the start of the page holding a
 * stopped thread's pc, loads the registers and resumes the thread with
 * PTRACE_SYSCALL, so it stops at the call's entry and exit; the original
 * bytes go back right after. No trap instruction: a trap raises SIGTRAP,
 * which would reset a handler the target blocked.
 */
	.text
	.globl syscall_blob
syscall_blob:
	syscall
	int3	/* never reached: the thread stops at the syscall's exit */

	.section .note.GNU-stack, "", @progbits
