/*
 * states MODE: 16 MiB patterned plus one process state a real app can be
 * in; prints "ready <pid>" and, on SIGUSR1, checks its memory, its state
 * as recorded before "ready" (signal sets, dispositions, seccomp, threads,
 * memory map) and what the mode itself promises. MODE is one of
 *   plain          nothing special (the test stops or signals it)
 *   handlers       handlers for SIGTRAP, SIGSYS, SIGUSR2, SIGINT (SA_SIGINFO,
 *                  SA_RESTART, masks), SIGPIPE and SIGHUP ignored
 *   trap-thread    SIGTRAP blocked and pending on one thread, handler set
 *   trap-process   SIGTRAP blocked everywhere and pending on the process
 *   pending        SIGUSR2 and SIGRTMIN+3 (twice) pending on the process, SIGINT on a thread
 *   blocking       threads in read, futex, nanosleep, epoll_wait and accept
 *   seccomp-strict the main thread in strict seccomp, blocked in read();
 *                  another thread does the checks
 *   seccomp-kill   every thread under a filter that kills the process on
 *                  socket() and traps on bind()
 *   seccomp-errno  every thread under a filter that fails socket() with EPERM
 *   leader-exited  the main thread calls pthread_exit; two threads run on
 *   vfork-wait     a thread waits in clone(CLONE_VFORK) (its child has its own
 *                  memory), where no ptrace interrupt reaches it, until SIGUSR1
 *   registers      the main thread, the one memcr runs its system calls on,
 *                  spins in user space with values in registers that a
 *                  system call or a syscall stop changes (rcx and r11; x7, and
 *                  with SVE z8 beyond its low 128 bits and p7) and in vector
 *                  registers, checking them, until SIGUSR1
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include "common.h"

#define REGION (16u << 20)

static uint64_t *region;
static sigset_t usr1;
static atomic_int bad;

static void handler(int sig) { (void)sig; }
static void info_handler(int sig, siginfo_t *info, void *ctx) { (void)sig; (void)info; (void)ctx; }

static void set_handler(int sig, int flags, int masked)
{
	struct sigaction sa = {0};

	if (flags & SA_SIGINFO)
		sa.sa_sigaction = info_handler;
	else
		sa.sa_handler = handler;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	if (masked)
		sigaddset(&sa.sa_mask, masked);
	sigaction(sig, &sa, NULL);
}

static void block(int sig)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, sig);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
}

/* The checks every mode ends with; run by whichever thread may make system calls. */
static int verify(int check_maps)
{
	int ok = state_intact(check_maps);

	ok &= check("region", region, REGION, 81);
	ok &= !atomic_load(&bad);
	return ok;
}

static void wait_usr1(void)
{
	int sig;

	while (sigwait(&usr1, &sig) != 0 || sig != SIGUSR1)
		;
}

/* ---- blocking: one thread per blocking call, each checks its call ended as it should */

static int pipe_fds[2], epoll_pipe[2], listener, epfd;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int woken;
static atomic_int blocked;

static void *in_read(void *arg)
{
	char c = 0;
	ssize_t n;

	(void)arg;
	atomic_fetch_add(&blocked, 1);
	n = read(pipe_fds[0], &c, 1);
	if (n != 1 || c != 'r') {
		fprintf(stderr, "read ended with %zd (%s)\n", n, strerror(errno));
		atomic_store(&bad, 1);
	}
	return NULL;
}

static void *in_futex(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&lock);
	atomic_fetch_add(&blocked, 1);
	while (!woken)
		pthread_cond_wait(&cond, &lock);
	pthread_mutex_unlock(&lock);
	return NULL;
}

static void *in_nanosleep(void *arg)
{
	struct timespec left = {3600, 0};

	(void)arg;
	atomic_fetch_add(&blocked, 1);
	/* a parked process sleeps as long as it asked: EINTR would show as an early return */
	while (clock_nanosleep(CLOCK_MONOTONIC, 0, &left, &left) == EINTR)
		;
	return NULL;
}

static void *in_epoll(void *arg)
{
	struct epoll_event ev;
	int n;

	(void)arg;
	atomic_fetch_add(&blocked, 1);
	/* epoll_wait returns EINTR after a ptrace stop (signal(7)): wait again */
	while ((n = epoll_wait(epfd, &ev, 1, -1)) < 0 && errno == EINTR)
		;
	if (n != 1) {
		fprintf(stderr, "epoll_wait ended with %d (%s)\n", n, strerror(errno));
		atomic_store(&bad, 1);
	}
	return NULL;
}

static void *in_accept(void *arg)
{
	int fd;

	(void)arg;
	atomic_fetch_add(&blocked, 1);
	fd = accept(listener, NULL, NULL);
	if (fd < 0) {
		fprintf(stderr, "accept failed: %s\n", strerror(errno));
		atomic_store(&bad, 1);
	}
	return NULL;
}

static int blocking(void)
{
	void *(*calls[])(void *) = {in_read, in_futex, in_nanosleep, in_epoll, in_accept};
	pthread_t threads[5];
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(addr);
	struct epoll_event ev = {.events = EPOLLIN};
	int ok, conn;

	if (pipe(pipe_fds) || pipe(epoll_pipe) || (epfd = epoll_create1(0)) < 0 ||
	    epoll_ctl(epfd, EPOLL_CTL_ADD, epoll_pipe[0], &ev) ||
	    (listener = socket(AF_INET, SOCK_STREAM, 0)) < 0 ||
	    bind(listener, (struct sockaddr *)&addr, sizeof(addr)) || listen(listener, 1) ||
	    getsockname(listener, (struct sockaddr *)&addr, &len))
		return 2;
	for (int i = 0; i < 5; i++)
		pthread_create(&threads[i], NULL, calls[i], NULL);
	while (atomic_load(&blocked) < 5)
		usleep(1000);
	usleep(20000); /* into their calls */
	announce();
	wait_usr1();
	ok = verify(1);
	if (write(pipe_fds[1], "r", 1) != 1 || write(epoll_pipe[1], "e", 1) != 1)
		return 2;
	pthread_mutex_lock(&lock);
	woken = 1;
	pthread_cond_signal(&cond);
	pthread_mutex_unlock(&lock);
	conn = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(conn, (struct sockaddr *)&addr, sizeof(addr)))
		return 2;
	for (int i = 0; i < 5; i++)
		if (i != 2)
			pthread_join(threads[i], NULL);
	return ok && !atomic_load(&bad) ? 0 : 1;
}

/* ---- seccomp */

static int seccomp_filter(int socket_action, int bind_action)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, socket_action),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_bind, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, bind_action),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return -1;
	/* TSYNC: every thread gets the filter */
	return (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
}

static int strict_pipe[2], never_pipe[2];

static void *strict_checker(void *arg)
{
	char c;

	(void)arg;
	if (read(strict_pipe[0], &c, 1) != 1) /* the main thread is in strict mode now */
		exit(2);
	announce();
	wait_usr1();
	_exit(verify(1) ? 0 : 1);
}

static void *spinner(void *arg)
{
	volatile uint64_t *words = arg;

	while (!atomic_load(&bad)) {
		words[0]++;
		usleep(1000);
	}
	return NULL;
}

static int vfork_release[2];
static atomic_int vfork_waiting;

static void *vfork_waiter(void *arg)
{
	long child;
	char c;

	(void)arg;
	atomic_store(&vfork_waiting, 1);
	/* CLONE_VFORK without CLONE_VM: a child of its own memory, the parent thread held until it exits */
	child = syscall(__NR_clone, 0x00004000 /* CLONE_VFORK */ | SIGCHLD, 0, NULL, NULL, 0);
	if (child == 0) {
		if (read(vfork_release[0], &c, 1) != 1)
			_exit(2);
		_exit(0);
	}
	if (child < 0 || waitpid((pid_t)child, NULL, 0) != child)
		atomic_store(&bad, 1);
	return NULL;
}

/* ---- registers */

static volatile int vector_spinning, vector_stop, vector_verified;

static void *vector_checker(void *arg)
{
	(void)arg;
	while (!vector_spinning)
		usleep(1000);
	announce();
	wait_usr1();
	vector_verified = verify(1); /* while both threads run, as when the state was taken */
	vector_stop = 1;
	return NULL;
}

#if defined(__x86_64__)
/* 1 if rcx, r11 and xmm8 kept their values until vector_stop */
static int vector_spin(void)
{
	static const unsigned char pattern[16] __attribute__((aligned(16))) = {1, 4, 7, 10, 13, 16, 19, 22,
									      25, 28, 31, 34, 37, 40, 43, 46};
	unsigned int same;

	__asm__ volatile("movdqa %[pat], %%xmm8\n\t"
			 "movq $0x1234, %%rcx\n\t"
			 "movq $0x5678, %%r11\n\t"
			 "movl $1, %[spinning]\n"
			 "1:\n\t"
			 "xorl %[same], %[same]\n\t"
			 "cmpq $0x1234, %%rcx\n\t"
			 "jne 2f\n\t"
			 "cmpq $0x5678, %%r11\n\t"
			 "jne 2f\n\t"
			 "movdqa %[pat], %%xmm9\n\t"
			 "pcmpeqb %%xmm8, %%xmm9\n\t"
			 "pmovmskb %%xmm9, %[same]\n\t"
			 "cmpl $0xffff, %[same]\n\t"
			 "jne 2f\n\t"
			 "cmpl $0, %[stop]\n\t"
			 "je 1b\n"
			 "2:\n"
			 : [same] "=&r"(same), [spinning] "=m"(vector_spinning)
			 : [pat] "m"(pattern), [stop] "m"(vector_stop)
			 : "rcx", "r11", "xmm8", "xmm9", "cc", "memory");
	return same == 0xffff;
}
#elif defined(__aarch64__)
#include <sys/auxv.h>

/*
 * The two loops around their vector checks: x7 and x16 set, "spinning" said;
 * then, each round, x7 and x16 checked (to 2: failed), the vector check, and
 * vector_stop read (set: to 3, done).
 */
#define SPIN_START                                                                                                     \
	"mov x7, #0x777\n\t"                                                                                           \
	"mov x16, #0x616\n\t"                                                                                          \
	"mov w2, #1\n\t"                                                                                               \
	"str w2, [%[spinning]]\n"                                                                                      \
	"1:\n\t"                                                                                                       \
	"cmp x7, #0x777\n\t"                                                                                           \
	"b.ne 2f\n\t"                                                                                                  \
	"cmp x16, #0x616\n\t"                                                                                          \
	"b.ne 2f\n\t"
#define SPIN_END                                                                                                       \
	"ldr w2, [%[stop]]\n\t"                                                                                        \
	"cbz w2, 1b\n\t"                                                                                               \
	"b 3f\n"                                                                                                       \
	"2:\n\t"                                                                                                       \
	"mov %[ok], #0\n"                                                                                              \
	"3:\n"

/* 1 if x7 and x16, and z8 and p7 (SVE) or v8 (no SVE), kept their values until vector_stop */
static int vector_spin(void)
{
	long ok = 1;

	if (getauxval(AT_HWCAP) & HWCAP_SVE)
		__asm__ volatile(".arch_extension sve\n\t"
				 "ptrue p7.b\n\t"
				 "index z8.b, #1, #3\n\t" SPIN_START
				 "index z9.b, #1, #3\n\t"
				 "cmpne p1.b, p7/z, z8.b, z9.b\n\t"
				 "b.ne 2f\n\t" /* some byte of z8 changed */
				 "cntp x2, p7, p7.b\n\t"
				 "cntb x3\n\t"
				 "cmp x2, x3\n\t"
				 "b.ne 2f\n\t" /* p7 is no longer all true */
				 SPIN_END
				 : [ok] "+r"(ok)
				 : [spinning] "r"(&vector_spinning), [stop] "r"(&vector_stop)
				 : "x2", "x3", "x7", "x16", "v8", "v9", "cc", "memory");
	else
		__asm__ volatile("movi v8.16b, #0x5a\n\t" SPIN_START
				 "movi v9.16b, #0x5a\n\t"
				 "cmeq v9.16b, v8.16b, v9.16b\n\t"
				 "uminv b9, v9.16b\n\t"
				 "umov w2, v9.b[0]\n\t"
				 "cmp w2, #0xff\n\t"
				 "b.ne 2f\n\t" /* v8 changed */
				 SPIN_END
				 : [ok] "+r"(ok)
				 : [spinning] "r"(&vector_spinning), [stop] "r"(&vector_stop)
				 : "x2", "x7", "x16", "v8", "v9", "cc", "memory");
	return (int)ok;
}
#endif

static void *leaderless_checker(void *arg)
{
	(void)arg;
	wait_usr1();
	/* the main thread is gone: Threads and the map of its stack may differ */
	exit(check("region", region, REGION, 81) ? 0 : 1);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "plain";
	pthread_t thread;

	region = map_anon(REGION);
	fill(region, REGION, 81);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);

	if (strcmp(mode, "handlers") == 0) {
		set_handler(SIGTRAP, 0, 0);
		set_handler(SIGSYS, SA_SIGINFO, SIGUSR2);
		set_handler(SIGUSR2, SA_RESTART, SIGINT);
		set_handler(SIGINT, SA_SIGINFO | SA_RESTART | SA_NODEFER, SIGTERM);
		signal(SIGPIPE, SIG_IGN);
		signal(SIGHUP, SIG_IGN);
	} else if (strcmp(mode, "trap-thread") == 0) {
		set_handler(SIGTRAP, 0, 0);
		block(SIGTRAP);
		pthread_kill(pthread_self(), SIGTRAP);
	} else if (strcmp(mode, "trap-process") == 0) {
		set_handler(SIGTRAP, 0, 0);
		block(SIGTRAP);
		kill(getpid(), SIGTRAP);
	} else if (strcmp(mode, "pending") == 0) {
		set_handler(SIGUSR2, 0, 0);
		set_handler(SIGRTMIN + 3, SA_SIGINFO, 0);
		set_handler(SIGINT, 0, 0);
		block(SIGUSR2);
		block(SIGRTMIN + 3);
		block(SIGINT);
		kill(getpid(), SIGUSR2);
		kill(getpid(), SIGRTMIN + 3);
		kill(getpid(), SIGRTMIN + 3);
		pthread_kill(pthread_self(), SIGINT);
	} else if (strcmp(mode, "blocking") == 0) {
		return blocking();
	} else if (strcmp(mode, "seccomp-strict") == 0) {
		char c;

		if (pipe(strict_pipe) || pipe(never_pipe))
			return 2;
		pthread_create(&thread, NULL, strict_checker, NULL);
		prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
		/* read() and write() are all strict mode allows; the checker ends the process */
		if (write(strict_pipe[1], "s", 1) != 1 || read(never_pipe[0], &c, 1) != 1)
			syscall(__NR_exit, 3);
		syscall(__NR_exit, 4);
	} else if (strcmp(mode, "seccomp-kill") == 0) {
		set_handler(SIGSYS, SA_SIGINFO, 0);
		pthread_create(&thread, NULL, spinner, map_anon(page_size()));
		if (seccomp_filter(SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_TRAP))
			return 2;
	} else if (strcmp(mode, "seccomp-errno") == 0) {
		if (seccomp_filter(SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ALLOW))
			return 2;
	} else if (strcmp(mode, "leader-exited") == 0) {
		pthread_create(&thread, NULL, spinner, map_anon(page_size()));
		pthread_create(&thread, NULL, leaderless_checker, NULL);
		announce();
		pthread_exit(NULL);
	} else if (strcmp(mode, "vfork-wait") == 0) {
		int ok;

		if (pipe(vfork_release))
			return 2;
		pthread_create(&thread, NULL, vfork_waiter, NULL);
		while (!atomic_load(&vfork_waiting))
			usleep(1000);
		usleep(50000); /* into clone() */
		announce();
		wait_usr1();
		ok = verify(1);
		if (write(vfork_release[1], "x", 1) != 1)
			return 2;
		pthread_join(thread, NULL);
		return ok && !atomic_load(&bad) ? 0 : 1;
	} else if (strcmp(mode, "registers") == 0) {
		int kept;

		pthread_create(&thread, NULL, vector_checker, NULL);
		kept = vector_spin();
		pthread_join(thread, NULL);
		return kept && vector_verified ? 0 : 1;
	} else if (strcmp(mode, "plain") != 0) {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	announce();
	wait_usr1();
	return verify(1) ? 0 : 1;
}
