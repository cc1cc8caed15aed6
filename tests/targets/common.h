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

/*
 * The kernel's page size, read at run time: 4 KiB on x86-64, 4, 16 or
 * 64 KiB on arm64. A static array that must hold a page is MAX_PAGE_SIZE
 * bytes; a kernel with larger pages is refused rather than overrun.
 */
#define MAX_PAGE_SIZE (64u << 10)

static inline size_t page_size(void)
{
	long size = sysconf(_SC_PAGESIZE);

	if (size <= 0 || (unsigned long)size > MAX_PAGE_SIZE) {
		fprintf(stderr, "unsupported page size %ld\n", size);
		exit(2);
	}
	return (size_t)size;
}

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

/*
 * The process's own state, as the kernel reports it: signal sets, seccomp,
 * thread count, every signal's disposition, and the memory map. Taken just
 * before "ready" and compared after the wake-up, so a round trip that
 * changed any of it is caught by the target itself. Static buffers and raw
 * read(): taking the snapshot must not change the memory map it records.
 */
#include <fcntl.h>
#include <sys/syscall.h>

#define STATE_TEXT (1 << 16)
#define MAX_SIGNAL 64

struct state {
	char status[STATE_TEXT];
	char maps[STATE_TEXT];
	char vmflags[STATE_TEXT];
	struct sigaction actions[MAX_SIGNAL + 1];
};

static struct state state_before, state_after;
static char stdout_buffer[4096];

static const char *const STATUS_KEYS[] = {
	"SigPnd:", "ShdPnd:", "SigBlk:", "SigIgn:", "SigCgt:",
	"NoNewPrivs:", "Seccomp:", "Seccomp_filters:", NULL,
};

static inline void read_text(const char *path, char *out, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t got = 0;
	ssize_t n = 1;

	while (fd >= 0 && got < size - 1 && (n = read(fd, out + got, size - 1 - got)) > 0)
		got += (size_t)n;
	out[got] = '\0';
	if (fd >= 0)
		close(fd);
}

/* Keep only the lines of /proc/self/status that a round trip must not change. */
static inline void keep_state_lines(char *status)
{
	char *out = status, *line = status;

	while (*line) {
		char *end = strchr(line, '\n');
		size_t len = end ? (size_t)(end - line + 1) : strlen(line);

		for (int k = 0; STATUS_KEYS[k]; k++)
			if (strncmp(line, STATUS_KEYS[k], strlen(STATUS_KEYS[k])) == 0) {
				memmove(out, line, len);
				out += len;
				break;
			}
		line += len;
	}
	*out = '\0';
}

/* From smaps, each mapping's address range and its VmFlags line. */
static inline void keep_vmflags(const char *smaps, char *out, size_t size)
{
	size_t used = 0;

	for (const char *line = smaps; *line;) {
		const char *end = strchr(line, '\n');
		size_t len = end ? (size_t)(end - line + 1) : strlen(line);
		size_t keep = 0;

		if (strncmp(line, "VmFlags:", 8) == 0)
			keep = len;
		else if (strchr("0123456789abcdef", line[0]) && memchr(line, '-', len))
			keep = strcspn(line, " ") + 1;
		if (keep && used + keep < size) {
			memcpy(out + used, line, keep);
			used += keep;
		}
		line += len;
	}
	out[used] = '\0';
}

static char smaps_text[4 * STATE_TEXT];
static char task_dirents[STATE_TEXT];

struct task_dirent {
	uint64_t ino;
	int64_t off;
	unsigned short reclen;
	unsigned char type;
	char name[];
};

/*
 * The threads of the process, not counting the kernel's io_uring workers:
 * the kernel starts and ends those on its own, at times that differ between
 * its versions. A worker has PF_IO_WORKER in the flags of its stat from its
 * creation (its name, iou-wrk-N, comes later).
 */
#define PF_IO_WORKER 0x10

static inline int own_threads(void)
{
	int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC), n = 0;
	long got;

	while (fd >= 0 && (got = syscall(SYS_getdents64, fd, task_dirents, sizeof(task_dirents))) > 0)
		for (long at = 0; at < got;) {
			struct task_dirent *d = (struct task_dirent *)(task_dirents + at);
			char path[64], stat[512], *after_name;
			unsigned long flags = 0;

			at += d->reclen;
			if (d->name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "/proc/self/task/%s/stat", d->name);
			read_text(path, stat, sizeof(stat));
			/* pid (comm) state ppid pgrp session tty_nr tpgid flags */
			after_name = strrchr(stat, ')');
			if (after_name)
				sscanf(after_name + 1, " %*c %*d %*d %*d %*d %*d %lu", &flags);
			n += !(flags & PF_IO_WORKER);
		}
	if (fd >= 0)
		close(fd);
	return n;
}

static inline void take_state(struct state *s)
{
	size_t len;

	read_text("/proc/self/status", s->status, sizeof(s->status));
	keep_state_lines(s->status);
	len = strlen(s->status);
	snprintf(s->status + len, sizeof(s->status) - len, "Threads (no io_uring workers):\t%d\n", own_threads());
	read_text("/proc/self/maps", s->maps, sizeof(s->maps));
	read_text("/proc/self/smaps", smaps_text, sizeof(smaps_text));
	keep_vmflags(smaps_text, s->vmflags, sizeof(s->vmflags));
	for (int sig = 1; sig <= MAX_SIGNAL; sig++)
		sigaction(sig, NULL, &s->actions[sig]);
}

static inline int same_action(const struct sigaction *a, const struct sigaction *b)
{
	if (a->sa_handler != b->sa_handler || a->sa_flags != b->sa_flags)
		return 0;
	/* glibc's sigset_t is longer than the kernel's: compare the signals only */
	for (int sig = 1; sig <= MAX_SIGNAL; sig++)
		if (sigismember(&a->sa_mask, sig) != sigismember(&b->sa_mask, sig))
			return 0;
	return 1;
}

/* Whether the state is as before "ready"; with check_maps 0 the map may differ. */
static inline int state_intact(int check_maps)
{
	int ok = 1;

	take_state(&state_after);
	if (strcmp(state_before.status, state_after.status) != 0) {
		fprintf(stderr, "status changed:\n%s---\n%s", state_before.status, state_after.status);
		ok = 0;
	}
	if (check_maps && strcmp(state_before.maps, state_after.maps) != 0) {
		fprintf(stderr, "memory map changed:\n%s---\n%s", state_before.maps, state_after.maps);
		ok = 0;
	}
	if (check_maps && strcmp(state_before.vmflags, state_after.vmflags) != 0) {
		fprintf(stderr, "VmFlags changed:\n%s---\n%s", state_before.vmflags, state_after.vmflags);
		ok = 0;
	}
	for (int sig = 1; sig <= MAX_SIGNAL; sig++)
		if (!same_action(&state_before.actions[sig], &state_after.actions[sig])) {
			fprintf(stderr, "disposition of signal %d changed\n", sig);
			ok = 0;
		}
	return ok;
}

/* Print "ready", having recorded the state; no allocation from here on. */
static inline void announce(void)
{
	setvbuf(stdout, stdout_buffer, _IOLBF, sizeof(stdout_buffer));
	take_state(&state_before);
	printf("ready %d\n", getpid());
	fflush(stdout);
}

static inline void announce_and_wait(sigset_t *set)
{
	int sig;

	announce();
	while (sigwait(set, &sig) != 0 || sig != SIGUSR1)
		;
}

#endif
