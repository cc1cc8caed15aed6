/*
 * remapping: 16 MiB patterned, and a thread that maps one more PROT_NONE
 * page every few microseconds, so the memory map changes between any two
 * reads of it: memcr cannot trust flags it read before the freeze.
 */
#include <pthread.h>
#include <time.h>

#include "common.h"

static void *grow(void *arg)
{
	const struct timespec pause = {0, 10000};
	size_t page = page_size();

	(void)arg;
	for (;;) {
		if (mmap(NULL, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) == MAP_FAILED) {
			perror("mmap");
			exit(2);
		}
		nanosleep(&pause, NULL);
	}
	return NULL;
}

int main(void)
{
	size_t bytes = 16u << 20;
	uint64_t *region = map_anon(bytes);
	pthread_t thread;
	sigset_t set;

	fill(region, bytes, 31);
	block_usr1(&set);
	if (pthread_create(&thread, NULL, grow, NULL) != 0)
		return 2;
	announce_and_wait(&set);
	return state_intact(0) & check("region", region, bytes, 31) ? 0 : 1;
}
