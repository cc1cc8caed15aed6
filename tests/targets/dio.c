/*
 * dio FILE MIB: a target whose thread reads a file with O_DIRECT all through
 * its parks: the kernel pins the buffer's pages for each read (a write
 * fault: memcr's write tracking counts them written) and the device
 * writes into them later, past any page table. It writes FILE (SPAN MiB:
 * 4 times MIB, each 8-byte word at byte b holding mix(b / 8)) and syncs it,
 * then reads MIB MiB of it at a time into an anonymous buffer, each read
 * from the offset its count picks. Commands on stdin, one a line:
 *
 *   go           start reading; print "going"
 *   check C      stop reading (the read under way ends first), check that
 *                the buffer holds what the last read put there and the
 *                process's own state (signal sets, dispositions, threads,
 *                memory map and VmFlags, "uw" aside); print "done C N"
 *                with N the reads so far (or "bad C ..." and exit 1)
 *   quit         exit 0
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include "common.h"
#include "watched.h"

#define SPANS 4

static int fd;
static size_t length;
static uint64_t *buffer;
static volatile uint64_t reads, last_offset; /* written once a read is whole */
static volatile int stopping;

static int read_at(uint64_t offset)
{
	for (size_t done = 0; done < length;) {
		ssize_t n = pread(fd, (char *)buffer + done, length - done, (off_t)(offset + done));
		if (n <= 0)
			return 0;
		done += (size_t)n;
	}
	last_offset = offset;
	reads = reads + 1;
	return 1;
}

static void *read_on(void *unused)
{
	(void)unused;
	while (!stopping)
		if (!read_at(mix(reads) % SPANS * length))
			exit(2);
	return NULL;
}

/* The first word of the buffer that is not the file's at the last read's offset, or -1. */
static long first_wrong(void)
{
	for (size_t i = 0; i < length / 8; i++)
		if (buffer[i] != mix(last_offset / 8 + i))
			return (long)i;
	return -1;
}

static int make_file(const char *path)
{
	int out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	uint64_t words[512];

	if (out < 0)
		return 0;
	for (size_t at = 0; at < SPANS * length; at += sizeof(words)) {
		for (size_t i = 0; i < 512; i++)
			words[i] = mix(at / 8 + i);
		if (write(out, words, sizeof(words)) != (ssize_t)sizeof(words))
			return 0;
	}
	return fsync(out) == 0 && close(out) == 0;
}

static void go(const char *line)
{
	(void)line;
}

static int maps_kept(void)
{
	return 1;
}

int main(int argc, char **argv)
{
	struct worker worker = {read_on, go, first_wrong, maps_kept, &reads, &stopping};

	if (argc != 3) {
		fprintf(stderr, "usage: dio FILE MIB\n");
		return 2;
	}
	length = (size_t)atol(argv[2]) << 20;
	if (!make_file(argv[1])) {
		perror(argv[1]);
		return 2;
	}
	fd = open(argv[1], O_RDONLY | O_DIRECT | O_CLOEXEC);
	buffer = map_anon(length);
	if (fd < 0 || !read_at(0)) {
		perror("O_DIRECT read");
		return 2;
	}
	return serve_worker(&worker);
}
