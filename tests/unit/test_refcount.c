/*
 * test_refcount.c - the refcount entry codec (qcow_refcount.c).
 *
 * For every order 0..6 (1 to 64 bits per entry): known bytes decode as the
 * qcow2 specification says (sub-byte widths packed LSB first inside each
 * byte, byte and wider widths big-endian), known values encode to known
 * bytes, random sets round-trip and leave every other bit of the block as
 * it was (checked against an independent encoder written here), values
 * wider than the entry never spill into neighbours, qcow_rc_max, and
 * qcow_rc_merge_up (up = max per entry; true only when some wanted value
 * is above the disk value).
 */
#include "qcow_refcount.h"
#include "tap.h"

#include <stdint.h>
#include <string.h>

#define BLOCK 512

static unsigned long long seed = 0x7ef0c0ull;

/* Independent reference codec, straight from the spec's wording. */
static uint64_t ref_get(const uint8_t *b, unsigned order, uint64_t i)
{
	unsigned bits = 1u << order;
	if (bits < 8) {
		uint64_t bit = i * bits;
		uint64_t v = 0;
		for (unsigned k = 0; k < bits; k++)
			v |= (uint64_t)((b[(bit + k) / 8] >> ((bit + k) % 8)) & 1) << k;
		return v;
	}
	unsigned bytes = bits / 8;
	uint64_t v = 0;
	for (unsigned k = 0; k < bytes; k++)
		v = (v << 8) | b[i * bytes + k];
	return v;
}

static void ref_set(uint8_t *b, unsigned order, uint64_t i, uint64_t v)
{
	unsigned bits = 1u << order;
	if (bits < 8) {
		uint64_t bit = i * bits;
		for (unsigned k = 0; k < bits; k++) {
			uint8_t mask = (uint8_t)(1u << ((bit + k) % 8));
			if ((v >> k) & 1)
				b[(bit + k) / 8] |= mask;
			else
				b[(bit + k) / 8] &= (uint8_t)~mask;
		}
		return;
	}
	unsigned bytes = bits / 8;
	for (unsigned k = 0; k < bytes; k++)
		b[i * bytes + bytes - 1 - k] = (uint8_t)(v >> (8 * k));
}

static uint64_t ref_max(unsigned order)
{
	unsigned bits = 1u << order;
	return bits == 64 ? UINT64_MAX : (1ull << bits) - 1;
}

static void fill_random(uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)tap_rand(&seed);
}

static uint64_t rand_value(unsigned order)
{
	uint64_t max = ref_max(order);
	switch (tap_rand(&seed) % 4) {
	case 0: return 0;
	case 1: return max;
	case 2: return (tap_rand(&seed) % 3) & max;   /* the common refcounts 0..2 */
	default: return tap_rand(&seed) & max;
	}
}

static void known_bytes(void)
{
	uint8_t b[16];

	CHECK(qcow_rc_max(0) == 1, "max order 0");
	CHECK(qcow_rc_max(1) == 3, "max order 1");
	CHECK(qcow_rc_max(2) == 15, "max order 2");
	CHECK(qcow_rc_max(3) == 255, "max order 3");
	CHECK(qcow_rc_max(4) == 65535, "max order 4");
	CHECK(qcow_rc_max(5) == 0xffffffffull, "max order 5");
	CHECK(qcow_rc_max(6) == UINT64_MAX, "max order 6");

	/* order 0: entry 0 is bit 0 of byte 0, entry 7 bit 7, entry 8 bit 0 of byte 1 */
	memset(b, 0, sizeof(b));
	b[0] = 0x01;
	CHECK(qcow_rc_get(b, 0, 0) == 1, "order 0: entry 0 is bit 0 of byte 0");
	for (unsigned i = 1; i < 16; i++)
		CHECK(qcow_rc_get(b, 0, i) == 0, "order 0: entry %u of 0x01", i);
	b[0] = 0x80;
	CHECK(qcow_rc_get(b, 0, 7) == 1 && qcow_rc_get(b, 0, 0) == 0, "order 0: entry 7 is bit 7 of byte 0");
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 0, 9, 1);
	CHECK(b[0] == 0 && b[1] == 0x02 && b[2] == 0, "order 0: set entry 9 gives byte 1 = 0x02 (got %02x %02x %02x)",
	      b[0], b[1], b[2]);
	memset(b, 0xff, sizeof(b));
	qcow_rc_set(b, 0, 9, 0);
	CHECK(b[0] == 0xff && b[1] == 0xfd && b[2] == 0xff, "order 0: clear entry 9 gives byte 1 = 0xfd (got %02x)", b[1]);

	/* order 1: 0x1b = 00 01 10 11 -> entries 3, 2, 1, 0 LSB first */
	memset(b, 0, sizeof(b));
	b[0] = 0x1b;
	CHECK(qcow_rc_get(b, 1, 0) == 3 && qcow_rc_get(b, 1, 1) == 2 && qcow_rc_get(b, 1, 2) == 1 &&
	      qcow_rc_get(b, 1, 3) == 0, "order 1: 0x1b decodes as 3,2,1,0 (got %llu,%llu,%llu,%llu)",
	      (unsigned long long)qcow_rc_get(b, 1, 0), (unsigned long long)qcow_rc_get(b, 1, 1),
	      (unsigned long long)qcow_rc_get(b, 1, 2), (unsigned long long)qcow_rc_get(b, 1, 3));
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 1, 5, 2);
	CHECK(b[0] == 0 && b[1] == 0x08, "order 1: entry 5 = 2 is byte 1 = 0x08 (got %02x)", b[1]);

	/* order 2: 0xa5 -> entry 0 = 5 (low nibble), entry 1 = 10 */
	memset(b, 0, sizeof(b));
	b[0] = 0xa5;
	b[3] = 0x3c;
	CHECK(qcow_rc_get(b, 2, 0) == 5 && qcow_rc_get(b, 2, 1) == 10, "order 2: 0xa5 decodes as 5,10");
	CHECK(qcow_rc_get(b, 2, 6) == 0xc && qcow_rc_get(b, 2, 7) == 0x3, "order 2: 0x3c in byte 3 is 12,3");
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 2, 3, 0xe);
	CHECK(b[1] == 0xe0 && b[0] == 0 && b[2] == 0, "order 2: entry 3 = 14 is byte 1 = 0xe0 (got %02x)", b[1]);

	/* order 3: one byte per entry */
	memset(b, 0, sizeof(b));
	b[5] = 0x7f;
	CHECK(qcow_rc_get(b, 3, 5) == 0x7f && qcow_rc_get(b, 3, 4) == 0, "order 3: byte 5");
	qcow_rc_set(b, 3, 2, 200);
	CHECK(b[2] == 200, "order 3: set byte 2");

	/* order 4/5/6: big-endian */
	memset(b, 0, sizeof(b));
	b[2] = 0x12;
	b[3] = 0x34;
	CHECK(qcow_rc_get(b, 4, 1) == 0x1234, "order 4: big-endian (got 0x%llx)", (unsigned long long)qcow_rc_get(b, 4, 1));
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 4, 2, 0xabcd);
	CHECK(b[4] == 0xab && b[5] == 0xcd && b[3] == 0 && b[6] == 0, "order 4: set entry 2 = 0xabcd (got %02x %02x)",
	      b[4], b[5]);
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 4, 0, 1);
	CHECK(b[0] == 0 && b[1] == 1, "order 4: refcount 1 is 00 01");

	memset(b, 0, sizeof(b));
	b[4] = 0x12; b[5] = 0x34; b[6] = 0x56; b[7] = 0x78;
	CHECK(qcow_rc_get(b, 5, 1) == 0x12345678, "order 5: big-endian (got 0x%llx)",
	      (unsigned long long)qcow_rc_get(b, 5, 1));
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 5, 3, 0xdeadbeef);
	CHECK(b[12] == 0xde && b[13] == 0xad && b[14] == 0xbe && b[15] == 0xef, "order 5: set entry 3");

	memset(b, 0, sizeof(b));
	for (unsigned k = 0; k < 8; k++)
		b[8 + k] = (uint8_t)(k + 1);
	CHECK(qcow_rc_get(b, 6, 1) == 0x0102030405060708ull, "order 6: big-endian (got 0x%llx)",
	      (unsigned long long)qcow_rc_get(b, 6, 1));
	memset(b, 0, sizeof(b));
	qcow_rc_set(b, 6, 0, 0x8877665544332211ull);
	CHECK(b[0] == 0x88 && b[7] == 0x11 && b[8] == 0, "order 6: set entry 0");
	qcow_rc_set(b, 6, 1, UINT64_MAX);
	CHECK(qcow_rc_get(b, 6, 1) == UINT64_MAX && qcow_rc_get(b, 6, 0) == 0x8877665544332211ull,
	      "order 6: max value next to another");
}

/* Random sets on a random block: the block must equal the reference
 * encoding of the model after every step (so neighbours are untouched). */
static void random_roundtrip(unsigned order)
{
	static uint8_t blk[BLOCK], shadow[BLOCK];
	uint64_t n = (uint64_t)BLOCK * 8 >> order;
	uint64_t max = ref_max(order);
	fill_random(blk, sizeof(blk));
	memcpy(shadow, blk, sizeof(blk));

	/* decoding agrees with the reference on random contents */
	uint64_t bad = UINT64_MAX;
	for (uint64_t i = 0; i < n; i++)
		if (qcow_rc_get(blk, order, i) != ref_get(blk, order, i)) {
			bad = i;
			break;
		}
	CHECK(bad == UINT64_MAX, "order %u: get(%llu) = %llu on random bytes, spec says %llu", order,
	      (unsigned long long)bad, bad == UINT64_MAX ? 0ull : (unsigned long long)qcow_rc_get(blk, order, bad),
	      bad == UINT64_MAX ? 0ull : (unsigned long long)ref_get(blk, order, bad));

	unsigned fails = 0;
	for (unsigned k = 0; k < 20000; k++) {
		uint64_t i = tap_rand(&seed) % n;
		uint64_t v = rand_value(order);
		qcow_rc_set(blk, order, i, v);
		ref_set(shadow, order, i, v);
		uint64_t got = qcow_rc_get(blk, order, i);
		if ((got != v || memcmp(blk, shadow, sizeof(blk))) && fails++ < 5) {
			CHECK(got == v, "order %u: set(%llu, %llu) reads back %llu", order, (unsigned long long)i,
			      (unsigned long long)v, (unsigned long long)got);
			CHECK(memcmp(blk, shadow, sizeof(blk)) == 0, "order %u: set(%llu, %llu) changed other bits", order,
			      (unsigned long long)i, (unsigned long long)v);
			memcpy(shadow, blk, sizeof(blk));
		}
	}
	CHECK(fails == 0, "order %u: %u random set/get mismatches", order, fails);

	/* first and last entry of the block */
	qcow_rc_set(blk, order, 0, max);
	qcow_rc_set(blk, order, n - 1, max);
	ref_set(shadow, order, 0, max);
	ref_set(shadow, order, n - 1, max);
	CHECK(qcow_rc_get(blk, order, 0) == max && qcow_rc_get(blk, order, n - 1) == max &&
	      memcmp(blk, shadow, sizeof(blk)) == 0, "order %u: first and last entries", order);

	/* a value wider than the entry never spills into the neighbours */
	if (order < 6) {
		uint8_t before[BLOCK];
		memset(blk, 0, sizeof(blk));
		for (uint64_t i = 0; i < 24 && i < n; i++) {
			memcpy(before, blk, sizeof(blk));
			qcow_rc_set(blk, order, i, UINT64_MAX);
			ref_set(before, order, i, max);
			CHECK(memcmp(blk, before, sizeof(blk)) == 0, "order %u: set(%llu, ~0) touched other entries",
			      order, (unsigned long long)i);
			CHECK(qcow_rc_get(blk, order, i) == max, "order %u: set(%llu, ~0) keeps the width's maximum",
			      order, (unsigned long long)i);
		}
	}
}

static void merge_up(unsigned order)
{
	static uint8_t disk[BLOCK], want[BLOCK], up[BLOCK], disk0[BLOCK], want0[BLOCK];
	uint64_t n = (uint64_t)BLOCK * 8 >> order;
	uint64_t max = ref_max(order);

	for (unsigned round = 0; round < 200; round++) {
		/* mostly equal blocks, with a few entries up or down */
		memset(disk, 0, sizeof(disk));
		for (uint64_t i = 0; i < n; i++)
			ref_set(disk, order, i, rand_value(order));
		memcpy(want, disk, sizeof(want));
		unsigned changes = round % 4 == 0 ? 0 : (unsigned)(tap_rand(&seed) % 6);
		unsigned mode = round % 3;   /* 0 only down, 1 only up, 2 both */
		bool expect_raise = false;
		for (unsigned k = 0; k < changes; k++) {
			uint64_t i = tap_rand(&seed) % n;
			uint64_t d = ref_get(disk, order, i);
			bool go_up = mode == 1 || (mode == 2 && (tap_rand(&seed) & 1));
			if (go_up && d < max) {
				ref_set(want, order, i, d + 1 + tap_rand(&seed) % (max - d));
			} else if (!go_up && d > 0) {
				ref_set(want, order, i, tap_rand(&seed) % d);
			}
		}
		for (uint64_t i = 0; i < n; i++)
			if (ref_get(want, order, i) > ref_get(disk, order, i))
				expect_raise = true;
		memcpy(disk0, disk, sizeof(disk));
		memcpy(want0, want, sizeof(want));
		fill_random(up, sizeof(up));
		bool r = qcow_rc_merge_up(up, disk, want, order, n);
		CHECK(r == expect_raise, "order %u round %u: merge_up returned %d, expected %d", order, round, r,
		      expect_raise);
		uint64_t bad = UINT64_MAX;
		for (uint64_t i = 0; i < n; i++) {
			uint64_t d = ref_get(disk, order, i), w = ref_get(want, order, i);
			if (ref_get(up, order, i) != (d > w ? d : w)) {
				bad = i;
				break;
			}
		}
		CHECK(bad == UINT64_MAX, "order %u round %u: up[%llu] is not max(disk, want)", order, round,
		      (unsigned long long)bad);
		CHECK(memcmp(disk, disk0, sizeof(disk)) == 0 && memcmp(want, want0, sizeof(want)) == 0,
		      "order %u: merge_up changed its inputs", order);
		if (!expect_raise)
			CHECK(memcmp(up, disk, sizeof(up)) == 0, "order %u round %u: nothing raised but up != disk", order,
			      round);
	}

	/* exact cases */
	memset(disk, 0, sizeof(disk));
	memset(want, 0, sizeof(want));
	CHECK(!qcow_rc_merge_up(up, disk, want, order, n), "order %u: zeros vs zeros", order);
	CHECK(!qcow_rc_merge_up(up, disk, want, order, 0), "order %u: n = 0", order);
	ref_set(want, order, n - 1, 1);
	CHECK(qcow_rc_merge_up(up, disk, want, order, n), "order %u: last entry 0 -> 1 raises", order);
	CHECK(ref_get(up, order, n - 1) == 1, "order %u: up has the raised last entry", order);
	/* the same entry going down does not raise, up keeps the disk value */
	CHECK(!qcow_rc_merge_up(up, want, disk, order, n), "order %u: last entry 1 -> 0 does not raise", order);
	CHECK(ref_get(up, order, n - 1) == 1, "order %u: up keeps the higher disk value", order);
	/* one up and one down at once: raises, up has both maxima */
	memset(disk, 0, sizeof(disk));
	memset(want, 0, sizeof(want));
	ref_set(disk, order, 0, 1);
	ref_set(want, order, 1, 1);
	CHECK(qcow_rc_merge_up(up, disk, want, order, n), "order %u: mixed up/down raises", order);
	CHECK(ref_get(up, order, 0) == 1 && ref_get(up, order, 1) == 1, "order %u: mixed up/down keeps both", order);
	/* maximum values */
	memset(disk, 0, sizeof(disk));
	memset(want, 0, sizeof(want));
	ref_set(disk, order, 2 % n, max);
	ref_set(want, order, 2 % n, max);
	CHECK(!qcow_rc_merge_up(up, disk, want, order, n), "order %u: max vs max does not raise", order);
	CHECK(ref_get(up, order, 2 % n) == max, "order %u: up keeps max", order);
}

int main(void)
{
	known_bytes();
	for (unsigned order = 0; order <= 6; order++) {
		random_roundtrip(order);
		merge_up(order);
	}
	return tap_done();
}
