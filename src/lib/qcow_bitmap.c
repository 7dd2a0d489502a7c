/*
 * qcow_bitmap.c - three-level bitmap (see qcow_bitmap.h for the layout).
 *
 * Rule: a bit of level k+1 is set iff the corresponding word of level k is
 * non-zero.  Every mutator keeps that true; searches rely on it.
 */
#include "config.h"
#include "qcow_bitmap.h"
#include "qcow_mem.h"

#include <errno.h>
#include <string.h>

static uint64_t words(uint64_t bits) { return (bits + 63) / 64; }

static int grow_array(uint64_t **a, uint64_t old_words, uint64_t new_words)
{
	uint64_t *p = qcow_realloc(*a, (size_t)(new_words ? new_words : 1) * 8);
	if (!p)
		return -ENOMEM;
	if (new_words > old_words)
		memset(p + old_words, 0, (size_t)(new_words - old_words) * 8);
	*a = p;
	return 0;
}

int qcow_bitmap_init(struct qcow_bitmap *b, uint64_t nbits)
{
	memset(b, 0, sizeof(*b));
	return qcow_bitmap_resize(b, nbits);
}

void qcow_bitmap_free(struct qcow_bitmap *b)
{
	qcow_free(b->l0);
	qcow_free(b->l1);
	qcow_free(b->l2);
	memset(b, 0, sizeof(*b));
}

int qcow_bitmap_resize(struct qcow_bitmap *b, uint64_t nbits)
{
	/* Clear bits that fall off so the summaries and count stay exact. */
	for (uint64_t i = nbits; i < b->nbits;) {
		i = qcow_bitmap_next(b, i);
		if (i == UINT64_MAX)
			break;
		qcow_bitmap_clear(b, i);
	}
	uint64_t w0o = words(b->nbits), w0 = words(nbits);
	uint64_t w1o = words(w0o), w1 = words(w0);
	uint64_t w2o = words(w1o), w2 = words(w1);
	if (grow_array(&b->l0, w0o, w0) || grow_array(&b->l1, w1o, w1) || grow_array(&b->l2, w2o, w2))
		return -ENOMEM;
	b->nbits = nbits;
	return 0;
}

bool qcow_bitmap_test(const struct qcow_bitmap *b, uint64_t i)
{
	return i < b->nbits && (b->l0[i / 64] >> (i % 64)) & 1;
}

void qcow_bitmap_set(struct qcow_bitmap *b, uint64_t i)
{
	uint64_t w = i / 64, bit = 1ull << (i % 64);
	if (b->l0[w] & bit)
		return;
	b->count++;
	b->l0[w] |= bit;
	b->l1[w / 64] |= 1ull << (w % 64);
	b->l2[w / 4096] |= 1ull << ((w / 64) % 64);
}

void qcow_bitmap_clear(struct qcow_bitmap *b, uint64_t i)
{
	uint64_t w = i / 64, bit = 1ull << (i % 64);
	if (!(b->l0[w] & bit))
		return;
	b->count--;
	b->l0[w] &= ~bit;
	if (b->l0[w])
		return;
	b->l1[w / 64] &= ~(1ull << (w % 64));
	if (b->l1[w / 64])
		return;
	b->l2[w / 4096] &= ~(1ull << ((w / 64) % 64));
}

/* Index of the lowest set bit of word >= bit position pos, or -1. */
static int lowest_from(uint64_t word, unsigned pos)
{
	if (pos >= 64)
		return -1;
	word &= ~0ull << pos;
	return word ? __builtin_ctzll(word) : -1;
}

/* Index of the highest set bit of word < pos, or -1. */
static int highest_below(uint64_t word, unsigned pos)
{
	if (pos == 0)
		return -1;
	if (pos < 64)
		word &= (1ull << pos) - 1;
	return word ? 63 - __builtin_clzll(word) : -1;
}

uint64_t qcow_bitmap_next(const struct qcow_bitmap *b, uint64_t from)
{
	if (from >= b->nbits)
		return UINT64_MAX;
	uint64_t w0 = from / 64;
	int k = lowest_from(b->l0[w0], from % 64);
	if (k >= 0)
		return w0 * 64 + (uint64_t)k;
	/* search level 1 for the next non-empty level-0 word after w0 */
	uint64_t start1 = w0 + 1;
	uint64_t n1 = words(words(b->nbits));
	uint64_t n2 = words(n1);
	uint64_t w1 = start1 / 64;
	if (w1 < n1) {
		k = lowest_from(b->l1[w1], start1 % 64);
		if (k < 0) {
			uint64_t start2 = w1 + 1, w2 = start2 / 64;
			k = -1;
			if (w2 < n2)
				k = lowest_from(b->l2[w2], start2 % 64);
			while (k < 0 && ++w2 < n2)
				k = lowest_from(b->l2[w2], 0);
			if (k < 0)
				return UINT64_MAX;
			w1 = w2 * 64 + (uint64_t)k;
			k = lowest_from(b->l1[w1], 0);
		}
		if (k >= 0) {
			w0 = w1 * 64 + (uint64_t)k;
			uint64_t r = w0 * 64 + (uint64_t)__builtin_ctzll(b->l0[w0]);
			return r < b->nbits ? r : UINT64_MAX;
		}
	}
	return UINT64_MAX;
}

uint64_t qcow_bitmap_prev(const struct qcow_bitmap *b, uint64_t before)
{
	if (before > b->nbits)
		before = b->nbits;
	if (before == 0)
		return UINT64_MAX;
	uint64_t last = before - 1;
	uint64_t w0 = last / 64;
	int k = highest_below(b->l0[w0], (unsigned)(last % 64) + 1);
	if (k >= 0)
		return w0 * 64 + (uint64_t)k;
	if (w0 == 0)
		return UINT64_MAX;
	uint64_t end1 = w0;  /* level-0 words < end1 */
	uint64_t w1 = (end1 - 1) / 64;
	k = highest_below(b->l1[w1], (unsigned)((end1 - 1) % 64) + 1);
	if (k < 0) {
		if (w1 == 0)
			return UINT64_MAX;
		uint64_t end2 = w1, w2 = (end2 - 1) / 64;
		k = highest_below(b->l2[w2], (unsigned)((end2 - 1) % 64) + 1);
		while (k < 0 && w2-- > 0)
			k = highest_below(b->l2[w2], 64);
		if (k < 0)
			return UINT64_MAX;
		w1 = w2 * 64 + (uint64_t)k;
		k = highest_below(b->l1[w1], 64);
	}
	w0 = w1 * 64 + (uint64_t)k;
	return w0 * 64 + (uint64_t)(63 - __builtin_clzll(b->l0[w0]));
}
