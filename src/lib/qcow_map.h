/*
 * qcow_map.h - the cluster map: for every physical cluster of the image
 * file, exactly one state (doc/design.md, "The cluster map").
 *
 * Representation: one 64-bit entry per cluster plus five bitmaps
 * (available, junk, movable, busy, moving) with summary levels, and a
 * counter per state: about 8.7 bytes per cluster, O(1) state changes,
 * O(log n)-ish searches for the lowest available / junk and the highest
 * movable cluster.  Moves in flight live in a small table (O(1) each).
 * Clusters with several pointers keep them in an overflow table of
 * reference lists (16 bytes per list; a list of one distinct slot - up to
 * 8 references from it - lives in those 16 bytes, longer ones in an array
 * of 8 bytes per distinct slot, capacity a power of two): images without
 * snapshots or compressed data pay nothing for it.
 *
 * Entry encoding:
 *   bit 63 clear          REF: referenced by exactly one pointer; the value
 *                         is the byte offset in the file of that pointer's
 *                         8-byte slot (in an L1 table, L2 table or refcount
 *                         table).  Movable when >= first_movable.
 *   0x8... (tag 8)        PINNED: referenced with the count in bits 0..55:
 *                         whole tables (header, L1, refcount table,
 *                         snapshot table and snapshot L1 tables, bitmap
 *                         structures), whose references have no 8-byte
 *                         slot.  Moved only as tables (qcow_relocate.c).
 *   0x9... (tag 9)        SHARED: referenced by two or more pointers (a
 *                         cluster reachable from snapshots, a host cluster
 *                         holding pieces of several compressed clusters);
 *                         bits 0..55 index the overflow table, which holds
 *                         every pointer's slot (a slot appears once per
 *                         reference: a data cluster of an L2 table that two
 *                         L1 tables share has the same slot twice, as QEMU
 *                         counts it).  Movable like REF: a move rewrites
 *                         every pointer.
 *   0xF... (tag F)        a free or transient state in the low byte.
 *
 * The map is not thread-safe by itself: the image lock guards it.
 */
#ifndef QCOW_MAP_H
#define QCOW_MAP_H
#include <stdbool.h>
#include <stdint.h>
#include "qcow_bitmap.h"

enum qcow_cstate {
	QCS_REF,        /* one pointer; entry holds its slot */
	QCS_PINNED,     /* a whole table (references with slot 0); entry holds the count */
	QCS_JUNK,       /* unreferenced, arbitrary contents */
	QCS_ERASING,    /* taken from Junk by the eraser, punch in progress */
	QCS_ERASED,     /* punched/zeroed, waiting for a flush */
	QCS_FLUSHING,   /* erased and included in the flush now running */
	QCS_AVAILABLE,  /* reads zero after any crash: allocatable */
	QCS_COPIES,     /* destination of a move whose pointer is not rewritten yet */
	QCS_ROOTS,      /* allocated by an operation in flight, not linked yet */
	QCS_PENDING,    /* move source after the pointer rewrite, until the completing flush */
	QCS_SHARED,     /* two or more pointers; their slots in the overflow table */
	QCS_NSTATES
};

enum qcow_move_state { QMOVE_COPYING, QMOVE_COPIED, QMOVE_FLUSHED, QMOVE_REFERENCED };

struct qcow_move {
	uint64_t src, dst;
	enum qcow_move_state state;
	bool cancelled;       /* dst (taken from Available) already given up to Junk,
	                         since the copy may have written it; slot reusable */
	bool flush_seen;      /* a flush started while in this state */
	bool in_use;
};

/* The slots of a SHARED cluster's pointers: entries of an 8-byte aligned
 * slot with its repeat count minus one in the low 3 bits (qcow_map.c). */
struct qcow_reflist {
	union {
		uint64_t *ent;    /* cap > 1: the entries */
		uint64_t one;     /* cap 1: the only entry, in place */
	};
	uint32_t len, cap;    /* a free list entry has cap 0 and len = next free index */
};

struct qcow_map {
	uint64_t nclusters;
	uint64_t capacity;        /* clusters the entry array and bitmaps hold */
	uint64_t first_movable;   /* clusters below never move */
	uint64_t *entry;
	struct qcow_bitmap available, junk, movable, busy, moving;
	uint64_t count[QCS_NSTATES];
	/* refcount projection: which refcount blocks need rewriting */
	unsigned rb_shift;        /* log2(entries per refcount block) */
	struct qcow_bitmap rc_dirty;
	/* reference lists of SHARED clusters, and the head of their free list */
	struct qcow_reflist *lists;
	uint64_t nlists, lists_cap, lists_free;
	uint64_t list_slots;      /* slots allocated in all lists (memory figure) */
	bool list_handover;       /* take_refs: the list changes owner, keep it */
	/* moves in flight */
	struct qcow_move *moves;
	unsigned nmoves_cap, nmoves_active;
	bool runtime_asserts;
	bool check_transitions;   /* every state change against the table in qcow_map.c */
};

int qcow_map_init(struct qcow_map *m, uint64_t nclusters, unsigned rb_shift);
void qcow_map_free(struct qcow_map *m);
/* Grows (new clusters Available: a grown file tail reads zero) or shrinks
 * (every dropped cluster must be Junk, Erased or Available).  The arrays
 * have a capacity that grows geometrically, so growing one cluster at a
 * time is cheap; memory follows the clusters in the map, not the file. */
int qcow_map_resize(struct qcow_map *m, uint64_t nclusters);
/* Gives back the capacity beyond the clusters in the map (after the open's
 * scan, which grew it by half again at a time). */
void qcow_map_fit(struct qcow_map *m);

enum qcow_cstate qcow_map_state(const struct qcow_map *m, uint64_t c);
uint64_t qcow_map_slot(const struct qcow_map *m, uint64_t c);     /* REF only */
/* The i-th pointer slot of a REF (i = 0) or SHARED cluster. */
uint64_t qcow_map_ref_slot(const struct qcow_map *m, uint64_t c, uint64_t i);
/* Whether c has a pointer at slot (REF or SHARED). */
bool qcow_map_has_ref(const struct qcow_map *m, uint64_t c, uint64_t slot);
uint64_t qcow_map_pincount(const struct qcow_map *m, uint64_t c); /* PINNED only */
void qcow_map_set_ref(struct qcow_map *m, uint64_t c, uint64_t slot);
void qcow_map_set_pinned(struct qcow_map *m, uint64_t c, uint64_t count);
void qcow_map_set_state(struct qcow_map *m, uint64_t c, enum qcow_cstate s);
/* Adds one reference from the pointer at slot: free -> REF, REF ->
 * SHARED(2), SHARED(n) -> n+1.  Slot 0 means "a table, no pointer slot":
 * it pins the cluster (PINNED(n+1)), as does any reference to a PINNED
 * cluster.  -ENOMEM leaves the map unchanged. */
int qcow_map_add_ref(struct qcow_map *m, uint64_t c, uint64_t slot);
/* Drops the reference from the pointer at slot: REF -> Junk, SHARED(2) ->
 * REF (the other slot), SHARED(n) -> n-1, PINNED(1) -> Junk, PINNED(n) ->
 * n-1. */
void qcow_map_drop_ref(struct qcow_map *m, uint64_t c, uint64_t slot);
/* The pointer at old_slot that references c now lives at new_slot (a
 * table holding it moved or was copied); one occurrence. */
void qcow_map_replace_ref(struct qcow_map *m, uint64_t c, uint64_t old_slot, uint64_t new_slot);
/* Every pointer of c whose slot lies in [from, from + len) now lives at
 * the same place of [to, to + len) (the table holding them moved). */
void qcow_map_rehome_refs(struct qcow_map *m, uint64_t c, uint64_t from, uint64_t to, uint64_t len);
/* Gives dst the pointers of src (a move's pointer rewrite): dst becomes
 * REF or SHARED with src's slots, src goes to src_becomes. */
void qcow_map_take_refs(struct qcow_map *m, uint64_t dst, uint64_t src, enum qcow_cstate src_becomes);
/* References c has (REF 1, SHARED and PINNED their count, 0 for the
 * other states). */
uint64_t qcow_map_refcount(const struct qcow_map *m, uint64_t c);

/* The seed's total_used / total_free: referenced (REF, SHARED, PINNED)
 * clusters, and clusters in Junk, Erased or Available. */
uint64_t qcow_map_total_used(const struct qcow_map *m);
uint64_t qcow_map_total_free(const struct qcow_map *m);

/* What the on-disk refcount of c must be, derived from its state. */
uint64_t qcow_map_want_refcount(const struct qcow_map *m, uint64_t c);
void qcow_map_mark_rc_dirty(struct qcow_map *m, uint64_t c);

uint64_t qcow_map_lowest_available(const struct qcow_map *m);       /* UINT64_MAX if none */
/* The lowest run of n Available clusters that ends at or below `end`
 * (UINT64_MAX: anywhere in the map), or UINT64_MAX. */
uint64_t qcow_map_available_run(const struct qcow_map *m, uint64_t n, uint64_t end);
uint64_t qcow_map_next_junk(const struct qcow_map *m, uint64_t from);
uint64_t qcow_map_highest_movable(const struct qcow_map *m, uint64_t before);
/* Highest cluster that is not Junk, Erased or Available (get_last_block),
 * or UINT64_MAX when there is none.  The file may be truncated after it. */
uint64_t qcow_map_last_block(const struct qcow_map *m);
bool qcow_map_is_immovable(const struct qcow_map *m, uint64_t c);

/* Moves.  start: src must be movable REF or SHARED, dst Available (never
 * Junk: a Junk cluster's old pointer may still be the durable one, and a
 * crash would show the copied data in that discarded range; doc/design.md,
 * "Departures"); dst becomes Copies. */
struct qcow_move *qcow_map_move_start(struct qcow_map *m, uint64_t src, uint64_t dst);
struct qcow_move *qcow_map_move_find(struct qcow_map *m, uint64_t src);
bool qcow_map_is_moving(const struct qcow_map *m, uint64_t c);
/* Cancels the move of src unless it reached Referenced; dst -> Junk. */
void qcow_map_move_cancel(struct qcow_map *m, uint64_t src);
void qcow_map_move_set_state(struct qcow_map *m, struct qcow_move *mv, enum qcow_move_state s);
/* Ends a move after its completing flush (or drops a cancelled one):
 * src PENDING -> Junk. */
void qcow_map_move_complete(struct qcow_map *m, struct qcow_move *mv);

const char *qcow_map_state_name(enum qcow_cstate s);
/* Whether the state machine allows a cluster to go from one state to the
 * other (the table in qcow_map.c). */
bool qcow_map_transition_allowed(enum qcow_cstate from, enum qcow_cstate to);
/* Checks every invariant of doc/design.md that the map alone can
 * see; returns NULL or a static description of the first violation. */
const char *qcow_map_check(const struct qcow_map *m);
/* One line: counts per state and moves. */
void qcow_map_summary(const struct qcow_map *m, char *buf, size_t len);
/* Bytes of memory the map uses (for the memory figure per cluster). */
uint64_t qcow_map_memory(const struct qcow_map *m);

#endif
