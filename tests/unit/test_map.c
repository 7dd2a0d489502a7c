/*
 * test_map.c - the cluster map (qcow_map.c) against a plain model.
 *
 * Covers: init and resize (grow adds Available clusters; shrink refuses
 * busy clusters with -EBUSY and changes nothing then), every transition
 * (set_ref, set_pinned, set_state, add_ref, drop_ref) with the counters
 * and total_used / total_free,
 * want_refcount per state, the refcount-dirty marks (set exactly when a
 * cluster's wanted refcount changes), the searches (lowest_available,
 * next_junk, highest_movable, last_block, is_immovable), the move state
 * machine (start, find, cancel only before Referenced, set_state,
 * complete), qcow_map_check on consistent maps and on deliberately
 * corrupted ones, long random sequences with qcow_map_check and a full
 * model comparison after every step, and the memory figure per cluster.
 */
#include "qcow_internal.h"
#include "tap.h"

#include <errno.h>
#include <string.h>

static unsigned long long seed = 0x3a9c1d5ull;

/* ---- model ---------------------------------------------------------------- */

#define MAXSLOTS 12

struct mcl {
	enum qcow_cstate st;
	uint64_t val;   /* REF: slot; PINNED: count; SHARED: number of slots */
	uint64_t slots[MAXSLOTS];   /* SHARED: the pointers' slots, in the map's order */
};

struct mmove {
	uint64_t src, dst;
	enum qcow_move_state state;
	bool cancelled;
	bool live;
};

#define MAXMOVES 512

struct model {
	struct mcl *c;
	uint64_t n;
	uint64_t first_movable;
	struct mmove mv[MAXMOVES];
};

static uint64_t want_of(const struct mcl *c)
{
	switch (c->st) {
	case QCS_REF: case QCS_COPIES: case QCS_ROOTS: case QCS_PENDING:
		return 1;
	case QCS_PINNED: case QCS_SHARED:
		return c->val;
	default:
		return 0;
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static bool is_free(enum qcow_cstate s) { return s == QCS_JUNK || s == QCS_ERASED || s == QCS_AVAILABLE; }

static void model_resize(struct model *m, uint64_t n)
{
	m->c = realloc(m->c, (n ? n : 1) * sizeof(*m->c));
	for (uint64_t i = m->n; i < n; i++)
		m->c[i] = (struct mcl){ .st = QCS_AVAILABLE, .val = 0 };
	m->n = n;
}

/* the move (live, not cancelled) whose src or dst is c, or NULL */
static struct mmove *model_move_of(struct model *m, uint64_t c)
{
	for (int i = 0; i < MAXMOVES; i++)
		if (m->mv[i].live && !m->mv[i].cancelled && (m->mv[i].src == c || m->mv[i].dst == c))
			return &m->mv[i];
	return NULL;
}

static unsigned model_live_moves(const struct model *m)
{
	unsigned k = 0;
	for (int i = 0; i < MAXMOVES; i++)
		k += m->mv[i].live;
	return k;
}

/* ---- comparison ------------------------------------------------------------- */

static unsigned long step_no;
static unsigned fails;

#define MCHECK(cond, ...) do { if (!(cond)) { if (fails++ < 10) CHECK(cond, __VA_ARGS__); } } while (0)

static void compare(const struct qcow_map *map, const struct model *m, const char *ctx)
{
	const char *bad = qcow_map_check(map);
	MCHECK(bad == NULL, "%s step %lu: qcow_map_check: %s", ctx, step_no, bad);
	MCHECK(map->nclusters == m->n, "%s step %lu: nclusters %llu, model %llu", ctx, step_no,
	       (unsigned long long)map->nclusters, (unsigned long long)m->n);
	uint64_t count[QCS_NSTATES] = { 0 };
	uint64_t lowest_avail = UINT64_MAX, last = UINT64_MAX, hi_movable = UINT64_MAX;
	static uint8_t *moving;
	static uint64_t moving_n;
	if (moving_n < m->n + 1) {
		moving_n = m->n + 1;
		moving = realloc(moving, moving_n);
	}
	memset(moving, 0, m->n + 1);
	for (int i = 0; i < MAXMOVES; i++)
		if (m->mv[i].live && !m->mv[i].cancelled && m->mv[i].src < m->n)
			moving[m->mv[i].src] = 1;
	for (uint64_t c = 0; c < m->n; c++) {
		const struct mcl *x = &m->c[c];
		count[x->st]++;
		enum qcow_cstate s = qcow_map_state(map, c);
		MCHECK(s == x->st, "%s step %lu: cluster %llu is %s, model %s", ctx, step_no, (unsigned long long)c,
		       qcow_map_state_name(s), qcow_map_state_name(x->st));
		if (s != x->st)
			continue;
		if (s == QCS_REF)
			MCHECK(qcow_map_slot(map, c) == x->val, "%s step %lu: slot of %llu", ctx, step_no,
			       (unsigned long long)c);
		if (s == QCS_SHARED) {
			MCHECK(qcow_map_refcount(map, c) == x->val, "%s step %lu: refcount of shared %llu is %llu, model %llu",
			       ctx, step_no, (unsigned long long)c, (unsigned long long)qcow_map_refcount(map, c),
			       (unsigned long long)x->val);
			uint64_t got[MAXSLOTS], want[MAXSLOTS];
			for (uint64_t i = 0; i < x->val && i < MAXSLOTS; i++) {
				got[i] = qcow_map_ref_slot(map, c, i);
				want[i] = x->slots[i];
			}
			qsort(got, x->val, sizeof(uint64_t), cmp_u64);
			qsort(want, x->val, sizeof(uint64_t), cmp_u64);
			MCHECK(memcmp(got, want, x->val * sizeof(uint64_t)) == 0, "%s step %lu: slots of shared %llu", ctx,
			       step_no, (unsigned long long)c);
		}
		if (s == QCS_PINNED)
			MCHECK(qcow_map_pincount(map, c) == x->val, "%s step %lu: pincount of %llu is %llu, model %llu",
			       ctx, step_no, (unsigned long long)c, (unsigned long long)qcow_map_pincount(map, c),
			       (unsigned long long)x->val);
		MCHECK(qcow_map_want_refcount(map, c) == want_of(x), "%s step %lu: want_refcount(%llu) = %llu, model %llu",
		       ctx, step_no, (unsigned long long)c, (unsigned long long)qcow_map_want_refcount(map, c),
		       (unsigned long long)want_of(x));
		bool immovable = c < m->first_movable || x->st == QCS_PINNED;
		MCHECK(qcow_map_is_immovable(map, c) == immovable, "%s step %lu: is_immovable(%llu)", ctx, step_no,
		       (unsigned long long)c);
		MCHECK(qcow_map_is_moving(map, c) == (bool)moving[c], "%s step %lu: is_moving(%llu)", ctx, step_no,
		       (unsigned long long)c);
		if (x->st == QCS_AVAILABLE && lowest_avail == UINT64_MAX)
			lowest_avail = c;
		if (!is_free(x->st))
			last = c;
		if ((x->st == QCS_REF || x->st == QCS_SHARED) && c >= m->first_movable && !moving[c])
			hi_movable = c;
	}
	for (int s = 0; s < QCS_NSTATES; s++)
		MCHECK(map->count[s] == count[s], "%s step %lu: count[%s] = %llu, model %llu", ctx, step_no,
		       qcow_map_state_name(s), (unsigned long long)map->count[s], (unsigned long long)count[s]);
	MCHECK(qcow_map_total_used(map) == count[QCS_REF] + count[QCS_SHARED] + count[QCS_PINNED], "%s step %lu: total_used %llu", ctx, step_no,
	       (unsigned long long)qcow_map_total_used(map));
	MCHECK(qcow_map_total_free(map) == count[QCS_JUNK] + count[QCS_ERASED] + count[QCS_AVAILABLE],
	       "%s step %lu: total_free %llu", ctx, step_no, (unsigned long long)qcow_map_total_free(map));
	MCHECK(qcow_map_lowest_available(map) == lowest_avail, "%s step %lu: lowest_available %llu, model %llu", ctx,
	       step_no, (unsigned long long)qcow_map_lowest_available(map), (unsigned long long)lowest_avail);
	MCHECK(qcow_map_last_block(map) == last, "%s step %lu: last_block %llu, model %llu", ctx, step_no,
	       (unsigned long long)qcow_map_last_block(map), (unsigned long long)last);
	MCHECK(qcow_map_highest_movable(map, m->n) == hi_movable, "%s step %lu: highest_movable(n) %llu, model %llu",
	       ctx, step_no, (unsigned long long)qcow_map_highest_movable(map, m->n), (unsigned long long)hi_movable);
	MCHECK(qcow_map_want_refcount(map, m->n) == 0 && qcow_map_want_refcount(map, m->n + 1000) == 0,
	       "%s: want_refcount past the end", ctx);
	/* a few random search positions */
	for (int k = 0; k < 4 && m->n; k++) {
		uint64_t from = tap_rand(&seed) % (m->n + 1);
		uint64_t j = UINT64_MAX, h = UINT64_MAX;
		for (uint64_t c = from; c < m->n; c++)
			if (m->c[c].st == QCS_JUNK) {
				j = c;
				break;
			}
		for (uint64_t c = from; c-- > m->first_movable;)
			if ((m->c[c].st == QCS_REF || m->c[c].st == QCS_SHARED) && !moving[c]) {
				h = c;
				break;
			}
		MCHECK(qcow_map_next_junk(map, from) == j, "%s step %lu: next_junk(%llu) = %llu, model %llu", ctx, step_no,
		       (unsigned long long)from, (unsigned long long)qcow_map_next_junk(map, from), (unsigned long long)j);
		MCHECK(qcow_map_highest_movable(map, from) == h, "%s step %lu: highest_movable(%llu) = %llu, model %llu",
		       ctx, step_no, (unsigned long long)from, (unsigned long long)qcow_map_highest_movable(map, from),
		       (unsigned long long)h);
	}
	MCHECK(map->nmoves_active == model_live_moves(m), "%s step %lu: nmoves_active %u, model %u", ctx, step_no,
	       map->nmoves_active, model_live_moves(m));
}

/* ---- rc_dirty bookkeeping ----------------------------------------------------- */

static void rc_clear(struct qcow_map *map)
{
	for (uint64_t b = qcow_bitmap_next(&map->rc_dirty, 0); b != UINT64_MAX; b = qcow_bitmap_next(&map->rc_dirty, b + 1))
		qcow_bitmap_clear(&map->rc_dirty, b);
}

static uint64_t *want_before;

static void rc_snapshot(const struct model *m)
{
	want_before = realloc(want_before, (m->n ? m->n : 1) * sizeof(uint64_t));
	for (uint64_t c = 0; c < m->n; c++)
		want_before[c] = want_of(&m->c[c]);
}

/* The marked blocks must be exactly those holding a cluster whose wanted
 * refcount changed since rc_snapshot (clusters that exist on both sides). */
static void rc_verify(const struct qcow_map *map, const struct model *m, uint64_t n_before, const char *ctx)
{
	uint64_t n = n_before < m->n ? n_before : m->n;
	uint64_t nb = map->rc_dirty.nbits;
	for (uint64_t b = 0; b < nb; b++) {
		bool expect = false;
		for (uint64_t c = b << map->rb_shift; c < ((b + 1) << map->rb_shift) && c < n; c++)
			if (want_before[c] != want_of(&m->c[c]))
				expect = true;
		bool got = qcow_bitmap_test(&map->rc_dirty, b);
		MCHECK(got == expect, "%s step %lu: refcount block %llu %s dirty", ctx, step_no, (unsigned long long)b,
		       got ? "is marked but nothing in it changed its wanted refcount" : "changed but is not marked");
	}
	/* every block with clusters is representable */
	if (m->n)
		MCHECK(((m->n - 1) >> map->rb_shift) < nb, "%s: rc_dirty too small (%llu bits for %llu clusters)", ctx,
		       (unsigned long long)nb, (unsigned long long)m->n);
}

/* ---- fixed scenarios ---------------------------------------------------------- */

static void fresh(struct qcow_map *map, struct model *m, uint64_t n, unsigned rb_shift)
{
	memset(m, 0, sizeof(*m));
	REQUIRE(qcow_map_init(map, n, rb_shift) == 0, "init %llu clusters", (unsigned long long)n);
	map->first_movable = 1;
	m->first_movable = 1;
	model_resize(m, n);
}

static void basics(void)
{
	struct qcow_map map;
	struct model m;
	fresh(&map, &m, 100, 4);
	CHECK(map.nclusters == 100 && map.count[QCS_AVAILABLE] == 100, "init: 100 Available");
	CHECK(qcow_map_check(&map) == NULL, "init: consistent");
	CHECK(qcow_map_lowest_available(&map) == 0, "init: lowest available 0");
	CHECK(qcow_map_last_block(&map) == UINT64_MAX, "init: no last block");
	CHECK(qcow_map_next_junk(&map, 0) == UINT64_MAX, "init: no junk");
	CHECK(qcow_map_highest_movable(&map, 100) == UINT64_MAX, "init: nothing movable");
	for (uint64_t c = 0; c < 100; c++)
		CHECK(qcow_map_want_refcount(&map, c) == 0, "init: want 0 at %llu", (unsigned long long)c);

	/* ROOTS: allocated, want 1, busy */
	rc_clear(&map);
	qcow_map_set_state(&map, 5, QCS_ROOTS);
	CHECK(qcow_map_state(&map, 5) == QCS_ROOTS && qcow_map_want_refcount(&map, 5) == 1, "roots want 1");
	CHECK(qcow_bitmap_test(&map.rc_dirty, 0) && map.rc_dirty.count == 1, "roots marks block 0 only");
	CHECK(qcow_map_last_block(&map) == 5 && qcow_map_lowest_available(&map) == 0, "roots is busy");
	CHECK(map.count[QCS_ROOTS] == 1 && map.count[QCS_AVAILABLE] == 99, "roots counts");

	/* ROOTS -> REF: want stays 1, no mark */
	rc_clear(&map);
	qcow_map_set_ref(&map, 5, 0x10008);
	CHECK(qcow_map_state(&map, 5) == QCS_REF && qcow_map_slot(&map, 5) == 0x10008, "ref with slot");
	CHECK(map.rc_dirty.count == 0, "roots -> ref does not mark (want 1 -> 1)");
	CHECK(qcow_map_highest_movable(&map, 100) == 5 && qcow_map_highest_movable(&map, 5) == UINT64_MAX &&
	      qcow_map_highest_movable(&map, 6) == 5, "ref is movable, before is exclusive");
	CHECK(!qcow_map_is_immovable(&map, 5), "ref is not immovable");
	/* re-pointing a REF (slot change) does not mark */
	qcow_map_set_ref(&map, 5, 0x20010);
	CHECK(map.rc_dirty.count == 0 && qcow_map_slot(&map, 5) == 0x20010, "slot change does not mark");

	/* add_ref: REF -> SHARED(2) -> SHARED(3), every slot kept, still movable */
	qcow_map_add_ref(&map, 5, 0x30000);
	CHECK(qcow_map_state(&map, 5) == QCS_SHARED && qcow_map_refcount(&map, 5) == 2, "add_ref REF -> SHARED(2)");
	CHECK(qcow_map_want_refcount(&map, 5) == 2 && map.rc_dirty.count == 1, "shared(2) wants 2, marked");
	CHECK(!qcow_map_is_immovable(&map, 5) && qcow_map_highest_movable(&map, 100) == 5, "shared is movable");
	CHECK(qcow_map_has_ref(&map, 5, 0x20010) && qcow_map_has_ref(&map, 5, 0x30000) && !qcow_map_has_ref(&map, 5, 0x30008),
	      "shared keeps both slots");
	rc_clear(&map);
	qcow_map_add_ref(&map, 5, 0x30000);   /* the same slot again: a table two L1s share */
	CHECK(qcow_map_refcount(&map, 5) == 3 && map.rc_dirty.count == 1, "SHARED(3), marked");
	qcow_map_replace_ref(&map, 5, 0x30000, 0x50000);
	CHECK(qcow_map_has_ref(&map, 5, 0x50000) && qcow_map_has_ref(&map, 5, 0x30000), "replace_ref moves one occurrence");
	qcow_map_drop_ref(&map, 5, 0x50000);
	qcow_map_drop_ref(&map, 5, 0x30000);
	CHECK(qcow_map_state(&map, 5) == QCS_REF && qcow_map_slot(&map, 5) == 0x20010 && map.nlists - 1 == map.lists_free,
	      "SHARED(2) -> REF keeps the other slot and frees the list");
	/* one slot many times (an L2 table many L1 tables share): one list
	 * entry per 8 references */
	for (int i = 0; i < 19; i++)
		REQUIRE(qcow_map_add_ref(&map, 5, 0x20010) == 0, "add_ref");
	CHECK(qcow_map_state(&map, 5) == QCS_SHARED && qcow_map_refcount(&map, 5) == 20 &&
	      map.lists[map.entry[5] & ((1ull << 56) - 1)].len == 3 && qcow_map_ref_slot(&map, 5, 19) == 0x20010,
	      "20 references from one slot in 3 list entries");
	for (int i = 0; i < 19; i++)
		qcow_map_drop_ref(&map, 5, 0x20010);
	CHECK(qcow_map_state(&map, 5) == QCS_REF && qcow_map_slot(&map, 5) == 0x20010, "back to REF");
	/* a table reference (slot 0) pins: PINNED(2) -> PINNED(3) */
	qcow_map_add_ref(&map, 5, 0);
	CHECK(qcow_map_state(&map, 5) == QCS_PINNED && qcow_map_pincount(&map, 5) == 2, "add_ref slot 0 -> PINNED(2)");
	CHECK(qcow_map_is_immovable(&map, 5) && qcow_map_highest_movable(&map, 100) == UINT64_MAX, "pinned is immovable");
	qcow_map_add_ref(&map, 5, 0);
	CHECK(qcow_map_pincount(&map, 5) == 3 && qcow_map_want_refcount(&map, 5) == 3, "PINNED(3)");
	CHECK(map.count[QCS_PINNED] == 1 && map.count[QCS_REF] == 0, "pinned counts");
	/* drop_ref: 3 -> 2 -> 1 -> Junk */
	qcow_map_drop_ref(&map, 5, 0x30000);
	CHECK(qcow_map_state(&map, 5) == QCS_PINNED && qcow_map_pincount(&map, 5) == 2, "drop 3 -> 2");
	qcow_map_drop_ref(&map, 5, 0x30000);
	CHECK(qcow_map_state(&map, 5) == QCS_PINNED && qcow_map_pincount(&map, 5) == 1, "drop 2 -> 1");
	rc_clear(&map);
	qcow_map_drop_ref(&map, 5, 0x30000);
	CHECK(qcow_map_state(&map, 5) == QCS_JUNK && qcow_map_want_refcount(&map, 5) == 0, "drop PINNED(1) -> Junk");
	CHECK(map.rc_dirty.count == 1, "drop to junk marks");
	CHECK(qcow_map_next_junk(&map, 0) == 5 && qcow_map_next_junk(&map, 5) == 5 && qcow_map_next_junk(&map, 6) == UINT64_MAX,
	      "next_junk");
	CHECK(qcow_map_last_block(&map) == UINT64_MAX, "junk is not a block");
	/* add_ref on a free cluster -> REF with that slot; drop_ref REF -> Junk */
	qcow_map_add_ref(&map, 5, 0x4000);
	CHECK(qcow_map_state(&map, 5) == QCS_REF && qcow_map_slot(&map, 5) == 0x4000, "add_ref free -> REF");
	qcow_map_drop_ref(&map, 5, 0x4000);
	CHECK(qcow_map_state(&map, 5) == QCS_JUNK, "drop_ref REF -> Junk");
	CHECK(qcow_map_check(&map) == NULL, "consistent after the transitions: %s", qcow_map_check(&map));

	/* want per state and busy-ness of each free/transient state */
	static const struct { enum qcow_cstate s; uint64_t want; bool busy; } tab[] = {
		{ QCS_JUNK, 0, false }, { QCS_ERASING, 0, true }, { QCS_ERASED, 0, false }, { QCS_FLUSHING, 0, true },
		{ QCS_AVAILABLE, 0, false }, { QCS_ROOTS, 1, true }, { QCS_PENDING, 1, true },
	};
	for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++) {
		qcow_map_set_state(&map, 7, tab[i].s);
		CHECK(qcow_map_want_refcount(&map, 7) == tab[i].want, "want of %s", qcow_map_state_name(tab[i].s));
		CHECK((qcow_map_last_block(&map) == 7) == tab[i].busy, "%s %s a block", qcow_map_state_name(tab[i].s),
		      tab[i].busy ? "is" : "is not");
		CHECK(qcow_map_check(&map) == NULL, "consistent with %s", qcow_map_state_name(tab[i].s));
	}
	qcow_map_set_pinned(&map, 7, 9);
	CHECK(qcow_map_want_refcount(&map, 7) == 9, "PINNED(9) wants 9");
	qcow_map_set_state(&map, 7, QCS_AVAILABLE);
	qcow_map_set_state(&map, 5, QCS_AVAILABLE);

	/* rc_dirty only when want changes: Junk <-> Available <-> Erased never mark */
	rc_clear(&map);
	qcow_map_set_state(&map, 40, QCS_JUNK);
	qcow_map_set_state(&map, 40, QCS_ERASING);
	qcow_map_set_state(&map, 40, QCS_ERASED);
	qcow_map_set_state(&map, 40, QCS_FLUSHING);
	qcow_map_set_state(&map, 40, QCS_AVAILABLE);
	CHECK(map.rc_dirty.count == 0, "free-state round trip marks nothing");
	qcow_map_set_state(&map, 40, QCS_ROOTS);
	qcow_map_set_pinned(&map, 40, 1);
	qcow_map_set_ref(&map, 40, 8);
	qcow_map_set_state(&map, 40, QCS_PENDING);
	CHECK(qcow_bitmap_test(&map.rc_dirty, 40 >> 4) && map.rc_dirty.count == 1, "only block 2 marked (0 -> 1)");
	rc_clear(&map);
	qcow_map_set_state(&map, 40, QCS_ROOTS);
	qcow_map_set_state(&map, 40, QCS_PENDING);
	CHECK(map.rc_dirty.count == 0, "1 -> 1 transitions do not mark");
	qcow_map_set_state(&map, 40, QCS_AVAILABLE);
	CHECK(map.rc_dirty.count == 1 && qcow_bitmap_test(&map.rc_dirty, 2), "1 -> 0 marks block 2");
	qcow_map_mark_rc_dirty(&map, 99);
	CHECK(qcow_bitmap_test(&map.rc_dirty, 99 >> 4), "mark_rc_dirty marks the cluster's block");
	rc_clear(&map);
	qcow_map_mark_rc_dirty(&map, 5000);
	CHECK(map.rc_dirty.nbits > (5000 >> 4) && qcow_bitmap_test(&map.rc_dirty, 5000 >> 4),
	      "mark_rc_dirty past the map grows the marks");

	/* cluster 0 (below first_movable): pinned is fine, REF is not */
	qcow_map_set_pinned(&map, 0, 1);
	CHECK(qcow_map_is_immovable(&map, 0) && qcow_map_check(&map) == NULL, "pinned header cluster");
	qcow_map_set_ref(&map, 0, 16);
	CHECK(qcow_map_is_immovable(&map, 0), "cluster 0 stays immovable as REF");
	CHECK(qcow_map_highest_movable(&map, 100) == UINT64_MAX, "highest_movable skips below first_movable");
	CHECK(qcow_map_check(&map) != NULL, "REF below first_movable is reported");
	qcow_map_set_pinned(&map, 0, 1);
	CHECK(qcow_map_check(&map) == NULL, "consistent again");
	qcow_map_free(&map);
	free(m.c);
}

static void resize(void)
{
	struct qcow_map map;
	struct model m;
	fresh(&map, &m, 100, 5);
	qcow_map_set_pinned(&map, 0, 1);
	qcow_map_set_ref(&map, 50, 512);
	qcow_map_set_state(&map, 60, QCS_JUNK);
	qcow_map_set_state(&map, 61, QCS_ERASED);
	qcow_map_set_state(&map, 62, QCS_ERASING);
	qcow_map_set_state(&map, 70, QCS_JUNK);
	qcow_map_set_state(&map, 80, QCS_ERASED);

	/* grow: new clusters are Available */
	CHECK(qcow_map_resize(&map, 300) == 0, "grow to 300");
	CHECK(map.nclusters == 300 && map.count[QCS_AVAILABLE] == 300 - 7, "grow counts: avail %llu",
	      (unsigned long long)map.count[QCS_AVAILABLE]);
	for (uint64_t c = 100; c < 300; c++)
		if (qcow_map_state(&map, c) != QCS_AVAILABLE) {
			CHECK(0, "grown cluster %llu is %s", (unsigned long long)c, qcow_map_state_name(qcow_map_state(&map, c)));
			break;
		}
	CHECK(qcow_map_check(&map) == NULL, "consistent after grow: %s", qcow_map_check(&map));
	CHECK(map.rc_dirty.nbits >= (299 >> 5) + 1, "rc_dirty covers the grown map");
	CHECK(qcow_map_lowest_available(&map) == 1, "lowest available after grow");

	/* shrink over a busy cluster: -EBUSY, nothing changed */
	qcow_map_set_state(&map, 250, QCS_ROOTS);
	uint64_t cnt[QCS_NSTATES];
	memcpy(cnt, map.count, sizeof(cnt));
	CHECK(qcow_map_resize(&map, 200) == -EBUSY, "shrink over ROOTS is -EBUSY");
	CHECK(map.nclusters == 300 && memcmp(cnt, map.count, sizeof(cnt)) == 0 && qcow_map_state(&map, 250) == QCS_ROOTS,
	      "refused shrink changes nothing");
	static const enum qcow_cstate busy[] = { QCS_REF, QCS_PINNED, QCS_ERASING, QCS_FLUSHING, QCS_COPIES, QCS_ROOTS,
						 QCS_PENDING };
	for (size_t i = 0; i < sizeof(busy) / sizeof(busy[0]); i++) {
		if (busy[i] == QCS_REF)
			qcow_map_set_ref(&map, 250, 1024);
		else if (busy[i] == QCS_PINNED)
			qcow_map_set_pinned(&map, 250, 1);
		else
			qcow_map_set_state(&map, 250, busy[i]);
		CHECK(qcow_map_resize(&map, 250) == -EBUSY, "shrink dropping a %s cluster is -EBUSY",
		      qcow_map_state_name(busy[i]));
		CHECK(map.nclusters == 300 && qcow_map_state(&map, 250) == busy[i], "unchanged after refusing %s",
		      qcow_map_state_name(busy[i]));
	}
	qcow_map_set_state(&map, 250, QCS_JUNK);
	qcow_map_set_state(&map, 260, QCS_ERASED);
	CHECK(qcow_map_check(&map) == NULL, "consistent after refusals: %s", qcow_map_check(&map));

	/* shrink dropping Junk, Erased and Available is fine */
	CHECK(qcow_map_resize(&map, 63) == 0, "shrink to 63 drops junk/erased/available");
	CHECK(map.nclusters == 63, "nclusters 63");
	CHECK(map.count[QCS_JUNK] == 1 && map.count[QCS_ERASED] == 1 && map.count[QCS_ERASING] == 1 &&
	      map.count[QCS_REF] == 1 && map.count[QCS_PINNED] == 1 && map.count[QCS_AVAILABLE] == 63 - 5,
	      "counts after shrink: junk %llu erased %llu avail %llu", (unsigned long long)map.count[QCS_JUNK],
	      (unsigned long long)map.count[QCS_ERASED], (unsigned long long)map.count[QCS_AVAILABLE]);
	CHECK(qcow_map_check(&map) == NULL, "consistent after shrink: %s", qcow_map_check(&map));
	CHECK(qcow_map_next_junk(&map, 61) == UINT64_MAX, "dropped junk is gone from the search");
	CHECK(qcow_map_last_block(&map) == 62, "last block 62 (erasing)");
	CHECK(qcow_map_resize(&map, 62) == -EBUSY, "cannot drop the erasing cluster");
	/* grow again: the clusters that were Junk before are Available now */
	CHECK(qcow_map_resize(&map, 128) == 0, "regrow");
	CHECK(qcow_map_state(&map, 70) == QCS_AVAILABLE && qcow_map_state(&map, 80) == QCS_AVAILABLE &&
	      qcow_map_state(&map, 100) == QCS_AVAILABLE, "regrown clusters are Available");
	CHECK(qcow_map_next_junk(&map, 61) == UINT64_MAX, "no stale junk bit after regrow");
	CHECK(qcow_map_check(&map) == NULL, "consistent after regrow: %s", qcow_map_check(&map));
	/* shrink to exactly the last block + 1, then to 0 after freeing */
	qcow_map_set_state(&map, 62, QCS_ERASED);
	CHECK(qcow_map_resize(&map, 51) == 0, "shrink to last block + 1");
	CHECK(qcow_map_last_block(&map) == 50 && qcow_map_check(&map) == NULL, "last block 50");
	qcow_map_set_state(&map, 50, QCS_JUNK);
	qcow_map_set_state(&map, 0, QCS_AVAILABLE);
	CHECK(qcow_map_resize(&map, 0) == 0, "shrink to 0");
	CHECK(map.nclusters == 0 && qcow_map_check(&map) == NULL, "empty map");
	uint64_t total = 0;
	for (int s = 0; s < QCS_NSTATES; s++)
		total += map.count[s];
	CHECK(total == 0, "empty map counts nothing (%llu)", (unsigned long long)total);
	CHECK(qcow_map_lowest_available(&map) == UINT64_MAX && qcow_map_last_block(&map) == UINT64_MAX, "empty searches");
	CHECK(qcow_map_resize(&map, 10) == 0 && map.count[QCS_AVAILABLE] == 10, "grow from 0");
	CHECK(qcow_map_check(&map) == NULL, "consistent after growing from 0");
	qcow_map_free(&map);
	free(m.c);
}

static void moves(void)
{
	struct qcow_map map;
	struct model m;
	fresh(&map, &m, 100, 4);
	qcow_map_set_pinned(&map, 0, 1);
	qcow_map_set_ref(&map, 90, 0x1230);
	qcow_map_set_ref(&map, 91, 0x1238);
	qcow_map_set_state(&map, 10, QCS_JUNK);
	qcow_map_set_state(&map, 11, QCS_JUNK);

	/* start */
	rc_clear(&map);
	struct qcow_move *mv = qcow_map_move_start(&map, 90, 10);
	REQUIRE(mv != NULL, "move start");
	CHECK(mv->src == 90 && mv->dst == 10 && mv->state == QMOVE_COPYING && mv->in_use && !mv->cancelled, "fresh move");
	CHECK(qcow_map_state(&map, 10) == QCS_COPIES && qcow_map_state(&map, 90) == QCS_REF, "dst Copies, src REF");
	CHECK(qcow_map_want_refcount(&map, 10) == 1 && qcow_bitmap_test(&map.rc_dirty, 0), "copies want 1, marked");
	CHECK(qcow_map_is_moving(&map, 90) && !qcow_map_is_moving(&map, 10), "moving mark on the source only");
	CHECK(qcow_map_move_find(&map, 90) == mv && qcow_map_move_find(&map, 10) == NULL &&
	      qcow_map_move_find(&map, 91) == NULL, "find by source");
	CHECK(map.nmoves_active == 1, "one move");
	CHECK(qcow_map_highest_movable(&map, 100) == 91, "highest movable is 91");
	CHECK(qcow_map_highest_movable(&map, 91) == UINT64_MAX, "highest movable below 91 skips the moving 90");
	CHECK(qcow_map_next_junk(&map, 0) == 11, "dst is no longer junk");
	CHECK(qcow_map_check(&map) == NULL, "consistent with a move: %s", qcow_map_check(&map));

	/* cancel before Referenced at each state */
	static const enum qcow_move_state pre[] = { QMOVE_COPYING, QMOVE_COPIED, QMOVE_FLUSHED };
	for (size_t i = 0; i < 3; i++) {
		if (i) {
			mv = qcow_map_move_start(&map, 90, 10);
			REQUIRE(mv != NULL, "move start again");
		}
		mv->flush_seen = true;
		qcow_map_move_set_state(&map, mv, pre[i]);
		CHECK(mv->state == pre[i] && !mv->flush_seen, "set_state %d resets flush_seen", pre[i]);
		rc_clear(&map);
		qcow_map_move_cancel(&map, 90);
		CHECK(mv->cancelled && qcow_map_state(&map, 10) == QCS_JUNK, "cancel in state %d: dst back to Junk", pre[i]);
		CHECK(qcow_map_state(&map, 90) == QCS_REF && qcow_map_slot(&map, 90) == 0x1230, "cancel keeps the source");
		CHECK(!qcow_map_is_moving(&map, 90) && qcow_map_move_find(&map, 90) == NULL, "cancelled move is not found");
		CHECK(qcow_bitmap_test(&map.rc_dirty, 0), "cancel marks the dst's block (1 -> 0)");
		CHECK(map.nmoves_active == 1, "a cancelled move stays in the table until completed");
		CHECK(qcow_map_highest_movable(&map, 100) == 91 && qcow_map_highest_movable(&map, 91) == 90,
		      "cancelled source is movable again");
		CHECK(qcow_map_check(&map) == NULL, "consistent after cancel: %s", qcow_map_check(&map));
		qcow_map_move_cancel(&map, 90);   /* twice: harmless */
		CHECK(qcow_map_state(&map, 10) == QCS_JUNK && map.nmoves_active == 1, "second cancel is a no-op");
		qcow_map_move_complete(&map, mv);
		CHECK(!mv->in_use && map.nmoves_active == 0, "complete drops the cancelled move");
		CHECK(qcow_map_state(&map, 90) == QCS_REF && qcow_map_state(&map, 10) == QCS_JUNK,
		      "completing a cancelled move changes no state");
		CHECK(qcow_map_check(&map) == NULL, "consistent after dropping: %s", qcow_map_check(&map));
	}
	/* cancel of a cluster that is not moving is a no-op */
	qcow_map_move_cancel(&map, 91);
	qcow_map_move_cancel(&map, 42);
	CHECK(qcow_map_check(&map) == NULL && map.nmoves_active == 0, "cancel without a move");

	/* the full cycle */
	mv = qcow_map_move_start(&map, 90, 10);
	REQUIRE(mv != NULL, "move start");
	qcow_map_move_set_state(&map, mv, QMOVE_COPIED);
	qcow_map_move_set_state(&map, mv, QMOVE_FLUSHED);
	/* the pointer rewrite, as qcow_recycler.c does it */
	rc_clear(&map);
	qcow_map_set_ref(&map, 10, 0x1230);
	qcow_map_set_state(&map, 90, QCS_PENDING);
	qcow_map_move_set_state(&map, mv, QMOVE_REFERENCED);
	CHECK(map.rc_dirty.count == 0, "rewrite keeps both wants at 1: no marks");
	CHECK(qcow_map_check(&map) == NULL, "referenced move consistent: %s", qcow_map_check(&map));
	CHECK(qcow_map_last_block(&map) == 91, "pending source counts as a block");
	qcow_map_set_state(&map, 91, QCS_JUNK);
	CHECK(qcow_map_last_block(&map) == 90, "pending source is the last block");
	CHECK(qcow_map_highest_movable(&map, 100) == 10, "only the new copy is movable");
	/* cancel after Referenced does nothing */
	qcow_map_move_cancel(&map, 90);
	CHECK(!mv->cancelled && qcow_map_state(&map, 10) == QCS_REF && qcow_map_state(&map, 90) == QCS_PENDING &&
	      qcow_map_is_moving(&map, 90), "cancel after Referenced is refused");
	CHECK(qcow_map_move_find(&map, 90) == mv, "referenced move still found");
	/* complete: src PENDING -> Junk */
	rc_clear(&map);
	qcow_map_move_complete(&map, mv);
	CHECK(qcow_map_state(&map, 90) == QCS_JUNK && !qcow_map_is_moving(&map, 90) && map.nmoves_active == 0,
	      "complete: source to Junk");
	CHECK(qcow_bitmap_test(&map.rc_dirty, 90 >> 4) && map.rc_dirty.count == 1, "complete marks the source's block");
	CHECK(qcow_map_state(&map, 10) == QCS_REF && qcow_map_slot(&map, 10) == 0x1230, "dst holds the pointer");
	CHECK(qcow_map_last_block(&map) == 10, "last block after the move");
	CHECK(qcow_map_check(&map) == NULL, "consistent after complete: %s", qcow_map_check(&map));

	/* many moves at once: the table grows; finds stay right */
	for (uint64_t c = 1; c < 100; c++)
		if (c != 10)
			qcow_map_set_state(&map, c, c < 50 ? QCS_JUNK : QCS_REF);
	for (uint64_t c = 50; c < 100; c++)
		qcow_map_set_ref(&map, c, c * 8);
	qcow_map_resize(&map, 400);
	for (uint64_t c = 100; c < 400; c++) {
		if (c < 250)
			qcow_map_set_state(&map, c, QCS_JUNK);
		else
			qcow_map_set_ref(&map, c, c * 8);
	}
	unsigned started = 0;
	for (;;) {
		uint64_t s = qcow_map_highest_movable(&map, map.nclusters);
		uint64_t d = qcow_map_next_junk(&map, 0);
		if (s == UINT64_MAX || d == UINT64_MAX || d > s)
			break;
		REQUIRE(qcow_map_move_start(&map, s, d) != NULL, "start move %u", started);
		started++;
	}
	CHECK(started == 150 && map.nmoves_active == started, "started %u moves (table of %u)", started, map.nmoves_cap);
	CHECK(qcow_map_check(&map) == NULL, "consistent with %u moves: %s", started, qcow_map_check(&map));
	unsigned found = 0;
	for (uint64_t c = 0; c < map.nclusters; c++) {
		struct qcow_move *x = qcow_map_move_find(&map, c);
		if (x) {
			found++;
			if (x->src != c || qcow_map_state(&map, x->dst) != QCS_COPIES || x->dst >= c)
				CHECK(0, "move of %llu is wrong", (unsigned long long)c);
		}
	}
	CHECK(found == started, "found %u of %u moves", found, started);
	/* cancel every other one, complete them, restart into the freed slots */
	for (uint64_t c = 0; c < map.nclusters; c++) {
		struct qcow_move *x = qcow_map_move_find(&map, c);
		if (x && c % 2) {
			qcow_map_move_cancel(&map, c);
			qcow_map_move_complete(&map, x);
		}
	}
	CHECK(qcow_map_check(&map) == NULL, "consistent after cancelling half: %s", qcow_map_check(&map));
	unsigned cap = map.nmoves_cap;
	uint64_t s = qcow_map_highest_movable(&map, map.nclusters), d = qcow_map_next_junk(&map, 0);
	REQUIRE(s != UINT64_MAX && d != UINT64_MAX, "something to restart");
	CHECK(qcow_map_move_start(&map, s, d) != NULL && map.nmoves_cap == cap, "freed slots are reused");
	CHECK(qcow_map_check(&map) == NULL, "consistent after restart: %s", qcow_map_check(&map));
	qcow_map_free(&map);
	free(m.c);
}

/* Deliberate corruption must be reported; undoing it must clear the report. */
static void corruption(void)
{
	struct qcow_map map;
	struct model m;
	fresh(&map, &m, 200, 4);
	qcow_map_set_pinned(&map, 0, 1);
	for (uint64_t c = 1; c < 120; c++)
		qcow_map_set_ref(&map, c, c * 8);
	for (uint64_t c = 120; c < 150; c++)
		qcow_map_set_state(&map, c, QCS_JUNK);
	struct qcow_move *mv = qcow_map_move_start(&map, 119, 120);
	REQUIRE(mv != NULL, "move");
	REQUIRE(qcow_map_check(&map) == NULL, "consistent start: %s", qcow_map_check(&map));

	const char *msg;
	map.count[QCS_JUNK]++;
	msg = qcow_map_check(&map);
	CHECK(msg && strstr(msg, "junk"), "poked junk counter reported (%s)", msg ? msg : "NULL");
	map.count[QCS_JUNK]--;
	CHECK(qcow_map_check(&map) == NULL, "undone");

	map.count[QCS_REF]--;
	CHECK(qcow_map_check(&map) != NULL, "poked REF counter reported");
	map.count[QCS_REF]++;

	qcow_bitmap_set(&map.available, 130);   /* Junk cluster marked available */
	msg = qcow_map_check(&map);
	CHECK(msg && strstr(msg, "130"), "available bit behind the map's back reported, naming 130 (%s)", msg ? msg : "NULL");
	CHECK(qcow_map_lowest_available(&map) == 130, "(the search does see the bad bit)");
	qcow_bitmap_clear(&map.available, 130);
	CHECK(qcow_map_check(&map) == NULL, "undone");

	qcow_bitmap_clear(&map.junk, 140);
	CHECK(qcow_map_check(&map) != NULL, "missing junk bit reported");
	qcow_bitmap_set(&map.junk, 140);

	qcow_bitmap_clear(&map.busy, 50);
	CHECK(qcow_map_check(&map) != NULL, "missing busy bit reported");
	qcow_bitmap_set(&map.busy, 50);

	qcow_bitmap_set(&map.busy, 180);
	CHECK(qcow_map_check(&map) != NULL, "stray busy bit reported");
	qcow_bitmap_clear(&map.busy, 180);

	qcow_bitmap_clear(&map.movable, 60);
	CHECK(qcow_map_check(&map) != NULL, "missing movable bit reported");
	qcow_bitmap_set(&map.movable, 60);

	qcow_bitmap_set(&map.movable, 0);
	CHECK(qcow_map_check(&map) != NULL, "movable bit below first_movable reported");
	qcow_bitmap_clear(&map.movable, 0);

	uint64_t save = map.entry[170];
	map.entry[170] = (0xFull << 60) | 0x33;   /* a state that does not exist */
	msg = qcow_map_check(&map);
	CHECK(msg && strstr(msg, "170"), "invalid state reported (%s)", msg ? msg : "NULL");
	map.entry[170] = save;

	map.nmoves_active++;
	CHECK(qcow_map_check(&map) != NULL, "move counter reported");
	map.nmoves_active--;

	qcow_bitmap_clear(&map.moving, 119);
	msg = qcow_map_check(&map);
	CHECK(msg && strstr(msg, "119"), "lost moving mark reported (%s)", msg ? msg : "NULL");
	qcow_bitmap_set(&map.moving, 119);

	/* src freed without cancelling the move */
	qcow_map_set_state(&map, 119, QCS_JUNK);
	msg = qcow_map_check(&map);
	CHECK(msg && strstr(msg, "119"), "move source freed under the move reported (%s)", msg ? msg : "NULL");
	qcow_map_set_ref(&map, 119, 119 * 8);
	CHECK(qcow_map_check(&map) == NULL, "undone: %s", qcow_map_check(&map));

	/* a Copies cluster that belongs to no move */
	qcow_map_set_state(&map, 145, QCS_COPIES);
	CHECK(qcow_map_check(&map) != NULL, "orphan Copies reported");
	qcow_map_set_state(&map, 145, QCS_JUNK);

	/* referenced move whose dst is not REF */
	qcow_map_move_set_state(&map, mv, QMOVE_REFERENCED);
	CHECK(qcow_map_check(&map) != NULL, "referenced move with src REF / dst Copies reported");
	qcow_map_set_ref(&map, 120, 119 * 8);
	qcow_map_set_state(&map, 119, QCS_PENDING);
	CHECK(qcow_map_check(&map) == NULL, "proper referenced move: %s", qcow_map_check(&map));
	qcow_bitmap_set(&map.moving, 5);
	qcow_bitmap_set(&map.moving, 6);
	CHECK(qcow_map_check(&map) != NULL, "moving marks without a move reported");
	qcow_bitmap_clear(&map.moving, 5);
	qcow_bitmap_clear(&map.moving, 6);
	CHECK(qcow_map_check(&map) == NULL, "consistent at the end: %s", qcow_map_check(&map));

	char sum[512];
	qcow_map_summary(&map, sum, sizeof(sum));
	CHECK(strstr(sum, "clusters=200") && strstr(sum, "moves=1") && strstr(sum, "pending=1"), "summary: %s", sum);
	qcow_map_summary(&map, sum, 20);   /* truncation is safe */
	CHECK(strlen(sum) < 20, "summary truncates");
	qcow_map_free(&map);
	free(m.c);
}

/* ---- random sequences -------------------------------------------------------- */

static struct mmove *model_new_move(struct model *m)
{
	for (int i = 0; i < MAXMOVES; i++)
		if (!m->mv[i].live)
			return &m->mv[i];
	return NULL;
}

static unsigned long n_started, n_referenced, n_completed, n_cancelled, n_refused, n_resized;

static const enum qcow_cstate plain_states[] = { QCS_JUNK, QCS_ERASING, QCS_ERASED, QCS_FLUSHING, QCS_AVAILABLE,
						 QCS_ROOTS, QCS_PENDING };

static void random_step(struct qcow_map *map, struct model *m)
{
	unsigned op = (unsigned)(tap_rand(&seed) % 100);
	if (op < 55) {
		/* change one cluster */
		uint64_t c = tap_rand(&seed) % m->n;
		struct mmove *mm = model_move_of(m, c);
		if (mm) {
			if (mm->state == QMOVE_REFERENCED || mm->dst == c)
				return;
			/* a change to a move source cancels the move first (as the engine does) */
			qcow_map_move_cancel(map, c);
			mm->cancelled = true;
			m->c[mm->dst] = (struct mcl){ .st = QCS_JUNK, .val = 0 };
		}
		unsigned k = (unsigned)(tap_rand(&seed) % 7);
		struct mcl *x = &m->c[c];
		if (k == 6) {
			/* the table holding some pointers moved */
			if (x->st == QCS_REF) {
				uint64_t to = (8 + tap_rand(&seed) % (1ull << 40)) & ~7ull;
				qcow_map_rehome_refs(map, c, x->val & ~4095ull, to & ~4095ull, 4096);
				x->val = (to & ~4095ull) + (x->val & 4095);
			} else if (x->st == QCS_SHARED) {
				uint64_t from = x->slots[tap_rand(&seed) % x->val] & ~4095ull;
				uint64_t to = (8 + tap_rand(&seed) % (1ull << 40)) & ~4095ull;
				qcow_map_rehome_refs(map, c, from, to, 4096);
				for (uint64_t j = 0; j < x->val; j++)
					if ((x->slots[j] & ~4095ull) == from)
						x->slots[j] = to + (x->slots[j] & 4095);
			}
			return;
		}
		if (k == 0 && c >= m->first_movable) {
			uint64_t slot = (tap_rand(&seed) % (1ull << 40)) & ~7ull;
			qcow_map_set_ref(map, c, slot);
			*x = (struct mcl){ .st = QCS_REF, .val = slot };
		} else if (k == 1) {
			uint64_t n = 1 + tap_rand(&seed) % 5;
			qcow_map_set_pinned(map, c, n);
			*x = (struct mcl){ .st = QCS_PINNED, .val = n };
		} else if (k == 2) {
			enum qcow_cstate s = plain_states[tap_rand(&seed) % 7];
			qcow_map_set_state(map, c, s);
			*x = (struct mcl){ .st = s };
		} else if (k == 3) {
			if (x->st != QCS_REF && x->st != QCS_PINNED && x->st != QCS_SHARED && c < m->first_movable)
				return;   /* would be REF below first_movable */
			if (x->st == QCS_SHARED && x->val == MAXSLOTS)
				return;
			/* now and then a table reference (slot 0): it pins; often a
			 * slot the cluster has already (an L2 table two L1s share) */
			uint64_t slot = tap_rand(&seed) % 8 ? (8 + tap_rand(&seed) % (1ull << 40)) & ~7ull : 0;
			if (slot && x->st == QCS_SHARED && tap_rand(&seed) % 2)
				slot = x->slots[tap_rand(&seed) % x->val];
			else if (slot && x->st == QCS_REF && tap_rand(&seed) % 2)
				slot = x->val;
			REQUIRE(qcow_map_add_ref(map, c, slot) == 0, "add_ref");
			if (x->st == QCS_PINNED || (slot == 0 && (x->st == QCS_REF || x->st == QCS_SHARED))) {
				*x = (struct mcl){ .st = QCS_PINNED, .val = x->st == QCS_REF ? 2 : x->val + 1 };
			} else if (x->st == QCS_REF) {
				*x = (struct mcl){ .st = QCS_SHARED, .val = 2, .slots = { x->val, slot } };
			} else if (x->st == QCS_SHARED) {
				x->slots[x->val++] = slot;
			} else {
				*x = slot ? (struct mcl){ .st = QCS_REF, .val = slot } : (struct mcl){ .st = QCS_PINNED, .val = 1 };
			}
		} else if (k == 4 || k == 5) {
			if (x->st != QCS_REF && x->st != QCS_PINNED && x->st != QCS_SHARED)
				return;
			if (x->st == QCS_SHARED) {
				uint64_t i = tap_rand(&seed) % x->val;
				qcow_map_drop_ref(map, c, x->slots[i]);
				x->slots[i] = x->slots[--x->val];
				if (x->val == 1)
					*x = (struct mcl){ .st = QCS_REF, .val = x->slots[0] };
				return;
			}
			qcow_map_drop_ref(map, c, x->st == QCS_REF ? x->val : 0);
			if (x->st == QCS_PINNED && x->val > 1)
				x->val--;
			else
				*x = (struct mcl){ .st = QCS_JUNK, .val = 0 };
		}
	} else if (op < 67) {
		/* start a move like the compactor: highest movable into the lowest junk */
		uint64_t s = tap_rand(&seed) & 1 ? qcow_map_highest_movable(map, map->nclusters)
						 : qcow_map_highest_movable(map, tap_rand(&seed) % (m->n + 1));
		uint64_t d = qcow_map_next_junk(map, tap_rand(&seed) & 1 ? 0 : tap_rand(&seed) % (m->n + 1));
		struct mmove *mm = model_new_move(m);
		if (s == UINT64_MAX || d == UINT64_MAX || !mm)
			return;
		/* the destination of a Referenced move is REF and not moving, so
		 * highest_movable offers it; the compactor never plans it while
		 * that move lives (qcow_map_check's inv4 wants its dst REF) */
		if (model_move_of(m, s))
			return;
		/* clusters below first_movable are header clusters, never a
		 * move's destination in the engine */
		if (d < m->first_movable)
			return;
		struct qcow_move *mv = qcow_map_move_start(map, s, d);
		if (!mv) {
			CHECK(mv != NULL, "move_start(%llu, %llu) failed", (unsigned long long)s, (unsigned long long)d);
			return;
		}
		*mm = (struct mmove){ .src = s, .dst = d, .state = QMOVE_COPYING, .live = true };
		n_started++;
		m->c[d] = (struct mcl){ .st = QCS_COPIES, .val = 0 };
	} else if (op < 87) {
		/* advance a random move */
		int i0 = (int)(tap_rand(&seed) % MAXMOVES);
		for (int k = 0; k < MAXMOVES; k++) {
			struct mmove *mm = &m->mv[(i0 + k) % MAXMOVES];
			if (!mm->live)
				continue;
			struct qcow_move *mv = NULL;
			for (unsigned j = 0; j < map->nmoves_cap; j++)
				if (map->moves[j].in_use && map->moves[j].src == mm->src && map->moves[j].dst == mm->dst &&
				    map->moves[j].cancelled == mm->cancelled)
					mv = &map->moves[j];
			if (!mv) {
				MCHECK(mv != NULL, "step %lu: move %llu->%llu missing from the table", step_no,
				       (unsigned long long)mm->src, (unsigned long long)mm->dst);
				return;
			}
			if (!mm->cancelled)
				MCHECK(qcow_map_move_find(map, mm->src) == mv, "step %lu: find(%llu)", step_no,
				       (unsigned long long)mm->src);
			if (mm->cancelled) {
				qcow_map_move_complete(map, mv);
				mm->live = false;
			} else if (mm->state == QMOVE_COPYING || mm->state == QMOVE_COPIED) {
				mm->state = mm->state + 1;
				qcow_map_move_set_state(map, mv, mm->state);
				MCHECK(mv->state == mm->state, "set_state");
			} else if (mm->state == QMOVE_FLUSHED) {
				/* the pointer rewrite */
				qcow_map_take_refs(map, mm->dst, mm->src, QCS_PENDING);
				qcow_map_move_set_state(map, mv, QMOVE_REFERENCED);
				m->c[mm->dst] = m->c[mm->src];
				m->c[mm->src] = (struct mcl){ .st = QCS_PENDING, .val = 0 };
				mm->state = QMOVE_REFERENCED;
				n_referenced++;
			} else {
				qcow_map_move_complete(map, mv);
				m->c[mm->src] = (struct mcl){ .st = QCS_JUNK, .val = 0 };
				mm->live = false;
				n_completed++;
			}
			return;
		}
	} else if (op < 93) {
		/* cancel a random cluster's move (no-op unless it is a source before Referenced) */
		uint64_t c = tap_rand(&seed) % m->n;
		qcow_map_move_cancel(map, c);
		for (int i = 0; i < MAXMOVES; i++) {
			struct mmove *mm = &m->mv[i];
			if (mm->live && !mm->cancelled && mm->src == c && mm->state != QMOVE_REFERENCED) {
				mm->cancelled = true;
				n_cancelled++;
				m->c[mm->dst] = (struct mcl){ .st = QCS_JUNK, .val = 0 };
			}
		}
	} else {
		/* resize */
		uint64_t n;
		if (tap_rand(&seed) % 2 || m->n < 64)
			n = m->n + tap_rand(&seed) % 200;
		else
			n = m->n - tap_rand(&seed) % (m->n / 2);
		if (n > 3000)
			n = 3000 - tap_rand(&seed) % 500;
		bool busy = false;
		for (uint64_t c = n; c < m->n; c++)
			if (!is_free(m->c[c].st))
				busy = true;
		/* a live move's clusters are busy, so they never vanish; a
		 * cancelled move may lose its (free) clusters, harmlessly */
		int r = qcow_map_resize(map, n);
		if (busy)
			n_refused++;
		else
			n_resized++;
		if (busy) {
			MCHECK(r == -EBUSY, "step %lu: shrink %llu -> %llu over busy clusters returned %d", step_no,
			       (unsigned long long)m->n, (unsigned long long)n, r);
		} else {
			MCHECK(r == 0, "step %lu: resize %llu -> %llu returned %d", step_no, (unsigned long long)m->n,
			       (unsigned long long)n, r);
			if (r == 0)
				model_resize(m, n);
		}
	}
}

static void random_runs(void)
{
	static const unsigned shifts[] = { 3, 6, 12 };
	for (int run = 0; run < 6; run++) {
		struct qcow_map map;
		struct model m;
		uint64_t n0 = 1 + tap_rand(&seed) % 1500;
		fresh(&map, &m, n0, shifts[run % 3]);
		if (run % 2) {
			map.first_movable = 0;   /* set before any state change */
			m.first_movable = 0;
		}
		unsigned steps = 10000;
		for (unsigned i = 0; i < steps && fails < 10; i++) {
			step_no = i;
			uint64_t n_before = m.n;
			rc_clear(&map);
			rc_snapshot(&m);
			random_step(&map, &m);
			/* the full comparison is O(n): do it every step on small maps */
			if (m.n <= 600 || i % 16 == 0)
				compare(&map, &m, "random");
			else
				MCHECK(qcow_map_check(&map) == NULL, "random step %lu: %s", step_no, qcow_map_check(&map));
			rc_verify(&map, &m, n_before, "random");
		}
		compare(&map, &m, "random end");
		qcow_map_free(&map);
		free(m.c);
	}
	free(want_before);
	printf("# random: %lu moves started, %lu referenced, %lu completed, %lu cancelled by request; "
	       "%lu resizes, %lu refused\n", n_started, n_referenced, n_completed, n_cancelled, n_resized, n_refused);
	CHECK(n_completed > 100 && n_cancelled > 10 && n_refused > 20 && n_resized > 50, "the random runs exercised moves and resizes");
}

/* ---- memory ------------------------------------------------------------------ */

static uint64_t bitmap_bytes(const struct qcow_bitmap *b)
{
	uint64_t w0 = (b->nbits + 63) / 64, w1 = (w0 + 63) / 64, w2 = (w1 + 63) / 64;
	return (w0 + (w1 ? w1 : 1) + (w2 ? w2 : 1)) * 8;
}

static void memory(void)
{
	struct qcow_map map;
	REQUIRE(qcow_map_init(&map, 1000000, 15) == 0, "init 1e6 clusters");
	map.first_movable = 1;
	for (uint64_t c = 1; c < 1000000; c += 3)
		qcow_map_set_ref(&map, c, c * 8);
	qcow_map_set_state(&map, 999999, QCS_JUNK);
	uint64_t mem = qcow_map_memory(&map);
	CHECK((double)mem / 1e6 <= 9.0, "qcow_map_memory: %.3f bytes per cluster", (double)mem / 1e6);
	/* our own count of what the structure holds */
	uint64_t own = map.nclusters * 8 + bitmap_bytes(&map.available) + bitmap_bytes(&map.junk) +
		       bitmap_bytes(&map.movable) + bitmap_bytes(&map.busy) + bitmap_bytes(&map.moving) +
		       bitmap_bytes(&map.rc_dirty) + map.nmoves_cap * sizeof(struct qcow_move);
	CHECK((double)own / 1e6 <= 9.0, "counted: %.3f bytes per cluster", (double)own / 1e6);
	CHECK(mem + 64 >= own - bitmap_bytes(&map.rc_dirty) - 64, "qcow_map_memory (%llu) roughly what is held (%llu)",
	      (unsigned long long)mem, (unsigned long long)own);
	CHECK(qcow_map_check(&map) == NULL, "1e6 map consistent");
	CHECK(qcow_map_highest_movable(&map, 1000000) == 999997, "highest movable in 1e6");
	CHECK(qcow_map_lowest_available(&map) == 0, "lowest available in 1e6");
	CHECK(qcow_map_next_junk(&map, 0) == 999999, "junk at the very end");
	qcow_map_free(&map);
}

/* The state machine's table: the changes the design forbids are refused
 * (debug builds abort on them), and every path a cluster takes in the
 * engine is allowed. */
static void transitions(void)
{
	CHECK(!qcow_map_transition_allowed(QCS_JUNK, QCS_AVAILABLE), "junk becomes available only through erase and flush");
	CHECK(!qcow_map_transition_allowed(QCS_ERASED, QCS_AVAILABLE), "erased becomes available only through a flush");
	CHECK(!qcow_map_transition_allowed(QCS_JUNK, QCS_COPIES), "a move never copies into junk");
	CHECK(!qcow_map_transition_allowed(QCS_REF, QCS_AVAILABLE), "a referenced cluster is freed as junk");
	CHECK(!qcow_map_transition_allowed(QCS_PENDING, QCS_AVAILABLE), "a move source is erased before reuse");
	CHECK(!qcow_map_transition_allowed(QCS_COPIES, QCS_AVAILABLE), "a cancelled destination is erased before reuse");
	static const enum qcow_cstate erase[] = { QCS_REF, QCS_JUNK, QCS_ERASING, QCS_ERASED, QCS_FLUSHING, QCS_AVAILABLE,
						  QCS_ROOTS, QCS_REF, QCS_PENDING, QCS_JUNK };
	for (size_t i = 1; i < sizeof(erase) / sizeof(erase[0]); i++)
		CHECK(qcow_map_transition_allowed(erase[i - 1], erase[i]), "%s -> %s is allowed",
		      qcow_map_state_name(erase[i - 1]), qcow_map_state_name(erase[i]));
	CHECK(qcow_map_transition_allowed(QCS_AVAILABLE, QCS_COPIES) && qcow_map_transition_allowed(QCS_COPIES, QCS_REF) &&
	      qcow_map_transition_allowed(QCS_COPIES, QCS_JUNK), "a move destination's life");
	CHECK(qcow_map_transition_allowed(QCS_ROOTS, QCS_AVAILABLE), "an unwritten allocation is given back as available");
}

int main(void)
{
	transitions();
	basics();
	resize();
	moves();
	corruption();
	random_runs();
	memory();
	return tap_done();
}
