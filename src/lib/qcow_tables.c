/*
 * qcow_tables.c - access to the active L1 table and the L2 tables.
 *
 * Owns: reading L2 tables through the metadata cache, changing L1 and L2
 * entries (marking what the next flush must write), making an L2 table
 * writable in place (allocating it, or copying a shared one),
 * re-pointing reverse references after the L1 or refcount table moved,
 * and telling which table holds a pointer slot (moves and the repacker).
 * Rules:
 *  - Everything here runs with img->lock held (asserted).
 *  - A table handle that must survive a call that may evict, insert,
 *    allocate or drop the lock is pinned (qcow_cache.h); qcow_l2_for_write
 *    pins the source table of a copy-on-write while it allocates.
 *  - Changing an L2 table cancels a move of that table (the copy would be
 *    stale); rewriting a pointer is the recycler's business.
 *  - COPIED is trusted only when the map agrees: the cluster is REF (one
 *    reference) from exactly that slot.
 *  - L2 entries are 8 or 16 bytes (extended L2: pointer, then subcluster
 *    bitmap); indexes and slots convert only through the entry-size
 *    helpers of qcow_internal.h.  Pointer changes never touch a bitmap.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

struct qcow_cached *qcow_l2_get(struct qcow_image *img, uint64_t l2_cluster, int *ret)
{
	qcow_assert_locked(img);
	struct qcow_cached *e = qcow_cache_find(&img->cache, l2_cluster);
	*ret = 0;
	if (e)
		return e;
	e = qcow_cache_insert(&img->cache, l2_cluster);
	if (!e) {
		*ret = -ENOMEM;
		return NULL;
	}
	/* A miss reads under the lock: no flush can be writing this table
	 * (tables being written are pinned in the cache), so the disk copy is
	 * current. */
	*ret = img->io->ops->pread(img->io, e->data, img->cluster_size, l2_cluster << img->cluster_bits);
	if (*ret < 0) {
		qcow_logf(QCOW_LOG_ERROR, "cannot read L2 table at 0x%" PRIx64 ": %s",
			  l2_cluster << img->cluster_bits, strerror(-*ret));
		qcow_cache_remove(&img->cache, e);
		return NULL;
	}
	return e;
}

void qcow_l2_set_entry(struct qcow_image *img, struct qcow_cached *t, uint64_t idx, uint64_t v)
{
	qcow_assert_locked(img);
	qcow_put_be64(t->data + (idx << qcow_l2_entry_shift(img)), v);
	qcow_cache_set_dirty(&img->cache, t, true);
	/* the table's contents changed: a copy made by a move is stale */
	qcow_map_move_cancel(&img->map, t->cluster);
}

void qcow_slot_set(struct qcow_image *img, struct qcow_cached *t, uint64_t slot, uint64_t v)
{
	qcow_assert_locked(img);
	qcow_put_be64(t->data + (slot & (img->cluster_size - 1)), v);
	qcow_cache_set_dirty(&img->cache, t, true);
	/* the table's contents changed: a copy made by a move is stale */
	qcow_map_move_cancel(&img->map, t->cluster);
}

void qcow_l2_set_bitmap(struct qcow_image *img, struct qcow_cached *t, uint64_t idx, uint64_t bm)
{
	qcow_assert_locked(img);
	if (!qcow_extl2(img))
		return;
	qcow_put_be64(t->data + (idx << 4) + 8, bm);
	qcow_cache_set_dirty(&img->cache, t, true);
	qcow_map_move_cancel(&img->map, t->cluster);
}

void qcow_l1_set(struct qcow_image *img, uint64_t idx, uint64_t v)
{
	qcow_assert_locked(img);
	img->l1[idx] = v;
	qcow_bitmap_set(&img->l1_dirty, (idx * 8) >> img->cluster_bits);
}

enum qcow_slot_kind qcow_slot_kind(const struct qcow_image *img, uint64_t slot, uint64_t *index)
{
	uint64_t l1 = img->hdr.l1_table_offset, rt = img->hdr.refcount_table_offset;
	if (slot >= l1 && slot < l1 + (uint64_t)img->hdr.l1_size * 8) {
		*index = (slot - l1) / 8;
		return QSLOT_ACTIVE_L1;
	}
	if (slot >= rt && slot < rt + img->reftable_entries * 8) {
		*index = (slot - rt) / 8;
		return QSLOT_REFTABLE;
	}
	*index = 0;
	if (qcow_pbitmap_table_slot(img->pbitmaps, slot))
		return QSLOT_BITMAP_TABLE;   /* a pinned whole table, entries like L2 ones */
	uint64_t holder = slot >> img->cluster_bits;
	if (holder < img->map.nclusters && qcow_map_state(&img->map, holder) == QCS_PINNED)
		return QSLOT_SNAPSHOT_L1;   /* a whole table that is no L2 table */
	return QSLOT_L2;
}

bool qcow_l2_entry_at(struct qcow_image *img, uint64_t slot, uint64_t *e)
{
	int ret;
	struct qcow_cached *t = qcow_l2_get(img, slot >> img->cluster_bits, &ret);
	if (!t)
		return false;
	*e = qcow_slot_get(img, t, slot);
	return true;
}

int qcow_l2_lookup(struct qcow_image *img, uint64_t gc, uint64_t *entry)
{
	uint64_t bm;
	return qcow_l2_lookup_bitmap(img, gc, entry, &bm);
}

int qcow_l2_lookup_bitmap(struct qcow_image *img, uint64_t gc, uint64_t *entry, uint64_t *bitmap)
{
	uint64_t l1i = gc >> img->l2_bits;
	*entry = 0;
	*bitmap = 0;
	if (l1i >= img->hdr.l1_size)
		return 0;
	uint64_t l2off = img->l1[l1i] & QCOW_L1E_OFFSET_MASK;
	if (!l2off)
		return 0;
	int ret;
	struct qcow_cached *t = qcow_l2_get(img, l2off >> img->cluster_bits, &ret);
	if (!t)
		return ret;
	*entry = qcow_l2_entry(img, t, gc & ((1ull << img->l2_bits) - 1));
	*bitmap = qcow_l2_bitmap(img, t, gc & ((1ull << img->l2_bits) - 1));
	return 0;
}

struct qcow_cached *qcow_l2_for_write(struct qcow_image *img, uint64_t l1i, int *ret)
{
	qcow_assert_locked(img);
	uint64_t l1e = img->l1[l1i];
	uint64_t old = l1e & QCOW_L1E_OFFSET_MASK;
	uint64_t oldc = old >> img->cluster_bits;
	uint64_t slot = img->hdr.l1_table_offset + l1i * 8;
	struct qcow_cached *src = NULL, *t = NULL;
	uint64_t c;
	*ret = 0;
	if (old && (l1e & QCOW_OFLAG_COPIED) && qcow_map_state(&img->map, oldc) == QCS_REF &&
	    qcow_map_slot(&img->map, oldc) == slot)
		return qcow_l2_get(img, oldc, ret);

	if (old) {
		src = qcow_l2_get(img, oldc, ret);
		if (!src)
			return NULL;
		/* allocating and inserting may evict: keep the source */
		qcow_cache_pin(&img->cache, src);
	}
	*ret = qcow_alloc_cluster(img, &c);
	if (*ret)
		goto out;
	t = qcow_cache_insert(&img->cache, c);
	if (!t) {
		qcow_map_set_state(&img->map, c, QCS_AVAILABLE);   /* never written */
		*ret = -ENOMEM;
		goto out;
	}
	if (src) {
		/* copy-on-write of a shared L2 table: the data clusters keep
		 * their counts (each L1 path counts once); the active path's
		 * reference to each now comes from the new table's entry */
		memcpy(t->data, src->data, img->cluster_size);
		for (uint64_t i = 0; i < (1ull << img->l2_bits); i++) {
			uint64_t e = qcow_l2_entry(img, t, i), first, last;
			if (!qcow_entry_clusters(img, e, &first, &last))
				continue;
			for (uint64_t h = first; h <= last && h < img->map.nclusters; h++)
				qcow_map_replace_ref(&img->map, h, qcow_l2_slot(img, oldc, i), qcow_l2_slot(img, c, i));
		}
		/* the durable L1 entry points at the old table until the next
		 * flush: it is freed only after that flush */
		qcow_map_move_cancel(&img->map, oldc);
		qcow_free_after_flush(img, oldc, slot);
		if (qcow_map_state(&img->map, oldc) == QCS_PENDING)
			qcow_cache_remove(&img->cache, src);   /* a zombie until unpinned below */
	} else {
		memset(t->data, 0, img->cluster_size);
	}
	qcow_cache_set_dirty(&img->cache, t, true);
	qcow_map_set_ref(&img->map, c, slot);
	qcow_l1_set(img, l1i, (c << img->cluster_bits) | QCOW_OFLAG_COPIED);
out:
	if (src)
		qcow_cache_unpin(&img->cache, src);
	return *ret ? NULL : t;
}

void qcow_l1_rehome(struct qcow_image *img, uint64_t old_off, uint64_t old_len, uint64_t clusters)
{
	qcow_assert_locked(img);
	for (uint64_t k = 0; k < clusters; k++)
		qcow_bitmap_set(&img->l1_dirty, k);
	uint64_t len = old_len;
	for (uint32_t i = 0; i < img->hdr.l1_size; i++) {
		uint64_t t = (img->l1[i] & QCOW_L1E_OFFSET_MASK) >> img->cluster_bits;
		if (t && t < img->map.nclusters)
			qcow_map_rehome_refs(&img->map, t, old_off, img->hdr.l1_table_offset, len);
	}
}

void qcow_reftable_rehome(struct qcow_image *img, uint64_t old_off, uint64_t old_len, uint64_t clusters)
{
	qcow_assert_locked(img);
	for (uint64_t k = 0; k < clusters; k++)
		qcow_bitmap_set(&img->reftable_dirty, k);
	uint64_t len = old_len;
	for (uint64_t i = 0; i < img->reftable_entries; i++) {
		uint64_t b = img->reftable[i] >> img->cluster_bits;
		if (b && b < img->map.nclusters)
			qcow_map_rehome_refs(&img->map, b, old_off, img->hdr.refcount_table_offset, len);
	}
}
