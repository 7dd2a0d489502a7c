/*
 * qcow_imgmap.c - what `qcowctl map` shows: the guest-to-host mapping of
 * an image (block status, as qemu-img map reports it) and a per-cell
 * summary of the cluster map (the picture of the image file).
 *
 * Owns: qcow_image_map_extent, qcow_image_picture.
 *
 * Rules:
 *  - Read only: nothing here changes the image, the map or a table.
 *  - The mapping follows QEMU's block status for qcow2 (block/qcow2.c and
 *    the generic rules of block/io.c), so that qcowctl map --output=json
 *    equals qemu-img map --output=json after the same merging: a cluster
 *    (or subcluster) with data is allocated at its host offset, a
 *    zero-flagged one reads zeros (with its offset when it keeps a host
 *    cluster), a compressed one is data without an offset, and an
 *    unallocated one is asked of the backing chain (one level deeper), or
 *    reads zeros without one or past the backing file's end.  A raw
 *    backing file is data where it has data and zeros in its holes.
 *  - img->lock is held only while one extent or one cell is worked out,
 *    so a live mount's guests wait at most that long; the backing chain
 *    is asked with our lock released (its own locks nest inside nothing
 *    of ours then).
 *  - Bad image data never aborts: an L2 table that cannot be read is an
 *    error returned to the caller.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "qcow_internal.h"
#include "qcow_subcluster.h"

/* ---- the guest-to-host mapping ----------------------------------------- */

/* The status of one piece (a cluster or a run of subclusters). */
struct piece {
	bool unallocated;   /* shows the backing chain (or zeros without one) */
	bool zero, data, compressed, has_offset;
	uint64_t offset;    /* host offset of the piece's first byte */
	uint64_t len;
};

static bool pieces_join(const struct piece *a, const struct piece *b)
{
	if (a->unallocated != b->unallocated || a->zero != b->zero || a->data != b->data ||
	    a->compressed != b->compressed || a->has_offset != b->has_offset)
		return false;
	return !a->has_offset || a->offset + a->len == b->offset;
}

/* A non-extended (or compressed) L2 entry e of a whole cluster. */
static void entry_piece(const struct qcow_image *img, uint64_t e, struct piece *p)
{
	uint64_t host = e & QCOW_L2E_OFFSET_MASK;
	bool dfile = qcow_datafile_present(img);
	memset(p, 0, sizeof(*p));
	if (e & QCOW_OFLAG_COMPRESSED) {
		p->data = p->compressed = true;
		return;
	}
	/* with a data file, COPIED and offset 0 is a cluster at host offset 0 */
	bool has_host = host != 0 || (dfile && (e & QCOW_OFLAG_COPIED));
	if (img->hdr.version >= 3 && (e & QCOW_OFLAG_ZERO)) {
		p->zero = true;
	} else if (has_host) {
		p->data = true;
	} else {
		p->unallocated = true;
	}
	if (has_host) {
		p->has_offset = true;
		p->offset = host;
	}
}

/* Subcluster k of the extended entry (e, bm); invalid bitmaps read as
 * data, as the read path reports them (EIO) only when read. */
static void subcluster_piece(const struct qcow_image *img, uint64_t e, uint64_t bm, unsigned k, struct piece *p)
{
	uint64_t host = e & QCOW_L2E_OFFSET_MASK;
	unsigned scb = img->cluster_bits - 5;
	memset(p, 0, sizeof(*p));
	switch (qcow_sc_kind(e, bm, k)) {
	case QSC_ZERO:
		p->zero = true;
		break;
	case QSC_UNALLOCATED:
		p->unallocated = true;
		break;
	default:
		p->data = true;
		break;
	}
	if (host || (qcow_datafile_present(img) && (e & QCOW_OFLAG_COPIED))) {
		p->has_offset = true;
		p->offset = host + ((uint64_t)k << scb);
	}
}

/* The run of pieces of the same status from guest offset off (at most
 * max_len bytes), into *run.  img->lock held. */
static int first_run(struct qcow_image *img, uint64_t off, uint64_t max_len, struct piece *run)
{
	uint64_t cs = img->cluster_size, end = off + max_len, pos = off;
	unsigned scb = img->cluster_bits - 5;
	bool have = false;
	int ret = 0;

	memset(run, 0, sizeof(*run));
	while (pos < end) {
		uint64_t gc = pos >> img->cluster_bits, l1i = gc >> img->l2_bits;
		uint64_t in = pos & (cs - 1);
		struct piece p;
		if (l1i >= img->hdr.l1_size || !(img->l1[l1i] & QCOW_L1E_OFFSET_MASK)) {
			/* no L2 table: the rest of its range in one step */
			memset(&p, 0, sizeof(p));
			p.unallocated = true;
			p.len = ((l1i + 1) << (img->l2_bits + img->cluster_bits)) - pos;
		} else {
			uint64_t e, bm;
			if ((ret = qcow_l2_lookup_bitmap(img, gc, &e, &bm)))
				break;
			if (qcow_extl2(img) && !(e & QCOW_OFLAG_COMPRESSED)) {
				unsigned k = (unsigned)(in >> scb);
				subcluster_piece(img, e, bm, k, &p);
				unsigned n = qcow_sc_run(e, bm, k, QCOW_SUBCLUSTERS);
				p.len = ((uint64_t)(k + n) << scb) - in;
				p.offset += in & ((1ull << scb) - 1);
			} else {
				entry_piece(img, e, &p);
				p.len = cs - in;
				p.offset += in;
			}
		}
		if (p.len > end - pos)
			p.len = end - pos;
		if (!have) {
			*run = p;
			have = true;
		} else if (pieces_join(run, &p)) {
			run->len += p.len;
		} else {
			break;
		}
		pos += p.len;
		/* bound the time the lock is held: one L2 table's range at most */
		if (run->len >= (cs << img->l2_bits))
			break;
	}
	return ret;
}

/* A raw backing file at guest offset off: its holes read zeros, the rest
 * is data at its own offset, as QEMU's file driver reports them
 * (SEEK_DATA/SEEK_HOLE).  Asked of the file by its path, since the I/O
 * backends have no such call; a file system without them is all data.
 * *len shrinks to the run from off. */
static bool raw_hole(const char *path, uint64_t off, uint64_t *len)
{
	bool hole = false;
	if (!path)     /* a backing file on another backend (unit tests) */
		return false;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	off_t d = lseek(fd, (off_t)off, SEEK_DATA);
	if (d < 0 && errno == ENXIO) {
		hole = true;   /* no data from off to the end */
	} else if (d >= 0 && (uint64_t)d > off) {
		hole = true;
		if ((uint64_t)d - off < *len)
			*len = (uint64_t)d - off;
	} else if (d >= 0) {
		off_t h = lseek(fd, (off_t)off, SEEK_HOLE);
		if (h > (off_t)off && (uint64_t)h - off < *len)
			*len = (uint64_t)h - off;
	}
	close(fd);
	return hole;
}

/* The backing file's status of [off, off + len). */
static int backing_extent(struct qcow_image *img, uint64_t off, uint64_t len, struct qcow_map_extent *ext)
{
	struct qcow_backing *b = img->backing;
	if (b->img) {
		int ret = qcow_image_map_extent(b->img, off, len, ext);
		if (ret)
			return ret;
		if (!ext->file)
			ext->file = b->path;
		ext->depth++;
		return 0;
	}
	memset(ext, 0, sizeof(*ext));
	ext->start = off;
	ext->length = len;
	ext->depth = 1;
	ext->present = ext->has_offset = true;
	ext->zero = raw_hole(b->path, off, &ext->length);
	ext->data = !ext->zero;
	ext->offset = off;
	ext->file = b->path;
	return 0;
}

int qcow_image_map_extent(struct qcow_image *img, uint64_t off, uint64_t max_len, struct qcow_map_extent *ext)
{
	struct piece run;
	int ret;

	memset(ext, 0, sizeof(*ext));
	if (off >= img->virtual_size)
		return -ENXIO;
	if (max_len == 0)
		return -EINVAL;
	if (max_len > img->virtual_size - off)
		max_len = img->virtual_size - off;
	qcow_lock(img);
	ret = first_run(img, off, max_len, &run);
	qcow_unlock(img);
	if (ret)
		return ret;

	if (run.unallocated && img->backing) {
		uint64_t bsize = img->backing->size;
		/* past the backing file's end: zeros of this image (block/io.c) */
		if (off < bsize) {
			if (run.len > bsize - off)
				run.len = bsize - off;
			return backing_extent(img, off, run.len, ext);
		}
	}
	ext->start = off;
	ext->length = run.len;
	ext->depth = 0;
	/* unallocated at the bottom of the chain: zeros, not present */
	ext->present = !run.unallocated;
	ext->zero = run.zero || run.unallocated;
	ext->data = run.data;
	ext->compressed = run.compressed;
	ext->has_offset = run.has_offset;
	ext->offset = run.offset;
	ext->file = qcow_datafile_present(img) ? img->data_path : NULL;
	return 0;
}

/* ---- the picture: a summary of the cluster map per cell ---------------- */

/* What pinned cluster c holds: one of the whole tables. */
static enum qcow_pic_kind pinned_kind(const struct qcow_image *img, uint64_t c)
{
	uint64_t cs = img->cluster_size, at = c * cs;
	const struct qcow_header *h = &img->hdr;
	const struct qcow_pbitmaps *pb = img->pbitmaps;

	if (c == 0)
		return QCOW_PIC_HEADER;
	if (at + cs > h->l1_table_offset && at < h->l1_table_offset + (uint64_t)h->l1_size * 8)
		return QCOW_PIC_L1;
	if (at + cs > h->refcount_table_offset &&
	    at < h->refcount_table_offset + (uint64_t)h->refcount_table_clusters * cs)
		return QCOW_PIC_REFTABLE;
	if (pb && pb->dir_size && at + cs > pb->dir_off && at < pb->dir_off + pb->dir_size)
		return QCOW_PIC_BITMAP;
	if (pb)
		for (uint32_t i = 0; i < pb->n; i++)
			if (at + cs > pb->v[i].table_off &&
			    at < pb->v[i].table_off + (uint64_t)pb->v[i].table_size * 8)
				return QCOW_PIC_BITMAP;
	/* the snapshot table and the snapshots' L1 tables */
	return QCOW_PIC_SNAPSHOT;
}

/* What the pointer at slot makes of the cluster it points to. */
static enum qcow_pic_kind slot_kind(struct qcow_image *img, uint64_t slot, bool shared)
{
	uint64_t idx, e;
	switch (qcow_slot_kind(img, slot, &idx)) {
	case QSLOT_ACTIVE_L1:
	case QSLOT_SNAPSHOT_L1:
		return QCOW_PIC_L2;
	case QSLOT_REFTABLE:
		return QCOW_PIC_REFBLOCK;
	case QSLOT_BITMAP_TABLE:
		return QCOW_PIC_BITMAP;
	case QSLOT_L2:
		break;
	}
	if (qcow_l2_entry_at(img, slot, &e) && (e & QCOW_OFLAG_COMPRESSED))
		return QCOW_PIC_COMPRESSED;
	return shared ? QCOW_PIC_SHARED : QCOW_PIC_DATA;
}

/* img->lock held. */
static enum qcow_pic_kind cluster_kind(struct qcow_image *img, uint64_t c)
{
	struct qcow_map *m = &img->map;
	if (qcow_map_is_moving(m, c))
		return QCOW_PIC_MOVING;
	switch (qcow_map_state(m, c)) {
	case QCS_REF:
		return slot_kind(img, qcow_map_slot(m, c), false);
	case QCS_SHARED:
		return slot_kind(img, qcow_map_ref_slot(m, c, 0), true);
	case QCS_PINNED:
		return pinned_kind(img, c);
	case QCS_JUNK:
	case QCS_PENDING:
		return QCOW_PIC_JUNK;
	case QCS_ERASING:
	case QCS_ERASED:
	case QCS_FLUSHING:
		return QCOW_PIC_ERASED;
	case QCS_AVAILABLE:
		return QCOW_PIC_AVAILABLE;
	case QCS_COPIES:
		return QCOW_PIC_MOVING;
	case QCS_ROOTS:
	default:
		return QCOW_PIC_DATA;
	}
}

int qcow_image_picture(struct qcow_image *img, uint32_t max_cells, struct qcow_picture *pic)
{
	int64_t size;

	memset(pic, 0, sizeof(*pic));
	if (max_cells == 0 || max_cells > QCOW_PICTURE_MAX_CELLS)
		max_cells = QCOW_PICTURE_MAX_CELLS;
	size = img->io->ops->size(img->io);
	if (size < 0)
		return (int)size;
	pic->file_size = (uint64_t)size;
	pic->cluster_size = img->cluster_size;

	qcow_lock(img);
	uint64_t n = img->map.nclusters;
	qcow_unlock(img);
	pic->clusters = n;
	pic->clusters_per_cell = n ? (n + max_cells - 1) / max_cells : 1;
	pic->cells = (uint32_t)((n + pic->clusters_per_cell - 1) / pic->clusters_per_cell);

	for (uint32_t i = 0; i < pic->cells; i++) {
		uint64_t counts[QCOW_PIC_NKINDS] = { 0 };
		uint64_t from = (uint64_t)i * pic->clusters_per_cell, to = from + pic->clusters_per_cell;
		/* one cell per lock hold: a live mount's guests wait little;
		 * the map may shrink meanwhile (a truncation): what is gone is
		 * drawn as available */
		qcow_lock(img);
		for (uint64_t c = from; c < to && c < n; c++) {
			enum qcow_pic_kind k = c < img->map.nclusters ? cluster_kind(img, c) : QCOW_PIC_AVAILABLE;
			counts[k]++;
		}
		qcow_unlock(img);
		unsigned best = 0;
		for (unsigned k = 0; k < QCOW_PIC_NKINDS; k++) {
			pic->totals[k] += counts[k];
			if (counts[k] > counts[best])
				best = k;
		}
		pic->cell[i] = (uint8_t)best;
	}
	return 0;
}
