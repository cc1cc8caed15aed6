/*
 * creds RUID EUID SUID [THREAD_UID [CHILD_UID]]: a process with chosen
 * credentials, started as root. Its main thread takes the uids RUID, EUID
 * and SUID (-1 keeps one as it is); with THREAD_UID a second thread runs as
 * that uid alone (-1: no such thread), and with CHILD_UID a child process
 * does. setresuid() through syscall(): glibc's wrapper would change every
 * thread of the process, the kernel's call changes the calling thread
 * only. Prints "child <pid>" and then "ready <pid>"; on SIGUSR1 it checks
 * its 4 MiB are intact and ends, and the child with it.
 */
#include <pthread.h>
#include <sys/syscall.h>

#include "common.h"

#define BYTES (4u << 20)

static int thread_ready[2];

static int take_uids(long ruid, long euid, long suid)
{
	return syscall(SYS_setresuid, ruid, euid, suid) == 0 ? 0 : (perror("setresuid"), -1);
}

static void *other_uid(void *arg)
{
	long uid = (long)arg;
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL); /* SIGUSR1 is the main thread's */
	if (take_uids(uid, uid, uid) != 0 || write(thread_ready[1], "x", 1) != 1)
		exit(2);
	for (;;)
		pause();
	return NULL;
}

int main(int argc, char **argv)
{
	long thread_uid = argc > 4 ? atol(argv[4]) : -1, child_uid = argc > 5 ? atol(argv[5]) : -1;
	uint64_t *mem = map_anon(BYTES);
	pthread_t thread;
	sigset_t set;
	int sig, lifeline[2];
	char byte;

	if (argc < 4 || pipe(thread_ready) != 0 || pipe(lifeline) != 0)
		return 2;
	fill(mem, BYTES, 71);
	block_usr1(&set);
	if (child_uid >= 0) {
		pid_t child = fork();

		if (child == 0) {
			/*
			 * The parent ends, so does the child: when the pipe's last writer is gone. Not a
			 * parent-death signal, which the kernel sends with the parent's rights, and those
			 * are not enough for a child of another uid.
			 */
			close(lifeline[1]);
			if (take_uids(child_uid, child_uid, child_uid) != 0)
				_exit(2);
			while (read(lifeline[0], &byte, 1) != 0)
				;
			_exit(0);
		}
		close(lifeline[0]);
		printf("child %d\n", child);
	}
	if (thread_uid >= 0 && (pthread_create(&thread, NULL, other_uid, (void *)thread_uid) != 0 ||
				read(thread_ready[0], &byte, 1) != 1))
		return 2;
	if (take_uids(atol(argv[1]), atol(argv[2]), atol(argv[3])) != 0)
		return 2;
	printf("ready %d\n", getpid());
	fflush(stdout);
	while (sigwait(&set, &sig) != 0 || sig != SIGUSR1)
		;
	return check("memory", mem, BYTES, 71) ? 0 : 1;
}
