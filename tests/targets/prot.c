/*
 * prot: private anonymous regions filled, then protected read-only,
 * PROT_NONE and read+exec, beside an ordinary read-write one. On SIGUSR1
 * it checks each protection is unchanged (in /proc/self/maps), then makes
 * them readable and checks the bytes.
 */
#include "common.h"

#define REGION (4u << 20)

static const struct {
	int prot;
	const char *perms;
} kinds[] = {
	{PROT_READ | PROT_WRITE, "rw-p"},
	{PROT_READ, "r--p"},
	{PROT_NONE, "---p"},
	{PROT_READ | PROT_EXEC, "r-xp"},
};
#define KINDS (sizeof(kinds) / sizeof(kinds[0]))

static int has_perms(void *addr, const char *perms)
{
	char line[512];
	unsigned long start, end;
	char found[8];
	FILE *maps = fopen("/proc/self/maps", "r");
	int ok = 0;

	while (fgets(line, sizeof(line), maps))
		if (sscanf(line, "%lx-%lx %7s", &start, &end, found) == 3 &&
		    start <= (unsigned long)addr && (unsigned long)addr < end)
			ok = strcmp(found, perms) == 0;
	fclose(maps);
	return ok;
}

int main(void)
{
	uint64_t *regions[KINDS];
	size_t page = page_size();
	sigset_t set;
	int ok = 1;

	for (unsigned i = 0; i < KINDS; i++) {
		/* a guard page between regions keeps each its own mapping */
		char *p = map_anon(REGION + page);
		munmap(p + REGION, page);
		regions[i] = (uint64_t *)p;
		fill(regions[i], REGION, 20 + i);
		mprotect(regions[i], REGION, kinds[i].prot);
	}
	block_usr1(&set);
	announce_and_wait(&set);
	ok &= state_intact(1);
	for (unsigned i = 0; i < KINDS; i++) {
		if (!has_perms(regions[i], kinds[i].perms)) {
			fprintf(stderr, "region %u lost its protection %s\n", i, kinds[i].perms);
			ok = 0;
		}
		mprotect(regions[i], REGION, PROT_READ);
		ok &= check(kinds[i].perms, regions[i], REGION, 20 + i);
	}
	return ok ? 0 : 1;
}
