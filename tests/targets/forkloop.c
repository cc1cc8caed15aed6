/*
 * forkloop: a parent that forks a child every 2 ms, for ever. Each
 * child writes 256 KiB of its own pattern, lives 20 to 200 ms (in
 * nanosleep), checks its pattern and exits 0 if intact, 1 if not. The
 * parent reaps them as they end. Prints "ready <parent>" once forking.
 *
 * On SIGUSR1 the parent stops forking, waits for every child, and exits 0
 * only if its own memory and state are intact and every child it reaped
 * exited 0.
 */
#include <errno.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>

#include "common.h"

#define REGION (8u << 20)
#define CHILD_BYTES (256u << 10)

static int reap(int flags)
{
	int status, ok = 1;
	pid_t pid;

	while ((pid = waitpid(-1, &status, flags)) > 0)
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fprintf(stderr, "child %d failed (status %#x)\n", pid, status);
			ok = 0;
		}
	return ok;
}

static void child(unsigned n)
{
	uint64_t *own = map_anon(CHILD_BYTES);
	struct timespec nap = {0, (long)(20 + n % 181) * 1000000L};

	prctl(PR_SET_PDEATHSIG, SIGKILL); /* a test that kills the parent leaves no child */
	fill(own, CHILD_BYTES, 1000 + n);
	while (nanosleep(&nap, &nap) != 0 && errno == EINTR)
		;
	_exit(check("child", own, CHILD_BYTES, 1000 + n) ? 0 : 1);
}

int main(void)
{
	uint64_t *region = map_anon(REGION);
	struct timespec tick = {0, 2000000L};
	sigset_t set;
	siginfo_t info;
	int ok = 1;

	fill(region, REGION, 91);
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_BLOCK, &set, NULL);
	announce();
	for (unsigned n = 0;; n++) {
		pid_t pid = fork();

		if (pid == 0)
			child(n);
		if (pid < 0)
			return 2;
		if (sigtimedwait(&set, &info, &tick) == SIGUSR1)
			break;
		ok &= reap(WNOHANG);
	}
	ok &= reap(0);
	/* a SIGCHLD of the last children may still be pending: not part of the state being compared */
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	struct timespec none = {0, 0};
	while (sigtimedwait(&set, &info, &none) == SIGCHLD)
		;
	ok &= state_intact(1);
	ok &= check("region", region, REGION, 91);
	return ok ? 0 : 1;
}
