/*
 * The parasite: a freestanding thread inside the frozen target. It listens
 * on a UNIX socket, lets in only the memcr that knows the nonce, and then
 * serves the commands of protocol.h on the target's own memory. No libc:
 * it shares the address space of a process whose libc state is unknown.
 */
#include <linux/fcntl.h>
#include <linux/stat.h>

#include "protocol.h"
#include "syscall.h"

#define AF_UNIX 1
#define SOCK_STREAM 1
#define SOCK_CLOEXEC 02000000
#define MSG_WAITALL 0x100
#define MSG_NOSIGNAL 0x4000
#define SOL_SOCKET 1
#define SO_RCVTIMEO 20
#define MADV_DONTNEED 4
#define MADV_POPULATE_WRITE 23
#define RECV_PIECE (1UL << 20)
#define EINTR 4
#define EINVAL 22
#define EPIPE 32
#define ENOTSOCK 88
#define SCM_RIGHTS 1
#define USERFAULTFD_IOC_NEW 0xaa00 /* _IO(0xAA, 0x00) */

struct parasite_args parasite_args __attribute__((visibility("hidden")));

static unsigned char pagemap_buf[PARASITE_PAGEMAP_MAX];

/*
 * Move exactly len bytes through a socket (every descriptor here is one):
 * nr is __NR_sendto or __NR_recvfrom. MSG_WAITALL: one wake-up per request,
 * not one per socket buffer; MSG_NOSIGNAL: a vanished memcr must not raise
 * SIGPIPE in the target.
 */
static long transfer(long nr, int fd, char *p, unsigned long len, long flags)
{
	while (len) {
		long n = sys6(nr, fd, (long)p, len, flags, 0, 0);
		if (n == -EINTR)
			continue;
		if (n <= 0)
			return n ? n : -EPIPE;
		p += n;
		len -= n;
	}
	return 0;
}

#define write_all(fd, buf, len) transfer(__NR_sendto, fd, (char *)(buf), len, MSG_NOSIGNAL)
#define read_all(fd, buf, len) transfer(__NR_recvfrom, fd, (char *)(buf), len, MSG_WAITALL)

static int same_bytes(const unsigned char *a, const unsigned char *b, int len)
{
	int diff = 0;

	for (int i = 0; i < len; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

static long reply(int fd, long result)
{
	long long r = result;

	return write_all(fd, &r, sizeof(r));
}

static int fail(struct parasite_args *a, int step, long err)
{
	a->failed_step = step;
	a->failed_errno = (int)-err;
	a->status = PARASITE_STATUS_FAILED;
	return 1;
}

/* A set-up step failed after the socket existed: leave the target no descriptor. */
static int fail_closing(struct parasite_args *a, int step, long err)
{
	sys3(__NR_close, a->listen_fd, 0, 0);
	a->listen_fd = -1;
	return fail(a, step, err);
}

static long send_pagemap(int cfd, volatile int *pagemap_fd, unsigned long page_size,
			 const struct parasite_cmd *c)
{
	long n, r;

	if (c->len > PARASITE_PAGEMAP_MAX || c->len % 8)
		return reply(cfd, -EINVAL);
	if (*pagemap_fd < 0) {
		long fd = sys4(__NR_openat, AT_FDCWD, "/proc/self/pagemap", O_RDONLY | O_CLOEXEC, 0);
		if (fd < 0)
			return reply(cfd, fd);
		*pagemap_fd = (int)fd;
	}
	/* pagemap holds one 8-byte entry per page, indexed by page number */
	n = sys4(__NR_pread64, *pagemap_fd, pagemap_buf, c->len, (c->addr / page_size) * 8);
	r = reply(cfd, n);
	if (r < 0 || n <= 0)
		return r;
	return write_all(cfd, pagemap_buf, n);
}

/*
 * Fault each piece in with one call instead of a fault per page, just
 * before its bytes come: memcr prepares the next bytes meanwhile.
 */
static long recv_pages(int cfd, const struct parasite_cmd *c)
{
	unsigned long done, n;
	long r = 0;

	for (done = 0; done < c->len && !r; done += n) {
		n = c->len - done < RECV_PIECE ? c->len - done : RECV_PIECE;
		sys3(__NR_madvise, c->addr + done, n, MADV_POPULATE_WRITE);
		r = read_all(cfd, (void *)(c->addr + done), n);
	}
	return r;
}

/* The kernel's struct msghdr and a control buffer for one descriptor, as on every 64-bit ABI. */
struct iov {
	void *base;
	unsigned long len;
};

struct one_fd_msg {
	void *name;
	int namelen;
	struct iov *iov;
	unsigned long iovlen;
	void *control;
	unsigned long controllen;
	int flags;
};

struct one_fd_cmsg {
	unsigned long len;
	int level;
	int type;
	int fd;
	int pad;
};

/* sendmsg or recvmsg of len bytes at p with one descriptor (fd, or -1 to receive one). */
static long fd_message(long nr, int cfd, void *p, unsigned long len, int *fd)
{
	struct iov iov = {p, len};
	struct one_fd_cmsg cm = {20 /* CMSG_LEN(sizeof(int)) */, SOL_SOCKET, SCM_RIGHTS, *fd, 0};
	struct one_fd_msg m = {0, 0, &iov, 1, &cm, sizeof(cm), 0};
	long n;

	do
		n = sys3(nr, cfd, &m, nr == __NR_sendmsg ? MSG_NOSIGNAL : MSG_WAITALL);
	while (n == -EINTR);
	if (n >= 0 && (unsigned long)n != len)
		return -EPIPE;
	if (n >= 0 && nr == __NR_recvmsg) {
		if (m.controllen < 20 || cm.level != SOL_SOCKET || cm.type != SCM_RIGHTS)
			return -EINVAL;
		*fd = cm.fd;
	}
	return n < 0 ? n : 0;
}

static struct iov send_table[PARASITE_SEND_RUNS];

/*
 * The table of runs is an iovec array as it comes: one sendmsg sends many
 * runs, however sparse, without a command or a system call for each.
 */
static long send_runs(int cfd, const struct parasite_cmd *c)
{
	struct one_fd_msg m = {0, 0, send_table, 0, 0, 0, 0};
	unsigned long i = 0, n = c->len / sizeof(struct iov);
	long sent;

	/* memcr waits for page bytes, not for a reply: a bad table can only end the stream */
	if (c->len % sizeof(struct iov) || n > PARASITE_SEND_RUNS)
		return -EINVAL;
	sent = read_all(cfd, send_table, c->len);
	while (sent >= 0 && i < n) {
		while (i < n && (unsigned long)sent >= send_table[i].len)
			sent -= send_table[i++].len;
		if (i == n)
			break;
		send_table[i].base = (char *)send_table[i].base + sent;
		send_table[i].len -= sent;
		m.iov = send_table + i;
		m.iovlen = n - i;
		do
			sent = sys3(__NR_sendmsg, cfd, &m, MSG_NOSIGNAL);
		while (sent == -EINTR);
		if (sent == 0)
			sent = -EPIPE;
	}
	return sent < 0 ? sent : 0;
}

static long new_userfaultfd(int cfd, const struct parasite_cmd *c)
{
	long long result;
	unsigned char byte;
	int dev = -1, ufd;
	long r;

	if (c->len) {
		r = fd_message(__NR_recvmsg, cfd, &byte, 1, &dev);
		if (r < 0)
			return r;
		result = sys3(__NR_ioctl, dev, USERFAULTFD_IOC_NEW, c->arg);
		sys3(__NR_close, dev, 0, 0);
	} else {
		result = sys3(__NR_userfaultfd, c->arg, 0, 0);
	}
	if (result < 0)
		return reply(cfd, result);
	ufd = (int)result;
	r = fd_message(__NR_sendmsg, cfd, &result, sizeof(result), &ufd);
	sys3(__NR_close, ufd, 0, 0);
	return r;
}

/* Serve one authenticated connection until END; < 0 when the stream broke. */
static long serve(struct parasite_args *a, int cfd)
{
	struct parasite_cmd c;
	long r;

	for (;;) {
		r = read_all(cfd, &c, sizeof(c));
		if (r < 0)
			break;
		switch (c.op) {
		case PARASITE_OP_SEND:
			r = send_runs(cfd, &c);
			break;
		case PARASITE_OP_PAGEMAP:
			r = send_pagemap(cfd, &a->pagemap_fd, a->page_size, &c);
			break;
		case PARASITE_OP_DROP:
			r = reply(cfd, sys3(__NR_madvise, c.addr, c.len, MADV_DONTNEED));
			break;
		case PARASITE_OP_RECV:
			r = recv_pages(cfd, &c);
			if (r == 0)
				r = reply(cfd, 0);
			break;
		case PARASITE_OP_UFFD:
			r = new_userfaultfd(cfd, &c);
			break;
		case PARASITE_OP_END:
			reply(cfd, 0);
			r = 1;
			break;
		default:
			r = reply(cfd, -EINVAL);
			break;
		}
		if (r)
			break;
	}
	if (a->pagemap_fd >= 0)
		sys3(__NR_close, a->pagemap_fd, 0, 0);
	a->pagemap_fd = -1;
	return r;
}

static int named_socket(const struct parasite_args *a)
{
	return a->sun_path[0] != '\0';
}

static void set_recv_timeout(long fd, long seconds)
{
	long timeval[2] = {seconds, 0};

	sys6(__NR_setsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, (long)timeval, sizeof(timeval), 0);
}

/*
 * Accept connections until one proves it knows nonce_in. A stranger gets
 * one second to do so, then the next connection is served.
 */
static int accept_memcr(struct parasite_args *a, int lfd)
{
	unsigned char nonce[PARASITE_NONCE_LEN];

	for (;;) {
		long cfd = sys4(__NR_accept4, lfd, 0, 0, SOCK_CLOEXEC);
		if (cfd == -EINTR)
			continue;
		if (cfd < 0) {
			fail(a, PARASITE_STEP_ACCEPT, cfd);
			return -1;
		}
		a->conn_fd = (int)cfd;
		set_recv_timeout(cfd, 1);
		if (read_all(cfd, nonce, sizeof(nonce)) == 0 &&
		    same_bytes(nonce, a->nonce_in, sizeof(nonce)) &&
		    write_all(cfd, a->nonce_out, sizeof(a->nonce_out)) == 0) {
			set_recv_timeout(cfd, 0);
			return (int)cfd;
		}
		sys3(__NR_close, cfd, 0, 0);
		a->conn_fd = -1;
	}
}

/*
 * Give the socket file just bound the group sock_gid through a descriptor
 * of what its path names now, which must be a socket of this user with no
 * other name: a user who may write in the folder and put something else
 * there meanwhile (a symlink, a hard link to another socket) makes the
 * checkpoint fail (-ENOTSOCK) rather than have another file change group.
 */
static long give_group(const struct parasite_args *a)
{
	struct statx st;
	long fd, r;

	fd = sys4(__NR_openat, AT_FDCWD, a->sun_path, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0);
	if (fd < 0)
		return fd;
	r = sys6(__NR_statx, fd, (long)"", AT_EMPTY_PATH, STATX_TYPE | STATX_NLINK | STATX_UID, (long)&st, 0);
	if (r == 0 && (!S_ISSOCK(st.stx_mode) || st.stx_nlink != 1 ||
		       st.stx_uid != (unsigned int)sys3(__NR_geteuid, 0, 0, 0)))
		r = -ENOTSOCK;
	if (r == 0)
		r = sys6(__NR_fchownat, fd, (long)"", -1, a->sock_gid, AT_EMPTY_PATH, 0);
	sys3(__NR_close, fd, 0, 0);
	return r;
}

int parasite_main(struct parasite_args *a) __attribute__((visibility("hidden")));

int parasite_main(struct parasite_args *a)
{
	long lfd, r, umask = 0;
	int cfd;

	/* a zero page size would divide by zero in send_pagemap, killing the target */
	if (a->magic != PARASITE_ARGS_MAGIC || a->page_size == 0)
		return fail(a, PARASITE_STEP_SOCKET, -EINVAL);
	lfd = sys3(__NR_socket, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		return fail(a, PARASITE_STEP_SOCKET, lfd);
	a->listen_fd = (int)lfd;
	if (named_socket(a)) {
		/*
		 * bind() gives the file the mode of the unbound socket's inode
		 * less the umask: without one, the file is born with sock_mode
		 * and its mode is never set through its path, which a user who
		 * may write in the folder could point elsewhere meanwhile. The
		 * umask is the whole target's (CLONE_FS): memcr holds its every
		 * other thread stopped meanwhile.
		 */
		r = sys3(__NR_fchmod, lfd, a->sock_mode, 0);
		if (r < 0)
			return fail_closing(a, PARASITE_STEP_CHMOD, r);
		umask = sys3(__NR_umask, 0, 0, 0);
	}
	r = sys3(__NR_bind, lfd, &a->sun_family, a->addrlen);
	if (named_socket(a))
		sys3(__NR_umask, umask, 0, 0);
	if (r < 0)
		return fail_closing(a, PARASITE_STEP_BIND, r);
	if (named_socket(a) && a->sock_gid >= 0) {
		r = give_group(a);
		if (r < 0) {
			sys3(__NR_unlinkat, AT_FDCWD, a->sun_path, 0);
			return fail_closing(a, PARASITE_STEP_CHMOD, r);
		}
	}
	r = sys3(__NR_listen, lfd, 1, 0);
	if (r < 0) {
		if (named_socket(a))
			sys3(__NR_unlinkat, AT_FDCWD, a->sun_path, 0);
		return fail_closing(a, PARASITE_STEP_LISTEN, r);
	}
	a->status = PARASITE_STATUS_LISTENING;

	cfd = accept_memcr(a, (int)lfd);
	if (cfd >= 0) {
		a->status = PARASITE_STATUS_SERVING;
		serve(a, cfd);
		sys3(__NR_close, cfd, 0, 0);
		a->conn_fd = -1;
	}
	if (named_socket(a))
		sys3(__NR_unlinkat, AT_FDCWD, a->sun_path, 0);
	sys3(__NR_close, lfd, 0, 0);
	a->listen_fd = -1;
	return 0;
}
