/*
 * Parasite entry. memcr points the injecting thread's pc at
 * clone_trampoline with the clone(2) arguments in registers and runs it
 * with PTRACE_SYSCALL: the parent stops at the call's exit, where memcr
 * reads the new tid, and never runs further. The child starts on the stack
 * memcr gave it, runs parasite_main and exits as a single thread, leaving
 * the rest of the process alone.
 */
#include <asm/unistd.h>

	.section .head.text, "ax"
	.globl clone_trampoline
clone_trampoline:
	syscall
	testq	%rax, %rax
	jz	1f
	int3	/* never reached: the parent stops at the syscall's exit */
1:
	xorl	%ebp, %ebp
	leaq	parasite_args(%rip), %rdi
	call	parasite_main
	movl	%eax, %edi
	movl	$__NR_exit, %eax
	syscall
	hlt

	.section .note.GNU-stack, "", @progbits
