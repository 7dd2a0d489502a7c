/*
 * qcow_io_mem.c - in-memory backends for unit tests: a plain memory file
 * and the crash simulator built on it.
 *
 * Owns: the byte buffer of a memory file; for the simulator, the log of
 * writes since the last barrier; and qcow_io_write_zeros, which works on
 * any backend.  Rules: one mutex per backend makes every
 * call atomic; punch writes zeros; the simulator's crash keeps, for each
 * unflushed write in order, a random subset of its 512-byte sectors.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

struct mem_io {
	struct qcow_io io;
	pthread_mutex_t lock;
	uint8_t *data;
	size_t len, cap;
	/* crash simulator only */
	bool crash_sim;
	bool dead;
	uint64_t barriers;
	uint64_t die_countdown;   /* 0 = never */
	uint8_t *durable;         /* contents as of the last barrier */
	size_t durable_len;
	struct pending_write {
		uint64_t off;
		size_t len;
		uint8_t *bytes;   /* NULL for a truncate to off */
	} *log;
	size_t log_len, log_cap;
};

#define MEM_IO(x) ((struct mem_io *)(x))

static int mem_reserve(struct mem_io *m, size_t need)
{
	if (need <= m->cap)
		return 0;
	size_t cap = m->cap ? m->cap : 65536;
	while (cap < need)
		cap *= 2;
	uint8_t *p = qcow_realloc(m->data, cap);
	if (!p)
		return -ENOMEM;
	memset(p + m->cap, 0, cap - m->cap);
	m->data = p;
	m->cap = cap;
	return 0;
}

static int log_append(struct mem_io *m, uint64_t off, const void *buf, size_t len, bool truncate)
{
	if (!m->crash_sim)
		return 0;
	if (m->log_len == m->log_cap) {
		size_t cap = m->log_cap ? m->log_cap * 2 : 64;
		struct pending_write *l = qcow_realloc(m->log, cap * sizeof(*l));
		if (!l)
			return -ENOMEM;
		m->log = l;
		m->log_cap = cap;
	}
	struct pending_write *w = &m->log[m->log_len];
	w->off = off;
	w->len = len;
	w->bytes = NULL;
	if (!truncate) {
		w->bytes = qcow_malloc(len);
		if (!w->bytes)
			return -ENOMEM;
		if (buf)
			memcpy(w->bytes, buf, len);
		else
			memset(w->bytes, 0, len);
	}
	m->log_len++;
	return 0;
}

/* The simulated disk dies after a set number of writes (crash tests). */
static bool sim_write_dies(struct mem_io *m)
{
	if (m->dead)
		return true;
	if (m->die_countdown && --m->die_countdown == 0) {
		m->dead = true;
		return true;
	}
	return false;
}

static int mem_pread(struct qcow_io *io, void *buf, size_t len, uint64_t off)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	memset(buf, 0, len);
	if (off < m->len) {
		size_t n = m->len - off < len ? m->len - (size_t)off : len;
		memcpy(buf, m->data + off, n);
	}
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_write_locked(struct mem_io *m, const void *buf, size_t len, uint64_t off)
{
	if (m->crash_sim && sim_write_dies(m))
		return -EIO;
	if (off + len > SIZE_MAX / 2)
		return -EFBIG;
	int ret = mem_reserve(m, (size_t)off + len);
	if (ret == 0)
		ret = log_append(m, off, buf, len, false);
	if (ret)
		return ret;
	if (buf)
		memcpy(m->data + off, buf, len);
	else
		memset(m->data + off, 0, len);
	if (off + len > m->len)
		m->len = (size_t)off + len;
	return 0;
}

static int mem_pwrite(struct qcow_io *io, const void *buf, size_t len, uint64_t off)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	int ret = mem_write_locked(m, buf, len, off);
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static void free_log(struct mem_io *m)
{
	for (size_t i = 0; i < m->log_len; i++)
		qcow_free(m->log[i].bytes);
	m->log_len = 0;
}

static int mem_flush(struct qcow_io *io)
{
	struct mem_io *m = MEM_IO(io);
	int ret = 0;
	pthread_mutex_lock(&m->lock);
	if (m->crash_sim) {
		if (m->dead) {
			ret = -EIO;
		} else {
			uint8_t *d = qcow_realloc(m->durable, m->len ? m->len : 1);
			if (!d) {
				ret = -ENOMEM;
			} else {
				memcpy(d, m->data, m->len);
				m->durable = d;
				m->durable_len = m->len;
				free_log(m);
				m->barriers++;
			}
		}
	}
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_punch(struct qcow_io *io, uint64_t off, uint64_t len)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	int ret = 0;
	if (off < m->len) {
		uint64_t n = m->len - off < len ? m->len - off : len;
		ret = mem_write_locked(m, NULL, (size_t)n, off);
	}
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_truncate(struct qcow_io *io, uint64_t size)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	int ret = 0;
	if (m->crash_sim && sim_write_dies(m))
		ret = -EIO;
	if (ret == 0)
		ret = mem_reserve(m, (size_t)size);
	if (ret == 0)
		ret = log_append(m, size, NULL, 0, true);
	if (ret == 0) {
		if (size < m->len)
			memset(m->data + size, 0, m->len - (size_t)size);
		m->len = (size_t)size;
	}
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int64_t mem_size(struct qcow_io *io)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	int64_t n = (int64_t)m->len;
	pthread_mutex_unlock(&m->lock);
	return n;
}

static int mem_copy(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len)
{
	void *buf = qcow_malloc((size_t)len);
	if (!buf)
		return -ENOMEM;
	int ret = mem_pread(io, buf, (size_t)len, src);
	if (ret == 0)
		ret = mem_pwrite(io, buf, (size_t)len, dst);
	qcow_free(buf);
	return ret;
}

static void mem_close(struct qcow_io *io)
{
	struct mem_io *m = MEM_IO(io);
	free_log(m);
	qcow_free(m->log);
	qcow_free(m->durable);
	qcow_free(m->data);
	pthread_mutex_destroy(&m->lock);
	qcow_free(m);
}

static const struct qcow_io_ops mem_ops = {
	.pread = mem_pread, .pwrite = mem_pwrite, .flush = mem_flush,
	.punch = mem_punch, .truncate = mem_truncate, .size = mem_size,
	.allocated = mem_size, .copy = mem_copy, .lock = NULL, .close = mem_close,
};

static struct mem_io *mem_new(const void *data, size_t len, bool crash_sim)
{
	struct mem_io *m = qcow_calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	pthread_mutex_init(&m->lock, NULL);
	m->io.ops = &mem_ops;
	m->io.name = crash_sim ? "crash-simulator" : "memory";
	m->crash_sim = crash_sim;
	if (mem_reserve(m, len) < 0) {
		mem_close(&m->io);
		return NULL;
	}
	if (len)
		memcpy(m->data, data, len);
	m->len = len;
	if (crash_sim) {
		m->durable = qcow_malloc(len ? len : 1);
		if (!m->durable) {
			mem_close(&m->io);
			return NULL;
		}
		memcpy(m->durable, data, len);
		m->durable_len = len;
	}
	return m;
}

struct qcow_io *qcow_io_mem_new(const void *data, size_t len)
{
	struct mem_io *m = mem_new(data, len, false);
	return m ? &m->io : NULL;
}

const uint8_t *qcow_io_mem_data(struct qcow_io *io, size_t *len)
{
	*len = MEM_IO(io)->len;
	return MEM_IO(io)->data;
}

struct qcow_io *qcow_io_crash_new(const void *data, size_t len)
{
	struct mem_io *m = mem_new(data, len, true);
	return m ? &m->io : NULL;
}

uint64_t qcow_io_crash_barriers(struct qcow_io *io) { return MEM_IO(io)->barriers; }

void qcow_io_crash_die_after(struct qcow_io *io, uint64_t writes)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	m->die_countdown = writes;
	pthread_mutex_unlock(&m->lock);
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

struct qcow_io *qcow_io_crash_crash(struct qcow_io *io, uint64_t seed)
{
	struct mem_io *m = MEM_IO(io);
	pthread_mutex_lock(&m->lock);
	struct mem_io *out = mem_new(m->durable, m->durable_len, false);
	if (out) {
		uint64_t s = seed;
		for (size_t i = 0; i < m->log_len; i++) {
			struct pending_write *w = &m->log[i];
			uint64_t mode = splitmix(&s) % 4;   /* 0 none, 1 all, 2-3 torn */
			if (mode == 0)
				continue;
			if (!w->bytes) {
				if (mode == 1 || (splitmix(&s) & 1)) {
					if (mem_reserve(out, w->off) == 0) {
						if (w->off < out->len)
							memset(out->data + w->off, 0, out->len - w->off);
						out->len = w->off;
					}
				}
				continue;
			}
			for (size_t o = 0; o < w->len; o += 512) {
				/* sector boundaries are absolute file offsets */
				size_t n = 512 - (size_t)((w->off + o) % 512);
				if (o + n > w->len)
					n = w->len - o;
				if (mode == 1 || (splitmix(&s) & 1))
					mem_write_locked(out, w->bytes + o, n, w->off + o);
				if (n < 512)
					o -= 512 - n;   /* keep o aligned to the next sector */
			}
		}
	}
	m->dead = true;
	pthread_mutex_unlock(&m->lock);
	return out ? &out->io : NULL;
}

int qcow_io_write_zeros(struct qcow_io *io, uint64_t off, uint64_t len)
{
	static const uint8_t zeros[65536];
	for (uint64_t done = 0; done < len;) {
		size_t k = len - done < sizeof(zeros) ? (size_t)(len - done) : sizeof(zeros);
		int ret = io->ops->pwrite(io, zeros, k, off + done);
		if (ret)
			return ret;
		done += k;
	}
	return 0;
}
