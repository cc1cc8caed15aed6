/*
 * Wire protocol between memcr and its parasite. See README.md beside this
 * file. memcr/engine/parasite_protocol.py is memcr's side: the build checks every
 * PARASITE_* number and every field's offset and size against it
 * (gen_protocol_check.py), and fails on any difference.
 */
#ifndef MEMCR_PARASITE_PROTOCOL_H
#define MEMCR_PARASITE_PROTOCOL_H

#define PARASITE_ARGS_MAGIC 0x4d435031u /* "MCP1" */

/* Values the parasite stores in parasite_args.status. */
#define PARASITE_STATUS_STARTING 0
#define PARASITE_STATUS_LISTENING 1
#define PARASITE_STATUS_SERVING 2
#define PARASITE_STATUS_FAILED 3

/* Step that failed, stored in parasite_args.failed_step with the errno. */
#define PARASITE_STEP_SOCKET 1
#define PARASITE_STEP_BIND 2
#define PARASITE_STEP_CHMOD 3
#define PARASITE_STEP_LISTEN 4
#define PARASITE_STEP_ACCEPT 5

#define PARASITE_NONCE_LEN 16
#define PARASITE_SUN_PATH_LEN 108

/* Filled in by memcr before the parasite thread starts. */
struct parasite_args {
	unsigned int magic;
	volatile int status;
	int failed_step;
	int failed_errno;
	unsigned int addrlen;     /* bytes of addr in use, as bind() wants it */
	unsigned int sock_mode;   /* mode bits for a named socket, 0 for abstract */
	int sock_gid;             /* group for a named socket, -1 to keep */
	/*
	 * The parasite's descriptors (-1 when not open), so memcr can close
	 * them if it ever has to stop the parasite by force: the fd table is
	 * the whole process's and outlives the thread.
	 */
	int listen_fd;
	int conn_fd;
	int pagemap_fd;
	unsigned int page_size;   /* memcr's page size: pagemap has one entry per page */
	unsigned char nonce_in[PARASITE_NONCE_LEN];  /* memcr proves itself */
	unsigned char nonce_out[PARASITE_NONCE_LEN]; /* parasite proves itself */
	unsigned short sun_family;
	char sun_path[PARASITE_SUN_PATH_LEN];
};

/* Commands: a 24-byte header, little-endian on every supported CPU. */
struct parasite_cmd {
	unsigned int op;
	unsigned int arg;
	unsigned long long addr;
	unsigned long long len;
};

/*
 * len bytes follow: a table of (u64 addr, u64 len) runs, at most PARASITE_SEND_RUNS;
 * the bytes of every run follow, back to back; no reply.
 */
#define PARASITE_OP_SEND 1
#define PARASITE_OP_PAGEMAP 2 /* reply = bytes, then that many pagemap bytes */
#define PARASITE_OP_DROP 3    /* madvise(MADV_DONTNEED); reply */
#define PARASITE_OP_RECV 4    /* len raw bytes follow, stored at addr; reply */
#define PARASITE_OP_END 5     /* reply, then the thread exits */
/*
 * A userfaultfd of the target's own mm, with arg as its flags. len 0: the
 * userfaultfd() system call; len 1: one byte carrying a descriptor of
 * /dev/userfaultfd follows (SCM_RIGHTS), and USERFAULTFD_IOC_NEW on it.
 * Reply: the 8-byte result, carrying the new descriptor (SCM_RIGHTS) when
 * it is >= 0; the parasite keeps no copy.
 */
#define PARASITE_OP_UFFD 6

/* Most runs in one SEND (the kernel's UIO_MAXIOV): the parasite reads the table into a static buffer. */
#define PARASITE_SEND_RUNS 1024

/* Largest PAGEMAP request: the parasite answers from a static buffer. */
#define PARASITE_PAGEMAP_MAX 65536

#endif
