/*
 * The state check of a target memcr's daemon watches for writes
 * (--incremental): as state_intact(1) of common.h, with memcr's "uw" taken
 * out of the VmFlags and neighbouring mappings the watch let the kernel
 * merge joined again, on both sides.
 */
#ifndef TARGET_WATCHED_H
#define TARGET_WATCHED_H

#include <pthread.h>

#include "common.h"

/* VmFlags without memcr's "uw", which its write tracking sets on the mappings it watches. */
static void drop_uw(char *text)
{
	char *at;

	while ((at = strstr(text, " uw")) != NULL)
		memmove(at, at + 3, strlen(at + 3) + 1);
}

/*
 * Join each line "START-END REST" to the one before when it starts where that
 * one ends and the rest is the same: memcr's watch (registering a mapping
 * with a userfaultfd) lets the kernel merge neighbours it could always have
 * merged, which only /proc shows.
 */
static void join_ranges(char *text)
{
	char *out = text, *line = text, prev_rest[512] = "";
	unsigned long prev_end = 0, start, end;
	char *prev_end_at = NULL;

	while (*line) {
		char *eol = strchr(line, '\n'), *rest;
		size_t len = eol ? (size_t)(eol - line + 1) : strlen(line);
		char copy[512];

		snprintf(copy, sizeof(copy), "%.*s", (int)len, line);
		start = strtoul(copy, &rest, 16);
		end = strtoul(rest + 1, &rest, 16);
		if (prev_end_at && start == prev_end && strcmp(rest, prev_rest) == 0) {
			/* rewrite the end of the line before: same width, as both are hex of one address space */
			char hex[32];
			int width = snprintf(hex, sizeof(hex), "%lx", end);
			if (width == (int)strcspn(prev_end_at, " ")) {
				memcpy(prev_end_at, hex, (size_t)width);
				prev_end = end;
				line += len;
				continue;
			}
		}
		memmove(out, line, len);
		prev_end_at = out + strcspn(out, "-") + 1;
		snprintf(prev_rest, sizeof(prev_rest), "%s", rest);
		prev_end = end;
		out += len;
		line += len;
	}
	*out = '\0';
}

/* With check_maps 0 the memory map and VmFlags may differ: a target that maps anew over memory memcr watches. */
static int watched_state_intact(int check_maps)
{
	take_state(&state_after);
	drop_uw(state_before.vmflags);
	drop_uw(state_after.vmflags);
	join_ranges(state_before.maps);
	join_ranges(state_after.maps);
	join_ranges(state_before.vmflags);
	join_ranges(state_after.vmflags);
	if (strcmp(state_before.status, state_after.status) != 0) {
		fprintf(stderr, "status changed:\n%s---\n%s", state_before.status, state_after.status);
		return 0;
	}
	if (check_maps && strcmp(state_before.maps, state_after.maps) != 0) {
		fprintf(stderr, "memory map changed:\n%s---\n%s", state_before.maps, state_after.maps);
		return 0;
	}
	if (check_maps && strcmp(state_before.vmflags, state_after.vmflags) != 0) {
		fprintf(stderr, "VmFlags changed:\n%s---\n%s", state_before.vmflags, state_after.vmflags);
		return 0;
	}
	for (int sig = 1; sig <= MAX_SIGNAL; sig++)
		if (!same_action(&state_before.actions[sig], &state_after.actions[sig])) {
			fprintf(stderr, "disposition of signal %d changed\n", sig);
			return 0;
		}
	return 1;
}

/* A target whose worker thread runs all through its parks (serve_worker). */
struct worker {
	void *(*run)(void *unused);   /* works until *stopping, counting in *count */
	void (*go)(const char *line); /* takes the arguments of "go ..." */
	long (*first_wrong)(void);    /* where its memory is wrong once it stopped, or -1 */
	int (*maps_kept)(void);       /* whether its memory map is as it was (it did not map over its memory) */
	volatile uint64_t *count;
	volatile int *stopping;
};

/*
 * Announce the target and serve its commands on stdin, one a line:
 *   go ...      start the worker (w->go takes the line); print "going"
 *   count       print "count N", N the worker's count so far
 *   check C     stop the worker (it ends what it does first), check its
 *               memory (w->first_wrong) and the process's own state
 *               (watched_state_intact, the map too where w->maps_kept()
 *               says so); print "done C N", or "bad C at
 *               WHERE of N" and exit 1
 *   quit        exit 0
 * A first worker thread is started and joined before the state is taken:
 * glibc sets up what its threads need (a signal handler) the first time.
 */
static inline int serve_worker(const struct worker *w)
{
	static char stdin_buffer[4096]; /* stdio's own would come from the heap after the state is taken */
	char line[256];
	pthread_t thread;
	long cycle, wrong;

	setvbuf(stdin, stdin_buffer, _IOLBF, sizeof(stdin_buffer));
	*w->stopping = 1;
	if (pthread_create(&thread, NULL, w->run, NULL) != 0 || pthread_join(thread, NULL) != 0)
		return 2;
	announce();
	while (fgets(line, sizeof(line), stdin)) {
		if (strncmp(line, "go", 2) == 0) {
			w->go(line);
			*w->stopping = 0;
			if (pthread_create(&thread, NULL, w->run, NULL) != 0)
				return 2;
			printf("going\n");
		} else if (strncmp(line, "count", 5) == 0) {
			printf("count %llu\n", (unsigned long long)*w->count);
		} else if (sscanf(line, "check %ld", &cycle) == 1) {
			*w->stopping = 1;
			pthread_join(thread, NULL);
			wrong = w->first_wrong();
			if (wrong >= 0 || !watched_state_intact(w->maps_kept())) {
				printf("bad %ld at %ld of %llu\n", cycle, wrong, (unsigned long long)*w->count);
				fflush(stdout);
				return 1;
			}
			take_state(&state_before);
			printf("done %ld %llu\n", cycle, (unsigned long long)*w->count);
		} else if (strncmp(line, "quit", 4) == 0) {
			return 0;
		} else {
			fprintf(stderr, "bad command: %s", line);
			return 2;
		}
		fflush(stdout);
	}
	return 3;
}

#endif
