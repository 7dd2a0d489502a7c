/*
 * qcowfs.c - the qcowfs daemon: mounts a qcow2 image as one regular file
 * holding the raw disk, through the libfuse low-level API, and turns every
 * FUSE request into one call of the libqcow engine (qcow.h).
 *
 * What this file owns:
 *  - the process life cycle: parse options, check the mountpoint (create
 *    it if missing; refuse one that already is a mount point), fork,
 *    open the image and mount in the child, tell the parent the result
 *    through a pipe, detach, serve, and on unmount/SIGTERM/SIGINT/SIGHUP
 *    unmount, close the image (flush + refcounts), remove the mountpoint
 *    file if we created it, and exit;
 *  - the FUSE operations of the one inode (FUSE_ROOT_ID is the file);
 *  - the view's permissions: it starts with the image file's owner, group
 *    and mode (without write bits on a read-only mount); chmod and chown
 *    change them for the mount's lifetime only, never the image file (as
 *    QEMU's FUSE export does), and the kernel enforces them
 *    (default_permissions is always on);
 *  - the close report: the result of the final close, sent to every
 *    qcowctl that asked for it (see "the close report" below);
 *  - logging: engine and libfuse messages go to stderr until the daemon
 *    detaches, to syslog ("qcowfs", LOG_DAEMON) afterwards.
 *
 * Rules:
 *  - Exactly one reply per request, on every path.  Engine errors are
 *    negative errnos and are answered with -ret; the daemon keeps serving
 *    after any error.
 *  - Never answer ENOSYS to an operation the kernel may retry later:
 *    ENOSYS disables that operation for the whole connection (fallocate
 *    in particular), so unsupported modes get EOPNOTSUPP.
 *  - The raw view is a disk: it shrinks only by truncate(2), never by
 *    O_TRUNC; reads stop at EOF, writes
 *    are clipped at EOF (a short write, as QEMU's FUSE export and block
 *    devices do) and a write entirely past EOF fails with ENOSPC.
 *  - All state lives in the one struct qcowfs below; the handlers only
 *    read it, except the times (atomics) and the view's owner, group and
 *    mode (attr_lock).
 *  - The control ioctls check the access mode of the descriptor they come
 *    through: status needs one open for reading, compact one open for
 *    writing (EBADF otherwise, as write(2) on a read-only descriptor).
 *  - Nothing that can fail is done after the parent has been told "OK"
 *    except serving: a failure before that point leaves no mount behind,
 *    removes a mountpoint file we created and exits 1.
 *  - A mountpoint file we created is removed whenever the daemon ends
 *    after unmounting (unmount by name, SIGTERM/SIGINT/SIGHUP, a failed
 *    loop), only if the name still is that file; a file that existed
 *    before is never removed or changed.  Only SIGKILL leaves it.
 */
#define _GNU_SOURCE
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include "qcowfs.h"
#include "qcowfs_ioctl.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

/* The largest request the kernel sends us: 1 MiB = 256 pages, the
 * kernel's default fuse max_pages_limit and libfuse's buffer size.  Bigger
 * requests mean fewer round trips for sequential I/O (dd, qemu-img
 * convert, a loop device doing readahead or writeback). */
#define QCOWFS_MAX_IO (1024 * 1024)

/* How long the kernel may cache the file's attributes.  The size only
 * changes through this mount (the kernel updates its copy itself), but
 * st_blocks follows the image file's allocation, which the recycler
 * changes behind the kernel's back: one second keeps `du` and `ls -s`
 * close to the truth without a getattr per stat(). */
#define QCOWFS_ATTR_TIMEOUT 1.0

/* Background requests (readahead, async direct I/O) the kernel may have
 * outstanding.  Its default of 12 starves a multi-threaded engine when a
 * loop device or O_DIRECT reader issues many requests at once. */
#define QCOWFS_MAX_BACKGROUND 64

/* st_blksize and the statfs block size: the page size, which is the unit
 * the kernel's page cache sends us anyway, the physical sector size of
 * modern disks, and small enough that tools which read st_blksize as "the
 * smallest sensible write" (stdio, mkfs on a file) never write more than
 * they mean to.  Large sequential I/O does not depend on it: coreutils
 * use at least 128 KiB and the kernel merges pages up to QCOWFS_MAX_IO. */
#define QCOWFS_BLOCK_SIZE 4096

/* File handle flags (fi->fh), the descriptor's access mode.  The kernel
 * does not pass the open flags with an ioctl, only fi->fh, so op_ioctl
 * checks access through these. */
#define FH_WRITABLE 1   /* may write: close() flushes, compaction allowed */
#define FH_READABLE 2   /* may read: the status ioctl allowed */

/* Connections the close report keeps waiting (qcowctl unmount runs, one
 * each); more get refused and their qcowctl falls back to checking. */
#define QCOWFS_REPORT_BACKLOG 64

/* The one state struct of the daemon. */
struct qcowfs {
	struct qcowfs_opts opts;
	struct qcow_image *img;
	struct fuse_session *se;

	char *image_path;        /* absolute: the daemon chdirs to / */
	char *mountpoint;        /* absolute: libfuse unmounts by this name */
	/* We made the mountpoint file (it did not exist): it goes again when
	 * mounting fails and when the daemon ends after unmounting.  Its
	 * device and inode tell that the name still is our file then. */
	bool created_mountpoint;
	dev_t created_dev;
	ino_t created_ino;

	bool read_only;
	pid_t pid;               /* of the serving process, for the status text */

	/* The view's owner, group and permission bits (07777): they start as
	 * the image file's (uid=/gid= override the owner), and chmod/chown
	 * change them here only.  attr_lock makes the three one value for
	 * getattr while a setattr runs. */
	pthread_mutex_t attr_lock;
	uid_t uid;
	gid_t gid;
	mode_t mode;

	/* Times in ns since the epoch: mtime starts as the image file's and
	 * moves on every change of the raw view (and with utimes); ctime also
	 * moves on chmod and chown.  Atomic because writers on several
	 * threads update them. */
	int64_t mtime_ns;
	int64_t ctime_ns;

	/* The close report (see there): a listening socket in the abstract
	 * namespace, its name as the status shows it ("@..."), -1/"" when
	 * there is none. */
	int report_fd;
	char report_name[108];

	/* Logging.  log_to_syslog flips once, when the daemon detaches;
	 * the engine's recycler thread may already be logging then, hence
	 * atomic accesses.  While capture_fuse_log is set
	 * (daemon startup), libfuse's own error messages are collected in
	 * startup_log so the parent can print them; after a failed startup
	 * nobody would see them otherwise. */
	bool log_to_syslog;
	bool capture_fuse_log;
	char startup_log[1024];

	/* Per-thread read buffer (see read_buffer()). */
	pthread_key_t read_buffer_key;

	/* The sparsify of QCOWFS_IOC_SPARSIFY: at most one at a time, on
	 * its own thread; sparsify_lock guards these fields, which the
	 * engine's progress callback updates after each batch.  Stopped
	 * (cancel) and joined before the image closes. */
	pthread_mutex_t sparsify_lock;
	pthread_t sparsify_thread;
	bool sparsify_started;        /* a thread exists (joined at close) */
	bool sparsify_running;
	bool sparsify_cancel;
	int sparsify_error;
	uint64_t sparsify_runs;
	struct qcow_sparsify_result sparsify_res;
};

static struct qcowfs qcowfs = {
	.attr_lock = PTHREAD_MUTEX_INITIALIZER,
	.sparsify_lock = PTHREAD_MUTEX_INITIALIZER,
	.report_fd = -1,
};

/* ---- logging ---------------------------------------------------------- */

static void log_message(int priority, const char *msg)
{
	if (__atomic_load_n(&qcowfs.log_to_syslog, __ATOMIC_ACQUIRE))
		syslog(priority, "%s", msg);
	else
		fprintf(stderr, "qcowfs: %s\n", msg);
}

static void log_printf(int priority, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void log_printf(int priority, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	log_message(priority, msg);
}

static void engine_log_sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	static const int priority[] = {
		[QCOW_LOG_ERROR] = LOG_ERR,
		[QCOW_LOG_WARNING] = LOG_WARNING,
		[QCOW_LOG_INFO] = LOG_INFO,
		[QCOW_LOG_DEBUG] = LOG_DEBUG,
	};

	log_message(level <= QCOW_LOG_DEBUG ? priority[level] : LOG_DEBUG, msg);
}

/* libfuse's levels are syslog's priorities. */
static void fuse_log_sink(enum fuse_log_level level, const char *fmt, va_list ap)
{
	char msg[1024];

	vsnprintf(msg, sizeof(msg), fmt, ap);
	for (size_t len = strlen(msg); len && msg[len - 1] == '\n'; len--)
		msg[len - 1] = '\0';
	if (qcowfs.capture_fuse_log) {
		if (level <= FUSE_LOG_WARNING) {
			size_t used = strlen(qcowfs.startup_log);
			snprintf(qcowfs.startup_log + used,
				 sizeof(qcowfs.startup_log) - used, "%s%s",
				 used ? "; " : "", msg);
		}
		return;
	}
	log_message((int)level, msg);
}

/* ---- small helpers ------------------------------------------------------ */

static int64_t timespec_to_ns(struct timespec ts)
{
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static struct timespec ns_to_timespec(int64_t ns)
{
	return (struct timespec){ .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
}

static int64_t now_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_REALTIME, &now);
	return timespec_to_ns(now);
}

/* Records that the raw view changed now. */
static void touch_mtime(void)
{
	int64_t now = now_ns();

	__atomic_store_n(&qcowfs.mtime_ns, now, __ATOMIC_RELAXED);
	__atomic_store_n(&qcowfs.ctime_ns, now, __ATOMIC_RELAXED);
}

static void fill_attr(struct stat *st)
{
	struct qcow_stats stats;

	qcow_image_get_stats(qcowfs.img, &stats);
	memset(st, 0, sizeof(*st));
	st->st_ino = FUSE_ROOT_ID;
	pthread_mutex_lock(&qcowfs.attr_lock);
	st->st_mode = S_IFREG | qcowfs.mode;
	st->st_uid = qcowfs.uid;
	st->st_gid = qcowfs.gid;
	pthread_mutex_unlock(&qcowfs.attr_lock);
	st->st_nlink = 1;
	st->st_size = (off_t)qcow_image_size(qcowfs.img);
	/* What `du` should say is what the image costs on the host, as
	 * QEMU's export does: that number falls after fstrim and
	 * compaction, which is the point of qcowfs. */
	st->st_blocks = (blkcnt_t)((stats.file_allocated + 511) / 512);
	st->st_blksize = QCOWFS_BLOCK_SIZE;
	st->st_atim = st->st_mtim =
		ns_to_timespec(__atomic_load_n(&qcowfs.mtime_ns, __ATOMIC_RELAXED));
	st->st_ctim = ns_to_timespec(__atomic_load_n(&qcowfs.ctime_ns, __ATOMIC_RELAXED));
}

static void reply_attr(fuse_req_t req)
{
	struct stat st;

	fill_attr(&st);
	fuse_reply_attr(req, &st, QCOWFS_ATTR_TIMEOUT);
}

static void read_buffer_free(void *buffer)
{
	free(buffer);
}

/* A buffer of at least len bytes owned by the calling worker thread.
 * Reads need a bounce buffer (the engine decompresses, zero-fills holes
 * and gathers clusters into it); keeping one per thread avoids a 1 MiB
 * malloc/free, and the page faults of a fresh mapping, on every read. */
struct read_buffer {
	size_t size;
	char data[];
};

static char *read_buffer(size_t len)
{
	struct read_buffer *rb = pthread_getspecific(qcowfs.read_buffer_key);

	if (rb && rb->size >= len)
		return rb->data;
	size_t size = len < QCOWFS_MAX_IO ? QCOWFS_MAX_IO : len;
	struct read_buffer *bigger = malloc(sizeof(*bigger) + size);
	if (!bigger)
		return NULL;
	bigger->size = size;
	if (pthread_setspecific(qcowfs.read_buffer_key, bigger)) {
		free(bigger);
		return NULL;
	}
	free(rb);
	return bigger->data;
}

/* ---- FUSE operations ---------------------------------------------------- */

/*
 * Capabilities, each with its reason:
 *  - max_write 1 MiB (libfuse then asks for max_pages = 256): fewer,
 *    larger requests for sequential I/O.  Reads get the same limit from
 *    the kernel's max_pages.
 *  - max_readahead as large as the kernel allows (it takes the minimum of
 *    ours and its own): sequential readers of a disk image benefit, and
 *    ASYNC_READ lets those readahead requests run in parallel.
 *  - ASYNC_READ on: several reads of one handle may be in flight, which
 *    the thread-safe engine serves on several worker threads.
 *  - ASYNC_DIO on: large O_DIRECT requests (losetup --direct-io,
 *    qemu-img -t none) are split and sent concurrently, not one by one.
 *  - SPLICE_READ/WRITE/MOVE off: the engine takes and returns memory
 *    buffers, never file descriptors.  SPLICE_READ would pull every
 *    request through a pipe and then copy it into memory anyway for
 *    op_write; SPLICE_WRITE only serves fuse_reply_data() with fd
 *    buffers, and replies here are memory (fuse_reply_buf, one writev).
 *    Either way: more system calls, the same copies.
 *  - WRITEBACK_CACHE off: with it the kernel owns the file size and would
 *    extend it on writes past EOF, which a fixed-size disk must refuse,
 *    and it delays writes that fsync users expect to see at once; the
 *    page cache of whatever sits on top (a loop device's file system)
 *    already absorbs small writes.
 *  - AUTO_INVAL_DATA off: every change of the file's data goes through
 *    this mount, so the kernel's cached pages are never stale; with it on,
 *    each write (which moves mtime) would drop the whole cache on the next
 *    getattr.  Compaction moves clusters inside the image, never bytes of
 *    the raw view, so it cannot make cached pages stale either.
 *  - ATOMIC_O_TRUNC on: O_TRUNC reaches op_open as a flag, which refuses
 *    it (it would empty the disk).  Without it the kernel truncates with
 *    setattr(size=0), indistinguishable from truncate(1), which shrinks.
 */
static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	conn->max_write = QCOWFS_MAX_IO;
	conn->max_readahead = QCOWFS_MAX_IO;
	conn->max_background = QCOWFS_MAX_BACKGROUND;
	conn->congestion_threshold = QCOWFS_MAX_BACKGROUND * 3 / 4;

	conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
			FUSE_CAP_SPLICE_MOVE | FUSE_CAP_WRITEBACK_CACHE |
			FUSE_CAP_AUTO_INVAL_DATA);
	/* Asking for a capability the kernel lacks makes libfuse refuse
	 * the connection, hence the masks. */
	conn->want |= conn->capable & (FUSE_CAP_ASYNC_READ | FUSE_CAP_ASYNC_DIO);
	/* O_TRUNC as an open flag, refused by op_open: without it the
	 * kernel truncates with setattr(size=0), which now shrinks - an
	 * "echo > view" would empty the disk */
	conn->want |= conn->capable & FUSE_CAP_ATOMIC_O_TRUNC;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	/* The root inode is the file itself: it has no names below it. */
	fuse_reply_err(req, ENOENT);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	reply_attr(req);
}

/* Whether the caller of req belongs to group gid (its supplementary
 * groups come from /proc through libfuse; without them, its primary group
 * only). */
static bool caller_in_group(fuse_req_t req, gid_t gid)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	gid_t groups[64];
	int n;

	if (ctx->gid == gid)
		return true;
	n = fuse_req_getgroups(req, 64, groups);
	if (n > 64) {
		gid_t *all = calloc((size_t)n, sizeof(*all));
		bool found = false;
		int got = all ? fuse_req_getgroups(req, n, all) : -ENOMEM;
		for (int i = 0; i < got && i < n; i++)
			found |= all[i] == gid;
		free(all);
		return found;
	}
	for (int i = 0; i < n; i++)
		if (groups[i] == gid)
			return true;
	return false;
}

/*
 * The daemon's own check of a chmod or chown, behind the kernel's: with
 * default_permissions the kernel already applies the POSIX rules (and the
 * capabilities CAP_FOWNER and CAP_CHOWN, which the daemon cannot see) before
 * the request reaches us.  This repeats the plain rules, so that the view
 * never changes hands on a path the kernel did not check:
 *  - root (uid 0) may change anything;
 *  - chmod: the owner only; anyone may clear the set-user-ID and
 *    set-group-ID bits and nothing else (that is the kernel removing them
 *    when someone writes to the file, which it does not check);
 *  - chown to another user: root only;
 *  - chgrp: the owner, to a group it belongs to.
 * A non-root process with CAP_FOWNER or CAP_CHOWN is therefore refused here.
 * Returns 0 or an errno.  attr_lock held.
 */
static int setattr_permitted(fuse_req_t req, const struct stat *attr, int to_set)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	const mode_t priv = S_ISUID | S_ISGID;

	if (ctx->uid == 0)
		return 0;
	if (to_set & FUSE_SET_ATTR_MODE) {
		mode_t want = attr->st_mode & 07777;
		bool only_clears_priv = (want & ~priv) == (qcowfs.mode & ~priv) &&
					!(want & ~qcowfs.mode);
		if (ctx->uid != qcowfs.uid && !only_clears_priv)
			return EPERM;
	}
	if ((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != qcowfs.uid)
		return EPERM;
	if ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != qcowfs.gid &&
	    (ctx->uid != qcowfs.uid || !caller_in_group(req, attr->st_gid)))
		return EPERM;
	return 0;
}

/*
 * The size grows or shrinks the disk (a shrink frees what lies past the new
 * end; the engine refuses it with ENOTSUP while the image has snapshots).  Mode,
 * owner and group are the view's and last as long as the mount (the image
 * file keeps its own); utimes sets the modification time shown.  On a
 * read-only mount the kernel refuses every setattr (EROFS) before it
 * reaches us.
 */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
		       int to_set, struct fuse_file_info *fi)
{
	const int owner_bits = FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID;
	int err = 0;

	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (qcowfs.read_only && (to_set & ~(FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW))) {
		fuse_reply_err(req, EROFS);
		return;
	}
	if (to_set & owner_bits) {
		pthread_mutex_lock(&qcowfs.attr_lock);
		err = setattr_permitted(req, attr, to_set);
		pthread_mutex_unlock(&qcowfs.attr_lock);
		if (err) {
			fuse_reply_err(req, err);
			return;
		}
	}
	/* The size first: it is the one change that can fail. */
	if (to_set & FUSE_SET_ATTR_SIZE) {
		if (attr->st_size < 0) {
			fuse_reply_err(req, EINVAL);
			return;
		}
		if ((uint64_t)attr->st_size != qcow_image_size(qcowfs.img)) {
			int ret = qcow_image_resize(qcowfs.img, (uint64_t)attr->st_size);
			if (ret < 0) {
				fuse_reply_err(req, -ret);
				return;
			}
			touch_mtime();
		}
	}
	if (to_set & owner_bits) {
		pthread_mutex_lock(&qcowfs.attr_lock);
		/* Checked again under the lock: a chown may have run meanwhile. */
		err = setattr_permitted(req, attr, to_set);
		if (!err && (to_set & FUSE_SET_ATTR_MODE))
			qcowfs.mode = attr->st_mode & 07777;
		if (!err && (to_set & FUSE_SET_ATTR_UID))
			qcowfs.uid = attr->st_uid;
		if (!err && (to_set & FUSE_SET_ATTR_GID))
			qcowfs.gid = attr->st_gid;
		pthread_mutex_unlock(&qcowfs.attr_lock);
		if (err) {
			fuse_reply_err(req, err);
			return;
		}
		__atomic_store_n(&qcowfs.ctime_ns, now_ns(), __ATOMIC_RELAXED);
	}
	if (to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW)) {
		int64_t t = (to_set & FUSE_SET_ATTR_MTIME_NOW) ? now_ns() : timespec_to_ns(attr->st_mtim);
		__atomic_store_n(&qcowfs.mtime_ns, t, __ATOMIC_RELAXED);
		__atomic_store_n(&qcowfs.ctime_ns, now_ns(), __ATOMIC_RELAXED);
	}
	reply_attr(req);
}

/*
 * No FOPEN_DIRECT_IO: the kernel page cache in front of the file serves
 * repeated reads without a round trip, allows shared mmap, and cannot go
 * stale because every change to the data passes through this mount (the
 * kernel drops cached pages of a range itself on fallocate).  For the
 * same reason keep_cache is set: a new open need not throw away pages
 * that are still right.  Callers who want no caching use O_DIRECT, which
 * FUSE honours per file descriptor.
 */
static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	int access = fi->flags & O_ACCMODE;

	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (qcowfs.read_only && access != O_RDONLY) {
		fuse_reply_err(req, EROFS);
		return;
	}
	/* op_init asks for ATOMIC_O_TRUNC, so O_TRUNC arrives here as a
	 * flag (a kernel without it truncates by setattr instead): a disk
	 * cannot be emptied by truncation.  An empty disk loses nothing. */
	if ((fi->flags & O_TRUNC) && access != O_RDONLY &&
	    qcow_image_size(qcowfs.img) != 0) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	fi->direct_io = 0;
	fi->keep_cache = 1;
	fi->fh = (access != O_RDONLY ? FH_WRITABLE : 0) | (access != O_WRONLY ? FH_READABLE : 0);
	/* A read-only descriptor has nothing to make durable on close. */
	fi->noflush = access == O_RDONLY;
	fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	uint64_t end = qcow_image_size(qcowfs.img);

	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if ((uint64_t)off >= end || size == 0) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	if (size > end - (uint64_t)off)
		size = (size_t)(end - (uint64_t)off);

	char *buf = read_buffer(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	ssize_t ret = qcow_image_read(qcowfs.img, buf, size, (uint64_t)off);
	if (ret < 0)
		fuse_reply_err(req, (int)-ret);
	else
		fuse_reply_buf(req, buf, (size_t)ret);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
		     size_t size, off_t off, struct fuse_file_info *fi)
{
	uint64_t end = qcow_image_size(qcowfs.img);

	if (qcowfs.read_only) {
		fuse_reply_err(req, EROFS);
		return;
	}
	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (size == 0) {
		fuse_reply_write(req, 0);
		return;
	}
	/* Like a block device: nothing fits at or after the end. */
	if ((uint64_t)off >= end) {
		fuse_reply_err(req, ENOSPC);
		return;
	}
	if (size > end - (uint64_t)off)
		size = (size_t)(end - (uint64_t)off);

	ssize_t ret = qcow_image_write(qcowfs.img, buf, size, (uint64_t)off);
	if (ret < 0) {
		fuse_reply_err(req, (int)-ret);
		return;
	}
	touch_mtime();
	fuse_reply_write(req, (size_t)ret);
}

/* close(): makes the writes of this descriptor durable, as QEMU's export
 * does, so a script's "dd ...; done" leaves a consistent image even if
 * the machine dies right after.  Read-only handles skip it (noflush). */
static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	int ret = 0;

	if (fi->fh & FH_WRITABLE)
		ret = qcow_image_flush(qcowfs.img);
	fuse_reply_err(req, -ret);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
		     struct fuse_file_info *fi)
{
	/* fdatasync and fsync are the same here: the only metadata of the
	 * raw view that matters (its size) is part of the image's. */
	fuse_reply_err(req, -qcow_image_flush(qcowfs.img));
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

/* df on the mountpoint describes the disk: its size, and as "used" the
 * clusters the image holds besides its header, L1 and refcount table
 * (data, L2 tables, refcount blocks, snapshot tables), so the
 * free figure is what the guest may still fill without growing the
 * image past its virtual size. */
static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct qcow_stats stats;
	struct statvfs sv;

	qcow_image_get_stats(qcowfs.img, &stats);
	uint64_t total = stats.virtual_size / QCOWFS_BLOCK_SIZE;
	uint64_t used = stats.clusters_referenced * stats.cluster_size / QCOWFS_BLOCK_SIZE;
	if (used > total)
		used = total;

	memset(&sv, 0, sizeof(sv));
	sv.f_bsize = QCOWFS_BLOCK_SIZE;
	sv.f_frsize = QCOWFS_BLOCK_SIZE;
	sv.f_blocks = total;
	sv.f_bfree = total - used;
	sv.f_bavail = total - used;
	sv.f_files = 1;
	sv.f_ffree = 0;
	sv.f_favail = 0;
	sv.f_namemax = 255;
	fuse_reply_statfs(req, &sv);
}

/*
 * fallocate modes (PUNCH_HOLE without KEEP_SIZE never arrives: the VFS
 * rejects it):
 *   PUNCH_HOLE|KEEP_SIZE    discard: the range reads zeros, whole clusters
 *                           are freed (fstrim through a loop device ends here)
 *   ZERO_RANGE[|KEEP_SIZE]  zero; without KEEP_SIZE a range past EOF grows
 *                           the file first
 *   0                       reserve: inside the file nothing to do (the
 *                           engine allocates on write); past EOF grow
 *   KEEP_SIZE               reserve without growing: nothing to do
 *   anything else           EOPNOTSUPP (never ENOSYS, see the file top)
 * Ranges are clipped at EOF where the size does not change.
 */
static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
			 off_t offset, off_t length, struct fuse_file_info *fi)
{
	const int keep = FALLOC_FL_KEEP_SIZE;
	uint64_t size = qcow_image_size(qcowfs.img);
	uint64_t off = (uint64_t)offset, end;
	int ret = 0;

	if (mode != (FALLOC_FL_PUNCH_HOLE | keep) && mode != FALLOC_FL_ZERO_RANGE &&
	    mode != (FALLOC_FL_ZERO_RANGE | keep) && mode != 0 && mode != keep) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (offset < 0 || length <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (qcowfs.read_only) {
		fuse_reply_err(req, EROFS);
		return;
	}
	if (__builtin_add_overflow(off, (uint64_t)length, &end) || end > INT64_MAX) {
		fuse_reply_err(req, EFBIG);
		return;
	}

	if (end > size && !(mode & keep)) {
		/* Grows the file; what lies past the old end reads zeros. */
		ret = qcow_image_resize(qcowfs.img, end);
		if (ret < 0)
			goto out;
		size = end;
		touch_mtime();
	}
	if (end > size)
		end = size;
	if (off >= end)
		goto out;                       /* entirely past EOF, size kept */

	if (mode & FALLOC_FL_PUNCH_HOLE)
		ret = qcow_image_discard(qcowfs.img, off, end - off);
	else if (mode & FALLOC_FL_ZERO_RANGE)
		ret = qcow_image_zero(qcowfs.img, off, end - off);
	else
		goto out;                       /* mode 0 / KEEP_SIZE inside the file */
	if (ret >= 0)
		touch_mtime();
out:
	fuse_reply_err(req, ret < 0 ? -ret : 0);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
		     struct fuse_file_info *fi)
{
	if ((whence != SEEK_DATA && whence != SEEK_HOLE) || off < 0) {
		/* The kernel handles SEEK_SET/CUR/END without asking us. */
		fuse_reply_err(req, EINVAL);
		return;
	}
	int64_t ret = qcow_image_seek(qcowfs.img, (uint64_t)off, whence);
	if (ret < 0)
		fuse_reply_err(req, (int)-ret);
	else
		fuse_reply_lseek(req, (off_t)ret);
}

/* The status text of QCOWFS_IOC_STATUS: the engine's counters, then who
 * serves the mount, for which image, and where its close report is. */
static int status_text(char *buf, size_t cap)
{
	struct qcow_stats stats;
	qcow_image_get_stats(qcowfs.img, &stats);
	int len = qcow_stats_format(&stats, buf, cap);
	if (len < 0)
		return len;
	int more = snprintf(buf + len, cap - (size_t)len, "pid=%ld\nimage=%s\n%s%s%s",
			    (long)qcowfs.pid, qcowfs.image_path,
			    qcowfs.report_name[0] ? "close_report=" : "", qcowfs.report_name,
			    qcowfs.report_name[0] ? "\n" : "");
	if (more < 0 || (size_t)more >= cap - (size_t)len)
		return -ERANGE;
	return len + more;
}

/* ---- sparsify (QCOWFS_IOC_SPARSIFY) ---- */

static int sparsify_progress(const struct qcow_sparsify_result *so_far, void *opaque)
{
	(void)opaque;
	pthread_mutex_lock(&qcowfs.sparsify_lock);
	qcowfs.sparsify_res = *so_far;
	bool cancel = qcowfs.sparsify_cancel;
	pthread_mutex_unlock(&qcowfs.sparsify_lock);
	return cancel;
}

static void *sparsify_main(void *arg)
{
	struct qcow_sparsify_result res;
	(void)arg;
	int ret = qcow_image_sparsify(qcowfs.img, sparsify_progress, NULL, &res);
	if (ret < 0 && ret != -ECANCELED)
		log_printf(LOG_ERR, "sparsify of %s failed: %s", qcowfs.image_path, strerror(-ret));
	else
		log_printf(LOG_INFO, "sparsify of %s: %" PRIu64 " clusters freed (%" PRIu64 " bytes) of %" PRIu64
			   " scanned%s", qcowfs.image_path, res.freed, res.bytes_freed, res.scanned,
			   ret == -ECANCELED ? ", stopped by the unmount" : "");
	pthread_mutex_lock(&qcowfs.sparsify_lock);
	qcowfs.sparsify_res = res;
	qcowfs.sparsify_error = ret;
	qcowfs.sparsify_running = false;
	pthread_mutex_unlock(&qcowfs.sparsify_lock);
	return NULL;
}

/* Before the image closes: a running sparsify stops at its next batch. */
static void sparsify_stop(void)
{
	pthread_mutex_lock(&qcowfs.sparsify_lock);
	bool started = qcowfs.sparsify_started;
	qcowfs.sparsify_cancel = true;
	qcowfs.sparsify_started = false;
	pthread_mutex_unlock(&qcowfs.sparsify_lock);
	if (started)
		pthread_join(qcowfs.sparsify_thread, NULL);
}

/* Fills the ioctl's answer (sparsify_lock held). */
static void sparsify_answer(struct qcowfs_sparsify *out)
{
	const struct qcow_sparsify_result *r = &qcowfs.sparsify_res;
	out->state = qcowfs.sparsify_running ? QCOWFS_SPARSIFY_RUNNING
		   : qcowfs.sparsify_runs ? QCOWFS_SPARSIFY_DONE : QCOWFS_SPARSIFY_NEVER;
	out->error = qcowfs.sparsify_running ? 0 : qcowfs.sparsify_error;
	out->run = qcowfs.sparsify_runs;
	out->cluster_size = qcowfs.sparsify_res.freed ? r->bytes_freed / r->freed : 0;
	out->guest_clusters = r->guest_clusters;
	out->guest_done = r->guest_done;
	out->scanned = r->scanned;
	out->freed = r->freed;
	out->bytes_freed = r->bytes_freed;
	out->skipped_shared = r->skipped_shared;
	out->skipped_compressed = r->skipped_compressed;
	out->skipped_changed = r->skipped_changed;
	out->skipped_backing = r->skipped_backing;
}

/* START or QUERY; returns 0 or a positive errno for the reply. */
static int sparsify_ioctl(uint64_t fh, const struct qcowfs_sparsify *in, struct qcowfs_sparsify *out)
{
	int err = 0;
	memset(out, 0, sizeof(*out));
	out->op = in->op;
	if (in->op == QCOWFS_SPARSIFY_QUERY) {
		if (!(fh & (FH_READABLE | FH_WRITABLE)))
			return EBADF;
	} else if (in->op == QCOWFS_SPARSIFY_START) {
		if (!(fh & FH_WRITABLE))
			return EBADF;
		if (qcowfs.read_only)
			return EROFS;
	} else {
		return EINVAL;
	}
	pthread_mutex_lock(&qcowfs.sparsify_lock);
	if (in->op == QCOWFS_SPARSIFY_START) {
		if (qcowfs.sparsify_running || qcowfs.sparsify_cancel) {
			err = qcowfs.sparsify_cancel ? ESHUTDOWN : EBUSY;
			goto out;
		}
		if (qcowfs.sparsify_started) {
			/* the last run has ended (not running): reap it */
			pthread_join(qcowfs.sparsify_thread, NULL);
			qcowfs.sparsify_started = false;
		}
		memset(&qcowfs.sparsify_res, 0, sizeof(qcowfs.sparsify_res));
		qcowfs.sparsify_error = 0;
		qcowfs.sparsify_running = true;
		err = pthread_create(&qcowfs.sparsify_thread, NULL, sparsify_main, NULL);
		if (err) {
			qcowfs.sparsify_running = false;
			goto out;
		}
		qcowfs.sparsify_started = true;
		qcowfs.sparsify_runs++;
	}
	sparsify_answer(out);
out:
	pthread_mutex_unlock(&qcowfs.sparsify_lock);
	return err;
}

/* Snapshot create / delete / apply (qcowfs_ioctl.h): write access.  An
 * apply changes the disk under whoever uses the view, so it needs the
 * force flag, and afterwards the kernel's cached pages and size of the
 * view are dropped (after the reply: the notification must not wait for
 * a request of ours). */
static void snapshot_ioctl(fuse_req_t req, unsigned int cmd, uint64_t fh, const void *in_buf, size_t in_bufsz)
{
	struct qcowfs_snapshot_req r;
	if (!(fh & FH_WRITABLE)) {
		fuse_reply_err(req, EBADF);
		return;
	}
	if (!in_buf || in_bufsz < sizeof(r)) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	memcpy(&r, in_buf, sizeof(r));
	r.name[sizeof(r.name) - 1] = '\0';
	int ret;
	if (cmd == QCOWFS_IOC_SNAPSHOT_CREATE) {
		ret = qcow_snapshot_create(qcowfs.img, r.name);
	} else if (cmd == QCOWFS_IOC_SNAPSHOT_DELETE) {
		ret = qcow_snapshot_delete(qcowfs.img, r.name);
	} else if (!(r.flags & QCOWFS_SNAPSHOT_FORCE)) {
		ret = -EPERM;
	} else {
		ret = qcow_snapshot_apply(qcowfs.img, r.name);
	}
	if (ret) {
		fuse_reply_err(req, -ret);
		return;
	}
	fuse_reply_ioctl(req, 0, NULL, 0);
	if (cmd == QCOWFS_IOC_SNAPSHOT_APPLY) {
		int n = fuse_lowlevel_notify_inval_inode(qcowfs.se, FUSE_ROOT_ID, 0, 0);
		if (n && n != -ENOENT)
			log_printf(LOG_WARNING, "after a snapshot apply, the kernel's cache of the view could not be dropped: %s",
				strerror(-n));
	}
}

static void snapshot_list_ioctl(fuse_req_t req, uint64_t fh)
{
	if (!(fh & FH_READABLE)) {
		fuse_reply_err(req, EBADF);
		return;
	}
	struct qcow_snapshot_info *v;
	uint32_t n;
	int ret = qcow_snapshot_list(qcowfs.img, &v, &n);
	if (ret) {
		fuse_reply_err(req, -ret);
		return;
	}
	struct qcowfs_snapshot_list *l = calloc(1, sizeof(*l));
	if (!l) {
		free(v);
		fuse_reply_err(req, ENOMEM);
		return;
	}
	size_t len = 0;
	for (uint32_t i = 0; i < n && ret == 0; i++) {
		int k = snprintf(l->text + len, sizeof(l->text) - len, "%s\t%s\t%llu\t%llu\t%u\t%llu\t%llu\n",
				 v[i].id, v[i].name, (unsigned long long)v[i].vm_state_size,
				 (unsigned long long)v[i].date_sec, v[i].date_nsec,
				 (unsigned long long)v[i].vm_clock_nsec, (unsigned long long)v[i].disk_size);
		if (k < 0 || (size_t)k >= sizeof(l->text) - len)
			ret = -ERANGE;
		else
			len += (size_t)k;
	}
	free(v);
	if (ret)
		fuse_reply_err(req, -ret);
	else
		fuse_reply_ioctl(req, 0, l, sizeof(*l));
	free(l);
}

/* The picture of the image file (QCOWFS_IOC_PICTURE): read access. */
static void picture_ioctl(fuse_req_t req, uint64_t fh)
{
	if (!(fh & FH_READABLE)) {
		fuse_reply_err(req, EBADF);
		return;
	}
	struct qcow_picture *pic = calloc(1, sizeof(*pic));
	struct qcowfs_picture *out = calloc(1, sizeof(*out));
	int ret = pic && out ? qcow_image_picture(qcowfs.img, QCOWFS_PICTURE_CELLS, pic) : -ENOMEM;
	if (ret == 0) {
		out->file_size = pic->file_size;
		out->cluster_size = pic->cluster_size;
		out->clusters = pic->clusters;
		out->clusters_per_cell = pic->clusters_per_cell;
		out->cells = pic->cells;
		out->kinds = QCOW_PIC_NKINDS;
		for (unsigned k = 0; k < QCOW_PIC_NKINDS; k++)
			out->totals[k] = pic->totals[k];
		memcpy(out->cell, pic->cell, pic->cells);
		fuse_reply_ioctl(req, 0, out, sizeof(*out));
	} else {
		fuse_reply_err(req, -ret);
	}
	free(pic);
	free(out);
}

/*
 * The control channel of qcowctl (qcowfs_ioctl.h).  There is deliberately
 * no xattr operation: see the comment there.  The kernel lets only a
 * process that opened the view send these, and the open was checked
 * against the view's mode; the descriptor's access mode (fi->fh, see
 * op_open) decides what it may do: the status (image path, pid,
 * counters) needs read access, a compaction (it rewrites the image)
 * write access.  EBADF otherwise, the answer write(2) gives on a
 * descriptor opened read-only.
 */
static void op_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
		     struct fuse_file_info *fi, unsigned flags, const void *in_buf,
		     size_t in_bufsz, size_t out_bufsz)
{
	uint64_t fh = fi ? fi->fh : 0;

	if (flags & FUSE_IOCTL_COMPAT) {
		fuse_reply_err(req, ENOTTY);
		return;
	}
	switch (cmd) {
	case QCOWFS_IOC_STATUS: {
		if (!(fh & FH_READABLE)) {
			fuse_reply_err(req, EBADF);
			return;
		}
		struct qcowfs_status_text *st = calloc(1, sizeof(*st));
		if (!st) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		int len = status_text(st->text, sizeof(st->text));
		if (len < 0)
			fuse_reply_err(req, -len);
		else
			fuse_reply_ioctl(req, 0, st, sizeof(*st));
		free(st);
		return;
	}
	case QCOWFS_IOC_COMPACT:
		if (!(fh & FH_WRITABLE)) {
			fuse_reply_err(req, EBADF);
			return;
		}
		/* the compaction runs on the recycler thread */
		qcow_image_request_compact(qcowfs.img);
		fuse_reply_ioctl(req, 0, NULL, 0);
		return;
	case QCOWFS_IOC_SPARSIFY: {
		struct qcowfs_sparsify in, out;
		if (in_bufsz < sizeof(in) || out_bufsz < sizeof(out)) {
			fuse_reply_err(req, EINVAL);
			return;
		}
		memcpy(&in, in_buf, sizeof(in));
		int err = sparsify_ioctl(fh, &in, &out);
		if (err)
			fuse_reply_err(req, err);
		else
			fuse_reply_ioctl(req, 0, &out, sizeof(out));
		return;
	}
	case QCOWFS_IOC_SNAPSHOT_CREATE:
	case QCOWFS_IOC_SNAPSHOT_DELETE:
	case QCOWFS_IOC_SNAPSHOT_APPLY:
		snapshot_ioctl(req, cmd, fh, in_buf, in_bufsz);
		return;
	case QCOWFS_IOC_SNAPSHOT_LIST:
		snapshot_list_ioctl(req, fh);
		return;
	case QCOWFS_IOC_PICTURE:
		picture_ioctl(req, fh);
		return;
	default:
		fuse_reply_err(req, ENOTTY);
	}
}

static const struct fuse_lowlevel_ops qcowfs_ops = {
	.init = op_init,
	.lookup = op_lookup,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.open = op_open,
	.read = op_read,
	.write = op_write,
	.flush = op_flush,
	.release = op_release,
	.fsync = op_fsync,
	.statfs = op_statfs,
	.ioctl = op_ioctl,
	.fallocate = op_fallocate,
	.lseek = op_lseek,
};

/* ---- start-up ------------------------------------------------------------ */

/* Undoes the octal escapes of /proc/self/mountinfo ("\040" for a space,
 * also tab, newline and backslash) in place. */
static void mountinfo_unescape(char *s)
{
	char *out = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*out++ = (char)((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
			s += 3;
		} else {
			*out++ = *s;
		}
	}
	*out = '\0';
}

/* Whether something is mounted on path (absolute, symlinks resolved):
 * 1 with "TYPE SOURCE" of the topmost mount there in what, 0 if nothing
 * is, a negative errno if /proc/self/mountinfo cannot be read.  Reads the
 * table rather than comparing st_dev with the parent's: a bind mount of a
 * file from the same file system has the same st_dev. */
static int mounted_at(const char *path, char *what, size_t whatlen)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int found = 0;

	if (!f)
		return -errno;
	/* "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER" */
	while (getline(&line, &cap, f) > 0) {
		char *save = NULL, *field[5] = { NULL }, *tok, *type = NULL, *source = NULL;
		int n = 0;

		line[strcspn(line, "\n")] = '\0';
		for (tok = strtok_r(line, " ", &save); tok && n < 5; tok = strtok_r(NULL, " ", &save))
			field[n++] = tok;
		if (n < 5)
			continue;
		while ((tok = strtok_r(NULL, " ", &save)) && strcmp(tok, "-"))
			;
		if (tok) {
			type = strtok_r(NULL, " ", &save);
			source = type ? strtok_r(NULL, " ", &save) : NULL;
		}
		mountinfo_unescape(field[4]);
		if (strcmp(field[4], path))
			continue;
		/* later lines are mounted on top of earlier ones: keep the last */
		if (type)
			mountinfo_unescape(type);
		if (source)
			mountinfo_unescape(source);
		snprintf(what, whatlen, "%s from %s", type ? type : "unknown type",
			 source ? source : "unknown source");
		found = 1;
	}
	free(line);
	fclose(f);
	return found;
}

/* The absolute name of path without stat()ing path itself (a dead FUSE
 * mount answers ENOTCONN): its folder resolved, plus its last name. */
static char *mountpoint_path_no_stat(const char *path)
{
	char *copy = strdup(path), *dir = NULL, *out = NULL;
	const char *base;

	if (!copy)
		return NULL;
	char *slash = strrchr(copy, '/');
	if (slash) {
		*slash = '\0';
		base = slash + 1;
		dir = realpath(copy[0] ? copy : "/", NULL);
	} else {
		base = copy;
		dir = realpath(".", NULL);
	}
	if (dir && *base && asprintf(&out, "%s%s%s", dir, strcmp(dir, "/") ? "/" : "", base) < 0)
		out = NULL;
	free(dir);
	free(copy);
	return out;
}

/* Resolves the image path and checks (creating if missing) the
 * mountpoint, before forking, so that the plain mistakes are reported
 * without starting a daemon.  Fills qcowfs.image_path, .mountpoint,
 * .created_mountpoint, and the view's first .uid, .gid and .mode: the
 * image file's, so that mounting never shows a disk to more users than
 * the image file does (uid=/gid= choose another owner). */
static int prepare_paths(char *err, size_t errlen)
{
	struct stat image_st, mp_st;

	qcowfs.image_path = realpath(qcowfs.opts.image, NULL);
	if (!qcowfs.image_path || stat(qcowfs.image_path, &image_st)) {
		snprintf(err, errlen, "cannot open image %s: %s",
			 qcowfs.opts.image, strerror(errno));
		return -1;
	}
	if (S_ISDIR(image_st.st_mode)) {
		snprintf(err, errlen, "cannot open image %s: %s",
			 qcowfs.opts.image, strerror(EISDIR));
		return -1;
	}
	qcowfs.mtime_ns = timespec_to_ns(image_st.st_mtim);
	qcowfs.ctime_ns = qcowfs.mtime_ns;
	qcowfs.uid = qcowfs.opts.has_uid ? qcowfs.opts.uid : image_st.st_uid;
	qcowfs.gid = qcowfs.opts.has_gid ? qcowfs.opts.gid : image_st.st_gid;
	qcowfs.mode = image_st.st_mode & 07777;
	if (qcowfs.opts.open.read_only)
		qcowfs.mode &= ~(mode_t)0222;

	if (stat(qcowfs.opts.mountpoint, &mp_st)) {
		if (errno == ENOTCONN) {
			char what[512] = "";
			char *dead = mountpoint_path_no_stat(qcowfs.opts.mountpoint);

			if (dead && mounted_at(dead, what, sizeof(what)) > 0)
				snprintf(err, errlen, "mountpoint %s: %s (a dead mount of "
					 "%s; run 'fusermount3 -u %s')",
					 qcowfs.opts.mountpoint, strerror(ENOTCONN), what,
					 qcowfs.opts.mountpoint);
			else
				snprintf(err, errlen, "mountpoint %s: %s (a dead qcowfs "
					 "mount? run 'fusermount3 -u %s')",
					 qcowfs.opts.mountpoint, strerror(ENOTCONN),
					 qcowfs.opts.mountpoint);
			free(dead);
			return -1;
		}
		if (errno != ENOENT)
			goto mp_error;
		/* Like QEMU's export, the mountpoint is a regular file; we
		 * create it so that "qcowfs disk.qcow2 disk.raw" just works. */
		int fd = open(qcowfs.opts.mountpoint,
			      O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd < 0) {
			snprintf(err, errlen, "cannot create mountpoint %s: %s",
				 qcowfs.opts.mountpoint, strerror(errno));
			return -1;
		}
		close(fd);
		qcowfs.created_mountpoint = true;
		if (stat(qcowfs.opts.mountpoint, &mp_st))
			goto mp_error;
		qcowfs.created_dev = mp_st.st_dev;
		qcowfs.created_ino = mp_st.st_ino;
	}
	qcowfs.mountpoint = realpath(qcowfs.opts.mountpoint, NULL);
	if (!qcowfs.mountpoint)
		goto mp_error;
	/* Mounting over a mount would stack: the file under it disappears
	 * from view, and unmounting by name (qcowctl unmount, fusermount3
	 * -u) then takes away the wrong one.  Checked before the image is
	 * opened, so nothing is locked or changed. */
	char what[512];
	int mounted = mounted_at(qcowfs.mountpoint, what, sizeof(what));
	if (mounted > 0) {
		/* what starts with the type: a FUSE mount (a live or dead
		 * daemon) is taken away by its user with fusermount3 */
		snprintf(err, errlen, "mountpoint %s is already a mount point (%s); "
			 "unmount it first ('%s %s') or choose another file",
			 qcowfs.opts.mountpoint, what,
			 strncmp(what, "fuse", 4) ? "umount" : "fusermount3 -u",
			 qcowfs.opts.mountpoint);
		return -1;
	}
	if (mounted < 0)
		log_printf(LOG_WARNING, "cannot tell whether %s is a mount point "
			   "(/proc/self/mountinfo: %s); mounting anyway",
			   qcowfs.mountpoint, strerror(-mounted));
	if (!S_ISREG(mp_st.st_mode)) {
		snprintf(err, errlen, "mountpoint %s is not a regular file "
			 "(qcowfs shows the disk as one file: give a file name)",
			 qcowfs.opts.mountpoint);
		return -1;
	}
	if (mp_st.st_dev == image_st.st_dev && mp_st.st_ino == image_st.st_ino) {
		snprintf(err, errlen, "mountpoint %s is the image itself",
			 qcowfs.opts.mountpoint);
		return -1;
	}
	return 0;

mp_error:
	snprintf(err, errlen, "mountpoint %s: %s", qcowfs.opts.mountpoint,
		 strerror(errno));
	return -1;
}

/* Removes the mountpoint file we created, once nothing is mounted on it
 * (start-up failed, or the daemon unmounted and is ending): only if the
 * name still is that empty file.  A file the user gave us is never
 * touched, nor one that replaced ours meanwhile. */
static void remove_created_mountpoint(void)
{
	const char *path = qcowfs.mountpoint ? qcowfs.mountpoint : qcowfs.opts.mountpoint;
	struct stat st;

	if (!qcowfs.created_mountpoint)
		return;
	qcowfs.created_mountpoint = false;
	if (lstat(path, &st))
		return;
	if (st.st_dev != qcowfs.created_dev || st.st_ino != qcowfs.created_ino ||
	    !S_ISREG(st.st_mode) || st.st_size != 0) {
		log_printf(LOG_INFO, "mountpoint %s was replaced meanwhile: left in place", path);
		return;
	}
	if (unlink(path) && errno != ENOENT)
		log_printf(LOG_WARNING, "cannot remove the mountpoint file %s we created: %s",
			   path, strerror(errno));
}

/* Appends ",word" to a fuse_opt option list, escaping ',' and '\'. */
static int append_option(char **list, const char *key, const char *value)
{
	size_t len = strlen(*list), extra = strlen(key) + 2;

	if (value)
		extra += 2 * strlen(value) + 1;
	char *p = realloc(*list, len + extra);
	if (!p)
		return -ENOMEM;
	*list = p;
	p += len;
	if (len)
		*p++ = ',';
	p = stpcpy(p, key);
	if (value) {
		*p++ = '=';
		for (const char *v = value; *v; v++) {
			if (*v == ',' || *v == '\\')
				*p++ = '\\';
			*p++ = *v;
		}
	}
	*p = '\0';
	return 0;
}

/* The mount options: the user's pass-through ones plus ours.
 * default_permissions (always, whatever the user gave) makes the kernel
 * check the mode and owner we show, as for any file, and the rules of
 * chmod and chown; without it any user let in by allow_other could read
 * and write the disk.  fsname and subtype make /proc/mounts read
 * "IMAGE MOUNTPOINT fuse.qcowfs". */
static char *build_mount_options(void)
{
	char *list = strdup(qcowfs.opts.kernel_opts);
	int ret = list ? 0 : -ENOMEM;

	if (!ret)
		ret = append_option(&list, "default_permissions", NULL);
	if (!ret && !qcowfs.opts.has_fsname)
		ret = append_option(&list, "fsname", qcowfs.image_path);
	if (!ret && !qcowfs.opts.has_subtype)
		ret = append_option(&list, "subtype", "qcowfs");
	if (!ret && qcowfs.read_only)
		ret = append_option(&list, "ro", NULL);
	if (!ret && qcowfs.opts.allow_other)
		ret = append_option(&list, "allow_other", NULL);
	if (!ret && qcowfs.opts.allow_root)
		ret = append_option(&list, "allow_root", NULL);
	if (ret) {
		free(list);
		return NULL;
	}
	return list;
}

/* What to add to "cannot open image" when the image could not be opened
 * for writing but can be read: a read-only image file (or one on a
 * read-only file system) is the common case, and -o ro is the answer. */
static const char *open_hint(int ret)
{
	int fd;

	if (qcowfs.opts.open.read_only ||
	    (ret != -EACCES && ret != -EPERM && ret != -EROFS))
		return "";
	fd = open(qcowfs.image_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return "";
	close(fd);
	return ret == -EROFS ? " (the image's file system is read-only: mount it with -o ro)"
			     : " (the image file is read-only for you: mount it with -o ro, "
			       "or give yourself write permission on it)";
}

/* After a failed mount, what to check about the FUSE device, as far as
 * we can tell from here (libfuse's own message says what failed, not
 * what to do about it): the module, the device's permissions, and
 * user_allow_other for allow_other.  Empty when /dev/fuse looks fine. */
static void fuse_device_hint(char *hint, size_t len)
{
	struct stat st;
	int fd;

	hint[0] = '\0';
	if (stat("/dev/fuse", &st)) {
		snprintf(hint, len, " (/dev/fuse: %s; is the fuse module loaded? "
			 "try 'modprobe fuse')", strerror(errno));
		return;
	}
	if (!S_ISCHR(st.st_mode)) {
		snprintf(hint, len, " (/dev/fuse is not a character device: "
			 "recreate it with 'mknod -m 0666 /dev/fuse c 10 229')");
		return;
	}
	fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENODEV || errno == ENXIO)
			snprintf(hint, len, " (/dev/fuse: %s; is the fuse module "
				 "loaded? try 'modprobe fuse')", strerror(errno));
		else
			/* libfuse opens the device itself, also for users
			 * (fusermount3 only does the mount(2) for them) */
			snprintf(hint, len, " (/dev/fuse: %s: check that the fuse module "
				 "is loaded, and the device's permissions: you need read and "
				 "write access (usually crw-rw-rw- root root; a container "
				 "needs the device passed in)%s)", strerror(errno),
				 qcowfs.opts.allow_other && geteuid() != 0
					 ? "; allow_other also needs user_allow_other in /etc/fuse.conf"
					 : "");
		return;
	}
	close(fd);
	if (qcowfs.opts.allow_other && geteuid() != 0)
		snprintf(hint, len, " (allow_other needs user_allow_other in "
			 "/etc/fuse.conf for users other than root)");
}

/* Opens the image, creates the session and mounts.  On failure undoes
 * what it did, fills err and returns -1. */
static int open_and_mount(char *err, size_t errlen)
{
	char engine_err[512] = "";
	int ret;

	ret = qcow_image_open(qcowfs.image_path, &qcowfs.opts.open, &qcowfs.img,
			      engine_err, sizeof(engine_err));
	if (ret < 0) {
		snprintf(err, errlen, "cannot open image %s: %s%s", qcowfs.opts.image,
			 engine_err[0] ? engine_err : strerror(-ret), open_hint(ret));
		qcowfs.img = NULL;
		return -1;
	}
	qcowfs.read_only = qcowfs.opts.open.read_only;

	char *mount_options = build_mount_options();
	char *argv[] = { "qcowfs", "-o", mount_options, "-d", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(qcowfs.opts.debug ? 4 : 3, argv);
	if (!mount_options) {
		snprintf(err, errlen, "out of memory");
		goto fail_close;
	}
	qcowfs.se = fuse_session_new(&args, &qcowfs_ops, sizeof(qcowfs_ops), &qcowfs);
	fuse_opt_free_args(&args);
	free(mount_options);
	if (!qcowfs.se) {
		snprintf(err, errlen, "cannot create the FUSE session: %s",
			 qcowfs.startup_log[0] ? qcowfs.startup_log : "bad mount options");
		goto fail_close;
	}
	if (fuse_set_signal_handlers(qcowfs.se)) {
		snprintf(err, errlen, "cannot install signal handlers");
		goto fail_session;
	}
	if (fuse_session_mount(qcowfs.se, qcowfs.mountpoint)) {
		char hint[512];

		fuse_device_hint(hint, sizeof(hint));
		snprintf(err, errlen, "cannot mount %s on %s: %s%s", qcowfs.opts.image,
			 qcowfs.opts.mountpoint,
			 qcowfs.startup_log[0] ? qcowfs.startup_log : "mount failed", hint);
		goto fail_signals;
	}
	return 0;

fail_signals:
	fuse_remove_signal_handlers(qcowfs.se);
fail_session:
	fuse_session_destroy(qcowfs.se);
	qcowfs.se = NULL;
fail_close:
	/* The image was not changed by us; a failing close would only mean
	 * the lock release or a flush of nothing failed. */
	qcow_image_close(qcowfs.img);
	qcowfs.img = NULL;
	return -1;
}

/* Leaves the terminal's session and points stdio at /dev/null; from here
 * on messages go to syslog. */
static void detach(void)
{
	int fd;

	setsid();
	if (chdir("/"))
		log_printf(LOG_WARNING, "chdir /: %s", strerror(errno));
	fd = open("/dev/null", O_RDWR);
	if (fd >= 0) {
		dup2(fd, STDIN_FILENO);
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		if (fd > STDERR_FILENO)
			close(fd);
	}
	__atomic_store_n(&qcowfs.log_to_syslog, true, __ATOMIC_RELEASE);
}

/* Started with stdin, stdout or stderr closed (possible from some boot
 * paths), the image or the /dev/fuse descriptor could land on 0..2 and
 * detach() would then overwrite it: occupy them with /dev/null. */
static void ensure_stdio_open(void)
{
	int fd;

	do
		fd = open("/dev/null", O_RDWR);
	while (fd >= 0 && fd <= STDERR_FILENO);
	if (fd > STDERR_FILENO)
		close(fd);
}

/* A daemon must not keep its starter's descriptors open: a caller that
 * reads a pipe until EOF (a test harness, "$(...)", make's jobserver)
 * would wait for the daemon's whole life.  stdio is handled by detach();
 * everything else above it goes now, before the engine opens anything.
 * close_range() needs Linux 5.9; on older kernels the descriptors stay. */
static void close_inherited_fds(int keep_fd)
{
	if (keep_fd > STDERR_FILENO + 1)
		close_range(STDERR_FILENO + 1, (unsigned)keep_fd - 1, 0);
	close_range((unsigned)keep_fd + 1, ~0U, 0);
}

/* Sends the start-up result to the waiting parent: "OK" or the error. */
static int report_to_parent(int fd, const char *msg)
{
	size_t len = strlen(msg);
	ssize_t done;

	while ((done = write(fd, msg, len)) < 0 && errno == EINTR)
		;
	return done == (ssize_t)len ? 0 : -1;
}

/* The parent: waits for the child's verdict.  Returns the exit code. */
static int wait_for_daemon(int fd, pid_t child)
{
	char msg[2048];
	size_t len = 0;
	ssize_t got;

	while (len < sizeof(msg) - 1) {
		got = read(fd, msg + len, sizeof(msg) - 1 - len);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			break;
		len += (size_t)got;
	}
	msg[len] = '\0';
	close(fd);
	if (!strcmp(msg, "OK"))
		return 0;

	int status;
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	if (len)
		fprintf(stderr, "qcowfs: %s\n", msg);
	else if (WIFSIGNALED(status))
		fprintf(stderr, "qcowfs: the daemon died during start-up (signal %d)\n",
			WTERMSIG(status));
	else
		fprintf(stderr, "qcowfs: the daemon exited during start-up (status %d)\n",
			WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	return 1;
}

/* ---- serving and shutdown ------------------------------------------------- */

/* Worker threads when the user chose none: twice the CPUs, 4 to 16.
 * Each idle thread keeps a max_write-sized (1 MiB) buffer, so libfuse's
 * default of 10 cost 6 MiB of peak memory on a 2-CPU machine for no
 * throughput (bench/run.sh: same IOPS and MB/s with 4); more CPUs can
 * keep more blocking preads going against a real disk. */
static unsigned default_max_threads(void)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	long n = cpus > 0 ? 2 * cpus : 4;
	return (unsigned)(n < 4 ? 4 : n > 16 ? 16 : n);
}

/* ---- the close report ------------------------------------------------------ */

/*
 * How `qcowctl unmount` learns what the final close did.  The daemon's
 * exit status reaches nobody once it has detached, and an image may check
 * clean although its close failed (the header or the last refcounts could
 * not be written), so qcowctl asks the daemon itself:
 *  - after mounting, the daemon listens on a Unix stream socket in the
 *    abstract namespace, "qcowfs-close-PID-RANDOM"; the status text shows
 *    it as "close_report=@NAME";
 *  - qcowctl connects before it unmounts (the connection waits in the
 *    listen backlog: the daemon accepts nothing while it serves), checks
 *    with SO_PEERCRED that the listener is the daemon's pid, unmounts and
 *    reads until end of file;
 *  - after unmounting and closing the image (its locks are released
 *    then), the daemon accepts every waiting connection and sends
 *    "exit=N\n" (N its exit status) followed by the lines it logged about
 *    the shutdown, the same text as in its log, then exits.  Only root,
 *    the daemon's user and the view's owner get the report; other callers
 *    get end of file at once.
 * No connection is ever accepted while serving, so no thread is needed and
 * a caller cannot hold the daemon up.
 */
static void report_open(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	uint64_t nonce = 0;
	int fd, n, err;

	if (getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK) != (ssize_t)sizeof(nonce))
		nonce = (uint64_t)now_ns() ^ ((uint64_t)qcowfs.pid << 32);
	/* abstract: sun_path[0] stays '\0' and the name has no terminator */
	n = snprintf(sa.sun_path + 1, sizeof(sa.sun_path) - 1, "qcowfs-close-%ld-%016llx",
		     (long)qcowfs.pid, (unsigned long long)nonce);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		goto fail;
	if (bind(fd, (struct sockaddr *)&sa,
		 (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n)) ||
	    listen(fd, QCOWFS_REPORT_BACKLOG))
		goto fail;
	qcowfs.report_fd = fd;
	snprintf(qcowfs.report_name, sizeof(qcowfs.report_name), "@%s", sa.sun_path + 1);
	return;

fail:
	err = errno;
	if (fd >= 0)
		close(fd);
	log_printf(LOG_WARNING, "no close report for qcowctl unmount (socket: %s); "
		   "it will check the image instead", strerror(err));
}

/* Sends the report (see above) to everyone waiting for it. */
static void report_send(int exit_code, const char *lines)
{
	char text[4096];
	int len;

	if (qcowfs.report_fd < 0)
		return;
	len = snprintf(text, sizeof(text), "exit=%d\n%s", exit_code, lines);
	if (len < 0)
		len = 0;
	if ((size_t)len >= sizeof(text))
		len = (int)sizeof(text) - 1;
	for (;;) {
		struct ucred cred;
		socklen_t cred_len = sizeof(cred);
		int conn = accept4(qcowfs.report_fd, NULL, NULL, SOCK_CLOEXEC);

		if (conn < 0 && errno == EINTR)
			continue;
		if (conn < 0)
			break;   /* EAGAIN: nobody else waits */
		pthread_mutex_lock(&qcowfs.attr_lock);
		uid_t owner = qcowfs.uid;
		pthread_mutex_unlock(&qcowfs.attr_lock);
		if (!getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) &&
		    (cred.uid == 0 || cred.uid == getuid() || cred.uid == geteuid() ||
		     cred.uid == owner)) {
			/* A few hundred bytes always fit the socket buffer;
			 * never block on, or die of, a reader that left (a
			 * qcowctl whose unmount failed earlier: not news). */
			if (send(conn, text, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL) != len &&
			    errno != EPIPE && errno != ECONNRESET)
				log_printf(LOG_WARNING, "close report to pid %ld not sent: %s",
					   (long)cred.pid, strerror(errno));
		}
		close(conn);
	}
	close(qcowfs.report_fd);
	qcowfs.report_fd = -1;
}

/* Logs one line about the shutdown and adds it to the close report. */
static void shutdown_note(char *report, size_t cap, int priority, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void shutdown_note(char *report, size_t cap, int priority, const char *fmt, ...)
{
	char msg[1024];
	size_t used = strlen(report);
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	log_message(priority, msg);
	snprintf(report + used, cap - used, "%s\n", msg);
}

/* Runs the request loop until unmount or a signal, then unmounts, closes
 * the image and sends the close report.  Returns the process exit code. */
static int serve(void)
{
	struct fuse_loop_config *config = fuse_loop_cfg_create();
	char report[2048] = "";
	int loop_ret, close_ret, exit_code;

	if (!config) {
		log_printf(LOG_ERR, "out of memory");
		loop_ret = -ENOMEM;
	} else {
		fuse_loop_cfg_set_max_threads(config, qcowfs.opts.max_threads ? qcowfs.opts.max_threads
									 : default_max_threads());
		loop_ret = fuse_session_loop_mt(qcowfs.se, config);
		fuse_loop_cfg_destroy(config);
	}
	/* 0: unmounted; > 0: the signal that ended the loop (a requested
	 * shutdown); < 0: the loop failed. */
	if (loop_ret < 0)
		shutdown_note(report, sizeof(report), LOG_ERR, "request loop failed: %s",
			      strerror(-loop_ret));
	else if (loop_ret > 0)
		log_printf(LOG_INFO, "signal %d: unmounting %s", loop_ret, qcowfs.mountpoint);

	/* Unmount first so no request can arrive at a closing image. */
	fuse_session_unmount(qcowfs.se);
	sparsify_stop();
	close_ret = qcow_image_close(qcowfs.img);
	qcowfs.img = NULL;
	if (close_ret < 0)
		shutdown_note(report, sizeof(report), LOG_ERR,
			      "closing %s failed: %s; run 'qcowctl check' on it",
			      qcowfs.image_path, strerror(-close_ret));
	else
		shutdown_note(report, sizeof(report), LOG_INFO, "%s closed cleanly",
			      qcowfs.image_path);
	fuse_remove_signal_handlers(qcowfs.se);
	fuse_session_destroy(qcowfs.se);
	qcowfs.se = NULL;
	/* Unmounted: a mountpoint file we created goes with the mount, so
	 * that "qcowfs a.qcow2 a.raw" and an unmount leave the folder as it
	 * was.  Before the close report, so that qcowctl unmount returns to
	 * a folder without it. */
	remove_created_mountpoint();
	exit_code = close_ret < 0 || loop_ret < 0 ? 1 : 0;
	report_send(exit_code, report);
	return exit_code;
}

/* fuse_set_signal_handlers() leaves alone a signal whose disposition is
 * "ignore", and a shell starts background jobs ("qcowfs -f ... &") with
 * SIGINT ignored.  Here SIGTERM, SIGINT and SIGHUP always mean "unmount
 * and close the image cleanly": a daemon that shrugs off the polite
 * signal gets SIGKILLed later, which skips the clean close. */
static void reset_shutdown_signals(void)
{
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
}

/* The process that opens, mounts and serves.  report_fd is the pipe to
 * the waiting parent, or -1 in the foreground. */
static int run_daemon(int report_fd)
{
	char err[2048];

	qcowfs.pid = getpid();
	qcowfs.capture_fuse_log = report_fd >= 0;
	reset_shutdown_signals();
	if (open_and_mount(err, sizeof(err))) {
		remove_created_mountpoint();
		if (report_fd >= 0)
			report_to_parent(report_fd, err);
		else
			fprintf(stderr, "qcowfs: %s\n", err);
		return 1;
	}
	qcowfs.capture_fuse_log = false;
	/* Before "OK": the status must name the report from the first
	 * request on. */
	report_open();

	if (report_fd >= 0) {
		if (report_to_parent(report_fd, "OK")) {
			/* Whoever started us cannot learn that the mount is
			 * live (killed meanwhile): do not leave it behind. */
			log_printf(LOG_ERR, "start-up report failed: %s; unmounting",
				   strerror(errno));
			fuse_session_exit(qcowfs.se);
		}
		close(report_fd);
		detach();
	}
	log_printf(LOG_INFO, "serving %s on %s%s (pid %ld)", qcowfs.image_path,
		   qcowfs.mountpoint, qcowfs.read_only ? ", read-only" : "",
		   (long)qcowfs.pid);
	return serve();
}

int main(int argc, char **argv)
{
	char err[2048];
	int ret, pipe_fds[2];

	ensure_stdio_open();
	if (qcowfs_opts_parse(argc, argv, &qcowfs.opts, err, sizeof(err))) {
		fprintf(stderr, "qcowfs: %s\n", err);
		qcowfs_opts_free(&qcowfs.opts);
		return 1;
	}
	if (qcowfs.opts.show_help) {
		qcowfs_print_usage(stdout, "qcowfs");
		return 0;
	}
	if (qcowfs.opts.show_version) {
		qcowfs_print_version(stdout);
		return 0;
	}

	qcow_log_set_sink(engine_log_sink, NULL);
	if (qcowfs.opts.debug)
		qcow_log_set_verbosity(QCOW_LOG_DEBUG);
	fuse_set_log_func(fuse_log_sink);
	openlog("qcowfs", LOG_PID, LOG_DAEMON);
	if (pthread_key_create(&qcowfs.read_buffer_key, read_buffer_free)) {
		fprintf(stderr, "qcowfs: cannot create a thread key\n");
		return 1;
	}

	if (prepare_paths(err, sizeof(err))) {
		fprintf(stderr, "qcowfs: %s\n", err);
		remove_created_mountpoint();
		return 1;
	}

	if (qcowfs.opts.foreground) {
		ret = run_daemon(-1);
	} else {
		/* Fork before the engine starts threads and before mounting
		 * (the child owns both); the parent stays until the mount is
		 * live so that the next line of a script can use the file. */
		if (pipe2(pipe_fds, O_CLOEXEC)) {
			fprintf(stderr, "qcowfs: pipe: %s\n", strerror(errno));
			remove_created_mountpoint();
			return 1;
		}
		fflush(NULL);
		pid_t child = fork();
		if (child < 0) {
			fprintf(stderr, "qcowfs: fork: %s\n", strerror(errno));
			remove_created_mountpoint();
			return 1;
		}
		if (child > 0) {
			close(pipe_fds[1]);
			return wait_for_daemon(pipe_fds[0], child);
		}
		close(pipe_fds[0]);
		close_inherited_fds(pipe_fds[1]);
		ret = run_daemon(pipe_fds[1]);
	}

	free(qcowfs.image_path);
	free(qcowfs.mountpoint);
	qcowfs_opts_free(&qcowfs.opts);
	closelog();
	return ret;
}
