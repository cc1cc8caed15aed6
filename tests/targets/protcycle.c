/*
 * protcycle PAGES MAPS [huge]: review32b's target for incremental re-parks across
 * protection changes. A region of PAGES patterned pages and MAPS small
 * mappings (1 to 3 pages, protections alternating so that none merge).
 * Commands on stdin, one a line, each answered "ok":
 *   prot none|ro|rw   mprotect the region
 *   write N           (region read-write) a new pattern on N pages at random
 *   file              map a private file mapping over the region's first
 *                     quarter (MAP_FIXED), pattern written into it
 *   check             make everything readable, check, put the protections
 *                     back: "ok", or "bad WHAT INDEX"
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include "common.h"

static size_t page, pages, maps;
static unsigned char *region;
static uint64_t *keys, next_key = 1, rng = 88172645463325252ULL;
static unsigned char **small;
static size_t *small_pages;
static int prot_now = PROT_READ | PROT_WRITE;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

int main(int argc, char **argv)
{
	char line[256];

	page = page_size();
	pages = strtoul(argv[1], NULL, 0);
	maps = strtoul(argv[2], NULL, 0);
	region = mmap(NULL, pages * page + (2u << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region != MAP_FAILED && argc > 3) { /* huge: 2 MiB aligned, transparent huge pages asked for */
		region += -(uintptr_t)region & ((2u << 20) - 1);
		madvise(region, pages * page, MADV_HUGEPAGE);
	}
	keys = calloc(pages, sizeof(*keys));
	small = calloc(maps, sizeof(*small));
	small_pages = calloc(maps, sizeof(*small_pages));
	if (region == MAP_FAILED || !keys || !small || !small_pages)
		return 2;
	for (size_t i = 0; i < pages; i++) {
		keys[i] = next_key++ * 0x100000001ULL;
		fill((uint64_t *)(region + i * page), page, keys[i]);
	}
	for (size_t m = 0; m < maps; m++) {
		small_pages[m] = 1 + m % 3;
		small[m] = mmap(NULL, small_pages[m] * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (small[m] == MAP_FAILED)
			return 2;
		fill((uint64_t *)small[m], small_pages[m] * page, 1000000 + m);
		if (m % 2 && mprotect(small[m], small_pages[m] * page, PROT_READ))
			return 2;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "prot ", 5)) {
			prot_now = line[5] == 'n' ? PROT_NONE : line[5] == 'r' && line[6] == 'o' ? PROT_READ
											: PROT_READ | PROT_WRITE;
			if (mprotect(region, pages * page, prot_now))
				return 3;
		} else if (!strncmp(line, "poke ", 5)) { /* one byte in each of N pages at random */
			size_t n = strtoul(line + 5, NULL, 0);
			for (size_t k = 0; k < n; k++) {
				size_t i = rnd() % pages;
				keys[i] = next_key++ * 0x100000001ULL;
				fill((uint64_t *)(region + i * page), page, keys[i]);
			}
		} else if (!strncmp(line, "thp", 3)) {
			FILE *f = fopen("/proc/self/smaps_rollup", "r");
			char l2[256];
			while (f && fgets(l2, sizeof(l2), f))
				if (!strncmp(l2, "AnonHugePages", 13))
					fputs(l2, stderr);
			if (f)
				fclose(f);
		} else if (!strncmp(line, "write ", 6)) {
			size_t n = strtoul(line + 6, NULL, 0);
			for (size_t k = 0; k < n; k++) {
				size_t i = rnd() % pages;
				keys[i] = next_key++ * 0x100000001ULL;
				fill((uint64_t *)(region + i * page), page, keys[i]);
			}
		} else if (!strncmp(line, "file", 4)) {
			char name[] = "/tmp/protcycle-XXXXXX";
			int fd = mkstemp(name);
			size_t n = pages / 4;
			if (fd < 0 || ftruncate(fd, n * page))
				return 4;
			unlink(name);
			if (mmap(region, n * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED)
				return 4;
			close(fd);
			for (size_t i = 0; i < n; i++) {
				keys[i] = next_key++ * 0x100000001ULL;
				fill((uint64_t *)(region + i * page), page, keys[i]);
			}
		} else if (!strncmp(line, "check", 5)) {
			const char *bad = NULL;
			size_t where = 0;
			mprotect(region, pages * page, PROT_READ | PROT_WRITE);
			for (size_t i = 0; i < pages && !bad; i++)
				if (!same((uint64_t *)(region + i * page), page, keys[i]))
					bad = "region", where = i;
			for (size_t m = 0; m < maps && !bad; m++) {
				mprotect(small[m], small_pages[m] * page, PROT_READ);
				if (!same((uint64_t *)small[m], small_pages[m] * page, 1000000 + m))
					bad = "small", where = m;
				if (m % 2 == 0)
					mprotect(small[m], small_pages[m] * page, PROT_READ | PROT_WRITE);
			}
			mprotect(region, pages * page, prot_now);
			if (bad) {
				printf("bad %s %zu\n", bad, where);
				fflush(stdout);
				continue;
			}
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		}
		printf("ok\n");
		fflush(stdout);
	}
	return 0;
}
