/*
 * qcow_io_file.c - the production I/O backend: a plain host file.
 *
 * Owns: the image file descriptor, its QEMU-compatible OFD locks (through
 * qcow_lock.c) and the probing of punch-hole support.  Rules: reads past
 * EOF return zeros; short reads/writes are retried; EINTR is retried.
 */
#include "config.h"
#include "qcow_internal.h"
#include "qcow_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct file_io {
	struct qcow_io io;
	int fd;
	bool copy_range_works;   /* cleared after the first EXDEV/EINVAL/ENOSYS */
	char *path;
};

#define FILE_IO(x) ((struct file_io *)(x))

static int file_pread(struct qcow_io *io, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = pread(FILE_IO(io)->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {          /* past EOF: zeros, as the format allows */
			memset(p, 0, len);
			return 0;
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int file_pwrite(struct qcow_io *io, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = pwrite(FILE_IO(io)->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int file_flush(struct qcow_io *io)
{
	return fdatasync(FILE_IO(io)->fd) < 0 ? -errno : 0;
}

static int file_punch(struct qcow_io *io, uint64_t off, uint64_t len)
{
	if (fallocate(FILE_IO(io)->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)off, (off_t)len) < 0)
		return errno == ENOSYS ? -EOPNOTSUPP : -errno;
	return 0;
}

static int file_truncate(struct qcow_io *io, uint64_t size)
{
	return ftruncate(FILE_IO(io)->fd, (off_t)size) < 0 ? -errno : 0;
}

static int64_t file_size(struct qcow_io *io)
{
	struct stat st;
	if (fstat(FILE_IO(io)->fd, &st) < 0)
		return -errno;
	return st.st_size;
}

static int64_t file_allocated(struct qcow_io *io)
{
	struct stat st;
	if (fstat(FILE_IO(io)->fd, &st) < 0)
		return -errno;
	return (int64_t)st.st_blocks * 512;
}

/* Copies with copy_file_range (a reflink on XFS/btrfs, an in-kernel copy
 * elsewhere); falls back to a bounce buffer when the kernel or file system
 * refuses. */
static int file_copy(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len)
{
	struct file_io *f = FILE_IO(io);
	while (len > 0 && f->copy_range_works) {
		loff_t in = (loff_t)src, out = (loff_t)dst;
		ssize_t n = copy_file_range(f->fd, &in, f->fd, &out, len, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
				f->copy_range_works = false;
				break;
			}
			return -errno;
		}
		if (n == 0)  /* source past EOF: the rest reads as zeros */
			break;
		src += (uint64_t)n;
		dst += (uint64_t)n;
		len -= (uint64_t)n;
	}
	if (len == 0)
		return 0;
	size_t chunk = len < (1u << 20) ? (size_t)len : (1u << 20);
	void *buf = qcow_malloc(chunk);
	if (!buf)
		return -ENOMEM;
	int ret = 0;
	while (len > 0 && ret == 0) {
		size_t n = len < chunk ? (size_t)len : chunk;
		ret = file_pread(io, buf, n, src);
		if (ret == 0)
			ret = file_pwrite(io, buf, n, dst);
		src += n;
		dst += n;
		len -= n;
	}
	qcow_free(buf);
	return ret;
}

static int file_lock(struct qcow_io *io, bool read_only, char *err, size_t errlen)
{
	struct file_io *f = FILE_IO(io);
	return qcow_lock_image(f->fd, f->path, read_only, err, errlen);
}

static void file_close(struct qcow_io *io)
{
	struct file_io *f = FILE_IO(io);
	close(f->fd);          /* drops the OFD locks */
	qcow_free(f->path);
	qcow_free(f);
}

static const struct qcow_io_ops file_ops = {
	.pread = file_pread, .pwrite = file_pwrite, .flush = file_flush,
	.punch = file_punch, .truncate = file_truncate, .size = file_size,
	.allocated = file_allocated, .copy = file_copy, .lock = file_lock,
	.close = file_close,
};

int qcow_io_file_open(const char *path, bool read_only, struct qcow_io **out)
{
	int fd = open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	struct stat st;
	if (fstat(fd, &st) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return -EINVAL;
	}
	struct file_io *f = qcow_calloc(1, sizeof(*f));
	if (!f || !(f->path = qcow_strdup(path))) {
		qcow_free(f);
		close(fd);
		return -ENOMEM;
	}
	f->fd = fd;
	f->copy_range_works = true;
	f->io.ops = &file_ops;
	f->io.name = f->path;
	*out = &f->io;
	return 0;
}
