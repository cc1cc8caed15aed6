/*
 * The memcr launcher for non-root deployments.
 *
 * A Python script cannot carry file capabilities, so this small program
 * does: installed as PREFIX/bin/memcr with `setcap cap_sys_ptrace=ep`,
 * mode 0750 and the memcr group, it raises CAP_SYS_PTRACE into the
 * inheritable and ambient sets (so the interpreter keeps it across execve),
 * replaces the environment with a fixed one and runs
 * PYTHON -I -m memcr ARGS... (-I: no user site, no PYTHON* variables).
 * Without the capability it still runs memcr, which then says which right
 * is missing.
 */
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
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

int main(int argc, char **argv)
{
	static char *env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", NULL};
	char **args = calloc((size_t)argc + 4, sizeof(*args));

	if (!args)
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
