/*
 * qcow_io_fault.c - the fault-injecting backend for the error-path tests.
 *
 * Owns: the wrapped backend (closed with it), the armed fault (which kinds
 * of call it counts, how many calls are left before it fires, its errno,
 * whether the failing write is torn), the space limit and the per-kind
 * call counters.
 *
 * Rules:
 *  - Every call is forwarded to the wrapped backend unchanged, except the
 *    armed call and calls past the space limit.
 *  - The armed fault fires exactly once, on the nth call of an armed kind
 *    after qcow_io_fault_arm, and disarms itself: later calls work again
 *    (a transient error, as a full disk that gets space back or a flaky
 *    path).  A failed call counts like any other.
 *  - A torn failure (QFAULT_TORN) of a pwrite or copy first writes a
 *    prefix of its range: up to the 512-byte file boundary at or below
 *    its middle, or, when that leaves nothing, its first sector (which
 *    may be all of a short write: the data reached the disk, the caller
 *    still sees the error).  Other kinds fail without side effects.
 *  - The space limit fails a pwrite, copy or truncate with -ENOSPC when it
 *    would make the file longer than the limit; calls inside the current
 *    size always pass.
 *  - One mutex makes every call atomic, as in the memory backends: the
 *    decision and the forwarded call happen together, so the nth call is
 *    well defined when many threads call at once.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

struct fault_io {
	struct qcow_io io;
	struct qcow_io_ops ops;   /* lock is NULL when the inner backend has none */
	struct qcow_io *inner;
	pthread_mutex_t lock;
	unsigned armed;           /* kinds counted towards the fault; 0 = disarmed */
	uint64_t countdown;       /* armed calls left, the last one fails */
	int err;
	bool torn;
	bool fired;
	uint64_t limit;           /* file size limit; UINT64_MAX = none */
	uint64_t counts[6];       /* calls per kind, bit i of enum qcow_fault_op */
};

#define FAULT_IO(x) ((struct fault_io *)(x))

/* Counts a call of kind op; returns the errno it must fail with, or 0.
 * f->lock held. */
static int fault_take(struct fault_io *f, unsigned op)
{
	for (unsigned i = 0; i < 6; i++)
		if (op == 1u << i)
			f->counts[i]++;
	if (!(f->armed & op) || f->countdown == 0)
		return 0;
	if (--f->countdown)
		return 0;
	f->armed = 0;
	f->fired = true;
	return f->err;
}

/* Whether growing the file to end bytes passes the space limit. */
static bool fits(struct fault_io *f, uint64_t end)
{
	if (f->limit == UINT64_MAX || end <= f->limit)
		return true;
	int64_t sz = f->inner->ops->size(f->inner);
	return sz >= 0 && end <= (uint64_t)sz;
}

/* Length of the prefix a torn failure of [off, off+len) writes. */
static uint64_t torn_prefix(uint64_t off, uint64_t len)
{
	uint64_t cut = (off + len / 2) & ~511ull;
	if (cut <= off)
		cut = (off & ~511ull) + 512;
	if (cut > off + len)
		cut = off + len;
	return cut - off;
}

static int fault_pread(struct qcow_io *io, void *buf, size_t len, uint64_t off)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int ret = fault_take(f, QFAULT_PREAD);
	if (ret == 0)
		ret = f->inner->ops->pread(f->inner, buf, len, off);
	pthread_mutex_unlock(&f->lock);
	return ret;
}

static int fault_pwrite(struct qcow_io *io, const void *buf, size_t len, uint64_t off)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int ret = fault_take(f, QFAULT_PWRITE);
	if (ret && f->torn && fits(f, off + torn_prefix(off, len)))
		f->inner->ops->pwrite(f->inner, buf, (size_t)torn_prefix(off, len), off);
	if (ret == 0 && !fits(f, off + len))
		ret = -ENOSPC;
	if (ret == 0)
		ret = f->inner->ops->pwrite(f->inner, buf, len, off);
	pthread_mutex_unlock(&f->lock);
	return ret;
}

static int fault_flush(struct qcow_io *io)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int ret = fault_take(f, QFAULT_FLUSH);
	if (ret == 0)
		ret = f->inner->ops->flush(f->inner);
	pthread_mutex_unlock(&f->lock);
	return ret;
}

static int fault_punch(struct qcow_io *io, uint64_t off, uint64_t len)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int ret = fault_take(f, QFAULT_PUNCH);
	if (ret == 0)
		ret = f->inner->ops->punch(f->inner, off, len);
	pthread_mutex_unlock(&f->lock);
	return ret;
}

static int fault_truncate(struct qcow_io *io, uint64_t size)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int ret = fault_take(f, QFAULT_TRUNCATE);
	if (ret == 0 && !fits(f, size))
		ret = -ENOSPC;
	if (ret == 0)
		ret = f->inner->ops->truncate(f->inner, size);
	pthread_mutex_unlock(&f->lock);
	return ret;
}

static int64_t fault_size(struct qcow_io *io)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int64_t n = f->inner->ops->size(f->inner);
	pthread_mutex_unlock(&f->lock);
	return n;
}

static int64_t fault_allocated(struct qcow_io *io)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int64_t n = f->inner->ops->allocated(f->inner);
	pthread_mutex_unlock(&f->lock);
	return n;
}

static int fault_copy(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	int ret = fault_take(f, QFAULT_COPY);
	if (ret && f->torn && fits(f, dst + torn_prefix(dst, len)))
		f->inner->ops->copy(f->inner, src, dst, torn_prefix(dst, len));
	if (ret == 0 && !fits(f, dst + len))
		ret = -ENOSPC;
	if (ret == 0)
		ret = f->inner->ops->copy(f->inner, src, dst, len);
	pthread_mutex_unlock(&f->lock);
	return ret;
}

static int fault_lock(struct qcow_io *io, bool read_only, char *err, size_t errlen)
{
	struct fault_io *f = FAULT_IO(io);
	return f->inner->ops->lock(f->inner, read_only, err, errlen);
}

static void fault_close(struct qcow_io *io)
{
	struct fault_io *f = FAULT_IO(io);
	qcow_io_close(f->inner);
	pthread_mutex_destroy(&f->lock);
	qcow_free(f);
}

struct qcow_io *qcow_io_fault_new(struct qcow_io *inner)
{
	if (!inner)
		return NULL;
	struct fault_io *f = qcow_calloc(1, sizeof(*f));
	if (!f)
		return NULL;
	pthread_mutex_init(&f->lock, NULL);
	f->ops = (struct qcow_io_ops){
		.pread = fault_pread, .pwrite = fault_pwrite, .flush = fault_flush,
		.punch = fault_punch, .truncate = fault_truncate, .size = fault_size,
		.allocated = fault_allocated, .copy = fault_copy,
		.lock = inner->ops->lock ? fault_lock : NULL, .close = fault_close,
	};
	f->io.ops = &f->ops;
	f->io.name = inner->name;
	f->inner = inner;
	f->limit = UINT64_MAX;
	return &f->io;
}

void qcow_io_fault_arm(struct qcow_io *io, unsigned ops, uint64_t nth, int err)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	f->armed = nth ? ops & QFAULT_ALL : 0;
	f->countdown = nth;
	f->err = err < 0 ? err : -EIO;
	f->torn = (ops & QFAULT_TORN) != 0;
	f->fired = false;
	pthread_mutex_unlock(&f->lock);
}

void qcow_io_fault_set_space_limit(struct qcow_io *io, uint64_t limit)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	f->limit = limit;
	pthread_mutex_unlock(&f->lock);
}

uint64_t qcow_io_fault_count(struct qcow_io *io, unsigned ops)
{
	struct fault_io *f = FAULT_IO(io);
	uint64_t n = 0;
	pthread_mutex_lock(&f->lock);
	for (unsigned i = 0; i < 6; i++)
		if (ops & (1u << i))
			n += f->counts[i];
	pthread_mutex_unlock(&f->lock);
	return n;
}

bool qcow_io_fault_fired(struct qcow_io *io)
{
	struct fault_io *f = FAULT_IO(io);
	pthread_mutex_lock(&f->lock);
	bool fired = f->fired;
	pthread_mutex_unlock(&f->lock);
	return fired;
}

struct qcow_io *qcow_io_fault_inner(struct qcow_io *io)
{
	return FAULT_IO(io)->inner;
}
