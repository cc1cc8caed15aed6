/*
 * sharedcode MODE: the main thread spins in machine code held in shared
 * memory, as a JIT does; a second thread waits for SIGUSR1 and checks memory,
 * state and that the code is unchanged.
 *   memfd  the code in a memfd mapped twice: read-write, and shared read-exec
 *   fork   one shared read-write-exec mapping, in which a forked child spins
 *          too (printed as "child <pid>"); the test checks it lives on
 * memcr must not put its system-call stub into such a page: another process
 * would run it, or the kernel refuses the write.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/prctl.h>

#include "common.h"

#define REGION (16u << 20)
#define CODE 4096

static uint64_t *region;
static unsigned char *code, copy[CODE];
static sigset_t usr1;

static void *checker(void *arg)
{
	int sig, ok;

	(void)arg;
	while (sigwait(&usr1, &sig) != 0 || sig != SIGUSR1)
		;
	ok = state_intact(1) & check("region", region, REGION, 91);
	if (memcmp(copy, code, CODE) != 0) {
		fprintf(stderr, "the code page changed\n");
		ok = 0;
	}
	_exit(ok ? 0 : 1);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "memfd";
	unsigned char *writable;
	int rel = -(CODE - 96 + 5);
	pthread_t thread;

	region = map_anon(REGION);
	fill(region, REGION, 91);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);
	if (strcmp(mode, "memfd") == 0) {
		int fd = memfd_create("code", 0);

		if (fd < 0 || ftruncate(fd, CODE) != 0)
			return 2;
		writable = mmap(NULL, CODE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		code = mmap(NULL, CODE, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0);
	} else {
		writable = code = mmap(NULL, CODE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	}
	if (writable == MAP_FAILED || code == MAP_FAILED)
		return 2;
	memset(writable, 0x90, CODE);		 /* nop ... */
	writable[CODE - 96] = 0xe9;		 /* ... jmp back to the start: spin */
	memcpy(writable + CODE - 95, &rel, 4);
	memcpy(copy, writable, CODE);
	if (strcmp(mode, "fork") == 0) {
		pid_t child = fork();

		if (child == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			((void (*)(void))code)();
		}
		dprintf(1, "child %d\n", child); /* unbuffered: announce() sets up stdout */
	}
	pthread_create(&thread, NULL, checker, NULL);
	announce();
	((void (*)(void))code)();
	return 2;
}
