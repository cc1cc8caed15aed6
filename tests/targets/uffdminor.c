/*
 * uffdminor: private copies of a memfd's pages, in a range the process
 * registered with userfaultfd in minor-fault mode ("ui" in VmFlags), as a
 * VM or a live-migration helper does. Its faults go to the process's own
 * handler, which cannot answer while memcr holds it frozen: memcr must
 * leave the range alone (and everything else round-trips). On SIGUSR1 it
 * checks that memory, an ordinary region and its state. "uffdminor probe"
 * exits 0 once set up, or 3 on a kernel without minor faults on shmem.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

#include "common.h"

#define MINOR (4u << 20)
#define REGION (16u << 20)

int main(int argc, char **argv)
{
	uint64_t *region = map_anon(REGION), *minor;
	struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MINOR_SHMEM};
	struct uffdio_register reg = {.mode = UFFDIO_REGISTER_MODE_MINOR};
	sigset_t usr1;
	int fd = memfd_create("minor", 0), uffd;

	if (fd < 0 || ftruncate(fd, MINOR) != 0)
		return 2;
	minor = mmap(NULL, MINOR, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (minor == MAP_FAILED)
		return 2;
	fill(minor, MINOR, 31); /* private copies of the memfd's pages */
	fill(region, REGION, 32);
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
	reg.range.start = (uintptr_t)minor;
	reg.range.len = MINOR;
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0 || ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
		perror("userfaultfd minor mode");
		return 3; /* the test skips on a kernel without it */
	}
	if (argc > 1 && strcmp(argv[1], "probe") == 0)
		return 0;
	block_usr1(&usr1);
	announce_and_wait(&usr1);
	return state_intact(1) & check("minor", minor, MINOR, 31) & check("region", region, REGION, 32) ? 0 : 1;
}
