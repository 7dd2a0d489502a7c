/*
 * qcow_relocate.c - moving the L1 table or the refcount table.
 *
 * Owns: the one routine that gives a table a new place, used both when
 * the disk grows past what the L1 table's clusters hold (resize) and when
 * compaction moves a table down out of the file's end (recycler).  It
 * sits above the flush layer (it flushes) and below the recycler and the
 * API.  Order, with flush_lock held throughout so no flush sees half of it:
 *   1. flush: the new clusters' refcounts are durable (they are pinned)
 *   2. copy the table as it is on disk into the new clusters and sync:
 *      its entries point to structures whose refcounts are durable, and
 *      entries changed in memory since reach the new place with the next
 *      flush (every cluster of the new table is marked dirty)
 *   3. switch in memory, then write the header's two fields (offset and
 *      size) with one write, and sync
 *   4. free the old clusters
 * Failure rules (doc/design.md, "errors"): before step 3 nothing was
 * published, so the new clusters become Junk and nothing else changed.
 * A failure inside step 3 leaves it unknown which header is on disk: the
 * switch stays pending - the next flush writes the header again (for the
 * refcount table in its first step, before any pointer that may rely on
 * a new refcount block) and only then are the old clusters freed.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

/* Step 2: the bytes of the table at old_off as they are on disk into the
 * n clusters at start, durable. */
static int copy_durable(struct qcow_image *img, uint64_t old_off, uint64_t bytes, uint64_t start, uint64_t n)
{
	uint64_t cs = img->cluster_size;
	uint8_t *buf = qcow_calloc(n, cs);
	int ret = buf ? 0 : -ENOMEM;
	if (!ret)
		ret = img->io->ops->pread(img->io, buf, (size_t)bytes, old_off);
	if (!ret)
		ret = img->io->ops->pwrite(img->io, buf, n * cs, start << img->cluster_bits);
	if (!ret) {
		ret = img->io->ops->flush(img->io);
		if (ret)
			qcow_set_failed(img, ret, "sync of a moved table");
	}
	qcow_free(buf);
	return ret;
}

/* Step 3 in memory (img->lock held). */
static int switch_in_memory(struct qcow_image *img, enum qcow_table which, uint64_t start, uint64_t n,
			    uint32_t new_l1_size)
{
	uint64_t cs = img->cluster_size;
	if (which == QCOW_TABLE_REFCOUNT) {
		uint64_t old = img->hdr.refcount_table_offset;
		img->hdr.refcount_table_offset = start << img->cluster_bits;
		qcow_reftable_rehome(img, old, img->reftable_entries * 8, n);
		return 0;
	}
	uint64_t capacity = n * cs / 8;
	if (capacity > img->l1_capacity) {
		uint64_t *l1 = qcow_calloc(capacity, 8);
		if (!l1 || qcow_bitmap_resize(&img->l1_dirty, n)) {
			qcow_free(l1);
			return -ENOMEM;
		}
		memcpy(l1, img->l1, (size_t)img->hdr.l1_size * 8);
		qcow_free(img->l1);
		img->l1 = l1;
		img->l1_capacity = (uint32_t)capacity;
	}
	uint64_t old = img->hdr.l1_table_offset, old_len = (uint64_t)img->hdr.l1_size * 8;
	img->hdr.l1_table_offset = start << img->cluster_bits;
	if (new_l1_size > img->hdr.l1_size)
		img->hdr.l1_size = new_l1_size;
	qcow_l1_rehome(img, old, old_len, n);
	return 0;
}

int qcow_table_relocate(struct qcow_image *img, enum qcow_table which, uint64_t start, uint64_t n,
			uint32_t new_l1_size)
{
	qcow_assert_flush_locked(img);
	bool l1 = which == QCOW_TABLE_L1;
	uint64_t cs = img->cluster_size;
	qcow_lock(img);
	uint64_t old_off = l1 ? img->hdr.l1_table_offset : img->hdr.refcount_table_offset;
	uint64_t bytes = l1 ? (uint64_t)img->hdr.l1_size * 8 : (uint64_t)img->hdr.refcount_table_clusters * cs;
	uint64_t old_n = (bytes + cs - 1) / cs;
	qcow_unlock(img);

	int ret = qcow_flush_holding_flush_lock(img);
	if (!ret)
		ret = copy_durable(img, old_off, bytes, start, n);
	qcow_lock(img);
	if (!ret)
		ret = switch_in_memory(img, which, start, n, new_l1_size);
	if (ret) {
		/* nothing published: the new clusters may hold a partial copy */
		for (uint64_t i = 0; i < n; i++)
			qcow_map_set_state(&img->map, start + i, QCS_JUNK);
		qcow_unlock(img);
		return ret;
	}
	qcow_unlock(img);

	ret = qcow_header_write_fields(img->io, &img->hdr, l1 ? QH_L1_SIZE : QH_REFTABLE_OFFSET, 12);
	if (!ret) {
		ret = img->io->ops->flush(img->io);
		if (ret)
			qcow_set_failed(img, ret, "sync of a table switch");
	}
	qcow_lock(img);
	if (ret) {
		/* which header is on disk is unknown: keep both tables until a
		 * flush has written the header again */
		if (l1)
			img->header_dirty = true;
		else
			img->reftable_switch_pending = true;
		if (old_off && qcow_pending_free_add(img, old_off >> img->cluster_bits, old_n))
			qcow_logf(QCOW_LOG_WARNING, "out of memory: the old table at 0x%" PRIx64 " stays allocated (a leak)", old_off);
	} else {
		for (uint64_t i = 0; old_off && i < old_n; i++)
			qcow_map_drop_ref(&img->map, (old_off >> img->cluster_bits) + i, 0);
	}
	qcow_unlock(img);
	if (ret)
		qcow_note_error(img, ret, l1 ? "switching to a moved L1 table" : "switching to a moved refcount table");
	else
		qcow_logf(QCOW_LOG_DEBUG, "%s table moved from 0x%" PRIx64 " to 0x%" PRIx64, l1 ? "L1" : "refcount",
			  old_off, start << img->cluster_bits);
	return ret;
}
