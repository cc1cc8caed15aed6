/*
 * maplimit MIB: MIB MiB of patterned anonymous memory, then one-page
 * mappings until the kernel maps no more (vm.max_map_count is passed):
 * the process can then get no new mapping, as memcr's parasite would need.
 * Neighbours alternate their protection so that none merges with another.
 * On SIGUSR1 it checks its memory, its state and its mappings' count.
 */
#include <errno.h>
#include "common.h"

int main(int argc, char **argv)
{
	size_t bytes = (size_t)(argc > 1 ? atol(argv[1]) : 8) << 20;
	uint64_t *region = map_anon(bytes);
	sigset_t set;
	long maps = 0;

	fill(region, bytes, 1);
	block_usr1(&set);
	for (;;) {
		void *p = mmap(NULL, page_size(), maps % 2 ? PROT_READ : PROT_NONE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED) {
			if (errno != ENOMEM) {
				perror("mmap");
				return 2;
			}
			break;
		}
		maps++;
	}
	announce_and_wait(&set);
	return check("region", region, bytes, 1) && state_intact(1) ? 0 : 1;
}
