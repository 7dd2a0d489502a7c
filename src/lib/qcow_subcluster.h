/*
 * qcow_subcluster.h - the subcluster bitmap of extended L2 entries
 * (incompatible bit 4), as pure bit arithmetic.
 *
 * Owns: what one subcluster of an entry shows, whether a bitmap is valid,
 * and the bitmaps a write, a discard or a zero makes.  Rules (qcow2 spec,
 * "Extended L2 Entries", and QEMU's qcow2_get_subcluster_type):
 *  - 32 subclusters per cluster; bit k of the bitmap: subcluster k is
 *    allocated (its data is at host + k * subcluster size), bit 32 + k:
 *    it reads zeros.  Neither: it shows the backing chain (zeros without
 *    one).  The zero flag (bit 0 of the pointer) is not used.
 *  - Both bits of one subcluster, or an allocation bit on an entry with
 *    no host cluster, is corruption; a compressed entry has bitmap 0.
 *  - No state here: the callers (qcow_image.c, qcow_scan.c) hold the
 *    entry; these helpers only compute.
 */
#ifndef QCOW_SUBCLUSTER_H
#define QCOW_SUBCLUSTER_H
#include <stdbool.h>
#include <stdint.h>

#include "qcow_format.h"

enum qcow_sc_kind { QSC_DATA, QSC_ZERO, QSC_UNALLOCATED, QSC_INVALID };

/* The allocation bits of subclusters [first, last] (inclusive). */
static inline uint64_t qcow_sc_range(unsigned first, unsigned last)
{
	uint64_t hi = last >= 31 ? 0xffffffffull : ((1ull << (last + 1)) - 1);
	return hi & ~((1ull << first) - 1);
}

/* What subcluster k of a non-compressed entry with pointer e and bitmap
 * bm shows. */
static inline enum qcow_sc_kind qcow_sc_kind(uint64_t e, uint64_t bm, unsigned k)
{
	bool alloc = bm & (1ull << k), zero = bm & (1ull << (32 + k));
	if (alloc && (zero || !(e & QCOW_L2E_OFFSET_MASK)))
		return QSC_INVALID;
	if (zero)
		return QSC_ZERO;
	return alloc ? QSC_DATA : QSC_UNALLOCATED;
}

/* How many subclusters from k on (at most up to `end`, exclusive) are of
 * the same kind as k. */
static inline unsigned qcow_sc_run(uint64_t e, uint64_t bm, unsigned k, unsigned end)
{
	enum qcow_sc_kind kind = qcow_sc_kind(e, bm, k);
	unsigned n = 1;
	while (k + n < end && qcow_sc_kind(e, bm, k + n) == kind)
		n++;
	return n;
}

/* NULL if the entry's bitmap is valid, else what is wrong with it (for a
 * message that adds the entry's offset). */
static inline const char *qcow_sc_invalid(uint64_t e, uint64_t bm)
{
	if (e & QCOW_OFLAG_COMPRESSED)
		return bm ? "a compressed cluster has a non-zero subcluster bitmap" : NULL;
	if (bm & (bm >> 32) & QCOW_SC_ALLOC_ALL)
		return "a subcluster is both allocated and zero";
	if ((bm & QCOW_SC_ALLOC_ALL) && !(e & QCOW_L2E_OFFSET_MASK))
		return "subclusters are allocated but the cluster has no host offset";
	return NULL;
}

/* The bitmap after subclusters [first, last] were written: allocated,
 * no longer zero. */
static inline uint64_t qcow_sc_written(uint64_t bm, unsigned first, unsigned last)
{
	uint64_t r = qcow_sc_range(first, last);
	return (bm | r) & ~(r << 32);
}

/* The bitmap after subclusters [first, last] were discarded or zeroed:
 * zero bits when something could show through (a backing file), else
 * neither bit (unallocated reads zeros). */
static inline uint64_t qcow_sc_cleared(uint64_t bm, unsigned first, unsigned last, bool zero_bits)
{
	uint64_t r = qcow_sc_range(first, last);
	bm &= ~r;
	return zero_bits ? bm | (r << 32) : bm & ~(r << 32);
}

#endif
