/*
 * churn MIB SEED: a target that writes all through its park, for the
 * incremental re-park's copy of what changed while it still runs
 * (docs/incremental.md). MIB MiB of patterned pages; a writer thread
 * writes them one at a time: its nth write fills page mix(SEED, n) with
 * the pattern of key n. Which page holds which key follows from the count
 * of writes alone, so a check replays them and finds any write memcr
 * lost, however consistently (the page and the count both live in memory
 * memcr parks). Commands on stdin, one a line:
 *
 *   go PACE [toggle]  start writing, waiting about PACE microseconds after
 *                each write (0: as fast as it can); with toggle, the MiB
 *                around each page is made PROT_NONE for those microseconds
 *                before the page is written (and read-write again); with
 *                remap, a new page is mapped over it first (MAP_FIXED:
 *                then the check leaves the memory map and VmFlags out);
 *                print "going"
 *   count        print "count N": the writes done so far
 *   check C      stop writing (the write under way is finished), check
 *                every page against the replay and its own state (signal
 *                sets, dispositions, threads, memory map and VmFlags, "uw"
 *                aside), print "done C N" (or "bad C ..." and exit 1)
 *   quit         exit 0
 */
#define _GNU_SOURCE
#include <time.h>
#include "common.h"
#include "watched.h"

#define MIB (1u << 20)

static size_t page_bytes, pages;
static uint64_t *region, seed, *expected;
static volatile uint64_t writes; /* done: page and count are both written before the next begins */
static volatile int stopping;
static long pace_us;
static int toggling, remapping;

static size_t page_of(uint64_t n)
{
	return mix(seed * 0x100000001ULL + n) % pages;
}

/* The nth write's key (n >= 1), or page i's before any write: two streams that never meet. */
static uint64_t key_of(uint64_t n)
{
	return mix(seed ^ (n << 1));
}

static uint64_t first_key(size_t i)
{
	return mix(seed ^ ((uint64_t)i << 1 | 1));
}

static uint64_t *page_at(size_t page)
{
	return region + page * (page_bytes / 8);
}

static void *write_on(void *unused)
{
	(void)unused;
	while (!stopping) {
		uint64_t n = writes + 1, *page = page_at(page_of(n));
		char *mib = (char *)region + ((char *)page - (char *)region) / MIB * MIB;
		struct timespec wait = {0, pace_us * 1000};

		if (toggling && mprotect(mib, MIB, PROT_NONE) != 0)
			exit(2);
		if (pace_us)
			nanosleep(&wait, NULL);
		if (toggling && mprotect(mib, MIB, PROT_READ | PROT_WRITE) != 0)
			exit(2);
		if (remapping && mmap(page, page_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
				      0) != page)
			exit(2);
		fill(page, page_bytes, key_of(n));
		writes = n;
	}
	return NULL;
}

/* Every page as the replay of the first `writes` writes leaves it; the first that is not, or -1. */
static long first_wrong(void)
{
	for (size_t i = 0; i < pages; i++)
		expected[i] = first_key(i);
	for (uint64_t n = 1; n <= writes; n++)
		expected[page_of(n)] = key_of(n);
	for (size_t i = 0; i < pages; i++)
		if (!same(page_at(i), page_bytes, expected[i]))
			return (long)i;
	return -1;
}

static void go(const char *line)
{
	sscanf(line, "go %ld", &pace_us);
	toggling = strstr(line, "toggle") != NULL;
	remapping = strstr(line, "remap") != NULL;
}

static int maps_kept(void)
{
	return !remapping;
}

int main(int argc, char **argv)
{
	struct worker worker = {write_on, go, first_wrong, maps_kept, &writes, &stopping};

	if (argc != 3) {
		fprintf(stderr, "usage: churn MIB SEED\n");
		return 2;
	}
	page_bytes = page_size();
	pages = (size_t)atol(argv[1]) * (1u << 20) / page_bytes;
	seed = (uint64_t)atoll(argv[2]);
	region = map_anon(pages * page_bytes);
	expected = calloc(pages, sizeof(*expected));
	for (size_t i = 0; i < pages; i++)
		fill(page_at(i), page_bytes, first_key(i));
	return serve_worker(&worker);
}
