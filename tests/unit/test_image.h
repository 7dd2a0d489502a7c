/*
 * test_image.h - fresh qcow2 images for the unit tests.
 *
 * create_bytes() makes an image with qcow_create in a temporary file and
 * returns its bytes (malloc'ed), ready for a memory or crash-simulator
 * backend.  Header only, like tap.h.  Below it: helpers of the error-path
 * tests (shell commands, temporary files, images made by QEMU, checks of
 * image bytes, a recording memory backend that outlives the engine).
 */
#ifndef TEST_IMAGE_H
#define TEST_IMAGE_H
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow.h"
#include "tap.h"

static inline uint8_t *create_bytes(uint64_t size, unsigned cluster_bits, unsigned order, unsigned version, size_t *len)
{
	char path[] = "/tmp/qcow-unit-XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0, "mkstemp");
	close(fd);
	unlink(path);   /* qcow_create refuses to overwrite */
	struct qcow_create_opts o;
	qcow_create_opts_default(&o);
	o.size = size;
	o.cluster_bits = cluster_bits;
	o.refcount_order = order;
	o.version = version;
	char err[256];
	REQUIRE(qcow_create(path, &o, err, sizeof(err)) == 0, "qcow_create: %s", err);
	struct stat st;
	REQUIRE(stat(path, &st) == 0, "stat %s", path);
	uint8_t *b = malloc((size_t)st.st_size ? (size_t)st.st_size : 1);
	FILE *f = fopen(path, "rb");
	REQUIRE(b && f, "read %s", path);
	*len = fread(b, 1, (size_t)st.st_size, f);
	fclose(f);
	unlink(path);
	REQUIRE(*len == (size_t)st.st_size, "short read of %s", path);
	return b;
}

/* ---- helpers of the error-path tests (test_errors.c, test_faults.c) ---- */

#include <errno.h>
#include <string.h>
#include <sys/wait.h>

#include "qcow_io.h"

/* Runs a shell command with its output sent to /dev/null (or appended
 * to log if not NULL); returns its exit status, -1 if it did not exit. */
/* The open options of the engine tests: a memory backend (no locks), no
 * recycler thread, every runtime check on, and a small metadata cache
 * (cache_bytes) so that eviction happens. */
static inline void test_open_opts(struct qcow_open_opts *o, size_t cache_bytes)
{
	qcow_open_opts_default(o);
	o->no_locking = true;
	o->recycler = false;
	o->runtime_asserts = true;
	o->cache_bytes = cache_bytes;
}

/* A raw backing file of len bytes (a copy of data) on the memory backend,
 * for qcow_image_open_io_backing: the image owns it once open; the caller
 * frees it (qcow_backing_free) when the open fails. */
static inline struct qcow_backing *test_raw_backing(const void *data, size_t len)
{
	struct qcow_backing *b = qcow_calloc(1, sizeof(*b));
	REQUIRE(b && (b->raw = qcow_io_mem_new(data, len)), "backing file memory");
	b->size = len;
	strcpy(b->format, "raw");
	return b;
}

static inline int test_sh(const char *log, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline int test_sh(const char *log, const char *fmt, ...)
{
	char cmd[4096], full[4400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	snprintf(full, sizeof(full), "( %s ) >> %s 2>&1", cmd, log ? log : "/dev/null");
	int st = system(full);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A fresh temporary path (the file is created empty). */
static inline void test_tmp_path(char *out, size_t len, const char *what)
{
	snprintf(out, len, "/tmp/qcow-%s-XXXXXX", what);
	int fd = mkstemp(out);
	REQUIRE(fd >= 0, "mkstemp %s", out);
	close(fd);
}

static inline uint8_t *test_slurp(const char *path, size_t *len)
{
	struct stat st;
	REQUIRE(stat(path, &st) == 0, "stat %s", path);
	uint8_t *b = malloc((size_t)st.st_size ? (size_t)st.st_size : 1);
	FILE *f = fopen(path, "rb");
	REQUIRE(b && f, "read %s", path);
	*len = fread(b, 1, (size_t)st.st_size, f);
	fclose(f);
	REQUIRE(*len == (size_t)st.st_size, "short read of %s", path);
	return b;
}

static inline void test_spill(const char *path, const void *bytes, size_t len)
{
	FILE *f = fopen(path, "wb");
	REQUIRE(f, "create %s", path);
	REQUIRE(fwrite(bytes, 1, len, f) == len && fclose(f) == 0, "write %s", path);
}

/* Runs a shell command that makes an image at the path it gets as every
 * %s (e.g. "qemu-img create -f qcow2 %s 1M && qemu-io -c ... %s") and
 * returns the image's bytes. */
static inline uint8_t *qemu_bytes(const char *script, size_t *len)
{
	char path[64], cmd[4096];
	test_tmp_path(path, sizeof(path), "qemu");
	unlink(path);
	/* every %s of the script is the path */
	const char *p = script;
	size_t o = 0;
	while (*p && o + 80 < sizeof(cmd)) {
		if (p[0] == '%' && p[1] == 's') {
			o += (size_t)snprintf(cmd + o, sizeof(cmd) - o, "'%s'", path);
			p += 2;
		} else {
			cmd[o++] = *p++;
		}
	}
	cmd[o] = 0;
	int q = test_sh(NULL, "%s", cmd);
	REQUIRE(q == 0, "image script failed (%d): %s", q, cmd);
	uint8_t *b = test_slurp(path, len);
	unlink(path);
	return b;
}

/* qcow_check (and, if qemu_exit is not NULL, qemu-img check, whose exit
 * status it stores: 0 clean, 2 corrupt, 3 leaks) on image bytes.  With
 * qemu_out not NULL, the first qemu_outlen-1 bytes of qemu-img's output
 * are stored there. */
static inline int check_image_bytes(const uint8_t *bytes, size_t len, struct qcow_check_result *r,
				    int *qemu_exit, char *qemu_out, size_t qemu_outlen)
{
	char path[64], log[64], err[256] = "";
	test_tmp_path(path, sizeof(path), "chk");
	test_spill(path, bytes, len);
	memset(r, 0, sizeof(*r));
	int ret = qcow_check(path, r, err, sizeof(err));
	if (ret)
		fprintf(stderr, "# qcow_check could not run: %s\n", err);
	if (qemu_exit) {
		test_tmp_path(log, sizeof(log), "chklog");
		*qemu_exit = test_sh(log, "qemu-img check -f qcow2 '%s'", path);
		if (qemu_out && qemu_outlen) {
			FILE *f = fopen(log, "r");
			size_t n = f ? fread(qemu_out, 1, qemu_outlen - 1, f) : 0;
			qemu_out[n] = 0;
			if (f)
				fclose(f);
		}
		unlink(log);
	}
	unlink(path);
	return ret;
}

/* ---- the crash model (test_crash.c, test_zeroes.c) ----------------------
 *
 * What a crash must keep: the disk as the guest wrote it (current), as of
 * the last completed flush (durable), and which 512-byte sectors were
 * written since that flush (dirty: after a crash they may read either
 * way).  Every other sector must read exactly as the flush left it. */
struct crash_model {
	uint64_t size, nsec;
	uint8_t *current, *durable, *dirty;
};

/* initial: the disk before the first operation (NULL: zeros). */
static inline void crash_model_init(struct crash_model *m, uint64_t size, const uint8_t *initial)
{
	m->size = size;
	m->nsec = size / 512;
	m->current = calloc(1, size);
	m->durable = calloc(1, size);
	m->dirty = calloc(1, m->nsec ? m->nsec : 1);
	REQUIRE(m->current && m->durable && m->dirty, "crash model memory");
	if (initial) {
		memcpy(m->current, initial, size);
		memcpy(m->durable, initial, size);
	}
}

static inline void crash_model_free(struct crash_model *m)
{
	free(m->current);
	free(m->durable);
	free(m->dirty);
}

/* The sectors of [off, off+n) may read either way until the next flush. */
static inline void crash_model_touch(struct crash_model *m, uint64_t off, uint64_t n)
{
	for (uint64_t k = off / 512; n && k <= (off + n - 1) / 512 && k < m->nsec; k++)
		m->dirty[k] = 1;
}

/* A write of buf (NULL: zeros, as a discard) at off succeeded. */
static inline void crash_model_wrote(struct crash_model *m, const uint8_t *buf, uint64_t off, uint64_t n)
{
	if (buf)
		memcpy(m->current + off, buf, n);
	else
		memset(m->current + off, 0, n);
}

/* A flush (or an operation ending in one) completed. */
static inline void crash_model_synced(struct crash_model *m)
{
	memcpy(m->durable, m->current, m->size);
	memset(m->dirty, 0, m->nsec);
}

/* One guest operation on img, recorded in m: a write of buf (filled by
 * the caller), a discard, a flush or a compaction (both make everything
 * written before them durable).  False when the engine refused it (the
 * simulated disk died): the round stops there. */
enum crash_guest_op { CRASH_WRITE, CRASH_DISCARD, CRASH_FLUSH, CRASH_COMPACT };
static inline bool crash_model_do(struct qcow_image *img, struct crash_model *m, enum crash_guest_op op, const uint8_t *buf,
				  uint64_t off, uint64_t n)
{
	switch (op) {
	case CRASH_WRITE:
		crash_model_touch(m, off, n);
		if (qcow_image_write(img, buf, n, off) != (ssize_t)n)
			return false;
		crash_model_wrote(m, buf, off, n);
		return true;
	case CRASH_DISCARD:
		crash_model_touch(m, off, n);
		if (qcow_image_discard(img, off, n))
			return false;
		crash_model_wrote(m, NULL, off, n);
		return true;
	case CRASH_FLUSH:
		if (qcow_image_flush(img))
			return false;
		break;
	case CRASH_COMPACT:
		if (qcow_image_compact(img, NULL, NULL))
			return false;
		break;
	}
	crash_model_synced(m);
	return true;
}

/* Reads every clean sector of the reopened image; returns how many differ
 * from the last completed flush (the first one is printed, named by what). */
static inline uint64_t crash_model_verify(struct qcow_image *img, const struct crash_model *m, const char *what)
{
	uint8_t buf[512];
	uint64_t bad = 0, vs = qcow_image_size(img);
	for (uint64_t k = 0; k < m->nsec; k++) {
		if (m->dirty[k])
			continue;
		if ((k + 1) * 512 > vs || qcow_image_read(img, buf, 512, k * 512) != 512 ||
		    memcmp(buf, m->durable + k * 512, 512)) {
			if (bad++ == 0)
				fprintf(stderr, "# %s: sector %llu lost flushed data (disk size after %llu)\n", what,
					(unsigned long long)k, (unsigned long long)vs);
		}
	}
	return bad;
}

/* The crashed image's bytes check without errors (leaks allowed): qcow_check
 * always, qemu-img check (no corruption) when with_qemu. */
static inline void crash_check_bytes(const uint8_t *bytes, size_t len, bool with_qemu, const char *what)
{
	struct qcow_check_result r;
	int q = 0;
	int ret = check_image_bytes(bytes, len, &r, with_qemu ? &q : NULL, NULL, 0);
	CHECK(ret == 0 && r.errors == 0, "%s: check after the crash: ret %d, %llu errors", what, ret,
	      (unsigned long long)r.errors);
	if (with_qemu)
		CHECK(q == 0 || q == 3, "%s: qemu-img check exit %d after the crash", what, q);
}

/* A backend over a memory file that stays alive when the engine closes
 * it (close does nothing; rec_free frees it) and that can record the
 * calls it sees, so tests can read the bytes after close and name the
 * Nth call of a run.  Put the fault injector on top of it. */
struct rec_call { unsigned op; uint64_t off, len; };   /* op: enum qcow_fault_op */
struct rec_io {
	struct qcow_io io;
	struct qcow_io_ops ops;
	struct qcow_io *mem;
	pthread_mutex_t lock;
	bool recording;
	unsigned record_ops;     /* kinds to record */
	struct rec_call *calls;
	size_t ncalls, cap;
};

static inline void rec_note(struct qcow_io *io, unsigned op, uint64_t off, uint64_t len)
{
	struct rec_io *r = (struct rec_io *)io;
	pthread_mutex_lock(&r->lock);
	if (r->recording && (r->record_ops & op)) {
		if (r->ncalls == r->cap) {
			r->cap = r->cap ? r->cap * 2 : 256;
			r->calls = realloc(r->calls, r->cap * sizeof(*r->calls));
		}
		r->calls[r->ncalls++] = (struct rec_call){ op, off, len };
	}
	pthread_mutex_unlock(&r->lock);
}
#define REC_MEM(io) (((struct rec_io *)(io))->mem)
static inline int rec_pread(struct qcow_io *io, void *b, size_t l, uint64_t o)
{ rec_note(io, QFAULT_PREAD, o, l); return REC_MEM(io)->ops->pread(REC_MEM(io), b, l, o); }
static inline int rec_pwrite(struct qcow_io *io, const void *b, size_t l, uint64_t o)
{ rec_note(io, QFAULT_PWRITE, o, l); return REC_MEM(io)->ops->pwrite(REC_MEM(io), b, l, o); }
static inline int rec_flush(struct qcow_io *io)
{ rec_note(io, QFAULT_FLUSH, 0, 0); return REC_MEM(io)->ops->flush(REC_MEM(io)); }
static inline int rec_punch(struct qcow_io *io, uint64_t o, uint64_t l)
{ rec_note(io, QFAULT_PUNCH, o, l); return REC_MEM(io)->ops->punch(REC_MEM(io), o, l); }
static inline int rec_truncate(struct qcow_io *io, uint64_t s)
{ rec_note(io, QFAULT_TRUNCATE, s, 0); return REC_MEM(io)->ops->truncate(REC_MEM(io), s); }
static inline int64_t rec_size(struct qcow_io *io) { return REC_MEM(io)->ops->size(REC_MEM(io)); }
static inline int64_t rec_allocated(struct qcow_io *io) { return REC_MEM(io)->ops->allocated(REC_MEM(io)); }
static inline int rec_copy(struct qcow_io *io, uint64_t s, uint64_t d, uint64_t l)
{ rec_note(io, QFAULT_COPY, d, l); return REC_MEM(io)->ops->copy(REC_MEM(io), s, d, l); }
static inline void rec_close(struct qcow_io *io) { (void)io; }

static inline struct rec_io *rec_new(const void *bytes, size_t len)
{
	struct rec_io *r = calloc(1, sizeof(*r));
	REQUIRE(r, "calloc");
	r->mem = qcow_io_mem_new(bytes, len);
	REQUIRE(r->mem, "memory backend");
	pthread_mutex_init(&r->lock, NULL);
	r->ops = (struct qcow_io_ops){ .pread = rec_pread, .pwrite = rec_pwrite, .flush = rec_flush,
				       .punch = rec_punch, .truncate = rec_truncate, .size = rec_size,
				       .allocated = rec_allocated, .copy = rec_copy, .lock = NULL, .close = rec_close };
	r->io.ops = &r->ops;
	r->io.name = "memory";
	return r;
}

/* Starts recording calls of the kinds in ops (forgetting earlier ones). */
static inline void rec_start(struct rec_io *r, unsigned ops)
{
	pthread_mutex_lock(&r->lock);
	r->ncalls = 0;
	r->record_ops = ops;
	r->recording = true;
	pthread_mutex_unlock(&r->lock);
}

static inline void rec_stop(struct rec_io *r)
{
	pthread_mutex_lock(&r->lock);
	r->recording = false;
	pthread_mutex_unlock(&r->lock);
}

static inline const uint8_t *rec_bytes(struct rec_io *r, size_t *len) { return qcow_io_mem_data(r->mem, len); }

static inline void rec_free(struct rec_io *r)
{
	qcow_io_close(r->mem);
	pthread_mutex_destroy(&r->lock);
	free(r->calls);
	free(r);
}

/* "pwrite 0x1200+512" for a recorded call. */
static inline const char *rec_describe(const struct rec_call *c, char *buf, size_t len)
{
	static const char *names[] = { "pread", "pwrite", "flush", "punch", "truncate", "copy" };
	const char *n = "?";
	for (unsigned i = 0; i < 6; i++)
		if (c->op == 1u << i)
			n = names[i];
	if (c->op == QFAULT_FLUSH)
		snprintf(buf, len, "%s", n);
	else if (c->op == QFAULT_TRUNCATE)
		snprintf(buf, len, "%s to 0x%llx", n, (unsigned long long)c->off);
	else
		snprintf(buf, len, "%s 0x%llx+%llu", n, (unsigned long long)c->off, (unsigned long long)c->len);
	return buf;
}

#endif
