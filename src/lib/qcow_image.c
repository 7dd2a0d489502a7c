/*
 * qcow_image.c - the engine API: open/close, guest reads and writes,
 * discard and zero, resize, SEEK_DATA/SEEK_HOLE and statistics.
 *
 * Owns: the translation of guest byte ranges into physical extents, the
 * active L1/L2 tables (through the cache), allocation, and the in-flight
 * registry.  Rules (DESIGN.md sections 3, 5 and 7; lock order in
 * qcow_internal.h):
 *  - A request resolves its extents under img->lock, registers itself in
 *    the in-flight list in the same critical section, drops the lock for
 *    the data I/O, and unregisters afterwards.
 *  - New clusters come only from Available (or a grown file tail) and are
 *    linked into their L2 table at once, so two writers of one guest
 *    cluster always share one host cluster, and a crash leaves zeros, not
 *    stale data, behind a durable pointer (invariant 2).
 *  - A write to a move source cancels the move; any change to an L2 table
 *    cancels a move of that table.
 *  - Copy-on-write (shared, compressed or zero-allocated clusters) fills
 *    the new cluster under the lock before linking it: rare, and it keeps
 *    concurrent writers of the same guest cluster from racing the fill.
 */
#include "config.h"
#include "qcow_internal.h"
#include "qcow_lock.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#define DISCARD_BATCH_CLUSTERS 4096u

/* ---- in-flight registry ------------------------------------------- */

void qcow_inflight_begin(struct qcow_image *img, struct qcow_inflight *req)
{
	struct qcow_inflight *head = &img->inflight_head;
	req->ticket = ++img->next_ticket;
	req->next = head;
	req->prev = head->prev;
	head->prev->next = req;
	head->prev = req;
}

void qcow_inflight_end(struct qcow_image *img, struct qcow_inflight *req)
{
	req->prev->next = req->next;
	req->next->prev = req->prev;
	if (img->inflight_waiters)
		pthread_cond_broadcast(&img->inflight_done);
}

uint64_t qcow_inflight_ticket(struct qcow_image *img)
{
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

/* ---- metadata access ----------------------------------------------- */

struct qcow_cached *qcow_l2_get(struct qcow_image *img, uint64_t l2_cluster, int *ret)
{
	struct qcow_cached *e = qcow_cache_find(&img->cache, l2_cluster);
	*ret = 0;
	if (e)
		return e;
	e = qcow_cache_insert(&img->cache, l2_cluster);
	if (!e) {
		*ret = -ENOMEM;
		return NULL;
	}
	/* A miss reads under the lock: no flush can be writing this table
	 * (tables being written are pinned in the cache), so the disk copy is
	 * current. */
	*ret = img->io->ops->pread(img->io, e->data, img->cluster_size, l2_cluster << img->cluster_bits);
	if (*ret < 0) {
		qcow_logf(QCOW_LOG_ERROR, "cannot read L2 table at 0x%" PRIx64 ": %s",
			  l2_cluster << img->cluster_bits, strerror(-*ret));
		qcow_cache_remove(&img->cache, e);
		return NULL;
	}
	return e;
}

static uint64_t l2_entry(const struct qcow_cached *t, uint64_t idx)
{
	return qcow_get_be64(t->data + idx * 8);
}

void qcow_l2_set_entry(struct qcow_image *img, struct qcow_cached *t, uint64_t idx, uint64_t v)
{
	qcow_put_be64(t->data + idx * 8, v);
	qcow_cache_set_dirty(&img->cache, t, true);
	/* the table's contents changed: a copy made by a move is stale */
	qcow_map_move_cancel(&img->map, t->cluster);
}

static void l1_set(struct qcow_image *img, uint64_t idx, uint64_t v)
{
	img->l1[idx] = v;
	qcow_bitmap_set(&img->l1_dirty, (idx * 8) >> img->cluster_bits);
}

/* ---- allocation ------------------------------------------------------ */

/* Grows the file (and the map) so that at least n new clusters exist at
 * its end; they read as zeros and are Available.  The size change becomes
 * durable with the next flush's first sync, before any pointer to the new
 * clusters is written (so no durable pointer ever lies past the end of the
 * file). */
static int grow_file(struct qcow_image *img, uint64_t n)
{
	while (img->truncating)
		pthread_cond_wait(&img->truncate_done, &img->lock);
	uint64_t old = img->map.nclusters;
	uint64_t chunk = (old / 16) ?: 1;
	uint64_t min_chunk = (1u << 20) >> img->cluster_bits, max_chunk = (64u << 20) >> img->cluster_bits;
	if (chunk < min_chunk)
		chunk = min_chunk;
	if (chunk > max_chunk && max_chunk)
		chunk = max_chunk;
	if (chunk < n)
		chunk = n;
	if ((old + chunk) > (QCOW_MAX_HOST_OFFSET >> img->cluster_bits))
		return -EFBIG;
	int ret = img->io->ops->truncate(img->io, (old + chunk) << img->cluster_bits);
	if (ret < 0)
		return ret;
	ret = qcow_map_resize(&img->map, old + chunk);
	if (ret < 0)
		return ret;
	img->data_dirty = true;
	return 0;
}

int qcow_alloc_cluster(struct qcow_image *img, uint64_t *out)
{
	uint64_t c = qcow_map_lowest_available(&img->map);
	if (c == UINT64_MAX) {
		int ret = grow_file(img, 1);
		if (ret < 0)
			return ret;
		c = qcow_map_lowest_available(&img->map);
		if (c == UINT64_MAX)
			return -ENOSPC;
	}
	qcow_map_set_state(&img->map, c, QCS_ROOTS);
	*out = c;
	return 0;
}

int qcow_alloc_contiguous(struct qcow_image *img, uint64_t n, uint64_t *out)
{
	/* lowest run of n Available clusters, else at the end of the file */
	uint64_t c = qcow_map_lowest_available(&img->map);
	while (c != UINT64_MAX) {
		uint64_t k = 1;
		while (k < n && c + k < img->map.nclusters && qcow_map_state(&img->map, c + k) == QCS_AVAILABLE)
			k++;
		if (k == n)
			break;
		c = qcow_bitmap_next(&img->map.available, c + k);
	}
	if (c == UINT64_MAX) {
		uint64_t end = img->map.nclusters;
		uint64_t last = qcow_map_last_block(&img->map);
		int ret = grow_file(img, n + 1);
		if (ret < 0)
			return ret;
		/* the run starts after the last busy cluster: everything
		 * from there to the new end is Available */
		c = last == UINT64_MAX ? 0 : last + 1;
		if (c < end) {
			uint64_t k = 0;
			while (k < n && qcow_map_state(&img->map, c + k) == QCS_AVAILABLE)
				k++;
			if (k < n)
				c = end;
		}
	}
	for (uint64_t i = 0; i < n; i++)
		qcow_map_set_state(&img->map, c + i, QCS_ROOTS);
	*out = c;
	return 0;
}

/* ---- relocating the L1 and refcount tables ---------------------------- */

int qcow_table_copy_durable(struct qcow_image *img, uint64_t old_off, uint64_t bytes, uint64_t start, uint64_t n)
{
	uint64_t cs = img->cluster_size;
	uint8_t *buf = qcow_calloc(n, cs);
	int ret = buf ? 0 : -ENOMEM;
	if (!ret)
		ret = img->io->ops->pread(img->io, buf, (size_t)bytes, old_off);
	if (!ret)
		ret = img->io->ops->pwrite(img->io, buf, n * cs, start << img->cluster_bits);
	if (!ret)
		ret = img->io->ops->flush(img->io);
	qcow_free(buf);
	if (ret) {
		pthread_mutex_lock(&img->lock);
		for (uint64_t i = 0; i < n; i++)
			qcow_map_set_state(&img->map, start + i, QCS_JUNK);
		pthread_mutex_unlock(&img->lock);
	}
	return ret;
}

void qcow_l1_rehome(struct qcow_image *img, uint64_t clusters)
{
	for (uint64_t k = 0; k < clusters; k++)
		qcow_bitmap_set(&img->l1_dirty, k);
	for (uint32_t i = 0; i < img->hdr.l1_size; i++) {
		uint64_t t = (img->l1[i] & QCOW_L1E_OFFSET_MASK) >> img->cluster_bits;
		if (t && t < img->map.nclusters && qcow_map_state(&img->map, t) == QCS_REF)
			qcow_map_set_ref(&img->map, t, img->hdr.l1_table_offset + (uint64_t)i * 8);
	}
}

void qcow_reftable_rehome(struct qcow_image *img, uint64_t clusters)
{
	for (uint64_t k = 0; k < clusters; k++)
		qcow_bitmap_set(&img->reftable_dirty, k);
	for (uint64_t i = 0; i < img->reftable_entries; i++) {
		uint64_t b = img->reftable[i] >> img->cluster_bits;
		if (b && b < img->map.nclusters && qcow_map_state(&img->map, b) == QCS_REF)
			qcow_map_set_ref(&img->map, b, img->hdr.refcount_table_offset + i * 8);
	}
}

/* ---- guest address translation ------------------------------------- */

enum seg_kind { SEG_ZERO, SEG_DATA, SEG_COMPRESSED };

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
}

static int segs_add(struct seg_list *s, enum seg_kind kind, uint64_t host, uint64_t in_cluster, size_t len, size_t buf_off)
{
	if (s->n) {
		struct seg *p = &s->v[s->n - 1];
		if (p->kind == kind && p->buf_off + p->len == buf_off &&
		    (kind == SEG_ZERO || (kind == SEG_DATA && p->host + p->len == host))) {
			p->len += len;
			return 0;
		}
	}
	if (s->n == s->cap) {
		size_t cap = s->cap * 2;
		struct seg *v = s->v == s->inline_v ? qcow_malloc(cap * sizeof(*v)) : qcow_realloc(s->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		if (s->v == s->inline_v)
			memcpy(v, s->inline_v, sizeof(s->inline_v));
		s->v = v;
		s->cap = cap;
	}
	s->v[s->n++] = (struct seg){ .kind = kind, .host = host, .in_cluster = in_cluster, .len = len, .buf_off = buf_off };
	return 0;
}

/* The L2 entry for guest cluster gc (0 when there is no L2 table). */
static int lookup(struct qcow_image *img, uint64_t gc, uint64_t *entry)
{
	uint64_t l1i = gc >> img->l2_bits;
	*entry = 0;
	if (l1i >= img->hdr.l1_size)
		return 0;
	uint64_t l2off = img->l1[l1i] & QCOW_L1E_OFFSET_MASK;
	if (!l2off)
		return 0;
	int ret;
	struct qcow_cached *t = qcow_l2_get(img, l2off >> img->cluster_bits, &ret);
	if (!t)
		return ret;
	*entry = l2_entry(t, gc & ((1ull << img->l2_bits) - 1));
	return 0;
}

static bool entry_reads_zero(const struct qcow_image *img, uint64_t e)
{
	if (e & QCOW_OFLAG_COMPRESSED)
		return false;
	if (img->hdr.version >= 3 && (e & QCOW_OFLAG_ZERO))
		return true;
	return (e & QCOW_L2E_OFFSET_MASK) == 0;
}

/* Host byte range of a compressed cluster's stream. */
static void compressed_range(const struct qcow_image *img, uint64_t e, uint64_t *off, uint64_t *len)
{
	unsigned x = 62 - (img->cluster_bits - 8);
	uint64_t o = e & ((1ull << x) - 1);
	uint64_t sectors = ((e >> x) & ((1ull << (img->cluster_bits - 8)) - 1)) + 1;
	*off = o;
	*len = sectors * 512 - (o & 511);
}

/* Inflates one compressed cluster into out (cluster_size bytes). */
static int read_compressed(struct qcow_image *img, uint64_t e, uint8_t *out)
{
	uint64_t off, len;
	compressed_range(img, e, &off, &len);
	uint8_t *in = qcow_malloc((size_t)len);
	if (!in)
		return -ENOMEM;
	int ret = img->io->ops->pread(img->io, in, (size_t)len, off);
	if (ret == 0) {
		z_stream zs;
		memset(&zs, 0, sizeof(zs));
		if (inflateInit2(&zs, -15) != Z_OK) {
			ret = -ENOMEM;
		} else {
			zs.next_in = in;
			zs.avail_in = (uInt)len;
			zs.next_out = out;
			zs.avail_out = (uInt)img->cluster_size;
			int zr = inflate(&zs, Z_FINISH);
			/* the stream may end early or be followed by padding;
			 * what matters is one full cluster of output */
			if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) || zs.avail_out != 0) {
				qcow_logf(QCOW_LOG_ERROR, "corrupt compressed cluster at 0x%" PRIx64, off);
				ret = -EIO;
			}
			inflateEnd(&zs);
		}
	}
	qcow_free(in);
	return ret;
}

/* ---- reads ------------------------------------------------------------ */

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

ssize_t qcow_image_read(struct qcow_image *img, void *buf, size_t len, uint64_t off)
{
	struct seg_list segs;
	struct qcow_inflight req;
	int ret = check_range(img, len, off);
	if (ret || len == 0)
		return ret ? ret : 0;
	segs_init(&segs);
	pthread_mutex_lock(&img->lock);
	for (size_t pos = 0; pos < len && ret == 0;) {
		uint64_t gc, o;
		size_t n = cluster_piece(img, off + pos, len - pos, &gc, &o);
		uint64_t e;
		ret = lookup(img, gc, &e);
		if (ret)
			break;
		if (e & QCOW_OFLAG_COMPRESSED)
			ret = segs_add(&segs, SEG_COMPRESSED, e, o, n, pos);
		else if (entry_reads_zero(img, e))
			ret = segs_add(&segs, SEG_ZERO, 0, 0, n, pos);
		else
			ret = segs_add(&segs, SEG_DATA, (e & QCOW_L2E_OFFSET_MASK) + o, 0, n, pos);
		pos += n;
	}
	if (ret) {
		pthread_mutex_unlock(&img->lock);
		segs_free(&segs);
		return ret;
	}
	qcow_inflight_begin(img, &req);
	pthread_mutex_unlock(&img->lock);

	uint8_t *cbuf = NULL;
	for (size_t i = 0; i < segs.n && ret == 0; i++) {
		struct seg *s = &segs.v[i];
		uint8_t *dst = (uint8_t *)buf + s->buf_off;
		if (s->kind == SEG_ZERO) {
			memset(dst, 0, s->len);
		} else if (s->kind == SEG_DATA) {
			ret = img->io->ops->pread(img->io, dst, s->len, s->host);
		} else {
			if (!cbuf && !(cbuf = qcow_malloc(img->cluster_size))) {
				ret = -ENOMEM;
				break;
			}
			ret = read_compressed(img, s->host, cbuf);
			if (ret == 0)
				memcpy(dst, cbuf + s->in_cluster, s->len);
		}
	}
	qcow_free(cbuf);

	pthread_mutex_lock(&img->lock);
	qcow_inflight_end(img, &req);
	pthread_mutex_unlock(&img->lock);
	segs_free(&segs);
	return ret ? ret : (ssize_t)len;
}

/* ---- writes ----------------------------------------------------------- */

/* Makes the L2 table of L1 index l1i exist and be writable in place (its
 * L1 entry has COPIED); returns it. */
static struct qcow_cached *l2_for_write(struct qcow_image *img, uint64_t l1i, int *ret)
{
	uint64_t l1e = img->l1[l1i];
	uint64_t old = l1e & QCOW_L1E_OFFSET_MASK;
	uint64_t slot = img->hdr.l1_table_offset + l1i * 8;
	struct qcow_cached *t;
	*ret = 0;
	if (old && (l1e & QCOW_OFLAG_COPIED) && qcow_map_state(&img->map, old >> img->cluster_bits) == QCS_REF)
		return qcow_l2_get(img, old >> img->cluster_bits, ret);

	struct qcow_cached *src = NULL;
	if (old) {
		src = qcow_l2_get(img, old >> img->cluster_bits, ret);
		if (!src)
			return NULL;
	}
	uint64_t c;
	*ret = qcow_alloc_cluster(img, &c);
	if (*ret)
		return NULL;
	t = qcow_cache_insert(&img->cache, c);
	if (!t) {
		qcow_map_set_state(&img->map, c, QCS_AVAILABLE);
		*ret = -ENOMEM;
		return NULL;
	}
	if (src) {
		/* copy-on-write of a shared L2 table: the data clusters keep
		 * their counts (each L1 path counts once); those that had a
		 * single reference from the old table now hang off the new one */
		memcpy(t->data, src->data, img->cluster_size);
		uint64_t oldc = old >> img->cluster_bits;
		for (uint64_t i = 0; i < (1ull << img->l2_bits); i++) {
			uint64_t e = l2_entry(t, i);
			uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
			if (!h || (e & QCOW_OFLAG_COMPRESSED) || h >= img->map.nclusters)
				continue;
			if (qcow_map_state(&img->map, h) == QCS_REF &&
			    qcow_map_slot(&img->map, h) >> img->cluster_bits == oldc)
				qcow_map_set_ref(&img->map, h, (c << img->cluster_bits) + i * 8);
		}
		qcow_map_move_cancel(&img->map, oldc);
		qcow_map_drop_ref(&img->map, oldc);
		if (qcow_map_state(&img->map, oldc) == QCS_JUNK)
			qcow_cache_remove(&img->cache, src);
	} else {
		memset(t->data, 0, img->cluster_size);
	}
	qcow_cache_set_dirty(&img->cache, t, true);
	qcow_map_set_ref(&img->map, c, slot);
	l1_set(img, l1i, (c << img->cluster_bits) | QCOW_OFLAG_COPIED);
	return t;
}

/* Releases the host clusters an L2 entry holds (before it is replaced). */
static void release_entry(struct qcow_image *img, uint64_t e)
{
	if (e & QCOW_OFLAG_COMPRESSED) {
		uint64_t off, len;
		compressed_range(img, e, &off, &len);
		for (uint64_t c = off >> img->cluster_bits; c <= (off + len - 1) >> img->cluster_bits; c++)
			if (c < img->map.nclusters && qcow_map_state(&img->map, c) == QCS_PINNED)
				qcow_map_drop_ref(&img->map, c);
		return;
	}
	uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	if (!h || h >= img->map.nclusters)
		return;
	enum qcow_cstate s = qcow_map_state(&img->map, h);
	if (s != QCS_REF && s != QCS_PINNED)
		return;
	qcow_map_move_cancel(&img->map, h);
	qcow_map_drop_ref(&img->map, h);
}

/* Reads what guest cluster entry e currently shows into buf. */
static int read_entry_contents(struct qcow_image *img, uint64_t e, uint8_t *buf)
{
	if (e & QCOW_OFLAG_COMPRESSED)
		return read_compressed(img, e, buf);
	if (entry_reads_zero(img, e)) {
		memset(buf, 0, img->cluster_size);
		return 0;
	}
	return img->io->ops->pread(img->io, buf, img->cluster_size, e & QCOW_L2E_OFFSET_MASK);
}

/* Resolves guest cluster gc for a write of [o, o+n); returns the host
 * cluster's byte offset in *host. */
static int prepare_write(struct qcow_image *img, uint64_t gc, uint64_t o, uint64_t n, uint64_t *host)
{
	uint64_t l1i = gc >> img->l2_bits, idx = gc & ((1ull << img->l2_bits) - 1);
	int ret;
	struct qcow_cached *t = l2_for_write(img, l1i, &ret);
	if (!t)
		return ret;
	uint64_t e = l2_entry(t, idx);
	uint64_t slot = (t->cluster << img->cluster_bits) + idx * 8;
	uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	bool zero = entry_reads_zero(img, e);
	if (!zero && !(e & QCOW_OFLAG_COMPRESSED) && (e & QCOW_OFLAG_COPIED) && h < img->map.nclusters &&
	    qcow_map_state(&img->map, h) == QCS_REF && qcow_map_slot(&img->map, h) == slot) {
		/* in place; a move of this cluster would copy stale data */
		qcow_map_move_cancel(&img->map, h);
		*host = h << img->cluster_bits;
		return 0;
	}
	uint64_t c;
	ret = qcow_alloc_cluster(img, &c);
	if (ret)
		return ret;
	if (!zero && !(o == 0 && n == img->cluster_size)) {
		uint8_t *buf = qcow_malloc(img->cluster_size);
		ret = buf ? read_entry_contents(img, e, buf) : -ENOMEM;
		if (ret == 0)
			ret = img->io->ops->pwrite(img->io, buf, img->cluster_size, c << img->cluster_bits);
		qcow_free(buf);
		if (ret) {
			qcow_map_set_state(&img->map, c, QCS_JUNK);
			return ret;
		}
		img->data_dirty = true;
	}
	release_entry(img, e);
	qcow_l2_set_entry(img, t, idx, (c << img->cluster_bits) | QCOW_OFLAG_COPIED);
	qcow_map_set_ref(&img->map, c, slot);
	*host = c << img->cluster_bits;
	return 0;
}

static int maybe_autoflush(struct qcow_image *img, bool over)
{
	if (!over)
		return 0;
	return qcow_flush(img);
}

/* Writes buf (NULL = zeros) at off; the shared body of write and of the
 * partial-cluster part of discard/zero. */
static ssize_t write_common(struct qcow_image *img, const void *buf, size_t len, uint64_t off)
{
	struct seg_list segs;
	struct qcow_inflight req;
	int ret = check_range(img, len, off);
	if (ret || len == 0)
		return ret ? ret : 0;
	if (img->read_only)
		return -EROFS;
	segs_init(&segs);
	pthread_mutex_lock(&img->lock);
	for (size_t pos = 0; pos < len && ret == 0;) {
		uint64_t gc, o;
		size_t n = cluster_piece(img, off + pos, len - pos, &gc, &o);
		uint64_t host = 0;
		if (!buf) {
			/* zeroing part of a cluster that reads zero already must
			 * not allocate it */
			uint64_t e;
			ret = lookup(img, gc, &e);
			if (ret == 0 && entry_reads_zero(img, e)) {
				pos += n;
				continue;
			}
		}
		if (ret == 0)
			ret = prepare_write(img, gc, o, n, &host);
		if (ret == 0)
			ret = segs_add(&segs, SEG_DATA, host + o, 0, n, pos);
		pos += n;
	}
	if (ret) {
		pthread_mutex_unlock(&img->lock);
		segs_free(&segs);
		return ret;
	}
	qcow_inflight_begin(img, &req);
	pthread_mutex_unlock(&img->lock);

	if (img->write_io_hook)
		img->write_io_hook(img, img->write_io_opaque);
	for (size_t i = 0; i < segs.n && ret == 0; i++) {
		struct seg *s = &segs.v[i];
		if (buf) {
			ret = img->io->ops->pwrite(img->io, (const uint8_t *)buf + s->buf_off, s->len, s->host);
		} else {
			ret = qcow_io_write_zeros(img->io, s->host, s->len);
		}
	}

	pthread_mutex_lock(&img->lock);
	/* Only now: a flush that started while the data was still in flight
	 * has already taken (and cleared) the flag, and the fsync that follows
	 * this write's completion must still sync it. */
	img->data_dirty = true;
	qcow_inflight_end(img, &req);
	bool over = qcow_cache_over_budget(&img->cache);
	pthread_mutex_unlock(&img->lock);
	segs_free(&segs);
	if (ret)
		return ret;
	ret = maybe_autoflush(img, over);
	return ret ? ret : (ssize_t)len;
}

ssize_t qcow_image_write(struct qcow_image *img, const void *buf, size_t len, uint64_t off)
{
	return write_common(img, buf, len, off);
}

/* ---- discard and zero --------------------------------------------------- */

/* Unmaps whole guest clusters [gc, gc+count) under the lock. */
static int unmap_clusters(struct qcow_image *img, uint64_t gc, uint64_t count)
{
	for (uint64_t i = 0; i < count; i++) {
		uint64_t g = gc + i;
		uint64_t l1i = g >> img->l2_bits, idx = g & ((1ull << img->l2_bits) - 1);
		if (l1i >= img->hdr.l1_size)
			break;
		if (!(img->l1[l1i] & QCOW_L1E_OFFSET_MASK)) {
			/* no table: the rest of this table's range is already zero */
			i += ((1ull << img->l2_bits) - idx) - 1;
			continue;
		}
		uint64_t e;
		int ret = lookup(img, g, &e);
		if (ret)
			return ret;
		if (e == 0)
			continue;
		int r;
		struct qcow_cached *t = l2_for_write(img, l1i, &r);
		if (!t)
			return r;
		e = l2_entry(t, idx);
		release_entry(img, e);
		/* no backing file: an unallocated cluster reads zeros in both
		 * versions, and it frees the most */
		qcow_l2_set_entry(img, t, idx, 0);
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
	uint64_t cs = img->cluster_size;
	uint64_t first = (off + cs - 1) & ~(cs - 1);
	uint64_t end = off + len;
	/* the disk's last cluster may be partial: reaching the end of the
	 * disk covers it whole */
	uint64_t last = end == img->virtual_size ? (end + cs - 1) & ~(cs - 1) : end & ~(cs - 1);
	int ret = 0;
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
		pthread_mutex_lock(&img->lock);
		ret = unmap_clusters(img, gc, n);
		img->bytes_discarded += n * cs;
		img->last_discard_ms = qcow_now_ms();
		bool over = qcow_cache_over_budget(&img->cache);
		pthread_mutex_unlock(&img->lock);
		if (ret == 0)
			ret = maybe_autoflush(img, over);
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
	pthread_mutex_lock(&img->lock);
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
		ret = lookup(img, gc, &e);
		if (ret)
			break;
		bool data = !entry_reads_zero(img, e);
		if (data == want_data)
			result = (int64_t)(gc << img->cluster_bits);
		gc++;
	}
	pthread_mutex_unlock(&img->lock);
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

/* Moves the L1 table to a bigger place: new table durable first, then the
 * header switch in one write, then the old clusters are freed. */
static int grow_l1(struct qcow_image *img, uint32_t new_entries)
{
	uint64_t cs = img->cluster_size;
	uint64_t nclusters = ((uint64_t)new_entries * 8 + cs - 1) / cs;
	uint64_t start;
	int ret;

	pthread_mutex_lock(&img->lock);
	ret = qcow_alloc_contiguous(img, nclusters, &start);
	if (ret == 0)
		for (uint64_t i = 0; i < nclusters; i++)
			qcow_map_set_pinned(&img->map, start + i, 1);
	pthread_mutex_unlock(&img->lock);
	if (ret)
		return ret;
	/* The new table is a copy of the old one as it is on disk after this
	 * flush: those entries point to tables whose refcounts are durable.
	 * Entries changed in memory since reach the new table with the next
	 * flush, in protocol order (all its clusters are marked dirty below).
	 * flush_lock is held, so no other flush writes the old table meanwhile. */
	ret = qcow_flush_holding_flush_lock(img);
	if (!ret)
		ret = qcow_table_copy_durable(img, img->hdr.l1_table_offset, (uint64_t)img->hdr.l1_size * 8, start, nclusters);
	if (ret)
		return ret;
	pthread_mutex_lock(&img->lock);
	uint64_t *l1 = qcow_calloc(nclusters * cs / 8, 8);
	if (!l1 || qcow_bitmap_resize(&img->l1_dirty, nclusters)) {
		pthread_mutex_unlock(&img->lock);
		qcow_free(l1);
		return -ENOMEM;
	}
	memcpy(l1, img->l1, (size_t)img->hdr.l1_size * 8);
	uint64_t old_off = img->hdr.l1_table_offset;
	uint64_t old_clusters = ((uint64_t)img->hdr.l1_size * 8 + cs - 1) / cs;
	img->hdr.l1_table_offset = start << img->cluster_bits;
	img->hdr.l1_size = new_entries;
	qcow_free(img->l1);
	img->l1 = l1;
	img->l1_capacity = (uint32_t)(nclusters * cs / 8);
	qcow_l1_rehome(img, nclusters);
	pthread_mutex_unlock(&img->lock);
	ret = qcow_header_write_fields(img->io, &img->hdr, QH_L1_SIZE, 12);
	if (!ret)
		ret = img->io->ops->flush(img->io);
	if (ret) {
		/* which header is on disk is unknown: keep both tables */
		qcow_note_error(img, ret, "switching to the grown L1 table");
		return ret;
	}
	pthread_mutex_lock(&img->lock);
	for (uint64_t i = 0; old_off && i < old_clusters; i++)
		qcow_map_drop_ref(&img->map, (old_off >> img->cluster_bits) + i);
	pthread_mutex_unlock(&img->lock);
	qcow_recycler_kick(img);
	return 0;
}

int qcow_image_resize(struct qcow_image *img, uint64_t new_size)
{
	if (img->read_only)
		return -EROFS;
	if (new_size == img->virtual_size)
		return 0;
	if (new_size < img->virtual_size)
		return -EOPNOTSUPP;
	uint64_t per_l1 = img->cluster_size << img->l2_bits;
	uint64_t need = new_size / per_l1 + (new_size % per_l1 != 0);
	if (need * 8 > QCOW_MAX_L1_BYTES || new_size > (1ull << 62))
		return -EFBIG;
	int ret = 0;
	pthread_mutex_lock(&img->flush_lock);
	if (need > img->hdr.l1_size) {
		if (need <= img->l1_capacity) {
			/* the tail of the table's last cluster is ours: zero it */
			pthread_mutex_lock(&img->lock);
			for (uint64_t i = img->hdr.l1_size; i < need; i++)
				l1_set(img, i, 0);
			img->hdr.l1_size = (uint32_t)need;
			img->header_dirty = true;
			pthread_mutex_unlock(&img->lock);
			ret = qcow_flush_holding_flush_lock(img);
		} else {
			ret = grow_l1(img, (uint32_t)need);
		}
	}
	if (ret == 0) {
		pthread_mutex_lock(&img->lock);
		img->hdr.size = new_size;
		img->virtual_size = new_size;
		img->header_dirty = true;
		pthread_mutex_unlock(&img->lock);
		ret = qcow_flush_holding_flush_lock(img);
	}
	pthread_mutex_unlock(&img->flush_lock);
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
	st->clusters_referenced = m->count[QCS_REF] + m->count[QCS_PINNED] - st->clusters_header;
	st->clusters_junk = m->count[QCS_JUNK] + m->count[QCS_ERASING];
	st->clusters_erased = m->count[QCS_ERASED] + m->count[QCS_FLUSHING];
	st->clusters_available = m->count[QCS_AVAILABLE];
	st->clusters_copies = m->count[QCS_COPIES];
	st->clusters_roots = m->count[QCS_ROOTS];
	st->clusters_pending = m->count[QCS_PENDING];
	st->moves_in_flight = m->nmoves_active;
	st->bytes_reclaimed = img->bytes_reclaimed;
	st->bytes_discarded = img->bytes_discarded;
	st->compactions_done = img->compactions_done;
	st->clusters_moved = img->clusters_moved;
	st->compacting = img->compacting;
	st->compact_progress = img->compacting ? img->compact_progress : 1.0;
	st->punch_supported = img->punch_supported;
	st->read_only = img->read_only;
	pthread_mutex_unlock(&img->lock);
	qcow_health_get(img, &st->last_error, &st->failed);
	qcow_compact_outcome(img, st);
}

/* ---- open and close ----------------------------------------------------- */

struct build_ctx {
	struct qcow_image *img;
	struct qcow_bitmap fixed;   /* clusters of header structures */
	char *err;
	size_t errlen;
};

static const char *kind_name(enum qcow_ref_kind k)
{
	switch (k) {
	case QREF_HEADER: return "image header";
	case QREF_L1: return "L1 table";
	case QREF_REFTABLE: return "refcount table";
	case QREF_REFBLOCK: return "refcount block";
	case QREF_L2: return "L2 table";
	case QREF_DATA: return "data cluster";
	case QREF_SNAPSHOT_TABLE: return "snapshot table";
	case QREF_SNAPSHOT_L1: return "snapshot L1 table";
	case QREF_SNAPSHOT_L2: return "snapshot L2 table";
	case QREF_SNAPSHOT_DATA: return "snapshot data cluster";
	case QREF_COMPRESSED: return "compressed cluster";
	}
	return "?";
}

static int build_visit(void *opaque, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	struct build_ctx *b = opaque;
	struct qcow_map *m = &b->img->map;
	if (c >= m->nclusters) {
		/* a header structure may run past the end of the file: it
		 * reads as zeros there; the map must still cover it */
		if (qcow_map_resize(m, c + 1) || qcow_bitmap_resize(&b->fixed, c + 1))
			return -ENOMEM;
	}
	enum qcow_cstate s = qcow_map_state(m, c);
	bool used = s == QCS_REF || s == QCS_PINNED;
	switch (kind) {
	case QREF_HEADER: case QREF_L1: case QREF_REFTABLE: case QREF_SNAPSHOT_TABLE: case QREF_SNAPSHOT_L1:
		if (used && kind == QREF_SNAPSHOT_L1 && qcow_bitmap_test(&b->fixed, c)) {
			/* snapshots may share an L1 table copy: count it */
			qcow_map_add_ref(m, c, 0);
			return 0;
		}
		if (used) {
			qcow_set_error(b->err, b->errlen, "%s at offset 0x%" PRIx64 " overlaps another header structure",
				       kind_name(kind), c << b->img->cluster_bits);
			return -EINVAL;
		}
		qcow_map_set_pinned(m, c, 1);
		qcow_bitmap_set(&b->fixed, c);
		return 0;
	case QREF_REFBLOCK: case QREF_L2: case QREF_DATA:
		if (used) {
			qcow_set_error(b->err, b->errlen, "%s at offset 0x%" PRIx64 " (pointer at offset 0x%" PRIx64 ") is %s",
				       kind_name(kind), c << b->img->cluster_bits, slot,
				       qcow_bitmap_test(&b->fixed, c) ? "inside a header structure (L1, refcount or snapshot table)"
								      : "referenced twice");
			return -EINVAL;
		}
		qcow_map_set_ref(m, c, slot);
		return 0;
	case QREF_SNAPSHOT_L2: case QREF_SNAPSHOT_DATA: case QREF_COMPRESSED:
		if (qcow_bitmap_test(&b->fixed, c)) {
			qcow_set_error(b->err, b->errlen, "%s at offset 0x%" PRIx64 " (pointer at offset 0x%" PRIx64 ") lies inside a header structure",
				       kind_name(kind), c << b->img->cluster_bits, slot);
			return -EINVAL;
		}
		if (used)
			qcow_map_add_ref(m, c, slot);
		else
			qcow_map_set_pinned(m, c, 1);
		return 0;
	}
	return 0;
}

void qcow_open_opts_default(struct qcow_open_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->compact = true;
	o->recycler = true;
}

static void image_free(struct qcow_image *img)
{
	qcow_cache_free(&img->cache);
	qcow_map_free(&img->map);
	qcow_bitmap_free(&img->l1_dirty);
	qcow_bitmap_free(&img->reftable_dirty);
	qcow_free(img->l1);
	qcow_free(img->reftable);
	qcow_free(img->erased_list);
	qcow_header_free(&img->hdr);
	pthread_mutex_destroy(&img->lock);
	pthread_mutex_destroy(&img->flush_lock);
	pthread_mutex_destroy(&img->err_lock);
	pthread_cond_destroy(&img->inflight_done);
	pthread_cond_destroy(&img->truncate_done);
	pthread_cond_destroy(&img->recycler_wake);
	pthread_cond_destroy(&img->compact_done);
	qcow_free(img);
}

static int load_tables(struct qcow_image *img, char *err, size_t errlen)
{
	uint64_t cs = img->cluster_size;
	uint64_t l1_clusters = ((uint64_t)img->hdr.l1_size * 8 + cs - 1) / cs;
	img->l1_capacity = (uint32_t)(l1_clusters * cs / 8);
	img->l1 = qcow_calloc(img->l1_capacity ? img->l1_capacity : 1, 8);
	img->reftable_entries = (uint64_t)img->hdr.refcount_table_clusters * cs / 8;
	img->reftable = qcow_calloc(img->reftable_entries, 8);
	if (!img->l1 || !img->reftable || qcow_bitmap_init(&img->l1_dirty, l1_clusters ? l1_clusters : 1) ||
	    qcow_bitmap_init(&img->reftable_dirty, img->hdr.refcount_table_clusters))
		return -ENOMEM;
	uint8_t *buf = qcow_malloc(img->reftable_entries * 8 > (uint64_t)img->hdr.l1_size * 8 ?
				   img->reftable_entries * 8 : (uint64_t)img->hdr.l1_size * 8 + 8);
	if (!buf)
		return -ENOMEM;
	int ret = img->io->ops->pread(img->io, buf, (size_t)img->hdr.l1_size * 8, img->hdr.l1_table_offset);
	for (uint32_t i = 0; ret == 0 && i < img->hdr.l1_size; i++)
		img->l1[i] = qcow_get_be64(buf + (size_t)i * 8);
	if (ret == 0)
		ret = img->io->ops->pread(img->io, buf, img->reftable_entries * 8, img->hdr.refcount_table_offset);
	for (uint64_t i = 0; ret == 0 && i < img->reftable_entries; i++)
		img->reftable[i] = qcow_get_be64(buf + i * 8) & QCOW_REFT_OFFSET_MASK;
	qcow_free(buf);
	if (ret)
		qcow_set_error(err, errlen, "cannot read the L1 or refcount table: %s", strerror(-ret));
	return ret;
}

static bool probe_punch(struct qcow_io *io)
{
	/* a punch past the end of the file changes nothing but tells
	 * whether the file system can punch at all */
	int64_t sz = io->ops->size(io);
	return io->ops->punch(io, (uint64_t)(sz > 0 ? sz : 0) + (1u << 20), 4096) == 0;
}

int qcow_image_open_io(struct qcow_io *io, const struct qcow_open_opts *opts_in,
		       struct qcow_image **out, char *err, size_t errlen)
{
	struct qcow_open_opts opts;
	if (opts_in)
		opts = *opts_in;
	else
		qcow_open_opts_default(&opts);
	struct qcow_image *img = qcow_calloc(1, sizeof(*img));
	if (!img)
		return -ENOMEM;
	img->io = io;
	img->opts = opts;
	img->read_only = opts.read_only;
	pthread_mutex_init(&img->lock, NULL);
	pthread_mutex_init(&img->flush_lock, NULL);
	pthread_mutex_init(&img->err_lock, NULL);
	pthread_cond_init(&img->inflight_done, NULL);
	pthread_cond_init(&img->truncate_done, NULL);
	pthread_cond_init(&img->recycler_wake, NULL);
	pthread_cond_init(&img->compact_done, NULL);
	img->inflight_head.next = img->inflight_head.prev = &img->inflight_head;
	img->compact_progress = 1.0;

	int ret = qcow_header_read(io, &img->hdr, err, errlen);
	if (ret)
		goto fail;
	if (!img->read_only && (img->hdr.incompatible_features & QCOW_INCOMPAT_CORRUPT)) {
		qcow_set_error(err, errlen, "image is marked corrupt (incompatible feature bit 1 at header offset 72); "
			       "repair it with 'qemu-img check -r all' or mount it with -o ro");
		ret = -EACCES;
		goto fail;
	}
	img->cluster_bits = img->hdr.cluster_bits;
	img->cluster_size = 1ull << img->cluster_bits;
	img->l2_bits = img->cluster_bits - 3;
	img->rb_shift = img->cluster_bits + 3 - img->hdr.refcount_order;
	img->virtual_size = img->hdr.size;
	ret = load_tables(img, err, errlen);
	if (ret)
		goto fail;

	uint64_t file_clusters = (img->hdr.file_size + img->cluster_size - 1) >> img->cluster_bits;
	ret = qcow_map_init(&img->map, file_clusters, img->rb_shift);
	if (ret)
		goto fail_nomem;
	img->map.first_movable = 1;
	img->map.runtime_asserts = opts.runtime_asserts;
	struct build_ctx b = { .img = img, .err = err, .errlen = errlen };
	if (qcow_bitmap_init(&b.fixed, file_clusters))
		goto fail_nomem;
	struct qcow_scan_geometry g = { .io = io, .hdr = &img->hdr, .file_clusters = file_clusters };
	struct qcow_scan_visitor v = { .visit = build_visit, .opaque = &b };
	ret = qcow_scan(&g, &v, err, errlen);
	qcow_bitmap_free(&b.fixed);
	if (ret)
		goto fail;
	/* whatever nothing references is junk: it may hold anything */
	for (uint64_t c = qcow_map_lowest_available(&img->map); c != UINT64_MAX && c < file_clusters;
	     c = qcow_bitmap_next(&img->map.available, c + 1))
		qcow_map_set_state(&img->map, c, QCS_JUNK);
	/* a fresh map has nothing to write until the comparison says so */
	for (uint64_t i = 0; i < img->map.rc_dirty.nbits; i++)
		qcow_bitmap_clear(&img->map.rc_dirty, i);

	size_t cache_bytes = opts.cache_bytes ? opts.cache_bytes : QCOW_DEFAULT_CACHE_BYTES;
	if (qcow_cache_init(&img->cache, cache_bytes / img->cluster_size, img->cluster_size))
		goto fail_nomem;

	if (!img->read_only) {
		int64_t diff = qcow_refcounts_compare(img);
		if (diff < 0) {
			ret = (int)diff;
			qcow_set_error(err, errlen, "cannot read the refcount blocks: %s", strerror(-ret));
			goto fail;
		}
		bool repair = diff > 0;
		if (diff > 0)
			qcow_logf(QCOW_LOG_INFO, "%s: %" PRId64 " refcounts differ from the references%s; repairing",
				  io->name, diff, (img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY) ? " (image was dirty)" : "");
		if (img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY) {
			img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
			img->header_dirty = repair = true;
		}
		if (img->hdr.autoclear_features) {
			/* we keep no bitmaps or raw external data consistent */
			img->hdr.autoclear_features = 0;
			img->header_dirty = repair = true;
		}
		if (repair) {
			pthread_mutex_lock(&img->flush_lock);
			ret = qcow_flush_holding_flush_lock(img);
			pthread_mutex_unlock(&img->flush_lock);
			if (ret) {
				qcow_set_error(err, errlen, "cannot repair the image: %s", strerror(-ret));
				goto fail;
			}
		}
		img->punch_supported = probe_punch(io);
		if (opts.recycler) {
			ret = qcow_recycler_start(img);
			if (ret)
				goto fail;
		}
	}
	*out = img;
	return 0;
fail_nomem:
	ret = -ENOMEM;
	qcow_set_error(err, errlen, "out of memory while opening the image");
fail:
	img->io = NULL;
	image_free(img);
	return ret;
}

int qcow_image_open(const char *path, const struct qcow_open_opts *opts_in, struct qcow_image **out,
		    char *err, size_t errlen)
{
	struct qcow_open_opts opts;
	if (opts_in)
		opts = *opts_in;
	else
		qcow_open_opts_default(&opts);
	struct qcow_io *io;
	int ret = qcow_io_file_open(path, opts.read_only, &io);
	if (ret) {
		qcow_set_error(err, errlen, "%s", strerror(-ret));
		return ret;
	}
	if (!opts.no_locking && io->ops->lock) {
		ret = io->ops->lock(io, opts.read_only, err, errlen);
		if (ret) {
			qcow_io_close(io);
			return ret;
		}
	}
	ret = qcow_image_open_io(io, &opts, out, err, errlen);
	if (ret)
		qcow_io_close(io);
	return ret;
}

int qcow_image_close(struct qcow_image *img)
{
	int ret = 0;
	if (!img)
		return 0;
	qcow_recycler_stop(img);
	if (!img->read_only) {
		pthread_mutex_lock(&img->flush_lock);
		/* two flushes: the first completes moves whose pointers were
		 * rewritten, the second writes the refcounts that frees */
		ret = qcow_flush_holding_flush_lock(img);
		pthread_mutex_lock(&img->lock);
		qcow_retire_moves(img);
		pthread_mutex_unlock(&img->lock);
		int r = qcow_flush_holding_flush_lock(img);
		if (!ret)
			ret = r;
		if (!ret)
			ret = qcow_truncate_tail(img);
		if (!ret)
			ret = img->io->ops->flush(img->io);
		pthread_mutex_unlock(&img->flush_lock);
		int failed = qcow_health_failed(img);
		if (failed)
			ret = failed;
	}
	qcow_io_close(img->io);
	img->io = NULL;
	image_free(img);
	return ret;
}
