/*
 * qcow_sparsify.c - sparsify: find allocated data clusters that read all
 * zeros and free them, online, while guest I/O goes on.
 *
 * Owns: qcow_image_sparsify, the candidate marks of the sparsify that runs
 * (img->sparsify, at most one per image) and the "would an unmapped
 * cluster read zeros" check that detect_zeroes=unmap shares.  Layering:
 * just below qcow_image.c (whose write resolution calls the mark hook);
 * calls the recycler (kick), the flush, the tables, the map and the
 * in-flight registry.  Rules (doc/design.md, "Sparsify"):
 *  - A cluster is freed only if no guest write changed it between the
 *    read that found it zero and the unmap: under img->lock its guest
 *    cluster is marked and its L2 entry noted; every write resolution of
 *    that guest cluster clears the mark (qcow_sparsify_note_write, called
 *    from resolve_cluster in qcow_image.c); a grace period lets the writes
 *    that resolved before the mark finish; the cluster is read without the
 *    lock; under the lock again it is freed only if the mark survived and
 *    the L2 entry is unchanged.  A write that resolves after the final
 *    check sees the entry unmapped and allocates a new cluster.
 *  - The sparsify itself is registered in flight from the mark to the
 *    final check, so the recycler neither erases nor moves-and-erases a
 *    candidate while it is being read (invariant 5).
 *  - Only plain clusters with one reference (REF from exactly this L2
 *    slot) are candidates: shared with a snapshot (refcount > 1) and
 *    compressed clusters are left and counted.
 *  - Freeing is the discard path's: the reference goes at once (Junk),
 *    the L2 entry becomes 0, and the recycler erases and compacts.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <string.h>

/* Guest clusters per batch: the marks are one bitmap over a contiguous
 * guest range; one batch is held in flight while its candidates are read,
 * so it covers at most SPARSIFY_BATCH_BYTES (512 clusters of 64 KiB, 16
 * of 2 MiB): the recycler's grace periods wait for it. */
#define SPARSIFY_BATCH 512u
#define SPARSIFY_BATCH_BYTES (32ull << 20)

struct qcow_sparsify_marks {
	uint64_t base;                          /* first guest cluster of the batch */
	uint64_t n;                             /* guest clusters in the batch (0: none marked) */
	uint64_t mark[SPARSIFY_BATCH / 64];     /* candidate, no write resolved since */
	uint64_t cand[SPARSIFY_BATCH / 64];     /* candidate at the mark */
	uint64_t entry[SPARSIFY_BATCH];         /* L2 entry noted at the mark */
};

static bool bit_get(const uint64_t *v, uint64_t i) { return (v[i / 64] >> (i % 64)) & 1; }
static void bit_set(uint64_t *v, uint64_t i) { v[i / 64] |= 1ull << (i % 64); }
static void bit_clear(uint64_t *v, uint64_t i) { v[i / 64] &= ~(1ull << (i % 64)); }

void qcow_sparsify_note_write(struct qcow_image *img, uint64_t gc)
{
	qcow_assert_locked(img);
	struct qcow_sparsify_marks *s = img->sparsify;
	if (s && gc - s->base < s->n)
		bit_clear(s->mark, gc - s->base);
}

bool qcow_sparsify_unmap_reads_zero(struct qcow_image *img, uint64_t gc)
{
	(void)gc;
	/* With a backing file an unallocated cluster may show backing data:
	 * then detect_zeroes falls back to a zero flag and sparsify leaves
	 * the cluster.  (Asking the chain whether it holds data in gc would
	 * unmap a little more; the zero flag frees the host cluster all the
	 * same.) */
	return !img->backing;
}

/* True when len bytes at p are all zero.  Word-wise, and it stops at the
 * first non-zero word: a data buffer costs a few loads. */
bool qcow_sparsify_buffer_is_zero(const void *p, size_t len)
{
	const uint8_t *b = p;
	size_t i = 0;
	for (; i + 32 <= len; i += 32) {
		uint64_t w[4];
		memcpy(w, b + i, sizeof(w));   /* any alignment; compiles to loads */
		if (w[0] | w[1] | w[2] | w[3])
			return false;
	}
	for (; i < len; i++)
		if (b[i])
			return false;
	return true;
}

/* Marks the candidates of guest clusters [base, base+n) (img->lock held).
 * Returns how many were marked (0..n) or a negative errno. */
static int64_t mark_batch(struct qcow_image *img, struct qcow_sparsify_marks *s, uint64_t base, uint64_t n,
			  uint64_t *zero_known, struct qcow_sparsify_result *res)
{
	qcow_assert_locked(img);
	int64_t marked = 0;
	memset(s->mark, 0, sizeof(s->mark));
	memset(s->cand, 0, sizeof(s->cand));
	memset(zero_known, 0, sizeof(s->mark));
	s->base = base;
	s->n = n;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t gc = base + i;
		uint64_t l1i = gc >> img->l2_bits, idx = gc & ((1ull << img->l2_bits) - 1);
		if (l1i >= img->hdr.l1_size)
			break;
		uint64_t l2off = img->l1[l1i] & QCOW_L1E_OFFSET_MASK;
		if (!l2off) {
			/* no table: its whole range is unallocated */
			i += ((1ull << img->l2_bits) - idx) - 1;
			continue;
		}
		int ret;
		struct qcow_cached *t = qcow_l2_get(img, l2off >> img->cluster_bits, &ret);
		if (!t)
			return ret;
		uint64_t e = qcow_l2_entry(img, t, idx);
		if (e & QCOW_OFLAG_COMPRESSED) {
			res->scanned++;
			res->skipped_compressed++;
			continue;
		}
		uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
		if (!h)
			continue;   /* unallocated, or a zero flag without a cluster */
		res->scanned++;
		uint64_t slot = qcow_l2_slot(img, l2off >> img->cluster_bits, idx);
		if (h >= img->map.nclusters || qcow_map_refcount(&img->map, h) > 1 ||
		    !(img->l1[l1i] & QCOW_OFLAG_COPIED)) {
			res->skipped_shared++;
			continue;
		}
		if (qcow_map_state(&img->map, h) != QCS_REF || qcow_map_slot(&img->map, h) != slot)
			continue;   /* not a plain cluster of this entry (a table being copied) */
		if (!qcow_sparsify_unmap_reads_zero(img, gc)) {
			res->skipped_backing++;
			continue;
		}
		if (img->hdr.version >= 3 && (e & QCOW_OFLAG_ZERO) && !qcow_extl2(img))
			bit_set(zero_known, i);   /* reads zero already: no read needed */
		bit_set(s->mark, i);
		bit_set(s->cand, i);
		s->entry[i] = e;
		marked++;
	}
	return marked;
}

/* Frees the marked clusters that read zero, whose mark survived and whose
 * L2 entry is unchanged (img->lock held).  -EAGAIN: a table copy must wait
 * for a truncation (the caller waits and calls again; freed ones are
 * unmarked). */
static int free_batch(struct qcow_image *img, struct qcow_sparsify_marks *s, const uint64_t *zero,
		      struct qcow_sparsify_result *res)
{
	qcow_assert_locked(img);
	for (uint64_t i = 0; i < s->n; i++) {
		if (!bit_get(s->cand, i))
			continue;
		if (!bit_get(s->mark, i)) {
			bit_clear(s->cand, i);
			res->skipped_changed++;   /* a write resolved it meanwhile */
			continue;
		}
		if (!bit_get(zero, i)) {
			bit_clear(s->cand, i);
			continue;
		}
		uint64_t gc = s->base + i;
		uint64_t l1i = gc >> img->l2_bits, idx = gc & ((1ull << img->l2_bits) - 1);
		int ret;
		if (l1i >= img->hdr.l1_size || !(img->l1[l1i] & QCOW_OFLAG_COPIED)) {
			bit_clear(s->cand, i);   /* the table went or became shared */
			res->skipped_changed++;
			continue;
		}
		struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
		if (!t)
			return ret;   /* -EAGAIN: this one is looked at again */
		bit_clear(s->cand, i);
		uint64_t e = qcow_l2_entry(img, t, idx);
		uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
		uint64_t slot = qcow_l2_slot(img, t->cluster, idx);
		if (e != s->entry[i] || h >= img->map.nclusters || qcow_map_state(&img->map, h) != QCS_REF ||
		    qcow_map_slot(&img->map, h) != slot) {
			res->skipped_changed++;
			continue;
		}
		/* the discard path's unmap (qcow_image.c, release_entry and
		 * unmap_clusters): a move of h is cancelled, the reference
		 * goes now (a crash before the next flush shows the old
		 * pointer: the cluster then reads zeros, erased or not) */
		qcow_map_move_cancel(&img->map, h);
		qcow_map_drop_ref(&img->map, h, slot);
		qcow_l2_set_entry(img, t, idx, 0);
		/* extended L2: every subcluster reads zeros, and nothing shows
		 * through (unmap_reads_zero): an unallocated cluster */
		qcow_l2_set_bitmap(img, t, idx, 0);
		res->freed++;
		res->bytes_freed += img->cluster_size;
	}
	return 0;
}

int qcow_image_sparsify(struct qcow_image *img, qcow_sparsify_progress progress, void *opaque,
			struct qcow_sparsify_result *res)
{
	struct qcow_sparsify_marks *s = NULL;
	uint8_t *buf = NULL;
	uint64_t zero[SPARSIFY_BATCH / 64], zero_known[SPARSIFY_BATCH / 64];
	bool registered = false, owner = false;
	struct qcow_inflight req;
	int ret = 0;

	memset(res, 0, sizeof(*res));
	if (img->read_only)
		return -EROFS;
	/* its candidates are clusters of the qcow2 file; a data file's are
	 * not in the map (qcow_datafile.c) */
	if (qcow_datafile_present(img))
		return -ENOTSUP;
	if (qcow_health_failed(img))
		return -EIO;
	s = qcow_calloc(1, sizeof(*s));
	buf = qcow_malloc(img->cluster_size);
	if (!s || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	qcow_lock(img);
	if (img->sparsify) {
		qcow_unlock(img);
		ret = -EBUSY;
		goto out;
	}
	img->sparsify = s;
	owner = true;
	qcow_unlock(img);

	for (uint64_t base = 0;;) {
		qcow_lock(img);
		/* the size can change meanwhile (a resize): read it each time */
		uint64_t total = (img->virtual_size + img->cluster_size - 1) >> img->cluster_bits;
		res->guest_clusters = total;
		if (base >= total) {
			qcow_unlock(img);
			break;
		}
		if (qcow_health_failed(img)) {
			qcow_unlock(img);
			ret = -EIO;
			goto out;
		}
		uint64_t batch = SPARSIFY_BATCH_BYTES >> img->cluster_bits;
		if (batch > SPARSIFY_BATCH)
			batch = SPARSIFY_BATCH;
		if (batch == 0)
			batch = 1;
		uint64_t n = total - base < batch ? total - base : batch;
		int64_t marked = mark_batch(img, s, base, n, zero_known, res);
		if (marked <= 0) {
			s->n = 0;
			qcow_unlock(img);
			if (marked < 0) {
				ret = (int)marked;
				goto out;
			}
		} else {
			/* writes that resolved before the marks: wait for them;
			 * ours is registered after the ticket, so the wait does
			 * not wait for us */
			uint64_t ticket = qcow_inflight_ticket(img);
			qcow_inflight_begin(img, &req);
			registered = true;
			qcow_unlock(img);
			qcow_inflight_wait_before(img, ticket);

			memcpy(zero, zero_known, sizeof(zero));
			for (uint64_t i = 0; i < n; i++) {
				/* cand, not mark: writers clear marks under the
				 * lock, which this read loop does not hold */
				if (!bit_get(s->cand, i) || bit_get(zero, i))
					continue;
				uint64_t host = s->entry[i] & QCOW_L2E_OFFSET_MASK;
				ret = img->io->ops->pread(img->io, buf, img->cluster_size, host);
				if (ret)
					goto out;
				if (qcow_sparsify_buffer_is_zero(buf, img->cluster_size))
					bit_set(zero, i);
			}

			qcow_lock(img);
			uint64_t before = res->freed;
			while ((ret = free_batch(img, s, zero, res)) == -EAGAIN)
				qcow_alloc_wait_truncation(img);
			s->n = 0;
			qcow_inflight_end(img, &req);
			registered = false;
			if (res->freed > before) {
				/* for the recycler, as a discard: the free tail may
				 * be trimmed, a pass waits for the quiet period */
				img->bytes_discard_requested += (res->freed - before) * img->cluster_size;
				/* each one was a cluster's only reference (free_batch) */
				img->bytes_discard_freed += (res->freed - before) * img->cluster_size;
				img->last_discard_ms = qcow_now_ms();
			}
			bool over = qcow_cache_over_budget(&img->cache);
			qcow_unlock(img);
			if (ret)
				goto out;
			if (over)
				(void)qcow_flush(img);   /* errors are noted by the flush itself */
			if (res->freed > before)
				qcow_recycler_kick(img);
		}
		base += n;
		res->guest_done = base;
		if (progress && progress(res, opaque)) {
			ret = -ECANCELED;
			goto out;
		}
	}
out:
	if (registered) {
		qcow_lock(img);
		s->n = 0;
		qcow_inflight_end(img, &req);
		qcow_unlock(img);
	}
	if (owner) {
		qcow_lock(img);
		img->sparsify = NULL;
		qcow_unlock(img);
		if (res->freed)
			qcow_recycler_kick(img);
	}
	qcow_free(buf);
	qcow_free(s);
	return ret;
}
