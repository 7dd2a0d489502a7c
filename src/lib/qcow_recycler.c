/*
 * qcow_recycler.c - the background thread that gives space back: it
 * erases Junk and compacts the image (doc/design.md, "The recycler thread").
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
 *  - During truncation, allocations that need to grow the file give up
 *    and wait, outside their resolved request (img->truncating,
 *    qcow_alloc.c); allocations from Available do not.
 *  - In the failed state (qcow_health.c) nothing is erased, moved or
 *    truncated: the thread only waits for the unmount.
 *  - Batches are bounded (MOVE_BATCH clusters) so a guest fsync never waits
 *    behind more than one batch of copying.
 *  - The thread never repeats a step at once that failed or achieved
 *    nothing: failures back off exponentially (1 s to 60 s; a request
 *    resets it), and after a pass that could move nothing (what is left
 *    cannot move: a bitmap table with no lower free run, clusters a snapshot reader of
 *    another process may read) automatic passes wait until the image
 *    changes (recycler_main).  An idle daemon
 *    costs nothing whatever the image holds.
 *  - The automatic trigger counts all the space the file could lose:
 *    free clusters below the last busy one and the free tail.  A free tail
 *    alone is truncated without a pass, only after discards since the
 *    last trim (not the headroom a growing file keeps), and only where it
 *    is Available (no pointer to it can still be durable).
 *  - compactions_done counts passes that succeeded, compactions_failed
 *    the others; each pass leaves what holds the file above its minimum
 *    in img->blocker for the stats.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ERASE_BATCH 4096u
#define MOVE_BATCH_BYTES (16u << 20)
#define MOVE_BATCH_MOVES 1024u

/* ---- what the host got back ------------------------------------------------ */

/*
 * bytes_reclaimed (struct qcow_stats) is measured, not inferred: each step
 * that gives space back (an erase batch, a truncation, a whole compaction
 * pass) reads the file's host allocation (st_blocks) before and after and
 * adds the decrease.  Counting punched and truncated bytes instead counted
 * a punched cluster again when a truncation cut it off, the never-written
 * headroom of a truncated tail, and the holes that a pass punched and then
 * filled again with the clusters it moved down.  Steps nest (a pass erases
 * and truncates): only the outermost measures, so nothing counts twice.
 * The sum is signed: a pass whose copies allocated more than it freed (or
 * a guest that wrote meanwhile) takes off what it added.  Recycler steps
 * run on one thread at a time, but the stats read the sum from others:
 * both fields are atomic.
 */
struct reclaim_scope {
	int64_t before;   /* allocation at the start; -1: not measuring */
};

static void reclaim_begin(struct qcow_image *img, struct reclaim_scope *rs)
{
	rs->before = -1;
	if (__atomic_fetch_add(&img->reclaim_depth, 1, __ATOMIC_RELAXED) == 0)
		rs->before = img->io->ops->allocated(img->io);
}

static void reclaim_end(struct qcow_image *img, const struct reclaim_scope *rs)
{
	__atomic_fetch_sub(&img->reclaim_depth, 1, __ATOMIC_RELAXED);
	if (rs->before < 0)
		return;
	int64_t after = img->io->ops->allocated(img->io);
	if (after >= 0)
		__atomic_fetch_add(&img->bytes_reclaimed, rs->before - after, __ATOMIC_RELAXED);
}

/* ---- erase ---------------------------------------------------------------- */

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
	qcow_assert_locked(img);
	/* failed state: a Junk cluster's unreference may never become
	 * durable, so erasing it could destroy what the disk still shows */
	if (qcow_health_failed(img))
		return -EIO;
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
	struct reclaim_scope rs;
	reclaim_begin(img, &rs);
	for (size_t i = 0; i < n && ret == 0;) {
		size_t j = i + 1;
		while (j < n && taken[j] == taken[j - 1] + 1)
			j++;
		ret = erase_run(img, taken[i], j - i);
		if (ret == 0)
			done = j;
		i = j;
	}
	reclaim_end(img, &rs);

	pthread_mutex_lock(&img->lock);
	for (size_t i = 0; i < n; i++) {
		if (qcow_map_state(&img->map, taken[i]) != QCS_ERASING)
			continue;
		if (i < done && qcow_u64_list_add(&img->erased, taken[i]) == 0)
			qcow_map_set_state(&img->map, taken[i], QCS_ERASED);
		else
			qcow_map_set_state(&img->map, taken[i], QCS_JUNK);
	}
	if (done)
		img->data_dirty = true;
	qcow_free(taken);
	if (ret) {
		qcow_note_error(img, ret, "erasing junk clusters");
		return ret;
	}
	return (int64_t)n;
}

/* ---- truncation ------------------------------------------------------------ */

/* First cluster of the tail that truncation may drop (img->lock held):
 * after the last busy cluster, and with only_available also after every
 * Junk and Erased cluster.  A Junk or Erased cluster's old pointer may
 * still be the durable one until the next flush; dropping it and growing
 * the file again later would show another cluster's data behind that
 * pointer after a crash.  The automatic tail trim (which runs with guest
 * I/O going on) asks for only_available; compaction and close truncate
 * right after their completing flush. */
static uint64_t tail_start(struct qcow_image *img, bool only_available)
{
	qcow_assert_locked(img);
	const struct qcow_map *m = &img->map;
	uint64_t last = qcow_map_last_block(m);
	uint64_t n = last == UINT64_MAX ? 1 : last + 1;
	if (only_available) {
		uint64_t j = qcow_bitmap_prev(&m->junk, m->nclusters);
		if (j != UINT64_MAX && j + 1 > n)
			n = j + 1;
		for (size_t i = 0; i < img->erased.len; i++) {
			uint64_t c = img->erased.v[i];
			if (c < m->nclusters && c + 1 > n && qcow_map_state(m, c) == QCS_ERASED)
				n = c + 1;
		}
	}
	return n;
}

/* Truncates the file after the tail_start cluster; flush_lock held.
 * Returns 1 if the file got shorter, 0 if there was nothing to drop, or
 * -errno. */
static int truncate_after(struct qcow_image *img, bool only_available)
{
	qcow_assert_flush_locked(img);
	if (qcow_health_failed(img))
		return -EIO;   /* nothing more is written in the failed state */
	pthread_mutex_lock(&img->lock);
	uint64_t new_n = tail_start(img, only_available);
	uint64_t old_n = img->map.nclusters;
	if (new_n >= old_n || qcow_map_resize(&img->map, new_n) < 0) {
		pthread_mutex_unlock(&img->lock);
		return 0;
	}
	img->truncating = true;
	/* A request that resolved a cluster of the tail before it became free
	 * (a read of a move source, say) may still be reading it: truncation
	 * destroys contents like an erase, so it waits for the same grace
	 * period.  Requests never wait for it while registered (allocation
	 * says -EAGAIN and the request gives back before it waits). */
	uint64_t ticket = qcow_inflight_ticket(img);
	pthread_mutex_unlock(&img->lock);
	qcow_inflight_wait_before(img, ticket);

	int64_t size = img->io->ops->size(img->io);
	uint64_t new_size = new_n << img->cluster_bits;
	int ret = 0;
	if (size > 0 && (uint64_t)size > new_size) {
		struct reclaim_scope rs;
		reclaim_begin(img, &rs);
		ret = img->io->ops->truncate(img->io, new_size);
		reclaim_end(img, &rs);
	}

	pthread_mutex_lock(&img->lock);
	img->truncating = false;
	pthread_cond_broadcast(&img->truncate_done);
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
		/* the automatic trim notes its errors (once each) itself */
		if (!only_available)
			qcow_logf(QCOW_LOG_ERROR, "%s: truncating to %" PRIu64 " bytes failed: %s", img->io->name, new_size,
				  strerror(-ret));
		return ret;
	}
	return 1;
}

int qcow_truncate_tail(struct qcow_image *img)
{
	int ret = truncate_after(img, false);
	return ret < 0 ? ret : 0;
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

/* Free clusters after the last busy one: truncation drops them. */
static uint64_t free_tail(const struct qcow_image *img)
{
	const struct qcow_map *m = &img->map;
	uint64_t last = qcow_map_last_block(m);
	return last == UINT64_MAX ? m->nclusters : m->nclusters - 1 - last;
}

/* Lowest cluster a move may copy into.  Only Available: a Junk cluster's
 * old pointer may still be the durable one, and copying another cluster's
 * data into it would show that data in a discarded range after a crash.
 * (Erasing it is harmless: the range then reads zeros.) */
static uint64_t lowest_destination(const struct qcow_map *m, uint64_t from)
{
	return qcow_bitmap_next(&m->available, from);
}

enum move_kind {
	MOVE_DATA,      /* pointers in L2 tables (a data cluster, plain or compressed) */
	MOVE_L2,        /* pointers in the active L1 table or in snapshot L1 tables */
	MOVE_REFBLOCK,  /* the pointer in the refcount table */
};

/* Where the pointer at slot lives: the active L1 table (*index = its
 * entry), the refcount table (*index likewise), a snapshot L1 table (a
 * pinned table cluster: *index = UINT64_MAX) or an L2 table (*index = 0). */
static enum move_kind classify_slot(const struct qcow_image *img, uint64_t slot, uint64_t *index)
{
	switch (qcow_slot_kind(img, slot, index)) {
	case QSLOT_ACTIVE_L1:
		return MOVE_L2;
	case QSLOT_REFTABLE:
		return MOVE_REFBLOCK;
	case QSLOT_SNAPSHOT_L1:
		*index = UINT64_MAX;   /* a whole table, not an L2 table: a snapshot's L1 */
		return MOVE_L2;
	case QSLOT_L2:
	case QSLOT_BITMAP_TABLE:
		/* a bitmap data cluster: its pointer sits in a bitmap table,
		 * rewritten through the cache like an L2 entry and written
		 * back by the flush (the table itself is pinned) */
		break;
	}
	return MOVE_DATA;
}

/* What cluster c is, from its first pointer (they all agree in a valid
 * image; the rewrite checks every one). */
static enum move_kind classify(const struct qcow_image *img, uint64_t c)
{
	uint64_t index;
	return classify_slot(img, qcow_map_ref_slot(&img->map, c, 0), &index);
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

/* Whether c holds compressed streams (img->lock held): those move by
 * repacking (qcow_repack.c), one stream at a time, not as clusters. */
static bool holds_compressed(struct qcow_image *img, uint64_t c)
{
	uint64_t e, index;
	uint64_t slot = qcow_map_ref_slot(&img->map, c, 0);
	if (classify_slot(img, slot, &index) != MOVE_DATA)
		return false;
	return !qcow_l2_entry_at(img, slot, &e) || (e & QCOW_OFLAG_COMPRESSED);
}

/* Plans up to max moves under img->lock: the highest movable clusters
 * into the lowest free ones, paired in ascending order of both so runs of
 * neighbours copy as one range. */
static int plan_batch(struct qcow_image *img, struct batch *b, size_t max)
{
	struct qcow_map *m = &img->map;
	b->src = qcow_malloc(max * sizeof(uint64_t));
	b->dst = qcow_malloc(max * sizeof(uint64_t));
	b->n = 0;
	if (!b->src || !b->dst)
		return -ENOMEM;
	uint64_t s = qcow_map_highest_movable(m, m->nclusters);
	uint64_t d = lowest_destination(m, 0);
	while (b->n < max && s != UINT64_MAX && d != UINT64_MAX && d < s) {
		if (!holds_compressed(img, s)) {
			b->src[b->n] = s;
			b->dst[b->n] = d;
			b->n++;
			d = lowest_destination(m, d + 1);
		}
		s = qcow_map_highest_movable(m, s);
	}
	qsort(b->src, b->n, sizeof(uint64_t), cmp_u64);
	/* every destination is below every source, so ascending pairs stay
	 * downward moves */
	for (size_t i = 0; i < b->n; i++)
		if (!qcow_map_move_start(m, b->src[i], b->dst[i])) {
			for (size_t k = 0; k < i; k++)
				qcow_map_move_cancel(m, b->src[k]);
			b->n = 0;
			return -ENOMEM;
		}
	return 0;
}

static bool is_referenced(const struct qcow_map *m, uint64_t c)
{
	enum qcow_cstate s = qcow_map_state(m, c);
	return s == QCS_REF || s == QCS_SHARED;
}

/* Copies one planned move (or a run of neighbouring data moves starting at
 * index i); returns how many moves the run covered. */
static size_t copy_run(struct qcow_image *img, struct batch *b, size_t i, int *ret)
{
	uint64_t cs = img->cluster_size;
	size_t j = i + 1;
	uint8_t *table = NULL;
	enum move_kind kind;

	pthread_mutex_lock(&img->lock);
	struct qcow_move *mv = qcow_map_move_find(&img->map, b->src[i]);
	if (!mv || !is_referenced(&img->map, b->src[i])) {
		pthread_mutex_unlock(&img->lock);
		return 1;
	}
	kind = classify(img, b->src[i]);
	if (kind == MOVE_DATA) {
		while (j < b->n && b->src[j] == b->src[j - 1] + 1 && b->dst[j] == b->dst[j - 1] + 1 &&
		       qcow_map_move_find(&img->map, b->src[j]) && is_referenced(&img->map, b->src[j]) &&
		       (j - i) * cs < MOVE_BATCH_BYTES) {
			if (classify(img, b->src[j]) != MOVE_DATA)
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
	/* The destinations are Available, so they read zeros (punched and
	 * flushed, or new file tail): the backend may skip the source's holes
	 * (qcow_io.h), and a sparse cluster stays sparse after its move. */
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

/* One pointer to a cluster being moved: its slot and, for pointers in
 * L2 tables or snapshot L1 tables, the holding table pinned in the cache
 * (so the rewrite needs no read that could fail halfway). */
struct pointer {
	uint64_t slot;
	struct qcow_cached *holder;   /* NULL: active L1 or refcount table entry */
};

struct pointer_set {
	struct pointer *v;
	size_t n;
};

static void pointers_release(struct qcow_image *img, struct pointer_set *ps)
{
	for (size_t i = 0; i < ps->n; i++)
		if (ps->v[i].holder)
			qcow_cache_unpin(&img->cache, ps->v[i].holder);
	qcow_free(ps->v);
	ps->v = NULL;
	ps->n = 0;
}

static uint64_t pointer_value(struct qcow_image *img, const struct pointer *p)
{
	uint64_t index;
	if (p->holder)
		return qcow_slot_get(img, p->holder, p->slot);   /* 8-byte entries in snapshot L1 and bitmap tables */
	return classify_slot(img, p->slot, &index) == MOVE_REFBLOCK ? img->reftable[index] : img->l1[index];
}

static void pointer_set_value(struct qcow_image *img, const struct pointer *p, uint64_t v)
{
	uint64_t index;
	if (p->holder) {
		qcow_slot_set(img, p->holder, p->slot, v);
	} else if (classify_slot(img, p->slot, &index) == MOVE_REFBLOCK) {
		img->reftable[index] = v;
		qcow_bitmap_set(&img->reftable_dirty, (index * 8) >> img->cluster_bits);
	} else {
		qcow_l1_set(img, index, v);
	}
}

/* Collects (and pins the holders of) every pointer of src into ps and
 * checks that each still holds src's offset.  False when one does not or
 * a table cannot be read: the move is then cancelled (the caller releases
 * ps). */
static bool collect_pointers(struct qcow_image *img, uint64_t src, struct pointer_set *ps)
{
	uint64_t n = qcow_map_refcount(&img->map, src);
	struct pointer *v = qcow_realloc(ps->v, (ps->n + n) * sizeof(*v));
	if (!v)
		return false;
	ps->v = v;
	for (uint64_t i = 0; i < n; i++) {
		struct pointer *p = &ps->v[ps->n];
		uint64_t index;
		int ret;
		p->slot = qcow_map_ref_slot(&img->map, src, i);
		p->holder = NULL;
		enum move_kind k = classify_slot(img, p->slot, &index);
		if (k == MOVE_DATA || index == UINT64_MAX) {
			p->holder = qcow_l2_get(img, p->slot >> img->cluster_bits, &ret);
			if (!p->holder)
				return false;
			qcow_cache_pin(&img->cache, p->holder);
		}
		ps->n++;
		uint64_t e = pointer_value(img, p);
		if ((e & QCOW_OFLAG_COMPRESSED) || (e & QCOW_L2E_OFFSET_MASK) != src << img->cluster_bits)
			return false;
	}
	return true;
}

/* Gives every cluster that table tbl points to its pointers' new slots
 * after the table moved from src to dst. */
static void rehome_table_refs(struct qcow_image *img, const uint8_t *tbl, uint64_t src, uint64_t dst)
{
	uint64_t cs = img->cluster_size;
	unsigned shift = qcow_l2_entry_shift(img);   /* a subcluster bitmap is no pointer */
	for (uint64_t i = 0; i < cs >> shift; i++) {
		uint64_t first, last;
		if (!qcow_entry_clusters(img, qcow_get_be64(tbl + (i << shift)), &first, &last))
			continue;
		for (uint64_t h = first; h <= last && h < img->map.nclusters; h++)
			qcow_map_rehome_refs(&img->map, h, src << img->cluster_bits, dst << img->cluster_bits, cs);
	}
}

/* Rewrites the pointers of one Flushed single move (img->lock and
 * flush_lock held).  Every pointer is checked and its table pinned first,
 * so the move rewrites all of them or none (then it is cancelled). */
static void rewrite_pointer(struct qcow_image *img, struct qcow_move *mv)
{
	qcow_assert_locked(img);
	uint64_t src = mv->src, dst = mv->dst;
	struct pointer_set ps = { 0 };
	struct qcow_cached *t = NULL;
	int ret;
	if (!collect_pointers(img, src, &ps))
		goto cancel;
	if (classify(img, src) == MOVE_L2) {
		/* the cached table (if any) follows the move; without one, the
		 * copy is read back (it must be readable before anything
		 * points at it) */
		t = qcow_cache_find(&img->cache, src);
		if (t)
			qcow_cache_rekey(&img->cache, t, dst);
		else if (!(t = qcow_l2_get(img, dst, &ret)))
			goto cancel;   /* cannot read the copy: keep the original */
	}
	for (size_t i = 0; i < ps.n; i++) {
		uint64_t e = pointer_value(img, &ps.v[i]);
		if ((e & QCOW_L2E_OFFSET_MASK) == src << img->cluster_bits)   /* a slot listed twice is done once */
			pointer_set_value(img, &ps.v[i], (e & ~QCOW_L2E_OFFSET_MASK) | (dst << img->cluster_bits));
	}
	if (t)
		rehome_table_refs(img, t->data, src, dst);
	pointers_release(img, &ps);
	qcow_map_take_refs(&img->map, dst, src, QCS_PENDING);
	qcow_map_move_set_state(&img->map, mv, QMOVE_REFERENCED);
	img->clusters_moved++;
	return;
cancel:
	pointers_release(img, &ps);
	qcow_map_move_cancel(&img->map, src);
}

/* Metadata first: rewriting a data pointer changes its L2 table, which
 * would cancel that table's own move; a table's move re-homes the
 * reverse references of what it points to, so the data moves after it
 * find their pointers at the new place. */
static void rewrite_flushed(struct qcow_image *img)
{
	qcow_assert_flush_locked(img);
	for (int pass = 0; pass < 2; pass++)
		for (unsigned i = 0; i < img->map.nmoves_cap; i++) {
			struct qcow_move *mv = &img->map.moves[i];
			if (!mv->in_use || mv->cancelled || mv->state != QMOVE_FLUSHED)
				continue;
			bool data = classify(img, mv->src) == MOVE_DATA;
			if (data == (pass == 1))
				rewrite_pointer(img, mv);
		}
}

void qcow_retire_moves(struct qcow_image *img)
{
	qcow_assert_locked(img);
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
	if (ret)
		return ret;   /* the recycler notes it (once per distinct error) */
	/* a batch whose moves were all cancelled still made progress
	 * possible; report it as one so the caller tries again */
	return moved ? moved : (b.n ? 1 : 0);
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
	uint64_t start = n ? qcow_map_available_run(&img->map, n, old_c) : UINT64_MAX;
	if (start == UINT64_MAX) {   /* (a run found ends at or below old_c) */
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

/* ---- what holds the file ------------------------------------------------- */

/* Lowest free cluster (Junk, Erased or Available) or UINT64_MAX; img->lock
 * held. */
static uint64_t lowest_free(const struct qcow_image *img)
{
	uint64_t a = qcow_bitmap_next(&img->map.available, 0);
	uint64_t f = qcow_bitmap_next(&img->map.junk, 0);
	if (a < f)
		f = a;
	for (size_t i = 0; i < img->erased.len; i++) {
		uint64_t c = img->erased.v[i];
		if (c < f && c < img->map.nclusters && qcow_map_state(&img->map, c) == QCS_ERASED)
			f = c;
	}
	return f;
}

/* A cluster in use that compaction never moves. */
static bool cannot_move(const struct qcow_map *m, uint64_t c)
{
	enum qcow_cstate s = qcow_map_state(m, c);
	return s == QCS_PINNED || ((s == QCS_REF || s == QCS_SHARED) && qcow_map_is_immovable(m, c));
}

/* Names what cluster c holds, from the metadata on disk.  The walk visits
 * the header structures first, then the active tables, then the
 * snapshots', so the first reference found is the one that says most
 * (an active data cluster before the snapshot that shares it).  Holds
 * flush_lock so that no flush changes the metadata under the walk (it
 * runs once per compaction pass that ends above the minimum). */
static void describe_cluster(struct qcow_image *img, uint64_t c, char *buf, size_t len)
{
	enum qcow_ref_kind kind;
	uint64_t slot;
	pthread_mutex_lock(&img->flush_lock);
	pthread_mutex_lock(&img->lock);
	struct qcow_header h = img->hdr;   /* stable: changed only under flush_lock */
	uint64_t nclusters = img->map.nclusters;
	pthread_mutex_unlock(&img->lock);
	int64_t size = img->io->ops->size(img->io);
	h.file_size = size > 0 ? (uint64_t)size : nclusters << img->cluster_bits;
	struct qcow_scan_geometry g = { .io = img->io, .hdr = &h, .file_clusters = (h.file_size + img->cluster_size - 1) >> img->cluster_bits };
	bool found = qcow_scan_first_user(&g, c, &kind, &slot);
	pthread_mutex_unlock(&img->flush_lock);

	unsigned long long off = (unsigned long long)(c << img->cluster_bits);
	if (!found) {
		snprintf(buf, len, "cluster at 0x%llx that cannot move", off);
		return;
	}
	switch (kind) {
	case QREF_HEADER: snprintf(buf, len, "image header at 0x%llx", off); break;
	case QREF_L1: snprintf(buf, len, "L1 table at 0x%llx", off); break;
	case QREF_REFTABLE: snprintf(buf, len, "refcount table at 0x%llx", off); break;
	case QREF_REFBLOCK: snprintf(buf, len, "refcount block at 0x%llx", off); break;
	case QREF_L2: snprintf(buf, len, "L2 table at 0x%llx", off); break;
	case QREF_DATA: snprintf(buf, len, "data cluster at 0x%llx", off); break;
	case QREF_COMPRESSED: snprintf(buf, len, "compressed data at 0x%llx", off); break;
	case QREF_SNAPSHOT_TABLE: snprintf(buf, len, "snapshot table at 0x%llx", off); break;
	case QREF_SNAPSHOT_L1: snprintf(buf, len, "L1 table of a snapshot at 0x%llx", off); break;
	case QREF_SNAPSHOT_L2:
	case QREF_SNAPSHOT_DATA: snprintf(buf, len, "cluster at 0x%llx used by a snapshot", off); break;
	case QREF_BITMAP_DIR:
	case QREF_BITMAP_TABLE:
	case QREF_BITMAP_DATA: snprintf(buf, len, "persistent bitmap structure at 0x%llx", off); break;
	}
}

/* After a pass: the lowest cluster above the lowest free one that cannot
 * move (everything movable above the free space has moved down by now),
 * named in img->blocker for the stats; nothing when no free space lies
 * below the last busy cluster.  The walk drops img->lock now and then:
 * guest I/O must not wait behind it. */
static void find_blocker(struct qcow_image *img)
{
	uint64_t found = 0;
	pthread_mutex_lock(&img->lock);
	uint64_t f = lowest_free(img), last = qcow_map_last_block(&img->map);
	if (f != UINT64_MAX && last != UINT64_MAX && f < last) {
		uint64_t steps = 0;
		for (uint64_t c = f + 1; c <= last && c < img->map.nclusters; c++) {
			if (cannot_move(&img->map, c)) {
				found = c;
				break;
			}
			if (++steps % 65536 == 0) {
				pthread_mutex_unlock(&img->lock);
				pthread_mutex_lock(&img->lock);
			}
		}
	}
	if (!found) {
		img->blocker_cluster = 0;
		img->blocker[0] = '\0';
	}
	/* the same cluster again (a steady writer on a pinned image): its
	 * description stands, spare the metadata walk */
	bool known = found && found == img->blocker_cluster && img->blocker[0];
	pthread_mutex_unlock(&img->lock);
	if (!found || known)
		return;
	char text[sizeof(img->blocker)];
	describe_cluster(img, found, text, sizeof(text));
	pthread_mutex_lock(&img->lock);
	bool fresh = img->blocker_cluster != found || strcmp(img->blocker, text) != 0;
	img->blocker_cluster = found;
	snprintf(img->blocker, sizeof(img->blocker), "%s", text);
	uint64_t min = (img->map.count[QCS_REF] + img->map.count[QCS_SHARED] + img->map.count[QCS_PINNED] +
			img->map.count[QCS_ROOTS]) << img->cluster_bits;
	uint64_t size = img->map.nclusters << img->cluster_bits;
	pthread_mutex_unlock(&img->lock);
	if (fresh)
		qcow_logf(QCOW_LOG_INFO, "%s: the file (%" PRIu64 " bytes) cannot get down to the %" PRIu64 " bytes in use: %s",
			  img->io->name, size, min, text);
}

void qcow_compact_outcome(struct qcow_image *img, struct qcow_stats *st)
{
	pthread_mutex_lock(&img->lock);
	const struct qcow_map *m = &img->map;
	uint64_t in_use = m->count[QCS_REF] + m->count[QCS_SHARED] + m->count[QCS_PINNED] + m->count[QCS_ROOTS];
	st->compactions_failed = img->compactions_failed;
	st->min_file_size = in_use << img->cluster_bits;
	st->blocker[0] = '\0';
	/* the last pass's finding, as long as it still holds */
	uint64_t c = img->blocker_cluster;
	if (c && c < m->nclusters && cannot_move(m, c) && lowest_free(img) < c && m->nclusters > in_use)
		snprintf(st->blocker, sizeof(st->blocker), "%s", img->blocker);
	/* a failing pass is an error not recovered from until a pass works,
	 * even when a flush in between cleared the health error */
	if (!st->last_error && img->last_compact_ret)
		st->last_error = img->last_compact_ret;
	if (img->snapshot_reader && img->io->ops->other_reader(img->io))   /* still there (one fcntl) */
		snprintf(st->blocker, sizeof(st->blocker), "%s", QCOW_SNAPSHOT_READER_BLOCKER);
	pthread_mutex_unlock(&img->lock);
}

/* Runs batches until nothing moves.  progress in 0..1 is published in
 * img->compact_progress and passed to cb (if any). */
int qcow_compact_run(struct qcow_image *img, void (*cb)(double, void *), void *opaque)
{
	/* the pass as one step: its copies fill holes its erases punched */
	struct reclaim_scope rs;
	reclaim_begin(img, &rs);
	/* moves need Available destinations; offline no thread erases */
	int ret = qcow_health_failed(img) ? -EIO : erase_all_junk(img);
	if (ret)
		goto out;
	if (qcow_snapshot_reader_present(img))
		goto out;   /* a snapshot reader: nothing may move or be cut (qcow_snapshot.c) */
	pthread_mutex_lock(&img->lock);
	uint64_t gap0 = free_below_end(img);
	img->compacting = true;
	img->compact_progress = 0;
	pthread_mutex_unlock(&img->lock);
	unsigned idle_batches = 0, relocations = 0, settles = 0;
	while (ret >= 0 && idle_batches < 3) {
		int64_t n = compact_batch(img);
		if (n < 0) {
			ret = (int)n;
			break;
		}
		if (n > 1)
			settles = 0;   /* progress (as idle_batches counts it) */
		idle_batches = n > 1 ? 0 : idle_batches + 1;
		if (n == 0 || idle_batches >= 3) {
			/* compressed streams next: they move one by one into the
			 * space the clusters left, then the round starts again
			 * (their old clusters become free at the flush) */
			int64_t r = qcow_repack_streams(img);
			if (r < 0) {
				ret = (int)r;
				break;
			}
			if (r > 0) {
				ret = qcow_flush(img);
				if (ret == 0)
					ret = erase_all_junk(img);
				idle_batches = 0;
				settles = 0;
				continue;
			}
			/* clusters are as low as they go: the tables next, then
			 * another round into the space they leave.  The tables
			 * move only into Available runs: the sources of the last
			 * moves (often right below a table) are erased first */
			pthread_mutex_lock(&img->lock);
			const uint64_t *cnt = img->map.count;
			bool junk = cnt[QCS_JUNK] != 0;
			/* what the last moves freed may still be Pending or Junk,
			 * not yet a destination for the clusters and streams that
			 * found none above (see the settling below) */
			bool unsettled = junk || cnt[QCS_PENDING] + cnt[QCS_ERASING] + cnt[QCS_ERASED] + cnt[QCS_FLUSHING];
			pthread_mutex_unlock(&img->lock);
			if (junk && relocations < 4 && (ret = erase_all_junk(img)) != 0)
				break;
			int moved = 0;
			for (int t = 0; t < 2 && relocations < 4 && ret == 0; t++) {
				int r = relocate_one_table(img, t == 0);
				if (r < 0)
					ret = r;
				moved += r > 0;
			}
			/* the snapshot table and the snapshots' L1 tables, one per
			 * call, each only ever into a lower free run (so this ends) */
			pthread_mutex_lock(&img->flush_lock);
			for (int k = 0; k < 64 && ret == 0 && !img->compact_keeps_snapshot_tables; k++) {
				int r = qcow_snapshot_relocate(img);
				if (r < 0)
					ret = r;
				if (r <= 0)
					break;
				moved++;
			}
			/* the persistent bitmaps' tables and directory likewise */
			for (int k = 0; k < 16 && ret == 0; k++) {
				int r = qcow_pbitmap_relocate(img);
				if (r < 0)
					ret = r;
				if (r <= 0)
					break;
				moved++;
			}
			pthread_mutex_unlock(&img->flush_lock);
			if (ret == 0 && moved) {
				relocations++;
				ret = erase_all_junk(img);
				idle_batches = 0;
				continue;
			}
			/* Nothing could move - perhaps only because what the last
			 * moves freed was not yet a destination when the clusters
			 * and streams looked for one: settle it (flush, erase,
			 * flush) and try again, twice at most without progress. */
			if (ret == 0 && unsettled && settles < 2) {
				settles++;
				ret = qcow_flush(img);
				if (ret == 0)
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
out:
	/* only passes that reached their end count as done: a failing disk
	 * must not look like busy compaction */
	pthread_mutex_lock(&img->lock);
	img->compacting = false;
	img->compact_progress = 1.0;
	if (ret == 0)
		img->compactions_done++;
	else
		img->compactions_failed++;
	img->last_compact_ret = ret;
	pthread_mutex_unlock(&img->lock);
	reclaim_end(img, &rs);
	if (ret == 0)
		find_blocker(img);
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

enum recycle_action { ACT_NONE, ACT_TRIM, ACT_COMPACT };

/* What the automatic trigger asks for (img->lock held): the space the
 * file could lose counts, free clusters below the last busy one plus the
 * free tail.  When the free space below the end alone is worth a pass,
 * compact (the pass truncates too); when only the tail makes it worth
 * it, truncate without a pass.  Nothing while discards are still coming
 * in; *wait_ms is lowered to the end of that quiet period. */
static enum recycle_action auto_action(struct qcow_image *img, uint64_t now, unsigned *wait_ms)
{
	qcow_assert_locked(img);
	if (!img->opts.compact)
		return ACT_NONE;
	unsigned quiet = img->opts.compact_quiet_ms ? img->opts.compact_quiet_ms : QCOW_DEFAULT_QUIET_MS;
	uint64_t last = img->last_discard_ms;
	if (last > now)   /* a discard since we read the clock */
		last = now;
	if (now - last < quiet) {
		uint64_t left = quiet - (now - last);
		if (left < *wait_ms)
			*wait_ms = (unsigned)left;
		return ACT_NONE;
	}
	uint64_t threshold = compact_threshold(img);
	uint64_t below = free_below_end(img) << img->cluster_bits;
	uint64_t tail = free_tail(img) << img->cluster_bits;
	if (below >= threshold)
		return ACT_COMPACT;
	/* The free tail alone is given back only after discards freed
	 * something: without them it is the headroom a growing file keeps
	 * ahead of its writers (the file grows by chunks), and trimming it
	 * would make the next chunk wait for a truncation and grow the file
	 * again. */
	if (below + tail >= threshold && img->bytes_discard_requested != img->trim_discard_mark)
		return ACT_TRIM;
	return ACT_NONE;
}

/* Everything an automatic pass depends on: the counters of every state,
 * where the busy and the free clusters end, the tables, the discards and
 * the size.  A discard, a write that allocates or frees, a resize, a
 * table move changes it; time alone does not. */
struct change_stamp {
	uint64_t count[QCS_NSTATES];
	uint64_t nclusters, last_block, lowest_available, discarded, virtual_size, l1_off, rt_off;
};

static void stamp_take(const struct qcow_image *img, struct change_stamp *st)
{
	memset(st, 0, sizeof(*st));
	memcpy(st->count, img->map.count, sizeof(st->count));
	st->nclusters = img->map.nclusters;
	st->last_block = qcow_map_last_block(&img->map);
	st->lowest_available = qcow_map_lowest_available(&img->map);
	st->discarded = img->bytes_discard_requested;
	st->virtual_size = img->virtual_size;
	st->l1_off = img->hdr.l1_table_offset;
	st->rt_off = img->hdr.refcount_table_offset;
}

static bool stamp_same(const struct change_stamp *a, const struct change_stamp *b)
{
	return memcmp(a, b, sizeof(*a)) == 0;
}

/* Exponential back-off for background work that failed (a full or failing
 * disk): 1 s, doubling up to 60 s; reset by a success or a request. */
#define BACKOFF_MIN_MS 1000u
#define BACKOFF_MAX_MS 60000u
/* the thread looks at the trigger this often when nothing wakes it */
#define TICK_MS 250u
/* after a pass that could move nothing, automatic passes wait for a change
 * and, under a steady stream of changes, run at most this often */
#define IDLE_RECHECK_MS 1000u

struct backoff {
	unsigned ms;
	uint64_t until;
};

static void backoff_failed(struct backoff *b)
{
	b->ms = !b->ms ? BACKOFF_MIN_MS : b->ms >= BACKOFF_MAX_MS / 2 ? BACKOFF_MAX_MS : b->ms * 2;
	b->until = qcow_now_ms() + b->ms;
}

static void backoff_reset(struct backoff *b)
{
	b->ms = 0;
	b->until = 0;
}

/* True while b holds work off; lowers *wait_ms to the time left. */
static bool backoff_holds(const struct backoff *b, uint64_t now, unsigned *wait_ms)
{
	if (now >= b->until)
		return false;
	if (b->until - now < *wait_ms)
		*wait_ms = (unsigned)(b->until - now);
	return true;
}

/*
 * The loop.  Each round: erase Junk, flush Erased clusters (so they become
 * Available), then what the trigger asks for.  It sleeps on recycler_wake
 * (discards, flushes, requests) or TICK_MS when there is nothing to do, and
 * never runs a step again at once after it failed or achieved nothing:
 *  - a failed erase or flush holds erasing off (erase_bo), a failed pass
 *    or truncation holds automatic passes off (compact_bo), with
 *    exponential back-off; a request clears both;
 *  - a pass that changed nothing (everything movable is as low as it goes,
 *    what is left is pinned) records the change stamp; automatic passes
 *    then wait until the stamp changes (and IDLE_RECHECK_MS has passed).
 */
static void *recycler_main(void *arg)
{
	struct qcow_image *img = arg;
	struct backoff erase_bo = { 0 }, compact_bo = { 0 };
	struct change_stamp idle, now_stamp;
	bool idle_valid = false;
	uint64_t idle_since = 0;
	int last_failure = 0;

	pthread_mutex_lock(&img->lock);
	while (!img->recycler_stop) {
		if (qcow_health_failed(img)) {
			/* nothing more may be written (qcow_health.c): wait for
			 * the unmount */
			qcow_cond_wait_ms(&img->recycler_wake, &img->lock, TICK_MS);
			continue;
		}
		uint64_t now = qcow_now_ms();
		unsigned wait_ms = TICK_MS;
		bool busy = false;
		if (img->compact_requested) {
			/* a request is a new chance for whatever failed */
			backoff_reset(&erase_bo);
			backoff_reset(&compact_bo);
		}
		bool erase_held = backoff_holds(&erase_bo, now, &wait_ms);
		if (img->map.count[QCS_JUNK] && !erase_held) {
			int64_t n = erase_batch(img);    /* notes its error */
			if (n < 0) {
				backoff_failed(&erase_bo);
				erase_held = true;
			}
			busy = n > 0;
			if (img->recycler_stop)
				break;
		}
		if (!busy && img->map.count[QCS_ERASED] && !erase_held) {
			/* make erased clusters allocatable */
			pthread_mutex_unlock(&img->lock);
			int ret = qcow_flush(img);
			pthread_mutex_lock(&img->lock);
			if (ret) {
				qcow_note_error(img, ret, "flushing erased clusters");
				backoff_failed(&erase_bo);
			} else {
				/* the whole erase cycle worked */
				backoff_reset(&erase_bo);
				busy = true;
			}
		}
		if (busy)
			continue;

		bool requested = img->compact_requested;
		enum recycle_action act = requested ? ACT_COMPACT : ACT_NONE;
		if (!requested && !backoff_holds(&compact_bo, now, &wait_ms))
			act = auto_action(img, now, &wait_ms);
		if (act == ACT_COMPACT && !requested && idle_valid) {
			stamp_take(img, &now_stamp);
			if (stamp_same(&idle, &now_stamp) || now < idle_since + IDLE_RECHECK_MS)
				act = ACT_NONE;   /* nothing changed since a pass that could do nothing */
		}
		if (act == ACT_TRIM) {
			img->trim_discard_mark = img->bytes_discard_requested;
			pthread_mutex_unlock(&img->lock);
			pthread_mutex_lock(&img->flush_lock);
			int r = truncate_after(img, true);
			pthread_mutex_unlock(&img->flush_lock);
			pthread_mutex_lock(&img->lock);
			if (r < 0) {
				qcow_note_error(img, r, "truncating the free tail");
				backoff_failed(&compact_bo);
			} else if (r > 0) {
				continue;
			}
		} else if (act == ACT_COMPACT) {
			struct change_stamp before;
			img->compact_requested = false;
			stamp_take(img, &before);
			pthread_mutex_unlock(&img->lock);
			int ret = qcow_compact_run(img, NULL, NULL);
			pthread_mutex_lock(&img->lock);
			idle_valid = false;
			if (ret) {
				/* a flush that works in between clears the health
				 * error; the same failure again is not news */
				if (ret != last_failure)
					qcow_note_error(img, ret, "compaction");
				last_failure = ret;
				backoff_failed(&compact_bo);
			} else {
				last_failure = 0;
				backoff_reset(&compact_bo);
				stamp_take(img, &idle);
				idle_valid = stamp_same(&before, &idle);
				idle_since = qcow_now_ms();
			}
			img->compact_generation++;
			pthread_cond_broadcast(&img->compact_done);
			if (ret == 0 && !idle_valid)
				continue;   /* it got somewhere: look again at once */
		}
		if (img->recycler_stop)
			break;
		qcow_cond_wait_ms(&img->recycler_wake, &img->lock, wait_ms ? wait_ms : 1);
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
	/* a pass that was running when we asked ends with our request still
	 * pending: wait for the pass that took it */
	while ((img->compact_generation == gen || img->compact_requested) && img->recycler_running) {
		qcow_cond_wait_ms(&img->compact_done, &img->lock, 200);
		double p = img->compacting ? img->compact_progress : 0;
		pthread_mutex_unlock(&img->lock);
		if (progress)
			progress(p, opaque);
		pthread_mutex_lock(&img->lock);
	}
	int ret = img->last_compact_ret;
	pthread_mutex_unlock(&img->lock);
	int failed = qcow_health_failed(img);
	if (progress)
		progress(1.0, opaque);
	return failed ? failed : ret;
}
