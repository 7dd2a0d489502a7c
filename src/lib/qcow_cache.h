/*
 * qcow_cache.h - the metadata cache: L2 tables by host cluster.
 *
 * Owns: cluster-sized buffers in on-disk (big-endian) format, keyed by the
 * host cluster index, with a dirty flag and a pin count.  Rules:
 *  - Only used under the image lock; buffers are never handed out of it.
 *  - PINNED HANDLES: code that keeps an entry across a call that may
 *    insert, evict, allocate a cluster or drop img->lock pins it first
 *    (qcow_cache_pin) and unpins it after.  Eviction never reuses a pinned
 *    entry, and removing a pinned entry only unhashes it (a zombie): its
 *    buffer stays valid and is recycled when the last pin goes (as
 *    SQLite's pager never recycles a referenced page).  A handle held only
 *    inside one critical section with no such call needs no pin.
 *  - Dirty entries are never evicted (a reload from disk would be stale);
 *    a flush pins the entries whose old contents it is writing, for the
 *    same reason.
 *  - When every entry is pinned or dirty the cache grows past its budget
 *    instead of failing; the image flushes soon after
 *    (qcow_cache_over_budget).
 */
#ifndef QCOW_CACHE_H
#define QCOW_CACHE_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow_cached {
	uint64_t cluster;
	uint8_t *data;
	bool valid;
	bool dirty;
	bool recently_used;
	bool zombie;          /* removed while pinned: recycled at the last unpin */
	unsigned pins;
	struct qcow_cached *hash_next;   /* chain in the bucket, or the free list */
};

struct qcow_cache {
	size_t budget;        /* entries we aim to keep */
	size_t nslots;        /* entries allocated */
	size_t cluster_size;
	struct qcow_cached **slots;     /* entries have stable addresses */
	struct qcow_cached **buckets;
	struct qcow_cached *free_list;  /* invalid entries that keep their buffer */
	size_t nbuckets;      /* power of two */
	size_t clock_hand;
	size_t ndirty;
	size_t nvalid;
};

int qcow_cache_init(struct qcow_cache *c, size_t budget_entries, size_t cluster_size);
void qcow_cache_free(struct qcow_cache *c);
struct qcow_cached *qcow_cache_find(struct qcow_cache *c, uint64_t cluster);
/* A new entry for cluster (contents uninitialised, not dirty); NULL on ENOMEM. */
struct qcow_cached *qcow_cache_insert(struct qcow_cache *c, uint64_t cluster);
void qcow_cache_remove(struct qcow_cache *c, struct qcow_cached *e);
void qcow_cache_rekey(struct qcow_cache *c, struct qcow_cached *e, uint64_t cluster);
void qcow_cache_set_dirty(struct qcow_cache *c, struct qcow_cached *e, bool dirty);
bool qcow_cache_over_budget(const struct qcow_cache *c);
/* Pins e against eviction and reuse (see the rules above) / lets it go. */
void qcow_cache_pin(struct qcow_cache *c, struct qcow_cached *e);
void qcow_cache_unpin(struct qcow_cache *c, struct qcow_cached *e);

#endif
