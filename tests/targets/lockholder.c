/*
 * lockholder FILE: not a target but the tests' accomplice. It holds FILE's
 * inode lock, the way a write stuck on slow storage does: a thread writes
 * to FILE from a page that faults into a userfaultfd nobody answers. It
 * prints "holding", and on a line (or EOF) on stdin answers the fault,
 * which lets the write finish and the lock go.
 */
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

#include "common.h"

static int file;
static char *page;

static void *write_from_page(void *unused)
{
	(void)unused;
	if (write(file, page, 4096) != 4096)
		perror("write");
	return NULL;
}

int main(int argc, char **argv)
{
	struct uffdio_api api = {.api = UFFD_API};
	struct uffdio_register reg = {.mode = UFFDIO_REGISTER_MODE_MISSING};
	pthread_t writer;
	char line[8];
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);

	if (argc < 2 || (file = open(argv[1], O_WRONLY | O_CLOEXEC)) < 0)
		return 2;
	page = map_anon(4096);
	reg.range.start = (uintptr_t)page;
	reg.range.len = 4096;
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0 || ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
		perror("userfaultfd");
		return 2;
	}
	pthread_create(&writer, NULL, write_from_page, NULL);
	sleep(1); /* the write has taken the lock and waits in the fault */
	printf("holding\n");
	fflush(stdout);
	if (read(0, line, sizeof(line)) < 0)
		perror("read");
	struct uffdio_zeropage zero = {.range = {.start = (uintptr_t)page, .len = 4096}};
	ioctl(uffd, UFFDIO_ZEROPAGE, &zero);
	pthread_join(writer, NULL);
	return 0;
}
