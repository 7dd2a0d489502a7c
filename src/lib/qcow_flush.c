/*
 * qcow_flush.c - the flush protocol and the refcount projection
 * (doc/design.md, "The flush protocol").
 *
 * Owns: writing dirty metadata, the on-disk refcounts, refcount block
 * allocation and refcount table growth.  On-disk refcounts are a
 * projection of the cluster map, written so that the image is consistent
 * at every instant:
 *
 *   snapshot (img->lock): allocate missing refcount blocks, compute the
 *       wanted refcount blocks, copy dirty L2 tables, L1 clusters, header;
 *       mark Erased -> Flushing and every live move "seen by this flush"
 *   1. write refcount blocks raised to max(on disk, wanted), and a new
 *      refcount table (then sync and switch the header to it)
 *   2. sync          data, erases, file growth and move copies are durable
 *                    (an external data file first: qcow_datafile_sync)
 *   3. write the L2 tables, L1 clusters and header fields
 *   4. sync          pointers durable
 *   5. write refcount blocks lowered to the wanted values (a crash here
 *      only leaks)
 *   finish (img->lock): Flushing -> Available, Copied -> Flushed,
 *       Referenced moves complete (source -> Junk)
 *
 * Rules: only code holding img->flush_lock writes metadata, so the disk
 * contents of refcount blocks change only here; syncs with nothing to
 * order are skipped; on an I/O error everything taken by the snapshot is
 * marked dirty again and no state advances.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

struct rb_item {
	uint64_t index;      /* refcount table index */
	uint64_t host;       /* byte offset of the block */
	uint8_t *want;
};

struct l2_item {
	struct qcow_cached *entry;
	uint64_t host;
	uint8_t *copy;
};

struct flush_plan {
	struct rb_item *rb;
	size_t nrb;
	struct l2_item *l2;
	size_t nl2;
	/* L1 and refcount table clusters; reftable ones go out in step 1,
	 * L1 ones (pointers) in step 3 */
	struct { uint64_t off; uint8_t *copy; size_t len; bool reftable; } *meta;
	size_t nmeta;
	uint8_t header[QCOW_V3_MIN_HEADER_LEN];
	unsigned header_len;
	bool write_header;
	bool data_dirty;
	/* the header's refcount table fields must be written in step 1 */
	bool switch_reftable;
	/* old table clusters to free once the header written here is durable */
	struct qcow_extent *pending_free;
	size_t npending_free;
	struct qcow_u64_list erased;
	/* replaced clusters that become Junk when this flush ends */
	struct qcow_u64_list released;
	/* (cluster, slot) pairs whose reference goes when this flush ends */
	struct qcow_u64_list released_refs;
};

static void plan_free(struct flush_plan *p)
{
	for (size_t i = 0; i < p->nrb; i++)
		qcow_free(p->rb[i].want);
	for (size_t i = 0; i < p->nl2; i++)
		qcow_free(p->l2[i].copy);
	for (size_t i = 0; i < p->nmeta; i++)
		qcow_free(p->meta[i].copy);
	qcow_free(p->rb);
	qcow_free(p->l2);
	qcow_free(p->meta);
	qcow_u64_list_free(&p->erased);
	qcow_u64_list_free(&p->released);
	qcow_u64_list_free(&p->released_refs);
	qcow_free(p->pending_free);
}

static bool block_has_refs(struct qcow_image *img, uint64_t b)
{
	uint64_t first = b << img->rb_shift;
	uint64_t n = 1ull << img->rb_shift;
	for (uint64_t c = first; c < first + n && c < img->map.nclusters; c++)
		if (qcow_map_want_refcount(&img->map, c))
			return true;
	return false;
}

int qcow_pending_free_add(struct qcow_image *img, uint64_t first, uint64_t n)
{
	qcow_assert_locked(img);
	struct qcow_extent *p = qcow_realloc(img->pending_free, (img->pending_free_len + 1) * sizeof(*p));
	if (!p)
		return -ENOMEM;
	img->pending_free = p;
	p[img->pending_free_len++] = (struct qcow_extent){ .first = first, .n = n };
	return 0;
}

/* Replaces the refcount table by a bigger one covering `need` blocks.
 * The switch is pending until a flush has written it (step 1); the old
 * table stays allocated until then. */
static int grow_reftable(struct qcow_image *img, uint64_t need)
{
	uint64_t cs = img->cluster_size;
	uint64_t old_clusters = img->hdr.refcount_table_clusters;
	uint64_t clusters = (need * 8 + cs - 1) / cs;
	if (clusters < old_clusters * 2)
		clusters = old_clusters * 2;   /* generous: moves are expensive */
	if (clusters * cs > QCOW_MAX_REFTABLE_BYTES)
		clusters = QCOW_MAX_REFTABLE_BYTES / cs;
	if (clusters * cs / 8 < need)
		return -EFBIG;
	uint64_t start;
	int ret = qcow_alloc_contiguous(img, clusters, &start);
	if (ret)
		return ret;
	uint64_t entries = clusters * cs / 8;
	uint64_t *t = qcow_calloc(entries, 8);
	if (!t || qcow_bitmap_resize(&img->reftable_dirty, clusters)) {
		qcow_free(t);
		for (uint64_t i = 0; i < clusters; i++)
			qcow_map_set_state(&img->map, start + i, QCS_AVAILABLE);
		return -ENOMEM;
	}
	if (qcow_pending_free_add(img, img->hdr.refcount_table_offset >> img->cluster_bits, old_clusters)) {
		qcow_free(t);
		for (uint64_t i = 0; i < clusters; i++)
			qcow_map_set_state(&img->map, start + i, QCS_AVAILABLE);
		return -ENOMEM;
	}
	memcpy(t, img->reftable, img->reftable_entries * 8);
	img->reftable_switch_pending = true;
	qcow_free(img->reftable);
	uint64_t old_off = img->hdr.refcount_table_offset, old_len = img->reftable_entries * 8;
	img->reftable = t;
	img->reftable_entries = entries;
	img->hdr.refcount_table_offset = start << img->cluster_bits;
	img->hdr.refcount_table_clusters = (uint32_t)clusters;
	for (uint64_t i = 0; i < clusters; i++)
		qcow_map_set_pinned(&img->map, start + i, 1);
	qcow_reftable_rehome(img, old_off, old_len, clusters);
	qcow_logf(QCOW_LOG_DEBUG, "refcount table grows to %" PRIu64 " clusters at 0x%" PRIx64,
		  clusters, img->hdr.refcount_table_offset);
	return 0;
}

/* Gives every dirty refcount block with something to count a home,
 * growing the refcount table if needed; repeats until nothing changes,
 * since new blocks and tables need counting themselves. */
static int ensure_refblocks(struct qcow_image *img)
{
	bool changed = true;
	while (changed) {
		changed = false;
		uint64_t need = 0;
		for (uint64_t b = qcow_bitmap_next(&img->map.rc_dirty, 0); b != UINT64_MAX;
		     b = qcow_bitmap_next(&img->map.rc_dirty, b + 1)) {
			if (b < img->reftable_entries && img->reftable[b])
				continue;
			if (!block_has_refs(img, b))
				continue;
			if (b >= img->reftable_entries) {
				need = b + 1 > need ? b + 1 : need;
				continue;
			}
			uint64_t c;
			int ret = qcow_alloc_cluster(img, &c);
			if (ret)
				return ret;
			qcow_map_set_ref(&img->map, c, img->hdr.refcount_table_offset + b * 8);
			img->reftable[b] = c << img->cluster_bits;
			qcow_bitmap_set(&img->reftable_dirty, (b * 8) >> img->cluster_bits);
			changed = true;
		}
		if (need) {
			int ret = grow_reftable(img, need);
			if (ret)
				return ret;
			changed = true;
		}
	}
	return 0;
}

static int plan_meta(struct flush_plan *p, bool reftable, uint64_t off, const uint64_t *table,
		     uint64_t first_entry, uint64_t entries, size_t len)
{
	void *m = qcow_realloc(p->meta, (p->nmeta + 1) * sizeof(*p->meta));
	if (!m)
		return -ENOMEM;
	p->meta = m;
	uint8_t *copy = qcow_calloc(1, len);
	if (!copy)
		return -ENOMEM;
	for (uint64_t i = 0; i < entries; i++)
		qcow_put_be64(copy + i * 8, table[first_entry + i]);
	p->meta[p->nmeta].off = off;
	p->meta[p->nmeta].copy = copy;
	p->meta[p->nmeta].len = len;
	p->meta[p->nmeta].reftable = reftable;
	p->nmeta++;
	return 0;
}

/* Takes everything a flush has to write, under img->lock. */
static int take_snapshot(struct qcow_image *img, struct flush_plan *p)
{
	qcow_assert_locked(img);
	uint64_t cs = img->cluster_size;
	int ret = ensure_refblocks(img);
	if (ret)
		return ret;

	/* The blocks about to be written change on disk, so a move copying one
	 * of them is stale.  Cancelling a move changes its destination's
	 * wanted refcount (and may dirty another block), so cancel first,
	 * until nothing more is cancelled, and only then compute the blocks. */
	for (bool cancelled = true; cancelled;) {
		cancelled = false;
		for (uint64_t b = qcow_bitmap_next(&img->map.rc_dirty, 0); b != UINT64_MAX;
		     b = qcow_bitmap_next(&img->map.rc_dirty, b + 1)) {
			if (b >= img->reftable_entries || !img->reftable[b])
				continue;
			struct qcow_move *mv = qcow_map_move_find(&img->map, img->reftable[b] >> img->cluster_bits);
			if (mv && mv->state != QMOVE_REFERENCED) {
				qcow_map_move_cancel(&img->map, mv->src);
				cancelled = true;
			}
		}
	}

	/* refcount blocks */
	size_t cap = (size_t)img->map.rc_dirty.count;
	p->rb = qcow_calloc(cap ? cap : 1, sizeof(*p->rb));
	if (!p->rb)
		return -ENOMEM;
	uint64_t max = qcow_rc_max(img->hdr.refcount_order);
	for (uint64_t b = qcow_bitmap_next(&img->map.rc_dirty, 0); b != UINT64_MAX;
	     b = qcow_bitmap_next(&img->map.rc_dirty, b + 1)) {
		if (b >= img->reftable_entries || !img->reftable[b])
			continue;   /* nothing to count there (ensure_refblocks) */
		uint8_t *want = qcow_calloc(1, cs);
		if (!want)
			return -ENOMEM;
		uint64_t first = b << img->rb_shift;
		for (uint64_t i = 0; i < (1ull << img->rb_shift) && first + i < img->map.nclusters; i++) {
			uint64_t v = qcow_map_want_refcount(&img->map, first + i);
			if (v > max) {
				qcow_logf(QCOW_LOG_ERROR, "refcount of cluster %" PRIu64 " (%" PRIu64 ") exceeds the image's refcount width",
					  first + i, v);
				v = max;
			}
			if (v)
				qcow_rc_set(want, img->hdr.refcount_order, i, v);
		}
		p->rb[p->nrb++] = (struct rb_item){ .index = b, .host = img->reftable[b], .want = want };
	}
	/* all taken (blocks skipped above had nothing to count) */
	for (uint64_t b = qcow_bitmap_next(&img->map.rc_dirty, 0); b != UINT64_MAX;
	     b = qcow_bitmap_next(&img->map.rc_dirty, b + 1))
		qcow_bitmap_clear(&img->map.rc_dirty, b);

	/* refcount table clusters */
	for (uint64_t k = qcow_bitmap_next(&img->reftable_dirty, 0); k != UINT64_MAX;
	     k = qcow_bitmap_next(&img->reftable_dirty, k + 1)) {
		ret = plan_meta(p, true, img->hdr.refcount_table_offset + k * cs, img->reftable, k * cs / 8, cs / 8, cs);
		if (ret)
			return ret;
		qcow_bitmap_clear(&img->reftable_dirty, k);
	}
	/* L1 clusters: only the entries up to l1_size are the table; the
	 * rest of the cluster is zero (it is ours) */
	for (uint64_t k = qcow_bitmap_next(&img->l1_dirty, 0); k != UINT64_MAX;
	     k = qcow_bitmap_next(&img->l1_dirty, k + 1)) {
		uint64_t first = k * cs / 8;
		uint64_t n = cs / 8;
		if (first + n > img->l1_capacity)
			n = img->l1_capacity - first;
		ret = plan_meta(p, false, img->hdr.l1_table_offset + k * cs, img->l1, first, n, cs);
		if (ret)
			return ret;
		qcow_bitmap_clear(&img->l1_dirty, k);
	}
	/* a refcount table switch still to be written, and the old tables
	 * that may be freed once the header written here is durable */
	p->switch_reftable = img->reftable_switch_pending;
	img->reftable_switch_pending = false;
	if (img->pending_free_len && (img->header_dirty || p->switch_reftable)) {
		p->pending_free = img->pending_free;
		p->npending_free = img->pending_free_len;
		img->pending_free = NULL;
		img->pending_free_len = 0;
	}
	/* header fields */
	if (img->header_dirty) {
		qcow_header_encode(&img->hdr);
		p->header_len = img->hdr.version >= 3 ? QCOW_V3_MIN_HEADER_LEN : QCOW_V2_HEADER_LEN;
		memcpy(p->header, img->hdr.raw, p->header_len);
		p->write_header = true;
		img->header_dirty = false;
	}
	/* L2 tables */
	size_t nd = img->cache.ndirty;
	p->l2 = qcow_calloc(nd ? nd : 1, sizeof(*p->l2));
	if (!p->l2)
		return -ENOMEM;
	for (size_t i = 0; i < img->cache.nslots && p->nl2 < nd; i++) {
		struct qcow_cached *e = img->cache.slots[i];
		if (!e->valid || !e->dirty)
			continue;
		uint8_t *copy = qcow_malloc(cs);
		if (!copy)
			return -ENOMEM;
		memcpy(copy, e->data, cs);
		qcow_cache_set_dirty(&img->cache, e, false);
		/* a miss must not reload it from disk while the old contents
		 * are being written */
		qcow_cache_pin(&img->cache, e);
		p->l2[p->nl2++] = (struct l2_item){ .entry = e, .host = e->cluster << img->cluster_bits, .copy = copy };
	}
	/* erased clusters become available when this flush ends */
	qcow_u64_list_take(&img->erased, &p->erased);
	for (size_t i = 0; i < p->erased.len; i++)
		if (p->erased.v[i] < img->map.nclusters && qcow_map_state(&img->map, p->erased.v[i]) == QCS_ERASED)
			qcow_map_set_state(&img->map, p->erased.v[i], QCS_FLUSHING);
	/* clusters replaced before this snapshot: free once it is durable */
	qcow_u64_list_take(&img->released, &p->released);
	qcow_u64_list_take(&img->released_refs, &p->released_refs);
	for (unsigned i = 0; i < img->map.nmoves_cap; i++) {
		struct qcow_move *mv = &img->map.moves[i];
		if (mv->in_use && !mv->cancelled && (mv->state == QMOVE_COPIED || mv->state == QMOVE_REFERENCED))
			mv->flush_seen = true;
	}
	p->data_dirty = img->data_dirty;
	img->data_dirty = false;
	return 0;
}

/* Puts everything the snapshot took back, after a failed flush. */
static void undo_snapshot(struct qcow_image *img, struct flush_plan *p)
{
	qcow_assert_locked(img);
	for (size_t i = 0; i < p->nrb; i++)
		qcow_bitmap_set(&img->map.rc_dirty, p->rb[i].index);
	for (size_t i = 0; i < p->nl2; i++) {
		struct qcow_cached *e = p->l2[i].entry;
		if (e->valid && (e->cluster << img->cluster_bits) == p->l2[i].host)
			qcow_cache_set_dirty(&img->cache, e, true);
	}
	for (size_t i = 0; i < p->nmeta; i++) {
		uint64_t off = p->meta[i].off;
		if (p->meta[i].reftable)
			qcow_bitmap_set(&img->reftable_dirty, (off - img->hdr.refcount_table_offset) >> img->cluster_bits);
		else
			qcow_bitmap_set(&img->l1_dirty, (off - img->hdr.l1_table_offset) >> img->cluster_bits);
	}
	if (p->write_header)
		img->header_dirty = true;
	if (p->switch_reftable)
		img->reftable_switch_pending = true;
	for (size_t i = 0; i < p->npending_free; i++)
		if (qcow_pending_free_add(img, p->pending_free[i].first, p->pending_free[i].n))
			qcow_logf(QCOW_LOG_WARNING, "out of memory: an old table at cluster %" PRIu64 " stays allocated (a leak)",
				  p->pending_free[i].first);
	if (p->data_dirty)
		img->data_dirty = true;
	for (size_t i = 0; i < p->erased.len; i++) {
		uint64_t c = p->erased.v[i];
		if (c < img->map.nclusters && qcow_map_state(&img->map, c) == QCS_FLUSHING)
			qcow_map_set_state(&img->map, c, QCS_JUNK);   /* erase again: safest */
	}
	/* still Pending: back in the list for the next flush (without memory
	 * they stay Pending, a leak until the next open) */
	for (size_t i = 0; i < p->released.len; i++)
		(void)qcow_released_add(img, p->released.v[i]);
	for (size_t i = 0; i + 1 < p->released_refs.len; i += 2)
		if (qcow_u64_list_add(&img->released_refs, p->released_refs.v[i]) == 0 &&
		    qcow_u64_list_add(&img->released_refs, p->released_refs.v[i + 1]) != 0)
			img->released_refs.len--;   /* the pair stays whole or goes: a leak until reopen */
	for (unsigned i = 0; i < img->map.nmoves_cap; i++)
		img->map.moves[i].flush_seen = false;
}

static void finish_flush(struct qcow_image *img, struct flush_plan *p)
{
	qcow_assert_locked(img);
	for (size_t i = 0; i < p->erased.len; i++) {
		uint64_t c = p->erased.v[i];
		if (c < img->map.nclusters && qcow_map_state(&img->map, c) == QCS_FLUSHING)
			qcow_map_set_state(&img->map, c, QCS_AVAILABLE);
	}
	for (size_t i = 0; i < p->released.len; i++) {
		uint64_t c = p->released.v[i];
		if (c < img->map.nclusters && qcow_map_state(&img->map, c) == QCS_PENDING)
			qcow_map_set_state(&img->map, c, QCS_JUNK);
	}
	for (size_t i = 0; i + 1 < p->released_refs.len; i += 2) {
		uint64_t c = p->released_refs.v[i], slot = p->released_refs.v[i + 1];
		if (c < img->map.nclusters && qcow_map_has_ref(&img->map, c, slot))
			qcow_map_drop_ref(&img->map, c, slot);
	}
	for (unsigned i = 0; i < img->map.nmoves_cap; i++) {
		struct qcow_move *mv = &img->map.moves[i];
		if (!mv->in_use || mv->cancelled || !mv->flush_seen)
			continue;
		if (mv->state == QMOVE_COPIED)
			qcow_map_move_set_state(&img->map, mv, QMOVE_FLUSHED);
		else if (mv->state == QMOVE_REFERENCED)
			qcow_map_move_complete(&img->map, mv);
	}
	for (size_t i = 0; i < p->npending_free; i++)
		for (uint64_t k = 0; k < p->pending_free[i].n; k++)
			qcow_map_drop_ref(&img->map, p->pending_free[i].first + k, 0);
}

/* A sync that fails may have lost writes the kernel already dropped
 * (a later sync can then succeed without them): the engine can no longer
 * be sure of the image and stops writing (qcow_health.c). */
static int sync_or_fail(struct qcow_image *img)
{
	int ret = img->io->ops->flush(img->io);
	if (ret)
		qcow_set_failed(img, ret, "sync");
	return ret;
}

static int write_refblocks_up(struct qcow_image *img, struct flush_plan *p, uint8_t **finals_needed, bool *wrote)
{
	uint64_t cs = img->cluster_size;
	uint8_t *disk = qcow_malloc(cs), *up = qcow_malloc(cs);
	int ret = (!disk || !up) ? -ENOMEM : 0;
	for (size_t i = 0; i < p->nrb && ret == 0; i++) {
		ret = img->io->ops->pread(img->io, disk, cs, p->rb[i].host);
		if (ret)
			break;
		bool raise = qcow_rc_merge_up(up, disk, p->rb[i].want, img->hdr.refcount_order, 1ull << img->rb_shift);
		if (raise) {
			ret = img->io->ops->pwrite(img->io, up, cs, p->rb[i].host);
			*wrote = true;
		}
		/* step 5 is needed where the wanted block is below what step 1
		 * leaves on disk */
		finals_needed[i] = memcmp(raise ? up : disk, p->rb[i].want, cs) ? p->rb[i].want : NULL;
	}
	qcow_free(disk);
	qcow_free(up);
	return ret;
}

int qcow_flush_holding_flush_lock(struct qcow_image *img)
{
	qcow_assert_flush_locked(img);
	struct flush_plan p;
	struct qcow_io *io = img->io;
	uint8_t **finals = NULL;
	bool wrote = false;
	int ret;

	if (img->read_only)
		return 0;
	memset(&p, 0, sizeof(p));
	if (qcow_health_failed(img))
		return -EIO;   /* nothing more may be written: see qcow_health.c */
	pthread_mutex_lock(&img->lock);
	ret = take_snapshot(img, &p);
	pthread_mutex_unlock(&img->lock);
	if (ret)
		goto out;

	/* 1. raise refcounts (and publish a new refcount table) */
	finals = qcow_calloc(p.nrb ? p.nrb : 1, sizeof(*finals));
	if (!finals) {
		ret = -ENOMEM;
		goto out;
	}
	ret = write_refblocks_up(img, &p, finals, &wrote);
	for (size_t i = 0; ret == 0 && i < p.nmeta; i++) {
		if (!p.meta[i].reftable)
			continue;
		ret = io->ops->pwrite(io, p.meta[i].copy, p.meta[i].len, p.meta[i].off);
		wrote = true;
	}
	if (ret == 0 && p.switch_reftable) {
		/* the new table and its blocks durable, then the header */
		ret = sync_or_fail(img);
		if (ret == 0)
			ret = qcow_header_write_fields(io, &img->hdr, QH_REFTABLE_OFFSET, 12);
	}
	/* 2. everything the pointers will point to is durable */
	bool pointers = p.nl2 || p.write_header;
	for (size_t i = 0; i < p.nmeta; i++)
		if (!p.meta[i].reftable)
			pointers = true;
	if (ret == 0 && p.data_dirty)
		ret = qcow_datafile_sync(img);   /* the data the pointers show, in its own file */
	if (ret == 0 && (wrote || p.data_dirty || pointers || p.switch_reftable))
		ret = sync_or_fail(img);
	/* 3. pointers */
	for (size_t i = 0; ret == 0 && i < p.nl2; i++)
		ret = io->ops->pwrite(io, p.l2[i].copy, img->cluster_size, p.l2[i].host);
	for (size_t i = 0; ret == 0 && i < p.nmeta; i++)
		if (!p.meta[i].reftable)
			ret = io->ops->pwrite(io, p.meta[i].copy, p.meta[i].len, p.meta[i].off);
	if (ret == 0 && p.write_header)
		ret = io->ops->pwrite(io, p.header, p.header_len, 0);
	/* 4. pointers durable */
	if (ret == 0 && pointers)
		ret = sync_or_fail(img);
	/* 5. lower refcounts: a crash from here on only leaks */
	for (size_t i = 0; ret == 0 && i < p.nrb; i++)
		if (finals[i])
			ret = io->ops->pwrite(io, finals[i], img->cluster_size, p.rb[i].host);
out:
	if (ret)
		qcow_note_error(img, ret, "flush");
	pthread_mutex_lock(&img->lock);
	for (size_t i = 0; i < p.nl2; i++)
		qcow_cache_unpin(&img->cache, p.l2[i].entry);
	if (ret) {
		undo_snapshot(img, &p);
	} else {
		finish_flush(img, &p);
		pthread_cond_broadcast(&img->recycler_wake);
	}
	pthread_mutex_unlock(&img->lock);
	qcow_free(finals);
	plan_free(&p);
	if (!ret)
		qcow_health_flush_ok(img);
	return ret;
}

bool qcow_flush_needed(struct qcow_image *img)
{
	qcow_assert_locked(img);
	return img->map.rc_dirty.count || img->cache.ndirty || img->l1_dirty.count || img->reftable_dirty.count ||
	       img->header_dirty || img->reftable_switch_pending || img->pending_free_len || img->released.len || img->released_refs.len ||
	       img->erased.len || img->map.nmoves_active || img->data_dirty;
}

int qcow_flush(struct qcow_image *img)
{
	if (img->read_only)
		return 0;
	pthread_mutex_lock(&img->flush_lock);
	int ret = qcow_flush_holding_flush_lock(img);
	pthread_mutex_unlock(&img->flush_lock);
	return ret;
}
