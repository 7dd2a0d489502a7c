/*
 * qcow_bitmap.h - a growable bitmap with a summary level for fast searches.
 *
 * Used by the cluster map to find the lowest free cluster and the highest
 * movable cluster without scanning: level 0 has one bit per cluster, level 1
 * one bit per 64-bit word of level 0 ("this word has a bit set"), level 2
 * one bit per word of level 1.  Cost: about 1/8 + 1/512 bytes per cluster;
 * find_next/find_prev touch at most a few words per level, O(n/2^18) in the
 * worst case for the top level, which is a few words even for 2^40 bits.
 */
#ifndef QCOW_BITMAP_H
#define QCOW_BITMAP_H
#include <stdbool.h>
#include <stdint.h>

struct qcow_bitmap {
	uint64_t nbits;
	uint64_t *l0, *l1, *l2;
	uint64_t count;   /* bits set */
};

int qcow_bitmap_init(struct qcow_bitmap *b, uint64_t nbits);
void qcow_bitmap_free(struct qcow_bitmap *b);
/* Grows or shrinks; bits beyond the new size are dropped, new bits clear. */
int qcow_bitmap_resize(struct qcow_bitmap *b, uint64_t nbits);
bool qcow_bitmap_test(const struct qcow_bitmap *b, uint64_t i);
void qcow_bitmap_set(struct qcow_bitmap *b, uint64_t i);
void qcow_bitmap_clear(struct qcow_bitmap *b, uint64_t i);
/* Lowest set bit >= from, or UINT64_MAX. */
uint64_t qcow_bitmap_next(const struct qcow_bitmap *b, uint64_t from);
/* Highest set bit < before, or UINT64_MAX. */
uint64_t qcow_bitmap_prev(const struct qcow_bitmap *b, uint64_t before);

#endif
