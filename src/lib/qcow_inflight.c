/*
 * qcow_inflight.c - the in-flight registry and the allocation claims.
 *
 * Owns: the list of guest requests whose physical extents are in use
 * (img->inflight_head), the grace-period tickets the recycler waits on,
 * and the set of guest clusters for which a write is allocating a new
 * host cluster right now (img->claims).  Rules (doc/design.md, invariants
 * 5 and 6, and "guest writes"):
 *  - Everything here is called with img->lock held, except
 *    qcow_inflight_wait_before, which takes it.
 *  - A request registers (begin) in the same critical section in which it
 *    resolved its extents, and unregisters (end) after its data I/O.  The
 *    recycler takes a ticket when it plans erases or moves and waits for
 *    every request registered before it (a grace period) before it
 *    punches or copies: requests never wait for the recycler.
 *  - A claim says "a write is filling a new host cluster for this guest
 *    cluster and will link it when its data is written".  Another write
 *    that needs to allocate the same guest cluster must not: it gives up
 *    what it resolved, waits for the claim to go (qcow_claims_wait) and
 *    resolves again.  So two writes into one new cluster never fill two
 *    host clusters of which one would be lost.  Claims are held only
 *    between a resolve and its link, never across a wait.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <string.h>

void qcow_inflight_begin(struct qcow_image *img, struct qcow_inflight *req)
{
	qcow_assert_locked(img);
	struct qcow_inflight *head = &img->inflight_head;
	req->ticket = ++img->next_ticket;
	req->next = head;
	req->prev = head->prev;
	head->prev->next = req;
	head->prev = req;
}

void qcow_inflight_end(struct qcow_image *img, struct qcow_inflight *req)
{
	qcow_assert_locked(img);
	req->prev->next = req->next;
	req->next->prev = req->prev;
	if (img->inflight_waiters)
		pthread_cond_broadcast(&img->inflight_done);
}

uint64_t qcow_inflight_ticket(struct qcow_image *img)
{
	qcow_assert_locked(img);
	return ++img->next_ticket;
}

void qcow_inflight_wait_before(struct qcow_image *img, uint64_t ticket)
{
	pthread_mutex_lock(&img->lock);
	img->inflight_waiters++;
	while (img->inflight_head.next != &img->inflight_head && img->inflight_head.next->ticket < ticket)
		pthread_cond_wait(&img->inflight_done, &img->lock);
	img->inflight_waiters--;
	pthread_mutex_unlock(&img->lock);
}

/* ---- claims: an open-addressing set of guest cluster numbers ---------- */

#define CLAIM_EMPTY UINT64_MAX
#define CLAIM_GONE (UINT64_MAX - 1)

static size_t claim_slot(uint64_t gc, size_t mask)
{
	return (size_t)((gc * 0x9e3779b97f4a7c15ull) >> 20) & mask;
}

static int claims_rehash(struct qcow_image *img, size_t cap)
{
	uint64_t *t = qcow_malloc(cap * sizeof(*t));
	if (!t)
		return -ENOMEM;
	for (size_t i = 0; i < cap; i++)
		t[i] = CLAIM_EMPTY;
	for (size_t i = 0; i < img->claims_cap; i++) {
		uint64_t gc = img->claims[i];
		if (gc == CLAIM_EMPTY || gc == CLAIM_GONE)
			continue;
		size_t k = claim_slot(gc, cap - 1);
		while (t[k] != CLAIM_EMPTY)
			k = (k + 1) & (cap - 1);
		t[k] = gc;
	}
	qcow_free(img->claims);
	img->claims = t;
	img->claims_cap = cap;
	img->claims_used = img->claims_len;
	return 0;
}

bool qcow_claims_held(const struct qcow_image *img, uint64_t gc)
{
	if (!img->claims_len)
		return false;
	size_t mask = img->claims_cap - 1;
	for (size_t k = claim_slot(gc, mask);; k = (k + 1) & mask) {
		if (img->claims[k] == gc)
			return true;
		if (img->claims[k] == CLAIM_EMPTY)
			return false;
	}
}

int qcow_claims_add(struct qcow_image *img, uint64_t gc)
{
	qcow_assert_locked(img);
	/* keep at least a quarter of the slots empty (tombstones count) */
	if ((img->claims_used + 1) * 4 > img->claims_cap * 3) {
		size_t cap = img->claims_cap ? img->claims_cap : 64;
		while ((img->claims_len + 1) * 2 > cap)
			cap *= 2;
		int ret = claims_rehash(img, cap);
		if (ret)
			return ret;
	}
	size_t mask = img->claims_cap - 1;
	size_t k = claim_slot(gc, mask);
	while (img->claims[k] != CLAIM_EMPTY && img->claims[k] != CLAIM_GONE)
		k = (k + 1) & mask;
	if (img->claims[k] == CLAIM_EMPTY)
		img->claims_used++;
	img->claims[k] = gc;
	img->claims_len++;
	return 0;
}

void qcow_claims_drop(struct qcow_image *img, uint64_t gc)
{
	qcow_assert_locked(img);
	size_t mask = img->claims_cap - 1;
	for (size_t k = claim_slot(gc, mask); img->claims[k] != CLAIM_EMPTY; k = (k + 1) & mask)
		if (img->claims[k] == gc) {
			img->claims[k] = CLAIM_GONE;
			img->claims_len--;
			if (img->claim_waiters)
				pthread_cond_broadcast(&img->claim_released);
			return;
		}
}

void qcow_claims_wait(struct qcow_image *img, uint64_t gc)
{
	qcow_assert_locked(img);
	img->claim_waiters++;
	while (qcow_claims_held(img, gc))
		pthread_cond_wait(&img->claim_released, &img->lock);
	img->claim_waiters--;
}

void qcow_claims_free(struct qcow_image *img)
{
	qcow_free(img->claims);
	img->claims = NULL;
	img->claims_cap = img->claims_len = img->claims_used = 0;
}
