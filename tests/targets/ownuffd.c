/*
 * ownuffd MIB [hold]: MIB MiB of patterned private anonymous memory. On stdin:
 *   try     make a userfaultfd of its own (UFFD_USER_MODE_ONLY) and register
 *           the region for missing faults, as a program that serves its own
 *           faults (a garbage collector, a snapshotter) does; print
 *           "registered 0" or "registered ERRNO", and let it go again.
 *           With "hold" the userfaultfd is made at start and kept open, as
 *           such programs do, and only the registration comes and goes.
 *   check   print "intact" or "bad PAGE"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include "common.h"

int main(int argc, char **argv)
{
	size_t bytes = (size_t)(argc > 1 ? atoi(argv[1]) : 8) << 20, page = page_size();
	unsigned char *region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char line[64];
	int held = argc > 2 && !strcmp(argv[2], "hold") ? (int)syscall(__NR_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY) : -1;
	struct uffdio_api held_api = { .api = UFFD_API };

	if (region == MAP_FAILED || (argc > 2 && (held < 0 || ioctl(held, UFFDIO_API, &held_api))))
		return 2;
	for (size_t i = 0; i < bytes; i++)
		region[i] = (unsigned char)(i * 31 / page + i);
	setvbuf(stdout, NULL, _IONBF, 0);
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "try", 3)) {
			int fd = held >= 0 ? held : (int)syscall(__NR_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
			struct uffdio_api api = { .api = UFFD_API };
			struct uffdio_range range = { (unsigned long)region, bytes };
			struct uffdio_register reg = {
				.range = { (unsigned long)region, bytes },
				.mode = UFFDIO_REGISTER_MODE_MISSING,
			};
			int err = 0;

			if (fd < 0 || (held < 0 && ioctl(fd, UFFDIO_API, &api)) || ioctl(fd, UFFDIO_REGISTER, &reg))
				err = errno;
			else if (held >= 0 && ioctl(fd, UFFDIO_UNREGISTER, &range))
				err = errno;
			if (fd >= 0 && held < 0)
				close(fd);
			printf("registered %d\n", err);
		} else if (!strncmp(line, "check", 5)) {
			size_t i;

			for (i = 0; i < bytes && region[i] == (unsigned char)(i * 31 / page + i); i++)
				;
			if (i == bytes)
				printf("intact\n");
			else
				printf("bad %zu\n", i / page);
		}
	}
	return 0;
}
