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
 * up into it.  Unallocated clusters read through the backing chain: the
 * backing image's own qcow_image_read (another image, read-only, whose
 * locks nest inside ours) or its raw file.  Rules (doc/design.md, "guest I/O" and "Zeroed space"; lock
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
 *  - Guest data goes through img->data_io: the external data file
 *    (qcow_datafile.c: a new cluster sits at its guest offset, outside the
 *    map; whole clusters released are punched there after a grace
 *    period), or the image itself.
 *  - Extended L2 entries (doc/design.md, "Extended L2 entries"): reads,
 *    writes, discards and seeks go by subcluster (qcow_subcluster.h); a
 *    write that changes the subcluster bitmap claims the guest cluster like
 *    a write into a new cluster, and the bitmap change is its link.
 */
#include "config.h"
#include "qcow_internal.h"
#include "qcow_subcluster.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define DISCARD_BATCH_CLUSTERS 4096u
/* zeros written as data (version 2 over a backing file): clusters per write */
#define ZERO_WRITE_CLUSTERS 256u

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
	/* with a data file, COPIED and offset 0: allocated at host offset 0 */
	if ((e & QCOW_OFLAG_COPIED) && qcow_datafile_present(img))
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
	return img->data_io->ops->pread(img->data_io, buf, img->cluster_size, e & QCOW_L2E_OFFSET_MASK);
}

/* ---- extended L2 entries: subclusters ------------------------------------ */

/* log2 of the subcluster size (32 subclusters per cluster). */
static unsigned sc_bits(const struct qcow_image *img)
{
	return img->cluster_bits - 5;
}

/* A bitmap the spec calls corrupt: the request fails with EIO, as QEMU's
 * does (a read-write open refuses such an image already; a read-only one
 * reads what it can). */
static int sc_invalid(const struct qcow_image *img, uint64_t gc, uint64_t e, uint64_t bm)
{
	const char *bad = qcow_sc_invalid(e, bm);
	if (!bad)
		return 0;
	qcow_logf(QCOW_LOG_ERROR, "L2 entry of guest offset 0x%" PRIx64 " (0x%016" PRIx64 " 0x%016" PRIx64 "): %s",
		  gc << img->cluster_bits, e, bm, bad);
	return -EIO;
}

/* Adds the segments of [o, o+n) of guest cluster gc, a non-compressed
 * extended entry (e, bm), one per run of subclusters of one kind: data,
 * zeros, or the backing chain (zeros without one). */
static int segs_add_subclusters(struct qcow_image *img, struct seg_list *segs, uint64_t gc, uint64_t e,
				uint64_t bm, uint64_t o, uint64_t n, size_t buf_off)
{
	unsigned sb = sc_bits(img);
	int ret = sc_invalid(img, gc, e, bm);
	for (uint64_t x = o; x < o + n && ret == 0;) {
		unsigned k = (unsigned)(x >> sb);
		unsigned run = qcow_sc_run(e, bm, k, QCOW_SUBCLUSTERS);
		uint64_t end = ((uint64_t)(k + run) << sb) < o + n ? (uint64_t)(k + run) << sb : o + n;
		size_t len = (size_t)(end - x), at = buf_off + (size_t)(x - o);
		switch (qcow_sc_kind(e, bm, k)) {
		case QSC_DATA:
			ret = segs_add(segs, SEG_DATA, (e & QCOW_L2E_OFFSET_MASK) + x, 0, len, at);
			break;
		case QSC_UNALLOCATED:   /* the chain below, or zeros without one */
			ret = img->backing ? segs_add(segs, SEG_BACKING, (gc << img->cluster_bits) + x, 0, len, at)
					   : segs_add(segs, SEG_ZERO, 0, 0, len, at);
			break;
		case QSC_ZERO:
			ret = segs_add(segs, SEG_ZERO, 0, 0, len, at);
			break;
		default:
			ret = -EIO;
		}
		x = end;
	}
	return ret;
}

/* Reads what [o, o+n) of guest cluster gc with the non-compressed
 * extended entry (e, bm) shows into buf (no engine lock: the caller's
 * registration keeps the host cluster). */
static int read_subclusters(struct qcow_image *img, uint64_t gc, uint64_t e, uint64_t bm, uint8_t *buf, uint64_t o,
			    uint64_t n)
{
	struct seg_list segs;
	segs_init(&segs);
	int ret = segs_add_subclusters(img, &segs, gc, e, bm, o, n, 0);
	for (size_t i = 0; i < segs.n && ret == 0; i++) {
		struct seg *s = &segs.v[i];
		if (s->kind == SEG_ZERO)
			memset(buf + s->buf_off, 0, s->len);
		else if (s->kind == SEG_DATA)
			ret = img->io->ops->pread(img->io, buf + s->buf_off, s->len, s->host);
		else
			ret = backing_read(img, buf + s->buf_off, s->len, s->host);
	}
	segs_free(&segs);
	return ret;
}

/* Whether [o, o+n) of an extended entry reads zeros already (a zero
 * write there must not allocate). */
static bool subclusters_read_zero(const struct qcow_image *img, uint64_t e, uint64_t bm, uint64_t o, uint64_t n)
{
	if (e & QCOW_OFLAG_COMPRESSED)
		return false;
	for (unsigned k = (unsigned)(o >> sc_bits(img)); k <= (o + n - 1) >> sc_bits(img); k++) {
		enum qcow_sc_kind kind = qcow_sc_kind(e, bm, k);
		if (kind != QSC_ZERO && !(kind == QSC_UNALLOCATED && !img->backing))
			return false;
	}
	return true;
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
		uint64_t gc, o, e, bm;
		size_t n = cluster_piece(img, off + pos, len - pos, &gc, &o);
		ret = qcow_l2_lookup_bitmap(img, gc, &e, &bm);
		if (ret)
			break;
		if (qcow_extl2(img) && !(e & QCOW_OFLAG_COMPRESSED))
			ret = segs_add_subclusters(img, &segs, gc, e, bm, o, n, pos);
		else if (e & QCOW_OFLAG_COMPRESSED)
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
			ret = img->data_io->ops->pread(img->data_io, dst, s->len, s->host);
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
	/* extended L2 entries: the subcluster bitmap as resolved, and
	 * whether host is the entry's own cluster, written in place (the
	 * bitmap change is the link) */
	uint64_t old_bm;
	bool reuse;
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
		/* an own cluster stays where it is; a data file's clusters are
		 * not in the map: nothing to free */
		if (!p->nc[i].reuse && !qcow_datafile_present(img))
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
	/* data in a data file has no references (qcow_datafile.c); a
	 * released allocated entry's range there is punched by the caller
	 * (datafile_end_batch): one cluster freed */
	if (qcow_datafile_present(img)) {
		if (!overwrite && (e & QCOW_L2E_OFFSET_MASK))
			img->bytes_discard_freed += img->cluster_size;
		return;
	}
	if (!qcow_entry_clusters(img, e, &first, &last))
		return;
	for (uint64_t c = first; c <= last && c < img->map.nclusters; c++) {
		/* only a cluster that this pointer references is ours to drop */
		if (!qcow_map_has_ref(&img->map, c, slot))
			continue;
		qcow_map_move_cancel(&img->map, c);
		if (overwrite) {
			qcow_free_after_flush(img, c, slot);
			continue;
		}
		qcow_map_drop_ref(&img->map, c, slot);
		/* the stats count a host cluster once, when its last
		 * reference goes (a snapshot's or another compressed
		 * stream's keeps it) */
		if (qcow_map_refcount(&img->map, c) == 0)
			img->bytes_discard_freed += img->cluster_size;
	}
}

/* resolve_cluster with a data file (qcow_datafile.c): an allocated
 * cluster is written in place; any other is given its host cluster at its
 * guest offset, as QEMU places it, claimed, written whole (the data file
 * may hold anything there: zero-flagged data, an old discard that could
 * not punch) and linked later.  No map state: data clusters are not in it. */
static int resolve_in_data_file(struct qcow_image *img, struct write_plan *p, uint64_t gc, uint64_t e, uint64_t o,
				uint64_t n, size_t buf_off)
{
	if (!entry_unallocated(img, e) && !entry_is_zero(img, e))
		return segs_add(&p->in_place, SEG_DATA, (e & QCOW_L2E_OFFSET_MASK) + o, 0, n, buf_off);
	if (p->nnc == p->nc_cap && vec_grow((void **)&p->nc, &p->nc_cap, p->inline_nc, sizeof(*p->nc)))
		return -ENOMEM;
	int ret = qcow_claims_add(img, gc);
	if (ret)
		return ret;
	p->nc[p->nnc++] = (struct new_cluster){ .gc = gc, .host = gc, .old = e, .o = o, .n = n, .buf_off = buf_off,
						.fill = n != img->cluster_size };
	return 0;
}

/* resolve_cluster for an extended L2 entry (gc claimable, its table t
 * writable).  Subclusters that are all allocated in the entry's own
 * cluster (COPIED, one reference from this slot) are written in place as
 * now.  Anything else is claimed: written in place into the own cluster
 * too, but the bitmap change that makes the written subclusters
 * allocated is the link, after the data (invariant 8); or, with no own
 * cluster (unallocated, compressed, shared), into a new cluster that the
 * link points the entry at. */
static int resolve_subclusters(struct qcow_image *img, struct write_plan *p, struct qcow_cached *t, uint64_t gc,
			       uint64_t o, uint64_t n, size_t buf_off)
{
	uint64_t idx = gc & ((1ull << img->l2_bits) - 1);
	uint64_t e = qcow_l2_entry(img, t, idx), bm = qcow_l2_bitmap(img, t, idx);
	uint64_t slot = qcow_l2_slot(img, t->cluster, idx);
	uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	int ret = sc_invalid(img, gc, e, bm);
	if (ret)
		return ret;
	unsigned s0 = (unsigned)(o >> sc_bits(img)), s1 = (unsigned)((o + n - 1) >> sc_bits(img));
	uint64_t want = qcow_sc_range(s0, s1);
	bool own = !(e & QCOW_OFLAG_COMPRESSED) && h && (e & QCOW_OFLAG_COPIED) && h < img->map.nclusters &&
		   qcow_map_state(&img->map, h) == QCS_REF && qcow_map_slot(&img->map, h) == slot;
	if (own) {
		/* a move of this cluster would copy stale data */
		qcow_map_move_cancel(&img->map, h);
		if ((bm & want) == want)
			return segs_add(&p->in_place, SEG_DATA, (h << img->cluster_bits) + o, 0, n, buf_off);
	}
	if (p->nnc == p->nc_cap && vec_grow((void **)&p->nc, &p->nc_cap, p->inline_nc, sizeof(*p->nc)))
		return -ENOMEM;
	uint64_t c = h;
	if (!own && (ret = qcow_alloc_cluster(img, &c)))
		return ret;
	ret = qcow_claims_add(img, gc);
	if (ret) {
		if (!own)
			qcow_map_set_state(&img->map, c, QCS_AVAILABLE);
		return ret;
	}
	p->nc[p->nnc++] = (struct new_cluster){ .gc = gc, .host = c, .old = e, .old_bm = bm, .reuse = own, .o = o,
						.n = n, .buf_off = buf_off,
						/* a compressed cluster becomes a whole normal one */
						.fill = (e & QCOW_OFLAG_COMPRESSED) && n != img->cluster_size };
	return 0;
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
	if (qcow_extl2(img))
		return resolve_subclusters(img, p, t, gc, o, n, buf_off);
	uint64_t e = qcow_l2_entry(img, t, idx);
	uint64_t slot = qcow_l2_slot(img, t->cluster, idx);
	uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	bool zero = entry_reads_zero(img, e);
	if (qcow_datafile_present(img))
		return resolve_in_data_file(img, p, gc, e, o, n, buf_off);
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
			uint64_t e, bm;
			int ret = qcow_l2_lookup_bitmap(img, gc, &e, &bm);
			if (ret)
				return ret;
			if (qcow_extl2(img) ? subclusters_read_zero(img, e, bm, o, n) : entry_reads_zero(img, e)) {
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

/* The data I/O of one claimed extended-L2 cluster (not compressed), no
 * engine lock: the old entry's allocated subclusters outside the write
 * are copied when the data moves to a new cluster; a partially written
 * subcluster that the target does not hold yet is filled around the
 * piece from what it shows now (old data, zeros, or the backing chain);
 * whole unwritten subclusters are never written. */
static int write_subclusters(struct qcow_image *img, const void *buf, struct new_cluster *nc, uint8_t *cbuf)
{
	unsigned sb = sc_bits(img);
	uint64_t scs = 1ull << sb, host = nc->host << img->cluster_bits;
	uint64_t e = nc->old, bm = nc->old_bm, lo = nc->o, hi = nc->o + nc->n;
	unsigned s0 = (unsigned)(lo >> sb), s1 = (unsigned)((hi - 1) >> sb);
	int ret = 0;
	if (!nc->reuse && (e & QCOW_L2E_OFFSET_MASK)) {
		for (unsigned k = 0; k < QCOW_SUBCLUSTERS && ret == 0;) {
			unsigned run = qcow_sc_run(e, bm, k, QCOW_SUBCLUSTERS);
			if (qcow_sc_kind(e, bm, k) == QSC_DATA)
				for (unsigned j = k; j < k + run && ret == 0; j++) {
					if (j >= s0 && j <= s1)
						continue;   /* written (or filled) below */
					uint64_t at = (uint64_t)j << sb;
					ret = img->io->ops->pread(img->io, cbuf + at, scs, (e & QCOW_L2E_OFFSET_MASK) + at);
					if (ret == 0)
						ret = img->io->ops->pwrite(img->io, cbuf + at, scs, host + at);
				}
			k += run;
		}
	}
	/* the edges: filled whole, then the piece between them */
	uint64_t a = lo, b = hi;
	unsigned edges[2] = { s0, s1 };
	for (unsigned i = 0; i < (s0 == s1 ? 1u : 2u) && ret == 0; i++) {
		uint64_t slo = (uint64_t)edges[i] << sb, shi = slo + scs;
		if (lo <= slo && hi >= shi)
			continue;   /* written whole */
		if (nc->reuse && qcow_sc_kind(e, bm, edges[i]) == QSC_DATA)
			continue;   /* the own cluster holds the rest already */
		ret = read_subclusters(img, nc->gc, e, bm, cbuf + slo, slo, scs);
		if (ret)
			break;
		uint64_t plo = lo > slo ? lo : slo, phi = hi < shi ? hi : shi;
		if (buf)
			memcpy(cbuf + plo, (const uint8_t *)buf + nc->buf_off + (plo - lo), phi - plo);
		else
			memset(cbuf + plo, 0, phi - plo);
		ret = img->io->ops->pwrite(img->io, cbuf + slo, scs, host + slo);
		if (i == 0 && edges[i] == s0)
			a = shi < hi ? shi : hi;
		if (edges[i] == s1)
			b = slo > lo ? slo : lo;
	}
	if (ret == 0 && a < b)
		ret = buf ? img->io->ops->pwrite(img->io, (const uint8_t *)buf + nc->buf_off + (a - lo), b - a, host + a)
			  : qcow_io_write_zeros(img->io, host + a, b - a);
	return ret;
}

/* The data I/O of a resolved write, with no engine lock. */
static int write_data(struct qcow_image *img, const void *buf, struct write_plan *p)
{
	uint64_t cs = img->cluster_size;
	uint8_t *cbuf = NULL;
	int ret = 0;
	for (size_t i = 0; i < p->in_place.n && ret == 0; i++) {
		struct seg *s = &p->in_place.v[i];
		ret = buf ? img->data_io->ops->pwrite(img->data_io, (const uint8_t *)buf + s->buf_off, s->len, s->host)
			  : qcow_io_write_zeros(img->data_io, s->host, s->len);
	}
	for (size_t i = 0; i < p->nnc && ret == 0; i++) {
		struct new_cluster *nc = &p->nc[i];
		uint64_t host = nc->host << img->cluster_bits;
		if (qcow_extl2(img) && !(nc->old & QCOW_OFLAG_COMPRESSED)) {
			if (!cbuf && !(cbuf = qcow_malloc(cs))) {
				ret = -ENOMEM;
				break;
			}
			ret = write_subclusters(img, buf, nc, cbuf);
			continue;
		}
		if (!nc->fill) {
			/* the new cluster reads zeros around the piece (invariant 2) */
			ret = buf ? img->data_io->ops->pwrite(img->data_io, (const uint8_t *)buf + nc->buf_off, nc->n, host + nc->o)
				  : qcow_io_write_zeros(img->data_io, host + nc->o, nc->n);
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
		ret = img->data_io->ops->pwrite(img->data_io, cbuf, cs, host);
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
		if (!t || qcow_l2_entry(img, t, idx) != nc->old || qcow_l2_bitmap(img, t, idx) != nc->old_bm) {
			give_back(img, p, i, true);
			return t ? -EAGAIN : ret;
		}
		uint64_t slot = qcow_l2_slot(img, t->cluster, idx);
		if (qcow_extl2(img)) {
			/* the written subclusters become allocated; a compressed
			 * cluster was rewritten whole */
			unsigned sb = sc_bits(img);
			uint64_t bm = (nc->old & QCOW_OFLAG_COMPRESSED) ? QCOW_SC_ALLOC_ALL :
				      qcow_sc_written(nc->old_bm, (unsigned)(nc->o >> sb), (unsigned)((nc->o + nc->n - 1) >> sb));
			qcow_l2_set_bitmap(img, t, idx, bm);
		}
		if (!nc->reuse) {
			release_entry(img, nc->old, slot, true);
			qcow_l2_set_entry(img, t, idx, (nc->host << img->cluster_bits) | QCOW_OFLAG_COPIED);
			if (!qcow_datafile_present(img))   /* its clusters are not in the map */
				qcow_map_set_ref(&img->map, nc->host, slot);
		}
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
	/* A flush, resize or compaction step holding flush_lock writes the
	 * cache soon enough; a resize that writes through this path holds it
	 * itself (and would wait for itself). */
	if (over && pthread_mutex_trylock(&img->flush_lock) == 0) {
		(void)qcow_flush_holding_flush_lock(img);   /* errors are noted by the flush itself */
		pthread_mutex_unlock(&img->flush_lock);
	}
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

static int unmap_clusters(struct qcow_image *img, uint64_t gc, uint64_t count);

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
		uint64_t e, bm;
		int ret = qcow_l2_lookup_bitmap(img, g, &e, &bm);
		if (ret)
			return ret;
		if (qcow_extl2(img)) {
			/* no zero flag: the cluster is released and its
			 * subclusters read zeros by their bits (unmap_clusters) */
			if (subclusters_read_zero(img, e, bm, 0, img->cluster_size))
				continue;
			if (l1i >= img->hdr.l1_size)
				break;
			ret = unmap_clusters(img, g, 1);
			if (ret)
				return ret;
			continue;
		}
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
		e = qcow_l2_entry(img, t, idx);
		uint64_t slot = qcow_l2_slot(img, t->cluster, idx);
		uint64_t h = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
		uint64_t ne;
		if (!unmap && !(e & QCOW_OFLAG_COMPRESSED) && h && h < img->map.nclusters && !qcow_datafile_present(img) &&
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

/* With a data file, a batch of whole clusters whose entries are about to
 * read zeros (img->lock held): claims them, so no write refills them
 * before their range of the data file is punched (datafile_end_batch).
 * 1: claimed, 0: no data file, -errno. */
static int datafile_begin_batch(struct qcow_image *img, uint64_t gc, uint64_t n)
{
	uint64_t w;
	int ret;
	if (!qcow_datafile_present(img))
		return 0;
	while ((ret = qcow_datafile_claim(img, gc, n, &w)) == -EAGAIN)
		qcow_claims_wait(img, w);
	return ret ? ret : 1;
}

/* Ends what datafile_begin_batch began (called with img->lock held, returns
 * without it): after the entries changed (ret 0) the range is punched once
 * the requests that resolved through them are done; else the claims go. */
static int datafile_end_batch(struct qcow_image *img, int claimed, int ret, uint64_t gc, uint64_t n)
{
	if (claimed != 1) {
		qcow_unlock(img);
		return ret;
	}
	if (ret) {
		for (uint64_t g = gc; g < gc + n; g++)
			qcow_claims_drop(img, g);
		qcow_unlock(img);
		return ret;
	}
	uint64_t ticket = qcow_inflight_ticket(img);
	qcow_unlock(img);
	return qcow_datafile_release(img, gc, n, ticket);
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
		int claimed = datafile_begin_batch(img, gc, n);
		ret = claimed < 0 ? claimed : 0;
		if (ret == 0)
			while ((ret = zero_clusters_locked(img, gc, n, may_unmap)) == -EAGAIN)
				qcow_alloc_wait_truncation(img);
		if (may_unmap && ret == 0) {
			img->bytes_discard_requested += n * img->cluster_size;
			img->last_discard_ms = qcow_now_ms();
		}
		bool over = qcow_cache_over_budget(&img->cache);
		ret = datafile_end_batch(img, claimed, ret, gc, n);
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
		uint64_t e, bm;
		int ret = qcow_l2_lookup_bitmap(img, g, &e, &bm);
		if (ret)
			return ret;
		/* extended L2: no zero flag, all 32 zero bits instead */
		uint64_t zbm = qcow_extl2(img) && img->backing ? QCOW_SC_ZERO_ALL : 0;
		if (e == (qcow_extl2(img) ? 0 : zero_entry(img)) && bm == zbm)
			continue;
		struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
		if (!t)
			return ret;
		e = qcow_l2_entry(img, t, idx);
		release_entry(img, e, qcow_l2_slot(img, t->cluster, idx), false);
		if (qcow_extl2(img)) {
			qcow_l2_set_entry(img, t, idx, 0);
			qcow_l2_set_bitmap(img, t, idx, zbm);
			continue;
		}
		/* no backing file: an unallocated cluster reads zeros in both
		 * versions, and it frees the most; with one, the zero flag keeps
		 * the backing data from showing through (version 3 only: the
		 * caller writes zeros on version 2) */
		qcow_l2_set_entry(img, t, idx, zero_entry(img));
	}
	return 0;
}

/* Discards (or zeroes) subclusters [o1, o2) of guest cluster gc, a part
 * of the cluster (img->lock held): their allocation bits go and, when a
 * backing file could show through, their zero bits are set; a cluster
 * left with no allocated subcluster releases its host cluster (as a
 * discard) - the sub-cluster reclaim.  -ENOTSUP: a compressed cluster
 * (the caller writes the zeros); -EAGAIN as unmap_clusters. */
static int clear_subclusters_locked(struct qcow_image *img, uint64_t gc, uint64_t o1, uint64_t o2)
{
	qcow_assert_locked(img);
	uint64_t l1i = gc >> img->l2_bits, idx = gc & ((1ull << img->l2_bits) - 1);
	uint64_t e, bm;
	if (l1i >= img->hdr.l1_size)
		return 0;
	int ret = qcow_l2_lookup_bitmap(img, gc, &e, &bm);
	if (ret)
		return ret;
	if (e & QCOW_OFLAG_COMPRESSED)
		return -ENOTSUP;
	if (subclusters_read_zero(img, e, bm, o1, o2 - o1))
		return 0;   /* no table is allocated for nothing */
	struct qcow_cached *t = qcow_l2_for_write(img, l1i, &ret);
	if (!t)
		return ret;
	e = qcow_l2_entry(img, t, idx);
	bm = qcow_l2_bitmap(img, t, idx);
	if ((ret = sc_invalid(img, gc, e, bm)))
		return ret;
	unsigned sb = sc_bits(img);
	uint64_t nb = qcow_sc_cleared(bm, (unsigned)(o1 >> sb), (unsigned)((o2 - 1) >> sb), img->backing != NULL);
	if (!(nb & QCOW_SC_ALLOC_ALL) && (e & QCOW_L2E_OFFSET_MASK)) {
		release_entry(img, e, qcow_l2_slot(img, t->cluster, idx), false);
		qcow_l2_set_entry(img, t, idx, 0);
	}
	if (nb != bm)
		qcow_l2_set_bitmap(img, t, idx, nb);
	return 0;
}

/* Writes zeros over the parts of [off, off+len) outside whole units (a
 * power of two: clusters or subclusters), and gives the whole units'
 * range [*first, *last).  The disk's last unit may be partial: reaching
 * the end of the disk covers it whole.  1 when no whole unit is left
 * (everything written), 0, or -errno. */
static int zero_partial_ends(struct qcow_image *img, uint64_t off, uint64_t len, uint64_t unit, uint64_t *first,
			     uint64_t *last)
{
	uint64_t end = off + len;
	*first = (off + unit - 1) & ~(unit - 1);
	*last = end == img->virtual_size ? (end + unit - 1) & ~(unit - 1) : end & ~(unit - 1);
	if (*first >= *last) {   /* inside one unit */
		ssize_t w = write_common(img, NULL, (size_t)len, off);
		return w < 0 ? (int)w : 1;
	}
	if (*first > off) {
		ssize_t w = write_common(img, NULL, (size_t)(*first - off), off);
		if (w < 0)
			return (int)w;
	}
	if (end > *last) {
		ssize_t w = write_common(img, NULL, (size_t)(end - *last), *last);
		if (w < 0)
			return (int)w;
	}
	return 0;
}

/* discard_common for extended L2 entries: whole clusters are unmapped,
 * whole subclusters cleared by their bits, and only the pieces smaller
 * than a subcluster at the ends are written as zeros. */
static int discard_subclusters(struct qcow_image *img, uint64_t off, uint64_t len)
{
	uint64_t cs = img->cluster_size, a, b;
	int ret = zero_partial_ends(img, off, len, 1ull << sc_bits(img), &a, &b);
	if (ret)
		return ret > 0 ? 0 : ret;
	for (uint64_t gc = a >> img->cluster_bits; gc << img->cluster_bits < b && ret == 0;) {
		uint64_t cl = gc << img->cluster_bits;
		uint64_t o1 = (a > cl ? a : cl) - cl, o2 = (b < cl + cs ? b : cl + cs) - cl;
		uint64_t n = 1;
		qcow_lock(img);
		if (o1 == 0 && o2 == cs) {
			/* whole clusters, in batches so guest I/O is never held off long */
			n = (b >> img->cluster_bits) - gc;
			if (n > DISCARD_BATCH_CLUSTERS)
				n = DISCARD_BATCH_CLUSTERS;
			if (n == 0)
				n = 1;
			while ((ret = unmap_clusters(img, gc, n)) == -EAGAIN)
				qcow_alloc_wait_truncation(img);
		} else {
			while ((ret = clear_subclusters_locked(img, gc, o1, o2)) == -EAGAIN)
				qcow_alloc_wait_truncation(img);
		}
		img->bytes_discard_requested += n == 1 ? o2 - o1 : n * cs;
		img->last_discard_ms = qcow_now_ms();
		bool over = qcow_cache_over_budget(&img->cache);
		qcow_unlock(img);
		if (ret == -ENOTSUP) {
			ssize_t w = write_common(img, NULL, (size_t)(o2 - o1), cl + o1);
			ret = w < 0 ? (int)w : 0;
		} else if (ret == 0) {
			maybe_autoflush(img, over);
		}
		gc += n;
	}
	qcow_recycler_kick(img);
	return ret;
}

/* Makes [off, off+len) read zeros: partial clusters at the ends are
 * written as zeros, whole ones released (release: a discard) or
 * zero-flagged with nothing new allocated but L2 tables (a grow over a
 * backing file). */
static int clear_range(struct qcow_image *img, uint64_t off, uint64_t len, bool release)
{
	if (qcow_extl2(img))
		return discard_subclusters(img, off, len);
	uint64_t cs = img->cluster_size, end = off + len, first, last;
	int ret = 0;
	if (img->backing && img->hdr.version < 3) {
		/* no zero flag, and an unmapped cluster would show the backing
		 * file: zeros are written, as QEMU's write-zeroes does, in
		 * pieces of ZERO_WRITE_CLUSTERS (a whole-disk fstrim would
		 * otherwise resolve millions of clusters in one plan) */
		for (uint64_t pos = off; pos < end && ret == 0;) {
			uint64_t n = end - pos < ZERO_WRITE_CLUSTERS * cs ? end - pos : ZERO_WRITE_CLUSTERS * cs;
			ssize_t w = write_common(img, NULL, (size_t)n, pos);
			ret = w < 0 ? (int)w : 0;
			pos += n;
		}
		return ret;
	}
	if ((ret = zero_partial_ends(img, off, len, cs, &first, &last)))
		return ret > 0 ? 0 : ret;
	if (!release)
		return zero_whole_clusters(img, first >> img->cluster_bits, (last - first) >> img->cluster_bits, false);
	/* whole clusters, in batches so guest I/O is never held off long */
	for (uint64_t gc = first >> img->cluster_bits; gc < last >> img->cluster_bits && ret == 0;) {
		uint64_t n = (last >> img->cluster_bits) - gc;
		if (n > DISCARD_BATCH_CLUSTERS)
			n = DISCARD_BATCH_CLUSTERS;
		qcow_lock(img);
		int claimed = datafile_begin_batch(img, gc, n);
		ret = claimed < 0 ? claimed : 0;
		if (ret == 0)
			while ((ret = unmap_clusters(img, gc, n)) == -EAGAIN)
				qcow_alloc_wait_truncation(img);
		img->bytes_discard_requested += n * cs;
		img->last_discard_ms = qcow_now_ms();
		bool over = qcow_cache_over_budget(&img->cache);
		ret = datafile_end_batch(img, claimed, ret, gc, n);
		if (ret == 0)
			maybe_autoflush(img, over);
		gc += n;
	}
	qcow_recycler_kick(img);
	return ret;
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
	return clear_range(img, off, len, true);
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

/* Whether guest cluster gc shows the backing chain: unallocated here
 * (no L2 table, or an unallocated entry) with a chain below
 * (img->lock held). */
static int shows_backing(struct qcow_image *img, uint64_t gc, bool *out)
{
	*out = false;
	if (!img->backing)
		return 0;
	uint64_t e, bm;
	int ret = qcow_l2_lookup_bitmap(img, gc, &e, &bm);
	if (ret == 0)   /* extended L2: every subcluster unallocated (bm 0) */
		*out = entry_unallocated(img, e) && bm == 0;
	return ret;
}

/* SEEK_DATA/SEEK_HOLE over the backing chain for the guest bytes
 * [pos, end) that show it: *found gets the first offset there that is data
 * (want_data) or a hole, or -1 for none.  Past the end of the backing
 * file is a hole.  img->lock held: the chain's locks nest inside ours (the
 * chain only goes down).  0 or -errno. */
static int backing_seek(struct qcow_image *img, uint64_t pos, uint64_t end, bool want_data, int64_t *found)
{
	struct qcow_backing *b = img->backing;
	uint64_t bend = b->size < end ? b->size : end;
	/* nothing of the chain's in [pos, end): a hole up to the end */
	int64_t none = want_data ? -1 : (bend < end ? (int64_t)(pos > bend ? pos : bend) : -1);
	*found = none;
	if (pos >= bend)
		return 0;
	if (!b->img) {   /* a raw file: all data */
		if (want_data)
			*found = (int64_t)pos;
		return 0;
	}
	int64_t r = qcow_image_seek(b->img, pos, want_data ? SEEK_DATA : SEEK_HOLE);
	if (r == -ENXIO)
		return 0;
	if (r < 0)
		return (int)r;
	if ((uint64_t)r < bend)
		*found = r;
	return 0;
}

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
		bool through;
		if ((ret = shows_backing(img, gc, &through)))
			break;
		if (through) {
			/* a run of clusters that show the chain: one question to it */
			uint64_t end = gc + 1;
			while (end < nclusters && (end - gc) < (1ull << img->l2_bits)) {
				bool more;
				if ((ret = shows_backing(img, end, &more)) || !more)
					break;
				end++;
			}
			if (ret)
				break;
			uint64_t pos = gc << img->cluster_bits;
			if (pos < off)
				pos = off;
			uint64_t end_off = end << img->cluster_bits;
			if (end_off > img->virtual_size)
				end_off = img->virtual_size;
			int64_t r;
			if ((ret = backing_seek(img, pos, end_off, want_data, &r)))
				break;
			if (r >= 0)
				result = r;
			gc = end;
			continue;
		}
		if (l1i < img->hdr.l1_size && !(img->l1[l1i] & QCOW_L1E_OFFSET_MASK)) {
			if (!want_data) {
				result = (int64_t)(gc << img->cluster_bits);
				break;
			}
			gc = (l1i + 1) << img->l2_bits;
			continue;
		}
		uint64_t e, bm;
		ret = qcow_l2_lookup_bitmap(img, gc, &e, &bm);
		if (ret)
			break;
		if (qcow_extl2(img) && !(e & QCOW_OFLAG_COMPRESSED)) {
			/* subcluster granularity, from the one holding off */
			unsigned k0 = gc == off >> img->cluster_bits ?
				      (unsigned)((off & (img->cluster_size - 1)) >> sc_bits(img)) : 0;
			for (unsigned k = k0; k < QCOW_SUBCLUSTERS && result < 0 && ret == 0; k++) {
				enum qcow_sc_kind kind = qcow_sc_kind(e, bm, k);
				uint64_t at = (gc << img->cluster_bits) + ((uint64_t)k << sc_bits(img));
				if (kind == QSC_UNALLOCATED && img->backing) {
					/* a run that shows the chain: ask it */
					unsigned run = qcow_sc_run(e, bm, k, QCOW_SUBCLUSTERS);
					uint64_t end_off = at + ((uint64_t)run << sc_bits(img));
					int64_t r;
					if (end_off > img->virtual_size)
						end_off = img->virtual_size;
					ret = backing_seek(img, at < off ? off : at, end_off, want_data, &r);
					if (ret == 0 && r >= 0)
						result = r;
					k += run - 1;
					continue;
				}
				bool data = kind == QSC_DATA || kind == QSC_INVALID;
				if (data == want_data)
					result = (int64_t)at;
			}
			if (ret)
				break;
			gc++;
			continue;
		}
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
		/* freed by the shrink (no snapshot can share it here: a shrink
		 * is refused with snapshots; the check keeps the stats right
		 * anyway) */
		if (qcow_map_refcount(&img->map, l2) == 1)
			img->bytes_discard_freed += img->cluster_size;
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
		/* (with a data file, their range there is punched) */
		int claimed = datafile_begin_batch(img, gc, n);
		ret = claimed < 0 ? claimed : 0;
		if (ret == 0)
			while ((ret = unmap_clusters(img, gc, n)) == -EAGAIN)
				qcow_alloc_wait_truncation(img);
		ret = datafile_end_batch(img, claimed, ret, gc, n);
		gc += n;
	}
	if (ret)
		return ret;
	qcow_lock(img);
	drop_l2_tables(img, l1_need);
	/* for the recycler, as a discard (it trims the free tail after one) */
	img->bytes_discard_requested += (last - (tail_end >> img->cluster_bits)) * cs;
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
		/* a raw data file is cut with the disk, once nothing past
		 * the end is in use */
		if (ret == 0)
			ret = qcow_datafile_resize(img, new_size);
		goto out;
	}
	/* a raw data file grows with the disk, before the disk does */
	ret = qcow_datafile_resize(img, new_size);
	if (ret)
		goto out;
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
		uint64_t old_size = img->virtual_size;
		qcow_lock(img);
		img->hdr.size = new_size;
		img->virtual_size = new_size;
		img->header_dirty = true;
		qcow_unlock(img);
		/* A backing file longer than the old disk would show its data
		 * in the new part: zeros there, as QEMU's truncate does. */
		uint64_t bsize = img->backing ? img->backing->size : 0;
		if (bsize > old_size)
			ret = clear_range(img, old_size, (bsize < new_size ? bsize : new_size) - old_size, false);
		if (ret == 0)
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
	int64_t reclaimed = __atomic_load_n(&img->bytes_reclaimed, __ATOMIC_RELAXED);
	st->bytes_reclaimed = reclaimed > 0 ? (uint64_t)reclaimed : 0;
	st->bytes_discarded = img->bytes_discard_freed;
	st->bytes_discard_requested = img->bytes_discard_requested;
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
