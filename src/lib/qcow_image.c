/*
 * qcow_image.c - the engine API: guest reads and writes, discard and
 * zero, resize, SEEK_DATA/SEEK_HOLE and statistics.  (Opening and closing
 * are in qcow_open.c.)
 *
 * Owns: the translation of guest byte ranges into physical extents and
 * the order of a guest write.  Layering: this file is the top of the
 * engine; it calls sparsify's write hook and zero check, the recycler
 * (kick), relocation, flush and the services (tables, allocation,
 * in-flight registry, compressed clusters), and nothing below calls back
 * up into it.  Rules (doc/design.md, "guest I/O" and "Zeroed space"; lock
 * order in qcow_internal.h):
 *  - A request resolves its extents under img->lock, registers in the
 *    in-flight list in the same critical section, drops the lock for the
 *    data I/O, and unregisters afterwards.
 *  - No waits inside a resolved request: when a request must wait (for a
 *    truncation to end, or for another write that is filling the same new
 *    guest cluster), it gives back everything it resolved, waits, and
 *    resolves again from the start.
 *  - A write that needs a new host cluster (the guest cluster is
 *    unallocated, zero, compressed, or shared with a snapshot) writes the
 *    new cluster first and links it into its L2 entry only after the data
 *    is written: if the write fails, the entry still points at the old
 *    contents, and the new cluster goes to Junk.  The write claims the
 *    guest cluster meanwhile (qcow_inflight.c), so a second writer of the
 *    same guest cluster waits instead of filling a cluster of its own.  If
 *    the entry changed before the link (a discard, a move), the request
 *    starts again.
 *  - A write to a move source cancels the move; any change to an L2 table
 *    cancels a move of that table.
 *  - Every write resolution of a guest cluster tells a running sparsify
 *    (qcow_sparsify_note_write), so it never frees a cluster being
 *    written.  With detect_zeroes, whole all-zero clusters of a write are
 *    zeroed or unmapped instead of written (zero_clusters_locked).
 *  - A shrink sets the new size first; every write checks its range again
 *    under img->lock, so nothing is allocated past the end afterwards.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define DISCARD_BATCH_CLUSTERS 4096u

/* ---- extents ------------------------------------------------------------ */

/* SEG_BACKING: unallocated here, read from the backing chain (host holds
 * the guest offset) */
enum seg_kind { SEG_ZERO, SEG_DATA, SEG_COMPRESSED, SEG_BACKING };

struct seg {
	enum seg_kind kind;
	uint64_t host;        /* SEG_DATA: byte offset; SEG_COMPRESSED: L2 entry */
	uint64_t in_cluster;  /* SEG_COMPRESSED: offset inside the guest cluster */
	size_t len;
	size_t buf_off;
};

struct seg_list {
	struct seg *v;
	size_t n, cap;
	struct seg inline_v[16];
};

static void segs_init(struct seg_list *s)
{
	s->v = s->inline_v;
	s->n = 0;
	s->cap = 16;
}

static void segs_free(struct seg_list *s)
{
	if (s->v != s->inline_v)
		qcow_free(s->v);
	segs_init(s);
}

/* Grows a vector that starts in an inline array; 0 or -ENOMEM. */
static int vec_grow(void **v, size_t *cap, void *inline_v, size_t elem)
{
	size_t ncap = *cap * 2;
	void *p = *v == inline_v ? qcow_malloc(ncap * elem) : qcow_realloc(*v, ncap * elem);
	if (!p)
		return -ENOMEM;
	if (*v == inline_v)
		memcpy(p, inline_v, *cap * elem);
	*v = p;
	*cap = ncap;
	return 0;
}

static int segs_add(struct seg_list *s, enum seg_kind kind, uint64_t host, uint64_t in_cluster, size_t len, size_t buf_off)
{
	if (s->n) {
		struct seg *p = &s->v[s->n - 1];
		if (p->kind == kind && p->buf_off + p->len == buf_off &&
		    (kind == SEG_ZERO || ((kind == SEG_DATA || kind == SEG_BACKING) && p->host + p->len == host))) {
			p->len += len;
			return 0;
		}
	}
	if (s->n == s->cap && vec_grow((void **)&s->v, &s->cap, s->inline_v, sizeof(*s->v)))
		return -ENOMEM;
	s->v[s->n++] = (struct seg){ .kind = kind, .host = host, .in_cluster = in_cluster, .len = len, .buf_off = buf_off };
	return 0;
}

/* An entry that shows the backing chain (or zeros without one): no host
 * cluster and no zero flag. */
static bool entry_unallocated(const struct qcow_image *img, uint64_t e)
{
	if (e & QCOW_OFLAG_COMPRESSED)
		return false;
	if (img->hdr.version >= 3 && (e & QCOW_OFLAG_ZERO))
		return false;
	return (e & QCOW_L2E_OFFSET_MASK) == 0;
}

/* An entry whose cluster reads zeros whatever the backing chain holds. */
static bool entry_is_zero(const struct qcow_image *img, uint64_t e)
{
	return !(e & QCOW_OFLAG_COMPRESSED) && img->hdr.version >= 3 && (e & QCOW_OFLAG_ZERO);
}

/* An entry whose cluster reads zeros: zero-flagged, or unallocated with
 * no backing file. */
static bool entry_reads_zero(const struct qcow_image *img, uint64_t e)
{
	return entry_is_zero(img, e) || (entry_unallocated(img, e) && !img->backing);
}

/* The L2 entry that makes a cluster read zeros with nothing allocated:
 * unallocated without a backing file; with one, the zero flag (version 3
 * only: the caller writes zeros as data on version 2). */
static uint64_t zero_entry(const struct qcow_image *img)
{
	return img->backing ? QCOW_OFLAG_ZERO : 0;
}

/* Reads len bytes of what the backing chain shows at guest offset off:
 * zeros past its end (or without one).  No engine lock held: the backing
 * image is read-only and has locks of its own (taken after ours, never
 * before: the chain only goes down). */
static int backing_read(struct qcow_image *img, uint8_t *dst, size_t len, uint64_t off)
{
	struct qcow_backing *b = img->backing;
	size_t have = 0;
	if (b && off < b->size)
		have = b->size - off < len ? (size_t)(b->size - off) : len;
	if (have) {
		int ret;
		if (b->img) {
			ssize_t r = qcow_image_read(b->img, dst, have, off);
			ret = r < 0 ? (int)r : 0;
		} else {
			ret = b->raw->ops->pread(b->raw, dst, have, off);
		}
		if (ret)
			return ret == -EAGAIN ? -EIO : ret;
	}
	memset(dst + have, 0, len - have);
	return 0;
}

/* The part of a request at guest offset g (left bytes to go) that lies in
 * one cluster: its guest cluster, offset inside it, and length. */
static size_t cluster_piece(const struct qcow_image *img, uint64_t g, size_t left, uint64_t *gc, uint64_t *o)
{
	*gc = g >> img->cluster_bits;
	*o = g & (img->cluster_size - 1);
	uint64_t room = img->cluster_size - *o;
	return room < left ? (size_t)room : left;
}

static int check_range(struct qcow_image *img, size_t len, uint64_t off)
{
	if (off > img->virtual_size || len > img->virtual_size - off)
		return -EINVAL;
	return 0;
}

/* Reads what guest cluster gc with entry e currently shows into buf. */
static int read_entry_contents(struct qcow_image *img, uint64_t gc, uint64_t e, uint8_t *buf)
{
	if (e & QCOW_OFLAG_COMPRESSED)
		return qcow_compressed_read(img, e, buf);
	if (entry_unallocated(img, e))
		return backing_read(img, buf, img->cluster_size, gc << img->cluster_bits);
	if (entry_reads_zero(img, e)) {
		memset(buf, 0, img->cluster_size);
		return 0;
	}
	return img->io->ops->pread(img->io, buf, img->cluster_size, e & QCOW_L2E_OFFSET_MASK);
}

/* ---- reads ------------------------------------------------------------ */

ssize_t qcow_image_read(struct qcow_image *img, void *buf, size_t len, uint64_t off)
{
	struct seg_list segs;
	struct qcow_inflight req;
	uint8_t *cbuf = NULL;
	int ret = check_range(img, len, off);
	if (ret || len == 0)
		return ret ? ret : 0;
	segs_init(&segs);
	qcow_lock(img);
	for (size_t pos = 0; pos < len && ret == 0;) {
		uint64_t gc, o, e;
		size_t n = cluster_piece(img, off + pos, len - pos, &gc, &o);
		ret = qcow_l2_lookup(img, gc, &e);
		if (ret)
			break;
		if (e & QCOW_OFLAG_COMPRESSED)
			ret = segs_add(&segs, SEG_COMPRESSED, e, o, n, pos);
		else if (entry_reads_zero(img, e))
			ret = segs_add(&segs, SEG_ZERO, 0, 0, n, pos);
		else if (entry_unallocated(img, e))
			ret = segs_add(&segs, SEG_BACKING, off + pos, 0, n, pos);
		else
			ret = segs_add(&segs, SEG_DATA, (e & QCOW_L2E_OFFSET_MASK) + o, 0, n, pos);
		pos += n;
	}
	if (ret) {
		qcow_unlock(img);
		goto out;
	}
	qcow_inflight_begin(img, &req);
	qcow_unlock(img);

	if (img->read_io_hook)
		img->read_io_hook(img, img->read_io_opaque);
	for (size_t i = 0; i < segs.n && ret == 0; i++) {
		struct seg *s = &segs.v[i];
		uint8_t *dst = (uint8_t *)buf + s->buf_off;
		if (s->kind == SEG_ZERO) {
			memset(dst, 0, s->len);
		} else if (s->kind == SEG_DATA) {
			ret = img->io->ops->pread(img->io, dst, s->len, s->host);
		} else if (s->kind == SEG_BACKING) {
			ret = backing_read(img, dst, s->len, s->host);
		} else {
			if (!cbuf && !(cbuf = qcow_malloc(img->cluster_size))) {
				ret = -ENOMEM;
				break;
			}
			ret = qcow_compressed_read(img, s->host, cbuf);
			if (ret == 0)
				memcpy(dst, cbuf + s->in_cluster, s->len);
		}
	}

	qcow_lock(img);
	qcow_inflight_end(img, &req);
	qcow_unlock(img);
out:
	qcow_free(cbuf);
	segs_free(&segs);
	return ret ? ret : (ssize_t)len;
}

/* ---- writes ----------------------------------------------------------- */

/* One guest cluster that a write fills in a new host cluster. */
struct new_cluster {
	uint64_t gc;          /* guest cluster (claimed) */
	uint64_t host;        /* new host cluster, Roots until linked */
	uint64_t old;         /* the L2 entry it replaces, as resolved */
	uint64_t o, n;        /* the part this request writes */
	size_t buf_off;
	bool fill;            /* the rest comes from the old contents */
};

struct write_plan {
	struct seg_list in_place;
	struct new_cluster *nc;
	size_t nnc, nc_cap;
	struct new_cluster inline_nc[8];
	uint64_t wait_gc;     /* -EAGAIN: wait for this claim (UINT64_MAX: for a truncation) */
};

static void plan_init(struct write_plan *p)
{
	segs_init(&p->in_place);
	p->nc = p->inline_nc;
	p->nnc = 0;
	p->nc_cap = sizeof(p->inline_nc) / sizeof(p->inline_nc[0]);
	p->wait_gc = UINT64_MAX;
}

static void plan_free(struct write_plan *p)
{
	segs_free(&p->in_place);
	if (p->nc != p->inline_nc)
		qcow_free(p->nc);
	plan_init(p);
}

/* Gives back the new clusters from index `from` on, unlinked: never
 * written ones are Available again, written (or possibly torn) ones are
 * Junk, to be erased. */
static void give_back(struct qcow_image *img, struct write_plan *p, size_t from, bool written)
{
	for (size_t i = from; i < p->nnc; i++) {
		qcow_claims_drop(img, p->nc[i].gc);
		qcow_map_set_state(&img->map, p->nc[i].host, written ? QCS_JUNK : QCS_AVAILABLE);
	}
	p->nnc = from;
}

/* Releases the host clusters an L2 entry holds, when the entry changes.
 * A discard frees them at once (after a crash the old pointer may show
 * them, erased or not: discarded data may read either way).  An overwrite
 * keeps them until the next flush (qcow_free_after_flush): until then the
 * durable entry still shows their contents, which must survive a crash. */
static void release_entry(struct qcow_image *img, uint64_t e, uint64_t slot, bool overwrite)
{
	uint64_t first, last;
	if (!qcow_entry_clusters(img, e, &first, &last))
		return;
	for (uint64_t c = first; c <= last && c < img->map.nclusters; c++) {
		/* only a cluster that this pointer references is ours to drop */
		if (!qcow_map_has_ref(&img->map, c, slot))
			continue;
		qcow_map_move_cancel(&img->map, c);
		if (overwrite)
			qcow_free_after_flush(img, c, slot);
		else
			qcow_map_drop_ref(&img->map, c, slot);
	}
}

/* Resolves guest cluster gc for a write of [o, o+n) at buf_off: an extent
 * written in place, or a new cluster (claimed, linked later). */
static int resolve_cluster(struct qcow_image *img, struct write_plan *p, uint64_t gc, uint64_t o, uint64_t n,
			   size_t buf_off)
{
	uint64_t l1i = gc >> img->l2_bits, idx = gc & ((1ull << img->l2_bits) - 1);
	int ret;
	/* whatever this write does to gc, a sparsify must not free the
	 * cluster it read before (qcow_sparsify.c) */
	qcow_sparsify_note_write(img, gc);
	if (qcow_claims_held(img, gc)) {
		p->wait_gc = gc;
		return -EAGAIN;
	}
	struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
	if (!t)
		return ret;
	uint64_t e = qcow_l2_entry(t, idx);
	uint64_t slot = (t->cluster << img->cluster_bits) + idx * 8;
	uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	bool zero = entry_reads_zero(img, e);
	if (!zero && !(e & QCOW_OFLAG_COMPRESSED) && (e & QCOW_OFLAG_COPIED) && h < img->map.nclusters &&
	    qcow_map_state(&img->map, h) == QCS_REF && qcow_map_slot(&img->map, h) == slot) {
		/* in place; a move of this cluster would copy stale data */
		qcow_map_move_cancel(&img->map, h);
		return segs_add(&p->in_place, SEG_DATA, (h << img->cluster_bits) + o, 0, n, buf_off);
	}
	if (p->nnc == p->nc_cap && vec_grow((void **)&p->nc, &p->nc_cap, p->inline_nc, sizeof(*p->nc)))
		return -ENOMEM;
	uint64_t c;
	ret = qcow_alloc_cluster(img, &c);
	if (ret)
		return ret;
	ret = qcow_claims_add(img, gc);
	if (ret) {
		qcow_map_set_state(&img->map, c, QCS_AVAILABLE);
		return ret;
	}
	p->nc[p->nnc++] = (struct new_cluster){ .gc = gc, .host = c, .old = e, .o = o, .n = n, .buf_off = buf_off,
						.fill = !zero && n != img->cluster_size };
	return 0;
}

/* Resolves a whole write (buf NULL: zeros) under img->lock.  The range
 * was checked against the size before the lock; a shrink may have come
 * in between, so it is checked again here: nothing may be written past
 * the end once a shrink freed it.  tail_ok: the shrink's own zeroing of
 * the rest of its last partial cluster. */
static int resolve_write(struct qcow_image *img, struct write_plan *p, bool zeros, size_t len, uint64_t off,
			 bool tail_ok)
{
	qcow_assert_locked(img);
	uint64_t limit = img->virtual_size;
	if (tail_ok)
		limit = (limit + img->cluster_size - 1) & ~(img->cluster_size - 1);
	if (off > limit || len > limit - off)
		return -EINVAL;
	for (size_t pos = 0; pos < len;) {
		uint64_t gc, o;
		size_t n = cluster_piece(img, off + pos, len - pos, &gc, &o);
		if (zeros) {
			/* zeroing part of a cluster that reads zero already must
			 * not allocate it */
			uint64_t e;
			int ret = qcow_l2_lookup(img, gc, &e);
			if (ret)
				return ret;
			if (entry_reads_zero(img, e)) {
				pos += n;
				continue;
			}
		}
		int ret = resolve_cluster(img, p, gc, o, n, pos);
		if (ret)
			return ret;
		pos += n;
	}
	return 0;
}

/* The data I/O of a resolved write, with no engine lock. */
static int write_data(struct qcow_image *img, const void *buf, struct write_plan *p)
{
	uint64_t cs = img->cluster_size;
	uint8_t *cbuf = NULL;
	int ret = 0;
	for (size_t i = 0; i < p->in_place.n && ret == 0; i++) {
		struct seg *s = &p->in_place.v[i];
		ret = buf ? img->io->ops->pwrite(img->io, (const uint8_t *)buf + s->buf_off, s->len, s->host)
			  : qcow_io_write_zeros(img->io, s->host, s->len);
	}
	for (size_t i = 0; i < p->nnc && ret == 0; i++) {
		struct new_cluster *nc = &p->nc[i];
		uint64_t host = nc->host << img->cluster_bits;
		if (!nc->fill) {
			/* the new cluster reads zeros around the piece (invariant 2) */
			ret = buf ? img->io->ops->pwrite(img->io, (const uint8_t *)buf + nc->buf_off, nc->n, host + nc->o)
				  : qcow_io_write_zeros(img->io, host + nc->o, nc->n);
			continue;
		}
		/* copy-on-write: the old contents (still linked, and kept from
		 * erasure by this request's registration) around the new piece */
		if (!cbuf && !(cbuf = qcow_malloc(cs))) {
			ret = -ENOMEM;
			break;
		}
		ret = read_entry_contents(img, nc->gc, nc->old, cbuf);
		if (ret)
			break;
		if (buf)
			memcpy(cbuf + nc->o, (const uint8_t *)buf + nc->buf_off, nc->n);
		else
			memset(cbuf + nc->o, 0, nc->n);
		ret = img->io->ops->pwrite(img->io, cbuf, cs, host);
	}
	qcow_free(cbuf);
	/* -EAGAIN means "start again" to the caller: never let an I/O error
	 * say that */
	return ret == -EAGAIN ? -EIO : ret;
}

/* Links the written new clusters into their L2 entries (img->lock held).
 * -EAGAIN when an entry changed since the resolve: the caller starts
 * again (what was linked stays linked and is then written in place). */
static int link_new_clusters(struct qcow_image *img, struct write_plan *p)
{
	qcow_assert_locked(img);
	for (size_t i = 0; i < p->nnc; i++) {
		struct new_cluster *nc = &p->nc[i];
		uint64_t l1i = nc->gc >> img->l2_bits, idx = nc->gc & ((1ull << img->l2_bits) - 1);
		int ret;
		struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
		if (!t || qcow_l2_entry(t, idx) != nc->old) {
			give_back(img, p, i, true);
			return t ? -EAGAIN : ret;
		}
		release_entry(img, nc->old, (t->cluster << img->cluster_bits) + idx * 8, true);
		qcow_l2_set_entry(img, t, idx, (nc->host << img->cluster_bits) | QCOW_OFLAG_COPIED);
		qcow_map_set_ref(&img->map, nc->host, (t->cluster << img->cluster_bits) + idx * 8);
		qcow_claims_drop(img, nc->gc);
	}
	p->nnc = 0;
	return 0;
}

/* Flushes when half the cache is dirty.  The request that triggers it has
 * done its own work: a failing flush is the engine's business (logged,
 * kept in the stats, retried by the next flush), not the request's - a
 * write whose data is in place has succeeded. */
static void maybe_autoflush(struct qcow_image *img, bool over)
{
	if (over)
		(void)qcow_flush(img);   /* errors are noted by the flush itself */
}

/* Writes buf (NULL = zeros) at off, checked again under the lock (see
 * resolve_write); the body of write_common and of the shrink's tail. */
static ssize_t write_range(struct qcow_image *img, const void *buf, size_t len, uint64_t off, bool tail_ok)
{
	struct write_plan plan;
	struct qcow_inflight req;
	int ret;
	if (len == 0)
		return 0;
	if (img->read_only)
		return -EROFS;
	if ((ret = qcow_health_failed(img)))
		return -EIO;
	plan_init(&plan);
	qcow_lock(img);
	for (;;) {
		ret = resolve_write(img, &plan, buf == NULL, len, off, tail_ok);
		if (ret) {
			give_back(img, &plan, 0, false);
			if (ret != -EAGAIN)
				break;
			if (plan.wait_gc != UINT64_MAX)
				qcow_claims_wait(img, plan.wait_gc);
			else
				qcow_alloc_wait_truncation(img);
			plan_free(&plan);
			continue;
		}
		qcow_inflight_begin(img, &req);
		qcow_unlock(img);

		if (img->write_io_hook)
			img->write_io_hook(img, img->write_io_opaque);
		ret = write_data(img, buf, &plan);

		qcow_lock(img);
		if (ret == 0)
			ret = link_new_clusters(img, &plan);
		else
			give_back(img, &plan, 0, true);
		/* Only now: a flush that started while the data was still in
		 * flight has already taken (and cleared) the flag, and the fsync
		 * that follows this write's completion must still sync it. */
		img->data_dirty = true;
		qcow_inflight_end(img, &req);
		plan_free(&plan);
		if (ret != -EAGAIN)
			break;
	}
	bool over = qcow_cache_over_budget(&img->cache);
	qcow_unlock(img);
	plan_free(&plan);
	if (ret)
		return ret;
	maybe_autoflush(img, over);
	return (ssize_t)len;
}

/* Writes buf (NULL = zeros) at off; the shared body of write and of the
 * partial-cluster part of discard/zero. */
static ssize_t write_common(struct qcow_image *img, const void *buf, size_t len, uint64_t off)
{
	int ret = check_range(img, len, off);
	if (ret)
		return ret;
	qcow_pbitmap_note(img, off, len);
	return write_range(img, buf, len, off, false);
}

/* ---- zero detection (-o detect_zeroes) ---------------------------------- */

/* Makes whole guest clusters [gc, gc+count) read zeros without writing
 * data (img->lock held), as QEMU's qcow2 write-zeroes does:
 *  - may_unmap and nothing could show through the hole: unmapped, as a
 *    discard (the reference goes now, the entry becomes 0);
 *  - otherwise (version 3): a plain cluster of this entry keeps its
 *    allocation and gains the zero flag (QEMU without MAY_UNMAP); a
 *    compressed or shared cluster is released and the entry becomes a
 *    bare zero flag (QEMU releases compressed ones too; it would keep a
 *    shared one zero-flagged, which only keeps a snapshot's cluster
 *    referenced twice for nothing).
 * Clusters that read zeros already are left alone (no L2 table is
 * allocated for them).  -ENOTSUP: a version 2 image would need the zero
 * flag (issue 8: backing data showing through); the caller writes the
 * zeros as data then.  -EAGAIN as unmap_clusters. */
static int zero_clusters_locked(struct qcow_image *img, uint64_t gc, uint64_t count, bool may_unmap)
{
	qcow_assert_locked(img);
	/* checked again under the lock: a shrink may have come in between */
	uint64_t end_gc = (img->virtual_size + img->cluster_size - 1) >> img->cluster_bits;
	for (uint64_t g = gc; g < gc + count && g < end_gc; g++) {
		uint64_t l1i = g >> img->l2_bits, idx = g & ((1ull << img->l2_bits) - 1);
		bool shows_zero = qcow_sparsify_unmap_reads_zero(img, g);
		bool unmap = may_unmap && shows_zero;
		uint64_t e;
		int ret = qcow_l2_lookup(img, g, &e);
		if (ret)
			return ret;
		if (e == 0 && shows_zero)
			continue;
		if (!unmap && img->hdr.version < 3)
			return -ENOTSUP;
		if (!unmap && (e & QCOW_OFLAG_ZERO) && !(e & QCOW_OFLAG_COMPRESSED))
			continue;
		if (l1i >= img->hdr.l1_size)
			break;
		struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
		if (!t)
			return ret;
		e = qcow_l2_entry(t, idx);
		uint64_t slot = (t->cluster << img->cluster_bits) + idx * 8;
		uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
		uint64_t ne;
		if (!unmap && !(e & QCOW_OFLAG_COMPRESSED) && h && h < img->map.nclusters &&
		    qcow_map_state(&img->map, h) == QCS_REF && qcow_map_slot(&img->map, h) == slot) {
			ne = e | QCOW_OFLAG_ZERO;
		} else {
			release_entry(img, e, slot, false);
			ne = unmap ? 0 : QCOW_OFLAG_ZERO;
		}
		if (ne != e)
			qcow_l2_set_entry(img, t, idx, ne);
	}
	return 0;
}

/* zero_clusters_locked over a range of any length, in batches that let
 * guest I/O in between.  Unmapping counts as a discard for the recycler
 * (stats, quiet period, free-tail trim). */
static int zero_whole_clusters(struct qcow_image *img, uint64_t gc, uint64_t count, bool may_unmap)
{
	int ret = 0;
	while (count && ret == 0) {
		uint64_t n = count < DISCARD_BATCH_CLUSTERS ? count : DISCARD_BATCH_CLUSTERS;
		qcow_lock(img);
		while ((ret = zero_clusters_locked(img, gc, n, may_unmap)) == -EAGAIN)
			qcow_alloc_wait_truncation(img);
		if (may_unmap && ret == 0) {
			img->bytes_discarded += n * img->cluster_size;
			img->last_discard_ms = qcow_now_ms();
		}
		bool over = qcow_cache_over_budget(&img->cache);
		qcow_unlock(img);
		if (ret == 0)
			maybe_autoflush(img, over);
		gc += n;
		count -= n;
	}
	if (may_unmap)
		qcow_recycler_kick(img);
	return ret;
}

/* A guest write.  With detect_zeroes on or unmap, every whole cluster of
 * the write whose data is all zeros becomes a zero write or a discard
 * (zero_clusters_locked); the rest, and the partial clusters at the ends,
 * are written as data.  The check stops at the first non-zero word of each
 * cluster, so data writes pay a few loads per cluster. */
ssize_t qcow_image_write(struct qcow_image *img, const void *buf, size_t len, uint64_t off)
{
	enum qcow_detect_zeroes mode = img->opts.detect_zeroes;
	uint64_t cs = img->cluster_size;
	if (mode == QCOW_DETECT_ZEROES_OFF || !buf || len < cs ||
	    (mode == QCOW_DETECT_ZEROES_ON && img->hdr.version < 3))
		return write_common(img, buf, len, off);
	int ret = check_range(img, len, off);
	if (ret)
		return ret;
	if (img->read_only)
		return -EROFS;
	if (qcow_health_failed(img))
		return -EIO;
	qcow_pbitmap_note(img, off, len);
	const uint8_t *b = buf;
	uint64_t end = off + len;
	uint64_t first = (off + cs - 1) & ~(cs - 1);
	/* the disk's last cluster may be partial: reaching the end of the
	 * disk covers it whole (as discard_common) */
	uint64_t last = end == img->virtual_size ? (end + cs - 1) & ~(cs - 1) : end & ~(cs - 1);
	uint64_t pos = off;   /* written up to here */
	for (uint64_t c = first; c < last;) {
		uint64_t c2 = c;
		while (c2 < last && qcow_sparsify_buffer_is_zero(b + (c2 - off), end - c2 < cs ? end - c2 : cs))
			c2 += cs;
		if (c2 == c) {
			c += cs;
			continue;
		}
		if (c > pos) {
			ssize_t w = write_common(img, b + (pos - off), (size_t)(c - pos), pos);
			if (w < 0)
				return w;
		}
		uint64_t zend = c2 < end ? c2 : end;
		ret = zero_whole_clusters(img, c >> img->cluster_bits, (c2 - c) >> img->cluster_bits,
					  mode == QCOW_DETECT_ZEROES_UNMAP);
		if (ret == -ENOTSUP) {
			ssize_t w = write_common(img, b + (c - off), (size_t)(zend - c), c);
			ret = w < 0 ? (int)w : 0;
		}
		if (ret)
			return ret;
		pos = zend;
		c = c2;
	}
	if (pos < end) {
		ssize_t w = write_common(img, b + (pos - off), (size_t)(end - pos), pos);
		if (w < 0)
			return w;
	}
	return (ssize_t)len;
}

/* ---- discard and zero --------------------------------------------------- */

/* Unmaps whole guest clusters [gc, gc+count) under the lock.  -EAGAIN
 * when a table copy must wait for a truncation (nothing is held then; the
 * caller waits and calls again: clusters already unmapped are skipped). */
static int unmap_clusters(struct qcow_image *img, uint64_t gc, uint64_t count)
{
	qcow_assert_locked(img);
	for (uint64_t i = 0; i < count; i++) {
		uint64_t g = gc + i;
		uint64_t l1i = g >> img->l2_bits, idx = g & ((1ull << img->l2_bits) - 1);
		if (l1i >= img->hdr.l1_size)
			break;
		if (!(img->l1[l1i] & QCOW_L1E_OFFSET_MASK) && !img->backing) {
			/* no table: the rest of this table's range is already zero */
			i += ((1ull << img->l2_bits) - idx) - 1;
			continue;
		}
		uint64_t e;
		int ret = qcow_l2_lookup(img, g, &e);
		if (ret)
			return ret;
		if (e == zero_entry(img))
			continue;
		struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
		if (!t)
			return ret;
		e = qcow_l2_entry(t, idx);
		release_entry(img, e, (t->cluster << img->cluster_bits) + idx * 8, false);
		/* no backing file: an unallocated cluster reads zeros in both
		 * versions, and it frees the most; with one, the zero flag keeps
		 * the backing data from showing through (version 3 only: the
		 * caller writes zeros on version 2) */
		qcow_l2_set_entry(img, t, idx, zero_entry(img));
	}
	return 0;
}

static int discard_common(struct qcow_image *img, uint64_t off, uint64_t len)
{
	if (img->read_only)
		return -EROFS;
	if (off > img->virtual_size || len > img->virtual_size - off)
		return -EINVAL;
	if (len == 0)
		return 0;
	if (qcow_health_failed(img))
		return -EIO;
	qcow_pbitmap_note(img, off, len);
	uint64_t cs = img->cluster_size;
	uint64_t first = (off + cs - 1) & ~(cs - 1);
	uint64_t end = off + len;
	/* the disk's last cluster may be partial: reaching the end of the
	 * disk covers it whole */
	uint64_t last = end == img->virtual_size ? (end + cs - 1) & ~(cs - 1) : end & ~(cs - 1);
	int ret = 0;
	if (img->backing && img->hdr.version < 3) {
		/* no zero flag, and an unmapped cluster would show the backing
		 * file: zeros are written, as QEMU's write-zeroes does */
		ssize_t w = write_common(img, NULL, (size_t)len, off);
		return w < 0 ? (int)w : 0;
	}
	if (first >= last) {   /* inside one cluster */
		ssize_t w = write_common(img, NULL, (size_t)len, off);
		return w < 0 ? (int)w : 0;
	}
	if (first > off) {
		ssize_t w = write_common(img, NULL, (size_t)(first - off), off);
		if (w < 0)
			return (int)w;
	}
	if (end > last) {
		ssize_t w = write_common(img, NULL, (size_t)(end - last), last);
		if (w < 0)
			return (int)w;
	}
	/* whole clusters, in batches so guest I/O is never held off long */
	for (uint64_t gc = first >> img->cluster_bits; gc < last >> img->cluster_bits && ret == 0;) {
		uint64_t n = (last >> img->cluster_bits) - gc;
		if (n > DISCARD_BATCH_CLUSTERS)
			n = DISCARD_BATCH_CLUSTERS;
		qcow_lock(img);
		while ((ret = unmap_clusters(img, gc, n)) == -EAGAIN)
			qcow_alloc_wait_truncation(img);
		img->bytes_discarded += n * cs;
		img->last_discard_ms = qcow_now_ms();
		bool over = qcow_cache_over_budget(&img->cache);
		qcow_unlock(img);
		if (ret == 0)
			maybe_autoflush(img, over);
		gc += n;
	}
	qcow_recycler_kick(img);
	return ret;
}

int qcow_image_discard(struct qcow_image *img, uint64_t off, uint64_t len)
{
	return discard_common(img, off, len);
}

int qcow_image_zero(struct qcow_image *img, uint64_t off, uint64_t len)
{
	return discard_common(img, off, len);
}

/* ---- seek --------------------------------------------------------------- */

int64_t qcow_image_seek(struct qcow_image *img, uint64_t off, int whence)
{
	if (whence != SEEK_DATA && whence != SEEK_HOLE)
		return -EINVAL;
	if (off >= img->virtual_size)
		return -ENXIO;
	bool want_data = whence == SEEK_DATA;
	int64_t result = -1;
	int ret = 0;
	uint64_t gc = off >> img->cluster_bits;
	uint64_t nclusters = (img->virtual_size + img->cluster_size - 1) >> img->cluster_bits;
	qcow_lock(img);
	while (gc < nclusters && result < 0) {
		uint64_t l1i = gc >> img->l2_bits;
		if (l1i < img->hdr.l1_size && !(img->l1[l1i] & QCOW_L1E_OFFSET_MASK)) {
			if (!want_data) {
				result = (int64_t)(gc << img->cluster_bits);
				break;
			}
			gc = (l1i + 1) << img->l2_bits;
			continue;
		}
		uint64_t e;
		ret = qcow_l2_lookup(img, gc, &e);
		if (ret)
			break;
		bool data = !entry_reads_zero(img, e);
		if (data == want_data)
			result = (int64_t)(gc << img->cluster_bits);
		gc++;
	}
	qcow_unlock(img);
	if (ret)
		return ret;
	if (result < 0)
		return want_data ? -ENXIO : (int64_t)img->virtual_size;
	if ((uint64_t)result < off)
		result = (int64_t)off;
	if ((uint64_t)result > img->virtual_size)
		result = (int64_t)img->virtual_size;
	return result;
}

/* ---- resize ------------------------------------------------------------ */

/* Moves the L1 table into a bigger place (flush_lock held). */
static int grow_l1(struct qcow_image *img, uint32_t new_entries)
{
	qcow_assert_flush_locked(img);
	uint64_t cs = img->cluster_size;
	uint64_t nclusters = ((uint64_t)new_entries * 8 + cs - 1) / cs;
	uint64_t start;
	qcow_lock(img);
	int ret = qcow_alloc_contiguous(img, nclusters, &start);
	if (ret == 0)
		for (uint64_t i = 0; i < nclusters; i++)
			qcow_map_set_pinned(&img->map, start + i, 1);
	qcow_unlock(img);
	if (ret)
		return ret;
	ret = qcow_table_relocate(img, QCOW_TABLE_L1, start, nclusters, new_entries);
	if (ret == 0)
		qcow_recycler_kick(img);
	return ret;
}

/* Frees the L2 tables of L1 entries [from, l1_size) after a shrink
 * unmapped everything they held (img->lock held).  As QEMU's
 * qcow2_shrink_l1_table: the entries become 0 and the L1 table keeps its
 * size and place (a later grow reuses it).  The durable L1 entry shows a
 * table until the next flush, so a table is Pending until then, as after
 * a copy-on-write (qcow_l2_for_write). */
static void drop_l2_tables(struct qcow_image *img, uint64_t from)
{
	qcow_assert_locked(img);
	for (uint64_t i = from; i < img->hdr.l1_size; i++) {
		uint64_t l2 = (img->l1[i] & QCOW_L1E_OFFSET_MASK) >> img->cluster_bits;
		if (!l2)
			continue;
		qcow_l1_set(img, i, 0);
		if (l2 >= img->map.nclusters)
			continue;
		qcow_map_move_cancel(&img->map, l2);
		qcow_free_after_flush(img, l2, img->hdr.l1_table_offset + i * 8);
		struct qcow_cached *t = qcow_cache_find(&img->cache, l2);
		if (t && qcow_map_state(&img->map, l2) == QCS_PENDING)
			qcow_cache_remove(&img->cache, t);   /* a zombie if pinned */
	}
}

/* Shrinks the view to new_size (flush_lock held; smaller than now). */
static int shrink(struct qcow_image *img, uint64_t new_size, uint64_t l1_need)
{
	qcow_assert_flush_locked(img);
	uint64_t cs = img->cluster_size;
	int ret = 0;
	if (img->hdr.nb_snapshots) {
		/* QEMU's words: a snapshot's tables describe the old size */
		qcow_logf(QCOW_LOG_ERROR, "Can't resize an image which has snapshots (nb_snapshots %u at header offset 60): "
			  "delete them first", img->hdr.nb_snapshots);
		return -ENOTSUP;
	}
	uint64_t old_size = img->virtual_size;
	qcow_lock(img);
	img->hdr.size = new_size;
	img->virtual_size = new_size;
	img->header_dirty = true;
	uint64_t ticket = qcow_inflight_ticket(img);
	qcow_unlock(img);
	/* Writes that resolved against the old size finish first; later
	 * ones are refused past the new end (resolve_write), so nothing is
	 * allocated there after the unmap below. */
	qcow_inflight_wait_before(img, ticket);
	/* the rest of the last partial cluster: zeros, so that a later grow
	 * shows zeros there */
	uint64_t tail_end = (new_size + cs - 1) & ~(cs - 1);
	if (tail_end > new_size) {
		ssize_t w = write_range(img, NULL, (size_t)(tail_end - new_size), new_size, true);
		if (w < 0)
			return (int)w;
	}
	/* every whole cluster past the new end, as a discard */
	uint64_t last = (old_size + cs - 1) >> img->cluster_bits;
	for (uint64_t gc = tail_end >> img->cluster_bits; gc < last && ret == 0;) {
		uint64_t n = last - gc < DISCARD_BATCH_CLUSTERS ? last - gc : DISCARD_BATCH_CLUSTERS;
		qcow_lock(img);
		while ((ret = unmap_clusters(img, gc, n)) == -EAGAIN)
			qcow_alloc_wait_truncation(img);
		qcow_unlock(img);
		gc += n;
	}
	if (ret)
		return ret;
	qcow_lock(img);
	drop_l2_tables(img, l1_need);
	/* for the recycler, as a discard (it trims the free tail after one) */
	img->bytes_discarded += (last - (tail_end >> img->cluster_bits)) * cs;
	img->last_discard_ms = qcow_now_ms();
	qcow_unlock(img);
	ret = qcow_flush_holding_flush_lock(img);
	qcow_recycler_kick(img);
	return ret;
}

int qcow_image_resize(struct qcow_image *img, uint64_t new_size)
{
	if (img->read_only)
		return -EROFS;
	/* QEMU counts the disk in 512-byte sectors: a size that is not a
	 * multiple of 512 would show QEMU a smaller disk than ours */
	if (new_size > (1ull << 62))
		return -EFBIG;
	new_size = (new_size + 511) & ~511ull;
	uint64_t per_l1 = img->cluster_size << img->l2_bits;
	uint64_t need = new_size / per_l1 + (new_size % per_l1 != 0);
	if (need * 8 > QCOW_MAX_L1_BYTES)
		return -EFBIG;
	/* the persistent bitmaps follow the disk (qcow_persistent_bitmap.c) */
	int ret = qcow_pbitmap_resize_begin(img, new_size);
	if (ret)
		return ret;
	pthread_mutex_lock(&img->flush_lock);
	if ((ret = qcow_health_failed(img))) {
		ret = -EIO;
		goto out;
	}
	/* compared under flush_lock: a concurrent resize has finished */
	if (new_size == img->virtual_size)
		goto out;
	if (new_size < img->virtual_size) {
		ret = shrink(img, new_size, need);
		goto out;
	}
	if (need > img->hdr.l1_size) {
		if (need <= img->l1_capacity) {
			/* the tail of the table's last cluster is ours: zero it */
			qcow_lock(img);
			for (uint64_t i = img->hdr.l1_size; i < need; i++)
				qcow_l1_set(img, i, 0);
			img->hdr.l1_size = (uint32_t)need;
			img->header_dirty = true;
			qcow_unlock(img);
			ret = qcow_flush_holding_flush_lock(img);
		} else {
			ret = grow_l1(img, (uint32_t)need);
		}
	}
	if (ret == 0) {
		qcow_lock(img);
		img->hdr.size = new_size;
		img->virtual_size = new_size;
		img->header_dirty = true;
		qcow_unlock(img);
		ret = qcow_flush_holding_flush_lock(img);
	}
out:
	pthread_mutex_unlock(&img->flush_lock);
	qcow_pbitmap_resize_end(img);
	return ret;
}

/* ---- flush, stats ------------------------------------------------------ */

int qcow_image_flush(struct qcow_image *img)
{
	return qcow_flush(img);
}

uint64_t qcow_image_size(struct qcow_image *img) { return img->virtual_size; }

void qcow_image_get_stats(struct qcow_image *img, struct qcow_stats *st)
{
	memset(st, 0, sizeof(*st));
	int64_t fsz = img->io->ops->size(img->io);
	int64_t alloc = img->io->ops->allocated(img->io);
	pthread_mutex_lock(&img->lock);
	const struct qcow_map *m = &img->map;
	st->virtual_size = img->virtual_size;
	st->cluster_size = img->cluster_size;
	st->file_size = fsz > 0 ? (uint64_t)fsz : 0;
	st->file_allocated = alloc > 0 ? (uint64_t)alloc : 0;
	st->clusters_total = m->nclusters;
	uint64_t fixed = 1 + ((uint64_t)img->hdr.l1_size * 8 + img->cluster_size - 1) / img->cluster_size +
			 img->hdr.refcount_table_clusters;
	st->clusters_header = fixed < m->count[QCS_PINNED] ? fixed : m->count[QCS_PINNED];
	st->clusters_referenced = m->count[QCS_REF] + m->count[QCS_SHARED] + m->count[QCS_PINNED] - st->clusters_header;
	st->clusters_junk = m->count[QCS_JUNK] + m->count[QCS_ERASING];
	st->clusters_erased = m->count[QCS_ERASED] + m->count[QCS_FLUSHING];
	st->clusters_available = m->count[QCS_AVAILABLE];
	st->clusters_copies = m->count[QCS_COPIES];
	st->clusters_roots = m->count[QCS_ROOTS];
	st->clusters_pending = m->count[QCS_PENDING];
	st->clusters_shared = m->count[QCS_SHARED];
	st->map_bytes = qcow_map_memory(m);
	st->moves_in_flight = m->nmoves_active;
	st->bytes_reclaimed = img->bytes_reclaimed;
	st->bytes_discarded = img->bytes_discarded;
	st->compactions_done = img->compactions_done;
	st->clusters_moved = img->clusters_moved;
	st->streams_repacked = img->streams_repacked;
	st->compacting = img->compacting;
	st->compact_progress = img->compacting ? img->compact_progress : 1.0;
	st->punch_supported = img->punch_supported;
	st->read_only = img->read_only;
	pthread_mutex_unlock(&img->lock);
	qcow_health_get(img, &st->last_error, &st->failed);
	qcow_compact_outcome(img, st);
}
