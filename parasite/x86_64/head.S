/*
 * Parasite entry. memcr points the injecting thread's pc at
 * clone_trampoline with the clone(2) arguments in registers. The parent
 * traps right after the call so memcr can read the new tid; the child
 * starts on the stack memcr gave it, runs parasite_main and exits as a
 * single thread, leaving the rest of the process alone.
 */
#include <asm/unistd.h>

	.section .head.text, "ax"
	.globl clone_trampoline
	.globl clone_trap
clone_trampoline:
	syscall
	testq	%rax, %rax
	jz	1f
clone_trap:
	int3
1:
	xorl	%ebp, %ebp
	leaq	parasite_args(%rip), %rdi
	call	parasite_main
	movl	%eax, %edi
	movl	$__NR_exit, %eax
	syscall
	hlt

	.section .note.GNU-stack, "", @progbits
