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
#include <string.h>

/* ---- open and close ----------------------------------------------------- */

struct build_ctx {
	struct qcow_image *img;
	struct qcow_bitmap fixed;   /* clusters of header structures */
	char *err;
	size_t errlen;
};

static const char *kind_name(enum qcow_ref_kind k)
{
	switch (k) {
	case QREF_HEADER: return "image header";
	case QREF_L1: return "L1 table";
	case QREF_REFTABLE: return "refcount table";
	case QREF_REFBLOCK: return "refcount block";
	case QREF_L2: return "L2 table";
	case QREF_DATA: return "data cluster";
	case QREF_SNAPSHOT_TABLE: return "snapshot table";
	case QREF_SNAPSHOT_L1: return "snapshot L1 table";
	case QREF_SNAPSHOT_L2: return "snapshot L2 table";
	case QREF_SNAPSHOT_DATA: return "snapshot data cluster";
	case QREF_COMPRESSED: return "compressed cluster";
	}
	return "?";
}

static int build_visit(void *opaque, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	struct build_ctx *b = opaque;
	struct qcow_map *m = &b->img->map;
	if (c >= m->nclusters) {
		/* a header structure may run past the end of the file: it
		 * reads as zeros there; the map must still cover it */
		if (qcow_map_resize(m, c + 1) || qcow_bitmap_resize(&b->fixed, c + 1))
			return -ENOMEM;
	}
	enum qcow_cstate s = qcow_map_state(m, c);
	bool used = s == QCS_REF || s == QCS_PINNED;
	switch (kind) {
	case QREF_HEADER: case QREF_L1: case QREF_REFTABLE: case QREF_SNAPSHOT_TABLE: case QREF_SNAPSHOT_L1:
		if (used && kind == QREF_SNAPSHOT_L1 && qcow_bitmap_test(&b->fixed, c)) {
			/* snapshots may share an L1 table copy: count it */
			qcow_map_add_ref(m, c, 0);
			return 0;
		}
		if (used) {
			qcow_set_error(b->err, b->errlen, "%s at offset 0x%" PRIx64 " overlaps another header structure",
				       kind_name(kind), c << b->img->cluster_bits);
			return -EINVAL;
		}
		qcow_map_set_pinned(m, c, 1);
		qcow_bitmap_set(&b->fixed, c);
		return 0;
	case QREF_REFBLOCK: case QREF_L2: case QREF_DATA:
		if (used) {
			qcow_set_error(b->err, b->errlen, "%s at offset 0x%" PRIx64 " (pointer at offset 0x%" PRIx64 ") is %s",
				       kind_name(kind), c << b->img->cluster_bits, slot,
				       qcow_bitmap_test(&b->fixed, c) ? "inside a header structure (L1, refcount or snapshot table)"
								      : "referenced twice");
			return -EINVAL;
		}
		qcow_map_set_ref(m, c, slot);
		return 0;
	case QREF_SNAPSHOT_L2: case QREF_SNAPSHOT_DATA: case QREF_COMPRESSED:
		if (qcow_bitmap_test(&b->fixed, c)) {
			qcow_set_error(b->err, b->errlen, "%s at offset 0x%" PRIx64 " (pointer at offset 0x%" PRIx64 ") lies inside a header structure",
				       kind_name(kind), c << b->img->cluster_bits, slot);
			return -EINVAL;
		}
		if (used)
			qcow_map_add_ref(m, c, slot);
		else
			qcow_map_set_pinned(m, c, 1);
		return 0;
	}
	return 0;
}

void qcow_open_opts_default(struct qcow_open_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->compact = true;
	o->recycler = true;
}

static void image_free(struct qcow_image *img)
{
	qcow_cache_free(&img->cache);
	qcow_map_free(&img->map);
	qcow_bitmap_free(&img->l1_dirty);
	qcow_bitmap_free(&img->reftable_dirty);
	qcow_free(img->l1);
	qcow_free(img->reftable);
	qcow_free(img->erased_list);
	qcow_header_free(&img->hdr);
	pthread_mutex_destroy(&img->lock);
	pthread_mutex_destroy(&img->flush_lock);
	pthread_cond_destroy(&img->inflight_done);
	pthread_cond_destroy(&img->truncate_done);
	pthread_cond_destroy(&img->recycler_wake);
	pthread_cond_destroy(&img->compact_done);
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

int qcow_image_open_io(struct qcow_io *io, const struct qcow_open_opts *opts_in,
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
	img->opts = opts;
	img->read_only = opts.read_only;
	pthread_mutex_init(&img->lock, NULL);
	pthread_mutex_init(&img->flush_lock, NULL);
	pthread_cond_init(&img->inflight_done, NULL);
	pthread_cond_init(&img->truncate_done, NULL);
	pthread_cond_init(&img->recycler_wake, NULL);
	pthread_cond_init(&img->compact_done, NULL);
	img->inflight_head.next = img->inflight_head.prev = &img->inflight_head;
	img->compact_progress = 1.0;

	int ret = qcow_header_read(io, &img->hdr, err, errlen);
	if (ret)
		goto fail;
	if (!img->read_only && (img->hdr.incompatible_features & QCOW_INCOMPAT_CORRUPT)) {
		qcow_set_error(err, errlen, "image is marked corrupt (incompatible feature bit 1 at header offset 72); "
			       "repair it with 'qemu-img check -r all' or mount it with -o ro");
		ret = -EACCES;
		goto fail;
	}
	img->cluster_bits = img->hdr.cluster_bits;
	img->cluster_size = 1ull << img->cluster_bits;
	img->l2_bits = img->cluster_bits - 3;
	img->rb_shift = img->cluster_bits + 3 - img->hdr.refcount_order;
	img->virtual_size = img->hdr.size;
	ret = load_tables(img, err, errlen);
	if (ret)
		goto fail;

	uint64_t file_clusters = (img->hdr.file_size + img->cluster_size - 1) >> img->cluster_bits;
	ret = qcow_map_init(&img->map, file_clusters, img->rb_shift);
	if (ret)
		goto fail_nomem;
	img->map.first_movable = 1;
	img->map.runtime_asserts = opts.runtime_asserts;
	struct build_ctx b = { .img = img, .err = err, .errlen = errlen };
	if (qcow_bitmap_init(&b.fixed, file_clusters))
		goto fail_nomem;
	struct qcow_scan_geometry g = { .io = io, .hdr = &img->hdr, .file_clusters = file_clusters };
	struct qcow_scan_visitor v = { .visit = build_visit, .opaque = &b };
	ret = qcow_scan(&g, &v, err, errlen);
	qcow_bitmap_free(&b.fixed);
	if (ret)
		goto fail;
	/* whatever nothing references is junk: it may hold anything */
	for (uint64_t c = qcow_map_lowest_available(&img->map); c != UINT64_MAX && c < file_clusters;
	     c = qcow_bitmap_next(&img->map.available, c + 1))
		qcow_map_set_state(&img->map, c, QCS_JUNK);
	/* a fresh map has nothing to write until the comparison says so */
	for (uint64_t i = 0; i < img->map.rc_dirty.nbits; i++)
		qcow_bitmap_clear(&img->map.rc_dirty, i);

	size_t cache_bytes = opts.cache_bytes ? opts.cache_bytes : QCOW_DEFAULT_CACHE_BYTES;
	if (qcow_cache_init(&img->cache, cache_bytes / img->cluster_size, img->cluster_size))
		goto fail_nomem;

	if (!img->read_only) {
		int64_t diff = qcow_refcounts_compare(img);
		if (diff < 0) {
			ret = (int)diff;
			qcow_set_error(err, errlen, "cannot read the refcount blocks: %s", strerror(-ret));
			goto fail;
		}
		bool repair = diff > 0;
		if (diff > 0)
			qcow_logf(QCOW_LOG_INFO, "%s: %" PRId64 " refcounts differ from the references%s; repairing",
				  io->name, diff, (img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY) ? " (image was dirty)" : "");
		if (img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY) {
			img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
			img->header_dirty = repair = true;
		}
		if (img->hdr.autoclear_features) {
			/* we keep no bitmaps or raw external data consistent */
			img->hdr.autoclear_features = 0;
			img->header_dirty = repair = true;
		}
		if (repair) {
			pthread_mutex_lock(&img->flush_lock);
			ret = qcow_flush_holding_flush_lock(img);
			pthread_mutex_unlock(&img->flush_lock);
			if (ret) {
				qcow_set_error(err, errlen, "cannot repair the image: %s", strerror(-ret));
				goto fail;
			}
		}
		img->punch_supported = probe_punch(io);
		if (opts.recycler) {
			ret = qcow_recycler_start(img);
			if (ret)
				goto fail;
		}
	}
	*out = img;
	return 0;
fail_nomem:
	ret = -ENOMEM;
	qcow_set_error(err, errlen, "out of memory while opening the image");
fail:
	img->io = NULL;
	image_free(img);
	return ret;
}

int qcow_image_open(const char *path, const struct qcow_open_opts *opts_in, struct qcow_image **out,
		    char *err, size_t errlen)
{
	struct qcow_open_opts opts;
	if (opts_in)
		opts = *opts_in;
	else
		qcow_open_opts_default(&opts);
	struct qcow_io *io;
	int ret = qcow_io_file_open(path, opts.read_only, &io);
	if (ret) {
		qcow_set_error(err, errlen, "%s", strerror(-ret));
		return ret;
	}
	if (!opts.no_locking && io->ops->lock) {
		ret = io->ops->lock(io, opts.read_only, err, errlen);
		if (ret) {
			qcow_io_close(io);
			return ret;
		}
	}
	ret = qcow_image_open_io(io, &opts, out, err, errlen);
	if (ret)
		qcow_io_close(io);
	return ret;
}

int qcow_image_close(struct qcow_image *img)
{
	int ret = 0;
	if (!img)
		return 0;
	qcow_recycler_stop(img);
	if (!img->read_only) {
		pthread_mutex_lock(&img->flush_lock);
		/* two flushes: the first completes moves whose pointers were
		 * rewritten, the second writes the refcounts that frees */
		ret = qcow_flush_holding_flush_lock(img);
		pthread_mutex_lock(&img->lock);
		qcow_retire_moves(img);
		pthread_mutex_unlock(&img->lock);
		int r = qcow_flush_holding_flush_lock(img);
		if (!ret)
			ret = r;
		if (!ret)
			ret = qcow_truncate_tail(img);
		if (!ret)
			ret = img->io->ops->flush(img->io);
		pthread_mutex_unlock(&img->flush_lock);
		if (!ret && img->last_error)
			ret = img->last_error;
	}
	qcow_io_close(img->io);
	img->io = NULL;
	image_free(img);
	return ret;
}

int64_t qcow_refcounts_compare(struct qcow_image *img)
{
	uint64_t cs = img->cluster_size;
	uint8_t *block = qcow_malloc(cs);
	if (!block)
		return -ENOMEM;
	int64_t differ = 0;
	uint64_t nblocks = ((img->map.nclusters ? img->map.nclusters - 1 : 0) >> img->rb_shift) + 1;
	/* blocks past the map matter only if they exist (leaks past EOF) */
	for (uint64_t b = nblocks; b < img->reftable_entries; b++)
		if (img->reftable[b])
			nblocks = b + 1;
	for (uint64_t b = 0; b < nblocks; b++) {
		uint64_t host = b < img->reftable_entries ? img->reftable[b] : 0;
		if (host) {
			int ret = img->io->ops->pread(img->io, block, cs, host);
			if (ret) {
				qcow_free(block);
				return ret;
			}
		} else {
			memset(block, 0, cs);
		}
		uint64_t first = b << img->rb_shift;
		bool dirty = false;
		for (uint64_t i = 0; i < (1ull << img->rb_shift); i++) {
			uint64_t disk = qcow_rc_get(block, img->hdr.refcount_order, i);
			uint64_t want = qcow_map_want_refcount(&img->map, first + i);
			if (disk != want) {
				differ++;
				dirty = true;
			}
		}
		if (dirty)
			qcow_map_mark_rc_dirty(&img->map, first);
	}
	qcow_free(block);
	return differ;
}
