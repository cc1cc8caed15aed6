/*
 * The memcr launcher for non-root deployments.
 *
 * A Python script cannot carry file capabilities, so this small program
 * does: installed as PREFIX/bin/memcr with `setcap cap_sys_ptrace=ep`,
 * mode 0750 and the memcr group, it raises CAP_SYS_PTRACE into the
 * inheritable and ambient sets (so the interpreter keeps it across execve),
 * replaces the environment with a fixed one and runs
 * PYTHON -I -m memcr ARGS... (-I: no user site, no PYTHON* variables),
 * once it has found that nobody but root could have swapped PYTHON.
 * Without the capability it still runs memcr, which then says which right
 * is missing.
 */
#include <limits.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PYTHON
#error "build with -DPYTHON='\"/opt/memcr/venv/bin/python\"'"
#endif

static int raise_ptrace_capability(void)
{
	struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];

	if (syscall(SYS_capget, &header, data) != 0)
		return -1;
	if (!(data[0].permitted & (1u << CAP_SYS_PTRACE)))
		return 0; /* nothing to pass on: memcr will name what is missing */
	data[0].inheritable |= 1u << CAP_SYS_PTRACE;
	if (syscall(SYS_capset, &header, data) != 0)
		return -1;
	return prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_PTRACE, 0, 0);
}

/*
 * Whether only root could change what PATH runs: each folder on the way and each symlink met, followed as
 * execve() follows them, must be root's and writable by root alone, or sticky (as /tmp, where nobody else
 * may rename what is root's); the file itself root's and writable by root alone. Another user who could
 * swap it would have a program of theirs run with CAP_SYS_PTRACE. 0, or -1 once it has said why not.
 */
static int only_root_can_swap(const char *path, int links)
{
	char walked[PATH_MAX], target[PATH_MAX], next[PATH_MAX];
	const char *rest = path;
	struct stat st;
	size_t len = 0;

	walked[0] = '\0';
	while (*rest) {
		size_t part = strcspn(rest, "/");
		int last = rest[part] == '\0';

		if (part && len + 1 + part >= sizeof(walked))
			goto too_long;
		if (part) {
			walked[len++] = '/';
			memcpy(walked + len, rest, part);
			walked[len += part] = '\0';
		}
		if (lstat(len ? walked : "/", &st) != 0) {
			fprintf(stderr, "memcr launcher: cannot check %s: %m\n", len ? walked : "/");
			return -1;
		}
		if (S_ISLNK(st.st_mode)) {
			ssize_t n = readlink(walked, target, sizeof(target) - 1);
			int written;

			if (st.st_uid != 0 || n < 0 || ++links > 40)
				goto unsafe;
			target[n] = '\0';
			len -= part + 1; /* what the link names takes its place, from its folder unless absolute */
			walked[len] = '\0';
			written = snprintf(next, sizeof(next), "%s%s%s%s", target[0] == '/' ? "" : walked,
					   target[0] == '/' ? "" : "/", target, rest + part);
			if (written < 0 || (size_t)written >= sizeof(next))
				goto too_long;
			return only_root_can_swap(next, links);
		}
		if (st.st_uid != 0 || (last ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode)) ||
		    ((st.st_mode & (S_IWGRP | S_IWOTH)) && (last || !(st.st_mode & S_ISVTX))))
			goto unsafe;
		rest += part + !last;
	}
	return 0;
unsafe:
	fprintf(stderr, "memcr launcher: refusing to run %s: %s (uid %u, mode %04o) could be swapped by a user "
		"other than root, whose program would get CAP_SYS_PTRACE: make it root's and writable by root "
		"alone, or install memcr again (make install-system)\n", PYTHON, len ? walked : "/",
		(unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
	return -1;
too_long:
	fprintf(stderr, "memcr launcher: refusing to run %s: a path on the way is too long to check\n", PYTHON);
	return -1;
}

int main(int argc, char **argv)
{
	static char *env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", NULL};
	char **args = calloc((size_t)argc + 4, sizeof(*args));

	if (!args || only_root_can_swap(PYTHON, 0) != 0)
		return 1;
	if (raise_ptrace_capability() != 0) {
		perror("memcr launcher: cannot pass CAP_SYS_PTRACE on");
		return 1;
	}
	args[0] = PYTHON;
	args[1] = "-I";
	args[2] = "-m";
	args[3] = "memcr";
	for (int i = 1; i < argc; i++)
		args[i + 3] = argv[i];
	execve(PYTHON, args, env);
	perror("memcr launcher: cannot run " PYTHON);
	return 1;
}
