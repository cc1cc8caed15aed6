/* text MIB: MIB MiB of English-like text (each MiB the same), verified on SIGUSR1. */
#include "common.h"

static const char *words[] = {"the", "memory", "of", "a", "process", "is", "saved", "to",
			      "disk", "and", "given", "back", "when", "it", "wakes", "up"};

static void make_text(char *buf, size_t bytes)
{
	uint64_t state = 42;
	size_t i = 0;

	while (i < bytes) {
		const char *w = words[(state = mix(state)) % 16];
		for (size_t j = 0; w[j] && i < bytes; j++)
			buf[i++] = w[j];
		if (i < bytes)
			buf[i++] = (state & 7) ? ' ' : '\n';
	}
}

int main(int argc, char **argv)
{
	size_t bytes = (size_t)(argc > 1 ? atol(argv[1]) : 32) << 20;
	char *region = map_anon(bytes), *expect = malloc(1 << 20);
	sigset_t set;

	for (size_t off = 0; off < bytes; off += 1 << 20)
		make_text(region + off, 1 << 20);
	remember_args(argc, argv);
	block_usr1(&set);
	announce_and_wait(&set);
	if (!state_intact(1))
		return 1;
	if (!check_args(argv))
		return 1;
	for (size_t off = 0; off < bytes; off += 1 << 20) {
		make_text(expect, 1 << 20);
		if (memcmp(expect, region + off, 1 << 20)) {
			fprintf(stderr, "text differs in MiB %zu\n", off >> 20);
			return 1;
		}
	}
	return 0;
}
