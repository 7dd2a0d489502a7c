/*
 * qcow_recycler.c - the background thread that gives space back: it
 * erases Junk and compacts the image (DESIGN.md section 6).
 *
 * Owns: erasing (Junk -> Erasing -> Erased; the next flush makes them
 * Available), compaction planning and the move state machine
 *
 *     start -> Copying -> Copied -> (flush) -> Flushed -> pointer rewrite
 *           -> Referenced -> (flush) -> complete (source -> Junk)
 *
 * and truncating the file after the last busy cluster.
 *
 * Rules:
 *  - Nothing stops the world.  Planning, state changes and pointer
 *    rewrites hold img->lock for in-memory work only; copies, punches and
 *    truncation run unlocked.  Guest I/O never waits for a copy: a guest
 *    write to a move source cancels the move instead (qcow_image.c).
 *  - Before copying a planned batch or punching taken Junk, the recycler
 *    waits for a grace period: every guest request that resolved its
 *    extents before the plan has finished, so no write still lands on a
 *    source being copied or a cluster being erased (invariant 5).
 *  - A source stays REF until its pointer is rewritten, then PENDING until
 *    the flush that makes the new pointer durable (invariant 4); only then
 *    does it become Junk and may be erased.
 *  - Pointer rewrites and truncation hold img->flush_lock, so no flush
 *    snapshot sees half a rewrite and the file never shrinks under a flush.
 *  - During truncation, allocations that need to grow the file wait
 *    (img->truncating); allocations from Available do not.
 *  - Batches are bounded (MOVE_BATCH clusters) so a guest fsync never waits
 *    behind more than one batch of copying.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ERASE_BATCH 4096u
#define MOVE_BATCH_BYTES (16u << 20)
#define MOVE_BATCH_MOVES 1024u

/* ---- erase ---------------------------------------------------------------- */

static int erase_list_add(struct qcow_image *img, uint64_t c)
{
	if (img->erased_len == img->erased_cap) {
		size_t cap = img->erased_cap ? img->erased_cap * 2 : 1024;
		uint64_t *l = qcow_realloc(img->erased_list, cap * sizeof(*l));
		if (!l)
			return -ENOMEM;
		img->erased_list = l;
		img->erased_cap = cap;
	}
	img->erased_list[img->erased_len++] = c;
	return 0;
}

/* Punches (or zeroes) one run of clusters. */
static int erase_run(struct qcow_image *img, uint64_t first, uint64_t n)
{
	uint64_t off = first << img->cluster_bits, len = n << img->cluster_bits;
	if (img->punch_supported) {
		int ret = img->io->ops->punch(img->io, off, len);
		if (ret != -EOPNOTSUPP)
			return ret;
		img->punch_supported = false;
	}
	return qcow_io_write_zeros(img->io, off, len);
}

/* Erases up to ERASE_BATCH junk clusters, lowest first.  Called and
 * returns with img->lock held; drops it for the I/O.  Returns the number
 * erased or -errno. */
static int64_t erase_batch(struct qcow_image *img)
{
	uint64_t *taken = qcow_malloc(ERASE_BATCH * sizeof(uint64_t));
	if (!taken)
		return -ENOMEM;
	size_t n = 0;
	for (uint64_t c = qcow_map_next_junk(&img->map, 0); c != UINT64_MAX && n < ERASE_BATCH;
	     c = qcow_map_next_junk(&img->map, c + 1)) {
		qcow_map_set_state(&img->map, c, QCS_ERASING);
		taken[n++] = c;
	}
	uint64_t ticket = qcow_inflight_ticket(img);
	pthread_mutex_unlock(&img->lock);

	qcow_inflight_wait_before(img, ticket);
	int ret = 0;
	size_t done = 0;
	for (size_t i = 0; i < n && ret == 0;) {
		size_t j = i + 1;
		while (j < n && taken[j] == taken[j - 1] + 1)
			j++;
		ret = erase_run(img, taken[i], j - i);
		if (ret == 0)
			done = j;
		i = j;
	}

	pthread_mutex_lock(&img->lock);
	for (size_t i = 0; i < n; i++) {
		if (qcow_map_state(&img->map, taken[i]) != QCS_ERASING)
			continue;
		if (i < done && erase_list_add(img, taken[i]) == 0)
			qcow_map_set_state(&img->map, taken[i], QCS_ERASED);
		else
			qcow_map_set_state(&img->map, taken[i], QCS_JUNK);
	}
	if (done) {
		img->data_dirty = true;
		if (img->punch_supported)
			img->bytes_reclaimed += (uint64_t)done << img->cluster_bits;
	}
	qcow_free(taken);
	if (ret) {
		qcow_note_error(img, ret, "erasing junk clusters");
		return ret;
	}
	return (int64_t)n;
}

/* ---- truncation ------------------------------------------------------------ */

int qcow_truncate_tail(struct qcow_image *img)
{
	pthread_mutex_lock(&img->lock);
	uint64_t last = qcow_map_last_block(&img->map);
	uint64_t new_n = last == UINT64_MAX ? 1 : last + 1;
	uint64_t old_n = img->map.nclusters;
	if (new_n >= old_n || qcow_map_resize(&img->map, new_n) < 0) {
		pthread_mutex_unlock(&img->lock);
		return 0;
	}
	img->truncating = true;
	pthread_mutex_unlock(&img->lock);

	int64_t size = img->io->ops->size(img->io);
	uint64_t new_size = new_n << img->cluster_bits;
	int ret = 0;
	if (size > 0 && (uint64_t)size > new_size)
		ret = img->io->ops->truncate(img->io, new_size);

	pthread_mutex_lock(&img->lock);
	img->truncating = false;
	pthread_cond_broadcast(&img->truncate_done);
	if (ret == 0 && size > 0 && (uint64_t)size > new_size)
		img->bytes_reclaimed += (uint64_t)size - new_size;
	pthread_mutex_unlock(&img->lock);
	if (ret) {
		/* the map already forgot the tail: regrow it as junk */
		pthread_mutex_lock(&img->lock);
		uint64_t n = img->map.nclusters;
		if (qcow_map_resize(&img->map, old_n) == 0)
			for (uint64_t c = n; c < old_n; c++)
				if (qcow_map_state(&img->map, c) == QCS_AVAILABLE)
					qcow_map_set_state(&img->map, c, QCS_JUNK);
		pthread_mutex_unlock(&img->lock);
		qcow_logf(QCOW_LOG_ERROR, "%s: truncating to %" PRIu64 " bytes failed: %s", img->io->name, new_size, strerror(-ret));
	}
	return ret;
}

/* ---- compaction ------------------------------------------------------------ */

/* Clusters that are free but lie below the last busy cluster. */
static uint64_t free_below_end(const struct qcow_image *img)
{
	const struct qcow_map *m = &img->map;
	uint64_t free_total = m->count[QCS_JUNK] + m->count[QCS_ERASED] + m->count[QCS_AVAILABLE];
	uint64_t last = qcow_map_last_block(m);
	uint64_t above = last == UINT64_MAX ? m->nclusters : m->nclusters - 1 - last;
	return free_total > above ? free_total - above : 0;
}

/* Lowest cluster a move may copy into.  Only Available: a Junk cluster's
 * old pointer may still be the durable one, and copying another cluster's
 * data into it would show that data in a discarded range after a crash.
 * (Erasing it is harmless: the range then reads zeros.) */
static uint64_t lowest_destination(const struct qcow_map *m, uint64_t from)
{
	return qcow_bitmap_next(&m->available, from);
}

enum move_kind { MOVE_DATA, MOVE_L2, MOVE_REFBLOCK };

static enum move_kind classify(const struct qcow_image *img, uint64_t slot, uint64_t *index)
{
	uint64_t l1 = img->hdr.l1_table_offset, rt = img->hdr.refcount_table_offset;
	if (slot >= l1 && slot < l1 + (uint64_t)img->hdr.l1_size * 8) {
		*index = (slot - l1) / 8;
		return MOVE_L2;
	}
	if (slot >= rt && slot < rt + img->reftable_entries * 8) {
		*index = (slot - rt) / 8;
		return MOVE_REFBLOCK;
	}
	*index = 0;
	return MOVE_DATA;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

struct batch {
	uint64_t *src, *dst;
	size_t n;
};

/* Plans up to max moves under img->lock: the highest movable clusters
 * into the lowest free ones, paired in ascending order of both so runs of
 * neighbours copy as one range. */
static int plan_batch(struct qcow_image *img, struct batch *b, size_t max)
{
	b->src = qcow_malloc(max * sizeof(uint64_t));
	b->dst = qcow_malloc(max * sizeof(uint64_t));
	b->n = 0;
	if (!b->src || !b->dst)
		return -ENOMEM;
	uint64_t s = qcow_map_highest_movable(&img->map, img->map.nclusters);
	uint64_t d = lowest_destination(&img->map, 0);
	while (b->n < max && s != UINT64_MAX && d != UINT64_MAX && d < s) {
		b->src[b->n] = s;
		b->dst[b->n] = d;
		b->n++;
		s = qcow_map_highest_movable(&img->map, s);
		d = lowest_destination(&img->map, d + 1);
	}
	qsort(b->src, b->n, sizeof(uint64_t), cmp_u64);
	/* every destination is below every source, so ascending pairs stay
	 * downward moves */
	for (size_t i = 0; i < b->n; i++)
		if (!qcow_map_move_start(&img->map, b->src[i], b->dst[i])) {
			for (size_t k = 0; k < i; k++)
				qcow_map_move_cancel(&img->map, b->src[k]);
			b->n = 0;
			return -ENOMEM;
		}
	return 0;
}

/* Copies one planned move (or a run of neighbouring data moves starting at
 * index i); returns how many moves the run covered. */
static size_t copy_run(struct qcow_image *img, struct batch *b, size_t i, int *ret)
{
	uint64_t cs = img->cluster_size;
	size_t j = i + 1;
	uint8_t *table = NULL;
	enum move_kind kind;
	uint64_t index;

	pthread_mutex_lock(&img->lock);
	struct qcow_move *mv = qcow_map_move_find(&img->map, b->src[i]);
	if (!mv || qcow_map_state(&img->map, b->src[i]) != QCS_REF) {
		pthread_mutex_unlock(&img->lock);
		return 1;
	}
	kind = classify(img, qcow_map_slot(&img->map, b->src[i]), &index);
	if (kind == MOVE_DATA) {
		while (j < b->n && b->src[j] == b->src[j - 1] + 1 && b->dst[j] == b->dst[j - 1] + 1 &&
		       qcow_map_move_find(&img->map, b->src[j]) &&
		       qcow_map_state(&img->map, b->src[j]) == QCS_REF && (j - i) * cs < MOVE_BATCH_BYTES) {
			uint64_t dummy;
			if (classify(img, qcow_map_slot(&img->map, b->src[j]), &dummy) != MOVE_DATA)
				break;
			j++;
		}
	} else if (kind == MOVE_L2) {
		/* the cache may hold newer contents than the disk */
		struct qcow_cached *e = qcow_cache_find(&img->cache, b->src[i]);
		if (e) {
			table = qcow_malloc(cs);
			if (!table) {
				/* the disk copy may be stale: do not move it now */
				qcow_map_move_cancel(&img->map, b->src[i]);
				pthread_mutex_unlock(&img->lock);
				*ret = -ENOMEM;
				return 1;
			}
			memcpy(table, e->data, cs);
		}
	}
	pthread_mutex_unlock(&img->lock);

	/* refcount blocks change on disk only under flush_lock: hold it so a
	 * flush cannot rewrite the block halfway through the copy */
	if (kind == MOVE_REFBLOCK)
		pthread_mutex_lock(&img->flush_lock);
	if (table)
		*ret = img->io->ops->pwrite(img->io, table, cs, b->dst[i] << img->cluster_bits);
	else
		*ret = img->io->ops->copy(img->io, b->src[i] << img->cluster_bits, b->dst[i] << img->cluster_bits,
					  (uint64_t)(j - i) << img->cluster_bits);
	if (kind == MOVE_REFBLOCK)
		pthread_mutex_unlock(&img->flush_lock);
	qcow_free(table);

	pthread_mutex_lock(&img->lock);
	img->data_dirty = true;
	for (size_t k = i; k < j; k++) {
		struct qcow_move *m = qcow_map_move_find(&img->map, b->src[k]);
		if (!m)
			continue;
		if (*ret)
			qcow_map_move_cancel(&img->map, b->src[k]);
		else if (m->state == QMOVE_COPYING)
			qcow_map_move_set_state(&img->map, m, QMOVE_COPIED);
	}
	pthread_mutex_unlock(&img->lock);
	return j - i;
}

/* Rewrites the pointer of one Flushed move (img->lock and flush_lock held). */
static void rewrite_pointer(struct qcow_image *img, struct qcow_move *mv)
{
	uint64_t cs = img->cluster_size, src = mv->src, dst = mv->dst;
	uint64_t slot = qcow_map_slot(&img->map, src), index;
	int ret;
	enum move_kind kind = classify(img, slot, &index);
	if (kind == MOVE_L2) {
		uint64_t e = img->l1[index];
		if ((e & QCOW_L1E_OFFSET_MASK) != src << img->cluster_bits) {
			qcow_map_move_cancel(&img->map, src);
			return;
		}
		/* the cached table (if any) follows the move; clusters it points
		 * to get their reverse references rewritten */
		struct qcow_cached *t = qcow_cache_find(&img->cache, src);
		if (t)
			qcow_cache_rekey(&img->cache, t, dst);
		else if (!(t = qcow_l2_get(img, dst, &ret))) {
			qcow_map_move_cancel(&img->map, src);   /* cannot read the copy: keep the original */
			return;
		}
		img->l1[index] = (e & ~QCOW_L1E_OFFSET_MASK) | (dst << img->cluster_bits);
		qcow_bitmap_set(&img->l1_dirty, (index * 8) >> img->cluster_bits);
		for (uint64_t i = 0; i < cs / 8; i++) {
			uint64_t h = (qcow_get_be64(t->data + i * 8) & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
			if (h && h < img->map.nclusters && qcow_map_state(&img->map, h) == QCS_REF &&
			    qcow_map_slot(&img->map, h) >> img->cluster_bits == src)
				qcow_map_set_ref(&img->map, h, (dst << img->cluster_bits) + i * 8);
		}
	} else if (kind == MOVE_REFBLOCK) {
		if (img->reftable[index] != src << img->cluster_bits) {
			qcow_map_move_cancel(&img->map, src);
			return;
		}
		img->reftable[index] = dst << img->cluster_bits;
		qcow_bitmap_set(&img->reftable_dirty, (index * 8) >> img->cluster_bits);
	} else {
		uint64_t holder = slot >> img->cluster_bits;
		struct qcow_cached *t = qcow_l2_get(img, holder, &ret);
		uint64_t i = (slot & (cs - 1)) / 8;
		if (!t || (qcow_get_be64(t->data + i * 8) & QCOW_L2E_OFFSET_MASK) != src << img->cluster_bits) {
			qcow_map_move_cancel(&img->map, src);
			return;
		}
		uint64_t e = qcow_get_be64(t->data + i * 8);
		qcow_l2_set_entry(img, t, i, (e & ~QCOW_L2E_OFFSET_MASK) | (dst << img->cluster_bits));
	}
	qcow_map_set_ref(&img->map, dst, slot);
	qcow_map_set_state(&img->map, src, QCS_PENDING);
	qcow_map_move_set_state(&img->map, mv, QMOVE_REFERENCED);
	img->clusters_moved++;
}

/* Metadata first: rewriting a data pointer changes its L2 table, which
 * would cancel that table's own move. */
static void rewrite_flushed(struct qcow_image *img)
{
	for (int pass = 0; pass < 2; pass++)
		for (unsigned i = 0; i < img->map.nmoves_cap; i++) {
			struct qcow_move *mv = &img->map.moves[i];
			if (!mv->in_use || mv->cancelled || mv->state != QMOVE_FLUSHED)
				continue;
			uint64_t index;
			bool data = classify(img, qcow_map_slot(&img->map, mv->src), &index) == MOVE_DATA;
			if (data == (pass == 1))
				rewrite_pointer(img, mv);
		}
}

void qcow_retire_moves(struct qcow_image *img)
{
	for (unsigned i = 0; i < img->map.nmoves_cap; i++) {
		struct qcow_move *mv = &img->map.moves[i];
		if (!mv->in_use)
			continue;
		if (!mv->cancelled && mv->state != QMOVE_REFERENCED)
			qcow_map_move_cancel(&img->map, mv->src);
		if (mv->cancelled)
			qcow_map_move_complete(&img->map, mv);
	}
}

static void assert_map(struct qcow_image *img)
{
	if (!img->opts.runtime_asserts)
		return;
	const char *bad = qcow_map_check(&img->map);
	if (bad) {
		qcow_logf(QCOW_LOG_ERROR, "cluster map invariant violated: %s", bad);
		abort();   /* only in runtime_asserts (test) mode */
	}
}

static void phase_hook(struct qcow_image *img, enum qcow_move_state reached)
{
	if (img->move_phase_hook)
		img->move_phase_hook(img, reached, img->move_phase_opaque);
}

/* One batch: plan, wait, copy, flush, rewrite, flush, retire, truncate.
 * Called without locks.  Returns the number of clusters moved or -errno. */
static int64_t compact_batch(struct qcow_image *img)
{
	struct batch b = { 0 };
	/* bounded in bytes (guest fsync latency) and in moves (move lookups
	 * scan the batch) */
	size_t max = MOVE_BATCH_BYTES >> img->cluster_bits;
	if (max < 16)
		max = 16;
	if (max > MOVE_BATCH_MOVES)
		max = MOVE_BATCH_MOVES;
	pthread_mutex_lock(&img->lock);
	int ret = plan_batch(img, &b, max);
	uint64_t ticket = qcow_inflight_ticket(img);
	assert_map(img);
	pthread_mutex_unlock(&img->lock);
	int64_t moved = 0;
	if (ret || b.n == 0)
		goto out;

	qcow_inflight_wait_before(img, ticket);
	for (size_t i = 0; i < b.n && ret == 0;)
		i += copy_run(img, &b, i, &ret);
	phase_hook(img, QMOVE_COPIED);

	if (ret == 0)
		ret = qcow_flush(img);      /* Copied -> Flushed */
	if (ret == 0) {
		phase_hook(img, QMOVE_FLUSHED);
		pthread_mutex_lock(&img->flush_lock);
		pthread_mutex_lock(&img->lock);
		uint64_t before = img->clusters_moved;
		rewrite_flushed(img);
		moved = (int64_t)(img->clusters_moved - before);
		assert_map(img);
		pthread_mutex_unlock(&img->lock);
		phase_hook(img, QMOVE_REFERENCED);
		ret = qcow_flush_holding_flush_lock(img);     /* Referenced -> complete */
		pthread_mutex_unlock(&img->flush_lock);
	}
	pthread_mutex_lock(&img->lock);
	qcow_retire_moves(img);
	assert_map(img);
	pthread_mutex_unlock(&img->lock);
	if (ret == 0) {
		pthread_mutex_lock(&img->flush_lock);
		ret = qcow_truncate_tail(img);
		pthread_mutex_unlock(&img->flush_lock);
	}
out:
	qcow_free(b.src);
	qcow_free(b.dst);
	if (ret) {
		qcow_note_error(img, ret, "compaction");
		return ret;
	}
	/* a batch whose moves were all cancelled still made progress
	 * possible; report it as one so the caller tries again */
	return moved ? moved : (b.n ? 1 : 0);
}

/* Lowest run of n Available clusters that starts below limit, or
 * UINT64_MAX. */
static uint64_t available_run_below(const struct qcow_map *m, uint64_t n, uint64_t limit)
{
	for (uint64_t c = qcow_bitmap_next(&m->available, 0); c != UINT64_MAX && c < limit;) {
		uint64_t k = 1;
		while (k < n && c + k < m->nclusters && qcow_map_state(m, c + k) == QCS_AVAILABLE)
			k++;
		if (k == n)
			return c;
		c = qcow_bitmap_next(&m->available, c + k);
	}
	return UINT64_MAX;
}

/* Moves the L1 table or the refcount table into a lower free run, so that
 * neither pins the end of the file (qcow_table_relocate does the work and
 * its failure rules).  Returns 1 if a table moved, 0 if none could, or
 * -errno. */
static int relocate_one_table(struct qcow_image *img, bool l1)
{
	uint64_t cs = img->cluster_size;
	pthread_mutex_lock(&img->flush_lock);
	pthread_mutex_lock(&img->lock);
	uint64_t old_off = l1 ? img->hdr.l1_table_offset : img->hdr.refcount_table_offset;
	uint64_t bytes = l1 ? (uint64_t)img->hdr.l1_size * 8 : (uint64_t)img->hdr.refcount_table_clusters * cs;
	uint64_t n = (bytes + cs - 1) / cs;
	uint64_t old_c = old_off >> img->cluster_bits;
	uint64_t start = n ? available_run_below(&img->map, n, old_c) : UINT64_MAX;
	if (start == UINT64_MAX || start + n > old_c) {
		pthread_mutex_unlock(&img->lock);
		pthread_mutex_unlock(&img->flush_lock);
		return 0;
	}
	for (uint64_t i = 0; i < n; i++)
		qcow_map_set_pinned(&img->map, start + i, 1);
	pthread_mutex_unlock(&img->lock);
	int ret = qcow_table_relocate(img, l1 ? QCOW_TABLE_L1 : QCOW_TABLE_REFCOUNT, start, n, 0);
	pthread_mutex_lock(&img->lock);
	assert_map(img);
	pthread_mutex_unlock(&img->lock);
	pthread_mutex_unlock(&img->flush_lock);
	return ret ? ret : 1;
}

/* Frees the junk a relocation left and makes it available again. */
static int erase_all_junk(struct qcow_image *img)
{
	pthread_mutex_lock(&img->lock);
	while (img->map.count[QCS_JUNK]) {
		int64_t n = erase_batch(img);
		if (n < 0) {
			pthread_mutex_unlock(&img->lock);
			return (int)n;
		}
	}
	pthread_mutex_unlock(&img->lock);
	return qcow_flush(img);   /* Erased -> Available */
}

/* Runs batches until nothing moves.  progress in 0..1 is published in
 * img->compact_progress and passed to cb (if any). */
int qcow_compact_run(struct qcow_image *img, void (*cb)(double, void *), void *opaque)
{
	/* moves need Available destinations; offline no thread erases */
	int ret = erase_all_junk(img);
	if (ret)
		return ret;
	pthread_mutex_lock(&img->lock);
	uint64_t gap0 = free_below_end(img);
	img->compacting = true;
	img->compact_progress = 0;
	pthread_mutex_unlock(&img->lock);
	unsigned idle_batches = 0, relocations = 0;
	while (ret >= 0 && idle_batches < 3) {
		int64_t n = compact_batch(img);
		if (n < 0) {
			ret = (int)n;
			break;
		}
		idle_batches = n > 1 ? 0 : idle_batches + 1;
		if (n == 0 || idle_batches >= 3) {
			/* clusters are as low as they go: the tables next, then
			 * another round into the space they leave */
			int moved = 0;
			for (int t = 0; t < 2 && relocations < 4 && ret == 0; t++) {
				int r = relocate_one_table(img, t == 0);
				if (r < 0)
					ret = r;
				moved += r > 0;
			}
			if (ret == 0 && moved) {
				relocations++;
				ret = erase_all_junk(img);
				idle_batches = 0;
				continue;
			}
			break;
		}
		pthread_mutex_lock(&img->lock);
		uint64_t gap = free_below_end(img);
		double p = gap0 ? 1.0 - (double)gap / (double)gap0 : 1.0;
		img->compact_progress = p < 0 ? 0 : p > 1 ? 1 : p;
		bool stop = img->recycler_stop;
		pthread_mutex_unlock(&img->lock);
		if (cb)
			cb(img->compact_progress, opaque);
		if (stop)
			break;
	}
	if (ret == 0) {
		pthread_mutex_lock(&img->flush_lock);
		ret = qcow_truncate_tail(img);
		if (ret == 0)
			ret = qcow_flush_holding_flush_lock(img);
		pthread_mutex_unlock(&img->flush_lock);
	}
	pthread_mutex_lock(&img->lock);
	img->compacting = false;
	img->compact_progress = 1.0;
	img->compactions_done++;
	pthread_mutex_unlock(&img->lock);
	if (cb)
		cb(1.0, opaque);
	return ret;
}

/* ---- the thread ------------------------------------------------------------ */

static uint64_t compact_threshold(const struct qcow_image *img)
{
	if (img->opts.compact_threshold_bytes)
		return img->opts.compact_threshold_bytes;
	/* 64 MiB, or 10 % of the file for smaller images (at least 1 MiB) */
	uint64_t file = img->map.nclusters << img->cluster_bits;
	uint64_t t = file / 10;
	if (t < (1u << 20))
		t = 1u << 20;
	return t < QCOW_DEFAULT_COMPACT_THRESHOLD ? t : QCOW_DEFAULT_COMPACT_THRESHOLD;
}

static bool should_compact(struct qcow_image *img)
{
	if (img->compact_requested)
		return true;
	if (!img->opts.compact)
		return false;
	unsigned quiet = img->opts.compact_quiet_ms ? img->opts.compact_quiet_ms : QCOW_DEFAULT_QUIET_MS;
	if (qcow_now_ms() - img->last_discard_ms < quiet)
		return false;
	return (free_below_end(img) << img->cluster_bits) >= compact_threshold(img);
}

static void *recycler_main(void *arg)
{
	struct qcow_image *img = arg;
	pthread_mutex_lock(&img->lock);
	while (!img->recycler_stop) {
		bool busy = false;
		if (img->map.count[QCS_JUNK]) {
			int64_t n = erase_batch(img);
			busy = n > 0;
			if (n < 0) {
				/* a failing disk: back off instead of spinning */
				qcow_cond_wait_ms(&img->recycler_wake, &img->lock, 1000);
				continue;
			}
		}
		if (img->recycler_stop)
			break;
		if (img->map.count[QCS_ERASED] && !busy) {
			/* make erased clusters allocatable */
			pthread_mutex_unlock(&img->lock);
			int ret = qcow_flush(img);
			pthread_mutex_lock(&img->lock);
			if (ret)
				qcow_note_error(img, ret, "flushing erased clusters");
			busy = ret == 0;
		}
		if (!busy && should_compact(img)) {
			img->compact_requested = false;
			pthread_mutex_unlock(&img->lock);
			int ret = qcow_compact_run(img, NULL, NULL);
			pthread_mutex_lock(&img->lock);
			if (ret)
				qcow_note_error(img, ret, "compaction");
			img->compact_generation++;
			pthread_cond_broadcast(&img->compact_done);
			continue;
		}
		if (!busy)
			qcow_cond_wait_ms(&img->recycler_wake, &img->lock, 250);
	}
	pthread_mutex_unlock(&img->lock);
	return NULL;
}

int qcow_recycler_start(struct qcow_image *img)
{
	img->recycler_stop = false;
	int ret = pthread_create(&img->recycler_thread, NULL, recycler_main, img);
	if (ret)
		return -ret;
	img->recycler_running = true;
	return 0;
}

void qcow_recycler_stop(struct qcow_image *img)
{
	if (!img->recycler_running)
		return;
	pthread_mutex_lock(&img->lock);
	img->recycler_stop = true;
	pthread_cond_broadcast(&img->recycler_wake);
	pthread_mutex_unlock(&img->lock);
	pthread_join(img->recycler_thread, NULL);
	img->recycler_running = false;
	pthread_mutex_lock(&img->lock);
	img->compact_generation++;
	pthread_cond_broadcast(&img->compact_done);
	pthread_mutex_unlock(&img->lock);
}

void qcow_recycler_kick(struct qcow_image *img)
{
	pthread_mutex_lock(&img->lock);
	pthread_cond_broadcast(&img->recycler_wake);
	pthread_mutex_unlock(&img->lock);
}

void qcow_image_request_compact(struct qcow_image *img)
{
	pthread_mutex_lock(&img->lock);
	img->compact_requested = true;
	pthread_cond_broadcast(&img->recycler_wake);
	pthread_mutex_unlock(&img->lock);
}

int qcow_image_compact(struct qcow_image *img, void (*progress)(double, void *), void *opaque)
{
	if (img->read_only)
		return -EROFS;
	if (!img->recycler_running)
		return qcow_compact_run(img, progress, opaque);
	pthread_mutex_lock(&img->lock);
	uint64_t gen = img->compact_generation;
	img->compact_requested = true;
	pthread_cond_broadcast(&img->recycler_wake);
	while (img->compact_generation == gen && img->recycler_running) {
		qcow_cond_wait_ms(&img->compact_done, &img->lock, 200);
		double p = img->compacting ? img->compact_progress : 0;
		pthread_mutex_unlock(&img->lock);
		if (progress)
			progress(p, opaque);
		pthread_mutex_lock(&img->lock);
	}
	pthread_mutex_unlock(&img->lock);
	int ret;
	bool failed;
	qcow_health_get(img, &ret, &failed);
	if (progress)
		progress(1.0, opaque);
	return ret;
}
