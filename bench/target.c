/*
 * Bench target: SIZE_MIB MiB, even pages text-like (compressible), odd
 * pages random. Prints "ready <pid>", verifies everything on SIGUSR1.
 *
 * `target SIZE_MIB send`: the same pages, written instead to the socket on
 * fd 0 once the bench answers "r" with "g": the sender of the write limit,
 * so the limit moves exactly the bytes memcr moves.
 *
 * `target SIZE_MIB ping`: after "ready", each byte read on fd 0 is written
 * back on fd 1 (the wake-up bench: the answer shows the target runs its
 * own code again); "v" verifies every page instead and exits.
 *
 * `target SIZE_MIB sparse`: the same SIZE_MIB MiB of pages, each one the
 * first of 8 in a mapping 8 times as large whose other pages are never
 * touched (the sparse figure); those must still read as zeros afterwards.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static size_t page_bytes; /* the kernel's page size, read at start */

static const char *words[] = {"memory", "process", "restore", "checkpoint", "kernel", "page",
			      "the", "of", "and", "parasite", "socket", "frozen", "dump", "file"};

static uint64_t next(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void make_page(unsigned char *page, size_t index)
{
	uint64_t state = index * 0x9e3779b97f4a7c15ULL + 1;

	if (index % 2) {
		for (size_t i = 0; i < page_bytes; i += 8) {
			uint64_t v = next(&state);
			memcpy(page + i, &v, 8);
		}
		return;
	}
	for (size_t i = 0; i < page_bytes;) {
		const char *w = words[next(&state) % (sizeof(words) / sizeof(words[0]))];
		for (size_t j = 0; w[j] && i < page_bytes; j++)
			page[i++] = w[j];
		if (i < page_bytes)
			page[i++] = ' ';
	}
}

int main(int argc, char **argv)
{
	long page_size = sysconf(_SC_PAGESIZE);
	size_t pages, stride;
	unsigned char *mem, *expect;
	sigset_t set;
	int sig;

	if (page_size <= 0)
		return 2;
	page_bytes = (size_t)page_size;
	pages = ((size_t)(argc > 1 ? atol(argv[1]) : 1024) << 20) / page_bytes;
	stride = argc > 2 && strcmp(argv[2], "sparse") == 0 ? 8 : 1;
	mem = mmap(NULL, pages * stride * page_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	expect = malloc(page_bytes);
	if (mem == MAP_FAILED || !expect)
		return 2;
	for (size_t p = 0; p < pages; p++)
		make_page(mem + p * stride * page_bytes, p);
	if (argc > 2 && strcmp(argv[2], "send") == 0) {
		char go;
		if (write(0, "r", 1) != 1 || read(0, &go, 1) != 1)
			return 2;
		for (size_t done = 0; done < pages * page_bytes;) {
			ssize_t n = write(0, mem + done, pages * page_bytes - done);
			if (n <= 0)
				return 2;
			done += n;
		}
		return 0;
	}
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	printf("ready %d\n", getpid());
	fflush(stdout);
	if (argc > 2 && strcmp(argv[2], "ping") == 0) {
		char c;
		while (read(0, &c, 1) == 1 && c != 'v')
			if (write(1, &c, 1) != 1)
				return 2;
	} else {
		sigwait(&set, &sig);
	}
	for (size_t p = 0; p < pages * stride; p++) {
		if (p % stride)
			memset(expect, 0, page_bytes);
		else
			make_page(expect, p / stride);
		if (memcmp(expect, mem + p * page_bytes, page_bytes)) {
			fprintf(stderr, "page %zu differs\n", p);
			return 1;
		}
	}
	return 0;
}
