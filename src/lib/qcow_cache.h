/*
 * qcow_cache.h - the metadata cache: L2 tables by host cluster.
 *
 * Owns: cluster-sized buffers in on-disk (big-endian) format, keyed by the
 * host cluster index, with a dirty flag and a writeback pin.  Rules:
 *  - Only used under the image lock; buffers are never handed out of it.
 *  - Dirty entries and entries whose old contents a flush is writing
 *    (writeback > 0) are never evicted: a reload from disk would be stale.
 *  - When every entry is pinned the cache grows past its budget instead of
 *    failing; the image flushes soon after (qcow_cache_over_budget).
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
	bool zombie;          /* removed while a flush still writes its old contents */
	unsigned writeback;
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
/* A flush took a copy of e to write it: pin / unpin it. */
void qcow_cache_writeback_begin(struct qcow_cache *c, struct qcow_cached *e);
void qcow_cache_writeback_end(struct qcow_cache *c, struct qcow_cached *e);

#endif
