/*
 * test_model.c - model-based random test of the whole engine on the memory
 * backend.
 *
 * Thousands of random writes, reads, discards, zero ranges, flushes,
 * compactions and grows run against a plain byte-array model of the raw
 * view.  After every step the cluster map's invariant checker runs; every
 * read is compared with the model; at checkpoints the image is reopened
 * from its bytes and the rebuilt map must equal the live one (same
 * references, same pins) with on-disk refcounts needing no repair.  A
 * second phase runs writer threads and a compaction thread at the same
 * time (compaction between a write's lookup and its data write), then
 * compares everything with the model.
 *
 * MODEL_ROUNDS (env) scales the number of operations for a longer soak.
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

static unsigned long long seed = 0x5eed;
static unsigned repairs_logged;

static void count_repairs(enum qcow_log_level level, const char *msg, void *opaque)
{
	if (strstr(msg, "refcounts differ"))
		repairs_logged++;
	if (level == QCOW_LOG_ERROR)
		fprintf(stderr, "engine: %s\n", msg);
}

/* A fresh image on a memory backend. */
static struct qcow_io *new_image(uint64_t size, unsigned cluster_bits, unsigned order, unsigned version)
{
	size_t len;
	uint8_t *bytes = create_bytes(size, cluster_bits, order, version, &len);
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	free(bytes);
	return io;
}

static struct qcow_image *open_mem(struct qcow_io *io)
{
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.recycler = false;
	o.runtime_asserts = true;
	o.cache_bytes = 64 * 1024;   /* small: exercise eviction */
	struct qcow_image *img;
	char err[256];
	int ret = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "open: %s (%d)", err, ret);
	return img;
}

static void check_map(struct qcow_image *img, const char *after)
{
	pthread_mutex_lock(&img->lock);
	const char *bad = qcow_map_check(&img->map);
	pthread_mutex_unlock(&img->lock);
	REQUIRE(!bad, "map invariant after %s: %s", after, bad);
}

static void fill_random(uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i += 8) {
		unsigned long long r = tap_rand(&seed);
		memcpy(p + i, &r, n - i < 8 ? n - i : 8);
	}
}

static bool referenced(enum qcow_cstate s)
{
	return s == QCS_REF || s == QCS_SHARED || s == QCS_PINNED;
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

/* The same pointer slots (as a multiset) for cluster c in both maps. */
static bool same_slots(const struct qcow_map *a, const struct qcow_map *b, uint64_t c)
{
	if (qcow_map_state(a, c) == QCS_PINNED)
		return true;   /* tables: a count, no slots */
	uint64_t n = qcow_map_refcount(a, c);
	uint64_t *x = qcow_malloc(n * sizeof(uint64_t)), *y = qcow_malloc(n * sizeof(uint64_t));
	for (uint64_t i = 0; i < n; i++) {
		x[i] = qcow_map_ref_slot(a, c, i);
		y[i] = qcow_map_ref_slot(b, c, i);
	}
	qsort(x, n, sizeof(uint64_t), cmp_u64);
	qsort(y, n, sizeof(uint64_t), cmp_u64);
	bool same = memcmp(x, y, n * sizeof(uint64_t)) == 0;
	qcow_free(x);
	qcow_free(y);
	return same;
}

/* Reopens a copy of the image bytes; the rebuilt map must describe the same
 * references as the live one, and the refcounts on disk must be exact. */
static void reopen_and_compare(struct qcow_image *img)
{
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	REQUIRE(qcow_image_flush(img) == 0, "flush");   /* completes moves and their refcounts */
	size_t len;
	const uint8_t *bytes = qcow_io_mem_data(img->io, &len);
	struct qcow_io *io2 = qcow_io_mem_new(bytes, len);
	unsigned before = repairs_logged;
	struct qcow_image *img2 = open_mem(io2);
	CHECK(repairs_logged == before, "reopen found refcounts that needed repair");
	struct qcow_map *a = &img->map, *b = &img2->map;
	uint64_t n = a->nclusters < b->nclusters ? a->nclusters : b->nclusters;
	uint64_t mismatches = 0;
	for (uint64_t c = 0; c < n; c++) {
		enum qcow_cstate sa = qcow_map_state(a, c), sb = qcow_map_state(b, c);
		if (sa != sb && (referenced(sa) || referenced(sb))) {
			if (mismatches++ < 5)
				fprintf(stderr, "cluster %llu: live %s, rebuilt %s\n", (unsigned long long)c,
					qcow_map_state_name(sa), qcow_map_state_name(sb));
			continue;
		}
		if (!referenced(sa))
			continue;
		if (qcow_map_refcount(a, c) != qcow_map_refcount(b, c) || !same_slots(a, b, c)) {
			if (mismatches++ < 5)
				fprintf(stderr, "cluster %llu: live %s, rebuilt %s\n", (unsigned long long)c,
					qcow_map_state_name(sa), qcow_map_state_name(sb));
		}
	}
	for (uint64_t c = n; c < a->nclusters; c++)
		if (referenced(qcow_map_state(a, c)))
			mismatches++;
	for (uint64_t c = n; c < b->nclusters; c++)
		if (referenced(qcow_map_state(b, c)))
			mismatches++;
	CHECK(mismatches == 0, "%llu clusters differ between the live and the rebuilt map", (unsigned long long)mismatches);
	qcow_image_close(img2);
}

static void verify_all(struct qcow_image *img, const uint8_t *model, uint64_t size)
{
	uint8_t *buf = qcow_malloc(size);
	REQUIRE(qcow_image_read(img, buf, size, 0) == (ssize_t)size, "read all");
	uint64_t bad = 0;
	for (uint64_t i = 0; i < size; i++)
		if (buf[i] != model[i] && bad++ == 0)
			fprintf(stderr, "first difference at %llu: %02x vs model %02x\n", (unsigned long long)i, buf[i], model[i]);
	CHECK(bad == 0, "%llu bytes differ from the model", (unsigned long long)bad);
	qcow_free(buf);
}

static void random_ops(unsigned cluster_bits, unsigned order, unsigned version, unsigned nops)
{
	uint64_t cs = 1ull << cluster_bits;
	uint64_t size = cluster_bits <= 9 ? (2u << 20) : cluster_bits <= 12 ? (8u << 20) : (32u << 20);
	uint64_t cap = size * 2;
	struct qcow_io *io = new_image(size, cluster_bits, order, version);
	struct qcow_image *img = open_mem(io);
	uint8_t *model = qcow_calloc(1, cap);
	uint8_t *buf = qcow_malloc(cap);
	char what[128];

	for (unsigned op = 0; op < nops; op++) {
		unsigned kind = (unsigned)(tap_rand(&seed) % 100);
		uint64_t off = tap_rand(&seed) % size;
		uint64_t maxlen = size - off;
		uint64_t len = 1 + tap_rand(&seed) % (tap_rand(&seed) % 4 == 0 ? 8 * cs : cs + 1);
		if (len > maxlen)
			len = maxlen;
		if (kind < 40) {
			fill_random(buf, len);
			snprintf(what, sizeof(what), "write %llu+%llu", (unsigned long long)off, (unsigned long long)len);
			REQUIRE(qcow_image_write(img, buf, len, off) == (ssize_t)len, "%s", what);
			memcpy(model + off, buf, len);
		} else if (kind < 60) {
			snprintf(what, sizeof(what), "read %llu+%llu", (unsigned long long)off, (unsigned long long)len);
			REQUIRE(qcow_image_read(img, buf, len, off) == (ssize_t)len, "%s", what);
			CHECK(memcmp(buf, model + off, len) == 0, "%s differs from the model", what);
		} else if (kind < 72) {
			snprintf(what, sizeof(what), "discard %llu+%llu", (unsigned long long)off, (unsigned long long)len);
			REQUIRE(qcow_image_discard(img, off, len) == 0, "%s", what);
			memset(model + off, 0, len);
		} else if (kind < 78) {
			snprintf(what, sizeof(what), "zero %llu+%llu", (unsigned long long)off, (unsigned long long)len);
			REQUIRE(qcow_image_zero(img, off, len) == 0, "%s", what);
			memset(model + off, 0, len);
		} else if (kind < 86) {
			snprintf(what, sizeof(what), "flush");
			REQUIRE(qcow_image_flush(img) == 0, "flush");
		} else if (kind < 93) {
			snprintf(what, sizeof(what), "compact");
			REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact");
		} else if (kind < 95 && size + cs * 64 <= cap) {
			uint64_t ns = size + cs * (1 + tap_rand(&seed) % 64);
			snprintf(what, sizeof(what), "resize %llu", (unsigned long long)ns);
			REQUIRE(qcow_image_resize(img, ns) == 0, "%s", what);
			size = ns;
		} else if (kind < 97) {
			snprintf(what, sizeof(what), "seek");
			int64_t d = qcow_image_seek(img, off, SEEK_DATA);
			if (d >= 0) {
				/* all zero between off and the data offset */
				uint64_t gap = (uint64_t)d - off;
				for (uint64_t i = 0; i < gap; i++)
					if (model[off + i]) {
						CHECK(0, "SEEK_DATA from %llu skipped data at %llu", (unsigned long long)off,
						      (unsigned long long)(off + i));
						break;
					}
			}
		} else {
			snprintf(what, sizeof(what), "reopen");
			reopen_and_compare(img);
		}
		check_map(img, what);
	}
	verify_all(img, model, size);
	reopen_and_compare(img);
	/* after a full compaction nothing movable stays above a hole */
	REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "final compact");
	check_map(img, "final compact");
	verify_all(img, model, size);
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(model);
	qcow_free(buf);
}

/* ---- concurrency: writers on disjoint regions while compaction runs ---- */

struct writer {
	struct qcow_image *img;
	uint8_t *model;
	uint64_t base, span, cs;
	unsigned long long seed;
	unsigned ops;
	int failed;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint8_t *buf = qcow_malloc(4 * w->cs);
	for (unsigned i = 0; i < w->ops; i++) {
		uint64_t off = w->base + tap_rand(&w->seed) % w->span;
		uint64_t len = 1 + tap_rand(&w->seed) % (2 * w->cs);
		if (off + len > w->base + w->span)
			len = w->base + w->span - off;
		if (tap_rand(&w->seed) % 4 == 0) {
			int dr = qcow_image_discard(w->img, off, len);
			if (dr) {
				fprintf(stderr, "writer: discard [%llu, +%llu) returned %d\n", (unsigned long long)off,
					(unsigned long long)len, dr);
				w->failed++;
			}
			memset(w->model + off, 0, len);
		} else {
			for (uint64_t k = 0; k < len; k++)
				buf[k] = (uint8_t)tap_rand(&w->seed);
			ssize_t wr = qcow_image_write(w->img, buf, len, off);
			if (wr != (ssize_t)len) {
				fprintf(stderr, "writer: write [%llu, +%llu) returned %zd\n", (unsigned long long)off,
					(unsigned long long)len, wr);
				w->failed++;
			}
			memcpy(w->model + off, buf, len);
		}
		if (tap_rand(&w->seed) % 16 == 0) {
			ssize_t rr = qcow_image_read(w->img, buf, len, off);
			if (rr != (ssize_t)len || memcmp(buf, w->model + off, len)) {
				uint64_t k = 0, bad = 0;
				while (rr == (ssize_t)len && k < len && buf[k] == w->model[off + k])
					k++;
				for (uint64_t j = k; rr == (ssize_t)len && j < len; j++)
					bad += buf[j] != w->model[off + j];
				fprintf(stderr, "writer: read [%llu, +%llu) returned %zd%s: first difference at guest byte %llu "
					"(cluster %llu, +%llu), %llu bytes differ, read 0x%02x, expected 0x%02x\n",
					(unsigned long long)off, (unsigned long long)len, rr, rr == (ssize_t)len ? " with wrong data" : "",
					(unsigned long long)(off + k), (unsigned long long)((off + k) / w->cs),
					(unsigned long long)((off + k) % w->cs), (unsigned long long)bad,
					k < len ? buf[k] : 0, k < len ? w->model[off + k] : 0);
				w->failed++;
			}
		}
	}
	qcow_free(buf);
	return NULL;
}

static _Atomic int stop_compactor;

static void *compactor_main(void *arg)
{
	struct qcow_image *img = arg;
	while (!stop_compactor) {
		qcow_image_compact(img, NULL, NULL);
		qcow_image_flush(img);
	}
	return NULL;
}

/* Writers on disjoint regions of img (whose contents model holds) while
 * a thread compacts again and again; then everything is checked. */
static void concurrent_on(struct qcow_image *img, uint8_t *model, uint64_t size, uint64_t cs, unsigned nwriters,
			  unsigned ops, const char *what)
{
	pthread_t tw[8], tc;
	struct writer w[8];
	uint64_t moved0 = img->clusters_moved;
	stop_compactor = 0;
	pthread_create(&tc, NULL, compactor_main, img);
	for (unsigned i = 0; i < nwriters; i++) {
		w[i] = (struct writer){ .img = img, .model = model, .base = i * (size / nwriters), .span = size / nwriters,
				       .cs = cs, .seed = 1000 + i, .ops = ops };
		pthread_create(&tw[i], NULL, writer_main, &w[i]);
	}
	int failed = 0;
	for (unsigned i = 0; i < nwriters; i++) {
		pthread_join(tw[i], NULL);
		failed += w[i].failed;
	}
	stop_compactor = 1;
	pthread_join(tc, NULL);
	CHECK(failed == 0, "%s: %d writer operations failed or read back wrong", what, failed);
	check_map(img, what);
	verify_all(img, model, size);
	reopen_and_compare(img);
	CHECK(img->clusters_moved > moved0, "%s: compaction moved nothing during the concurrent phase", what);
}

static void concurrent(unsigned cluster_bits, unsigned nwriters, unsigned ops)
{
	uint64_t cs = 1ull << cluster_bits;
	uint64_t size = 16u << 20;
	struct qcow_io *io = new_image(size, cluster_bits, 4, 3);
	struct qcow_image *img = open_mem(io);
	uint8_t *model = qcow_calloc(1, size);
	/* start with a fragmented image so compaction has work */
	uint8_t *buf = qcow_malloc(size);
	fill_random(buf, size);
	REQUIRE(qcow_image_write(img, buf, size, 0) == (ssize_t)size, "fill");
	memcpy(model, buf, size);
	for (uint64_t off = 0; off < size; off += 4 * cs) {
		REQUIRE(qcow_image_discard(img, off, cs) == 0, "discard");
		memset(model + off, 0, cs);
	}
	qcow_free(buf);
	concurrent_on(img, model, size, cs, nwriters, ops, "concurrent phase");
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(model);
}

/* The concurrent phase over a raw backing file (three quarters of the
 * disk long): writers' partial writes fill from it, their discards must
 * hide it, and reads fall through it while compaction moves the top. */
static void concurrent_backing(unsigned cluster_bits, unsigned nwriters, unsigned ops)
{
	uint64_t cs = 1ull << cluster_bits;
	uint64_t size = 16u << 20, bsize = 12u << 20;
	uint8_t *model = qcow_calloc(1, size);
	fill_random(model, bsize);
	struct qcow_backing *b = test_raw_backing(model, bsize);
	struct qcow_open_opts o;
	test_open_opts(&o, 64 * 1024);
	struct qcow_image *img;
	char err[256];
	REQUIRE(qcow_image_open_io_backing(new_image(size, cluster_bits, 4, 3), &o, b, &img, err, sizeof(err)) == 0,
		"open over a backing file: %s", err);
	verify_all(img, model, size);
	/* some of it written here, some discarded: a fragmented top */
	uint8_t *buf = qcow_malloc(size);
	fill_random(buf, size);
	for (uint64_t off = 0; off < size; off += 2 * cs) {
		REQUIRE(qcow_image_write(img, buf + off, cs, off) == (ssize_t)cs, "fill");
		memcpy(model + off, buf + off, cs);
	}
	for (uint64_t off = 0; off < size; off += 6 * cs) {
		REQUIRE(qcow_image_discard(img, off, 2 * cs) == 0, "discard");
		memset(model + off, 0, 2 * cs);
	}
	qcow_free(buf);
	verify_all(img, model, size);
	concurrent_on(img, model, size, cs, nwriters, ops, "concurrent phase over a backing file");
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(model);
}

/* A grow over a longer backing file zero-flags the new part while the
 * resize holds flush_lock; with a small cache that zeroing fills the
 * cache past its budget, and the write path's flush when over budget
 * must not wait for the lock its own caller holds (it used to: the
 * resize hung).  The new part reads zeros, the old part the base. */
static void grow_over_backing_small_cache(void)
{
	uint64_t cs = 4096, size = 1u << 20, bsize = 64u << 20;
	uint8_t *base = qcow_malloc(bsize);
	fill_random(base, bsize);
	struct qcow_open_opts o;
	test_open_opts(&o, 8 * cs);
	struct qcow_image *img;
	char err[256];
	REQUIRE(qcow_image_open_io_backing(new_image(size, 12, 4, 3), &o, test_raw_backing(base, bsize), &img, err,
					   sizeof(err)) == 0, "open over a backing file: %s", err);
	REQUIRE(qcow_image_resize(img, bsize) == 0, "grow over the longer backing file");
	uint8_t *buf = qcow_malloc(bsize);
	REQUIRE(qcow_image_read(img, buf, bsize, 0) == (ssize_t)bsize, "read all");
	CHECK(memcmp(buf, base, size) == 0, "grow over a backing file: the old part shows the base");
	uint64_t nonzero = 0;
	for (uint64_t i = size; i < bsize; i++)
		nonzero += buf[i] != 0;
	CHECK(nonzero == 0, "grow over a backing file: %llu bytes of the new part show the base", (unsigned long long)nonzero);
	check_map(img, "grow over a backing file");
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(buf);
	qcow_free(base);
}

/* ---- images QEMU made: snapshots and compressed streams ------------- */

/* The image scripts (every %s is the image path).  Snapshots: s1 and s2
 * share most clusters with each other and the active disk.  Compressed:
 * text compresses about 4:1 into streams that mostly cross from one host
 * cluster into the next. */
static const char *const qemu_scripts[] = {
	"qemu-img create -q -f qcow2 -o cluster_size=4096 %s 8M && "
	"qemu-io -f qcow2 -c 'write -P 1 0 6M' -c 'write -P 9 7M 64k' %s && qemu-img snapshot -c s1 %s && "
	"qemu-io -f qcow2 -c 'write -P 2 2M 2M' -c 'discard 5M 512k' %s && qemu-img snapshot -c s2 %s && "
	"qemu-io -f qcow2 -c 'write -P 3 3M 2M' %s",
	"seq 1 2000000 | head -c 8388608 > %s.raw && "
	"qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 %s.raw %s && rm -f %s.raw",
	/* both: compressed streams in L2 tables a snapshot shares */
	"seq 3 2000002 | head -c 8388608 > %s.raw && "
	"qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 %s.raw %s && rm -f %s.raw && "
	"qemu-img snapshot -c s1 %s && qemu-io -f qcow2 -c 'write -P 5 1M 256k' -c 'discard 6M 1M' %s",
	/* zstd frames instead of deflate streams */
	"seq 5 2000004 | head -c 8388608 > %s.raw; "
	"qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd %s.raw %s && rm -f %s.raw",
};
static const char *const qemu_script_names[] = { "snapshot", "compressed", "compressed snapshot", "zstd" };

/* Each snapshot's disk as QEMU reads it from image bytes (NULL when
 * there is no such snapshot). */
static uint8_t *qemu_snapshot(const uint8_t *bytes, size_t len, const char *name, size_t *out_len)
{
	char path[64], raw[80];
	test_tmp_path(path, sizeof(path), "snapimg");
	snprintf(raw, sizeof(raw), "%s.raw", path);
	test_spill(path, bytes, len);
	int q = test_sh(NULL, "qemu-img convert -O raw -l snapshot.name=%s '%s' '%s'", name, path, raw);
	unlink(path);
	if (q != 0)
		return NULL;
	uint8_t *b = test_slurp(raw, out_len);
	unlink(raw);
	return b;
}

/* Random guest operations and compactions on an image QEMU made; the
 * model is the active disk, and every snapshot must read as before. */
static void random_ops_qemu(unsigned which, unsigned nops)
{
	size_t len, slen;
	uint8_t *bytes = qemu_bytes(qemu_scripts[which], &len);
	uint8_t *snap[2] = { qemu_snapshot(bytes, len, "s1", &slen), qemu_snapshot(bytes, len, "s2", &slen) };
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_mem(io);
	uint64_t size = qcow_image_size(img), cs = img->cluster_size;
	uint8_t *model = qcow_malloc(size), *buf = qcow_malloc(size);
	REQUIRE(qcow_image_read(img, model, size, 0) == (ssize_t)size, "read QEMU's active disk");
	char what[128];
	for (unsigned op = 0; op < nops; op++) {
		unsigned kind = (unsigned)(tap_rand(&seed) % 100);
		uint64_t off = tap_rand(&seed) % size;
		uint64_t len2 = 1 + tap_rand(&seed) % (kind < 40 ? 64 * cs : 4 * cs);
		if (len2 > size - off)
			len2 = size - off;
		if (kind < 40) {
			snprintf(what, sizeof(what), "discard %llu+%llu", (unsigned long long)off, (unsigned long long)len2);
			REQUIRE(qcow_image_discard(img, off, len2) == 0, "%s", what);
			memset(model + off, 0, len2);
		} else if (kind < 65) {
			snprintf(what, sizeof(what), "write %llu+%llu", (unsigned long long)off, (unsigned long long)len2);
			fill_random(buf, len2);
			REQUIRE(qcow_image_write(img, buf, len2, off) == (ssize_t)len2, "%s", what);
			memcpy(model + off, buf, len2);
		} else if (kind < 80) {
			snprintf(what, sizeof(what), "read %llu+%llu", (unsigned long long)off, (unsigned long long)len2);
			REQUIRE(qcow_image_read(img, buf, len2, off) == (ssize_t)len2, "%s", what);
			CHECK(memcmp(buf, model + off, len2) == 0, "%s differs from the model", what);
		} else if (kind < 88) {
			snprintf(what, sizeof(what), "flush");
			REQUIRE(qcow_image_flush(img) == 0, "flush");
		} else if (kind < 98) {
			snprintf(what, sizeof(what), "compact");
			REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact");
		} else {
			snprintf(what, sizeof(what), "reopen");
			reopen_and_compare(img);
		}
		check_map(img, what);
	}
	verify_all(img, model, size);
	REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "final compact");
	check_map(img, "final compact");
	verify_all(img, model, size);
	reopen_and_compare(img);
	/* compaction reached the clusters in use: nothing free below the end
	 * but what tables QEMU placed high (snapshot tables, until they move) */
	struct qcow_stats st;
	qcow_image_get_stats(img, &st);
	printf("# %s image after %u operations: file %llu, in use %llu, %llu shared clusters, %llu moved\n",
	       qemu_script_names[which], nops, (unsigned long long)st.file_size,
	       (unsigned long long)st.min_file_size, (unsigned long long)st.clusters_shared,
	       (unsigned long long)st.clusters_moved);
	CHECK(st.file_size <= st.min_file_size + 4 * cs, "%s image: file %llu, in use %llu after the final compaction",
	      qemu_script_names[which], (unsigned long long)st.file_size, (unsigned long long)st.min_file_size);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	size_t flen;
	const uint8_t *fb = qcow_io_mem_data(img->io, &flen);
	for (int i = 0; i < 2; i++) {
		if (!snap[i])
			continue;
		size_t n;
		uint8_t *now = qemu_snapshot(fb, flen, i ? "s2" : "s1", &n);
		CHECK(now && n == slen && memcmp(now, snap[i], n) == 0, "snapshot s%d reads as QEMU wrote it", i + 1);
		free(now);
		free(snap[i]);
	}
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(model);
	qcow_free(buf);
}

/* The concurrent phase on a compressed and a snapshot image: guest writes
 * copy compressed and shared clusters while streams are repacked and
 * shared clusters move. */
static void concurrent_qemu(unsigned which, unsigned ops)
{
	size_t len;
	uint8_t *bytes = qemu_bytes(qemu_scripts[which], &len);
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_mem(io);
	uint64_t size = qcow_image_size(img), cs = img->cluster_size;
	uint8_t *model = qcow_malloc(size);
	REQUIRE(qcow_image_read(img, model, size, 0) == (ssize_t)size, "read QEMU's active disk");
	/* free space low in the file for the moves */
	for (uint64_t off = 0; off < size / 2; off += 3 * 16 * cs) {
		REQUIRE(qcow_image_discard(img, off, 16 * cs) == 0, "discard");
		memset(model + off, 0, 16 * cs);
	}
	char what[80];
	snprintf(what, sizeof(what), "concurrent on a %s image", qemu_script_names[which]);
	concurrent_on(img, model, size, cs, 3, ops, what);
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(model);
}

/* ---- compaction between a write's lookup and its data write -------- */

struct window {
	pthread_t compactor;
	bool fired;
	uint64_t moved_before, moved_while_waiting;
};

static void *compact_thread(void *arg)
{
	qcow_image_compact(arg, NULL, NULL);
	return NULL;
}

/* Runs inside the write, after it resolved its host cluster: a compaction
 * started now plans to move that very cluster, and must wait for the write
 * (grace period) before copying it, or the copy would miss the new data. */
static void in_write_window(struct qcow_image *img, void *opaque)
{
	struct window *w = opaque;
	if (w->fired)
		return;
	w->fired = true;
	pthread_create(&w->compactor, NULL, compact_thread, img);
	usleep(200 * 1000);
	pthread_mutex_lock(&img->lock);
	w->moved_while_waiting = img->clusters_moved - w->moved_before;
	pthread_mutex_unlock(&img->lock);
}

static void compaction_inside_write_window(void)
{
	uint64_t cs = 65536, size = 64 * cs;
	struct qcow_io *io = new_image(size, 16, 4, 3);
	/* the recycler erases the holes (no automatic compaction), so the
	 * compaction started in the window plans moves at once */
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.runtime_asserts = true;
	o.compact = false;
	struct qcow_image *img;
	char err[256];
	REQUIRE(qcow_image_open_io(io, &o, &img, err, sizeof(err)) == 0, "open: %s", err);
	uint8_t *model = qcow_calloc(1, size), *buf = qcow_malloc(size);
	fill_random(buf, size);
	REQUIRE(qcow_image_write(img, buf, size, 0) == (ssize_t)size, "fill");
	memcpy(model, buf, size);
	REQUIRE(qcow_image_discard(img, 0, size / 2) == 0, "discard");
	memset(model, 0, size / 2);
	struct qcow_stats st;
	for (int i = 0; i < 100; i++) {
		qcow_image_get_stats(img, &st);
		if (st.clusters_available >= 32)
			break;
		usleep(50 * 1000);
	}
	REQUIRE(st.clusters_available >= 32, "the recycler made the holes available (%llu)",
		(unsigned long long)st.clusters_available);

	struct window w = { .moved_before = img->clusters_moved };
	img->write_io_hook = in_write_window;
	img->write_io_opaque = &w;
	/* the last cluster of the disk: among the first compaction moves */
	uint8_t newdata[4096];
	memset(newdata, 0x5a, sizeof(newdata));
	uint64_t off = size - cs + 1000;
	REQUIRE(qcow_image_write(img, newdata, sizeof(newdata), off) == (ssize_t)sizeof(newdata), "write in window");
	memcpy(model + off, newdata, sizeof(newdata));
	REQUIRE(w.fired, "hook ran");
	pthread_join(w.compactor, NULL);
	img->write_io_hook = NULL;
	CHECK(w.moved_while_waiting == 0, "compaction moved %llu clusters while a write into them was in flight",
	      (unsigned long long)w.moved_while_waiting);
	CHECK(img->clusters_moved > w.moved_before, "the compaction moved nothing afterwards");
	check_map(img, "compaction in a write window");
	verify_all(img, model, size);
	reopen_and_compare(img);
	CHECK(qcow_image_close(img) == 0, "close");
	qcow_free(model);
	qcow_free(buf);
}

/* ---- a read in flight while compaction moves and truncates --------- */

struct read_window {
	struct qcow_image *img;
	uint64_t off;
	uint8_t buf[4096];
	ssize_t got;
	pthread_t reader;
	bool started, resolved;
	pthread_mutex_t lock;
	pthread_cond_t cond;
};

/* Inside the read, after it resolved its host cluster: tell the compactor
 * and give it time to move that cluster, flush and truncate the file. */
static void in_read_window(struct qcow_image *img, void *opaque)
{
	(void)img;
	struct read_window *w = opaque;
	pthread_mutex_lock(&w->lock);
	w->resolved = true;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
	usleep(300 * 1000);
}

static void *reader_main(void *arg)
{
	struct read_window *w = arg;
	w->got = qcow_image_read(w->img, w->buf, sizeof(w->buf), w->off);
	return NULL;
}

/* Runs in the compactor after a batch copied its clusters, so the read
 * registers after the batch planned its moves (the copy does not wait
 * for it): only the truncation can still destroy what it reads. */
static void start_reader_after_copy(struct qcow_image *img, enum qcow_move_state reached, void *opaque)
{
	struct read_window *w = opaque;
	if (reached != QMOVE_COPIED || w->started)
		return;
	w->started = true;
	img->read_io_hook = in_read_window;
	img->read_io_opaque = w;
	pthread_create(&w->reader, NULL, reader_main, w);
	pthread_mutex_lock(&w->lock);
	while (!w->resolved)
		pthread_cond_wait(&w->cond, &w->lock);
	pthread_mutex_unlock(&w->lock);
}

static void compaction_inside_read_window(void)
{
	uint64_t cs = 65536, size = 64 * cs;
	struct qcow_io *io = new_image(size, 16, 4, 3);
	struct qcow_image *img = open_mem(io);
	uint8_t *model = qcow_calloc(1, size), *buf = qcow_malloc(size);
	fill_random(buf, size);
	REQUIRE(qcow_image_write(img, buf, size, 0) == (ssize_t)size, "fill");
	memcpy(model, buf, size);
	REQUIRE(qcow_image_discard(img, 0, size / 2) == 0, "discard");
	memset(model, 0, size / 2);

	struct read_window w = { .img = img, .off = size - cs + 1000 };
	pthread_mutex_init(&w.lock, NULL);
	pthread_cond_init(&w.cond, NULL);
	img->move_phase_hook = start_reader_after_copy;
	img->move_phase_opaque = &w;
	/* the last guest cluster lives in the last host cluster: moved by the
	 * first batch, and the file truncated after it */
	REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact");
	img->move_phase_hook = NULL;
	REQUIRE(w.started, "the reader ran inside the compaction");
	pthread_join(w.reader, NULL);
	img->read_io_hook = NULL;
	CHECK(w.got == (ssize_t)sizeof(w.buf) && memcmp(w.buf, model + w.off, sizeof(w.buf)) == 0,
	      "a read in flight while its cluster was moved and the file truncated read the right data (returned %zd)",
	      w.got);
	check_map(img, "compaction in a read window");
	verify_all(img, model, size);
	CHECK(qcow_image_close(img) == 0, "close");
	pthread_mutex_destroy(&w.lock);
	pthread_cond_destroy(&w.cond);
	qcow_free(model);
	qcow_free(buf);
}

int main(void)
{
	qcow_log_set_sink(count_repairs, NULL);
	const char *env = getenv("MODEL_ROUNDS");
	unsigned scale = env ? (unsigned)atoi(env) : 1;
	if (scale == 0)
		scale = 1;
	static const struct { unsigned cb, order, version; } kinds[] = {
		{ 16, 4, 3 }, { 9, 4, 3 }, { 12, 0, 3 }, { 12, 6, 3 }, { 16, 4, 2 }, { 14, 3, 3 }, { 21, 4, 3 },
	};
	for (unsigned k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
		seed = 0x5eed + k;
		random_ops(kinds[k].cb, kinds[k].order, kinds[k].version, (kinds[k].cb == 21 ? 300 : 1500) * scale);
	}
	compaction_inside_write_window();
	compaction_inside_read_window();
	concurrent(16, 4, 2000 * scale);
	concurrent(12, 3, 2000 * scale);
	concurrent_backing(16, 3, 1500 * scale);
	grow_over_backing_small_cache();
	if (access("/usr/bin/qemu-img", X_OK) == 0) {
		for (unsigned which = 0; which < 4; which++) {
			random_ops_qemu(which, 400 * scale);
			concurrent_qemu(which, 1500 * scale);
		}
	} else {
		CHECK(getenv("CI") == NULL || strcmp(getenv("CI"), "true") != 0, "qemu-img missing in CI");
		printf("# images made by QEMU: qemu-img missing, skipped\n");
	}
	return tap_done();
}
