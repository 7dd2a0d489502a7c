/*
 * qcow_pbitmap.h - the persistent dirty bitmaps an image carries
 * (qcow_persistent_bitmap.c owns them; qcow_internal.h includes this).
 *
 * Only the data the lower layers read is here: which file ranges hold a
 * bitmap table, so that qcow_tables.c (qcow_slot_kind) can tell a bitmap
 * table entry from an L2 entry without calling up.  Everything else is
 * reached through the functions in qcow_internal.h.
 */
#ifndef QCOW_PBITMAP_H
#define QCOW_PBITMAP_H
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

/* One bitmap of the directory. */
struct qcow_pbitmap_entry {
	uint64_t table_off;     /* its bitmap table (whole clusters, pinned) */
	uint32_t table_size;    /* entries */
	uint32_t flags;         /* as on disk (in_use, auto) */
	unsigned gran_bits;
	char *name;
	uint64_t dir_pos;       /* offset of its entry inside the directory */
	/* loaded: its bits are in memory and its in_use flag was set by us
	 * (the close stores it back and clears the flag) */
	bool loaded;
	uint64_t *bits;         /* bit k: granule k is dirty (lock below) */
	uint64_t nbits;
};

struct qcow_pbitmaps {
	/* guards bits/nbits of loaded entries only; nests inside nothing
	 * (taken with no other lock held, or under img->lock/flush_lock,
	 * and nothing is taken under it) */
	pthread_mutex_t lock;
	uint64_t ext_pos;       /* header offset of the bitmaps extension */
	uint64_t dir_off, dir_size;
	uint8_t *dir;           /* the directory as on disk */
	uint32_t n;
	struct qcow_pbitmap_entry *v;
	unsigned nloaded;
};

/* Whether the 8-byte slot at file offset slot lies in a bitmap table. */
static inline bool qcow_pbitmap_table_slot(const struct qcow_pbitmaps *p, uint64_t slot)
{
	if (!p)
		return false;
	for (uint32_t i = 0; i < p->n; i++)
		if (slot >= p->v[i].table_off && slot < p->v[i].table_off + (uint64_t)p->v[i].table_size * 8)
			return true;
	return false;
}

#endif
