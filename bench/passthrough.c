/*
 * bench/passthrough.c - the "FUSE ceiling" of bench/run.sh: a null
 * low-level FUSE file system that shows one raw file as one regular file
 * (the mountpoint is a file, as with qcowfs) and forwards every request
 * straight to that backing file with pread, pwrite, fdatasync and
 * fallocate.  There is no engine in between, so what fio reaches through it
 * is what FUSE itself allows on this machine; qcowfs should stay within
 * 15 % of it on every fio row.
 *
 *   passthrough [-f] [-t THREADS] RAWFILE MOUNTPOINT
 *
 * Rule: the FUSE side is qcowfs's (src/qcowfs/qcowfs.c), so that the two
 * differ only by the engine: the same init() capabilities and limits, the
 * same open() flags (page cache, keep_cache, noflush for readers), reads
 * through a per-thread buffer answered with fuse_reply_buf (splice off),
 * the multi-threaded loop with the same default thread count, flush on
 * close of a writable handle, and the same end-of-file rules (reads stop,
 * writes are clipped, ENOSPC past the end).  Change one there, change it
 * here.  Built by make, never installed, not part of the test suite.
 */
#define FUSE_USE_VERSION 312
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

/* The values of QCOWFS_MAX_IO, QCOWFS_ATTR_TIMEOUT, QCOWFS_MAX_BACKGROUND
 * and QCOWFS_BLOCK_SIZE in qcowfs.c. */
#define PT_MAX_IO (1024 * 1024)
#define PT_ATTR_TIMEOUT 1.0
#define PT_MAX_BACKGROUND 64
#define PT_BLOCK_SIZE 4096
#define PT_FH_WRITABLE 1

static struct {
	int fd;               /* the backing raw file */
	uint64_t size;        /* its size; atomic: fallocate may grow it */
	uid_t uid;            /* owner shown: the mountpoint's */
	gid_t gid;
	pthread_key_t buffer_key;
} pt;

static uint64_t pt_size(void) { return __atomic_load_n(&pt.size, __ATOMIC_RELAXED); }

/* A per-thread read buffer, as qcowfs keeps one, so that neither pays a
 * 1 MiB malloc and its page faults per read. */
static char *pt_buffer(size_t len)
{
	char *buf = pthread_getspecific(pt.buffer_key);

	if (len > PT_MAX_IO)
		return NULL;                /* the kernel never asks for more */
	if (!buf && (buf = malloc(PT_MAX_IO)) && pthread_setspecific(pt.buffer_key, buf)) {
		free(buf);
		buf = NULL;
	}
	return buf;
}

static void pt_reply_attr(fuse_req_t req)
{
	struct stat st;

	if (fstat(pt.fd, &st) < 0) {
		fuse_reply_err(req, errno);
		return;
	}
	st.st_ino = FUSE_ROOT_ID;
	st.st_mode = S_IFREG | 0644;
	st.st_nlink = 1;
	st.st_uid = pt.uid;
	st.st_gid = pt.gid;
	st.st_blksize = PT_BLOCK_SIZE;
	fuse_reply_attr(req, &st, PT_ATTR_TIMEOUT);
}

/* Word for word qcowfs's op_init; its comment gives the reasons. */
static void pt_init(void *userdata, struct fuse_conn_info *conn)
{
	conn->max_write = PT_MAX_IO;
	conn->max_readahead = PT_MAX_IO;
	conn->max_background = PT_MAX_BACKGROUND;
	conn->congestion_threshold = PT_MAX_BACKGROUND * 3 / 4;
	conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
			FUSE_CAP_SPLICE_MOVE | FUSE_CAP_WRITEBACK_CACHE |
			FUSE_CAP_AUTO_INVAL_DATA | FUSE_CAP_ATOMIC_O_TRUNC);
	conn->want |= conn->capable & (FUSE_CAP_ASYNC_READ | FUSE_CAP_ASYNC_DIO);
}

static void pt_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, ENOENT);    /* the root inode is the file */
}

static void pt_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	pt_reply_attr(req);
}

/* The benchmark never resizes: a size change is refused, the rest ignored
 * (as qcowfs does with chmod and utimes). */
static void pt_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
		       int to_set, struct fuse_file_info *fi)
{
	if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != pt_size())
		fuse_reply_err(req, EOPNOTSUPP);
	else
		pt_reply_attr(req);
}

static void pt_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	int access = fi->flags & O_ACCMODE;

	fi->direct_io = 0;
	fi->keep_cache = 1;
	fi->fh = access != O_RDONLY ? PT_FH_WRITABLE : 0;
	fi->noflush = access == O_RDONLY;
	fuse_reply_open(req, fi);
}

static void pt_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	uint64_t end = pt_size();
	size_t done = 0;
	char *buf;

	if (off < 0 || (uint64_t)off >= end || size == 0) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	if (size > end - (uint64_t)off)
		size = (size_t)(end - (uint64_t)off);
	if (!(buf = pt_buffer(size))) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	while (done < size) {
		ssize_t n = pread(pt.fd, buf + done, size - done, off + (off_t)done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fuse_reply_err(req, errno);
			return;
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	fuse_reply_buf(req, buf, done);
}

static void pt_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
		     size_t size, off_t off, struct fuse_file_info *fi)
{
	uint64_t end = pt_size();
	size_t done = 0;

	if (off < 0 || (uint64_t)off >= end) {
		fuse_reply_err(req, off < 0 ? EINVAL : ENOSPC);
		return;
	}
	if (size > end - (uint64_t)off)
		size = (size_t)(end - (uint64_t)off);
	while (done < size) {
		ssize_t n = pwrite(pt.fd, buf + done, size - done, off + (off_t)done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fuse_reply_err(req, n < 0 ? errno : EIO);
			return;
		}
		done += (size_t)n;
	}
	fuse_reply_write(req, done);
}

static void pt_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, (fi->fh & PT_FH_WRITABLE) && fdatasync(pt.fd) < 0 ? errno : 0);
}

static void pt_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
		     struct fuse_file_info *fi)
{
	fuse_reply_err(req, fdatasync(pt.fd) < 0 ? errno : 0);
}

static void pt_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

/* Any mode goes to the backing file.  Never ENOSYS: the kernel would stop
 * sending fallocate for the life of the mount. */
static void pt_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
			 off_t len, struct fuse_file_info *fi)
{
	int err = fallocate(pt.fd, mode, off, len) < 0 ? errno : 0;

	if (!err && !(mode & FALLOC_FL_KEEP_SIZE) && (uint64_t)(off + len) > pt_size())
		__atomic_store_n(&pt.size, (uint64_t)(off + len), __ATOMIC_RELAXED);
	fuse_reply_err(req, err == ENOSYS ? EOPNOTSUPP : err);
}

static const struct fuse_lowlevel_ops pt_ops = {
	.init = pt_init,
	.lookup = pt_lookup,
	.getattr = pt_getattr,
	.setattr = pt_setattr,
	.open = pt_open,
	.read = pt_read,
	.write = pt_write,
	.flush = pt_flush,
	.release = pt_release,
	.fsync = pt_fsync,
	.fallocate = pt_fallocate,
};

static int pt_usage(void)
{
	fprintf(stderr, "usage: passthrough [-f] [-t THREADS] RAWFILE MOUNTPOINT\n");
	return 1;
}

int main(int argc, char **argv)
{
	int opt, foreground = 0, ret = 1;
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	/* qcowfs's default_max_threads(): twice the CPUs, 4 to 16 */
	unsigned threads = cpus > 8 ? 16 : cpus > 2 ? (unsigned)(2 * cpus) : 4;
	struct stat st;
	char *mountpoint = NULL;

	while ((opt = getopt(argc, argv, "ft:")) != -1) {
		if (opt == 'f')
			foreground = 1;
		else if (opt == 't' && atoi(optarg) > 0)
			threads = (unsigned)atoi(optarg);
		else
			return pt_usage();
	}
	if (argc - optind != 2)
		return pt_usage();
	pt.fd = open(argv[optind], O_RDWR | O_CLOEXEC);
	if (pt.fd < 0 || fstat(pt.fd, &st) < 0) {
		fprintf(stderr, "passthrough: %s: %s\n", argv[optind], strerror(errno));
		return 1;
	}
	pt.size = (uint64_t)st.st_size;
	mountpoint = realpath(argv[optind + 1], NULL);
	if (!mountpoint || stat(mountpoint, &st) < 0 || !S_ISREG(st.st_mode)) {
		fprintf(stderr, "passthrough: mountpoint %s: %s\n", argv[optind + 1],
			mountpoint ? "not a regular file" : strerror(errno));
		goto out;
	}
	pt.uid = st.st_uid;
	pt.gid = st.st_gid;
	if (pthread_key_create(&pt.buffer_key, free))
		goto out;

	/* as qcowfs: "qcowfs ... &" from a shell starts with SIGINT ignored */
	signal(SIGINT, SIG_DFL);
	char *fargv[] = { argv[0], "-o", "default_permissions,fsname=passthrough,subtype=passthrough", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &pt_ops, sizeof(pt_ops), NULL);
	fuse_opt_free_args(&args);
	if (!se)
		goto out;
	if (fuse_set_signal_handlers(se) == 0) {
		/* mount, then detach: the caller's next command sees the mount */
		if (fuse_session_mount(se, mountpoint) == 0) {
			struct fuse_loop_config *config = fuse_loop_cfg_create();
			if (config && fuse_daemonize(foreground) == 0) {
				fuse_loop_cfg_set_max_threads(config, threads);
				ret = fuse_session_loop_mt(se, config) < 0;
			}
			if (config)
				fuse_loop_cfg_destroy(config);
			fuse_session_unmount(se);
		}
		fuse_remove_signal_handlers(se);
	}
	fuse_session_destroy(se);
out:
	free(mountpoint);
	close(pt.fd);
	return ret;
}
