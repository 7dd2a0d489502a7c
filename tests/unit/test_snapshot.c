/*
 * test_snapshot.c - internal snapshots: create / delete / apply round
 * trips with data checks, the snapshot view, moving snapshot tables down,
 * and power loss at every write of a create, a delete and a relocation.
 *
 * The guest disk is modelled as a byte array per state (the active view,
 * and what every snapshot held when it was taken).  After each step the
 * image bytes are checked (qcow_check, qemu-img check when installed) and
 * each snapshot is read through a read-only snapshot view.
 * Crash rule (doc/design.md, "Internal snapshots"): the disk dies after k
 * writes of the operation, for every k until it completes; the simulator
 * keeps a random torn subset of the unflushed writes.  After reopening
 * read-write (which repairs what the dirty bit announces) and closing,
 * qcow_check finds no errors (leaks allowed), the active view has every
 * flushed write, and every snapshot that exists reads what it held.
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static unsigned long long seed = 0x5a9f;
static const uint64_t SIZE = 4u << 20;
#define MAXSNAP 4

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)level; (void)msg; (void)opaque;
}

static struct qcow_image *open_io(struct qcow_io *io, bool ro, const char *snap, char *err, size_t errlen)
{
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.recycler = false;
	o.runtime_asserts = true;
	o.cache_bytes = 64 * 1024;   /* small: L2 tables get evicted and re-read */
	o.read_only = ro;
	o.snapshot = snap;
	struct qcow_image *img = NULL;
	int ret = qcow_image_open_io(io, &o, &img, err, errlen);
	return ret ? NULL : img;
}

/* A copy of the bytes of a memory backend. */
static uint8_t *bytes_of(struct qcow_io *io, size_t *len)
{
	const uint8_t *b = qcow_io_mem_data(io, len);
	uint8_t *c = malloc(*len ? *len : 1);
	memcpy(c, b, *len);
	return c;
}

/* The view (active, or snapshot key) of image bytes equals model. */
static bool view_equals(const uint8_t *bytes, size_t len, const char *key, const uint8_t *model, uint64_t size,
			const char *what)
{
	char err[256];
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	struct qcow_image *img = open_io(io, true, key, err, sizeof(err));
	if (!img) {
		CHECK(0, "%s: open view %s: %s", what, key ? key : "(active)", err);
		qcow_io_close(io);
		return false;
	}
	bool ok = qcow_image_size(img) == size;
	CHECK(ok, "%s: view %s has size %llu, expected %llu", what, key ? key : "(active)",
	      (unsigned long long)qcow_image_size(img), (unsigned long long)size);
	uint8_t *buf = malloc(size);
	if (ok && qcow_image_read(img, buf, size, 0) != (ssize_t)size)
		ok = false;
	if (ok && memcmp(buf, model, size)) {
		uint64_t i = 0;
		while (buf[i] == model[i])
			i++;
		CHECK(0, "%s: view %s differs first at byte %llu", what, key ? key : "(active)", (unsigned long long)i);
		ok = false;
	}
	free(buf);
	qcow_image_close(img);
	return ok;
}

static void check_clean(const uint8_t *bytes, size_t len, const char *what)
{
	struct qcow_check_result r;
	int qexit = 0;
	bool qemu = access("/usr/bin/qemu-img", X_OK) == 0;
	int ret = check_image_bytes(bytes, len, &r, qemu ? &qexit : NULL, NULL, 0);
	CHECK(ret == 0 && r.errors == 0, "%s: qcow_check: ret %d, %llu errors", what, ret, (unsigned long long)r.errors);
	if (qemu)
		CHECK(qexit == 0 || qexit == 3, "%s: qemu-img check exit %d", what, qexit);
}

static void random_writes(struct qcow_image *img, uint8_t *model, unsigned n)
{
	uint8_t *buf = malloc(256 << 10);
	for (unsigned i = 0; i < n; i++) {
		uint64_t off = tap_rand(&seed) % SIZE;
		uint64_t len = 1 + tap_rand(&seed) % (200 << 10);
		if (len > SIZE - off)
			len = SIZE - off;
		if (tap_rand(&seed) % 5 == 0) {
			REQUIRE(qcow_image_discard(img, off, len) == 0, "discard");
			memset(model + off, 0, len);
			continue;
		}
		for (uint64_t k = 0; k < len; k++)
			buf[k] = (uint8_t)tap_rand(&seed);
		REQUIRE(qcow_image_write(img, buf, len, off) == (ssize_t)len, "write");
		memcpy(model + off, buf, len);
	}
	free(buf);
}

/* ---- round trips ---------------------------------------------------------- */

static void round_trip(unsigned version, unsigned cb)
{
	char what[64], err[256];
	snprintf(what, sizeof(what), "v%u cluster %u", version, 1u << cb);
	size_t len;
	uint8_t *b0 = create_bytes(SIZE, cb, 4, version, &len);
	struct qcow_io *io = qcow_io_mem_new(b0, len);
	free(b0);
	struct qcow_image *img = open_io(io, false, NULL, err, sizeof(err));
	REQUIRE(img, "%s: open: %s", what, err);
	uint8_t *active = calloc(1, SIZE), *held[MAXSNAP];
	random_writes(img, active, 30);
	REQUIRE(qcow_snapshot_create(img, "one") == 0, "%s: create one", what);
	held[0] = malloc(SIZE);
	memcpy(held[0], active, SIZE);
	CHECK(qcow_snapshot_create(img, "one") == -EEXIST, "%s: a taken name is refused", what);
	random_writes(img, active, 30);
	REQUIRE(qcow_snapshot_create(img, "two") == 0, "%s: create two", what);
	held[1] = malloc(SIZE);
	memcpy(held[1], active, SIZE);
	random_writes(img, active, 30);

	struct qcow_snapshot_info *list;
	uint32_t n;
	REQUIRE(qcow_snapshot_list(img, &list, &n) == 0, "list");
	CHECK(n == 2 && !strcmp(list[0].name, "one") && !strcmp(list[1].name, "two") && !strcmp(list[0].id, "1") &&
	      !strcmp(list[1].id, "2") && list[1].disk_size == SIZE && list[0].vm_state_size == 0,
	      "%s: list shows both snapshots with QEMU's ids", what);
	free(list);
	pthread_mutex_lock(&img->lock);
	const char *inv = qcow_map_check(&img->map);
	pthread_mutex_unlock(&img->lock);
	CHECK(!inv, "%s: map after creates: %s", what, inv);
	REQUIRE(qcow_image_flush(img) == 0, "flush");

	size_t blen;
	uint8_t *bytes = bytes_of(io, &blen);
	check_clean(bytes, blen, what);
	view_equals(bytes, blen, NULL, active, SIZE, what);
	view_equals(bytes, blen, "one", held[0], SIZE, what);
	view_equals(bytes, blen, "2", held[1], SIZE, what);   /* by id */
	free(bytes);

	/* delete the first: the second and the active view are untouched */
	REQUIRE(qcow_snapshot_delete(img, "one") == 0, "%s: delete one", what);
	CHECK(qcow_snapshot_delete(img, "one") == -ENOENT, "%s: deleting it twice", what);
	random_writes(img, active, 10);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	bytes = bytes_of(io, &blen);
	check_clean(bytes, blen, what);
	view_equals(bytes, blen, NULL, active, SIZE, what);
	view_equals(bytes, blen, "two", held[1], SIZE, what);
	free(bytes);

	/* apply the second: the active view is it again (with its size: the
	 * disk grew meanwhile), the snapshot stays */
	REQUIRE(qcow_image_resize(img, SIZE * 4) == 0, "%s: grow", what);
	REQUIRE(qcow_snapshot_apply(img, "two") == 0, "%s: apply two", what);
	CHECK(qcow_image_size(img) == SIZE, "%s: after apply the disk has the snapshot's size (%llu)", what,
	      (unsigned long long)qcow_image_size(img));
	memcpy(active, held[1], SIZE);
	uint8_t *buf = malloc(SIZE);
	REQUIRE(qcow_image_read(img, buf, SIZE, 0) == (ssize_t)SIZE, "read");
	CHECK(!memcmp(buf, active, SIZE), "%s: after apply the live image reads the snapshot", what);
	free(buf);
	random_writes(img, active, 20);
	pthread_mutex_lock(&img->lock);
	inv = qcow_map_check(&img->map);
	pthread_mutex_unlock(&img->lock);
	CHECK(!inv, "%s: map after apply: %s", what, inv);
	CHECK(qcow_image_close(img) == 0, "%s: clean close", what);
	/* the memory backend was closed with the image: reopen from a copy
	 * is not possible, so the close above is the last step on io */
	free(active);
	free(held[0]);
	free(held[1]);
}

/* Apply, then delete everything: the image is back to one tree with
 * COPIED set everywhere (a reopen needs no repair) and the file can
 * shrink to what the active view holds. */
static void delete_all(void)
{
	char err[256];
	size_t len;
	uint8_t *b0 = create_bytes(SIZE, 16, 4, 3, &len);
	struct qcow_io *io = qcow_io_mem_new(b0, len);
	free(b0);
	struct qcow_image *img = open_io(io, false, NULL, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	uint8_t *active = calloc(1, SIZE);
	random_writes(img, active, 20);
	for (int i = 0; i < 3; i++) {
		char name[8];
		snprintf(name, sizeof(name), "s%d", i);
		REQUIRE(qcow_snapshot_create(img, name) == 0, "create %s", name);
		random_writes(img, active, 10);
	}
	REQUIRE(qcow_snapshot_delete(img, "s1") == 0, "delete s1");
	REQUIRE(qcow_snapshot_delete(img, "s0") == 0, "delete s0");
	REQUIRE(qcow_snapshot_delete(img, "s2") == 0, "delete s2");
	CHECK(!qcow_snapshot_any(img), "no snapshot left");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	size_t blen;
	uint8_t *bytes = bytes_of(io, &blen);
	check_clean(bytes, blen, "delete all");
	view_equals(bytes, blen, NULL, active, SIZE, "delete all");
	/* a read-write reopen finds nothing to repair: COPIED is back */
	struct qcow_io *io2 = qcow_io_mem_new(bytes, blen);
	struct qcow_image *img2 = open_io(io2, false, NULL, err, sizeof(err));
	REQUIRE(img2, "reopen: %s", err);
	pthread_mutex_lock(&img2->lock);
	bool repair = img2->map.rc_dirty.count || img2->cache.ndirty || img2->l1_dirty.count || img2->header_dirty;
	pthread_mutex_unlock(&img2->lock);
	CHECK(!repair, "delete all: the reopened image needs no repair (refcounts and COPIED exact)");
	qcow_image_close(img2);
	free(bytes);
	CHECK(qcow_image_close(img) == 0, "clean close");
	free(active);
}

/* 2-bit refcounts hold 3 references: the active tree and two snapshots.
 * A third create is refused with nothing changed (QEMU: ERANGE). */
static void refcount_width(void)
{
	char err[256];
	size_t len;
	uint8_t *b0 = create_bytes(SIZE, 16, 1, 3, &len);
	struct qcow_io *io = qcow_io_mem_new(b0, len);
	free(b0);
	struct qcow_image *img = open_io(io, false, NULL, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	uint8_t *active = calloc(1, SIZE);
	random_writes(img, active, 10);
	REQUIRE(qcow_snapshot_create(img, "a") == 0, "2-bit: create a");
	REQUIRE(qcow_snapshot_create(img, "b") == 0, "2-bit: create b");
	CHECK(qcow_snapshot_create(img, "c") == -ERANGE, "2-bit: a third snapshot is refused");
	CHECK(qcow_snapshot_apply(img, "a") == -ERANGE, "2-bit: an apply that needs a 4th reference is refused");
	random_writes(img, active, 10);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	CHECK(!(img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY), "2-bit: a refused create leaves no dirty bit");
	size_t blen;
	uint8_t *bytes = bytes_of(io, &blen);
	CHECK(!(bytes[79] & 1), "2-bit: the dirty bit is clear on disk");
	check_clean(bytes, blen, "2-bit refcounts");
	view_equals(bytes, blen, NULL, active, SIZE, "2-bit refcounts");
	free(bytes);
	struct qcow_snapshot_info *list;
	uint32_t n;
	REQUIRE(qcow_snapshot_list(img, &list, &n) == 0, "list");
	CHECK(n == 2, "2-bit: two snapshots, not %u", n);
	free(list);
	CHECK(qcow_image_close(img) == 0, "2-bit: clean close");
	free(active);
}

/* ---- moving snapshot tables down ------------------------------------------- */

static void relocate(void)
{
	char err[256];
	size_t len;
	uint8_t *active = calloc(1, SIZE), *held = calloc(1, SIZE);
	uint8_t *b0 = create_bytes(SIZE, 12, 4, 3, &len);
	struct qcow_io *io = qcow_io_mem_new(b0, len);
	free(b0);
	struct qcow_image *img = open_io(io, false, NULL, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	random_writes(img, active, 15);
	REQUIRE(qcow_snapshot_create(img, "a") == 0, "create a");
	REQUIRE(qcow_snapshot_create(img, "b") == 0, "create b");
	memcpy(held, active, SIZE);
	REQUIRE(qcow_snapshot_delete(img, "a") == 0, "delete a");
	{
		/* compaction moves them down by itself: on a copy */
		REQUIRE(qcow_image_flush(img) == 0, "flush");
		size_t clen;
		uint8_t *copy = bytes_of(io, &clen);
		struct qcow_image *img2 = open_io(qcow_io_mem_new(copy, clen), false, NULL, err, sizeof(err));
		free(copy);
		REQUIRE(img2, "open the copy: %s", err);
		struct qcow_snapshot_info *l0;
		uint32_t n0;
		REQUIRE(qcow_snapshot_list(img2, &l0, &n0) == 0 && n0 == 1, "list the copy");
		uint64_t l1_0 = l0[0].l1_offset, table_0 = img2->hdr.snapshots_offset;
		free(l0);
		REQUIRE(qcow_image_compact(img2, NULL, NULL) == 0, "compact the copy");
		REQUIRE(qcow_snapshot_list(img2, &l0, &n0) == 0 && n0 == 1, "list the copy");
		CHECK(l0[0].l1_offset < l1_0 || img2->hdr.snapshots_offset < table_0,
		      "compaction moved a snapshot table down (L1 0x%llx -> 0x%llx, table 0x%llx -> 0x%llx)",
		      (unsigned long long)l1_0, (unsigned long long)l0[0].l1_offset, (unsigned long long)table_0,
		      (unsigned long long)img2->hdr.snapshots_offset);
		free(l0);
		CHECK(qcow_image_close(img2) == 0, "close the copy");
	}
	img->compact_keeps_snapshot_tables = true;   /* this test moves them itself */
	REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact");
	img->compact_keeps_snapshot_tables = false;
	struct qcow_snapshot_info *list;
	uint32_t n;
	REQUIRE(qcow_snapshot_list(img, &list, &n) == 0 && n == 1, "list");
	uint64_t l1_before = list[0].l1_offset, table_before = img->hdr.snapshots_offset;
	free(list);
	int moved = 0, r;
	pthread_mutex_lock(&img->flush_lock);
	while ((r = qcow_snapshot_relocate(img)) == 1 && moved < 10)
		moved++;
	pthread_mutex_unlock(&img->flush_lock);
	CHECK(r == 0 && moved > 0, "relocate moved %d times, then returned %d", moved, r);
	REQUIRE(qcow_snapshot_list(img, &list, &n) == 0 && n == 1, "list");
	CHECK(list[0].l1_offset < l1_before || img->hdr.snapshots_offset < table_before,
	      "a snapshot table went down (L1 0x%llx -> 0x%llx, table 0x%llx -> 0x%llx)",
	      (unsigned long long)l1_before, (unsigned long long)list[0].l1_offset,
	      (unsigned long long)table_before, (unsigned long long)img->hdr.snapshots_offset);
	free(list);
	pthread_mutex_lock(&img->lock);
	const char *inv = qcow_map_check(&img->map);
	pthread_mutex_unlock(&img->lock);
	CHECK(!inv, "map after relocation: %s", inv);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	size_t blen;
	uint8_t *bytes = bytes_of(io, &blen);
	check_clean(bytes, blen, "relocate");
	view_equals(bytes, blen, NULL, active, SIZE, "relocate");
	view_equals(bytes, blen, "b", held, SIZE, "relocate");
	free(bytes);
	CHECK(qcow_image_close(img) == 0, "clean close");
	free(active);
	free(held);
}

/* ---- crashes ---------------------------------------------------------------- */

enum crash_op { OP_CREATE, OP_DELETE, OP_RELOCATE, OP_APPLY };
static const char *op_name[] = { "create", "delete", "relocate", "apply" };

/* Base image for a crash case: data, a snapshot "old" (its contents in
 * held_old), more data, all flushed; for relocation also a deleted
 * snapshot below "old" and everything erased. */
static unsigned crash_cb = 12;   /* cluster bits of the crash images */

static uint8_t *crash_base(enum crash_op op, size_t *len, uint8_t *active, uint8_t *held_old)
{
	char err[256];
	size_t l0;
	uint8_t *b0 = create_bytes(SIZE, crash_cb, 4, 3, &l0);
	struct qcow_io *io = qcow_io_mem_new(b0, l0);
	free(b0);
	struct qcow_image *img = open_io(io, false, NULL, err, sizeof(err));
	REQUIRE(img, "open: %s", err);
	random_writes(img, active, 10);
	if (op == OP_RELOCATE) {
		REQUIRE(qcow_snapshot_create(img, "gone") == 0, "create gone");
		random_writes(img, active, 3);
	}
	REQUIRE(qcow_snapshot_create(img, "old") == 0, "create old");
	memcpy(held_old, active, SIZE);
	random_writes(img, active, 10);
	if (op == OP_RELOCATE) {
		REQUIRE(qcow_snapshot_delete(img, "gone") == 0, "delete gone");
		img->compact_keeps_snapshot_tables = true;
		REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact");
	}
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	uint8_t *b = bytes_of(io, len);
	qcow_image_close(img);
	return b;
}

/* One crash case: the disk dies after k writes of the operation.
 * Returns true when the operation completed before the disk died. */
static bool crash_case(enum crash_op op, uint64_t k, const uint8_t *base, size_t blen, const uint8_t *active,
		       const uint8_t *held_old)
{
	char err[256], what[64];
	snprintf(what, sizeof(what), "%s crash after %llu writes", op_name[op], (unsigned long long)k);
	struct qcow_io *io = qcow_io_crash_new(base, blen);
	struct qcow_image *img = open_io(io, false, NULL, err, sizeof(err));
	REQUIRE(img, "%s: open: %s", what, err);
	if (op == OP_RELOCATE) {   /* the open made the free clusters Junk: erase them */
		img->compact_keeps_snapshot_tables = true;
		REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "%s: compact", what);
	}
	qcow_io_crash_die_after(io, k);
	int ret;
	if (op == OP_CREATE) {
		ret = qcow_snapshot_create(img, "new");
	} else if (op == OP_DELETE) {
		ret = qcow_snapshot_delete(img, "old");
	} else if (op == OP_APPLY) {
		ret = qcow_snapshot_apply(img, "old");
	} else {
		pthread_mutex_lock(&img->flush_lock);
		ret = qcow_snapshot_relocate(img);
		pthread_mutex_unlock(&img->flush_lock);
		if (ret == 1)
			ret = qcow_image_flush(img);   /* the old tables' refcounts */
		if (k == 1 && ret == 0)
			CHECK(0, "%s: nothing to relocate", what);
	}
	bool completed = ret >= 0;
	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(&seed));
	REQUIRE(after, "crash");
	qcow_image_close(img);

	/* reopen read-write (repairs), close, then check the bytes */
	struct qcow_image *img2 = open_io(after, false, NULL, err, sizeof(err));
	CHECK(img2 != NULL, "%s: the crashed image does not open: %s", what, err);
	if (!img2) {
		qcow_io_close(after);
		return true;
	}
	struct qcow_snapshot_info *list = NULL;
	uint32_t n = 0;
	CHECK(qcow_snapshot_list(img2, &list, &n) == 0, "%s: list", what);
	bool has_old = false, has_new = false;
	for (uint32_t i = 0; i < n; i++) {
		has_old |= !strcmp(list[i].name, "old");
		has_new |= !strcmp(list[i].name, "new");
	}
	free(list);
	CHECK(qcow_image_flush(img2) == 0, "%s: flush after reopen", what);
	size_t alen;
	uint8_t *bytes = bytes_of(after, &alen);
	check_clean(bytes, alen, what);
	/* the active view: apply may or may not have happened */
	if (op == OP_APPLY) {
		uint8_t *buf = malloc(SIZE);
		REQUIRE(qcow_image_read(img2, buf, SIZE, 0) == (ssize_t)SIZE, "read");
		CHECK(!memcmp(buf, active, SIZE) || !memcmp(buf, held_old, SIZE),
		      "%s: the active view is neither the old disk nor the snapshot", what);
		if (completed)
			CHECK(!memcmp(buf, held_old, SIZE), "%s: a completed apply shows the snapshot", what);
		free(buf);
	} else {
		view_equals(bytes, alen, NULL, active, SIZE, what);
	}
	/* a delete that failed after its header switch was durable is done */
	if (op != OP_DELETE)
		CHECK(has_old, "%s: snapshot 'old' is gone", what);
	else if (completed)
		CHECK(!has_old, "%s: a completed delete left 'old'", what);
	if (has_old)
		view_equals(bytes, alen, "old", held_old, SIZE, what);
	if (has_new)
		view_equals(bytes, alen, "new", active, SIZE, what);
	if (op == OP_CREATE && completed)
		CHECK(has_new, "%s: a completed create left no snapshot", what);
	free(bytes);
	CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
	return completed;
}

static void crashes(enum crash_op op)
{
	uint8_t *active = calloc(1, SIZE), *held_old = calloc(1, SIZE);
	size_t blen;
	uint8_t *base = crash_base(op, &blen, active, held_old);
	unsigned before = tap_failed;
	uint64_t k;
	for (k = 1; k < 400; k++) {
		/* several torn subsets of the unflushed writes per crash point */
		bool completed = false;
		for (int rep = 0; rep < 4; rep++)
			completed |= crash_case(op, k, base, blen, active, held_old);
		if (completed)
			break;
	}
	CHECK(k < 400, "%s: the operation never completed", op_name[op]);
	fprintf(stderr, "# snapshot %s (%u-byte clusters): crashed after each of its first %llu writes\n", op_name[op],
		1u << crash_cb, (unsigned long long)k - 1);
	CHECK(tap_failed == before, "%s: a crash at each of its %llu writes leaves a consistent image", op_name[op],
	      (unsigned long long)k);
	free(base);
	free(active);
	free(held_old);
}

/* ---- failed writes ----------------------------------------------------------
 *
 * The k-th pwrite of an operation fails once with EIO, for every k until
 * the operation no longer fails.  Whatever it returns, the close that
 * follows must be clean, the image check clean, the active view intact,
 * "old" intact (or, for a delete, gone or intact), and "new" present iff
 * listed.  A failure before the operation is published takes it back; one
 * after leaves it to the next flush (the switch stays pending). */
static void failed_writes(enum crash_op op)
{
	uint8_t *active = calloc(1, SIZE), *held_old = calloc(1, SIZE);
	size_t blen;
	uint8_t *base = crash_base(op, &blen, active, held_old);
	unsigned before = tap_failed;
	uint64_t k;
	for (k = 1; k < 200; k++) {
		char err[256], what[64];
		snprintf(what, sizeof(what), "%s, pwrite %llu fails", op_name[op], (unsigned long long)k);
		struct rec_io *rec = rec_new(base, blen);
		struct qcow_io *fio = qcow_io_fault_new(&rec->io);
		struct qcow_image *img = open_io(fio, false, NULL, err, sizeof(err));
		REQUIRE(img, "%s: open: %s", what, err);
		qcow_io_fault_arm(fio, QFAULT_PWRITE, k, -EIO);
		int ret = op == OP_CREATE ? qcow_snapshot_create(img, "new") :
			  op == OP_DELETE ? qcow_snapshot_delete(img, "old") : qcow_snapshot_apply(img, "old");
		bool fired = qcow_io_fault_fired(fio);
		qcow_io_fault_arm(fio, 0, 0, 0);
		CHECK(ret == 0 || fired, "%s: failed (%d) without a fault", what, ret);
		struct qcow_snapshot_info *list = NULL;
		uint32_t n = 0;
		REQUIRE(qcow_snapshot_list(img, &list, &n) == 0, "list");
		bool has_old = false;
		for (uint32_t i = 0; i < n; i++)
			has_old |= !strcmp(list[i].name, "old");
		free(list);
		uint8_t *buf = malloc(SIZE);
		REQUIRE(qcow_image_read(img, buf, SIZE, 0) == (ssize_t)SIZE, "read");
		bool applied = op == OP_APPLY && !memcmp(buf, held_old, SIZE);
		CHECK(op == OP_APPLY ? (applied || !memcmp(buf, active, SIZE)) : !memcmp(buf, active, SIZE),
		      "%s: the live view changed", what);
		CHECK(op != OP_APPLY || ret || applied, "%s: apply returned 0 but the view is not the snapshot", what);
		free(buf);
		CHECK(qcow_image_close(img) == 0, "%s: close after the failure", what);
		size_t alen;
		const uint8_t *ab = rec_bytes(rec, &alen);
		/* a failure inside the operation may leave the dirty bit: the
		 * next read-write open repairs, as after a crash */
		struct qcow_io *io2 = qcow_io_mem_new(ab, alen);
		struct qcow_image *img2 = open_io(io2, false, NULL, err, sizeof(err));
		CHECK(img2 != NULL, "%s: reopen: %s", what, err);
		if (!img2) {
			if (getenv("SNAPDBG"))
				test_spill("/tmp/snapdbg.qcow2", ab, alen);
			qcow_io_close(io2);
			rec_free(rec);
			continue;
		}
		CHECK(qcow_image_flush(img2) == 0, "%s: flush after reopen", what);
		uint8_t *bytes = bytes_of(io2, &alen);
		CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
		check_clean(bytes, alen, what);
		if (op == OP_APPLY && applied)
			view_equals(bytes, alen, NULL, held_old, SIZE, what);
		else
			view_equals(bytes, alen, NULL, active, SIZE, what);
		if (op != OP_DELETE || ret)
			CHECK(has_old || (op == OP_DELETE && ret), "%s: snapshot 'old' is gone", what);
		if (has_old)
			view_equals(bytes, alen, "old", held_old, SIZE, what);
		free(bytes);
		rec_free(rec);
		if (!fired)
			break;
	}
	CHECK(tap_failed == before, "%s: a failed write at each of its %llu writes is survived", op_name[op],
	      (unsigned long long)k);
	free(base);
	free(active);
	free(held_old);
}

int main(void)
{
	qcow_log_set_sink(quiet_sink, NULL);
	round_trip(3, 16);
	round_trip(3, 12);
	round_trip(2, 16);
	delete_all();
	refcount_width();
	relocate();
	crashes(OP_CREATE);
	crashes(OP_DELETE);
	crashes(OP_APPLY);
	crashes(OP_RELOCATE);
	/* 512-byte clusters: 128 L2 tables, L1 tables of two clusters (a
	 * torn L1 write is possible) */
	crash_cb = 9;
	crashes(OP_CREATE);
	crashes(OP_DELETE);
	crashes(OP_APPLY);
	crashes(OP_RELOCATE);
	crash_cb = 12;
	failed_writes(OP_CREATE);
	failed_writes(OP_DELETE);
	failed_writes(OP_APPLY);
	return tap_done();
}
