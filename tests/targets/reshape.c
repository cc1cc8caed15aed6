/*
 * reshape MIB OP SEED: the lazy phase's zdtm target. MIB MiB of patterned
 * memory, and a worker that waits for a lazy restore to begin (pages of
 * the region missing from /proc/self/pagemap: the process is frozen while
 * they are dropped, so it sees them missing only once it runs again before
 * they are all back), lets it fill a random part
 * of the region (0-90 %, from SEED), then reshapes part of the region
 * that is still missing, as apps do in their first second after a
 * wake-up:
 *
 *   mprotect, mprotect-none  protect the range read-only / inaccessible, read it, give RW back
 *   split-many               protect every other 3 pages of it: many mappings, then RW back
 *   mlock, dontdump, nohugepage, populate
 *                            mlock/munlock, MADV_DONTDUMP/DODUMP, MADV_NOHUGEPAGE,
 *                            MADV_POPULATE_WRITE on it
 *   dontneed, free           give it back (zeros), MADV_FREE it (each page zeros or intact)
 *   munmap, mapover          unmap it and map anew / map over it with MAP_FIXED (zeros)
 *   mremap-move              move it away and back
 *   mremap-whole             move the whole region elsewhere
 *   mremap-grow, mremap-shrink
 *                            grow the region by 16 MiB (may move; zeros after) / cut it at the range
 *   mremap-dontunmap         move it with MREMAP_DONTUNMAP (the old range reads zeros)
 *   fork                     a child checks the range and a sample of the region
 *   fork-exec, vfork-exec    a child runs /bin/true at once
 *   fork-idle                a child sleeps, then says how much private memory it holds
 *   fork-readall             a child reads the whole region, then says the same
 *   fork-linger              a child prints "child PID" and waits for SIGUSR2; then it checks
 *                            the whole region and exits (the parent collects it on SIGUSR1)
 *   exec                     the process runs itself anew ("after-exec")
 *   threads                  8 new threads check random pages
 *   uffd                     registers its own userfaultfd on the range (EBUSY while memcr
 *                            watches it) and on a fresh mapping (must work)
 *   exit, kill               the process exits with 3 / kills itself with SIGKILL (for memcr's
 *                            report of a target that ended during its lazy phase)
 *   guard                    MADV_GUARD_INSTALL on it, read it, MADV_GUARD_REMOVE (Linux 6.13;
 *                            else skipped): a page that reads must hold its bytes; after the
 *                            remove each page reads zeros (the kernel discarded it) or its
 *                            bytes (memcr put it back before the guard came or after it went:
 *                            no event tells it, docs/lazy.md)
 *
 * It prints "op OP present P/N missing M/R" when it acted: P of the N
 * region pages were back, and M of the R pages of the range were still
 * missing; "op OP late" when every page was back before it could look
 * (then nothing was done, and everything must be as it was). On SIGUSR1
 * it checks every page of the region as the operation leaves it, that no tracer is left, its signal state, dispositions and
 * thread count (and the memory map where the operation undoes its change),
 * and exits 0 when everything is as it must be.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include "common.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#define MADV_GUARD_REMOVE 103
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

#define SEED 1 /* the region's pattern */
#define GROW (16u << 20)
#define RANGE_PAGES 1000u
#define CHILD_COST_LIMIT_KB 1024 /* a child that execs at once may cost this much private memory */
#define SAMPLE 512

enum expect { INTACT, ZERO, ZERO_OR_INTACT, GONE };

static const char *op;
static uint64_t *region, *moved_to;
static size_t page_bytes, words_per_page, pages, region_bytes;
static size_t first, count; /* the range: pages of the region */
static uint64_t rng;
static atomic_int stop, bad;
enum phase { WAITING, ACTING, ACTED, LATE };
static atomic_int phase; /* the worker and main agree once on whether it acts */
static int pagemap_fd, skipped, undone; /* undone: the map is as before once the op is over */
static uint64_t *entries;
static long child_private_kb = -1;
static sigjmp_buf on_segv;

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

static uint64_t *page_at(uint64_t *base, size_t page)
{
	return base + page * words_per_page;
}

static int intact(const uint64_t *at, size_t page)
{
	return same(at, page_bytes, SEED + page * words_per_page);
}

static int zero(const uint64_t *at)
{
	for (size_t i = 0; i < words_per_page; i++)
		if (at[i])
			return 0;
	return 1;
}

/* Region pages present now; *missing_from: the first missing one (pages when none is). */
static size_t present(size_t *missing_from)
{
	size_t n = 0, bytes = pages * 8;
	off_t at = (off_t)((uintptr_t)region / page_bytes * 8);

	*missing_from = pages;
	if (pread(pagemap_fd, entries, bytes, at) != (ssize_t)bytes) {
		perror("pagemap");
		exit(2);
	}
	for (size_t i = 0; i < pages; i++) {
		int here = (entries[i] >> 63) & 1;
		n += here;
		if (!here && *missing_from == pages)
			*missing_from = i;
	}
	return n;
}

static size_t missing_in_range(void)
{
	size_t n = 0;

	for (size_t i = first; i < first + count; i++)
		n += !((entries[i] >> 63) & 1);
	return n;
}

static void check_range(const char *what, uint64_t *base, size_t from)
{
	for (size_t i = 0; i < count; i++)
		if (!intact(page_at(base, i), from + i))
			fail(what, from + i);
}

static void must(int ok, const char *what)
{
	if (!ok) {
		fprintf(stderr, "%s: %s\n", what, strerror(errno));
		atomic_store(&bad, 1);
	}
}

static void *range_at(void)
{
	return page_at(region, first);
}

/* A child (after fork) checks the range and a sample of the region: exit 0 when all is right. */
static void child_checks(void)
{
	int ok = 1;

	for (size_t i = 0; i < count; i++)
		ok &= intact(page_at(region, first + i), first + i);
	for (int i = 0; i < SAMPLE; i++) {
		size_t page = next_random() % pages;
		ok &= intact(page_at(region, page), page);
	}
	_exit(ok ? 0 : 1);
}

static long private_kb(void)
{
	static char text[4096];
	long kb = 0, v;
	char *line;

	read_text("/proc/self/smaps_rollup", text, sizeof(text));
	for (line = text; line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
		if (sscanf(line, "Private_Clean: %ld kB", &v) == 1 || sscanf(line, "Private_Dirty: %ld kB", &v) == 1)
			kb += v;
	return kb;
}

static void wait_child(pid_t child, const char *what)
{
	int status;

	if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fail(what, first);
}

/* fork-exec: the child says its private memory just before it execs, over a pipe. */
static void fork_and_exec(int use_vfork)
{
	int fds[2];
	pid_t child;
	long kb = -1;

	must(pipe2(fds, O_CLOEXEC) == 0, "pipe");
	child = use_vfork ? vfork() : fork();
	if (child == 0) {
		if (!use_vfork) {
			long mine = private_kb();
			if (write(fds[1], &mine, sizeof(mine)) != sizeof(mine))
				_exit(3);
		}
		execl("/bin/true", "true", (char *)NULL);
		_exit(4);
	}
	close(fds[1]);
	if (!use_vfork && read(fds[0], &kb, sizeof(kb)) == sizeof(kb))
		child_private_kb = kb;
	close(fds[0]);
	wait_child(child, use_vfork ? "vfork-exec" : "fork-exec");
}

/* A child that sleeps, or reads every page, then says how much private memory it holds. */
static void fork_and_measure(int read_all)
{
	int fds[2];
	pid_t child;
	long kb = -1;

	must(pipe2(fds, O_CLOEXEC) == 0, "pipe");
	child = fork();
	if (child == 0) {
		if (read_all) {
			for (size_t page = 0; page < pages; page++)
				if (!intact(page_at(region, page), page))
					_exit(1);
		} else {
			usleep(300000);
		}
		kb = private_kb();
		_exit(write(fds[1], &kb, sizeof(kb)) == sizeof(kb) ? 0 : 3);
	}
	close(fds[1]);
	if (read(fds[0], &kb, sizeof(kb)) == sizeof(kb))
		child_private_kb = kb;
	close(fds[0]);
	wait_child(child, read_all ? "fork-readall" : "fork-idle");
}

static pid_t lingering;

static void fork_linger(void)
{
	lingering = fork();
	if (lingering == 0) {
		sigset_t usr2;
		int sig;

		sigemptyset(&usr2);
		sigaddset(&usr2, SIGUSR2);
		sigprocmask(SIG_BLOCK, &usr2, NULL);
		printf("child %d\n", getpid());
		fflush(stdout);
		while (sigwait(&usr2, &sig) != 0)
			;
		_exit(check("lingering child", region, region_bytes, SEED) ? 0 : 1);
	}
	must(lingering > 0, "fork");
}

static void *checker(void *arg)
{
	uint64_t seed = (uintptr_t)arg * 7919 + 1;

	for (int i = 0; i < 200; i++) {
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
		size_t page = first + (seed >> 33) % count;
		if (!intact(page_at(region, page), page))
			fail("thread", page);
	}
	return NULL;
}

static volatile sig_atomic_t probing;

/* Installed at start (the dispositions are part of the state checked): only a probe may fault. */
static void on_signal_segv(int sig)
{
	static const char text[] = "SIGSEGV outside a probe\n";

	(void)sig;
	if (!probing) {
		(void)!write(2, text, sizeof(text) - 1);
		_exit(3);
	}
	siglongjmp(on_segv, 1);
}

/* Whether reading the range's first page faults (a guard region). */
static int read_faults(void)
{
	volatile uint64_t sink;
	int faulted = 0;

	probing = 1;
	if (sigsetjmp(on_segv, 1) == 0)
		sink = *(volatile uint64_t *)range_at();
	else
		faulted = 1;
	probing = 0;
	(void)sink;
	return faulted;
}

static void own_userfaultfd(void)
{
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = {.api = UFFD_API};
	struct uffdio_register reg = {.mode = UFFDIO_REGISTER_MODE_MISSING};
	void *fresh;

	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0) {
		must(0, "userfaultfd");
		return;
	}
	reg.range.start = (uintptr_t)range_at();
	reg.range.len = count * page_bytes;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) == 0)
		must(ioctl(uffd, UFFDIO_UNREGISTER, &reg.range) == 0, "unregister the range");
	else if (errno != EBUSY) /* memcr watches it until every page is back */
		must(0, "register the range");
	fresh = map_anon(count * page_bytes);
	reg.range.start = (uintptr_t)fresh;
	must(ioctl(uffd, UFFDIO_REGISTER, &reg) == 0, "register a fresh mapping");
	close(uffd);
	munmap(fresh, count * page_bytes);
}

static void act(void)
{
	void *range = range_at(), *to;
	size_t bytes = count * page_bytes;
	pthread_t threads[8];

	if (!strcmp(op, "mprotect") || !strcmp(op, "mprotect-none")) {
		must(mprotect(range, bytes, strcmp(op, "mprotect") ? PROT_NONE : PROT_READ) == 0, "mprotect");
		usleep(2000);
		must(mprotect(range, bytes, PROT_READ | PROT_WRITE) == 0, "mprotect back");
		check_range(op, range, first);
		undone = 1;
	} else if (!strcmp(op, "split-many")) {
		for (size_t i = 0; i + 3 <= count; i += 6)
			must(mprotect(page_at(range, i), 3 * page_bytes, PROT_READ) == 0, "mprotect");
		check_range(op, range, first);
		must(mprotect(range, bytes, PROT_READ | PROT_WRITE) == 0, "mprotect back");
		undone = 1;
	} else if (!strcmp(op, "mlock")) {
		must(mlock(range, bytes) == 0, "mlock");
		check_range(op, range, first);
		must(munlock(range, bytes) == 0, "munlock");
		undone = 1;
	} else if (!strcmp(op, "dontdump")) {
		must(madvise(range, bytes, MADV_DONTDUMP) == 0, "MADV_DONTDUMP");
		usleep(2000);
		must(madvise(range, bytes, MADV_DODUMP) == 0, "MADV_DODUMP");
		undone = 1;
	} else if (!strcmp(op, "nohugepage")) {
		must(madvise(range, bytes, MADV_NOHUGEPAGE) == 0, "MADV_NOHUGEPAGE");
	} else if (!strcmp(op, "populate")) {
		if (madvise(range, bytes, MADV_POPULATE_WRITE) != 0 && errno != EINVAL)
			must(0, "MADV_POPULATE_WRITE");
		undone = 1;
	} else if (!strcmp(op, "dontneed") || !strcmp(op, "free")) {
		must(madvise(range, bytes, strcmp(op, "free") ? MADV_DONTNEED : MADV_FREE) == 0, op);
		undone = 1;
	} else if (!strcmp(op, "munmap")) {
		must(munmap(range, bytes) == 0, "munmap");
		usleep(2000);
		must(mmap(range, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) ==
			     range,
		     "mmap anew");
	} else if (!strcmp(op, "mapover")) {
		must(mmap(range, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == range,
		     "mmap over");
	} else if (!strcmp(op, "mremap-move")) {
		to = mremap(range, bytes, bytes, MREMAP_MAYMOVE | MREMAP_FIXED, moved_to);
		must(to == moved_to, "mremap away");
		check_range("moved away", moved_to, first);
		must(mremap(moved_to, bytes, bytes, MREMAP_MAYMOVE | MREMAP_FIXED, range) == range, "mremap back");
		must(mmap(moved_to, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == moved_to,
		     "reserve again");
	} else if (!strcmp(op, "mremap-whole")) {
		to = mremap(region, region_bytes, region_bytes, MREMAP_MAYMOVE | MREMAP_FIXED, moved_to);
		must(to == moved_to, "mremap the region");
		if (to == moved_to)
			region = moved_to;
	} else if (!strcmp(op, "mremap-grow")) {
		to = mremap(region, region_bytes, region_bytes + GROW, MREMAP_MAYMOVE);
		must(to != MAP_FAILED, "mremap to grow");
		if (to != MAP_FAILED)
			region = to;
	} else if (!strcmp(op, "mremap-shrink")) {
		must(mremap(region, region_bytes, first * page_bytes, 0) == region, "mremap to shrink");
	} else if (!strcmp(op, "mremap-dontunmap")) {
		to = mremap(range, bytes, bytes, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, moved_to);
		must(to == moved_to, "mremap with MREMAP_DONTUNMAP");
		check_range("moved with MREMAP_DONTUNMAP", moved_to, first);
	} else if (!strcmp(op, "fork")) {
		pid_t child = fork();
		if (child == 0)
			child_checks();
		wait_child(child, "forked child");
	} else if (!strcmp(op, "fork-exec") || !strcmp(op, "vfork-exec")) {
		fork_and_exec(op[0] == 'v');
	} else if (!strcmp(op, "fork-idle") || !strcmp(op, "fork-readall")) {
		fork_and_measure(!strcmp(op, "fork-readall"));
	} else if (!strcmp(op, "fork-linger")) {
		fork_linger();
	} else if (!strcmp(op, "exit")) {
		fflush(stdout);
		_exit(3);
	} else if (!strcmp(op, "kill")) {
		fflush(stdout);
		raise(SIGKILL);
	} else if (!strcmp(op, "exec")) {
		char self[64];
		snprintf(self, sizeof(self), "/proc/%d/exe", getpid());
		execl(self, "reshape", "16", "after-exec", "0", (char *)NULL);
		must(0, "exec");
	} else if (!strcmp(op, "threads")) {
		for (uintptr_t i = 0; i < 8; i++)
			must(pthread_create(&threads[i], NULL, checker, (void *)i) == 0, "pthread_create");
		for (int i = 0; i < 8; i++)
			pthread_join(threads[i], NULL);
	} else if (!strcmp(op, "uffd")) {
		own_userfaultfd();
		undone = 1;
	} else if (!strcmp(op, "guard")) {
		if (madvise(range, bytes, MADV_GUARD_INSTALL) != 0) {
			skipped = 1; /* Linux before 6.13 */
			undone = 1;
			return;
		}
		if (!read_faults())
			check_range("readable behind a guard", range, first);
		must(madvise(range, bytes, MADV_GUARD_REMOVE) == 0, "MADV_GUARD_REMOVE"); /* VmFlags keep a trace */
	} else {
		const unsigned char *at = (const unsigned char *)op;
		size_t nonzero = 0;

		/* argv lives at the top of the stack: a page of it that came back wrong shows here */
		for (size_t i = 0; i < page_bytes - ((uintptr_t)at % page_bytes); i++)
			nonzero += at[i] != 0;
		fprintf(stderr, "unknown operation %s (at %p, %zu nonzero bytes after it in its page)\n", op, (void *)at,
			nonzero);
		exit(2);
	}
}

/* What each page of the region must hold once the operation is over. */
static enum expect expected(size_t page)
{
	int in_range = page >= first && page < first + count;

	if (!strcmp(op, "mremap-shrink"))
		return page < first ? INTACT : GONE;
	if (!in_range)
		return INTACT;
	if (!strcmp(op, "dontneed") || !strcmp(op, "munmap") || !strcmp(op, "mapover") ||
	    !strcmp(op, "mremap-dontunmap"))
		return ZERO;
	if (!strcmp(op, "free") || !strcmp(op, "guard"))
		return ZERO_OR_INTACT;
	return INTACT;
}

/* TracerPid in /proc/self/status: memcr traces the process from its freeze to the end of its lazy phase. */
static long tracer(void)
{
	static char status[4096];
	char *at;

	read_text("/proc/self/status", status, sizeof(status));
	at = strstr(status, "TracerPid:");
	return at ? atol(at + 10) : -1;
}

static void *work(void *arg)
{
	struct timespec tick = {0, 500000};
	size_t missing_from = 0, got = 0, target;
	int lazy = 0;

	(void)arg;
	/* an ending or a lingering child comes as soon as the lazy phase is seen: pages are surely missing then */
	target = strcmp(op, "exit") && strcmp(op, "kill") && strcmp(op, "fork-linger")
			 ? (size_t)((next_random() % 91) * pages / 100)
			 : 0;
	while (!atomic_load(&stop)) {
		got = present(&missing_from);
		if (got < pages) /* woken lazily: its pages come back from now on (frozen while they were dropped) */
			lazy = 1;
		if (lazy && (got >= target || got == pages))
			break;
		nanosleep(&tick, NULL);
	}
	if (!atomic_compare_exchange_strong(&phase, &(int){WAITING}, ACTING))
		return NULL; /* too late: main checks a process nothing was done to */
	/* a range from the first missing page on: not aligned, so that it splits a huge page's worth */
	first = missing_from < pages ? missing_from : next_random() % (pages / 2);
	first += 1 + next_random() % 63;
	count = RANGE_PAGES;
	if (first + count + 1 > pages) {
		first = pages / 2 + 1;
		count = pages / 4;
	}
	present(&missing_from);
	printf("op %s present %zu/%zu missing %zu/%zu\n", op, got, pages, missing_in_range(), count);
	act();
	atomic_store(&phase, ACTED);
	while (!atomic_load(&stop)) /* alive until the check: the thread count is part of the state */
		nanosleep(&tick, NULL);
	return NULL;
}

static int region_ok(void)
{
	size_t total = pages + (!strcmp(op, "mremap-grow") ? GROW / page_bytes : 0);

	for (size_t page = 0; page < total; page++) {
		enum expect e = page < pages ? expected(page) : ZERO;
		uint64_t *at = page_at(region, page);

		if ((e == INTACT && !intact(at, page)) || (e == ZERO && !zero(at)) ||
		    (e == ZERO_OR_INTACT && !zero(at) && !intact(at, page))) {
			fprintf(stderr, "%s: page %zu of the region is wrong (%s)\n", op, page,
				zero(at) ? "zeros" : "other bytes");
			return 0;
		}
	}
	if (!strcmp(op, "mremap-dontunmap"))
		check_range("moved with MREMAP_DONTUNMAP", moved_to, first);
	return 1;
}

static int untraced(void)
{
	long pid = tracer();

	if (pid != 0)
		fprintf(stderr, "still traced after the restore, by %ld\n", pid);
	return pid == 0;
}

/* The image run by the "exec" operation: its own memory, checked on SIGUSR1. */
static int after_exec(sigset_t *set)
{
	int sig;

	region_bytes = 16u << 20;
	region = map_anon(region_bytes);
	fill(region, region_bytes, SEED);
	while (sigwait(set, &sig) != 0 || sig != SIGUSR1)
		;
	return check("after exec", region, region_bytes, SEED) && untraced() ? 0 : 1;
}

int main(int argc, char **argv)
{
	pthread_t worker;
	sigset_t set;
	int ok = 1;

	if (argc < 4) {
		fprintf(stderr, "usage: reshape MIB OP SEED\n");
		return 2;
	}
	page_bytes = page_size();
	words_per_page = page_bytes / 8;
	op = argv[2];
	rng = mix(strtoull(argv[3], NULL, 10));
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	if (!strcmp(op, "after-exec"))
		return after_exec(&set);
	region_bytes = (size_t)atol(argv[1]) << 20;
	pages = region_bytes / page_bytes;
	region = map_anon(region_bytes);
	fill(region, region_bytes, SEED);
	/* where moves go: a reservation of the region's size that nothing else takes */
	moved_to = mmap(NULL, region_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	entries = map_anon(pages * 8);
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (moved_to == MAP_FAILED || pagemap_fd < 0) {
		perror("set-up");
		return 2;
	}
	signal(SIGSEGV, on_signal_segv);
	remember_args(argc, argv);
	block_usr1(&set);
	pthread_create(&worker, NULL, work, NULL);
	announce_and_wait(&set);
	if (atomic_compare_exchange_strong(&phase, &(int){WAITING}, LATE)) {
		/* every page was back and memcr gone before the worker ran: nothing done, all must be intact */
		ok = state_intact(1); /* the worker still runs: the thread count is part of the state */
		atomic_store(&stop, 1);
		pthread_join(worker, NULL);
		printf("op %s late\n", op);
		fflush(stdout);
		return ok && check("region", region, region_bytes, SEED) && untraced() && check_args(argv) ? 0 : 1;
	}
	for (int i = 0; i < 10000 && atomic_load(&phase) != ACTED; i++)
		usleep(1000);
	if (atomic_load(&phase) != ACTED) {
		fprintf(stderr, "%s: still at it 10 s later\n", op);
		return 1;
	}
	ok &= state_intact(undone);
	atomic_store(&stop, 1);
	pthread_join(worker, NULL);
	if (lingering > 0)
		wait_child(lingering, "lingering child");
	if (skipped)
		printf("skipped %s: the kernel does not have it\n", op);
	if (child_private_kb >= 0) {
		printf("child private %ld kB\n", child_private_kb);
		if (child_private_kb > CHILD_COST_LIMIT_KB && strcmp(op, "fork-readall")) {
			fprintf(stderr, "%s: the child held %ld kB of private memory\n", op, child_private_kb);
			ok = 0;
		}
	}
	fflush(stdout);
	ok &= !atomic_load(&bad);
	ok &= region_ok();
	ok &= untraced();
	ok &= check_args(argv);
	return ok ? 0 : 1;
}
