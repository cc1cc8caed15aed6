/*
 * One system call. memcr writes this at the start of a private executable
 * mapping, loads the registers and resumes the thread with PTRACE_SYSCALL,
 * so it stops at the call's entry and exit; the original bytes go back
 * right after. The brk is never executed: a trap raises SIGTRAP, which
 * would reset a handler the target blocked.
 */
	.text
	.globl syscall_blob
syscall_blob:
	svc	#0
	brk	#0	/* never reached: the thread stops at the syscall's exit */

	.section .note.GNU-stack, "", @progbits
