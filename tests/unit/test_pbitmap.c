/*
 * test_pbitmap.c - persistent dirty bitmaps (qcow_persistent_bitmap.c).
 *
 * The base image is made by QEMU (512-byte clusters, so a bitmap spans
 * several data clusters and its table several entries): bitmap "fine"
 * (512-byte granules), "coarse" (64 KiB granules), both enabled with bits
 * QEMU set, and "off", disabled with bits.
 *  - Round trip: a read-write open loads the enabled bitmaps and sets
 *    in_use on disk before returning; random writes, discards and zero
 *    writes (a byte model of the expected granules per bitmap); clean
 *    close; the image checks clean (qcow_check and qemu-img check); a
 *    reopen loads exactly the model's bits; "off" is untouched.
 *  - Compaction: after the data below the bitmaps is discarded, a
 *    compaction moves the bitmap clusters down (and the map stays
 *    consistent); the bits survive.
 *  - Crash at every write of the close's store (several torn subsets
 *    each): the image opens read-write, checks without corruption (leaks
 *    allowed), and each enabled bitmap is either still in use or
 *    consistent with exactly the model's bits; once the close completed,
 *    consistent.
 *  - Resizing: with only enabled bitmaps the disk grows and shrinks, the
 *    bitmaps follow it (bits past the end dropped), QEMU's check accepts
 *    their new tables; a disabled bitmap makes a resize fail (ENOTSUP).
 *  - Failed writes, torn writes and syncs at each call of the close: no
 *    corruption, each bitmap in use or exactly right, a close that
 *    returned 0 left them consistent.
 *  - Read-only: an open and close change no byte.
 *  - Crash during a compaction that moves bitmap data clusters, tables and
 *    the directory of loaded bitmaps (after k writes, k growing): the image
 *    opens, no corruption, the bitmaps are all there and the loaded ones in
 *    use, the data reads as before.
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <string.h>

static unsigned long long seed = 0xb17a;
#define SIZE (4ull << 20)
#define NB 3
static const char *const names[NB] = { "fine", "coarse", "off" };
static const unsigned gbits[NB] = { 9, 16, 16 };

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)level; (void)msg; (void)opaque;
}

static struct qcow_image *open_io(struct qcow_io *io, bool ro, char *err, size_t errlen)
{
	struct qcow_open_opts o;
	test_open_opts(&o, 16 * 1024);
	o.read_only = ro;
	struct qcow_image *img = NULL;
	int ret = qcow_image_open_io(io, &o, &img, err, errlen);
	return ret ? NULL : img;
}

static uint8_t *bytes_of(struct qcow_io *io, size_t *len)
{
	const uint8_t *b = qcow_io_mem_data(io, len);
	uint8_t *c = malloc(*len ? *len : 1);
	memcpy(c, b, *len);
	return c;
}

static struct qcow_pbitmap_entry *find(struct qcow_image *img, const char *name)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	for (uint32_t i = 0; p && i < p->n; i++)
		if (!strcmp(p->v[i].name, name))
			return &p->v[i];
	return NULL;
}

/* The model: one byte per granule per bitmap. */
struct model {
	uint8_t *g[NB];
	uint64_t n[NB];
};

static void model_init(struct model *m)
{
	for (int i = 0; i < NB; i++) {
		m->n[i] = (SIZE + (1ull << gbits[i]) - 1) >> gbits[i];
		m->g[i] = calloc(m->n[i], 1);
		REQUIRE(m->g[i], "model memory");
	}
}

static void model_free(struct model *m)
{
	for (int i = 0; i < NB; i++)
		free(m->g[i]);
}

static void model_touch(struct model *m, uint64_t off, uint64_t len)
{
	for (int i = 0; i < 2; i++)   /* "off" is disabled */
		for (uint64_t k = off >> gbits[i]; k <= (off + len - 1) >> gbits[i]; k++)
			m->g[i][k] = 1;
}

static bool bit(const struct qcow_pbitmap_entry *e, uint64_t k)
{
	return (e->bits[k >> 6] >> (k & 63)) & 1;
}

/* The loaded bits of the enabled bitmaps equal the model. */
static bool bits_match(struct qcow_image *img, const struct model *m, const char *what)
{
	bool ok = true;
	for (int i = 0; i < 2; i++) {
		struct qcow_pbitmap_entry *e = find(img, names[i]);
		CHECK(e && e->loaded, "%s: bitmap %s is not loaded", what, names[i]);
		if (!e || !e->loaded)
			return false;
		CHECK(e->nbits == m->n[i], "%s: bitmap %s has %llu bits, not %llu", what, names[i],
		      (unsigned long long)e->nbits, (unsigned long long)m->n[i]);
		for (uint64_t k = 0; k < m->n[i] && k < e->nbits && ok; k++)
			if (bit(e, k) != m->g[i][k]) {
				CHECK(0, "%s: bitmap %s granule %llu is %d, expected %d", what, names[i], (unsigned long long)k,
				      bit(e, k), m->g[i][k]);
				ok = false;
			}
	}
	return ok;
}

/* The model starts as QEMU left the bits (read at the first open). */
static void model_from(struct model *m, struct qcow_image *img)
{
	for (int i = 0; i < 2; i++) {
		struct qcow_pbitmap_entry *e = find(img, names[i]);
		REQUIRE(e && e->loaded, "bitmap %s loaded at open", names[i]);
		for (uint64_t k = 0; k < m->n[i]; k++)
			m->g[i][k] = bit(e, k);
	}
}

/* The flags word of bitmap name as it is on disk. */
static uint32_t disk_flags(const uint8_t *bytes, struct qcow_image *img, const char *name)
{
	struct qcow_pbitmap_entry *e = find(img, name);
	REQUIRE(e, "bitmap %s", name);
	return qcow_get_be32(bytes + img->pbitmaps->dir_off + e->dir_pos + 12);
}

static unsigned qemu_every = 1;   /* qemu-img check on every n-th image (it costs a process) */

static void check_clean(const uint8_t *bytes, size_t len, bool leaks_ok, const char *what)
{
	static unsigned calls;
	struct qcow_check_result r;
	int qexit = 0;
	char out[512] = "";
	bool qemu = calls++ % qemu_every == 0;
	CHECK(check_image_bytes(bytes, len, &r, qemu ? &qexit : NULL, out, sizeof(out)) == 0, "%s: qcow_check ran", what);
	CHECK(r.errors == 0, "%s: qcow_check found %llu errors", what, (unsigned long long)r.errors);
	if (!leaks_ok)
		CHECK(r.leaks == 0, "%s: qcow_check found %llu leaks", what, (unsigned long long)r.leaks);
	CHECK(qexit == 0 || (leaks_ok && qexit == 3), "%s: qemu-img check exit %d: %s", what, qexit, out);
}

static void random_ops(struct qcow_image *img, struct model *m, unsigned n)
{
	uint8_t *buf = malloc(256 * 1024);
	REQUIRE(buf, "buffer");
	for (unsigned i = 0; i < n; i++) {
		uint64_t r = tap_rand(&seed);
		uint64_t len = 1 + tap_rand(&seed) % (r % 4 == 0 ? 256 * 1024 : 8192);
		uint64_t off = tap_rand(&seed) % (SIZE - len);
		int ret;
		if (r % 5 == 0) {
			ret = qcow_image_discard(img, off, len);
		} else if (r % 5 == 1) {
			ret = qcow_image_zero(img, off, len);
		} else {
			memset(buf, (int)(r >> 8), len);
			ret = qcow_image_write(img, buf, len, off) == (ssize_t)len ? 0 : -EIO;
		}
		REQUIRE(ret == 0, "operation %u at %llu+%llu", i, (unsigned long long)off, (unsigned long long)len);
		model_touch(m, off, len);
	}
	free(buf);
}

static uint8_t *base_image(size_t *len)
{
	return qemu_bytes("qemu-img create -q -f qcow2 -o cluster_size=512 %s 4M && "
			  "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 3M 512k' %s && "
			  "qemu-img bitmap --add %s off && qemu-io -c 'write -P 3 100k 3000' %s && "
			  "qemu-img bitmap --disable %s off && "
			  "qemu-img bitmap --add -g 512 %s fine && qemu-img bitmap --add -g 64k %s coarse && "
			  "qemu-io -c 'write -P 4 2M 10000' -c 'write -P 5 1023k 2k' %s",
			  len);
}

/* ---- round trip and compaction --------------------------------------------- */

/* A copy of what a recording backend holds (it outlives the engine). */
static uint8_t *rec_copy_bytes(struct rec_io *r, size_t *len)
{
	const uint8_t *b = rec_bytes(r, len);
	uint8_t *c = malloc(*len ? *len : 1);
	REQUIRE(c, "copy");
	memcpy(c, b, *len);
	return c;
}

static uint64_t top_table(struct qcow_image *img)
{
	uint64_t top = 0;
	for (uint32_t i = 0; i < img->pbitmaps->n; i++)
		if (img->pbitmaps->v[i].table_off > top)
			top = img->pbitmaps->v[i].table_off;
	return top;
}

static void round_trip(void)
{
	char err[256];
	size_t blen, len;
	uint8_t *base = base_image(&blen);
	struct rec_io *r = rec_new(base, blen);
	struct qcow_image *img = open_io(&r->io, false, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	struct model m;
	model_init(&m);
	model_from(&m, img);
	unsigned set = 0;
	for (uint64_t k = 0; k < m.n[0]; k++)
		set += m.g[0][k];
	/* 10000 bytes at 2 MiB: 20 granules; 2 KiB at 1023 KiB: 4 */
	CHECK(set == 24, "QEMU's bits were loaded (%u granules of fine set, expected 24)", set);
	struct qcow_pbitmap_entry *off = find(img, "off");
	REQUIRE(off, "bitmap off");
	CHECK(!off->loaded, "the disabled bitmap is not loaded");
	uint64_t off_table = off->table_off;
	const uint8_t *b = rec_bytes(r, &len);
	CHECK(disk_flags(b, img, "fine") == 3 && disk_flags(b, img, "coarse") == 3,
	      "the enabled bitmaps are in use on disk after the open");
	CHECK(disk_flags(b, img, "off") == 0, "the disabled bitmap stays as it was");
	CHECK(img->hdr.autoclear_features & 1, "the bitmaps autoclear bit is kept");
	CHECK(qcow_image_resize(img, SIZE * 2) == -ENOTSUP, "a resize is refused while a disabled bitmap exists");
	random_ops(img, &m, 300);
	CHECK(qcow_image_close(img) == 0, "clean close");
	uint8_t *bytes = rec_copy_bytes(r, &len);
	rec_free(r);
	check_clean(bytes, len, false, "after the round trip");

	r = rec_new(bytes, len);
	free(bytes);
	img = open_io(&r->io, false, err, sizeof(err));
	REQUIRE(img, "reopen: %s", err);
	bits_match(img, &m, "after the round trip");
	off = find(img, "off");
	CHECK(off && !off->loaded && off->table_off == off_table, "the disabled bitmap is unchanged");

	/* compaction: free the data below the bitmaps, compact */
	uint64_t top = top_table(img);
	REQUIRE(qcow_image_discard(img, 0, SIZE) == 0, "discard everything");
	model_touch(&m, 0, SIZE);
	CHECK(qcow_image_compact(img, NULL, NULL) == 0, "compaction");
	const char *bad = qcow_map_check(&img->map);
	CHECK(bad == NULL, "map consistent after the compaction: %s", bad ? bad : "");
	uint64_t top2 = top_table(img);
	CHECK(top2 < top, "the compaction moved the bitmap tables down (0x%llx, was 0x%llx)", (unsigned long long)top2,
	      (unsigned long long)top);
	bytes = rec_copy_bytes(r, &len);
	check_clean(bytes, len, true, "after the compaction (still open)");
	free(bytes);
	CHECK(qcow_image_close(img) == 0, "close after the compaction");
	bytes = rec_copy_bytes(r, &len);
	rec_free(r);
	check_clean(bytes, len, false, "after the compaction");
	r = rec_new(bytes, len);
	img = open_io(&r->io, false, err, sizeof(err));
	REQUIRE(img, "reopen after the compaction: %s", err);
	bits_match(img, &m, "after the compaction");
	CHECK(qcow_image_close(img) == 0, "close");
	rec_free(r);
	free(bytes);

	/* read-only: nothing changes */
	r = rec_new(base, blen);
	img = open_io(&r->io, true, err, sizeof(err));
	REQUIRE(img, "read-only open: %s", err);
	CHECK(img->pbitmaps && img->pbitmaps->nloaded == 0, "a read-only open loads nothing");
	CHECK(qcow_image_write(img, "x", 1, 0) == -EROFS, "read-only write refused");
	qcow_image_close(img);
	b = rec_bytes(r, &len);
	CHECK(len == blen && !memcmp(b, base, len), "a read-only open and close change no byte");
	rec_free(r);
	model_free(&m);
	free(base);
}

/* A backend that forwards to another and does not close it, so that the
 * crash simulator can still crash after the engine closed the image. */
struct keep_io {
	struct qcow_io io;
	struct qcow_io_ops ops;
	struct qcow_io *in;
};
#define KEEP_IN(io) (((struct keep_io *)(io))->in)
static int keep_pread(struct qcow_io *io, void *b, size_t l, uint64_t o) { return KEEP_IN(io)->ops->pread(KEEP_IN(io), b, l, o); }
static int keep_pwrite(struct qcow_io *io, const void *b, size_t l, uint64_t o) { return KEEP_IN(io)->ops->pwrite(KEEP_IN(io), b, l, o); }
static int keep_flush(struct qcow_io *io) { return KEEP_IN(io)->ops->flush(KEEP_IN(io)); }
static int keep_punch(struct qcow_io *io, uint64_t o, uint64_t l) { return KEEP_IN(io)->ops->punch(KEEP_IN(io), o, l); }
static int keep_truncate(struct qcow_io *io, uint64_t s) { return KEEP_IN(io)->ops->truncate(KEEP_IN(io), s); }
static int64_t keep_size(struct qcow_io *io) { return KEEP_IN(io)->ops->size(KEEP_IN(io)); }
static int64_t keep_allocated(struct qcow_io *io) { return KEEP_IN(io)->ops->allocated(KEEP_IN(io)); }
static int keep_copy(struct qcow_io *io, uint64_t s, uint64_t d, uint64_t l) { return KEEP_IN(io)->ops->copy(KEEP_IN(io), s, d, l); }
static void keep_close(struct qcow_io *io) { (void)io; }

static struct keep_io *keep_new(struct qcow_io *in)
{
	struct keep_io *k = calloc(1, sizeof(*k));
	REQUIRE(k, "calloc");
	k->in = in;
	k->ops = (struct qcow_io_ops){ .pread = keep_pread, .pwrite = keep_pwrite, .flush = keep_flush, .punch = keep_punch,
				       .truncate = keep_truncate, .size = keep_size, .allocated = keep_allocated,
				       .copy = keep_copy, .close = keep_close };
	k->io.ops = &k->ops;
	k->io.name = "crash";
	return k;
}

/* ---- resizing ------------------------------------------------------------ */

/* Whether granule k of bitmap e is set exactly when one of the ranges
 * (off, len pairs, n of them) touches it, for every granule of the disk. */
static void expect_ranges(struct qcow_image *img, const char *name, const uint64_t *r, unsigned n, uint64_t size)
{
	struct qcow_pbitmap_entry *e = find(img, name);
	REQUIRE(e && e->loaded, "bitmap %s loaded after the resize", name);
	uint64_t g = 1ull << e->gran_bits;
	CHECK(e->nbits == (size + g - 1) / g, "bitmap %s covers the resized disk (%llu bits)", name, (unsigned long long)e->nbits);
	for (uint64_t k = 0; k < e->nbits; k++) {
		bool want = false;
		for (unsigned i = 0; i < n; i++)
			want |= r[2 * i] < size && k >= r[2 * i] / g && k <= (r[2 * i] + r[2 * i + 1] - 1) / g;
		if (bit(e, k) != want) {
			CHECK(0, "bitmap %s granule %llu is %d after the resizes", name, (unsigned long long)k, bit(e, k));
			return;
		}
	}
}

static void resizes(void)
{
	char err[256];
	size_t blen, len;
	uint8_t *base = qemu_bytes("qemu-img create -q -f qcow2 -o cluster_size=512 %s 4M && "
				   "qemu-io -c 'write -P 1 0 64k' %s && "
				   "qemu-img bitmap --add -g 512 %s fine && qemu-img bitmap --add -g 64k %s coarse",
				   &blen);
	struct rec_io *r = rec_new(base, blen);
	struct qcow_image *img = open_io(&r->io, false, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	/* A before, B in the grown part (gone with the shrink), C after */
	const uint64_t ranges[] = { 100 << 10, 3000, (6 << 20) + 512, 10000, 5 << 20, 4096 };
	uint8_t buf[10000];
	memset(buf, 0x5a, sizeof(buf));
	CHECK(qcow_image_write(img, buf, 3000, ranges[0]) == 3000, "write A");
	CHECK(qcow_image_resize(img, 8 << 20) == 0, "grow to 8 MiB");
	CHECK(qcow_image_write(img, buf, 10000, ranges[2]) == 10000, "write B in the grown part");
	CHECK(qcow_image_resize(img, 6 << 20) == 0, "shrink to 6 MiB");
	CHECK(qcow_image_write(img, buf, 4096, ranges[4]) == 4096, "write C");
	CHECK(qcow_image_close(img) == 0, "close after the resizes");
	uint8_t *bytes = rec_copy_bytes(r, &len);
	rec_free(r);
	check_clean(bytes, len, false, "after the resizes");   /* qemu-img check validates the table sizes */
	r = rec_new(bytes, len);
	img = open_io(&r->io, false, err, sizeof(err));
	REQUIRE(img, "reopen after the resizes: %s", err);
	CHECK(img->virtual_size == 6 << 20, "the disk is 6 MiB");
	expect_ranges(img, "fine", ranges, 3, 6 << 20);
	expect_ranges(img, "coarse", ranges, 3, 6 << 20);
	CHECK(qcow_image_close(img) == 0, "close");
	rec_free(r);
	free(bytes);
	free(base);
}

/* ---- crashes in the close's store ------------------------------------------ */

/* The disk dies after k writes of the close.  Returns true when the close
 * completed. */
static bool crash_case(const uint8_t *base, size_t blen, uint64_t k, unsigned torn, const char *what)
{
	char err[256];
	struct qcow_io *io = qcow_io_crash_new(base, blen);
	struct keep_io *kio = keep_new(io);
	struct qcow_image *img = open_io(&kio->io, false, err, sizeof(err));
	REQUIRE(img, "%s: open: %s", what, err);
	struct model m;
	model_init(&m);
	model_from(&m, img);
	unsigned long long s0 = seed;
	seed = 0x77 + k;   /* the same workload for every k */
	random_ops(img, &m, 40);
	seed = s0;
	REQUIRE(qcow_image_flush(img) == 0, "%s: flush", what);
	qcow_io_crash_die_after(io, k);
	bool completed = qcow_image_close(img) == 0;
	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(&seed) + torn);
	REQUIRE(after, "crash");
	qcow_io_close(io);
	free(kio);
	size_t len;
	uint8_t *bytes = bytes_of(after, &len);
	check_clean(bytes, len, true, what);
	free(bytes);

	img = open_io(after, false, err, sizeof(err));
	CHECK(img != NULL, "%s: the crashed image does not open: %s", what, err);
	if (!img) {
		qcow_io_close(after);
		model_free(&m);
		return true;
	}
	for (int i = 0; i < 2; i++) {
		struct qcow_pbitmap_entry *e = find(img, names[i]);
		CHECK(e != NULL, "%s: bitmap %s is gone", what, names[i]);
		if (!e)
			continue;
		if (completed)
			CHECK(e->loaded, "%s: a completed close left bitmap %s in use", what, names[i]);
	}
	struct qcow_pbitmap_entry *f = find(img, names[0]), *c = find(img, names[1]);
	if (f && c && f->loaded && c->loaded)
		bits_match(img, &m, what);
	else
		for (int i = 0; i < 2; i++) {   /* a consistent one has exactly the bits */
			struct qcow_pbitmap_entry *e = find(img, names[i]);
			for (uint64_t g = 0; e && e->loaded && g < m.n[i]; g++)
				if (bit(e, g) != m.g[i][g]) {
					CHECK(0, "%s: consistent bitmap %s has granule %llu wrong", what, names[i],
					      (unsigned long long)g);
					break;
				}
		}
	CHECK(find(img, "off") && !find(img, "off")->loaded, "%s: the disabled bitmap stays disabled", what);
	CHECK(qcow_image_close(img) == 0, "%s: close after reopen", what);
	model_free(&m);
	return completed;
}

static void crashes(void)
{
	size_t blen;
	uint8_t *base = base_image(&blen);
	unsigned before = tap_failed;
	uint64_t k;
	bool completed = false;
	for (k = 1; k < 400 && !completed; k++)
		for (unsigned t = 0; t < 3; t++) {
			char what[64];
			snprintf(what, sizeof(what), "close crashed after %llu writes (subset %u)", (unsigned long long)k, t);
			completed |= crash_case(base, blen, k, t, what);
		}
	CHECK(completed, "the close completed within 400 writes");
	fprintf(stderr, "# close with bitmaps: crashed after each of its first %llu writes\n", (unsigned long long)k - 1);
	CHECK(tap_failed == before, "a crash at each write of the store leaves a consistent image");
	free(base);
}

/* ---- failed writes and syncs in the close ---------------------------------- */

/* The nth write (or sync) of the close fails once.  The close may fail;
 * whatever it returns, the image checks without corruption, and each
 * enabled bitmap is either still in use or has exactly the model's bits;
 * a close that returned 0 left them consistent.  Returns whether the
 * fault fired (the close had at least n calls of that kind). */
static bool close_fault_case(const uint8_t *base, size_t blen, unsigned ops, uint64_t n, const char *what)
{
	char err[256];
	struct rec_io *r = rec_new(base, blen);
	struct qcow_io *fio = qcow_io_fault_new(&r->io);
	struct keep_io *kio = keep_new(fio);
	struct qcow_image *img = open_io(&kio->io, false, err, sizeof(err));
	REQUIRE(img, "%s: open: %s", what, err);
	struct model m;
	model_init(&m);
	model_from(&m, img);
	unsigned long long s0 = seed;
	seed = 0x99;
	random_ops(img, &m, 30);
	seed = s0;
	REQUIRE(qcow_image_flush(img) == 0, "%s: flush", what);
	qcow_io_fault_arm(fio, ops, n, -EIO);
	int ret = qcow_image_close(img);
	bool fired = qcow_io_fault_fired(fio);
	qcow_io_close(fio);
	free(kio);
	size_t len;
	uint8_t *bytes = rec_copy_bytes(r, &len);
	rec_free(r);
	check_clean(bytes, len, true, what);
	struct qcow_io *io2 = qcow_io_mem_new(bytes, len);
	free(bytes);
	img = open_io(io2, false, err, sizeof(err));
	CHECK(img != NULL, "%s: the image does not open after the failed close: %s", what, err);
	if (!img) {
		qcow_io_close(io2);
		model_free(&m);
		return fired;
	}
	for (int i = 0; i < 2; i++) {
		struct qcow_pbitmap_entry *e = find(img, names[i]);
		CHECK(e != NULL, "%s: bitmap %s is gone", what, names[i]);
		if (ret == 0)
			CHECK(e && e->loaded, "%s: the close returned 0 but left bitmap %s in use", what, names[i]);
		for (uint64_t g = 0; e && e->loaded && g < m.n[i]; g++)
			if (bit(e, g) != m.g[i][g]) {
				CHECK(0, "%s: consistent bitmap %s has granule %llu wrong", what, names[i], (unsigned long long)g);
				break;
			}
	}
	CHECK(qcow_image_close(img) == 0, "%s: close after reopen", what);
	model_free(&m);
	return fired;
}

static void close_faults(void)
{
	size_t blen;
	uint8_t *base = base_image(&blen);
	unsigned before = tap_failed;
	static const unsigned kinds[] = { QFAULT_PWRITE, QFAULT_PWRITE | QFAULT_TORN, QFAULT_FLUSH };
	static const char *const kname[] = { "write", "torn write", "sync" };
	qemu_every = 4;
	for (unsigned k = 0; k < 3; k++) {
		uint64_t n;
		for (n = 1; n < 200; n++) {
			char what[80];
			snprintf(what, sizeof(what), "close with its %s %llu failing", kname[k], (unsigned long long)n);
			if (!close_fault_case(base, blen, kinds[k], n, what))
				break;
		}
		fprintf(stderr, "# close with bitmaps: each of its %llu %ss failed once\n", (unsigned long long)n - 1, kname[k]);
		CHECK(n > 3, "the close makes more than 2 calls of kind %s", kname[k]);
	}
	qemu_every = 1;
	CHECK(tap_failed == before, "a failed write or sync in the close never leaves a wrong bitmap marked consistent");
	free(base);
}

/* ---- crashes in a compaction that moves bitmap clusters ------------------- */

/* The disk dies after k writes of a compaction (erase, moves, bitmap
 * tables and directory relocated) of an image whose bitmaps are loaded
 * (in use on disk).  Returns true when the compaction completed. */
static bool compact_crash_case(const uint8_t *base, size_t blen, const uint8_t *view, uint64_t k, unsigned torn,
			       uint64_t *top_before, uint64_t *top_after, const char *what)
{
	char err[256];
	struct qcow_io *io = qcow_io_crash_new(base, blen);
	struct keep_io *kio = keep_new(io);
	struct qcow_image *img = open_io(&kio->io, false, err, sizeof(err));
	REQUIRE(img, "%s: open: %s", what, err);
	*top_before = top_table(img);
	REQUIRE(qcow_image_discard(img, 0, 1536 * 1024) == 0, "%s: discard", what);
	REQUIRE(qcow_image_flush(img) == 0, "%s: flush", what);
	qcow_io_crash_die_after(io, k);
	bool completed = qcow_image_compact(img, NULL, NULL) == 0;
	*top_after = top_table(img);
	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(&seed) + torn);
	REQUIRE(after, "crash");
	qcow_image_close(img);
	qcow_io_close(io);
	free(kio);
	size_t len;
	uint8_t *bytes = bytes_of(after, &len);
	check_clean(bytes, len, true, what);
	free(bytes);
	img = open_io(after, false, err, sizeof(err));
	CHECK(img != NULL, "%s: the crashed image does not open: %s", what, err);
	if (!img) {
		qcow_io_close(after);
		return true;
	}
	for (int i = 0; i < NB; i++)
		CHECK(find(img, names[i]) != NULL, "%s: bitmap %s is gone", what, names[i]);
	for (int i = 0; i < 2; i++) {
		struct qcow_pbitmap_entry *e = find(img, names[i]);
		CHECK(!e || ((e->flags & 1) && !e->loaded), "%s: bitmap %s was loaded when the disk died: it must be in use", what,
		      names[i]);
	}
	uint8_t *buf = malloc(SIZE);
	REQUIRE(buf && qcow_image_read(img, buf, SIZE, 0) == (ssize_t)SIZE, "%s: read", what);
	bool zero = true;
	for (uint64_t i = 0; i < 1536 * 1024 && zero; i++)
		zero = buf[i] == 0;
	CHECK(zero, "%s: the discarded range does not read zeros", what);
	CHECK(!memcmp(buf + 1536 * 1024, view + 1536 * 1024, SIZE - 1536 * 1024), "%s: data after the discard changed", what);
	free(buf);
	CHECK(qcow_image_close(img) == 0, "%s: close after reopen", what);
	return completed;
}

static void compact_crashes(void)
{
	char err[256];
	size_t blen, len;
	uint8_t *b0 = base_image(&blen);
	/* data before the bitmaps: a round of writes and a close stores
	 * them after it */
	struct rec_io *r = rec_new(b0, blen);
	struct qcow_image *img = open_io(&r->io, false, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	uint8_t *view = malloc(SIZE);
	REQUIRE(view, "memory");
	for (uint64_t i = 0; i < SIZE; i++)
		view[i] = (uint8_t)(i * 7 + (i >> 9));
	REQUIRE(qcow_image_write(img, view, SIZE, 0) == (ssize_t)SIZE, "fill");
	REQUIRE(qcow_image_close(img) == 0, "close");
	uint8_t *base = rec_copy_bytes(r, &len);
	rec_free(r);
	free(b0);
	unsigned before = tap_failed;
	qemu_every = 5;
	uint64_t k, top0 = 0, top1 = 0;
	bool completed = false;
	for (k = 1; k < 4000 && !completed; k += 1 + k / 10)
		for (unsigned t = 0; t < 2; t++) {
			char what[80];
			snprintf(what, sizeof(what), "compaction crashed after %llu writes (subset %u)", (unsigned long long)k, t);
			completed |= compact_crash_case(base, len, view, k, t, &top0, &top1, what);
		}
	CHECK(completed, "the compaction completed within 4000 writes");
	CHECK(top1 < top0, "the completed compaction moved the bitmap tables down (0x%llx, was 0x%llx)", (unsigned long long)top1,
	      (unsigned long long)top0);
	fprintf(stderr, "# compaction with bitmaps: crashed after k writes, k growing up to %llu\n", (unsigned long long)k - 1);
	CHECK(tap_failed == before, "a crash in a compaction that moves bitmap clusters leaves a consistent image");
	free(view);
	free(base);
}

int main(void)
{
	qcow_log_set_sink(quiet_sink, NULL);
	round_trip();
	resizes();
	crashes();
	close_faults();
	compact_crashes();
	return tap_done();
}
