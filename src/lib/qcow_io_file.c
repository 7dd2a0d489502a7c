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

/* Copies one range that holds data, with copy_file_range (a reflink on
 * XFS/btrfs, an in-kernel copy elsewhere); falls back to a bounce buffer
 * when the kernel or file system refuses. */
static int copy_data_range(struct file_io *f, uint64_t src, uint64_t dst, uint64_t len)
{
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
			return 0;
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
		ret = file_pread(&f->io, buf, n, src);
		if (ret == 0)
			ret = file_pwrite(&f->io, buf, n, dst);
		src += n;
		dst += n;
		len -= n;
	}
	qcow_free(buf);
	return ret;
}

/* Copies the data ranges of [src, src+len) to dst and skips the holes
 * (SEEK_DATA / SEEK_HOLE).  copy_file_range alone would write a hole out
 * as zero blocks: compacting a sparse image (preallocation=metadata, or
 * clusters the guest never filled) would then allocate every hole it moves.
 * Skipping is correct because the engine's only caller copies into
 * clusters that already read zeros: move destinations are Available, and
 * an Available cluster was punched (or zero-written) and the punch made
 * durable by a flush, or is new file tail (qcow_io.h, "copy").  A file
 * system that cannot report holes answers the whole range as data, which
 * is the plain copy. */
static int file_copy(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len)
{
	struct file_io *f = FILE_IO(io);
	uint64_t end = src + len;
	uint64_t pos = src;
	while (pos < end) {
		off_t d = lseek(f->fd, (off_t)pos, SEEK_DATA);
		if (d < 0) {
			if (errno == ENXIO)   /* no data after pos: the rest reads zeros */
				return 0;
			if (errno != EINVAL && errno != EOPNOTSUPP)
				return -errno;
			d = (off_t)pos;       /* cannot tell holes: all data */
		}
		if ((uint64_t)d >= end)
			return 0;
		off_t h = lseek(f->fd, d, SEEK_HOLE);
		uint64_t stop = h < 0 || (uint64_t)h > end ? end : (uint64_t)h;
		if (stop <= (uint64_t)d)   /* a racing write filled the hole: copy to the end */
			stop = end;
		int ret = copy_data_range(f, (uint64_t)d, dst + ((uint64_t)d - src), stop - (uint64_t)d);
		if (ret)
			return ret;
		pos = stop;
	}
	return 0;
}

static int file_lock_shared(struct qcow_io *io, char *err, size_t errlen)
{
	struct file_io *f = FILE_IO(io);
	return qcow_lock_image_shared(f->fd, f->path, err, errlen);
}

static bool file_other_reader(struct qcow_io *io)
{
	struct file_io *f = FILE_IO(io);
	return qcow_lock_other_reader(f->fd);
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
	.lock_shared = file_lock_shared, .other_reader = file_other_reader,
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
