/*
 * lazy MIB MODE: MIB MiB of patterned memory and a worker thread that keeps
 * using it, so that right after a (lazy) restore the worker meets pages that
 * are not back yet, in the way MODE says:
 *
 *   touch     reads random pages (user faults)
 *   syscalls  has the kernel read and write random pages (write(2) from them
 *             to a pipe, read(2) from the pipe into them): kernel faults
 *   fork      forks children that check random pages of the region and exit
 *   remap     moves a mapping with mremap, gives pages back with
 *             MADV_DONTNEED and replaces pages with munmap + mmap, keeping
 *             track of what each page must hold
 *   signals   sends itself SIGUSR2 whose handler checks a random page
 *   reader    no worker: the only thread waits in read(2) on stdin, into a
 *             page that is not back yet; it prints "read <first byte>" and,
 *             at the end of its input, checks everything and exits
 *
 * Each check counts; on SIGUSR1 the worker stops, the whole memory and the
 * process state are checked, and the exit code says whether all was intact.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include "common.h"

#define SIDE (16u << 20) /* bytes of each remap-mode mapping */
#define LINE 4096u /* the reader's buffer: any size does, it gets one short line */

static uint64_t *region;
static size_t region_bytes;
static atomic_int stop, bad;
static atomic_long checks;
static const char *mode;
static size_t page_bytes; /* the kernel's page size */
static uint64_t rng = 88172645463325252ULL;

/* remap mode: a mapping that moves, one whose pages are given back, one whose pages are replaced */
static uint64_t *moving, *spare, *given, *replaced;
static unsigned char *given_zero, *replaced_zero; /* one flag per page of SIDE */

static uint64_t next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void fail(const char *what, size_t page)
{
	if (!atomic_exchange(&bad, 1))
		fprintf(stderr, "%s: page %zu is wrong\n", what, page);
}

static int page_ok(const uint64_t *base, size_t page, uint64_t seed)
{
	return same(base + page * (page_bytes / 8), page_bytes, seed + page * (page_bytes / 8));
}

static void touch(void)
{
	size_t page = next_random() % (region_bytes / page_bytes);

	if (!page_ok(region, page, 1))
		fail("touch", page);
}

static void syscalls(int pipe_fds[2])
{
	size_t page = next_random() % (region_bytes / page_bytes);
	uint64_t *at = region + page * (page_bytes / 8) + 16;
	uint64_t got[32];

	/* the kernel reads the page: copy_from_user faults it in */
	if (write(pipe_fds[1], at, sizeof(got)) != sizeof(got) || read(pipe_fds[0], got, sizeof(got)) != sizeof(got) ||
	    !same(got, sizeof(got), 1 + page * (page_bytes / 8) + 16))
		fail("write(2) from", page);
	/* the kernel writes the page (the same bytes): copy_to_user faults it in */
	page = next_random() % (region_bytes / page_bytes);
	at = region + page * (page_bytes / 8) + 64;
	fill(got, sizeof(got), 1 + page * (page_bytes / 8) + 64);
	if (write(pipe_fds[1], got, sizeof(got)) != sizeof(got) || read(pipe_fds[0], at, sizeof(got)) != sizeof(got) ||
	    !page_ok(region, page, 1))
		fail("read(2) into", page);
}

static void forks(void)
{
	int status;
	pid_t child = fork();

	if (child == 0) {
		int ok = 1;

		for (int i = 0; i < 256; i++) {
			size_t page = next_random() % (region_bytes / page_bytes);
			ok &= page_ok(region, page, 1);
		}
		_exit(ok ? 0 : 1);
	}
	if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fail("forked child", 0);
	usleep(5000); /* mostly no child: its pages would be shared at the checkpoint, and stay */
}

static int side_ok(const uint64_t *base, const unsigned char *zero, uint64_t seed, size_t page)
{
	const uint64_t *p = base + page * (page_bytes / 8);

	if (zero[page]) {
		for (size_t i = 0; i < page_bytes / 8; i++)
			if (p[i])
				return 0;
		return 1;
	}
	return page_ok(base, page, seed);
}

static void remaps(void)
{
	size_t page = next_random() % (SIDE / page_bytes);
	void *to = spare;

	/* the moving mapping trades places with the spare one; its pages go along */
	spare = moving;
	moving = mremap(moving, SIDE, SIDE, MREMAP_MAYMOVE | MREMAP_FIXED, to);
	if (moving == MAP_FAILED) {
		perror("mremap");
		exit(2);
	}
	spare = mmap(spare, SIDE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (!page_ok(moving, page, 7))
		fail("moved", page);
	/* a page given back reads as zeros from then on */
	madvise(given + page * (page_bytes / 8), page_bytes, MADV_DONTNEED);
	given_zero[page] = 1;
	page = next_random() % (SIDE / page_bytes);
	if (!side_ok(given, given_zero, 8, page))
		fail("given back", page);
	/* a page replaced by a new mapping reads as zeros too */
	page = next_random() % (SIDE / page_bytes);
	if (mmap(replaced + page * (page_bytes / 8), page_bytes, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	replaced_zero[page] = 1;
	page = next_random() % (SIDE / page_bytes);
	if (!side_ok(replaced, replaced_zero, 9, page))
		fail("replaced", page);
}

static void on_usr2(int sig)
{
	size_t page = (size_t)(next_random() % (region_bytes / page_bytes));

	(void)sig;
	if (!page_ok(region, page, 1))
		fail("signal handler", page);
}

static void *work(void *arg)
{
	int pipe_fds[2];

	(void)arg;
	if (pipe(pipe_fds)) {
		perror("pipe");
		exit(2);
	}
	while (!atomic_load(&stop)) {
		if (!strcmp(mode, "touch"))
			touch();
		else if (!strcmp(mode, "syscalls"))
			syscalls(pipe_fds);
		else if (!strcmp(mode, "fork"))
			forks();
		else if (!strcmp(mode, "remap"))
			remaps();
		else
			syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGUSR2);
		atomic_fetch_add(&checks, 1);
	}
	close(pipe_fds[0]);
	close(pipe_fds[1]);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t worker;
	sigset_t set;
	int ok = 1;

	page_bytes = page_size();
	given_zero = calloc(SIDE / page_bytes, 1);
	replaced_zero = calloc(SIDE / page_bytes, 1);
	if (!given_zero || !replaced_zero) {
		perror("calloc");
		return 2;
	}
	region_bytes = (size_t)(argc > 1 ? atol(argv[1]) : 64) << 20;
	mode = argc > 2 ? argv[2] : "touch";
	region = map_anon(region_bytes);
	fill(region, region_bytes, 1);
	moving = map_anon(SIDE);
	spare = mmap(NULL, SIDE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	given = map_anon(SIDE);
	replaced = map_anon(SIDE);
	fill(moving, SIDE, 7);
	fill(given, SIDE, 8);
	fill(replaced, SIDE, 9);
	signal(SIGUSR2, on_usr2);
	remember_args(argc, argv);
	block_usr1(&set);
	if (!strcmp(mode, "reader")) {
		static char line[LINE];

		announce();
		if (read(0, line, sizeof(line)) < 1)
			return 3;
		printf("read %c\n", line[0]);
		while (read(0, line, sizeof(line)) > 0)
			;
		return check("region", region, region_bytes, 1) && state_intact(1) ? 0 : 1;
	}
	pthread_create(&worker, NULL, work, NULL);
	while (atomic_load(&checks) < 100)
		usleep(1000);
	announce_and_wait(&set);
	/* the worker runs on and changes the map in remap mode: the rest of the state must be as it was */
	ok &= strcmp(mode, "remap") ? state_intact(1) : state_intact(0);
	atomic_store(&stop, 1);
	pthread_join(worker, NULL);
	ok &= !atomic_load(&bad);
	ok &= check("region", region, region_bytes, 1);
	ok &= check("moving", moving, SIDE, 7);
	for (size_t page = 0; page < SIDE / page_bytes; page++) {
		if (!side_ok(given, given_zero, 8, page))
			ok = 0, fprintf(stderr, "given back: page %zu is wrong\n", page);
		if (!side_ok(replaced, replaced_zero, 9, page))
			ok = 0, fprintf(stderr, "replaced: page %zu is wrong\n", page);
	}
	ok &= check_args(argv);
	return ok ? 0 : 1;
}
