/*
 * Shared by the test targets: a deterministic pattern, readiness and the
 * "wait for SIGUSR1, then verify" protocol. A target prints "ready <pid>"
 * once set up, and on SIGUSR1 checks its memory and exits 0 when every byte
 * is intact, 1 otherwise (naming the first bad place on stderr).
 */
#ifndef TARGET_COMMON_H
#define TARGET_COMMON_H

#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static inline uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return (x ^ (x >> 31)) | 1; /* never zero: a zeroed page always shows */
}

static inline void fill(uint64_t *words, size_t bytes, uint64_t seed)
{
	for (size_t i = 0; i < bytes / 8; i++)
		words[i] = mix(seed + i);
}

static inline int same(const uint64_t *words, size_t bytes, uint64_t seed)
{
	for (size_t i = 0; i < bytes / 8; i++)
		if (words[i] != mix(seed + i))
			return 0;
	return 1;
}

static inline int check(const char *what, const uint64_t *words, size_t bytes, uint64_t seed)
{
	for (size_t i = 0; i < bytes / 8; i++)
		if (words[i] != mix(seed + i)) {
			fprintf(stderr, "%s: bad word at offset %zu\n", what, i * 8);
			return 0;
		}
	return 1;
}

static inline void *map_anon(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

/*
 * argv and the environment live at the top of the main thread's stack,
 * which the program never touches again: copies taken at start show
 * whether those pages came back too.
 */
extern char **environ;
static char **saved_args, **saved_env;
static int saved_argc;

static inline char **copy_strings(char **from, int n)
{
	char **to = calloc(n + 1, sizeof(*to));

	for (int i = 0; i < n; i++)
		to[i] = strdup(from[i]);
	return to;
}

static inline void remember_args(int argc, char **argv)
{
	int n = 0;

	while (environ[n])
		n++;
	saved_argc = argc;
	saved_args = copy_strings(argv, argc);
	saved_env = copy_strings(environ, n);
}

static inline int check_args(char **argv)
{
	for (int i = 0; i < saved_argc; i++)
		if (!argv[i] || strcmp(argv[i], saved_args[i]) != 0) {
			fprintf(stderr, "argv[%d] changed\n", i);
			return 0;
		}
	for (int i = 0; saved_env[i]; i++)
		if (!environ[i] || strcmp(environ[i], saved_env[i]) != 0) {
			fprintf(stderr, "environ[%d] changed\n", i);
			return 0;
		}
	return 1;
}

/* Block SIGUSR1 (before any thread starts, so all inherit it). */
static inline void block_usr1(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGUSR1);
	sigprocmask(SIG_BLOCK, set, NULL);
}

static inline void announce_and_wait(sigset_t *set)
{
	int sig;

	printf("ready %d\n", getpid());
	fflush(stdout);
	while (sigwait(set, &sig) != 0 || sig != SIGUSR1)
		;
}

#endif
