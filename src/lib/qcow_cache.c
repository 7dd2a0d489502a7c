/*
 * qcow_cache.c - metadata cache (see qcow_cache.h).  Hash chains of
 * individually allocated entries (so pointers stay valid while the cache
 * grows); eviction by a clock hand over clean, unpinned entries.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <string.h>

static size_t bucket_of(const struct qcow_cache *c, uint64_t cluster)
{
	return (size_t)((cluster * 0x9e3779b97f4a7c15ull) >> 17) & (c->nbuckets - 1);
}

static int alloc_buckets(struct qcow_cache *c, size_t n)
{
	struct qcow_cached **b = qcow_calloc(n, sizeof(*b));
	if (!b)
		return -ENOMEM;
	qcow_free(c->buckets);
	c->buckets = b;
	c->nbuckets = n;
	for (size_t i = 0; i < c->nslots; i++) {
		struct qcow_cached *e = c->slots[i];
		if (e->valid) {
			size_t k = bucket_of(c, e->cluster);
			e->hash_next = b[k];
			b[k] = e;
		}
	}
	return 0;
}

int qcow_cache_init(struct qcow_cache *c, size_t budget, size_t cluster_size)
{
	memset(c, 0, sizeof(*c));
	c->budget = budget < 8 ? 8 : budget;
	c->cluster_size = cluster_size;
	return alloc_buckets(c, 64);
}

void qcow_cache_free(struct qcow_cache *c)
{
	for (size_t i = 0; i < c->nslots; i++) {
		qcow_free(c->slots[i]->data);
		qcow_free(c->slots[i]);
	}
	qcow_free(c->slots);
	qcow_free(c->buckets);
	memset(c, 0, sizeof(*c));
}

struct qcow_cached *qcow_cache_find(struct qcow_cache *c, uint64_t cluster)
{
	for (struct qcow_cached *e = c->buckets[bucket_of(c, cluster)]; e; e = e->hash_next)
		if (e->cluster == cluster) {
			e->recently_used = true;
			return e;
		}
	return NULL;
}

static void unlink_entry(struct qcow_cache *c, struct qcow_cached *e)
{
	struct qcow_cached **pp = &c->buckets[bucket_of(c, e->cluster)];
	while (*pp && *pp != e)
		pp = &(*pp)->hash_next;
	if (*pp)
		*pp = e->hash_next;
	e->hash_next = NULL;
}

static void link_entry(struct qcow_cache *c, struct qcow_cached *e)
{
	size_t b = bucket_of(c, e->cluster);
	e->hash_next = c->buckets[b];
	c->buckets[b] = e;
}

void qcow_cache_set_dirty(struct qcow_cache *c, struct qcow_cached *e, bool dirty)
{
	if (e->dirty != dirty)
		c->ndirty += dirty ? 1 : (size_t)-1;
	e->dirty = dirty;
}

void qcow_cache_remove(struct qcow_cache *c, struct qcow_cached *e)
{
	if (!e->valid)
		return;
	qcow_cache_set_dirty(c, e, false);
	unlink_entry(c, e);
	e->valid = false;
	c->nvalid--;
	if (e->pins) {
		/* someone still holds it: recycle it at the last unpin */
		e->zombie = true;
		return;
	}
	e->hash_next = c->free_list;
	c->free_list = e;
}

void qcow_cache_pin(struct qcow_cache *c, struct qcow_cached *e)
{
	(void)c;
	e->pins++;
}

void qcow_cache_unpin(struct qcow_cache *c, struct qcow_cached *e)
{
	if (--e->pins == 0 && e->zombie) {
		e->zombie = false;
		e->hash_next = c->free_list;
		c->free_list = e;
	}
}

void qcow_cache_rekey(struct qcow_cache *c, struct qcow_cached *e, uint64_t cluster)
{
	unlink_entry(c, e);
	e->cluster = cluster;
	link_entry(c, e);
}

/* A reusable entry: from the free list, else a clean unpinned victim of
 * the clock, else a new entry past the budget. */
static struct qcow_cached *free_entry(struct qcow_cache *c)
{
	if (c->free_list) {
		struct qcow_cached *e = c->free_list;
		c->free_list = e->hash_next;
		e->hash_next = NULL;
		return e;
	}
	if (c->nslots >= c->budget) {
		for (size_t n = 0; n < 2 * c->nslots; n++) {
			struct qcow_cached *e = c->slots[c->clock_hand];
			c->clock_hand = (c->clock_hand + 1) % c->nslots;
			if (!e->valid || e->dirty || e->pins)
				continue;
			if (e->recently_used) {
				e->recently_used = false;
				continue;
			}
			qcow_cache_remove(c, e);   /* clean and unpinned: goes to the free list */
			c->free_list = e->hash_next;
			e->hash_next = NULL;
			return e;
		}
	}
	struct qcow_cached **s = qcow_realloc(c->slots, (c->nslots + 1) * sizeof(*s));
	if (!s)
		return NULL;
	c->slots = s;
	struct qcow_cached *e = qcow_calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->data = qcow_aligned_alloc(4096, c->cluster_size);
	if (!e->data) {
		qcow_free(e);
		return NULL;
	}
	s[c->nslots++] = e;
	if (c->nslots > c->nbuckets)
		alloc_buckets(c, c->nbuckets * 2);   /* on failure chains just get longer */
	return e;
}

struct qcow_cached *qcow_cache_insert(struct qcow_cache *c, uint64_t cluster)
{
	struct qcow_cached *e = free_entry(c);
	if (!e)
		return NULL;
	e->cluster = cluster;
	e->valid = true;
	e->dirty = false;
	e->pins = 0;
	e->recently_used = true;
	c->nvalid++;
	link_entry(c, e);
	return e;
}

bool qcow_cache_over_budget(const struct qcow_cache *c)
{
	return c->ndirty > c->budget / 2;
}
