/*
 * test_bitmap.c - qcow_bitmap against a plain byte-per-bit model.
 *
 * Sizes 0, 1, 63, 64, 65, 4095, 4096, 4097 and 300000 cover one partial
 * word, exact words, one and several level-1 words and several level-2
 * words.  Every size gets thousands of random set/clear operations in
 * three regimes (sparse, dense, clustered around word and summary
 * boundaries), with next/prev queries compared to the model after each
 * step, full sweeps after each phase, the summary-level rule checked
 * directly on the words, and resize (shrink dropping set bits, grow
 * showing clear bits) in between.
 */
#include "qcow_bitmap.h"
#include "tap.h"

#include <stdint.h>
#include <string.h>

static unsigned long long seed = 0x5eed0b17ull;

struct model {
	uint8_t *bit;
	uint64_t n;
	uint64_t count;
};

static uint64_t model_next(const struct model *m, uint64_t from)
{
	if (from >= m->n)
		return UINT64_MAX;
	const uint8_t *p = memchr(m->bit + from, 1, (size_t)(m->n - from));
	return p ? (uint64_t)(p - m->bit) : UINT64_MAX;
}

static uint64_t model_prev(const struct model *m, uint64_t before)
{
	if (before > m->n)
		before = m->n;
	if (before == 0)
		return UINT64_MAX;
	const uint8_t *p = memrchr(m->bit, 1, (size_t)before);
	return p ? (uint64_t)(p - m->bit) : UINT64_MAX;
}

static void model_resize(struct model *m, uint64_t n)
{
	for (uint64_t i = n; i < m->n; i++)
		m->count -= m->bit[i];
	m->bit = realloc(m->bit, n ? n : 1);
	if (n > m->n)
		memset(m->bit + m->n, 0, n - m->n);
	m->n = n;
}

/* The summary rule of qcow_bitmap.c: a level-1 bit is set iff its level-0
 * word is non-zero, a level-2 bit iff its level-1 word is non-zero; and no
 * bit at or past nbits is set in level 0.  Returns true when it holds. */
static bool summaries_ok(const struct qcow_bitmap *b)
{
	uint64_t w0 = (b->nbits + 63) / 64, w1 = (w0 + 63) / 64, w2 = (w1 + 63) / 64;
	for (uint64_t w = 0; w < w0; w++) {
		bool s = (b->l1[w / 64] >> (w % 64)) & 1;
		if (s != (b->l0[w] != 0))
			return false;
	}
	if (b->nbits % 64 && w0 && (b->l0[w0 - 1] >> (b->nbits % 64)))
		return false;
	for (uint64_t w = 0; w < w1; w++) {
		bool s = (b->l2[w / 64] >> (w % 64)) & 1;
		if (s != (b->l1[w] != 0))
			return false;
	}
	/* level-1 bits for words past w0 and level-2 bits past w1 are clear */
	if (w0 % 64 && w1 && (b->l1[w1 - 1] >> (w0 % 64)))
		return false;
	if (w1 % 64 && w2 && (b->l2[w2 - 1] >> (w1 % 64)))
		return false;
	return true;
}

/* Compares everything: count, every bit, a full next/prev sweep. */
static void full_compare(const struct qcow_bitmap *b, const struct model *m, const char *what)
{
	CHECK(b->nbits == m->n, "%s: nbits %llu, model %llu", what, (unsigned long long)b->nbits,
	      (unsigned long long)m->n);
	CHECK(b->count == m->count, "%s n=%llu: count %llu, model %llu", what, (unsigned long long)m->n,
	      (unsigned long long)b->count, (unsigned long long)m->count);
	uint64_t bad = UINT64_MAX;
	for (uint64_t i = 0; i < m->n; i++)
		if (qcow_bitmap_test(b, i) != (bool)m->bit[i]) {
			bad = i;
			break;
		}
	CHECK(bad == UINT64_MAX, "%s n=%llu: test(%llu) differs from the model", what, (unsigned long long)m->n,
	      (unsigned long long)bad);
	/* forward sweep */
	uint64_t seen = 0, i = qcow_bitmap_next(b, 0), want = model_next(m, 0);
	bool ok = true;
	while (ok) {
		if (i != want) {
			ok = false;
			break;
		}
		if (i == UINT64_MAX)
			break;
		seen++;
		i = qcow_bitmap_next(b, i + 1);
		want = model_next(m, want + 1);
	}
	CHECK(ok, "%s n=%llu: forward sweep: next gave %llu, model %llu", what, (unsigned long long)m->n,
	      (unsigned long long)i, (unsigned long long)want);
	CHECK(!ok || seen == m->count, "%s: forward sweep saw %llu bits", what, (unsigned long long)seen);
	/* backward sweep */
	seen = 0;
	ok = true;
	i = qcow_bitmap_prev(b, m->n);
	want = model_prev(m, m->n);
	while (ok) {
		if (i != want) {
			ok = false;
			break;
		}
		if (i == UINT64_MAX)
			break;
		seen++;
		i = qcow_bitmap_prev(b, i);
		want = model_prev(m, want);
	}
	CHECK(ok, "%s n=%llu: backward sweep: prev gave %llu, model %llu", what, (unsigned long long)m->n,
	      (unsigned long long)i, (unsigned long long)want);
	CHECK(!ok || seen == m->count, "%s: backward sweep saw %llu bits", what, (unsigned long long)seen);
	CHECK(summaries_ok(b), "%s n=%llu: summary levels disagree with level 0", what, (unsigned long long)m->n);
}

/* A query position: random, or next to an interesting boundary. */
static uint64_t pick_pos(uint64_t n)
{
	if (n == 0)
		return tap_rand(&seed) % 3;
	uint64_t r = tap_rand(&seed) % 8;
	static const uint64_t bounds[] = { 64, 4096, 262144 };
	if (r < 4)
		return tap_rand(&seed) % (n + 2);   /* may be n or n+1 */
	uint64_t unit = bounds[tap_rand(&seed) % 3];
	uint64_t k = n / unit ? tap_rand(&seed) % (n / unit + 1) : 0;
	uint64_t p = k * unit + (tap_rand(&seed) % 3) - 1;   /* -1, 0, +1 around it */
	if (p == UINT64_MAX)
		p = 0;
	return p;
}

static uint64_t fails_next, fails_prev, fails_set;

static void query(const struct qcow_bitmap *b, const struct model *m)
{
	uint64_t p = pick_pos(m->n);
	uint64_t got = qcow_bitmap_next(b, p), want = model_next(m, p);
	if (got != want && fails_next++ < 5)
		CHECK(got == want, "n=%llu next(%llu) = %llu, model %llu", (unsigned long long)m->n,
		      (unsigned long long)p, (unsigned long long)got, (unsigned long long)want);
	got = qcow_bitmap_prev(b, p);
	want = model_prev(m, p);
	if (got != want && fails_prev++ < 5)
		CHECK(got == want, "n=%llu prev(%llu) = %llu, model %llu", (unsigned long long)m->n,
		      (unsigned long long)p, (unsigned long long)got, (unsigned long long)want);
}

/* Index to change in a regime: 0 uniform, 1 clustered near a boundary,
 * 2 inside a small random window (dense runs). */
static uint64_t pick_index(uint64_t n, int regime, uint64_t window)
{
	if (regime == 0)
		return tap_rand(&seed) % n;
	if (regime == 1) {
		static const uint64_t bounds[] = { 64, 4096, 262144 };
		uint64_t unit = bounds[tap_rand(&seed) % 3];
		uint64_t k = tap_rand(&seed) % (n / unit + 1);
		uint64_t p = k * unit + (tap_rand(&seed) % 5) - 2;
		if (p >= n)
			p = tap_rand(&seed) % n;
		return p;
	}
	uint64_t w = window % n;
	uint64_t len = n < 200 ? n : 200;
	return (w + tap_rand(&seed) % len) % n;
}

static void random_ops(struct qcow_bitmap *b, struct model *m, unsigned nops, int regime, unsigned set_pct)
{
	if (m->n == 0)
		return;
	uint64_t window = tap_rand(&seed);
	for (unsigned k = 0; k < nops; k++) {
		if (k % 100 == 0)
			window = tap_rand(&seed);
		uint64_t i = pick_index(m->n, regime, window);
		bool set = tap_rand(&seed) % 100 < set_pct;
		if (set) {
			qcow_bitmap_set(b, i);
			m->count += !m->bit[i];
			m->bit[i] = 1;
		} else {
			qcow_bitmap_clear(b, i);
			m->count -= m->bit[i];
			m->bit[i] = 0;
		}
		if (qcow_bitmap_test(b, i) != set && fails_set++ < 5)
			CHECK(qcow_bitmap_test(b, i) == set, "n=%llu: bit %llu after %s", (unsigned long long)m->n,
			      (unsigned long long)i, set ? "set" : "clear");
		if (b->count != m->count && fails_set++ < 5)
			CHECK(b->count == m->count, "n=%llu: count %llu, model %llu", (unsigned long long)m->n,
			      (unsigned long long)b->count, (unsigned long long)m->count);
		query(b, m);
	}
}

/* Edge cases that need no randomness. */
static void edges(uint64_t n)
{
	struct qcow_bitmap b;
	REQUIRE(qcow_bitmap_init(&b, n) == 0, "init %llu", (unsigned long long)n);
	CHECK(b.count == 0 && b.nbits == n, "fresh bitmap of %llu", (unsigned long long)n);
	CHECK(qcow_bitmap_next(&b, 0) == UINT64_MAX, "n=%llu: empty next(0)", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, n) == UINT64_MAX, "n=%llu: empty prev(n)", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, 0) == UINT64_MAX, "n=%llu: prev(0)", (unsigned long long)n);
	CHECK(qcow_bitmap_next(&b, UINT64_MAX) == UINT64_MAX, "n=%llu: next(UINT64_MAX)", (unsigned long long)n);
	CHECK(!qcow_bitmap_test(&b, n), "n=%llu: test(n) out of range", (unsigned long long)n);
	CHECK(!qcow_bitmap_test(&b, UINT64_MAX), "n=%llu: test(UINT64_MAX)", (unsigned long long)n);
	if (n == 0) {
		CHECK(qcow_bitmap_prev(&b, 5) == UINT64_MAX, "n=0: prev(5)");
		qcow_bitmap_free(&b);
		return;
	}
	uint64_t last = n - 1;
	qcow_bitmap_set(&b, last);
	CHECK(qcow_bitmap_next(&b, last) == last, "n=%llu: next from the last bit", (unsigned long long)n);
	CHECK(qcow_bitmap_next(&b, 0) == last, "n=%llu: next(0) finds the last bit", (unsigned long long)n);
	CHECK(qcow_bitmap_next(&b, n) == UINT64_MAX, "n=%llu: next(n)", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, n) == last, "n=%llu: prev(n) is the last bit", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, n + 1000) == last, "n=%llu: prev past the end clamps", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, UINT64_MAX) == last, "n=%llu: prev(UINT64_MAX)", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, last) == UINT64_MAX, "n=%llu: prev(last) with only the last bit",
	      (unsigned long long)n);
	qcow_bitmap_set(&b, 0);
	CHECK(b.count == (n > 1 ? 2u : 1u), "n=%llu: count with first and last", (unsigned long long)n);
	CHECK(qcow_bitmap_next(&b, 0) == 0, "n=%llu: next(0) = 0", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, 1) == 0, "n=%llu: prev(1) = 0", (unsigned long long)n);
	CHECK(qcow_bitmap_prev(&b, 0) == UINT64_MAX, "n=%llu: prev(0) with bit 0 set", (unsigned long long)n);
	if (n > 2) {
		CHECK(qcow_bitmap_next(&b, 1) == last, "n=%llu: next(1) skips to the last", (unsigned long long)n);
		CHECK(qcow_bitmap_prev(&b, last) == 0, "n=%llu: prev(last) skips to 0", (unsigned long long)n);
	}
	/* setting twice / clearing twice keeps the count */
	qcow_bitmap_set(&b, 0);
	qcow_bitmap_clear(&b, last);
	qcow_bitmap_clear(&b, last);
	CHECK(b.count == (n > 1 ? 1u : 0u), "n=%llu: idempotent set/clear count %llu", (unsigned long long)n,
	      (unsigned long long)b.count);
	CHECK(qcow_bitmap_next(&b, 1) == UINT64_MAX, "n=%llu: next(1) after clearing the last", (unsigned long long)n);
	CHECK(summaries_ok(&b), "n=%llu: summaries after the edge cases", (unsigned long long)n);
	qcow_bitmap_free(&b);
}

static void run_size(uint64_t n)
{
	struct qcow_bitmap b;
	struct model m = { 0 };
	char what[64];
	edges(n);
	REQUIRE(qcow_bitmap_init(&b, n) == 0, "init %llu", (unsigned long long)n);
	model_resize(&m, n);
	unsigned nops = n > 10000 ? 20000 : 8000;
	/* sparse: mostly clears, a few sets spread far apart */
	random_ops(&b, &m, nops, 0, 30);
	snprintf(what, sizeof(what), "sparse uniform");
	full_compare(&b, &m, what);
	/* dense uniform */
	random_ops(&b, &m, nops, 0, 80);
	full_compare(&b, &m, "dense uniform");
	/* clustered at word / summary boundaries, then emptied again */
	random_ops(&b, &m, nops, 1, 60);
	full_compare(&b, &m, "boundaries");
	random_ops(&b, &m, nops, 1, 5);
	full_compare(&b, &m, "boundaries draining");
	/* dense runs in windows, then drained: leaves empty summary words */
	random_ops(&b, &m, nops, 2, 90);
	full_compare(&b, &m, "windows");
	random_ops(&b, &m, nops, 2, 10);
	full_compare(&b, &m, "windows draining");

	/* resize: shrink drops set bits (count follows), grow shows clear bits */
	if (n) {
		for (uint64_t i = 0; i < n; i += 1 + tap_rand(&seed) % 7) {
			qcow_bitmap_set(&b, i);
			m.count += !m.bit[i];
			m.bit[i] = 1;
		}
		qcow_bitmap_set(&b, n - 1);
		m.count += !m.bit[n - 1];
		m.bit[n - 1] = 1;
		full_compare(&b, &m, "before shrink");
		uint64_t half = n / 2;
		REQUIRE(qcow_bitmap_resize(&b, half) == 0, "shrink %llu -> %llu", (unsigned long long)n,
			(unsigned long long)half);
		model_resize(&m, half);
		full_compare(&b, &m, "after shrink");
		CHECK(qcow_bitmap_next(&b, half) == UINT64_MAX, "n=%llu: next(new end) after shrink",
		      (unsigned long long)n);
		REQUIRE(qcow_bitmap_resize(&b, n + 70) == 0, "grow back %llu", (unsigned long long)n);
		model_resize(&m, n + 70);
		full_compare(&b, &m, "after grow");
		CHECK(qcow_bitmap_next(&b, half) == UINT64_MAX, "n=%llu: grown bits are clear",
		      (unsigned long long)n);
		random_ops(&b, &m, nops / 2, 0, 50);
		full_compare(&b, &m, "random after grow");
		/* shrink to the same size, to 1, and to 0 */
		REQUIRE(qcow_bitmap_resize(&b, n + 70) == 0, "resize to the same size");
		full_compare(&b, &m, "same size");
		REQUIRE(qcow_bitmap_resize(&b, 1) == 0, "shrink to 1");
		model_resize(&m, 1);
		full_compare(&b, &m, "shrunk to 1");
		REQUIRE(qcow_bitmap_resize(&b, 0) == 0, "shrink to 0");
		model_resize(&m, 0);
		full_compare(&b, &m, "shrunk to 0");
		CHECK(b.count == 0, "n=%llu: count after shrinking to 0", (unsigned long long)n);
		REQUIRE(qcow_bitmap_resize(&b, n) == 0, "grow from 0");
		model_resize(&m, n);
		full_compare(&b, &m, "grown from 0");
		random_ops(&b, &m, nops / 4, 1, 50);
		full_compare(&b, &m, "random after regrow");
	}
	qcow_bitmap_free(&b);
	CHECK(b.l0 == NULL && b.nbits == 0 && b.count == 0, "free resets the structure");
	free(m.bit);
}

/* Grow one bit at a time across every level boundary, with a bit set near
 * the end each time; then shrink one at a time. */
static void incremental(void)
{
	struct qcow_bitmap b;
	struct model m = { 0 };
	REQUIRE(qcow_bitmap_init(&b, 0) == 0, "init 0");
	uint64_t bad = UINT64_MAX;
	for (uint64_t n = 1; n <= 8300; n++) {
		if (qcow_bitmap_resize(&b, n)) {
			bad = n;
			break;
		}
		model_resize(&m, n);
		if (n % 3 == 0) {
			qcow_bitmap_set(&b, n - 1);
			m.bit[n - 1] = 1;
			m.count++;
		}
		if (qcow_bitmap_prev(&b, n) != model_prev(&m, n) || qcow_bitmap_next(&b, n / 2) != model_next(&m, n / 2) ||
		    b.count != m.count) {
			bad = n;
			break;
		}
	}
	CHECK(bad == UINT64_MAX, "growing one bit at a time goes wrong at %llu bits", (unsigned long long)bad);
	full_compare(&b, &m, "grown one at a time");
	bad = UINT64_MAX;
	for (uint64_t n = 8300; n-- > 0;) {
		if (qcow_bitmap_resize(&b, n)) {
			bad = n;
			break;
		}
		model_resize(&m, n);
		if (b.count != m.count || qcow_bitmap_prev(&b, n) != model_prev(&m, n) ||
		    qcow_bitmap_next(&b, n / 3) != model_next(&m, n / 3)) {
			bad = n;
			break;
		}
	}
	CHECK(bad == UINT64_MAX, "shrinking one bit at a time goes wrong at %llu bits", (unsigned long long)bad);
	CHECK(b.count == 0, "empty after shrinking to 0");
	qcow_bitmap_free(&b);
	free(m.bit);
}

int main(void)
{
	static const uint64_t sizes[] = { 0, 1, 63, 64, 65, 4095, 4096, 4097, 262143, 262144, 262145, 300000 };
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
		run_size(sizes[i]);
	incremental();
	return tap_done();
}
