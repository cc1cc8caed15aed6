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

static uint64_t *region;
static size_t code_bytes; /* the code takes one page, of the kernel's page size */
static unsigned char *code, copy[MAX_PAGE_SIZE];
static sigset_t usr1;

/* Fill the page with no-ops and, 96 bytes before its end, a jump back to its start: a spin. */
static void write_spin(unsigned char *page, size_t bytes)
{
	size_t at = bytes - 96;
#if defined(__x86_64__)
	int rel = -(int)(at + 5);

	memset(page, 0x90, bytes); /* nop */
	page[at] = 0xe9;           /* jmp rel32 */
	memcpy(page + at + 1, &rel, 4);
#elif defined(__aarch64__)
	uint32_t nop = 0xd503201f, b = 0x14000000u | ((uint32_t)(-(int32_t)(at / 4)) & 0x03ffffffu);

	for (size_t i = 0; i < bytes; i += 4)
		memcpy(page + i, &nop, 4);
	memcpy(page + at, &b, 4); /* b <start> */
#endif
}

static void *checker(void *arg)
{
	int sig, ok;

	(void)arg;
	while (sigwait(&usr1, &sig) != 0 || sig != SIGUSR1)
		;
	ok = state_intact(1) & check("region", region, REGION, 91);
	if (memcmp(copy, code, code_bytes) != 0) {
		fprintf(stderr, "the code page changed\n");
		ok = 0;
	}
	_exit(ok ? 0 : 1);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "memfd";
	unsigned char *writable;
	pthread_t thread;

	code_bytes = page_size();
	region = map_anon(REGION);
	fill(region, REGION, 91);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);
	if (strcmp(mode, "memfd") == 0) {
		int fd = memfd_create("code", 0);

		if (fd < 0 || ftruncate(fd, code_bytes) != 0)
			return 2;
		writable = mmap(NULL, code_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		code = mmap(NULL, code_bytes, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0);
	} else {
		writable = code = mmap(NULL, code_bytes, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_SHARED | MAP_ANONYMOUS,
				       -1, 0);
	}
	if (writable == MAP_FAILED || code == MAP_FAILED)
		return 2;
	write_spin(writable, code_bytes);
	__builtin___clear_cache((char *)code, (char *)code + code_bytes); /* arm64: the instruction cache */
	memcpy(copy, writable, code_bytes);
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
