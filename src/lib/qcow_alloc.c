/*
 * qcow_alloc.c - cluster allocation and file growth.
 *
 * Owns: handing out host clusters (Available -> Roots) and growing the
 * image file when none is Available.  Rules (doc/design.md, invariant 2):
 *  - Only Available clusters are handed out, or clusters of a freshly
 *    grown file tail; both read as zeros after any crash.
 *  - Called with img->lock held.  Nothing here waits: while the recycler
 *    truncates the file (img->truncating), an allocation that would have
 *    to grow the file returns -EAGAIN, and the caller gives back what it
 *    resolved, waits with qcow_alloc_wait_truncation and starts again
 *    ("no waits inside a resolved request").  Flushes, resizes and table
 *    relocations hold flush_lock, under which no truncation runs, so they
 *    never see -EAGAIN.
 *  - A cluster whose last pointer is replaced is freed only after the
 *    flush that makes the replacement durable (qcow_free_after_flush).
 *  - The new size becomes durable with the next flush's first sync,
 *    before any pointer to the new clusters is written, so no durable
 *    pointer ever lies past the end of the file.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>

/* Grows the file (and the map) so that at least n new clusters exist at
 * its end; they read as zeros and are Available. */
static int grow_file(struct qcow_image *img, uint64_t n)
{
	if (img->truncating)
		return -EAGAIN;
	uint64_t old = img->map.nclusters;
	uint64_t chunk = (old / 16) ?: 1;
	uint64_t min_chunk = (1u << 20) >> img->cluster_bits, max_chunk = (64u << 20) >> img->cluster_bits;
	if (chunk < min_chunk)
		chunk = min_chunk;
	if (chunk > max_chunk && max_chunk)
		chunk = max_chunk;
	if (chunk < n)
		chunk = n;
	if ((old + chunk) > (QCOW_MAX_HOST_OFFSET >> img->cluster_bits))
		return -EFBIG;
	int ret = img->io->ops->truncate(img->io, (old + chunk) << img->cluster_bits);
	if (ret < 0)
		return ret;
	ret = qcow_map_resize(&img->map, old + chunk);
	if (ret < 0)
		return ret;
	img->data_dirty = true;
	return 0;
}

void qcow_alloc_wait_truncation(struct qcow_image *img)
{
	qcow_assert_locked(img);
	while (img->truncating)
		pthread_cond_wait(&img->truncate_done, &img->lock);
}

int qcow_alloc_cluster(struct qcow_image *img, uint64_t *out)
{
	qcow_assert_locked(img);
	uint64_t c = qcow_map_lowest_available(&img->map);
	if (c == UINT64_MAX) {
		int ret = grow_file(img, 1);
		if (ret < 0)
			return ret;
		c = qcow_map_lowest_available(&img->map);
		if (c == UINT64_MAX)
			return -ENOSPC;
	}
	qcow_map_set_state(&img->map, c, QCS_ROOTS);
	*out = c;
	return 0;
}

int qcow_alloc_contiguous(struct qcow_image *img, uint64_t n, uint64_t *out)
{
	qcow_assert_locked(img);
	/* lowest run of n Available clusters, else at the end of the file */
	uint64_t c = qcow_map_available_run(&img->map, n, UINT64_MAX);
	if (c == UINT64_MAX) {
		uint64_t end = img->map.nclusters;
		uint64_t last = qcow_map_last_block(&img->map);
		int ret = grow_file(img, n + 1);
		if (ret < 0)
			return ret;
		/* the run starts after the last busy cluster: everything
		 * from there to the new end is Available */
		c = last == UINT64_MAX ? 0 : last + 1;
		if (c < end) {
			uint64_t k = 0;
			while (k < n && qcow_map_state(&img->map, c + k) == QCS_AVAILABLE)
				k++;
			if (k < n)
				c = end;
		}
	}
	for (uint64_t i = 0; i < n; i++)
		qcow_map_set_state(&img->map, c + i, QCS_ROOTS);
	*out = c;
	return 0;
}

int qcow_released_add(struct qcow_image *img, uint64_t c)
{
	qcow_assert_locked(img);
	return qcow_u64_list_add(&img->released, c);
}

void qcow_free_after_flush(struct qcow_image *img, uint64_t c, uint64_t slot)
{
	qcow_assert_locked(img);
	if (qcow_map_refcount(&img->map, c) > 1) {
		/* without memory the reference stays until the next open: a
		 * leak, not a loss */
		if (qcow_u64_list_add(&img->released_refs, c) == 0 &&
		    qcow_u64_list_add(&img->released_refs, slot) != 0)
			img->released_refs.len--;
		return;
	}
	if (qcow_released_add(img, c)) {
		/* keep it allocated until the next open: a leak, not a loss */
		qcow_map_set_pinned(&img->map, c, 1);
		return;
	}
	qcow_map_set_state(&img->map, c, QCS_PENDING);
}
