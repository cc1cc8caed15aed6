/*
 * forkserver CHILDREN THREADS SHARED_MIB OWN_MIB: a forking server. The
 * parent fills SHARED_MIB, which its CHILDREN forked workers keep sharing
 * copy-on-write, and OWN_MIB, which each worker overwrites with its own
 * pattern (so every process ends up with OWN_MIB private). Each process
 * runs THREADS threads, each with 1 MiB of its own heap memory. Prints
 * "child <pid>" per worker, then "ready <parent>".
 *
 * On SIGUSR1 every process checks its regions, its threads' memory and its
 * own state (common.h); the parent passes the signal on to the workers
 * and exits 0 only if it and every worker are intact.
 */
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include "common.h"

#define MAX_CHILDREN 16
#define MAX_THREADS 16
#define THREAD_BYTES (1u << 20)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t woken = PTHREAD_COND_INITIALIZER;
static int verify_now;

struct worker_thread {
	pthread_t id;
	uint64_t seed;
	uint64_t *memory;
	int ok;
};

static struct worker_thread threads[MAX_THREADS];
static int nthreads;

static void *thread_main(void *arg)
{
	struct worker_thread *t = arg;

	pthread_mutex_lock(&lock);
	while (!verify_now)
		pthread_cond_wait(&woken, &lock);
	pthread_mutex_unlock(&lock);
	t->ok = check("thread memory", t->memory, THREAD_BYTES, t->seed);
	return NULL;
}

/* Start this process's threads; their memory is filled before they run. */
static void start_threads(uint64_t seed)
{
	for (int i = 0; i < nthreads; i++) {
		threads[i].seed = seed * 100 + (uint64_t)i;
		threads[i].memory = malloc(THREAD_BYTES);
		if (!threads[i].memory)
			exit(2);
		fill(threads[i].memory, THREAD_BYTES, threads[i].seed);
		if (pthread_create(&threads[i].id, NULL, thread_main, &threads[i]) != 0)
			exit(2);
	}
}

/* Everything of this process intact: regions, threads' memory, state (taken before the wait). */
static int verify(uint64_t *shared, size_t shared_bytes, uint64_t *own, size_t own_bytes, uint64_t seed)
{
	/* the state first: the threads end below, and Threads: is part of it */
	int ok = state_intact(1);

	pthread_mutex_lock(&lock);
	verify_now = 1;
	pthread_cond_broadcast(&woken);
	pthread_mutex_unlock(&lock);
	for (int i = 0; i < nthreads; i++) {
		pthread_join(threads[i].id, NULL);
		ok &= threads[i].ok;
	}
	ok &= check("shared", shared, shared_bytes, 71);
	ok &= check("own", own, own_bytes, seed);
	return ok;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 4;
	size_t shared_bytes = (size_t)(argc > 3 ? atoi(argv[3]) : 16) << 20;
	size_t own_bytes = (size_t)(argc > 4 ? atoi(argv[4]) : 8) << 20;
	uint64_t *shared, *own;
	pid_t children[MAX_CHILDREN];
	int ready[2], sig, ok;
	sigset_t set;
	char c;

	nthreads = argc > 2 ? atoi(argv[2]) : 2;
	if (n > MAX_CHILDREN || nthreads > MAX_THREADS || pipe(ready) != 0)
		return 2;
	shared = map_anon(shared_bytes);
	own = map_anon(own_bytes);
	fill(shared, shared_bytes, 71);
	fill(own, own_bytes, 72);
	block_usr1(&set);
	for (int i = 0; i < n; i++) {
		children[i] = fork();
		if (children[i] < 0)
			return 2;
		if (children[i] == 0) {
			uint64_t seed = 80 + (uint64_t)i;

			prctl(PR_SET_PDEATHSIG, SIGKILL); /* a test that kills the parent leaves no worker */
			fill(own, own_bytes, seed);
			start_threads(seed);
			setvbuf(stdout, stdout_buffer, _IOLBF, sizeof(stdout_buffer));
			take_state(&state_before);
			if (write(ready[1], "x", 1) != 1)
				_exit(2);
			while (sigwait(&set, &sig) != 0 || sig != SIGUSR1)
				;
			_exit(verify(shared, shared_bytes, own, own_bytes, seed) ? 0 : 1);
		}
	}
	for (int i = 0; i < n; i++)
		if (read(ready[0], &c, 1) != 1)
			return 2;
	start_threads(72);
	setvbuf(stdout, stdout_buffer, _IOLBF, sizeof(stdout_buffer));
	for (int i = 0; i < n; i++)
		printf("child %d\n", children[i]);
	announce_and_wait(&set);
	ok = verify(shared, shared_bytes, own, own_bytes, 72);
	for (int i = 0; i < n; i++) {
		int status;

		kill(children[i], SIGUSR1);
		if (waitpid(children[i], &status, 0) != children[i] || !WIFEXITED(status) ||
		    WEXITSTATUS(status) != 0) {
			fprintf(stderr, "worker %d failed (status %#x)\n", children[i], status);
			ok = 0;
		}
	}
	return ok ? 0 : 1;
}
