/*
 * vforker: the main thread vfork()s a child that waits on a pipe, so the
 * parent stays blocked in vfork() and the child runs on the parent's
 * memory, while a second thread of the parent keeps rewriting and
 * checking 4 MiB of its own. Prints "ready <parent>" and "child <pid>".
 * On SIGUSR1 the thread lets the child exit; the parent then checks its
 * memory and its state.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "common.h"

#define REGION (16u << 20)
#define WORKER (4u << 20)

static int release_child[2], child_pid[2];
static atomic_int corrupt, stop;
static sigset_t set;

static void *worker(void *arg)
{
	uint64_t *mem = arg;
	uint64_t pass = 1;
	pid_t child;
	int sig;

	fill(mem, WORKER, 70);
	if (read(child_pid[0], &child, sizeof(child)) != sizeof(child))
		exit(2);
	printf("child %d\n", child);
	announce();
	for (;;) {
		struct timespec now = {0, 0};

		if (!same(mem, WORKER, 70 + pass - 1) && !atomic_exchange(&corrupt, 1))
			fprintf(stderr, "worker: its memory changed under it in pass %llu\n",
				(unsigned long long)pass);
		fill(mem, WORKER, 70 + pass++);
		if (sigtimedwait(&set, NULL, &now) == SIGUSR1)
			break;
		usleep(1000);
	}
	(void)sig;
	if (!state_intact(1))
		atomic_store(&corrupt, 1);
	atomic_store(&stop, 1);
	if (write(release_child[1], "x", 1) != 1)
		exit(2);
	return NULL;
}

int main(void)
{
	uint64_t *region = map_anon(REGION);
	pthread_t thread;
	char byte;
	int status, ok = 1;

	fill(region, REGION, 71);
	if (pipe(release_child) != 0 || pipe(child_pid) != 0)
		return 2;
	block_usr1(&set);
	if (pthread_create(&thread, NULL, worker, map_anon(WORKER)) != 0)
		return 2;
	pid_t child = vfork();
	if (child == 0) {
		pid_t self = (pid_t)syscall(SYS_getpid);

		/* only system calls here: the child runs on its parent's stack */
		syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
		if (write(child_pid[1], &self, sizeof(self)) != sizeof(self) ||
		    read(release_child[0], &byte, 1) != 1)
			_exit(2);
		_exit(0);
	}
	pthread_join(thread, NULL);
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "the vfork child failed (status %#x)\n", status);
		ok = 0;
	}
	ok &= !atomic_load(&corrupt);
	ok &= check("region", region, REGION, 71);
	return ok ? 0 : 1;
}
