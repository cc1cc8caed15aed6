/* fds: 1000 open descriptors (500 pipes) and 32 MiB of patterned memory. */
#include <fcntl.h>
#include <sys/resource.h>
#include "common.h"

#define PIPES 500

int main(void)
{
	struct rlimit lim = {4096, 4096};
	static int fds[PIPES][2];
	size_t bytes = 32u << 20;
	uint64_t *region;
	sigset_t set;
	int ok = 1;

	if (setrlimit(RLIMIT_NOFILE, &lim) != 0)
		perror("setrlimit");
	for (int i = 0; i < PIPES; i++)
		if (pipe(fds[i]) != 0) {
			perror("pipe");
			return 2;
		}
	region = map_anon(bytes);
	fill(region, bytes, 7);
	block_usr1(&set);
	announce_and_wait(&set);
	ok &= state_intact(1);

	for (int i = 0; i < PIPES; i++) {
		char c = (char)i, back = 0;
		if (fcntl(fds[i][0], F_GETFD) < 0 || fcntl(fds[i][1], F_GETFD) < 0 ||
		    write(fds[i][1], &c, 1) != 1 || read(fds[i][0], &back, 1) != 1 || back != c) {
			fprintf(stderr, "pipe %d broken\n", i);
			ok = 0;
		}
	}
	ok &= check("region", region, bytes, 7);
	return ok ? 0 : 1;
}
