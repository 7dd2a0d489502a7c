/*
 * qcow_open.c - opening and closing an image.
 *
 * Owns: opening = reading the header and the L1 and refcount tables,
 * building the cluster map with one metadata scan (qcow_scan), comparing
 * the on-disk refcounts with the map and repairing them (the first flush
 * writes every block that differs); closing = the final flushes and the
 * truncation of the free tail.
 * Rules: a refused image is left unchanged and the refusal names the
 * problem and its file offset; nothing is written before every check of
 * the open has passed.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- open and close ----------------------------------------------------- */

/* What the open learns about each cluster while building the map: the
 * class of its first user (to find overlaps between metadata and
 * anything else), and for pointers of the active tables whether COPIED
 * was set or clear (to judge and repair the flag). */
enum { CLS_NONE, CLS_HEADER, CLS_SNAP_L1, CLS_REFBLOCK, CLS_L2, CLS_DATA, CLS_BITMAP_DATA };
#define CLS_MASK 0x07
#define F_ACTIVE 0x08        /* an active L1 or L2 entry points here */
#define F_COPIED_SET 0x10
#define F_COPIED_CLEAR 0x20
#define F_BITMAP 0x40        /* a bitmap structure (freed when a read-write open drops stale bitmaps) */

struct build_ctx {
	struct qcow_image *img;
	uint8_t *cls;
	uint64_t ncls;
	bool rw;
	uint64_t overlap_c;          /* first overlap (rw refuses it) */
	enum qcow_ref_kind overlap_kind;
	uint64_t overlap_slot;
	bool overlapped;
	uint64_t tolerated;          /* overlaps a read-only open accepted */
	uint64_t copied_fixed;       /* COPIED flags set by the repair */
	char *err;
	size_t errlen;
};

static unsigned class_of(enum qcow_ref_kind k)
{
	switch (k) {
	case QREF_HEADER: case QREF_L1: case QREF_REFTABLE: case QREF_SNAPSHOT_TABLE:
	case QREF_BITMAP_DIR: case QREF_BITMAP_TABLE:
		return CLS_HEADER;
	case QREF_SNAPSHOT_L1: return CLS_SNAP_L1;
	case QREF_REFBLOCK: return CLS_REFBLOCK;
	case QREF_L2: case QREF_SNAPSHOT_L2: return CLS_L2;
	case QREF_DATA: case QREF_SNAPSHOT_DATA: case QREF_COMPRESSED: return CLS_DATA;
	case QREF_BITMAP_DATA: return CLS_BITMAP_DATA;
	}
	return CLS_NONE;
}

/* May a cluster already used as `old` also be reached as kind k?  Tables
 * and data are shared between the active tree and snapshots, compressed
 * streams share host clusters; metadata never shares with anything else,
 * and an active pointer is the only one of its kind. */
static bool may_share(uint8_t old, enum qcow_ref_kind k)
{
	switch (old & CLS_MASK) {
	case CLS_SNAP_L1: return k == QREF_SNAPSHOT_L1;
	case CLS_L2: return k == QREF_SNAPSHOT_L2 || (k == QREF_L2 && !(old & F_ACTIVE));
	case CLS_DATA:
		return k == QREF_SNAPSHOT_DATA || k == QREF_COMPRESSED || (k == QREF_DATA && !(old & F_ACTIVE));
	default: return false;
	}
}

static int grow_cls(struct build_ctx *b, uint64_t c)
{
	uint64_t n = c + 1 > b->ncls + b->ncls / 2 ? c + 1 : b->ncls + b->ncls / 2;
	uint8_t *p = qcow_realloc(b->cls, n);
	if (!p)
		return -ENOMEM;
	memset(p + b->ncls, 0, n - b->ncls);
	b->cls = p;
	b->ncls = n;
	return 0;
}

static int build_visit(void *opaque, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	struct build_ctx *b = opaque;
	struct qcow_map *m = &b->img->map;
	/* the map follows the clusters referenced (a table may also reach
	 * past the end of the file, where it reads as zeros) */
	if (c >= m->nclusters && qcow_map_resize(m, c + 1))
		return -ENOMEM;
	if (c >= b->ncls && grow_cls(b, c))
		return -ENOMEM;
	uint8_t old = b->cls[c];
	uint8_t flag = (kind == QREF_BITMAP_DIR || kind == QREF_BITMAP_TABLE || kind == QREF_BITMAP_DATA) ? F_BITMAP : 0;
	if (kind == QREF_L2 || kind == QREF_DATA)
		flag |= F_ACTIVE;
	if ((old & CLS_MASK) == CLS_NONE) {
		b->cls[c] = (uint8_t)(class_of(kind) | flag);
		/* a reference through an 8-byte pointer records its slot (the
		 * cluster can move: the pointer is rewritten); whole tables
		 * are pinned and move only as tables */
		if (slot && (kind == QREF_REFBLOCK || kind == QREF_L2 || kind == QREF_DATA || kind == QREF_SNAPSHOT_L2 ||
			     kind == QREF_SNAPSHOT_DATA || kind == QREF_COMPRESSED || kind == QREF_BITMAP_DATA))
			qcow_map_set_ref(m, c, slot);
		else
			qcow_map_set_pinned(m, c, 1);
		return 0;
	}
	if (!may_share(old, kind)) {
		/* a table inside the header, the L1 or refcount table or the
		 * snapshot table makes even reads wrong: refused always */
		unsigned oc = old & CLS_MASK, nc = class_of(kind);
		bool header = oc == CLS_HEADER || oc == CLS_SNAP_L1 || nc == CLS_HEADER || nc == CLS_SNAP_L1;
		if (b->rw || header) {
			b->overlapped = true;
			b->overlap_c = c;
			b->overlap_kind = kind;
			b->overlap_slot = slot;
			return -EEXIST;
		}
		b->tolerated++;   /* read-only: reads never touch the map */
	}
	b->cls[c] |= flag;
	return qcow_map_add_ref(m, c, slot);
}

static int build_copied(void *opaque, uint64_t c, bool copied, uint64_t slot)
{
	struct build_ctx *b = opaque;
	(void)slot;
	if (c < b->ncls)
		b->cls[c] |= copied ? F_COPIED_SET : F_COPIED_CLEAR;
	return 0;
}

/* The message for a refused overlap: both users, their pointers and the
 * cluster's offset. */
static void overlap_error(struct qcow_image *img, struct build_ctx *b, struct qcow_scan_geometry *g)
{
	enum qcow_ref_kind kind = QREF_HEADER;
	uint64_t slot = 0;
	(void)qcow_scan_first_user(g, b->overlap_c, &kind, &slot);
	char first[64] = "", second[64] = "";
	if (slot)
		snprintf(first, sizeof(first), " (pointer at offset 0x%" PRIx64 ")", slot);
	if (b->overlap_slot)
		snprintf(second, sizeof(second), " (pointer at offset 0x%" PRIx64 ")", b->overlap_slot);
	bool header = class_of(kind) == CLS_HEADER || class_of(kind) == CLS_SNAP_L1;
	qcow_set_error(b->err, b->errlen, "cluster at offset 0x%" PRIx64 " is referenced twice: as %s%s and as %s%s%s; "
		       "the image is corrupt (writing would destroy one of them): repair it with 'qemu-img check -r all' or open it read-only",
		       b->overlap_c << img->cluster_bits, qcow_ref_kind_name(kind), first,
		       qcow_ref_kind_name(b->overlap_kind), second,
		       header ? ", inside a header structure" : "");
}

/* The read-write open's verdict on the on-disk refcounts, the same as
 * qemu-img check's: a refcount below the references, a count the width
 * cannot hold, or COPIED disagreeing with "refcount is 1" is a
 * corruption, and the open refuses it (a dirty image excepted: its
 * refcounts are known to lag, QEMU repairs them at open and so do we). */
struct judge {
	struct build_ctx *b;
	bool lenient;               /* dirty image */
	bool refused;
};

static int judge_cluster(struct qcow_image *img, struct judge *j, uint64_t c, uint64_t disk, uint64_t want)
{
	uint64_t off = c << img->cluster_bits;
	uint8_t f = c < j->b->ncls ? j->b->cls[c] : 0;
	uint64_t max = qcow_rc_max(img->hdr.refcount_order);
	const char *why = NULL;
	char msg[160];
	if (want > max) {
		snprintf(msg, sizeof(msg), "has %" PRIu64 " references, more than the %u-bit refcounts hold", want,
			 1u << img->hdr.refcount_order);
		why = msg;
	} else if (j->lenient) {
		if ((f & F_COPIED_SET) && want != 1) {
			snprintf(msg, sizeof(msg), "is shared (%" PRIu64 " references) but an active entry has COPIED set", want);
			why = msg;
		}
	} else if (want > disk) {
		snprintf(msg, sizeof(msg), "has refcount %" PRIu64 " but %" PRIu64 " references", disk, want);
		why = msg;
	} else if ((f & F_COPIED_SET) && disk != 1) {
		snprintf(msg, sizeof(msg), "has COPIED set in an active entry but refcount %" PRIu64, disk);
		why = msg;
	} else if ((f & F_COPIED_CLEAR) && disk == 1) {
		snprintf(msg, sizeof(msg), "has refcount 1 but an active entry without COPIED");
		why = msg;
	}
	if (!why)
		return 0;
	j->refused = true;
	qcow_set_error(j->b->err, j->b->errlen, "cluster at offset 0x%" PRIx64 " %s; the image is corrupt (qemu-img check "
		       "reports it): repair it with 'qemu-img check -r all' or open it read-only", off, why);
	return -EINVAL;
}

/* Compares the on-disk refcounts with the map and marks differing blocks
 * dirty; returns the number of clusters that differ, or -errno.  Cost:
 * the blocks covering the map, plus the blocks present beyond it (one
 * read each, only checked for non-zero counts), never the range a
 * refcount-table entry could name. */
static int64_t compare_refcounts(struct qcow_image *img, struct judge *j)
{
	uint64_t cs = img->cluster_size;
	uint64_t per = 1ull << img->rb_shift;
	uint8_t *block = qcow_malloc(cs);
	if (!block)
		return -ENOMEM;
	int64_t differ = 0;
	uint64_t nblocks = ((img->map.nclusters ? img->map.nclusters - 1 : 0) >> img->rb_shift) + 1;
	uint64_t last = nblocks > img->reftable_entries ? nblocks : img->reftable_entries;
	for (uint64_t b = 0; b < last; b++) {
		uint64_t host = b < img->reftable_entries ? img->reftable[b] : 0;
		uint64_t first = b << img->rb_shift;
		if (b >= nblocks && !host)
			continue;   /* beyond the map: only present blocks matter */
		if (host) {
			int ret = img->io->ops->pread(img->io, block, cs, host);
			if (ret) {
				differ = ret;
				goto out;
			}
		} else {
			memset(block, 0, cs);
		}
		bool dirty = false;
		if (b >= nblocks) {
			/* counts of clusters past the file's end: QEMU never
			 * looks at them, but the file may grow over them */
			for (uint64_t k = 0; k < cs && !dirty; k++)
				dirty = block[k] != 0;
			if (dirty) {
				differ++;
				qcow_map_mark_rc_dirty(&img->map, first);
			}
			continue;
		}
		for (uint64_t i = 0; i < per; i++) {
			uint64_t disk = qcow_rc_get(block, img->hdr.refcount_order, i);
			uint64_t want = qcow_map_want_refcount(&img->map, first + i);
			if (j && first + i < img->map.nclusters && (want || disk) &&
			    judge_cluster(img, j, first + i, disk, want)) {
				differ = -EINVAL;
				goto out;
			}
			if (disk != want) {
				differ++;
				dirty = true;
			}
		}
		if (dirty)
			qcow_map_mark_rc_dirty(&img->map, first);
	}
out:
	qcow_free(block);
	return differ;
}

/* Sets COPIED on every active pointer to a cluster the map sees with
 * exactly one reference (REF: the entry holds the pointer's slot). */
static int fix_copied(struct qcow_image *img, struct build_ctx *b)
{
	uint64_t l1_lo = img->hdr.l1_table_offset, l1_hi = l1_lo + (uint64_t)img->hdr.l1_size * 8;
	for (uint64_t c = 0; c < b->ncls && c < img->map.nclusters; c++) {
		if (!(b->cls[c] & F_COPIED_CLEAR) || qcow_map_state(&img->map, c) != QCS_REF)
			continue;
		uint64_t slot = qcow_map_slot(&img->map, c);
		if (slot >= l1_lo && slot < l1_hi) {
			uint64_t idx = (slot - l1_lo) / 8;
			qcow_lock(img);
			qcow_l1_set(img, idx, img->l1[idx] | QCOW_OFLAG_COPIED);
			qcow_unlock(img);
		} else {
			int ret;
			if (qcow_cache_over_budget(&img->cache)) {
				ret = qcow_flush(img);
				if (ret)
					return ret;
			}
			/* no other thread runs yet; the table services' contract
			 * is the lock all the same */
			qcow_lock(img);
			struct qcow_cached *t = qcow_l2_get(img, slot >> img->cluster_bits, &ret);
			if (t) {
				uint64_t idx = qcow_l2_slot_index(img, slot);
				qcow_l2_set_entry(img, t, idx, qcow_l2_entry(img, t, idx) | QCOW_OFLAG_COPIED);
			}
			qcow_unlock(img);
			if (!t)
				return ret ? ret : -ENOMEM;
		}
		b->cls[c] &= (uint8_t)~F_COPIED_CLEAR;
		b->copied_fixed++;
	}
	return 0;
}

void qcow_open_opts_default(struct qcow_open_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->compact = true;
	o->recycler = true;
}

void qcow_backing_free(struct qcow_backing *b)
{
	if (!b)
		return;
	if (b->img)
		(void)qcow_image_close(b->img);   /* read-only: nothing to report */
	if (b->raw)
		qcow_io_close(b->raw);
	qcow_free(b->path);
	qcow_free(b);
}

static void image_free(struct qcow_image *img)
{
	qcow_backing_free(img->backing);
	qcow_datafile_close(img);
	qcow_cache_free(&img->cache);
	qcow_map_free(&img->map);
	qcow_bitmap_free(&img->l1_dirty);
	qcow_bitmap_free(&img->reftable_dirty);
	qcow_free(img->l1);
	qcow_free(img->reftable);
	qcow_u64_list_free(&img->erased);
	qcow_u64_list_free(&img->released);
	qcow_u64_list_free(&img->released_refs);
	qcow_header_free(&img->hdr);
	pthread_mutex_destroy(&img->lock);
	pthread_mutex_destroy(&img->flush_lock);
	pthread_mutex_destroy(&img->err_lock);
	pthread_cond_destroy(&img->inflight_done);
	pthread_cond_destroy(&img->truncate_done);
	pthread_cond_destroy(&img->recycler_wake);
	pthread_cond_destroy(&img->compact_done);
	pthread_cond_destroy(&img->claim_released);
	qcow_claims_free(img);
	qcow_free(img->pending_free);
	qcow_pbitmap_free(img);
	qcow_free(img);
}

static int load_tables(struct qcow_image *img, char *err, size_t errlen)
{
	uint64_t cs = img->cluster_size;
	uint64_t l1_clusters = ((uint64_t)img->hdr.l1_size * 8 + cs - 1) / cs;
	img->l1_capacity = (uint32_t)(l1_clusters * cs / 8);
	img->l1 = qcow_calloc(img->l1_capacity ? img->l1_capacity : 1, 8);
	img->reftable_entries = (uint64_t)img->hdr.refcount_table_clusters * cs / 8;
	img->reftable = qcow_calloc(img->reftable_entries, 8);
	if (!img->l1 || !img->reftable || qcow_bitmap_init(&img->l1_dirty, l1_clusters ? l1_clusters : 1) ||
	    qcow_bitmap_init(&img->reftable_dirty, img->hdr.refcount_table_clusters))
		return -ENOMEM;
	uint8_t *buf = qcow_malloc(img->reftable_entries * 8 > (uint64_t)img->hdr.l1_size * 8 ?
				   img->reftable_entries * 8 : (uint64_t)img->hdr.l1_size * 8 + 8);
	if (!buf)
		return -ENOMEM;
	int ret = img->io->ops->pread(img->io, buf, (size_t)img->hdr.l1_size * 8, img->hdr.l1_table_offset);
	for (uint32_t i = 0; ret == 0 && i < img->hdr.l1_size; i++)
		img->l1[i] = qcow_get_be64(buf + (size_t)i * 8);
	if (ret == 0)
		ret = img->io->ops->pread(img->io, buf, img->reftable_entries * 8, img->hdr.refcount_table_offset);
	for (uint64_t i = 0; ret == 0 && i < img->reftable_entries; i++)
		img->reftable[i] = qcow_get_be64(buf + i * 8) & QCOW_REFT_OFFSET_MASK;
	qcow_free(buf);
	if (ret)
		qcow_set_error(err, errlen, "cannot read the L1 or refcount table: %s", strerror(-ret));
	return ret;
}

static bool probe_punch(struct qcow_io *io)
{
	/* a punch past the end of the file changes nothing but tells
	 * whether the file system can punch at all */
	int64_t sz = io->ops->size(io);
	return io->ops->punch(io, (uint64_t)(sz > 0 ? sz : 0) + (1u << 20), 4096) == 0;
}

/* -o snapshot=NAME: a read-only image whose view is the snapshot's disk
 * (qcow_snapshot.c reads its L1 table in place of the active one). */
static int open_snapshot_view(struct qcow_image *img, const char *key, char *err, size_t errlen)
{
	if (!img->read_only) {
		qcow_set_error(err, errlen, "a snapshot can only be opened read-only");
		return -EINVAL;
	}
	return qcow_snapshot_load_view(img, key, err, errlen);
}

static int open_nomem(char *err, size_t errlen)
{
	qcow_set_error(err, errlen, "out of memory while opening the image");
	return -ENOMEM;
}

int qcow_image_open_io(struct qcow_io *io, const struct qcow_open_opts *opts_in,
		       struct qcow_image **out, char *err, size_t errlen)
{
	return qcow_image_open_io_backing(io, opts_in, NULL, out, err, errlen);
}

int qcow_image_open_io_backing(struct qcow_io *io, const struct qcow_open_opts *opts_in, struct qcow_backing *backing,
			       struct qcow_image **out, char *err, size_t errlen)
{
	struct qcow_open_opts opts;
	if (opts_in)
		opts = *opts_in;
	else
		qcow_open_opts_default(&opts);
	struct qcow_image *img = qcow_calloc(1, sizeof(*img));
	if (!img)
		return -ENOMEM;
	img->io = io;
	img->backing = backing;
	img->opts = opts;
	img->read_only = opts.read_only;
	pthread_mutex_init(&img->lock, NULL);
	pthread_mutex_init(&img->flush_lock, NULL);
	pthread_mutex_init(&img->err_lock, NULL);
	pthread_cond_init(&img->inflight_done, NULL);
	pthread_cond_init(&img->truncate_done, NULL);
	pthread_cond_init(&img->recycler_wake, NULL);
	pthread_cond_init(&img->compact_done, NULL);
	pthread_cond_init(&img->claim_released, NULL);
#ifdef QCOW_DEBUG
	img->lock_asserts = true;
#else
	img->lock_asserts = opts.runtime_asserts;
#endif
	img->inflight_head.next = img->inflight_head.prev = &img->inflight_head;
	img->compact_progress = 1.0;
	struct build_ctx b = { .img = img };

	int ret = qcow_header_read(io, &img->hdr, err, errlen);
	if (ret)
		goto out;
	if ((img->hdr.backing_file[0] || opts.backing) && !backing) {
		/* reads would show zeros where the backing file has data */
		qcow_set_error(err, errlen, "the image has a backing file (\"%s\" at header offset %" PRIu64 "), "
			       "which only an open by path can find", img->hdr.backing_file, img->hdr.backing_file_offset);
		ret = -ENOTSUP;
		goto out;
	}
	if (!img->read_only && (img->hdr.incompatible_features & QCOW_INCOMPAT_CORRUPT)) {
		qcow_set_error(err, errlen, "image is marked corrupt (incompatible feature bit 1 at header offset 72); "
			       "repair it with 'qemu-img check -r all' or mount it with -o ro");
		ret = -EACCES;
		goto out;
	}
	/* the data file before anything else: a missing one is refused
	 * before the image is touched */
	ret = qcow_datafile_open(img, err, errlen);
	if (ret)
		goto out;
	img->cluster_bits = img->hdr.cluster_bits;
	img->cluster_size = 1ull << img->cluster_bits;
	img->l2_bits = img->cluster_bits - qcow_l2_entry_shift(img);
	img->rb_shift = img->cluster_bits + 3 - img->hdr.refcount_order;
	/* QEMU counts the disk in whole 512-byte sectors: show what it shows */
	img->virtual_size = img->hdr.size & ~511ull;
	ret = load_tables(img, err, errlen);
	if (ret)
		goto out;

	uint64_t file_clusters = (img->hdr.file_size + img->cluster_size - 1) >> img->cluster_bits;
	/* the map starts empty and grows with the clusters referenced: a
	 * file that ends in a huge hole costs nothing */
	ret = qcow_map_init(&img->map, 1, img->rb_shift);
	if (ret) {
		ret = open_nomem(err, errlen);
		goto out;
	}
	img->map.first_movable = 1;
	img->map.runtime_asserts = opts.runtime_asserts;
	img->map.check_transitions = img->lock_asserts;
	b = (struct build_ctx){ .img = img, .rw = !img->read_only, .err = err, .errlen = errlen };
	struct qcow_scan_geometry g = { .io = io, .hdr = &img->hdr, .file_clusters = file_clusters,
					.tolerate_corruption = img->read_only };
	struct qcow_scan_visitor v = { .visit = build_visit, .copied = build_copied, .opaque = &b };
	ret = qcow_scan(&g, &v, err, errlen);
	if (ret == -EEXIST && b.overlapped) {
		overlap_error(img, &b, &g);
		ret = -EINVAL;
	}
	if (ret)
		goto out;
	if (b.tolerated || g.corruptions)
		qcow_logf(QCOW_LOG_WARNING, "%s: %" PRIu64 " overlapping references and %" PRIu64 " other corruptions "
			  "(qemu-img check reports them); read-only, so the image is used as it is",
			  io->name, b.tolerated, g.corruptions);
	/* whatever nothing references is junk: it may hold anything */
	for (uint64_t c = qcow_map_lowest_available(&img->map); c != UINT64_MAX;
	     c = qcow_bitmap_next(&img->map.available, c + 1))
		qcow_map_set_state(&img->map, c, QCS_JUNK);
	/* a fresh map has nothing to write until the comparison says so */
	for (uint64_t i = 0; i < img->map.rc_dirty.nbits; i++)
		qcow_bitmap_clear(&img->map.rc_dirty, i);
	/* the scan grew the map by half again at a time: give back the slack */
	qcow_map_fit(&img->map);
	/* the persistent bitmaps the scan found (and validated) */
	ret = qcow_pbitmap_open(img, err, errlen);
	if (ret)
		goto out;

	size_t cache_bytes = opts.cache_bytes ? opts.cache_bytes : QCOW_DEFAULT_CACHE_BYTES;
	if (qcow_cache_init(&img->cache, cache_bytes / img->cluster_size, img->cluster_size)) {
		ret = open_nomem(err, errlen);
		goto out;
	}

	if (opts.snapshot) {
		ret = open_snapshot_view(img, opts.snapshot, err, errlen);
		if (ret)
			goto out;
	}
	if (!img->read_only) {
		bool dirty = img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY;
		struct judge j = { .b = &b, .lenient = dirty };
		int64_t diff = compare_refcounts(img, &j);
		if (diff < 0) {
			ret = (int)diff;
			if (!j.refused)
				qcow_set_error(err, errlen, "cannot read the refcount blocks: %s", strerror(-ret));
			goto out;
		}
		/* COPIED exactly where the map sees one reference, as
		 * qemu-img check -r all leaves it (an interrupted snapshot
		 * deletion leaves it clear on clusters back to one user) */
		ret = fix_copied(img, &b);
		if (ret) {
			qcow_set_error(err, errlen, "cannot repair the COPIED flags: %s", strerror(-ret));
			goto out;
		}
		bool repair = diff > 0 || b.copied_fixed;
		if (diff > 0)
			qcow_logf(QCOW_LOG_INFO, "%s: %" PRId64 " refcounts differ from the references%s; repairing",
				  io->name, diff, dirty ? " (image was dirty)" : "");
		if (b.copied_fixed)
			qcow_logf(QCOW_LOG_INFO, "%s: %" PRIu64 " COPIED flags were clear on clusters with one reference; setting them",
				  io->name, b.copied_fixed);
		if (dirty) {
			img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
			img->header_dirty = repair = true;
		}
		/* a raw data file is kept raw (qcow_datafile.c), and the
		 * bitmaps consistent (qcow_persistent_bitmap.c): their bits
		 * stay */
		uint64_t keep = (img->data_raw ? QCOW_AUTOCLEAR_DATA_FILE_RAW : 0) | (qcow_pbitmap_present(img) ? 1 : 0);
		if (img->hdr.autoclear_features & ~keep) {
			/* unknown autoclear bits, or bitmaps without a directory:
			 * with bit 0 clear QEMU ignores the bitmaps, so their
			 * clusters are free */
			for (uint64_t c = 0; !(keep & 1) && c < b.ncls && c < img->map.nclusters; c++)
				if (b.cls[c] & F_BITMAP)
					qcow_map_set_state(&img->map, c, QCS_JUNK);
			img->hdr.autoclear_features &= keep;
			img->header_dirty = repair = true;
		}
		if (repair) {
			pthread_mutex_lock(&img->flush_lock);
			ret = qcow_flush_holding_flush_lock(img);
			pthread_mutex_unlock(&img->flush_lock);
			if (ret) {
				qcow_set_error(err, errlen, "cannot repair the image: %s", strerror(-ret));
				goto out;
			}
		}
		/* the file after the last referenced cluster is a free tail */
		uint64_t end = img->map.nclusters << img->cluster_bits;
		int64_t fsz = io->ops->size(io);
		if (fsz > 0 && (uint64_t)fsz > end) {
			ret = io->ops->truncate(io, end);
			if (ret) {
				qcow_set_error(err, errlen, "cannot cut the free tail of the file at %" PRIu64 ": %s", end, strerror(-ret));
				goto out;
			}
			img->hdr.file_size = end;
		}
		img->punch_supported = probe_punch(io);
		/* enabled bitmaps loaded and marked in use before any write */
		ret = qcow_pbitmap_load(img, err, errlen);
		if (ret)
			goto out;
		if (opts.recycler) {
			ret = qcow_recycler_start(img);
			if (ret)
				goto out;
		}
	}
	ret = 0;
out:
	qcow_free(b.cls);
	if (ret) {
		img->io = NULL;   /* the caller keeps its backend and chain */
		img->backing = NULL;
		image_free(img);
		return ret;
	}
	*out = img;
	return 0;
}

/* Opens one image of a backing chain read-only, over the chain below it
 * (lower, which it then owns): a qcow2 image with QEMU's read-only locks
 * (readers share it, writers are refused, as QEMU opens a backing file),
 * or a raw file with the same locks. */
static int backing_open(const struct qcow_chain_entry *e, struct qcow_backing *lower, const struct qcow_open_opts *top,
			struct qcow_backing **out, char *err, size_t errlen)
{
	char berr[512] = "";
	struct qcow_io *io = NULL;
	struct qcow_backing *b = qcow_calloc(1, sizeof(*b));
	int ret = -ENOMEM;
	if (!b || !(b->path = qcow_malloc(strlen(e->path) + 1)))
		goto out;
	strcpy(b->path, e->path);
	snprintf(b->format, sizeof(b->format), "%s", e->format);
	ret = qcow_io_file_open(e->path, true, &io);
	if (ret) {
		snprintf(berr, sizeof(berr), "%s", strerror(-ret));
		goto out;
	}
	if (!top->no_locking && io->ops->lock) {
		ret = io->ops->lock(io, true, berr, sizeof(berr));
		if (ret)
			goto out;
	}
	if (strcmp(e->format, "raw") == 0) {
		int64_t size = io->ops->size(io);
		if (size < 0) {
			ret = (int)size;
			snprintf(berr, sizeof(berr), "cannot read its size: %s", strerror(-ret));
			goto out;
		}
		b->raw = io;
		b->size = (uint64_t)size;
	} else {
		struct qcow_open_opts o;
		qcow_open_opts_default(&o);
		o.read_only = true;
		o.recycler = o.compact = false;
		o.no_locking = top->no_locking;
		o.cache_bytes = top->cache_bytes;
		ret = qcow_image_open_io_backing(io, &o, lower, &b->img, berr, sizeof(berr));
		if (ret)
			goto out;
		lower = NULL;   /* b->img owns it now */
		b->size = b->img->virtual_size;
	}
	io = NULL;
	*out = b;
	b = NULL;
	ret = 0;
out:
	if (ret) {
		if (berr[0])
			qcow_set_error(err, errlen, "backing file %s: %s", e->path, berr);
		else
			qcow_set_error(err, errlen, "backing file %s: %s", e->path, strerror(-ret));
	}
	if (io)
		qcow_io_close(io);
	qcow_backing_free(lower);
	qcow_backing_free(b);
	return ret;
}

/* Opens the chain below the top of `chain` (n entries), bottom first. */
static int open_chain(const struct qcow_chain_entry *chain, size_t n, const struct qcow_open_opts *top,
		      struct qcow_backing **out, char *err, size_t errlen)
{
	struct qcow_backing *lower = NULL;
	for (size_t i = n - 1; i >= 1; i--) {
		struct qcow_backing *b = NULL;
		int ret = backing_open(&chain[i], lower, top, &b, err, errlen);
		if (ret)
			return ret;   /* backing_open freed lower */
		lower = b;
	}
	*out = lower;
	return 0;
}

int qcow_image_open(const char *path, const struct qcow_open_opts *opts_in, struct qcow_image **out,
		    char *err, size_t errlen)
{
	struct qcow_open_opts opts;
	if (opts_in)
		opts = *opts_in;
	else
		qcow_open_opts_default(&opts);
	struct qcow_io *io = NULL;
	struct qcow_backing *backing = NULL;
	struct qcow_chain_entry *chain = NULL;
	size_t nchain = 0;
	int ret = qcow_io_file_open(path, opts.read_only, &io);
	if (ret) {
		qcow_set_error(err, errlen, "%s", strerror(-ret));
		return ret;
	}
	if (!opts.no_locking && opts.snapshot && opts.read_only && io->ops->lock_shared) {
		/* a snapshot view shares writes, as qemu-img -U does */
		ret = io->ops->lock_shared(io, err, errlen);
		if (ret) {
			qcow_io_close(io);
			return ret;
		}
	} else if (!opts.no_locking && io->ops->lock) {
		ret = io->ops->lock(io, opts.read_only, err, errlen);
		if (ret) {
			qcow_io_close(io);
			return ret;
		}
	}
	/* the chain after our own lock: a chain that loops back to this image
	 * is named as a loop, not as a lock conflict with ourselves */
	ret = qcow_chain_list(path, opts.backing, &chain, &nchain, err, errlen);
	if (ret == 0 && nchain > 1)
		ret = open_chain(chain, nchain, &opts, &backing, err, errlen);
	free(chain);
	if (ret == 0)
		ret = qcow_image_open_io_backing(io, &opts, backing, out, err, errlen);
	if (ret) {
		qcow_backing_free(backing);
		qcow_io_close(io);
	}
	return ret;
}

int qcow_image_close(struct qcow_image *img)
{
	int ret = 0;
	if (!img)
		return 0;
	qcow_recycler_stop(img);
	int bitmaps = 0;
	if (!img->read_only)
		bitmaps = qcow_pbitmap_store(img);   /* in_use cleared only when it works */
	if (!img->read_only) {
		pthread_mutex_lock(&img->flush_lock);
		/* flush until nothing is left to write: a flush completes moves
		 * and frees replaced clusters, whose refcounts the next one
		 * writes.  A flush that fails (a passing fault) is retried; only
		 * the last one's result counts, so a clean image closes cleanly
		 * and an unclean one never does. */
		for (int round = 0; round < 4; round++) {
			ret = qcow_flush_holding_flush_lock(img);
			pthread_mutex_lock(&img->lock);
			qcow_retire_moves(img);
			bool more = qcow_flush_needed(img);
			pthread_mutex_unlock(&img->lock);
			if (ret == -EIO && qcow_health_failed(img))
				break;
			if (ret == 0 && !more)
				break;
			if (ret == 0 && round == 3)
				ret = -EIO;   /* should not happen: say so rather than claim clean */
		}
		if (!ret)
			ret = qcow_truncate_tail(img);
		if (!ret)
			ret = img->io->ops->flush(img->io);
		pthread_mutex_unlock(&img->flush_lock);
		int failed = qcow_health_failed(img);
		if (failed)
			ret = failed;
		if (!ret && bitmaps)
			ret = bitmaps;
	}
	qcow_io_close(img->io);
	img->io = NULL;
	image_free(img);
	return ret;
}

int64_t qcow_refcounts_compare(struct qcow_image *img)
{
	return compare_refcounts(img, NULL);
}
