/* mlocked: 8 MiB locked with mlock() beside 32 MiB of ordinary memory. */
#include "common.h"

int main(void)
{
	size_t locked_bytes = 8u << 20, bytes = 32u << 20;
	uint64_t *locked = map_anon(locked_bytes), *region = map_anon(bytes);
	sigset_t set;
	int ok = 1;

	fill(locked, locked_bytes, 11);
	fill(region, bytes, 12);
	if (mlock(locked, locked_bytes) != 0) {
		perror("mlock");
		return 2;
	}
	block_usr1(&set);
	announce_and_wait(&set);
	ok &= state_intact(1);
	ok &= check("locked", locked, locked_bytes, 11);
	ok &= check("region", region, bytes, 12);
	return ok ? 0 : 1;
}
