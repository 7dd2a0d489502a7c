/*
 * qcow_io.h - the I/O backend interface below the engine.
 *
 * The engine never calls a system call on the image directly; it goes
 * through one struct qcow_io so that unit tests can run it on memory and on
 * the crash simulator.  Contract of every backend:
 *  - pread returns exactly len bytes or a negative errno; bytes past the end
 *    of the file read as zeros (qcow2 files may end inside their last
 *    cluster).
 *  - pwrite writes exactly len bytes (extending the file) or fails.
 *  - flush is a barrier: writes before it are durable when it returns.
 *  - punch makes a range read zeros and may free its space; -EOPNOTSUPP when
 *    the backend cannot (then the caller writes zeros).
 *  - copy copies within the file (copy_file_range where it works).
 *  - Calls may come from many threads at once.
 */
#ifndef QCOW_IO_H
#define QCOW_IO_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct qcow_io;

struct qcow_io_ops {
	int (*pread)(struct qcow_io *io, void *buf, size_t len, uint64_t off);
	int (*pwrite)(struct qcow_io *io, const void *buf, size_t len, uint64_t off);
	int (*flush)(struct qcow_io *io);
	int (*punch)(struct qcow_io *io, uint64_t off, uint64_t len);
	int (*truncate)(struct qcow_io *io, uint64_t size);
	int64_t (*size)(struct qcow_io *io);
	int64_t (*allocated)(struct qcow_io *io);  /* bytes allocated on the host */
	int (*copy)(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len);
	/* QEMU-compatible locks; NULL = no locking possible */
	int (*lock)(struct qcow_io *io, bool read_only, char *err, size_t errlen);
	void (*close)(struct qcow_io *io);
};

struct qcow_io {
	const struct qcow_io_ops *ops;
	const char *name;   /* for messages */
};

/* The production backend over a file.  read_only opens O_RDONLY. */
int qcow_io_file_open(const char *path, bool read_only, struct qcow_io **out);

/* An in-memory file, for unit tests; initial contents copied from data. */
struct qcow_io *qcow_io_mem_new(const void *data, size_t len);
/* The current bytes of a memory backend (valid until the next write). */
const uint8_t *qcow_io_mem_data(struct qcow_io *io, size_t *len);

/* The crash simulator: a memory file that remembers every write since the
 * last flush.  qcow_io_crash_crash() "loses power": it keeps a random
 * subset of the unflushed writes (each torn at 512-byte granularity,
 * chosen with the given seed) and returns a new memory backend holding
 * what a disk could contain after the crash.  The simulator stays usable
 * (further calls fail with -EIO, like a dead disk). */
struct qcow_io *qcow_io_crash_new(const void *data, size_t len);
struct qcow_io *qcow_io_crash_crash(struct qcow_io *io, uint64_t seed);
/* Number of barriers (flushes) seen, for tests that crash at the Nth. */
uint64_t qcow_io_crash_barriers(struct qcow_io *io);
/* Make every write after the given number of further writes fail with
 * -EIO and be lost (the disk dies); 0 disables. */
void qcow_io_crash_die_after(struct qcow_io *io, uint64_t writes);

static inline void qcow_io_close(struct qcow_io *io) { if (io) io->ops->close(io); }

/* Writes len zero bytes at off (qcow_io_mem.c). */
int qcow_io_write_zeros(struct qcow_io *io, uint64_t off, uint64_t len);

#endif
