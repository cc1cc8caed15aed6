/*
 * uring: an io_uring read of 8 bytes from stdin (a pipe the test holds)
 * into the middle of a patterned buffer, armed before "ready" while the
 * pipe is still empty. The test writes the bytes while memcr holds the
 * process; on SIGUSR1 the target waits for the completion and checks that
 * the buffer holds the pattern with exactly those 8 bytes in place.
 * "uring async" hands the read to an io_uring worker thread (IOSQE_ASYNC),
 * which writes the bytes the moment they arrive, frozen process or not.
 * "uring open FIFO" opens the FIFO for reading through io_uring instead, in
 * a worker thread, which waits in the open until the test opens the other end;
 * the bytes are read from the new descriptor after SIGUSR1.
 */
#include <fcntl.h>
#include <linux/io_uring.h>
#include <sys/syscall.h>

#include "common.h"

#define BUFFER_PAGES 16 /* the buffer's size: 64 KiB with 4 KiB pages */
#define AT_PAGE 1       /* where in it the bytes land: the start of its second page */
static const char expected[8] = "parkedIO";

static long ring_setup(unsigned entries, struct io_uring_params *p)
{
	return syscall(__NR_io_uring_setup, entries, p);
}

static long ring_enter(int fd, unsigned submit, unsigned wait)
{
	return syscall(__NR_io_uring_enter, fd, submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
}

int main(int argc, char **argv)
{
	struct io_uring_params p = {0};
	size_t page = page_size();
	size_t buffer_bytes = BUFFER_PAGES * page, at = AT_PAGE * page;
	uint64_t *buffer = map_anon(buffer_bytes);
	uint64_t *want = malloc(buffer_bytes);
	sigset_t set;
	int ok = 1;

	fill(buffer, buffer_bytes, 41);
	memcpy(want, buffer, buffer_bytes);
	memcpy((char *)want + at, expected, sizeof(expected));

	int fd = (int)ring_setup(4, &p);
	if (fd < 0) {
		perror("io_uring_setup");
		return 2;
	}
	size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
	char *cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
	struct io_uring_sqe *sqes = mmap(NULL, p.sq_entries * sizeof(*sqes), PROT_READ | PROT_WRITE,
					 MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
	if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
		perror("mmap ring");
		return 2;
	}
	unsigned *tail = (unsigned *)(sq + p.sq_off.tail);
	unsigned *array = (unsigned *)(sq + p.sq_off.array);
	memset(&sqes[0], 0, sizeof(sqes[0]));
	int opening = argc > 2 && strcmp(argv[1], "open") == 0;
	if (opening) {
		sqes[0].opcode = IORING_OP_OPENAT;
		sqes[0].fd = AT_FDCWD;
		sqes[0].addr = (unsigned long)argv[2];
		sqes[0].open_flags = O_RDONLY;
		sqes[0].flags = IOSQE_ASYNC; /* else the kernel tries O_NONBLOCK first, which a FIFO grants */
	} else {
		sqes[0].opcode = IORING_OP_READ;
		sqes[0].fd = 0;
		sqes[0].addr = (unsigned long)((char *)buffer + at);
		sqes[0].len = sizeof(expected);
		sqes[0].off = (unsigned long long)-1;
	}
	if (argc > 1 && strcmp(argv[1], "async") == 0)
		sqes[0].flags = IOSQE_ASYNC;
	array[0] = 0;
	__atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
	if (ring_enter(fd, 1, 0) != 1) {
		perror("io_uring_enter");
		return 2;
	}

	block_usr1(&set);
	announce_and_wait(&set);
	ok &= state_intact(1);
	if (ring_enter(fd, 0, 1) < 0) {
		perror("io_uring_enter wait");
		return 2;
	}
	struct io_uring_cqe *cqe = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
	if (opening) {
		if (cqe[0].res < 0 || read(cqe[0].res, (char *)buffer + at, sizeof(expected)) != sizeof(expected)) {
			fprintf(stderr, "the open completed with %d\n", cqe[0].res);
			return 1;
		}
	} else if (cqe[0].res != (int)sizeof(expected)) {
		fprintf(stderr, "the read completed with %d\n", cqe[0].res);
		ok = 0;
	}
	for (size_t i = 0; i < buffer_bytes / 8; i++)
		if (buffer[i] != want[i]) {
			fprintf(stderr, "buffer: bad word at offset %zu\n", i * 8);
			ok = 0;
			break;
		}
	return ok ? 0 : 1;
}
