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
 *  - copy copies within the file (copy_file_range where it works).  The
 *    destination must already read zeros (the compactor copies into
 *    Available clusters only): a backend may skip the source's holes.
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
	/* QEMU's read lock that shares writes (qemu-img -U), for a snapshot
	 * view; and whether another process holds a read lock while we
	 * write (qcow_lock.c).  NULL = no locking possible */
	int (*lock_shared)(struct qcow_io *io, char *err, size_t errlen);
	bool (*other_reader)(struct qcow_io *io);
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

/* The fault injector (qcow_io_fault.c): wraps another backend (and owns
 * it) and makes chosen calls fail, for the error-path tests.
 *  - arm: the nth call (1 = the next) of any kind in ops from now fails
 *    once with err (a negative errno), then calls work again; nth 0
 *    disarms.  With QFAULT_TORN in ops a failing pwrite or copy first
 *    writes a prefix of its range (a torn, failed write).
 *  - space limit: every pwrite, copy or truncate that would make the file
 *    longer than limit bytes fails with -ENOSPC (a full host disk) until
 *    the limit is raised; UINT64_MAX = no limit.
 *  - count: calls of the kinds in ops seen so far (failed ones included). */
enum qcow_fault_op {
	QFAULT_PREAD = 1, QFAULT_PWRITE = 2, QFAULT_FLUSH = 4, QFAULT_PUNCH = 8,
	QFAULT_TRUNCATE = 16, QFAULT_COPY = 32,
	QFAULT_ALL = 63,
	QFAULT_TORN = 64,
};
struct qcow_io *qcow_io_fault_new(struct qcow_io *inner);
void qcow_io_fault_arm(struct qcow_io *io, unsigned ops, uint64_t nth, int err);
void qcow_io_fault_set_space_limit(struct qcow_io *io, uint64_t limit);
uint64_t qcow_io_fault_count(struct qcow_io *io, unsigned ops);
/* True once the armed fault has fired (and until the next arm). */
bool qcow_io_fault_fired(struct qcow_io *io);
/* The wrapped backend (to read its bytes in tests). */
struct qcow_io *qcow_io_fault_inner(struct qcow_io *io);

static inline void qcow_io_close(struct qcow_io *io) { if (io) io->ops->close(io); }

/* Writes len zero bytes at off (qcow_io_mem.c). */
int qcow_io_write_zeros(struct qcow_io *io, uint64_t off, uint64_t len);

#endif
