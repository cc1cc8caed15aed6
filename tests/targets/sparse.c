/*
 * sparse [fork]: mappings where few pages are present, in several shapes,
 * each present page patterned and every other one never touched:
 *   stride    64 MiB, every 8th page
 *   runs      16 MiB, alternating runs of 1 to 5 pages present and absent
 *   edges     8 mappings of 16 pages apart by PROT_NONE pages, the first
 *             and last page of each present
 * With "fork", 4 pages in each 8 of stride (one before and one after the
 * 8th) are written before a fork: the child keeps them mapped, so they
 * stay in memory, between pages memcr drops. On SIGUSR1 every page is
 * checked: the pattern where it was written, zeros elsewhere.
 */
#include <sys/prctl.h>
#include <sys/wait.h>
#include "common.h"

#define STRIDE_BYTES (64u << 20)
#define RUNS_BYTES (16u << 20)
#define EDGE_MAPS 8
#define EDGE_PAGES 16

struct area {
	const char *name;
	unsigned char *mem;
	size_t pages;
	int (*present)(size_t page);
	int seed;
};

static int forked;

static int stride_present(size_t p)
{
	return p % 8 == 0 || (forked && (p % 8 == 1 || p % 8 == 7 || p % 8 == 3 || p % 8 == 4));
}

/* run lengths 1..5 present then 1..5 absent, from the page index: irregular, reproducible */
static int runs_present(size_t p)
{
	size_t at = 0;

	for (size_t i = 0;; i++) {
		size_t len = 1 + mix(i) % 5;
		if (p < at + len)
			return i % 2 == 0;
		at += len;
	}
}

static int edge_present(size_t p)
{
	return p == 0 || p == EDGE_PAGES - 1;
}

static int verify(const struct area *a, size_t page_bytes)
{
	static const uint64_t zeros[MAX_PAGE_SIZE / 8];

	for (size_t p = 0; p < a->pages; p++) {
		uint64_t *page = (uint64_t *)(a->mem + p * page_bytes);
		if (a->present(p) ? !same(page, page_bytes, ((uint64_t)a->seed << 40) + p * page_bytes)
				  : memcmp(page, zeros, page_bytes) != 0) {
			fprintf(stderr, "%s: page %zu is wrong\n", a->name, p);
			return 0;
		}
	}
	return 1;
}

int main(int argc, char **argv)
{
	size_t page_bytes = page_size();
	struct area areas[2 + EDGE_MAPS];
	unsigned char *edges;
	sigset_t set;
	pid_t child = -1;
	int ok = 1, n = 0;

	forked = argc > 1 && strcmp(argv[1], "fork") == 0;
	areas[n++] = (struct area){"stride", map_anon(STRIDE_BYTES), STRIDE_BYTES / page_bytes, stride_present, 1};
	areas[n++] = (struct area){"runs", map_anon(RUNS_BYTES), RUNS_BYTES / page_bytes, runs_present, 2};
	edges = map_anon(EDGE_MAPS * (EDGE_PAGES + 1) * page_bytes);
	for (int i = 0; i < EDGE_MAPS; i++) {
		unsigned char *mem = edges + i * (EDGE_PAGES + 1) * page_bytes;
		/* a PROT_NONE page after each keeps the mappings apart */
		mprotect(mem + EDGE_PAGES * page_bytes, page_bytes, PROT_NONE);
		areas[n++] = (struct area){"edges", mem, EDGE_PAGES, edge_present, 3 + i};
	}
	for (int i = 0; i < n; i++)
		for (size_t p = 0; p < areas[i].pages; p++)
			if (areas[i].present(p))
				fill((uint64_t *)(areas[i].mem + p * page_bytes), page_bytes,
				     ((uint64_t)areas[i].seed << 40) + p * page_bytes);
	block_usr1(&set);
	if (forked) {
		child = fork();
		if (child == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			for (;;)
				pause();
		}
		/* the parent's own copies of the 8th pages: only they are its alone (volatile: a write the
		 * compiler may not drop, though it leaves the bytes as they were) */
		for (size_t p = 0; p < areas[0].pages; p += 8) {
			volatile uint64_t *page = (volatile uint64_t *)(areas[0].mem + p * page_bytes);
			page[0] = ~page[0];
			page[0] = ~page[0];
		}
	}
	announce_and_wait(&set);
	for (int i = 0; i < n; i++)
		ok &= verify(&areas[i], page_bytes);
	if (child > 0) {
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
	}
	return ok ? 0 : 1;
}
