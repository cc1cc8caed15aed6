/*
 * Parasite entry. memcr points the injecting thread's pc at
 * clone_trampoline with the clone(2) arguments in x0-x4 and the number in
 * x8, and runs it with PTRACE_SYSCALL: the parent stops at the call's exit,
 * where memcr reads the new tid, and never runs further. The child starts
 * on the stack memcr gave it, runs parasite_main and exits as a single
 * thread, leaving the rest of the process alone.
 */
#include <asm/unistd.h>

	.section .head.text, "ax"
	.globl clone_trampoline
clone_trampoline:
	svc	#0
	cbz	x0, 1f
	brk	#0	/* never reached: the parent stops at the syscall's exit */
1:
	mov	x29, xzr	/* no frame above this one */
	mov	x30, xzr
	/* page-relative: the blob is mapped at the start of a page, as it was linked */
	adrp	x0, parasite_args
	add	x0, x0, :lo12:parasite_args
	bl	parasite_main
	mov	x8, #__NR_exit
	svc	#0
	brk	#0

	.section .note.GNU-stack, "", @progbits
