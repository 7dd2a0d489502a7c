/*
 * test_xl2.c - extended L2 entries (subclusters) on the memory backend.
 *
 * Images are made by qemu-img with extended_l2=on (16 KiB, 64 KiB and
 * 2 MiB clusters) and opened on memory backends.  Each round:
 *  - random subcluster-sized (and smaller, and unaligned) writes,
 *    discards and zero writes against a shadow of the disk: every
 *    operation's neighbourhood reads like the shadow, the map stays
 *    consistent, and after close qcow_check (and on some rounds qemu-img
 *    check) is clean, and the reopened image reads like the shadow;
 *  - the same with a raw backing file on the memory backend underneath
 *    (qcow_image_open_io_backing): unallocated subclusters read the
 *    backing data, partial writes fill from it, discards set zero bits;
 *  - crash rounds on the crash simulator: random operations, the disk dies
 *    after a random number of writes; the crashed image checks without
 *    errors, opens, and keeps every sector of the last completed flush.
 * Plus the sub-cluster reclaim (a cluster discarded one subcluster at a
 * time releases its host cluster) and hostile bitmaps (refused at open
 * with the entry's offset, image bytes unchanged).
 * XL2_ROUNDS (env) scales the rounds.
 */
#include "qcow_internal.h"
#include "qcow_subcluster.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static unsigned long long seed = 0x5c1u;

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque) {}

/* backing: a raw backing file the image then owns (NULL: none). */
static struct qcow_image *open_io_b(struct qcow_io *io, struct qcow_backing *backing, char *err, size_t errlen, int *ret)
{
	struct qcow_open_opts o;
	test_open_opts(&o, 64 * 1024);
	struct qcow_image *img = NULL;
	*ret = qcow_image_open_io_backing(io, &o, backing, &img, err, errlen);
	return img;
}

static struct qcow_image *open_io(struct qcow_io *io, char *err, size_t errlen, int *ret)
{
	return open_io_b(io, NULL, err, errlen, ret);
}

/* qemu-made empty images, one per cluster size */
static struct { unsigned cb; uint64_t size; uint8_t *bytes; size_t len; } kinds[] = {
	{ 14, 4u << 20, NULL, 0 },
	{ 16, 8u << 20, NULL, 0 },
	{ 21, 16u << 20, NULL, 0 },
};

static uint8_t *kind_bytes(unsigned k, size_t *len)
{
	if (!kinds[k].bytes) {
		char script[256];
		snprintf(script, sizeof(script), "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=%llu %%s %llu",
			 1ull << kinds[k].cb, (unsigned long long)kinds[k].size);
		kinds[k].bytes = qemu_bytes(script, &kinds[k].len);
	}
	uint8_t *b = malloc(kinds[k].len);
	REQUIRE(b, "memory");
	memcpy(b, kinds[k].bytes, kinds[k].len);
	*len = kinds[k].len;
	return b;
}

/* A random operation range: whole subclusters, 512-byte sectors inside
 * them, or anything. */
static void pick_range(uint64_t size, uint64_t sc, uint64_t *off, uint64_t *n)
{
	uint64_t y = tap_rand(&seed) % 10;
	if (y < 5) {
		*off = tap_rand(&seed) % (size / sc) * sc;
		*n = (1 + tap_rand(&seed) % 40) * sc;
	} else if (y < 8) {
		*off = tap_rand(&seed) % (size / 512) * 512;
		*n = (1 + tap_rand(&seed) % (2 * sc / 512)) * 512;
	} else {
		*off = tap_rand(&seed) % size;
		*n = 1 + tap_rand(&seed) % (3 * sc);
	}
	if (*n > size - *off)
		*n = size - *off;
}

static bool same_as_shadow(struct qcow_image *img, const uint8_t *shadow, uint64_t off, uint64_t n, uint8_t *buf,
			   const char *what)
{
	if (qcow_image_read(img, buf, n, off) != (ssize_t)n) {
		CHECK(0, "%s: read of %llu at %llu failed", what, (unsigned long long)n, (unsigned long long)off);
		return false;
	}
	if (memcmp(buf, shadow + off, n)) {
		uint64_t i = 0;
		while (buf[i] == shadow[off + i])
			i++;
		CHECK(0, "%s: byte %llu reads 0x%02x, shadow 0x%02x", what, (unsigned long long)(off + i), buf[i],
		      shadow[off + i]);
		return false;
	}
	return true;
}

/* One round of random operations; backing: a raw backing file of random
 * data, set up by hand. */
static void shadow_round(unsigned round, unsigned k, bool backing, unsigned nops)
{
	size_t len;
	uint8_t *bytes = kind_bytes(k, &len);
	struct rec_io *r = rec_new(bytes, len);
	free(bytes);
	uint64_t size = kinds[k].size, sc = (1ull << kinds[k].cb) / 32;
	uint8_t *shadow = calloc(1, size), *buf = malloc(size), *data = malloc(41 * sc);
	REQUIRE(shadow && buf && data, "memory");
	char err[256], what[96];
	int ret;
	/* a backing file shorter than the disk: past its end, zeros */
	uint64_t bsize = size - size / 8;
	uint8_t *bb = NULL;
	if (backing) {
		bb = malloc(bsize);
		REQUIRE(bb, "memory");
		for (uint64_t i = 0; i < bsize; i++)
			bb[i] = (uint8_t)(tap_rand(&seed) | 1);
		memcpy(shadow, bb, bsize);
	}
	struct qcow_image *img = open_io_b(&r->io, bb ? test_raw_backing(bb, bsize) : NULL, err, sizeof(err), &ret);
	REQUIRE(img, "round %u: open: %s", round, err);
	if (backing)
		CHECK(same_as_shadow(img, shadow, 0, size, buf, "backing shows through"), "round %u", round);
	for (unsigned op = 0; op < nops; op++) {
		uint64_t off, n;
		pick_range(size, sc, &off, &n);
		unsigned x = (unsigned)(tap_rand(&seed) % 10);
		snprintf(what, sizeof(what), "round %u (%ucb%s) op %u %s %llu+%llu", round, kinds[k].cb,
			 backing ? " backing" : "", op, x < 5 ? "write" : x < 8 ? "discard" : "zero",
			 (unsigned long long)off, (unsigned long long)n);
		if (x < 5) {
			memset(data, (int)(tap_rand(&seed) % 255 + 1), n);
			ret = qcow_image_write(img, data, n, off) == (ssize_t)n ? 0 : -EIO;
			memcpy(shadow + off, data, n);
		} else {
			ret = x < 8 ? qcow_image_discard(img, off, n) : qcow_image_zero(img, off, n);
			memset(shadow + off, 0, n);
		}
		CHECK(ret == 0, "%s: failed %d", what, ret);
		uint64_t lo = off > sc ? off - sc : 0, hi = off + n + sc < size ? off + n + sc : size;
		if (!same_as_shadow(img, shadow, lo, hi - lo, buf, what))
			break;
		if (op % 4 == 3) {
			pthread_mutex_lock(&img->lock);
			const char *inv = qcow_map_check(&img->map);
			pthread_mutex_unlock(&img->lock);
			CHECK(!inv, "%s: map: %s", what, inv);
		}
		if (op % 40 == 39)
			CHECK(qcow_image_flush(img) == 0, "%s: flush", what);
	}
	snprintf(what, sizeof(what), "round %u (%ucb%s)", round, kinds[k].cb, backing ? " backing" : "");
	CHECK(same_as_shadow(img, shadow, 0, size, buf, what), "%s: whole disk before close", what);
	CHECK(qcow_image_close(img) == 0, "%s: close", what);
	const uint8_t *after = rec_bytes(r, &len);
	struct qcow_check_result cr;
	int q = 0;
	bool with_qemu = round % 4 == 0;
	ret = check_image_bytes(after, len, &cr, with_qemu ? &q : NULL, NULL, 0);
	CHECK(ret == 0 && cr.errors == 0 && cr.leaks == 0, "%s: qcow_check after close: ret %d, %llu errors, %llu leaks",
	      what, ret, (unsigned long long)cr.errors, (unsigned long long)cr.leaks);
	if (with_qemu)
		CHECK(q == 0, "%s: qemu-img check exit %d after close", what, q);
	/* reopened, it reads the same (with the same backing file) */
	struct qcow_io *io2 = qcow_io_mem_new(after, len);
	struct qcow_image *img2 = open_io_b(io2, bb ? test_raw_backing(bb, bsize) : NULL, err, sizeof(err), &ret);
	CHECK(img2 != NULL, "%s: reopen: %s", what, err);
	if (img2) {
		CHECK(same_as_shadow(img2, shadow, 0, size, buf, what), "%s: after reopen", what);
		qcow_image_close(img2);
	}
	free(bb);
	rec_free(r);
	free(shadow);
	free(buf);
	free(data);
}

/* The L2 entry and bitmap of guest cluster gc. */
static void entry_of(struct qcow_image *img, uint64_t gc, uint64_t *e, uint64_t *bm)
{
	pthread_mutex_lock(&img->lock);
	int ret = qcow_l2_lookup_bitmap(img, gc, e, bm);
	pthread_mutex_unlock(&img->lock);
	REQUIRE(ret == 0, "lookup");
}

/* A 64 KiB cluster discarded 4 KiB at a time, with and without a backing
 * file: bits first, then the host cluster goes. */
static void reclaim(bool backing)
{
	size_t len;
	uint8_t *bytes = kind_bytes(1, &len);
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	free(bytes);
	char err[256];
	int ret;
	uint8_t *bb = malloc(1u << 20);
	REQUIRE(bb, "memory");
	memset(bb, 0x5a, 1u << 20);
	struct qcow_image *img = open_io_b(io, backing ? test_raw_backing(bb, 1u << 20) : NULL, err, sizeof(err), &ret);
	REQUIRE(img, "open: %s", err);
	free(bb);
	uint8_t data[65536], rd[4096];
	memset(data, 0xc3, sizeof(data));
	CHECK(qcow_image_write(img, data, sizeof(data), 3 * 65536) == 65536, "write the cluster");
	uint64_t e, bm;
	entry_of(img, 3, &e, &bm);
	uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	CHECK(h && bm == QCOW_SC_ALLOC_ALL, "a whole write allocates all subclusters (0x%llx 0x%llx)",
	      (unsigned long long)e, (unsigned long long)bm);
	for (unsigned i = 0; i < 16; i++) {
		CHECK(qcow_image_discard(img, 3 * 65536 + i * 4096, 4096) == 0, "discard block %u", i);
		entry_of(img, 3, &e, &bm);
		uint64_t gone = qcow_sc_range(0, 2 * i + 1);
		CHECK((bm & QCOW_SC_ALLOC_ALL) == (QCOW_SC_ALLOC_ALL & ~gone), "block %u: allocation bits 0x%llx", i,
		      (unsigned long long)bm);
		CHECK((bm >> 32) == (backing ? gone : 0), "block %u: zero bits 0x%llx", i, (unsigned long long)bm);
		CHECK(qcow_image_read(img, rd, 4096, 3 * 65536 + i * 4096) == 4096 && rd[0] == 0 && rd[4095] == 0,
		      "block %u reads zeros", i);
		if (i < 15) {
			CHECK((e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits == h, "block %u: host cluster kept", i);
			CHECK(qcow_map_state(&img->map, h) == QCS_REF, "block %u: host cluster still referenced", i);
		}
	}
	CHECK((e & QCOW_L2E_OFFSET_MASK) == 0, "all blocks gone: host cluster released (entry 0x%llx)",
	      (unsigned long long)e);
	CHECK(bm == (backing ? QCOW_SC_ZERO_ALL : 0), "all blocks gone: bitmap 0x%llx", (unsigned long long)bm);
	enum qcow_cstate st = qcow_map_state(&img->map, h);
	CHECK(st == QCS_JUNK || st == QCS_ERASED || st == QCS_AVAILABLE, "released host cluster is free (state %d)", st);
	/* a partial write into the all-zero cluster allocates only its subcluster */
	CHECK(qcow_image_write(img, data, 100, 3 * 65536 + 2048 * 7 + 10) == 100, "small write");
	entry_of(img, 3, &e, &bm);
	CHECK((e & QCOW_L2E_OFFSET_MASK) && (bm & QCOW_SC_ALLOC_ALL) == (1ull << 7), "small write: bitmap 0x%llx",
	      (unsigned long long)bm);
	CHECK(qcow_image_read(img, rd, 2048, 3 * 65536 + 2048 * 7) == 2048 && rd[0] == 0 && rd[10] == 0xc3 &&
	      rd[109] == 0xc3 && rd[110] == 0, "small write: the rest of its subcluster reads zeros");
	CHECK(qcow_image_read(img, rd, 2048, 3 * 65536 + 2048 * 8) == 2048 && rd[0] == 0, "the next subcluster is zero");
	if (backing) {
		/* an untouched cluster shows the backing file; a partial write
		 * fills only its own subcluster from it */
		CHECK(qcow_image_write(img, data, 10, 5 * 65536 + 100) == 10, "write over backing");
		entry_of(img, 5, &e, &bm);
		CHECK(bm == 1, "write over backing: only subcluster 0 allocated (0x%llx)", (unsigned long long)bm);
		CHECK(qcow_image_read(img, rd, 4096, 5 * 65536) == 4096 && rd[0] == 0x5a && rd[100] == 0xc3 &&
		      rd[110] == 0x5a && rd[2048] == 0x5a, "write over backing reads backing around it");
		/* what shows the backing file is data */
		int64_t d = qcow_image_seek(img, 5 * 65536, SEEK_HOLE);
		CHECK(d >= 6 * 65536, "SEEK_HOLE with a backing file: %lld", (long long)d);
	} else {
		int64_t d = qcow_image_seek(img, 3 * 65536, SEEK_DATA);
		CHECK(d == 3 * 65536 + 2048 * 7, "SEEK_DATA finds the subcluster: %lld", (long long)d);
		d = qcow_image_seek(img, d, SEEK_HOLE);
		CHECK(d == 3 * 65536 + 2048 * 8, "SEEK_HOLE after it: %lld", (long long)d);
	}
	CHECK(qcow_image_close(img) == 0, "close");
}

/* detect_zeroes=unmap, sparsify and a shrink with extended entries: the
 * released clusters leave entries that are unallocated or all zero bits,
 * and the image checks clean. */
static void zeroes_and_sparsify(bool backing)
{
	size_t len;
	uint8_t *bytes = kind_bytes(1, &len);
	struct rec_io *r = rec_new(bytes, len);
	free(bytes);
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.recycler = false;
	o.runtime_asserts = true;
	o.detect_zeroes = QCOW_DETECT_ZEROES_UNMAP;
	struct qcow_image *img = NULL;
	char err[256];
	uint8_t *bb = malloc(8u << 20);
	REQUIRE(bb, "memory");
	memset(bb, 0x3c, 8u << 20);
	REQUIRE(qcow_image_open_io_backing(&r->io, &o, backing ? test_raw_backing(bb, 8u << 20) : NULL, &img, err,
					   sizeof(err)) == 0, "open: %s", err);
	free(bb);
	static uint8_t data[4 * 65536], zeros[2 * 65536], rd[65536];
	memset(data, 0x99, sizeof(data));
	uint64_t e, bm;
	/* detect_zeroes: whole zero clusters of a write are released */
	CHECK(qcow_image_write(img, data, sizeof(data), 8 * 65536) == (ssize_t)sizeof(data), "write 4 clusters");
	CHECK(qcow_image_write(img, zeros, sizeof(zeros), 9 * 65536) == (ssize_t)sizeof(zeros), "zero write");
	entry_of(img, 9, &e, &bm);
	CHECK(e == 0 && bm == (backing ? QCOW_SC_ZERO_ALL : 0), "detect_zeroes: entry 0x%llx bitmap 0x%llx",
	      (unsigned long long)e, (unsigned long long)bm);
	CHECK(qcow_image_read(img, rd, 65536, 10 * 65536) == 65536 && rd[0] == 0 && rd[65535] == 0,
	      "detect_zeroes: zeros read back");
	/* sparsify (without a backing file only: with one it keeps clusters) */
	if (!backing) {
		memset(data, 0, 65536);
		o.detect_zeroes = QCOW_DETECT_ZEROES_OFF;
		img->opts.detect_zeroes = QCOW_DETECT_ZEROES_OFF;
		CHECK(qcow_image_write(img, data, 65536, 8 * 65536) == 65536, "write a zero cluster as data");
		entry_of(img, 8, &e, &bm);
		CHECK(e && bm == QCOW_SC_ALLOC_ALL, "zero data allocated (0x%llx)", (unsigned long long)bm);
		struct qcow_sparsify_result sr;
		CHECK(qcow_image_sparsify(img, NULL, NULL, &sr) == 0 && sr.freed >= 1, "sparsify freed %llu",
		      (unsigned long long)sr.freed);
		entry_of(img, 8, &e, &bm);
		CHECK(e == 0 && bm == 0, "sparsify: entry 0x%llx bitmap 0x%llx", (unsigned long long)e,
		      (unsigned long long)bm);
	}
	/* a shrink into the middle of a subcluster, then a grow: zeros there */
	CHECK(qcow_image_resize(img, 11 * 65536 + 4096 + 512) == 0, "shrink");
	CHECK(qcow_image_resize(img, 8u << 20) == 0, "grow");
	CHECK(qcow_image_read(img, rd, 8192, 11 * 65536) == 8192 && rd[4096 + 511] == 0x99 && rd[4096 + 512] == 0 &&
	      rd[8191] == 0, "after shrink and grow: data up to the old end, zeros after");
	CHECK(qcow_image_close(img) == 0, "close");
	const uint8_t *after = rec_bytes(r, &len);
	struct qcow_check_result cr;
	int q = 0;
	int ret = check_image_bytes(after, len, &cr, &q, NULL, 0);
	CHECK(ret == 0 && cr.errors == 0 && cr.leaks == 0 && q == 0,
	      "zeroes%s: check after close: ret %d, %llu errors, %llu leaks, qemu-img exit %d", backing ? " (backing)" : "",
	      ret, (unsigned long long)cr.errors, (unsigned long long)cr.leaks, q);
	rec_free(r);
}

/* Internal snapshots made by the engine over extended entries: the
 * shared L2 tables are copied with their bitmaps, subcluster writes and
 * discards after the snapshot leave it intact, apply and delete work, and
 * the image checks clean (qemu-img too). */
static void snapshots(void)
{
	size_t len;
	uint8_t *bytes = kind_bytes(1, &len);
	struct rec_io *r = rec_new(bytes, len);
	free(bytes);
	char err[256];
	int ret;
	struct qcow_image *img = open_io(&r->io, err, sizeof(err), &ret);
	REQUIRE(img, "open: %s", err);
	uint64_t size = kinds[1].size;
	uint8_t *snap = calloc(1, size), *now = calloc(1, size), *buf = malloc(size), *data = malloc(41 * 2048);
	REQUIRE(snap && now && buf && data, "memory");
	for (unsigned i = 0; i < 60; i++) {
		uint64_t off, n;
		pick_range(size, 2048, &off, &n);
		memset(data, (int)(i + 1), n);
		CHECK(qcow_image_write(img, data, n, off) == (ssize_t)n, "snapshots: write %u", i);
		memcpy(now + off, data, n);
	}
	CHECK(qcow_snapshot_create(img, "a") == 0, "snapshots: create");
	memcpy(snap, now, size);
	for (unsigned i = 0; i < 120; i++) {
		uint64_t off, n;
		pick_range(size, 2048, &off, &n);
		if (i % 3) {
			memset(data, (int)(i + 100), n);
			CHECK(qcow_image_write(img, data, n, off) == (ssize_t)n, "snapshots: write after %u", i);
			memcpy(now + off, data, n);
		} else {
			CHECK(qcow_image_discard(img, off, n) == 0, "snapshots: discard after %u", i);
			memset(now + off, 0, n);
		}
	}
	CHECK(same_as_shadow(img, now, 0, size, buf, "snapshots: active layer"), "active layer");
	CHECK(qcow_snapshot_apply(img, "a") == 0, "snapshots: apply");
	CHECK(same_as_shadow(img, snap, 0, size, buf, "snapshots: after apply"), "applied snapshot");
	CHECK(qcow_snapshot_create(img, "b") == 0 && qcow_snapshot_delete(img, "a") == 0, "snapshots: create b, delete a");
	CHECK(qcow_image_write(img, data, 5000, 3 * 65536 + 777) == 5000, "snapshots: write after delete");
	memcpy(snap + 3 * 65536 + 777, data, 5000);
	CHECK(same_as_shadow(img, snap, 0, size, buf, "snapshots: after delete"), "after delete");
	CHECK(qcow_image_close(img) == 0, "snapshots: close");
	const uint8_t *after = rec_bytes(r, &len);
	struct qcow_check_result cr;
	int q = 0;
	ret = check_image_bytes(after, len, &cr, &q, NULL, 0);
	CHECK(ret == 0 && cr.errors == 0 && cr.leaks == 0 && q == 0,
	      "snapshots: check after close: ret %d, %llu errors, %llu leaks, qemu-img exit %d", ret,
	      (unsigned long long)cr.errors, (unsigned long long)cr.leaks, q);
	rec_free(r);
	free(snap);
	free(now);
	free(buf);
	free(data);
}

/* Crash rounds: the disk dies after a random number of writes. */
static void crash_round(unsigned round)
{
	unsigned k = (unsigned)(tap_rand(&seed) % 2);
	size_t len;
	uint8_t *bytes = kind_bytes(k, &len);
	struct qcow_io *io = qcow_io_crash_new(bytes, len);
	free(bytes);
	uint64_t size = kinds[k].size, sc = (1ull << kinds[k].cb) / 32;
	char err[256], what[64];
	int ret;
	struct qcow_image *img = open_io(io, err, sizeof(err), &ret);
	REQUIRE(img, "crash round %u: open: %s", round, err);
	struct crash_model m;
	crash_model_init(&m, size, NULL);
	uint8_t *data = malloc(41 * sc);
	REQUIRE(data, "memory");
	qcow_io_crash_die_after(io, 5 + tap_rand(&seed) % 200);
	for (unsigned op = 0; op < 200; op++) {
		uint64_t off, n;
		pick_range(size, sc, &off, &n);
		unsigned x = (unsigned)(tap_rand(&seed) % 20);
		bool ok;
		if (x < 10) {
			memset(data, (int)(tap_rand(&seed) % 255 + 1), n);
			ok = crash_model_do(img, &m, CRASH_WRITE, data, off, n);
		} else if (x < 17) {
			ok = crash_model_do(img, &m, CRASH_DISCARD, NULL, off, n);
		} else if (x < 19) {
			ok = crash_model_do(img, &m, CRASH_FLUSH, NULL, 0, 0);
		} else {
			ok = crash_model_do(img, &m, CRASH_COMPACT, NULL, 0, 0);
		}
		if (!ok)
			break;
	}
	snprintf(what, sizeof(what), "crash round %u (%ucb)", round, kinds[k].cb);
	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(&seed));
	REQUIRE(after, "crash");
	qcow_image_close(img);
	size_t alen;
	const uint8_t *abytes = qcow_io_mem_data(after, &alen);
	crash_check_bytes(abytes, alen, round % 8 == 0, what);
	struct qcow_image *img2 = open_io(after, err, sizeof(err), &ret);
	CHECK(img2 != NULL, "%s: crashed image does not open: %s", what, err);
	if (img2) {
		uint64_t bad = crash_model_verify(img2, &m, what);
		CHECK(bad == 0, "%s: %llu flushed sectors differ after the crash", what, (unsigned long long)bad);
		pthread_mutex_lock(&img2->lock);
		const char *inv = qcow_map_check(&img2->map);
		pthread_mutex_unlock(&img2->lock);
		CHECK(!inv, "%s: map after reopen: %s", what, inv);
		CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
	} else {
		qcow_io_close(after);
	}
	crash_model_free(&m);
	free(data);
}

/* Hostile bitmaps: the open refuses them naming the entry's offset; the
 * bytes stay as they were. */
static void hostile(void)
{
	static const struct { uint64_t e_or, bm; const char *want; } cases[] = {
		{ 0, 0x0000000100000001ull, "both allocated and zero" },
		{ 0, 0x0000000000000004ull, "no host offset" },
		{ QCOW_OFLAG_COMPRESSED, 0x0000000000000001ull, "compressed" },
	};
	for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t len;
		uint8_t *bytes = qemu_bytes("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=65536 %s 4M && "
					    "qemu-io -c 'write -P 0x61 0 64k' -c 'write -P 0x62 128k 4k' %s >/dev/null", &len);
		uint64_t l1 = qcow_get_be64(bytes + QH_L1_OFFSET);
		uint64_t l2 = qcow_get_be64(bytes + l1) & QCOW_L1E_OFFSET_MASK;
		uint64_t slot = l2 + (i == 1 ? 1 : i == 2 ? 2 : 0) * 16;
		if (i == 2) {   /* a compressed descriptor in entry 2 of cluster 2's data */
			uint64_t e2 = qcow_get_be64(bytes + l2 + 32);
			qcow_put_be64(bytes + slot, QCOW_OFLAG_COMPRESSED | (e2 & QCOW_L2E_OFFSET_MASK));
		}
		qcow_put_be64(bytes + slot + 8, cases[i].bm);
		uint8_t *copy = malloc(len);
		memcpy(copy, bytes, len);
		struct rec_io *r = rec_new(bytes, len);
		char err[512] = "", off[32];
		int ret;
		struct qcow_image *img = open_io(&r->io, err, sizeof(err), &ret);
		snprintf(off, sizeof(off), "0x%llx", (unsigned long long)slot);
		CHECK(!img && ret < 0, "hostile bitmap %u: refused (ret %d)", i, ret);
		CHECK(strstr(err, cases[i].want) && strstr(err, off), "hostile bitmap %u: message names it and %s: %s", i,
		      off, err);
		if (img)
			qcow_image_close(img);
		size_t alen;
		const uint8_t *after = rec_bytes(r, &alen);
		CHECK(alen == len && memcmp(after, copy, len) == 0, "hostile bitmap %u: image unchanged", i);
		/* a read-only open reads past it: the bad cluster fails with EIO,
		 * the rest reads */
		struct qcow_open_opts o;
		qcow_open_opts_default(&o);
		o.no_locking = true;
		o.read_only = true;
		struct qcow_io *io2 = qcow_io_mem_new(copy, len);
		img = NULL;
		ret = qcow_image_open_io(io2, &o, &img, err, sizeof(err));
		if (img) {
			uint8_t rd[4096];
			/* cluster 0 (cases 1, 2) or 2 (case 0) is intact */
			CHECK(qcow_image_read(img, rd, 4096, i == 0 ? 128 * 1024 : 0) == 4096 &&
			      rd[0] == (i == 0 ? 0x62 : 0x61), "hostile bitmap %u: other data reads", i);
			(void)qcow_image_read(img, rd, 4096, (slot - l2) / 16 * 65536);   /* EIO or data: no crash */
			qcow_image_close(img);
		}
		rec_free(r);
		free(bytes);
		free(copy);
	}
}

/* The zero flag (bit 0 of the pointer) means nothing with extended
 * entries: QEMU reads the data, so does the engine, and check is clean. */
static void zero_flag_ignored(void)
{
	size_t len;
	uint8_t *bytes = qemu_bytes("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=65536 %s 4M && "
				    "qemu-io -c 'write -P 0x61 0 64k' %s >/dev/null", &len);
	uint64_t l1 = qcow_get_be64(bytes + QH_L1_OFFSET);
	uint64_t l2 = qcow_get_be64(bytes + l1) & QCOW_L1E_OFFSET_MASK;
	qcow_put_be64(bytes + l2, qcow_get_be64(bytes + l2) | QCOW_OFLAG_ZERO);
	struct qcow_check_result cr;
	int q = 0;
	CHECK(check_image_bytes(bytes, len, &cr, &q, NULL, 0) == 0 && cr.errors == 0 && q == 0,
	      "zero flag with extended entries: check clean (%llu errors, qemu-img exit %d)",
	      (unsigned long long)cr.errors, q);
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	char err[256];
	int ret;
	struct qcow_image *img = open_io(io, err, sizeof(err), &ret);
	CHECK(img != NULL, "zero flag with extended entries: opens: %s", err);
	if (img) {
		uint8_t rd[512];
		CHECK(qcow_image_read(img, rd, 512, 0) == 512 && rd[0] == 0x61, "zero flag ignored: data reads");
		struct qcow_sparsify_result sr;
		CHECK(qcow_image_sparsify(img, NULL, NULL, &sr) == 0 && qcow_image_read(img, rd, 512, 0) == 512 &&
		      rd[0] == 0x61, "sparsify keeps the data");
		qcow_image_close(img);
	}
	free(bytes);
}

int main(void)
{
	qcow_log_set_sink(quiet_sink, NULL);
	const char *env = getenv("XL2_ROUNDS");
	unsigned rounds = env ? (unsigned)atoi(env) : 12;
	if (test_sh(NULL, "command -v qemu-img") != 0) {
		fprintf(stderr, "qemu-img is needed (the images are QEMU's)\n");
		return 99;
	}
	hostile();
	zero_flag_ignored();
	reclaim(false);
	reclaim(true);
	zeroes_and_sparsify(false);
	zeroes_and_sparsify(true);
	snapshots();
	for (unsigned i = 0; i < rounds; i++)
		shadow_round(i, i % 3, i % 2 == 1, i % 3 == 2 ? 60 : 300);
	for (unsigned i = 0; i < rounds * 4; i++)
		crash_round(i);
	return tap_done();
}
