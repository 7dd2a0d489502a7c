/*
 * test_cache.c - the L2 table cache: lookups, eviction only of clean and
 * unpinned entries, stable entry addresses while the cache grows, rekeying
 * (a moved table), and entries removed while a flush still writes them.
 */
#include "qcow_internal.h"
#include "tap.h"

#include <string.h>

#define CS 4096

static void fill(struct qcow_cached *e, uint64_t key)
{
	memset(e->data, (int)(key & 0xff), CS);
}

int main(void)
{
	struct qcow_cache c;
	REQUIRE(qcow_cache_init(&c, 16, CS) == 0, "init");

	/* basic insert / find */
	for (uint64_t k = 1; k <= 16; k++) {
		struct qcow_cached *e = qcow_cache_insert(&c, k * 7);
		REQUIRE(e, "insert %llu", (unsigned long long)k);
		fill(e, k * 7);
	}
	for (uint64_t k = 1; k <= 16; k++) {
		struct qcow_cached *e = qcow_cache_find(&c, k * 7);
		CHECK(e && e->cluster == k * 7 && e->data[0] == (uint8_t)(k * 7), "find %llu", (unsigned long long)k);
	}
	CHECK(!qcow_cache_find(&c, 3), "absent key not found");

	/* dirty and writeback entries survive any amount of eviction */
	struct qcow_cached *dirty = qcow_cache_find(&c, 7);
	qcow_cache_set_dirty(&c, dirty, true);
	struct qcow_cached *pinned = qcow_cache_find(&c, 14);
	qcow_cache_pin(&c, pinned);
	for (uint64_t k = 100; k < 400; k++) {
		struct qcow_cached *e = qcow_cache_insert(&c, k);
		REQUIRE(e, "insert %llu", (unsigned long long)k);
		fill(e, k);
	}
	CHECK(qcow_cache_find(&c, 7) == dirty && dirty->data[0] == 7, "dirty entry kept, same address, same data");
	CHECK(qcow_cache_find(&c, 14) == pinned && pinned->data[0] == 14, "writeback entry kept");
	CHECK(c.nslots <= 16 + 2, "cache stays near its budget (%zu entries)", c.nslots);
	CHECK(c.ndirty == 1, "one dirty entry counted (%zu)", c.ndirty);

	/* a table that moves keeps its entry and contents under the new key */
	qcow_cache_rekey(&c, dirty, 9999);
	CHECK(!qcow_cache_find(&c, 7), "old key gone after rekey");
	CHECK(qcow_cache_find(&c, 9999) == dirty && dirty->dirty, "new key finds the same dirty entry");

	/* removed while a flush writes it: not reused until the flush ends */
	qcow_cache_remove(&c, pinned);
	CHECK(!qcow_cache_find(&c, 14), "removed entry not found");
	CHECK(pinned->zombie, "removed entry under writeback is a zombie");
	bool reused = false;
	for (uint64_t k = 500; k < 600; k++) {
		struct qcow_cached *e = qcow_cache_insert(&c, k);
		REQUIRE(e, "insert");
		fill(e, k);
		reused |= e == pinned;
	}
	CHECK(!reused, "a zombie entry is not handed out while its flush runs");
	CHECK(pinned->data[0] == 14, "zombie contents intact for the flush");
	qcow_cache_unpin(&c, pinned);
	CHECK(!pinned->zombie && pinned->pins == 0, "zombie released when the flush ends");
	struct qcow_cached *next = qcow_cache_insert(&c, 777);
	CHECK(next == pinned, "the released entry is the next one reused");

	/* over budget when half the budget is dirty */
	qcow_cache_set_dirty(&c, dirty, false);
	CHECK(!qcow_cache_over_budget(&c), "clean cache not over budget");
	unsigned made = 0;
	for (uint64_t k = 1000; made < 9; k++, made++) {
		struct qcow_cached *e = qcow_cache_insert(&c, k);
		qcow_cache_set_dirty(&c, e, true);
	}
	CHECK(qcow_cache_over_budget(&c), "9 of 16 dirty: over budget");

	/* many keys: every lookup right after heavy churn (hash chains) */
	struct qcow_cache big;
	REQUIRE(qcow_cache_init(&big, 4096, 512) == 0, "init big");
	unsigned long long s = 42;
	for (int i = 0; i < 200000; i++) {
		uint64_t k = tap_rand(&s) % 10000;
		struct qcow_cached *e = qcow_cache_find(&big, k);
		if (!e) {
			e = qcow_cache_insert(&big, k);
			REQUIRE(e, "insert");
			memcpy(e->data, &k, sizeof(k));
		}
		uint64_t got;
		memcpy(&got, e->data, sizeof(got));
		if (got != k) {
			CHECK(0, "entry for key %llu holds %llu", (unsigned long long)k, (unsigned long long)got);
			break;
		}
	}
	CHECK(big.nslots <= 4096, "big cache within budget (%zu)", big.nslots);
	qcow_cache_free(&big);
	qcow_cache_free(&c);
	return tap_done();
}
