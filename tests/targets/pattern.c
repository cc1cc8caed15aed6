/*
 * pattern MIB [THREADS]: MIB MiB of anonymous memory plus heap, stack,
 * .data and .bss, all patterned. Each of THREADS workers owns 4 MiB that it
 * rewrites in passes for the whole life of the process; before rewriting a
 * page it checks the page still holds what it wrote in the previous pass,
 * so a lost or zeroed page is caught even though the workers run on.
 * "ready" comes only after every worker finished its first pass: from then
 * on every worker page is populated and checked on the next pass.
 */
#include <pthread.h>
#include <stdatomic.h>
#include "common.h"

#define WORKER_BYTES (4u << 20)

static uint64_t data_array[8192] = {1};
static uint64_t bss_array[8192];
static atomic_int stop, corrupt, primed;

struct worker {
	pthread_t thread;
	int id;
	uint64_t *mem;
	uint64_t pass;
};

static void *work(void *arg)
{
	struct worker *w = arg;
	size_t page_bytes = page_size();
	size_t words_per_page = page_bytes / 8;

	while (!atomic_load(&stop)) {
		for (size_t p = 0; p < WORKER_BYTES / page_bytes; p++) {
			uint64_t *page = w->mem + p * words_per_page;
			uint64_t seed = ((uint64_t)w->id << 48) ^ (p << 24);
			/* report only the first damage: stderr is a pipe nobody drains */
			if (w->pass && (page[0] != w->pass ||
					!same(page + 1, page_bytes - 8, seed + w->pass)) &&
			    !atomic_exchange(&corrupt, 1))
				fprintf(stderr, "worker %d: page %zu is not what it wrote in pass %llu\n",
					w->id, p, (unsigned long long)w->pass);
			page[0] = w->pass + 1;
			fill(page + 1, page_bytes - 8, seed + w->pass + 1);
		}
		if (w->pass++ == 0)
			atomic_fetch_add(&primed, 1);
		usleep(2000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	size_t bytes = (size_t)(argc > 1 ? atol(argv[1]) : 64) << 20;
	int nthreads = argc > 2 ? atoi(argv[2]) : 0;
	uint64_t stack_array[4096];
	uint64_t *region = map_anon(bytes);
	uint64_t *heap = malloc(1 << 20);
	struct worker *workers = calloc(nthreads ? nthreads : 1, sizeof(*workers));
	sigset_t set;
	int ok = 1;

	fill(region, bytes, 1);
	fill(heap, 1 << 20, 2);
	fill(stack_array, sizeof(stack_array), 3);
	fill(data_array, sizeof(data_array), 4);
	fill(bss_array, sizeof(bss_array), 5);
	remember_args(argc, argv);
	block_usr1(&set);
	for (int i = 0; i < nthreads; i++) {
		workers[i].id = i;
		workers[i].mem = map_anon(WORKER_BYTES);
		pthread_create(&workers[i].thread, NULL, work, &workers[i]);
	}
	while (atomic_load(&primed) < nthreads)
		usleep(1000);
	announce_and_wait(&set);
	ok &= state_intact(1);

	atomic_store(&stop, 1);
	for (int i = 0; i < nthreads; i++)
		pthread_join(workers[i].thread, NULL);
	ok &= !atomic_load(&corrupt);
	ok &= check("region", region, bytes, 1);
	ok &= check("heap", heap, 1 << 20, 2);
	ok &= check("stack", stack_array, sizeof(stack_array), 3);
	ok &= check("data", data_array, sizeof(data_array), 4);
	ok &= check("bss", bss_array, sizeof(bss_array), 5);
	ok &= check_args(argv);
	return ok ? 0 : 1;
}
