/*
 * uringwork MODE: io_uring's own threads in the states memcr must tell apart
 * before it stops them. Each mode holds a patterned region, prints "ready"
 * and on SIGUSR1 checks the region, its state and the completions it saw.
 *  idle          one NOP handed to a worker (IOSQE_ASYNC) has completed: the
 *                worker waits for work, and a stop breaks nothing
 *  sqpoll        a SQPOLL ring whose submission thread sleeps, idle
 *  linked F FIFO a write to F in a worker (IOSQE_ASYNC), linked to an open
 *                of FIFO: while another process holds F's inode lock the
 *                worker waits uninterruptibly, then opens the FIFO in the
 *                same breath; the open must succeed once the test writes
 *                "parkedIO" into the FIFO
 *  renamed FIFO  an open of FIFO in a worker (IOSQE_ASYNC), asleep until the
 *                test writes "parkedIO"; the process names that worker
 *                iou-sqp-0 (/proc/self/task/TID/comm, as any thread of its
 *                own): it is in a request all the same
 */
#include <dirent.h>
#include <linux/io_uring.h>
#include <sys/syscall.h>

#include "common.h"

#define REGION (8u << 20)

static struct io_uring_params params;
static char *sq_ring, *cq_ring;
static struct io_uring_sqe *sqes;
static int ring;

static void setup(unsigned flags)
{
	params.flags = flags;
	params.sq_thread_idle = 100; /* ms: the SQPOLL thread sleeps soon */
	ring = (int)syscall(__NR_io_uring_setup, 4, &params);
	if (ring < 0) {
		perror("io_uring_setup");
		exit(2);
	}
	sq_ring = mmap(NULL, params.sq_off.array + params.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
	cq_ring = mmap(NULL, params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe),
		       PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
	sqes = mmap(NULL, params.sq_entries * sizeof(*sqes), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
		    IORING_OFF_SQES);
	if (sq_ring == MAP_FAILED || cq_ring == MAP_FAILED || sqes == MAP_FAILED) {
		perror("mmap ring");
		exit(2);
	}
	memset(sqes, 0, params.sq_entries * sizeof(*sqes));
}

static void submit(unsigned n)
{
	unsigned *tail = (unsigned *)(sq_ring + params.sq_off.tail);
	unsigned *array = (unsigned *)(sq_ring + params.sq_off.array);
	int sqpoll = params.flags & IORING_SETUP_SQPOLL;

	for (unsigned i = 0; i < n; i++)
		array[i] = i;
	__atomic_store_n(tail, *tail + n, __ATOMIC_RELEASE);
	if (syscall(__NR_io_uring_enter, ring, sqpoll ? 0 : n, 0, sqpoll ? IORING_ENTER_SQ_WAKEUP : 0, NULL, 0) < 0) {
		perror("io_uring_enter");
		exit(2);
	}
}

/* Wait for n completions; 1 if none failed, and the opened FIFO (request 2) holds "parkedIO". */
static int completed(unsigned n)
{
	unsigned *head = (unsigned *)(cq_ring + params.cq_off.head);
	unsigned *tail = (unsigned *)(cq_ring + params.cq_off.tail);
	struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq_ring + params.cq_off.cqes);
	int ok = 1;
	char got[8];

	while (__atomic_load_n(tail, __ATOMIC_ACQUIRE) - *head < n)
		syscall(__NR_io_uring_enter, ring, 0, n, IORING_ENTER_GETEVENTS, NULL, 0);
	for (unsigned i = 0; i < n; i++) {
		struct io_uring_cqe *cqe = &cqes[(*head + i) & (params.cq_entries - 1)];
		if (cqe->res < 0) {
			fprintf(stderr, "request %llu completed with %d\n", (unsigned long long)cqe->user_data, cqe->res);
			ok = 0;
		} else if (cqe->user_data == 2 &&
			   (read(cqe->res, got, sizeof(got)) != sizeof(got) || memcmp(got, "parkedIO", 8) != 0)) {
			fprintf(stderr, "the opened FIFO did not hold parkedIO\n");
			ok = 0;
		}
	}
	__atomic_store_n(head, *head + n, __ATOMIC_RELEASE);
	return ok;
}

/* Name each io_uring worker `name` once one is there (up to 10 s); 1 if one was. */
static int rename_workers(const char *name)
{
	int renamed = 0;

	for (int tries = 0; tries < 1000 && !renamed; tries++) {
		DIR *dir = opendir("/proc/self/task");
		struct dirent *task;

		while (dir && (task = readdir(dir)) != NULL) {
			char path[300], comm[32] = "";
			FILE *file;

			snprintf(path, sizeof(path), "/proc/self/task/%.200s/comm", task->d_name);
			if ((file = fopen(path, "r")) == NULL)
				continue;
			if (fgets(comm, sizeof(comm), file) == NULL)
				comm[0] = 0;
			fclose(file);
			if (strncmp(comm, "iou-wrk-", 8) != 0 || (file = fopen(path, "w")) == NULL)
				continue;
			renamed |= fputs(name, file) >= 0;
			renamed &= fclose(file) == 0;
		}
		if (dir)
			closedir(dir);
		if (!renamed)
			usleep(10000);
	}
	return renamed;
}

int main(int argc, char **argv)
{
	static const char data[8] = "parkedIO";
	uint64_t *region = map_anon(REGION);
	sigset_t usr1;
	int ok = 1, linked = argc > 3 && strcmp(argv[1], "linked") == 0;

	if (argc < 2)
		return 2;
	fill(region, REGION, 51);
	block_usr1(&usr1);
	setup(strcmp(argv[1], "sqpoll") == 0 ? IORING_SETUP_SQPOLL : 0);
	if (linked) {
		int file = open(argv[2], O_WRONLY | O_CLOEXEC);
		if (file < 0) {
			perror(argv[2]);
			return 2;
		}
		sqes[0] = (struct io_uring_sqe){.opcode = IORING_OP_WRITE, .fd = file, .addr = (uintptr_t)data,
						.len = sizeof(data), .flags = IOSQE_ASYNC | IOSQE_IO_LINK, .user_data = 1};
		sqes[1] = (struct io_uring_sqe){.opcode = IORING_OP_OPENAT, .fd = AT_FDCWD, .addr = (uintptr_t)argv[3],
						.open_flags = O_RDONLY, .flags = IOSQE_ASYNC, .user_data = 2};
		submit(2);
		announce_and_wait(&usr1);
		ok &= completed(2);
	} else if (strcmp(argv[1], "renamed") == 0 && argc > 2) {
		sqes[0] = (struct io_uring_sqe){.opcode = IORING_OP_OPENAT, .fd = AT_FDCWD, .addr = (uintptr_t)argv[2],
						.open_flags = O_RDONLY, .flags = IOSQE_ASYNC, .user_data = 2};
		submit(1);
		if (!rename_workers("iou-sqp-0")) {
			fprintf(stderr, "no io_uring worker to rename\n");
			return 2;
		}
		announce_and_wait(&usr1);
		ok &= completed(1);
	} else {
		sqes[0] = (struct io_uring_sqe){.opcode = IORING_OP_NOP, .flags = IOSQE_ASYNC, .user_data = 1};
		submit(1);
		ok &= completed(1);
		announce_and_wait(&usr1);
	}
	ok &= state_intact(1);
	ok &= check("region", region, REGION, 51);
	return ok ? 0 : 1;
}
