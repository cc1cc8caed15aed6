/*
 * shapes SPEC...: one mapping per SPEC, written in a pattern, then
 * protected; on SIGUSR1 it checks its state, then every page: a written
 * page holds its pattern, an unwritten one is zero (anonymous) or the
 * file's own bytes (private file mapping, whose written pages are
 * copy-on-write copies). Prints "shape I ADDRESS" for each before "ready".
 *
 * SPEC is KIND:PAGES:PATTERN:PROT:THP with
 *   KIND     anon | file
 *   PATTERN  all | every-N | runs-LEN-GAP | random-SEED-PERCENT | guard-N
 *            (guard-N: every page written, then every Nth made a guard
 *            page with MADV_GUARD_INSTALL, which must still be one after)
 *   PROT     rw | r | rx | none
 *   THP      huge | nohuge | default
 */
#include "common.h"

#define MAX_SHAPES 32

struct shape {
	char kind[8], pattern[32], prot[8], thp[8];
	size_t pages;
	uint64_t *mem;
	unsigned char *written;
	int fd;
};

static struct shape shapes[MAX_SHAPES];
static size_t page_bytes; /* the kernel's page size: SPEC's PAGES count these */

/* the page's offset in bytes in the middle: with any page size no two pages' words share a seed */
static uint64_t page_seed(int shape, size_t page, int file)
{
	return ((uint64_t)(shape + 1) << 40) ^ ((uint64_t)page * page_bytes) ^ (file ? 1ULL << 60 : 0);
}

#define MADV_GUARD_INSTALL 102
#define PM_GUARD (1ULL << 58)

static size_t guard_every(const char *pattern)
{
	unsigned long n;

	return sscanf(pattern, "guard-%lu", &n) == 1 ? n : 0;
}

static int written(const char *pattern, size_t page)
{
	unsigned long a, b, c;

	if (strcmp(pattern, "all") == 0 || guard_every(pattern))
		return 1;
	if (sscanf(pattern, "every-%lu", &a) == 1)
		return page % a == 0;
	if (sscanf(pattern, "runs-%lu-%lu", &a, &b) == 2)
		return page % (a + b) < a;
	if (sscanf(pattern, "random-%lu-%lu", &a, &b) == 2) {
		c = mix(a * 1000003 + page) % 100;
		return c < b;
	}
	fprintf(stderr, "unknown pattern %s\n", pattern);
	exit(2);
}

static int prot_of(const char *prot)
{
	if (strcmp(prot, "rw") == 0)
		return PROT_READ | PROT_WRITE;
	if (strcmp(prot, "r") == 0)
		return PROT_READ;
	if (strcmp(prot, "rx") == 0)
		return PROT_READ | PROT_EXEC;
	if (strcmp(prot, "none") == 0)
		return PROT_NONE;
	fprintf(stderr, "unknown protection %s\n", prot);
	exit(2);
}

static void make(int i, struct shape *s)
{
	size_t bytes = s->pages * page_bytes;
	int file = strcmp(s->kind, "file") == 0;
	uint64_t *mem;

	if (file) {
		char path[] = "/tmp/memcr-shape-XXXXXX";
		uint64_t *page = malloc(page_bytes);

		s->fd = mkstemp(path);
		unlink(path);
		for (size_t p = 0; p < s->pages; p++) {
			fill(page, page_bytes, page_seed(i, p, 1));
			if (write(s->fd, page, page_bytes) != (ssize_t)page_bytes) {
				perror("write");
				exit(2);
			}
		}
		free(page);
		mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, s->fd, 0);
	} else {
		mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	}
	if (mem == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	if (strcmp(s->thp, "huge") == 0)
		madvise(mem, bytes, MADV_HUGEPAGE);
	else if (strcmp(s->thp, "nohuge") == 0)
		madvise(mem, bytes, MADV_NOHUGEPAGE);
	s->written = calloc(s->pages, 1);
	for (size_t p = 0; p < s->pages; p++)
		if (written(s->pattern, p)) {
			s->written[p] = 1;
			fill(mem + p * (page_bytes / 8), page_bytes, page_seed(i, p, 0));
		}
	if (guard_every(s->pattern))
		for (size_t p = 0; p < s->pages; p += guard_every(s->pattern)) {
			s->written[p] = 2;
			if (madvise(mem + p * (page_bytes / 8), page_bytes, MADV_GUARD_INSTALL) != 0) {
				perror("madvise(MADV_GUARD_INSTALL)");
				exit(3);
			}
		}
	if (mprotect(mem, bytes, prot_of(s->prot)) != 0) {
		perror("mprotect");
		exit(2);
	}
	s->mem = mem;
}

static int is_guard(const void *page)
{
	static int fd = -1;
	uint64_t entry = 0;

	if (fd < 0)
		fd = open("/proc/self/pagemap", O_RDONLY);
	if (pread(fd, &entry, 8, (off_t)((uintptr_t)page / page_bytes * 8)) != 8)
		return 0;
	return (entry & PM_GUARD) != 0;
}

static int verify(int i, struct shape *s)
{
	int file = strcmp(s->kind, "file") == 0;

	mprotect(s->mem, s->pages * page_bytes, PROT_READ);
	for (size_t p = 0; p < s->pages; p++) {
		uint64_t *page = s->mem + p * (page_bytes / 8);
		int good;

		if (s->written[p] == 2)
			good = is_guard(page);
		else if (s->written[p])
			good = same(page, page_bytes, page_seed(i, p, 0));
		else if (file)
			good = same(page, page_bytes, page_seed(i, p, 1));
		else {
			good = 1;
			for (size_t w = 0; w < page_bytes / 8; w++)
				good &= page[w] == 0;
		}
		if (!good) {
			fprintf(stderr, "shape %d (%s:%zu:%s): page %zu is wrong\n", i, s->kind, s->pages,
				s->pattern, p);
			return 0;
		}
	}
	return 1;
}

int main(int argc, char **argv)
{
	int n = argc - 1;
	sigset_t set;
	int ok = 1;

	page_bytes = page_size();
	if (n > MAX_SHAPES) {
		fprintf(stderr, "at most %d shapes\n", MAX_SHAPES);
		return 2;
	}
	for (int i = 0; i < n; i++) {
		struct shape *s = &shapes[i];
		char *spec = argv[i + 1];

		if (sscanf(spec, "%7[^:]:%zu:%31[^:]:%7[^:]:%7s", s->kind, &s->pages, s->pattern, s->prot, s->thp) != 5) {
			fprintf(stderr, "bad shape %s\n", spec);
			return 2;
		}
		make(i, s);
		/* unbuffered: stdout's buffer is set up by announce() */
		dprintf(1, "shape %d %lx\n", i, (unsigned long)s->mem);
	}
	block_usr1(&set);
	announce_and_wait(&set);
	ok &= state_intact(1);
	for (int i = 0; i < n; i++)
		ok &= verify(i, &shapes[i]);
	return ok ? 0 : 1;
}
