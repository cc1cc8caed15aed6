/*
 * The floor of a re-park's writes (bench/incremental.py):
 * `scatter FILE SIZE_MIB COUNT` fills SIZE_MIB MiB of its memory, writes it
 * whole into FILE and flushes it to disk, so that its pages are clean in
 * the page cache as a kept dump's are once written back. Then it times
 * COUNT pages of its memory chosen at random, each written with pwrite at
 * its own place in FILE (page p at p times the page size), in offset order
 * as memcr writes them, and prints the microseconds that took.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int by_value(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;

	return (x > y) - (x < y);
}

static double now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	size_t page, size, pages, count, *chosen;
	uint64_t state = 0x9e3779b97f4a7c15ULL;
	unsigned char *mem;
	double started;
	int fd;

	if (argc != 4)
		return 2;
	page = (size_t)sysconf(_SC_PAGESIZE);
	size = (size_t)atol(argv[2]) << 20;
	pages = size / page;
	count = (size_t)atol(argv[3]);
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	chosen = calloc(count ? count : 1, sizeof(*chosen));
	fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (mem == MAP_FAILED || !chosen || fd < 0 || count > pages)
		return 2;
	for (size_t i = 0; i < size; i += 8)
		memcpy(mem + i, &i, 8);
	for (size_t done = 0; done < size;) {
		ssize_t n = pwrite(fd, mem + done, size - done < (1 << 20) ? size - done : 1 << 20, done);
		if (n <= 0)
			return 2;
		done += (size_t)n;
	}
	if (fdatasync(fd))
		return 2;
	for (size_t i = 0; i < count; i++) {
		state ^= state << 13;
		state ^= state >> 7;
		state ^= state << 17;
		chosen[i] = state % pages;
	}
	qsort(chosen, count, sizeof(*chosen), by_value);
	started = now_us();
	for (size_t i = 0; i < count; i++)
		if (pwrite(fd, mem + chosen[i] * page, page, (off_t)(chosen[i] * page)) != (ssize_t)page)
			return 2;
	printf("%.0f\n", now_us() - started);
	return 0;
}
