/*
 * qcow_map.c - the cluster map (see qcow_map.h for the representation).
 *
 * Owns: the state of every physical cluster, the moves in flight, and the
 * "refcount block needs rewriting" marks.  Rules:
 *  - map_put() is the only function that changes an entry; it keeps the
 *    bitmaps, the counters and the refcount-dirty marks in step.
 *  - Numbered invariants (doc/design.md, "Invariants") checked by qcow_map_check:
 *    1. every cluster has exactly one state; the bitmaps and counters agree
 *       with the entries;
 *    2. only Available clusters are handed out (the allocator in
 *       qcow_alloc.c takes qcow_map_lowest_available);
 *    4. a move source stays REF until its pointer is rewritten, then
 *       PENDING until the completing flush (never Junk before); the
 *       destination is Copies until the rewrite, then REF (or free, if
 *       the guest discarded it since);
 *    7. last_block counts every state but Junk/Erased/Available.
 *    Moves: a non-cancelled move's dst is Copies (before Referenced) or
 *    REF (Referenced); its src is REF with the moving bit (before
 *    Referenced) or PENDING (Referenced).
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define TAG_SHIFT 60
#define TAG_PINNED 0x8ull
#define TAG_SHARED 0x9ull
#define TAG_STATE 0xFull
#define VALUE_MASK ((1ull << 56) - 1)

static uint64_t encode_state(enum qcow_cstate s) { return (TAG_STATE << TAG_SHIFT) | (uint64_t)s; }

static enum qcow_cstate decode_state(uint64_t e)
{
	if (!(e >> 63))
		return QCS_REF;
	if ((e >> TAG_SHIFT) == TAG_PINNED)
		return QCS_PINNED;
	if ((e >> TAG_SHIFT) == TAG_SHARED)
		return QCS_SHARED;
	return (enum qcow_cstate)(e & 0xff);
}

static bool is_free_state(enum qcow_cstate s)
{
	return s == QCS_JUNK || s == QCS_ERASED || s == QCS_AVAILABLE;
}

static bool is_referenced(enum qcow_cstate s)
{
	return s == QCS_REF || s == QCS_SHARED;
}

/* A list entry is a slot (8-byte aligned) with the number of its
 * references minus one in the low 3 bits: a data cluster of an L2 table
 * that several L1 tables share has one slot many times, and takes one
 * entry for up to 8 of them. */
#define ENT_REPEAT 7ull

static uint64_t ent_slot(uint64_t e) { return e & ~ENT_REPEAT; }
static uint64_t ent_count(uint64_t e) { return (e & ENT_REPEAT) + 1; }

/* A list with one entry keeps it in place of the array pointer (cap 1):
 * the common case of one slot repeated costs no allocation. */
static uint64_t *ents(struct qcow_reflist *l)
{
	return l->cap == 1 ? &l->one : l->ent;
}

static const uint64_t *ents_c(const struct qcow_reflist *l)
{
	return l->cap == 1 ? &l->one : l->ent;
}

static uint64_t list_total(const struct qcow_reflist *l)
{
	uint64_t n = 0;
	const uint64_t *e = ents_c(l);
	for (uint32_t i = 0; i < l->len; i++)
		n += ent_count(e[i]);
	return n;
}

static uint64_t want_of(const struct qcow_map *m, uint64_t e)
{
	switch (decode_state(e)) {
	case QCS_REF:
		return 1;
	case QCS_PINNED:
		return e & VALUE_MASK;
	case QCS_SHARED:
		return list_total(&m->lists[e & VALUE_MASK]);
	case QCS_COPIES:   /* counted before its pointer can become durable */
	case QCS_ROOTS:
	case QCS_PENDING:  /* the old pointer may still be the durable one */
		return 1;
	default:
		return 0;
	}
}

/*
 * The allowed state changes (doc/design.md, "cluster states"), checked on
 * every change when m->check_transitions is set (debug builds and
 * runtime_asserts).  REF -> REF, SHARED -> SHARED and PINNED -> PINNED
 * change the slots or the count; REF <-> SHARED add or drop a pointer.  Junk never becomes Available directly: only an erase and a
 * flush that started after it make a freed cluster allocatable
 * (invariant 3).  Roots -> Available is the one shortcut: a cluster
 * handed out and given back before anything was written to it still
 * reads zeros.
 */
#define T(a, b) [QCS_##a][QCS_##b] = true
static const bool allowed[QCS_NSTATES][QCS_NSTATES] = {
	T(AVAILABLE, ROOTS), T(AVAILABLE, COPIES), T(AVAILABLE, PINNED),
	T(AVAILABLE, REF), T(AVAILABLE, JUNK),          /* the map built at open, a failed truncation */
	T(ROOTS, REF), T(ROOTS, PINNED), T(ROOTS, AVAILABLE), T(ROOTS, JUNK),
	T(REF, REF), T(REF, PINNED), T(REF, JUNK), T(REF, PENDING),   /* Pending: a move source, or a replaced cluster */
	T(REF, SHARED), T(SHARED, SHARED), T(SHARED, REF), T(SHARED, PINNED), T(SHARED, PENDING),
	T(COPIES, SHARED), T(AVAILABLE, SHARED),
	T(PINNED, PINNED), T(PINNED, JUNK), T(PINNED, PENDING),
	T(JUNK, ERASING),
	T(ERASING, ERASED), T(ERASING, JUNK),
	T(ERASED, FLUSHING),
	T(FLUSHING, AVAILABLE), T(FLUSHING, JUNK),
	T(COPIES, REF), T(COPIES, JUNK),
	T(PENDING, JUNK),
};
#undef T

bool qcow_map_transition_allowed(enum qcow_cstate from, enum qcow_cstate to)
{
	return from < QCS_NSTATES && to < QCS_NSTATES && allowed[from][to];
}

static void list_release(struct qcow_map *m, uint64_t idx);

static void map_put(struct qcow_map *m, uint64_t c, uint64_t e)
{
	uint64_t old = m->entry[c];
	enum qcow_cstate os = decode_state(old), ns = decode_state(e);
	if (m->check_transitions && !allowed[os][ns]) {
		char what[160];
		snprintf(what, sizeof(what), "cluster %llu may not go from %s to %s", (unsigned long long)c,
			 qcow_map_state_name(os), qcow_map_state_name(ns));
		qcow_assert_failed(what, __func__);
	}

	uint64_t want_old = want_of(m, old), want_new = want_of(m, e);
	/* a SHARED entry owns its list: it goes when the entry changes */
	if (os == QCS_SHARED && old != e && !m->list_handover)
		list_release(m, old & VALUE_MASK);
	m->count[os]--;
	m->count[ns]++;
	m->entry[c] = e;
	if (os != ns) {
		if (os == QCS_AVAILABLE)
			qcow_bitmap_clear(&m->available, c);
		if (ns == QCS_AVAILABLE)
			qcow_bitmap_set(&m->available, c);
		if (os == QCS_JUNK)
			qcow_bitmap_clear(&m->junk, c);
		if (ns == QCS_JUNK)
			qcow_bitmap_set(&m->junk, c);
		if (is_free_state(ns))
			qcow_bitmap_clear(&m->busy, c);
		else
			qcow_bitmap_set(&m->busy, c);
	}
	if (is_referenced(ns) && c >= m->first_movable)
		qcow_bitmap_set(&m->movable, c);
	else
		qcow_bitmap_clear(&m->movable, c);
	if (want_old != want_new)
		qcow_map_mark_rc_dirty(m, c);
}

/* ---- reference lists of SHARED clusters ------------------------------- */

static int list_append(struct qcow_map *m, struct qcow_reflist *l, uint64_t slot)
{
	uint64_t *e = ents(l);
	for (uint32_t i = 0; i < l->len; i++)
		if (ent_slot(e[i]) == slot && ent_count(e[i]) <= ENT_REPEAT) {
			e[i]++;
			return 0;
		}
	if (l->cap == 0) {   /* empty: the entry goes in place */
		l->cap = 1;
		l->one = slot;
		l->len = 1;
		return 0;
	}
	if (l->len == l->cap) {
		if (l->cap >= UINT32_MAX / 2)
			return -EFBIG;
		uint32_t cap = l->cap * 2;
		uint64_t *p = qcow_malloc((size_t)cap * sizeof(uint64_t));
		if (!p)
			return -ENOMEM;
		memcpy(p, e, (size_t)l->len * sizeof(uint64_t));
		if (l->cap > 1) {
			qcow_free(l->ent);
			m->list_slots -= l->cap;
		}
		m->list_slots += cap;
		l->ent = p;
		l->cap = cap;
	}
	ents(l)[l->len++] = slot;
	return 0;
}

static void list_free_array(struct qcow_map *m, struct qcow_reflist *l)
{
	if (l->cap > 1) {
		qcow_free(l->ent);
		m->list_slots -= l->cap;
	}
}

/* Removes one reference from slot (or, if the list has no such slot, one
 * from the last entry: a reference less all the same). */
static void list_remove(struct qcow_reflist *l, uint64_t slot)
{
	uint64_t *e = ents(l);
	uint32_t i = 0;
	while (i < l->len && ent_slot(e[i]) != slot)
		i++;
	if (i == l->len)
		i = l->len - 1;
	if (ent_count(e[i]) > 1)
		e[i]--;
	else
		e[i] = e[--l->len];
}

/* A new list holding a and b; its index, or UINT64_MAX without memory. */
static uint64_t list_new(struct qcow_map *m, uint64_t a, uint64_t b)
{
	uint64_t idx;
	if (m->lists_free != UINT64_MAX) {
		idx = m->lists_free;
		m->lists_free = m->lists[idx].len == UINT32_MAX ? UINT64_MAX : m->lists[idx].len;
	} else {
		if (m->nlists == m->lists_cap) {
			/* by half again: this table is most of a snapshot image's
			 * extra memory */
			uint64_t cap = m->lists_cap ? m->lists_cap + m->lists_cap / 2 : 64;
			struct qcow_reflist *p = qcow_realloc(m->lists, cap * sizeof(*p));
			if (!p)
				return UINT64_MAX;
			m->lists = p;
			m->lists_cap = cap;
		}
		idx = m->nlists++;
	}
	struct qcow_reflist *l = &m->lists[idx];
	*l = (struct qcow_reflist){ 0 };
	if (list_append(m, l, a) || list_append(m, l, b)) {
		list_free_array(m, l);
		*l = (struct qcow_reflist){ .len = m->lists_free == UINT64_MAX ? UINT32_MAX : (uint32_t)m->lists_free };
		m->lists_free = idx;
		return UINT64_MAX;
	}
	return idx;
}

static void list_release(struct qcow_map *m, uint64_t idx)
{
	struct qcow_reflist *l = &m->lists[idx];
	list_free_array(m, l);
	/* the free list threads through len (UINT32_MAX ends it); the table
	 * holds fewer than 2^32 lists in any image we can map */
	*l = (struct qcow_reflist){ .ent = NULL, .len = m->lists_free == UINT64_MAX ? UINT32_MAX : (uint32_t)m->lists_free,
				    .cap = 0 };
	m->lists_free = idx;
}

static struct qcow_reflist *list_of(const struct qcow_map *m, uint64_t c)
{
	return &m->lists[m->entry[c] & VALUE_MASK];
}

int qcow_map_init(struct qcow_map *m, uint64_t nclusters, unsigned rb_shift)
{
	memset(m, 0, sizeof(*m));
	m->rb_shift = rb_shift;
	m->lists_free = UINT64_MAX;
	if (qcow_bitmap_init(&m->available, 0) || qcow_bitmap_init(&m->junk, 0) ||
	    qcow_bitmap_init(&m->movable, 0) || qcow_bitmap_init(&m->busy, 0) ||
	    qcow_bitmap_init(&m->moving, 0) || qcow_bitmap_init(&m->rc_dirty, 0))
		return -ENOMEM;
	return qcow_map_resize(m, nclusters);
}

void qcow_map_free(struct qcow_map *m)
{
	qcow_free(m->entry);
	qcow_bitmap_free(&m->available);
	qcow_bitmap_free(&m->junk);
	qcow_bitmap_free(&m->movable);
	qcow_bitmap_free(&m->busy);
	qcow_bitmap_free(&m->moving);
	qcow_bitmap_free(&m->rc_dirty);
	qcow_free(m->moves);
	for (uint64_t i = 0; i < m->nlists; i++)
		if (m->lists[i].cap > 1)
			qcow_free(m->lists[i].ent);
	qcow_free(m->lists);
	memset(m, 0, sizeof(*m));
}

/* Sizes the entry array and the bitmaps for cap clusters. */
static int set_capacity(struct qcow_map *m, uint64_t cap)
{
	if (cap > m->capacity) {
		uint64_t *e = qcow_realloc(m->entry, (size_t)cap * sizeof(uint64_t));
		if (!e)
			return -ENOMEM;
		m->entry = e;
	}
	uint64_t rb = ((cap ? cap - 1 : 0) >> m->rb_shift) + 1;
	if (qcow_bitmap_resize(&m->available, cap) || qcow_bitmap_resize(&m->junk, cap) ||
	    qcow_bitmap_resize(&m->movable, cap) || qcow_bitmap_resize(&m->busy, cap) ||
	    qcow_bitmap_resize(&m->moving, cap) ||
	    (rb > m->rc_dirty.nbits && qcow_bitmap_resize(&m->rc_dirty, rb)))
		return -ENOMEM;
	if (cap < m->capacity) {
		uint64_t *e = qcow_realloc(m->entry, (size_t)(cap ? cap : 1) * sizeof(uint64_t));
		if (e)
			m->entry = e;   /* a failed shrink keeps the bigger array */
	}
	m->capacity = cap;
	return 0;
}

int qcow_map_resize(struct qcow_map *m, uint64_t n)
{
	uint64_t old = m->nclusters;
	for (uint64_t c = n; c < old; c++) {
		enum qcow_cstate s = decode_state(m->entry[c]);
		if (!is_free_state(s))
			return -EBUSY;
	}
	/* dropped clusters leave every bitmap clear: the arrays may stay
	 * (not a state change of a cluster that stays: unchecked) */
	bool check = m->check_transitions;
	m->check_transitions = false;
	for (uint64_t c = n; c < old; c++) {
		map_put(m, c, encode_state(QCS_AVAILABLE));
		qcow_bitmap_clear(&m->available, c);
	}
	m->check_transitions = check;
	m->count[QCS_AVAILABLE] -= old > n ? old - n : 0;
	if (n < old)
		m->nclusters = n;
	/* Capacity grows by half again so that a map grown one cluster at a
	 * time (the open's scan, file growth) costs amortised O(1) per
	 * cluster; it shrinks only when less than half of it is used. */
	uint64_t cap = m->capacity;
	if (n > cap)
		cap = n > cap + cap / 2 ? n : cap + cap / 2;
	else if (n < cap / 2)
		cap = n;
	if (cap != m->capacity) {
		int ret = set_capacity(m, cap);
		if (ret)
			return ret;
	}
	m->nclusters = n > old ? n : m->nclusters;
	for (uint64_t c = old; c < n; c++) {
		m->entry[c] = encode_state(QCS_AVAILABLE);
		qcow_bitmap_set(&m->available, c);
	}
	if (n > old)
		m->count[QCS_AVAILABLE] += n - old;
	return 0;
}

void qcow_map_fit(struct qcow_map *m)
{
	if (m->capacity > m->nclusters)
		(void)set_capacity(m, m->nclusters);   /* a failed shrink keeps the bigger arrays */
	if (m->lists_cap > m->nlists && m->nlists) {
		struct qcow_reflist *p = qcow_realloc(m->lists, m->nlists * sizeof(*p));
		if (p) {
			m->lists = p;
			m->lists_cap = m->nlists;
		}
	}
}

enum qcow_cstate qcow_map_state(const struct qcow_map *m, uint64_t c)
{
	return decode_state(m->entry[c]);
}

uint64_t qcow_map_slot(const struct qcow_map *m, uint64_t c) { return m->entry[c]; }
uint64_t qcow_map_pincount(const struct qcow_map *m, uint64_t c) { return m->entry[c] & VALUE_MASK; }

void qcow_map_set_ref(struct qcow_map *m, uint64_t c, uint64_t slot)
{
	map_put(m, c, slot & VALUE_MASK);
}

void qcow_map_set_pinned(struct qcow_map *m, uint64_t c, uint64_t count)
{
	map_put(m, c, (TAG_PINNED << TAG_SHIFT) | (count & VALUE_MASK));
}

void qcow_map_set_state(struct qcow_map *m, uint64_t c, enum qcow_cstate s)
{
	map_put(m, c, encode_state(s));
}

int qcow_map_add_ref(struct qcow_map *m, uint64_t c, uint64_t slot)
{
	/* a move copies and rewrites the pointers it knew: a new one cancels it */
	qcow_map_move_cancel(m, c);
	enum qcow_cstate s = decode_state(m->entry[c]);
	/* a table (slot 0), or a slot that is no 8-byte pointer: pinned */
	if (s == QCS_PINNED || ((slot == 0 || (slot & ENT_REPEAT)) && is_referenced(s))) {
		qcow_map_set_pinned(m, c, qcow_map_refcount(m, c) + 1);
		return 0;
	}
	if (s == QCS_REF) {
		uint64_t idx = list_new(m, m->entry[c], slot);
		if (idx == UINT64_MAX)
			return -ENOMEM;
		map_put(m, c, (TAG_SHARED << TAG_SHIFT) | idx);
		return 0;
	}
	if (s == QCS_SHARED) {
		int ret = list_append(m, list_of(m, c), slot);
		if (ret == 0)
			qcow_map_mark_rc_dirty(m, c);
		return ret;
	}
	if (slot == 0 || (slot & ENT_REPEAT))
		qcow_map_set_pinned(m, c, 1);
	else
		qcow_map_set_ref(m, c, slot);
	return 0;
}

void qcow_map_drop_ref(struct qcow_map *m, uint64_t c, uint64_t slot)
{
	qcow_map_move_cancel(m, c);
	enum qcow_cstate s = decode_state(m->entry[c]);
	if (s == QCS_SHARED) {
		struct qcow_reflist *l = list_of(m, c);
		list_remove(l, slot);
		/* marked here: map_put compares counts after the list shrank */
		qcow_map_mark_rc_dirty(m, c);
		if (l->len == 1 && ent_count(ents(l)[0]) == 1)
			qcow_map_set_ref(m, c, ent_slot(ents(l)[0]));   /* releases the list */
		return;
	}
	if (s == QCS_PINNED && qcow_map_pincount(m, c) > 1)
		qcow_map_set_pinned(m, c, qcow_map_pincount(m, c) - 1);
	else
		qcow_map_set_state(m, c, QCS_JUNK);
}

void qcow_map_replace_ref(struct qcow_map *m, uint64_t c, uint64_t old_slot, uint64_t new_slot)
{
	enum qcow_cstate s = decode_state(m->entry[c]);
	if (s == QCS_REF && m->entry[c] == old_slot) {
		qcow_map_set_ref(m, c, new_slot);
	} else if (s == QCS_SHARED && qcow_map_has_ref(m, c, old_slot)) {
		struct qcow_reflist *l = list_of(m, c);
		/* the count stays: take one from old_slot, then add it back at
		 * new_slot (room for it exists: the old one's entry is freed or
		 * decremented first, and an append reuses that space) */
		list_remove(l, old_slot);
		if (list_append(m, l, new_slot))
			(void)list_append(m, l, old_slot);   /* out of memory: the old slot stays (a stale slot cancels moves) */
	}
}

void qcow_map_rehome_refs(struct qcow_map *m, uint64_t c, uint64_t from, uint64_t to, uint64_t len)
{
	enum qcow_cstate s = decode_state(m->entry[c]);
	if (s == QCS_REF && m->entry[c] >= from && m->entry[c] - from < len) {
		qcow_map_set_ref(m, c, m->entry[c] - from + to);
	} else if (s == QCS_SHARED) {
		uint64_t *e = ents(list_of(m, c));
		for (uint32_t i = 0; i < list_of(m, c)->len; i++) {
			uint64_t slot = ent_slot(e[i]);
			if (slot >= from && slot - from < len)
				e[i] = (slot - from + to) | (e[i] & ENT_REPEAT);
		}
	}
}

void qcow_map_take_refs(struct qcow_map *m, uint64_t dst, uint64_t src, enum qcow_cstate src_becomes)
{
	uint64_t e = m->entry[src];
	if (decode_state(e) != QCS_SHARED) {
		qcow_map_set_ref(m, dst, e);
		qcow_map_set_state(m, src, src_becomes);
		return;
	}
	/* the list changes hands: src's change must not release it */
	m->list_handover = true;
	map_put(m, src, encode_state(src_becomes));
	m->list_handover = false;
	map_put(m, dst, e);
}

uint64_t qcow_map_ref_slot(const struct qcow_map *m, uint64_t c, uint64_t i)
{
	enum qcow_cstate s = decode_state(m->entry[c]);
	if (s == QCS_REF)
		return i == 0 ? m->entry[c] : 0;
	if (s != QCS_SHARED)
		return 0;
	const struct qcow_reflist *l = list_of(m, c);
	const uint64_t *e = ents_c(l);
	for (uint32_t k = 0; k < l->len; k++) {
		if (i < ent_count(e[k]))
			return ent_slot(e[k]);
		i -= ent_count(e[k]);
	}
	return 0;
}

bool qcow_map_has_ref(const struct qcow_map *m, uint64_t c, uint64_t slot)
{
	enum qcow_cstate s = decode_state(m->entry[c]);
	if (s == QCS_REF)
		return m->entry[c] == slot;
	if (s != QCS_SHARED)
		return false;
	const struct qcow_reflist *l = list_of(m, c);
	const uint64_t *e = ents_c(l);
	for (uint32_t i = 0; i < l->len; i++)
		if (ent_slot(e[i]) == slot)
			return true;
	return false;
}

uint64_t qcow_map_refcount(const struct qcow_map *m, uint64_t c)
{
	enum qcow_cstate s = decode_state(m->entry[c]);
	return s == QCS_REF ? 1 : s == QCS_PINNED ? qcow_map_pincount(m, c) : s == QCS_SHARED ? list_total(list_of(m, c)) : 0;
}

uint64_t qcow_map_total_used(const struct qcow_map *m)
{
	return m->count[QCS_REF] + m->count[QCS_SHARED] + m->count[QCS_PINNED];
}
uint64_t qcow_map_total_free(const struct qcow_map *m)
{
	return m->count[QCS_JUNK] + m->count[QCS_ERASED] + m->count[QCS_AVAILABLE];
}

uint64_t qcow_map_want_refcount(const struct qcow_map *m, uint64_t c)
{
	return c < m->nclusters ? want_of(m, m->entry[c]) : 0;
}

void qcow_map_mark_rc_dirty(struct qcow_map *m, uint64_t c)
{
	uint64_t b = c >> m->rb_shift;
	if (b >= m->rc_dirty.nbits && qcow_bitmap_resize(&m->rc_dirty, b + 1))
		return;   /* out of memory: this block's refcounts are not rewritten
		           * (not even at close); the next read-write open compares
		           * every refcount with the references and repairs it */
	qcow_bitmap_set(&m->rc_dirty, b);
}

uint64_t qcow_map_lowest_available(const struct qcow_map *m) { return qcow_bitmap_next(&m->available, 0); }
uint64_t qcow_map_available_run(const struct qcow_map *m, uint64_t n, uint64_t end)
{
	if (end > m->nclusters)
		end = m->nclusters;
	for (uint64_t c = qcow_bitmap_next(&m->available, 0); c != UINT64_MAX && n <= end && c <= end - n;) {
		uint64_t k = 1;
		while (k < n && qcow_map_state(m, c + k) == QCS_AVAILABLE)
			k++;
		if (k == n)
			return c;
		c = qcow_bitmap_next(&m->available, c + k);
	}
	return UINT64_MAX;
}
uint64_t qcow_map_next_junk(const struct qcow_map *m, uint64_t from) { return qcow_bitmap_next(&m->junk, from); }
uint64_t qcow_map_highest_movable(const struct qcow_map *m, uint64_t before)
{
	/* skip clusters already moving */
	uint64_t c = before;
	for (;;) {
		c = qcow_bitmap_prev(&m->movable, c);
		if (c == UINT64_MAX || !qcow_bitmap_test(&m->moving, c))
			return c;
	}
}
uint64_t qcow_map_last_block(const struct qcow_map *m) { return qcow_bitmap_prev(&m->busy, m->nclusters); }
bool qcow_map_is_immovable(const struct qcow_map *m, uint64_t c) { return c < m->first_movable || decode_state(m->entry[c]) == QCS_PINNED; }

struct qcow_move *qcow_map_move_start(struct qcow_map *m, uint64_t src, uint64_t dst)
{
	struct qcow_move *mv = NULL;
	for (unsigned i = 0; i < m->nmoves_cap; i++)
		if (!m->moves[i].in_use) {
			mv = &m->moves[i];
			break;
		}
	if (!mv) {
		unsigned cap = m->nmoves_cap ? m->nmoves_cap * 2 : 64;
		struct qcow_move *p = qcow_realloc(m->moves, cap * sizeof(*p));
		if (!p)
			return NULL;
		memset(p + m->nmoves_cap, 0, (cap - m->nmoves_cap) * sizeof(*p));
		mv = &p[m->nmoves_cap];
		m->moves = p;
		m->nmoves_cap = cap;
	}
	*mv = (struct qcow_move){ .src = src, .dst = dst, .state = QMOVE_COPYING, .in_use = true };
	m->nmoves_active++;
	qcow_map_set_state(m, dst, QCS_COPIES);
	qcow_bitmap_set(&m->moving, src);
	return mv;
}

struct qcow_move *qcow_map_move_find(struct qcow_map *m, uint64_t src)
{
	if (!qcow_bitmap_test(&m->moving, src))
		return NULL;
	for (unsigned i = 0; i < m->nmoves_cap; i++)
		if (m->moves[i].in_use && !m->moves[i].cancelled && m->moves[i].src == src)
			return &m->moves[i];
	return NULL;
}

bool qcow_map_is_moving(const struct qcow_map *m, uint64_t c) { return qcow_bitmap_test(&m->moving, c); }

void qcow_map_move_cancel(struct qcow_map *m, uint64_t src)
{
	struct qcow_move *mv = qcow_map_move_find(m, src);
	if (!mv || mv->state == QMOVE_REFERENCED)
		return;
	mv->cancelled = true;
	qcow_bitmap_clear(&m->moving, src);
	qcow_map_set_state(m, mv->dst, QCS_JUNK);
}

void qcow_map_move_set_state(struct qcow_map *m, struct qcow_move *mv, enum qcow_move_state s)
{
	mv->state = s;
	mv->flush_seen = false;
}

void qcow_map_move_complete(struct qcow_map *m, struct qcow_move *mv)
{
	if (!mv->cancelled) {
		qcow_bitmap_clear(&m->moving, mv->src);
		if (decode_state(m->entry[mv->src]) == QCS_PENDING)
			qcow_map_set_state(m, mv->src, QCS_JUNK);
	}
	mv->in_use = false;
	m->nmoves_active--;
}

const char *qcow_map_state_name(enum qcow_cstate s)
{
	static const char *const names[QCS_NSTATES] = {
		"referenced", "pinned", "junk", "erasing", "erased", "flushing",
		"available", "copies", "roots", "pending", "shared",
	};
	return s < QCS_NSTATES ? names[s] : "?";
}

const char *qcow_map_check(const struct qcow_map *m)
{
	static char msg[200];
	uint64_t count[QCS_NSTATES] = { 0 };
	for (uint64_t c = 0; c < m->nclusters; c++) {
		enum qcow_cstate s = decode_state(m->entry[c]);
		if (s >= QCS_NSTATES) {
			snprintf(msg, sizeof(msg), "inv1: cluster %llu has no valid state", (unsigned long long)c);
			return msg;
		}
		count[s]++;
		if (s == QCS_SHARED) {
			uint64_t idx = m->entry[c] & VALUE_MASK;
			if (idx >= m->nlists || m->lists[idx].cap == 0 || m->lists[idx].len == 0 ||
			    m->lists[idx].len > m->lists[idx].cap || list_total(&m->lists[idx]) < 2) {
				snprintf(msg, sizeof(msg), "shared cluster %llu has no valid reference list", (unsigned long long)c);
				return msg;
			}
		}
		if (qcow_bitmap_test(&m->available, c) != (s == QCS_AVAILABLE) ||
		    qcow_bitmap_test(&m->junk, c) != (s == QCS_JUNK) ||
		    qcow_bitmap_test(&m->busy, c) == is_free_state(s) ||
		    qcow_bitmap_test(&m->movable, c) != (is_referenced(s) && c >= m->first_movable)) {
			snprintf(msg, sizeof(msg), "inv1: bitmaps disagree with state %s of cluster %llu",
				 qcow_map_state_name(s), (unsigned long long)c);
			return msg;
		}
		if (c < m->first_movable && s != QCS_PINNED && !is_free_state(s) && s != QCS_ERASING &&
		    s != QCS_FLUSHING && s != QCS_ROOTS && s != QCS_PENDING) {
			snprintf(msg, sizeof(msg), "cluster %llu below first_movable is %s",
				 (unsigned long long)c, qcow_map_state_name(s));
			return msg;
		}
	}
	for (int s = 0; s < QCS_NSTATES; s++)
		if (count[s] != m->count[s]) {
			snprintf(msg, sizeof(msg), "inv1: counter of %s is %llu, entries say %llu",
				 qcow_map_state_name(s), (unsigned long long)m->count[s], (unsigned long long)count[s]);
			return msg;
		}
	unsigned active = 0;
	uint64_t copies_expected = 0;
	for (unsigned i = 0; i < m->nmoves_cap; i++) {
		const struct qcow_move *mv = &m->moves[i];
		if (!mv->in_use)
			continue;
		active++;
		if (mv->cancelled)
			continue;
		enum qcow_cstate ss = decode_state(m->entry[mv->src]);
		enum qcow_cstate ds = decode_state(m->entry[mv->dst]);
		if (!qcow_bitmap_test(&m->moving, mv->src)) {
			snprintf(msg, sizeof(msg), "move %llu->%llu: source lost its moving mark",
				 (unsigned long long)mv->src, (unsigned long long)mv->dst);
			return msg;
		}
		if (mv->state == QMOVE_REFERENCED) {
			/* the guest may have discarded the new copy since */
			if (ss != QCS_PENDING || (!is_referenced(ds) && !is_free_state(ds) && ds != QCS_ERASING)) {
				snprintf(msg, sizeof(msg), "inv4: referenced move %llu->%llu has src %s dst %s",
					 (unsigned long long)mv->src, (unsigned long long)mv->dst,
					 qcow_map_state_name(ss), qcow_map_state_name(ds));
				return msg;
			}
		} else {
			copies_expected++;
			if (!is_referenced(ss) || ds != QCS_COPIES) {
				snprintf(msg, sizeof(msg), "inv4: move %llu->%llu before rewrite has src %s dst %s",
					 (unsigned long long)mv->src, (unsigned long long)mv->dst,
					 qcow_map_state_name(ss), qcow_map_state_name(ds));
				return msg;
			}
		}
	}
	if (active != m->nmoves_active)
		return "move table counter disagrees";
	if (copies_expected != m->count[QCS_COPIES])
		return "Copies clusters that belong to no move";
	if (m->moving.count > active)
		return "moving marks without a move";
	return NULL;
}

void qcow_map_summary(const struct qcow_map *m, char *buf, size_t len)
{
	size_t off = (size_t)snprintf(buf, len, "clusters=%llu", (unsigned long long)m->nclusters);
	for (int s = 0; s < QCS_NSTATES && off < len; s++)
		off += (size_t)snprintf(buf + off, len - off, " %s=%llu", qcow_map_state_name(s),
					(unsigned long long)m->count[s]);
	if (off < len)
		snprintf(buf + off, len - off, " moves=%u", m->nmoves_active);
}

uint64_t qcow_map_memory(const struct qcow_map *m)
{
	uint64_t words0 = (m->capacity + 63) / 64;
	uint64_t bitmap_bytes = (words0 + words0 / 64 + 2) * 8;
	return m->capacity * 8 + 5 * bitmap_bytes + m->nmoves_cap * sizeof(struct qcow_move) +
	       m->lists_cap * sizeof(struct qcow_reflist) + m->list_slots * sizeof(uint64_t);
}
