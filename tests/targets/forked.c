/*
 * forked CHILDREN: a parent with 32 MiB patterned, and CHILDREN forked
 * children sharing those pages copy-on-write; each child then writes 4 MiB
 * of its own. Prints "ready <parent>" and one "child <pid>" line each.
 * Every member verifies its memory and state on SIGUSR1 (the parent passes
 * it on to the children); the parent exits 0 only if all of them did.
 */
#include <sys/prctl.h>
#include <sys/wait.h>

#include "common.h"

#define SHARED (32u << 20)
#define OWN (4u << 20)
#define MAX_CHILDREN 16

static int verify(uint64_t *shared, uint64_t *own, uint64_t seed)
{
	int ok = state_intact(1);

	ok &= check("shared", shared, SHARED, 51);
	ok &= check("own", own, OWN, seed);
	return ok;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 2;
	/*
	 * One mapping with a PROT_NONE page between the two parts, so they are
	 * two mappings that no huge page spans: on Linux 6.1 pagemap calls a
	 * PMD-mapped huge page exclusive when its head page is mapped once,
	 * though the children still map some of its other pages.
	 */
	uint64_t *shared = map_anon(SHARED + page_size() + OWN);
	uint64_t *own = (uint64_t *)((char *)shared + SHARED + page_size());
	pid_t children[MAX_CHILDREN];
	int ready[2], sig;
	sigset_t set;
	char line[32];

	if (n > MAX_CHILDREN || pipe(ready) != 0 || mprotect((char *)shared + SHARED, page_size(), PROT_NONE) != 0)
		return 2;
	fill(shared, SHARED, 51);
	fill(own, OWN, 52);
	block_usr1(&set);
	for (int i = 0; i < n; i++) {
		children[i] = fork();
		if (children[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL); /* a test that kills the parent leaves no child */
			fill(own, OWN, 60 + i);
			setvbuf(stdout, stdout_buffer, _IOLBF, sizeof(stdout_buffer));
			take_state(&state_before);
			if (write(ready[1], "x", 1) != 1)
				_exit(2);
			while (sigwait(&set, &sig) != 0 || sig != SIGUSR1)
				;
			_exit(verify(shared, own, 60 + i) ? 0 : 1);
		}
	}
	for (int i = 0; i < n; i++)
		if (read(ready[0], line, 1) != 1)
			return 2;
	setvbuf(stdout, stdout_buffer, _IOLBF, sizeof(stdout_buffer));
	for (int i = 0; i < n; i++)
		printf("child %d\n", children[i]);
	announce_and_wait(&set);
	int ok = verify(shared, own, 52);
	for (int i = 0; i < n; i++) {
		int status;

		kill(children[i], SIGUSR1);
		if (waitpid(children[i], &status, 0) != children[i] || !WIFEXITED(status) ||
		    WEXITSTATUS(status) != 0) {
			fprintf(stderr, "child %d failed (status %#x)\n", children[i], status);
			ok = 0;
		}
	}
	return ok ? 0 : 1;
}
