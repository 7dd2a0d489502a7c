/*
 * test_zeroes.c - zeroed space is free space (issue 7): detect_zeroes,
 * sparsify and shrinking the view, on the engine.
 *
 *  - the zero check: every position of a single non-zero byte is found,
 *    at every alignment;
 *  - detect_zeroes off/on/unmap on version 3 and 2: contents exact, whole
 *    zero clusters freed (unmap), zero-flagged and kept (on, v3), written
 *    (off, and on for v2); partial clusters written; QEMU reads the same
 *    bytes and qemu-img check is clean;
 *  - sparsify on a QEMU-made image with zero clusters, data, a compressed
 *    zero cluster and a snapshot: exact counts, contents unchanged, the
 *    snapshot intact, check clean;
 *  - the race: a writer puts data into a zero cluster while sparsify runs
 *    (random timing, hundreds of rounds; every other round the write
 *    waits between its resolve and its data I/O): the data is never lost.
 *    Without the resolve hook, or without the grace period, a write is
 *    lost within about 20 rounds;
 *  - shrink: data below the end intact, the tail of the last partial
 *    cluster and everything past the end read zeros after a grow, L2
 *    tables past the end freed with the L1 size kept (as QEMU), refused
 *    with snapshots, check clean and the size QEMU reports;
 *  - crashes at any point of all of the above (crash simulator).
 */
#include "config.h"
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MiB (1024ull * 1024)

static void make_image(char *path, size_t len, uint64_t size, unsigned cbits, unsigned version)
{
	test_tmp_path(path, len, "zeroes");
	unlink(path);
	struct qcow_create_opts o;
	qcow_create_opts_default(&o);
	o.size = size;
	o.cluster_bits = cbits;
	o.version = version;
	char err[256];
	REQUIRE(qcow_create(path, &o, err, sizeof(err)) == 0, "qcow_create: %s", err);
}

static struct qcow_image *open_rw(const char *path, enum qcow_detect_zeroes dz, bool recycler)
{
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.detect_zeroes = dz;
	o.recycler = recycler;
	o.runtime_asserts = true;
	struct qcow_image *img = NULL;
	char err[256] = "";
	REQUIRE(qcow_image_open(path, &o, &img, err, sizeof(err)) == 0, "open %s: %s", path, err);
	return img;
}

static int qemu_check(const char *path)
{
	return test_sh("/dev/stderr", "qemu-img check -q -f qcow2 '%s'", path);
}

/* qemu-img's view of the image equals model (len bytes) */
static bool qemu_reads(const char *path, const uint8_t *model, size_t len, const char *extra)
{
	char raw[64];
	test_tmp_path(raw, sizeof(raw), "zraw");
	int r = test_sh("/dev/stderr", "qemu-img convert -f qcow2 %s -O raw '%s' '%s'", extra ? extra : "", path, raw);
	size_t n = 0;
	uint8_t *b = r == 0 ? test_slurp(raw, &n) : NULL;
	unlink(raw);
	bool ok = b && n == len && memcmp(b, model, len) == 0;
	free(b);
	return ok;
}

static bool engine_reads(struct qcow_image *img, const uint8_t *model, size_t len)
{
	uint8_t *b = malloc(len);
	bool ok = b && qcow_image_read(img, b, len, 0) == (ssize_t)len && memcmp(b, model, len) == 0;
	free(b);
	return ok;
}

static uint64_t referenced(struct qcow_image *img)
{
	struct qcow_stats st;
	qcow_image_get_stats(img, &st);
	return st.clusters_referenced;
}

/* ---- the zero check ----------------------------------------------------- */

static void test_zero_check(void)
{
	uint8_t buf[300];
	unsigned misses = 0;
	memset(buf, 0, sizeof(buf));
	for (size_t start = 0; start < 9; start++)
		for (size_t len = 0; len + start <= sizeof(buf); len += 7) {
			if (!qcow_sparsify_buffer_is_zero(buf + start, len))
				misses++;
			for (size_t k = 0; k < len; k++) {
				buf[start + k] = 0x40;
				if (qcow_sparsify_buffer_is_zero(buf + start, len))
					misses++;
				buf[start + k] = 0;
			}
			/* bytes just outside the range are not looked at */
			if (start)
				buf[start - 1] = 1;
			buf[start + len < sizeof(buf) ? start + len : sizeof(buf) - 1] |= start + len < sizeof(buf);
			if (!qcow_sparsify_buffer_is_zero(buf + start, len))
				misses++;
			memset(buf, 0, sizeof(buf));
		}
	CHECK(misses == 0, "the zero check was wrong %u times", misses);
}

/* ---- detect_zeroes -------------------------------------------------------- */

/* Writes data into clusters 0..7, then one write over clusters 1..6 of:
 * a zero head (half of 1), zeros over 2 and 3, data in 4, zeros over 5, a
 * zero tail (half of 6).  Expected: clusters 2, 3, 5 unmapped (unmap),
 * zero-flagged in place (on, v3), written (off; on with v2). */
static void test_detect(enum qcow_detect_zeroes dz, unsigned version)
{
	const char *names[] = { "off", "on", "unmap" };
	const uint64_t cs = 64 * 1024, size = 16 * MiB;
	char path[64];
	make_image(path, sizeof(path), size, 16, version);
	uint8_t *model = calloc(1, size);
	struct qcow_image *img = open_rw(path, dz, false);
	memset(model, 0x5a, 8 * cs);
	REQUIRE(qcow_image_write(img, model, 8 * cs, 0) == (ssize_t)(8 * cs), "data write");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	uint64_t ref0 = referenced(img);

	uint8_t *w = calloc(1, 5 * cs);
	memset(w + 3 * cs - cs / 2, 0x77, cs);   /* cluster 4 lies at w + 2.5 cs ... 3.5 cs */
	REQUIRE(qcow_image_write(img, w, 5 * cs, cs + cs / 2) == (ssize_t)(5 * cs), "mixed write");
	memcpy(model + cs + cs / 2, w, 5 * cs);
	CHECK(engine_reads(img, model, size), "detect_zeroes=%s v%u: contents after the mixed write", names[dz], version);
	uint64_t ref1 = referenced(img);
	bool unmap = dz == QCOW_DETECT_ZEROES_UNMAP;
	uint64_t want = unmap ? ref0 - 3 : ref0;
	CHECK(ref1 == want, "detect_zeroes=%s v%u: %" PRIu64 " clusters referenced, want %" PRIu64,
	      names[dz], version, ref1, want);
	/* cluster 2: a hole for SEEK_DATA unless the zeros were written */
	bool hole = unmap || (dz == QCOW_DETECT_ZEROES_ON && version >= 3);
	int64_t d = qcow_image_seek(img, 2 * cs, SEEK_DATA);
	CHECK(d == (int64_t)(hole ? 4 * cs : 2 * cs), "detect_zeroes=%s v%u: SEEK_DATA from cluster 2 gives %" PRId64,
	      names[dz], version, d);
	/* a zero write over a zero-flagged cluster, then data into it again */
	memset(w, 0, cs);
	REQUIRE(qcow_image_write(img, w, cs, 2 * cs) == (ssize_t)cs, "zero again");
	memset(w, 0x33, 100);
	REQUIRE(qcow_image_write(img, w, cs, 2 * cs) == (ssize_t)cs, "data again");
	memcpy(model + 2 * cs, w, cs);
	CHECK(engine_reads(img, model, size), "detect_zeroes=%s v%u: contents after rewriting", names[dz], version);
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "detect_zeroes=%s v%u: qemu-img check", names[dz], version);
	CHECK(qemu_reads(path, model, size, NULL), "detect_zeroes=%s v%u: QEMU reads the same bytes", names[dz], version);
	unlink(path);
	free(w);
	free(model);
}

/* ---- sparsify ------------------------------------------------------------ */

static void test_sparsify_counts(void)
{
	/* QEMU writes zeros as data (no detect-zeroes in qemu-io): clusters
	 * 0-3 zero, 4 data, 5 compressed zeros, then a snapshot; after it 6-9
	 * zero (not shared), 10 data, and 0 zero again over the shared one
	 * (copy-on-write: not shared any more), 1-4 stay shared */
	char path[64];
	test_tmp_path(path, sizeof(path), "zsnap");
	unlink(path);
	REQUIRE(test_sh("/dev/stderr",
			"qemu-img create -q -f qcow2 '%s' 8M && "
			"qemu-io -f qcow2 -c 'write -q -P 0 0 256k' -c 'write -q -P 7 256k 64k' "
			"-c 'write -q -c -P 0 320k 64k' '%s' && qemu-img snapshot -c s1 '%s' && "
			"qemu-io -f qcow2 -c 'write -q -P 0 384k 256k' -c 'write -q -P 9 640k 64k' "
			"-c 'write -q -P 0 0 64k' '%s'",
			path, path, path, path) == 0, "qemu-made image");
	const size_t size = 8 * MiB;
	uint8_t *model = calloc(1, size);
	memset(model + 256 * 1024, 7, 64 * 1024);
	memset(model + 640 * 1024, 9, 64 * 1024);
	uint8_t *snap = calloc(1, size);
	memset(snap + 256 * 1024, 7, 64 * 1024);

	struct qcow_image *img = open_rw(path, QCOW_DETECT_ZEROES_OFF, true);
	CHECK(engine_reads(img, model, size), "contents before sparsify");
	struct qcow_sparsify_result r;
	int ret = qcow_image_sparsify(img, NULL, NULL, &r);
	CHECK(ret == 0, "sparsify: %d", ret);
	/* allocated data clusters: 0 (own copy), 1, 2, 3 (shared), 4 (shared
	 * data), 5 (compressed), 6..9 (zeros), 10 (data) */
	CHECK(r.scanned == 11, "scanned %" PRIu64 ", want 11", r.scanned);
	CHECK(r.freed == 5, "freed %" PRIu64 ", want 5 (cluster 0 and 6..9)", r.freed);
	CHECK(r.bytes_freed == 5 * 65536, "bytes freed %" PRIu64, r.bytes_freed);
	CHECK(r.skipped_shared == 4, "skipped shared %" PRIu64 ", want 4", r.skipped_shared);
	CHECK(r.skipped_compressed == 1, "skipped compressed %" PRIu64 ", want 1", r.skipped_compressed);
	CHECK(r.guest_done == r.guest_clusters && r.guest_clusters == 128, "walked %" PRIu64 "/%" PRIu64,
	      r.guest_done, r.guest_clusters);
	CHECK(engine_reads(img, model, size), "contents after sparsify");
	/* a second run finds nothing more */
	CHECK(qcow_image_sparsify(img, NULL, NULL, &r) == 0 && r.freed == 0, "second sparsify freed %" PRIu64, r.freed);
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "qemu-img check after sparsify");
	CHECK(qemu_reads(path, model, size, NULL), "QEMU reads the active layer");
	CHECK(qemu_reads(path, snap, size, "-l snapshot.name=s1"), "QEMU reads the snapshot");
	/* read-only: refused */
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.read_only = true;
	char err[256];
	REQUIRE(qcow_image_open(path, &o, &img, err, sizeof(err)) == 0, "open ro: %s", err);
	CHECK(qcow_image_sparsify(img, NULL, NULL, &r) == -EROFS, "sparsify on a read-only image");
	qcow_image_close(img);
	unlink(path);
	free(model);
	free(snap);
}

static int stop_after_first(const struct qcow_sparsify_result *r, void *opaque)
{
	(void)r;
	return ++*(int *)opaque >= 1;
}

static void test_sparsify_cancel(void)
{
	char path[64];
	make_image(path, sizeof(path), 64 * MiB, 16, 3);
	struct qcow_image *img = open_rw(path, QCOW_DETECT_ZEROES_OFF, false);
	uint8_t *z = calloc(1, 64 * MiB);
	REQUIRE(qcow_image_write(img, z, 64 * MiB, 0) == (ssize_t)(64 * MiB), "zeros");
	struct qcow_sparsify_result r;
	int calls = 0;
	CHECK(qcow_image_sparsify(img, stop_after_first, &calls, &r) == -ECANCELED, "cancelled");
	CHECK(r.freed == 512 && r.guest_done == 512, "one batch freed %" PRIu64 " of %" PRIu64, r.freed, r.guest_done);
	CHECK(qcow_image_sparsify(img, NULL, NULL, &r) == 0 && r.freed == 1024 - 512, "the rest: %" PRIu64, r.freed);
	CHECK(engine_reads(img, z, 64 * MiB), "zeros");
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "check");
	unlink(path);
	free(z);
}

/* ---- the race ---------------------------------------------------------- */

struct racer {
	struct qcow_image *img;
	uint64_t cluster;     /* guest cluster written */
	unsigned delay_us;
	unsigned len, off;    /* piece written */
	uint8_t pattern;
	ssize_t ret;
};

/* write_io_hook: holds a resolved write before its data I/O, so that the
 * sparsify's mark can fall between the resolve and the data (the grace
 * period must wait for it) */
static unsigned hook_delay_us;
static void slow_write_io(struct qcow_image *img, void *opaque)
{
	(void)img;
	(void)opaque;
	unsigned d = __atomic_load_n(&hook_delay_us, __ATOMIC_RELAXED);
	if (d)
		usleep(d);
}

static void *race_writer(void *arg)
{
	struct racer *r = arg;
	uint8_t buf[65536];
	memset(buf, r->pattern, sizeof(buf));
	/* spin rather than sleep: a sleep overshoots by more than a sparsify
	 * of the test's clusters takes */
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do
		clock_gettime(CLOCK_MONOTONIC, &t);
	while ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000 < r->delay_us);
	r->ret = qcow_image_write(r->img, buf, r->len, r->cluster * 65536 + r->off);
	return NULL;
}

static void test_race(unsigned rounds)
{
	const unsigned n = 48;   /* zero clusters per round */
	char path[64];
	make_image(path, sizeof(path), 8 * MiB, 16, 3);
	struct qcow_image *img = open_rw(path, QCOW_DETECT_ZEROES_OFF, true);
	img->write_io_hook = slow_write_io;
	uint8_t *model = calloc(1, n * 65536), *back = malloc(n * 65536);
	unsigned long long seed = 0x5eed;
	unsigned lost = 0, freed_written = 0, caught = 0;
	double avg_us = 500;   /* how long a sparsify takes here, learnt as we go */
	for (unsigned round = 0; round < rounds && !lost; round++) {
		/* every cluster allocated and holding zeros (detect_zeroes off) */
		memset(model, 0, n * 65536);
		__atomic_store_n(&hook_delay_us, 0, __ATOMIC_RELAXED);
		REQUIRE(qcow_image_write(img, model, n * 65536, 0) == (ssize_t)(n * 65536), "zero fill");
		struct racer r = { .img = img, .cluster = tap_rand(&seed) % n, .delay_us = (unsigned)(tap_rand(&seed) % (unsigned)(avg_us * 0.8 + 1)),
				   .pattern = (uint8_t)(1 + round % 250) };
		r.len = tap_rand(&seed) % 2 ? 65536 : 512;
		/* every other round: the write waits between resolve and data */
		__atomic_store_n(&hook_delay_us, round % 2 ? (unsigned)(tap_rand(&seed) % (unsigned)(avg_us + 1)) : 0,
				 __ATOMIC_RELAXED);
		r.off = r.len == 65536 ? 0 : (unsigned)(tap_rand(&seed) % 128) * 512;
		pthread_t th;
		REQUIRE(pthread_create(&th, NULL, race_writer, &r) == 0, "thread");
		struct qcow_sparsify_result res;
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		int ret = qcow_image_sparsify(img, NULL, NULL, &res);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		pthread_join(th, NULL);
		double us = (double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3;
		avg_us = avg_us * 0.9 + us * 0.1;
		CHECK(ret == 0 && r.ret == (ssize_t)r.len, "round %u: sparsify %d, write %zd", round, ret, r.ret);
		memset(model + r.cluster * 65536 + r.off, r.pattern, r.len);
		if (qcow_image_read(img, back, n * 65536, 0) != (ssize_t)(n * 65536) || memcmp(back, model, n * 65536)) {
			lost++;
			CHECK(0, "round %u: the write of %u bytes at cluster %" PRIu64 "+%u (delay %u us) was lost "
			      "(sparsify freed %" PRIu64 ", changed %" PRIu64 ")", round, r.len, r.cluster, r.off,
			      r.delay_us, res.freed, res.skipped_changed);
		}
		if (res.freed == n)
			freed_written++;   /* sparsify finished before the write */
		if (res.skipped_changed)
			caught++;          /* the write came between a mark and the free */
	}
	CHECK(lost == 0, "%u of %u rounds lost a write", lost, rounds);
	printf("# race: %u rounds: %u with the write after the sparsify, %u with the write inside its window; "
	       "sparsify %.0f us\n", rounds, freed_written, caught, avg_us);
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "check after the race");
	unlink(path);
	free(model);
	free(back);
}

/* ---- shrink -------------------------------------------------------------- */

static void test_shrink(void)
{
	/* 4 KiB clusters: an L2 table covers 2 MiB, so a shrink from 16 MiB
	 * to 3 MiB + 512 frees 6 tables */
	const uint64_t cs = 4096, size = 16 * MiB, small = 3 * MiB + 1000, rounded = 3 * MiB + 1024;
	char path[64];
	make_image(path, sizeof(path), size, 12, 3);
	uint8_t *model = malloc(size);
	for (size_t i = 0; i < size; i++)
		model[i] = (uint8_t)(i * 7 + (i >> 12));
	struct qcow_image *img = open_rw(path, QCOW_DETECT_ZEROES_OFF, true);
	REQUIRE(qcow_image_write(img, model, size, 0) == (ssize_t)size, "fill");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	uint64_t ref0 = referenced(img);
	int ret = qcow_image_resize(img, small);
	CHECK(ret == 0, "shrink: %d", ret);
	CHECK(qcow_image_size(img) == rounded, "size %" PRIu64 ", want %" PRIu64 " (512-byte sectors)",
	      qcow_image_size(img), rounded);
	uint64_t ref1 = referenced(img);
	/* data clusters: ceil(rounded / cs) stay; L2 tables: 2 stay */
	uint64_t want = ref0 - (size / cs - (rounded + cs - 1) / cs) - 6;
	CHECK(ref1 == want, "referenced %" PRIu64 " -> %" PRIu64 ", want %" PRIu64, ref0, ref1, want);
	CHECK(engine_reads(img, model, rounded), "data below the new end");
	uint8_t b[4096];
	CHECK(qcow_image_read(img, b, 512, rounded) == -EINVAL, "read past the end refused");
	CHECK(qcow_image_write(img, b, 512, rounded) == -EINVAL, "write past the end refused");
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "qemu-img check after the shrink");
	struct qcow_info info;
	char err[256];
	REQUIRE(qcow_info_read(path, &info, err, sizeof(err)) == 0, "info: %s", err);
	CHECK(info.virtual_size == rounded, "header size %" PRIu64, info.virtual_size);
	CHECK(info.l1_size == 8, "L1 size %u kept (as QEMU)", info.l1_size);
	CHECK(qemu_reads(path, model, rounded, NULL), "QEMU reads the data below the end");
	CHECK(test_sh("/dev/stderr", "qemu-img info '%s' | grep -q 'virtual size: .*(%" PRIu64 " bytes)'", path,
		      rounded) == 0, "qemu-img info shows the new size");

	/* grow again: everything past the old end reads zeros, including the
	 * rest of the last partial cluster */
	img = open_rw(path, QCOW_DETECT_ZEROES_OFF, true);
	CHECK(qcow_image_resize(img, size) == 0, "grow again");
	memset(model + rounded, 0, size - rounded);
	CHECK(engine_reads(img, model, size), "zeros past the shrunk end after a grow");
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "check after the grow");
	CHECK(qemu_reads(path, model, size, NULL), "QEMU reads zeros past the shrunk end");
	unlink(path);

	/* a shrink to a cluster boundary and to zero */
	make_image(path, sizeof(path), size, 16, 2);
	img = open_rw(path, QCOW_DETECT_ZEROES_OFF, true);
	REQUIRE(qcow_image_write(img, model, size, 0) == (ssize_t)size, "fill v2");
	CHECK(qcow_image_resize(img, 2 * MiB) == 0, "shrink v2");
	CHECK(engine_reads(img, model, 2 * MiB), "v2 data below the end");
	CHECK(qcow_image_resize(img, 0) == 0, "shrink to 0");
	CHECK(qcow_image_resize(img, 1 * MiB) == 0, "grow from 0");
	memset(model, 0, MiB);
	CHECK(engine_reads(img, model, MiB), "zeros after shrink to 0 and grow");
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "check v2");
	unlink(path);
	free(model);

	/* with a snapshot: refused, nothing changed */
	test_tmp_path(path, sizeof(path), "zsnap");
	unlink(path);
	REQUIRE(test_sh("/dev/stderr", "qemu-img create -q -f qcow2 '%s' 4M && qemu-io -f qcow2 -c 'write -q -P 3 0 1M' '%s' && "
			"qemu-img snapshot -c s '%s'", path, path, path) == 0, "snapshot image");
	img = open_rw(path, QCOW_DETECT_ZEROES_OFF, true);
	CHECK(qcow_image_resize(img, 1 * MiB) == -ENOTSUP, "shrink refused with a snapshot");
	CHECK(qcow_image_size(img) == 4 * MiB, "size unchanged");
	CHECK(qcow_image_close(img) == 0, "close");
	CHECK(qemu_check(path) == 0, "check");
	unlink(path);
}

/* ---- crashes ---------------------------------------------------------------
 *
 * The crash simulator (as test_crash.c): random writes (a third of them
 * all zeros over whole clusters, with detect_zeroes unmap or on), discards,
 * sparsifies, shrink-and-grow, flushes and compactions; the disk dies
 * after a random number of writes and keeps a random torn subset of the
 * unflushed ones.  The image must check clean (leaks allowed), open, and
 * show every sector not written since the last completed flush as that
 * flush left it.  A sparsify changes no contents, so it dirties nothing;
 * a shrink dirties what lies past its new end until the grow's flush. */
static struct qcow_image *open_crash_io(struct qcow_io *io, enum qcow_detect_zeroes dz, char *err, size_t errlen)
{
	struct qcow_open_opts o;
	test_open_opts(&o, 32 * 1024);
	o.detect_zeroes = dz;
	struct qcow_image *img = NULL;
	return qcow_image_open_io(io, &o, &img, err, errlen) ? NULL : img;
}

static void crash_round(unsigned round, const uint8_t *tmpl, size_t tlen, unsigned cb, uint64_t size,
			unsigned long long *seed)
{
	uint64_t cs = 1ull << cb;
	struct qcow_io *io = qcow_io_crash_new(tmpl, tlen);
	enum qcow_detect_zeroes dz = tap_rand(seed) % 2 ? QCOW_DETECT_ZEROES_UNMAP : QCOW_DETECT_ZEROES_ON;
	char err[256] = "";
	struct qcow_image *img = open_crash_io(io, dz, err, sizeof(err));
	REQUIRE(img, "crash round %u: open: %s", round, err);
	struct crash_model m;
	crash_model_init(&m, size, NULL);
	uint8_t *buf = malloc(4 * cs);
	unsigned ops = 10 + (unsigned)(tap_rand(seed) % 30);
	uint64_t die_at = 1 + tap_rand(seed) % 400;
	for (unsigned op = 0; op < ops + 30; op++) {
		if (op == ops / 2)
			qcow_io_crash_die_after(io, die_at);
		unsigned kind = (unsigned)(tap_rand(seed) % 100);
		uint64_t off = tap_rand(seed) % size, n = 1 + tap_rand(seed) % (4 * cs);
		if (kind < 25) {   /* zeros over whole clusters, maybe with data around */
			off &= ~(cs - 1);
			n = (1 + tap_rand(seed) % 3) * cs;
		}
		if (n > size - off)
			n = size - off;
		if (kind < 50) {
			for (uint64_t i = 0; i < n; i++)
				buf[i] = kind < 25 ? 0 : (uint8_t)tap_rand(seed);
			if (!crash_model_do(img, &m, CRASH_WRITE, buf, off, n))
				break;
		} else if (kind < 60) {
			if (!crash_model_do(img, &m, CRASH_DISCARD, NULL, off, n))
				break;
		} else if (kind < 72) {
			struct qcow_sparsify_result r;
			if (qcow_image_sparsify(img, NULL, NULL, &r))
				break;
		} else if (kind < 80) {
			uint64_t small = (tap_rand(seed) % size) & ~511ull;
			crash_model_touch(&m, small, size - small);
			if (qcow_image_resize(img, small))
				break;
			crash_model_wrote(&m, NULL, small, size - small);
			if (qcow_image_resize(img, size))
				break;
			/* both resizes end with a flush */
			crash_model_synced(&m);
		} else if (!crash_model_do(img, &m, kind < 92 ? CRASH_FLUSH : CRASH_COMPACT, NULL, 0, 0)) {
			break;
		}
	}
	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(seed));
	REQUIRE(after, "crash");
	qcow_image_close(img);   /* the dead disk refuses everything; this only frees */
	size_t alen;
	const uint8_t *abytes = qcow_io_mem_data(after, &alen);
	char what[96];
	snprintf(what, sizeof(what), "crash round %u (detect_zeroes %d, cluster %llu)", round, (int)dz, (unsigned long long)cs);
	crash_check_bytes(abytes, alen, round % 25 == 0, what);
	struct qcow_image *img2 = open_crash_io(after, QCOW_DETECT_ZEROES_OFF, err, sizeof(err));
	CHECK(img2 != NULL, "%s: the crashed image does not open: %s", what, err);
	if (img2) {
		uint64_t bad = crash_model_verify(img2, &m, what);
		CHECK(bad == 0, "%s: %llu flushed sectors differ", what, (unsigned long long)bad);
		CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
	} else {
		qcow_io_close(after);
	}
	crash_model_free(&m);
	free(buf);
}

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)level;
	(void)msg;
	(void)opaque;   /* a dead disk makes every operation log its error */
}

static void test_crashes(unsigned rounds)
{
	qcow_log_set_sink(quiet_sink, NULL);
	static const unsigned cbs[] = { 9, 12, 16 };
	size_t len[3];
	uint8_t *tmpl[3];
	uint64_t sizes[3] = { 512u << 10, 2u << 20, 8u << 20 };
	for (int i = 0; i < 3; i++)
		tmpl[i] = create_bytes(sizes[i], cbs[i], 4, 3, &len[i]);
	unsigned long long seed = 0x2e705eedull;
	for (unsigned r = 0; r < rounds; r++) {
		int i = (int)(tap_rand(&seed) % 3);
		crash_round(r, tmpl[i], len[i], cbs[i], sizes[i], &seed);
	}
	for (int i = 0; i < 3; i++)
		free(tmpl[i]);
}

int main(void)
{
	unsigned rounds = getenv("ZEROES_RACE_ROUNDS") ? (unsigned)atoi(getenv("ZEROES_RACE_ROUNDS")) : 300;
	test_zero_check();
	for (unsigned v = 2; v <= 3; v++) {
		test_detect(QCOW_DETECT_ZEROES_OFF, v);
		test_detect(QCOW_DETECT_ZEROES_ON, v);
		test_detect(QCOW_DETECT_ZEROES_UNMAP, v);
	}
	/* the engine's default is off (the daemon's is unmap: t230) */
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	CHECK(o.detect_zeroes == QCOW_DETECT_ZEROES_OFF, "engine default detect_zeroes %d", (int)o.detect_zeroes);
	test_sparsify_counts();
	test_sparsify_cancel();
	test_race(rounds);
	test_shrink();
	test_crashes(getenv("ZEROES_CRASH_ROUNDS") ? (unsigned)atoi(getenv("ZEROES_CRASH_ROUNDS")) : 300);
	return tap_done();
}
