/*
 * rewriter MIB SEED: the incremental re-park's zdtm target. MIB MiB of
 * patterned memory, each page's pattern named by a key it keeps in its
 * heap (0: the page must read zeros). Between parks it takes commands on
 * stdin, one a line:
 *
 *   cycle N PERCENT OP [RUN]
 *                        check every page and its own state (signal sets,
 *                        dispositions, seccomp, threads, memory map and
 *                        VmFlags as they were before the park, "uw" aside:
 *                        memcr's write tracking shows there), then write a
 *                        new pattern over PERCENT % of the pages, chosen at
 *                        random (in runs of RUN pages, 1 by default: a heap
 *                        written in places), and do OP to a random part of
 *                        the region:
 *     none               nothing more
 *     same               write each byte of 64 pages back as it is (written,
 *                        unchanged)
 *     dontneed           MADV_DONTNEED 64 pages (they read zeros)
 *     mapover            map 1 MiB anew over the region (MAP_FIXED), write half of it
 *     swap               swap two 1 MiB parts with mremap (each page takes
 *                        the other's pattern to the other's address)
 *     away               move 1 MiB away with mremap and back
 *     mprotect           protect 1 MiB read-only, read it, then read-write again
 *     fork               a child writes its copy of 64 pages and exits
 *     grow               grow the heap by 1 MiB (brk) and fill it
 *     reuse              give 1 MiB back (munmap) and map it again at the
 *                        same address with the same pattern
 *   then print "done N" (or "bad N ..." and exit 1 when a check failed),
 *   having recorded its state for the next check;
 *   write PERCENT [RUN]  write a new pattern over PERCENT % of the pages, chosen at
 *                        random (in runs of RUN pages), and print "wrote MICROSECONDS" (the bench's figure
 *                        of what tracking costs the app), checking nothing;
 *   giveback MIB KEEP    give back (MADV_DONTNEED) each of the first MIB MiB of
 *                        the region but its first KEEP pages, print "gave";
 *   quit                 check as above and exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/wait.h>
#include <time.h>
#include "common.h"
#include "watched.h"

#define CHUNK (1u << 20)
#define HEAP_PAGES_MAX 4096

static size_t page_bytes, words_per_page, pages, chunk_pages;
static uint64_t *region, *keys, rng;
static uint64_t *heap_area, heap_keys[HEAP_PAGES_MAX];
static size_t heap_pages;
static uint64_t next_key = 1;
static char stdin_buffer[4096]; /* stdio's own would come from the heap after the state is taken */

static uint64_t next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint64_t *page_at(uint64_t *base, size_t page)
{
	return base + page * words_per_page;
}

static void write_page(uint64_t *at, uint64_t *key)
{
	*key = next_key++ * 0x100000001ULL;
	fill(at, page_bytes, *key);
}

static int page_ok(const uint64_t *at, uint64_t key)
{
	if (key)
		return same(at, page_bytes, key);
	for (size_t i = 0; i < words_per_page; i++)
		if (at[i])
			return 0;
	return 1;
}

static int memory_ok(long cycle)
{
	for (size_t i = 0; i < pages; i++)
		if (!page_ok(page_at(region, i), keys[i])) {
			printf("bad %ld region page %zu\n", cycle, i);
			return 0;
		}
	for (size_t i = 0; i < heap_pages; i++)
		if (!page_ok(page_at(heap_area, i), heap_keys[i])) {
			printf("bad %ld heap page %zu\n", cycle, i);
			return 0;
		}
	return 1;
}

static void must(int ok, const char *what)
{
	if (!ok) {
		fprintf(stderr, "%s: %s\n", what, strerror(errno));
		exit(2);
	}
}

static size_t random_chunk(void)
{
	return (next_random() % (pages / chunk_pages)) * chunk_pages;
}

static void operate(const char *op)
{
	size_t a = random_chunk(), b = random_chunk();
	uint64_t *at = page_at(region, a);

	if (strcmp(op, "same") == 0) {
		for (int i = 0; i < 64; i++) {
			volatile uint64_t *p = page_at(region, next_random() % pages);
			for (size_t w = 0; w < words_per_page; w++)
				p[w] = p[w];
		}
	} else if (strcmp(op, "dontneed") == 0) {
		for (int i = 0; i < 64; i++) {
			size_t page = next_random() % pages;
			must(madvise(page_at(region, page), page_bytes, MADV_DONTNEED) == 0, "madvise");
			keys[page] = 0;
		}
	} else if (strcmp(op, "mapover") == 0) {
		must(mmap(at, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == at, "mmap");
		for (size_t i = 0; i < chunk_pages; i++) {
			keys[a + i] = 0;
			if (i % 2)
				write_page(page_at(region, a + i), &keys[a + i]);
		}
	} else if (strcmp(op, "swap") == 0) {
		uint64_t *other = page_at(region, b), *spare = map_anon(CHUNK), saved[256];
		if (a == b || chunk_pages > 256)
			return;
		must(mremap(at, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, spare) == spare, "mremap");
		must(mremap(other, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, at) == at, "mremap");
		must(mremap(spare, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, other) == other, "mremap");
		memcpy(saved, &keys[a], chunk_pages * 8);
		memcpy(&keys[a], &keys[b], chunk_pages * 8);
		memcpy(&keys[b], saved, chunk_pages * 8);
	} else if (strcmp(op, "away") == 0) {
		uint64_t *spare = map_anon(CHUNK);
		must(mremap(at, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, spare) == spare, "mremap");
		must(mremap(spare, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, at) == at, "mremap");
	} else if (strcmp(op, "mprotect") == 0) {
		volatile uint64_t sum = 0;
		must(mprotect(at, CHUNK, PROT_READ) == 0, "mprotect");
		for (size_t i = 0; i < chunk_pages; i++)
			sum += *page_at(region, a + i);
		must(mprotect(at, CHUNK, PROT_READ | PROT_WRITE) == 0, "mprotect");
	} else if (strcmp(op, "fork") == 0) {
		pid_t child = fork();
		int status;
		must(child >= 0, "fork");
		if (child == 0) {
			for (int i = 0; i < 64; i++)
				memset(page_at(region, next_random() % pages), 0x5a, page_bytes);
			_exit(0);
		}
		must(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0, "child");
	} else if (strcmp(op, "grow") == 0) {
		size_t more = chunk_pages;
		uint64_t *top = sbrk(0);
		if (heap_pages + more > HEAP_PAGES_MAX)
			return;
		if (!heap_area) {
			/* on a page boundary, so that the heap pages hold nothing else */
			uintptr_t aligned = ((uintptr_t)top + page_bytes - 1) & ~(uintptr_t)(page_bytes - 1);
			must(sbrk((intptr_t)(aligned - (uintptr_t)top)) != (void *)-1, "sbrk");
			heap_area = (uint64_t *)aligned;
		}
		must(sbrk((intptr_t)(more * page_bytes)) != (void *)-1, "sbrk");
		for (size_t i = 0; i < more; i++)
			write_page(page_at(heap_area, heap_pages + i), &heap_keys[heap_pages + i]);
		heap_pages += more;
	} else if (strcmp(op, "reuse") == 0) {
		must(munmap(at, CHUNK) == 0, "munmap");
		must(mmap(at, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == at, "mmap");
		for (size_t i = 0; i < chunk_pages; i++)
			if (keys[a + i])
				fill(page_at(region, a + i), page_bytes, keys[a + i]);
	} else if (strcmp(op, "none") != 0) {
		fprintf(stderr, "unknown op %s\n", op);
		exit(2);
	}
}

static void rewrite(long percent, long run)
{
	if (run < 1 || (size_t)run > pages)
		run = 1;
	for (size_t n = pages * (size_t)percent / 100 / (size_t)run; n; n--) {
		size_t first = next_random() % (pages - (size_t)run + 1);
		for (size_t page = first; page < first + (size_t)run; page++)
			write_page(page_at(region, page), &keys[page]);
	}
}

int main(int argc, char **argv)
{
	char line[256], op[32];
	long cycle, percent, run;

	if (argc != 3) {
		fprintf(stderr, "usage: rewriter MIB SEED\n");
		return 2;
	}
	page_bytes = page_size();
	words_per_page = page_bytes / 8;
	pages = (size_t)atol(argv[1]) * (1u << 20) / page_bytes;
	chunk_pages = CHUNK / page_bytes;
	rng = (uint64_t)atoll(argv[2]) | 1;
	region = map_anon(pages * page_bytes);
	keys = calloc(pages, sizeof(*keys));
	for (size_t i = 0; i < pages; i++)
		write_page(page_at(region, i), &keys[i]);
	setvbuf(stdin, stdin_buffer, _IOLBF, sizeof(stdin_buffer));
	announce();
	while (fgets(line, sizeof(line), stdin)) {
		int quit = strncmp(line, "quit", 4) == 0;
		struct timespec t0, t1;

		run = 1;
		if (sscanf(line, "write %ld %ld", &percent, &run) >= 1) {
			clock_gettime(CLOCK_MONOTONIC, &t0);
			rewrite(percent, run);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			printf("wrote %ld\n", (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000);
			fflush(stdout);
			continue;
		}

		if (sscanf(line, "giveback %ld %ld", &percent, &run) == 2) {
			for (size_t mib = 0; mib < (size_t)percent && (mib + 1) * chunk_pages <= pages; mib++) {
				size_t keep = (size_t)run < chunk_pages ? (size_t)run : chunk_pages;
				size_t first = mib * chunk_pages + keep;
				size_t count = chunk_pages - keep;
				must(madvise(page_at(region, first), count * page_bytes, MADV_DONTNEED) == 0, "madvise");
				memset(&keys[first], 0, count * sizeof(*keys));
			}
			printf("gave\n");
			fflush(stdout);
			continue;
		}
		if (!quit && sscanf(line, "cycle %ld %ld %31s %ld", &cycle, &percent, op, &run) < 3) {
			fprintf(stderr, "bad command: %s", line);
			return 2;
		}
		if (quit)
			cycle = -1;
		if (!memory_ok(cycle) || !watched_state_intact(1)) {
			if (!quit)
				printf("bad %ld state\n", cycle);
			fflush(stdout);
			return 1;
		}
		if (quit)
			return 0;
		rewrite(percent, run);
		operate(op);
		take_state(&state_before);
		printf("done %ld\n", cycle);
		fflush(stdout);
	}
	return 3;
}
