/*
 * qcow_scan.c - the full metadata walk.
 *
 * Owns: the order and validation of one pass over every structure of an
 * image: header cluster, L1 table, refcount table and its blocks, every L2
 * table and data cluster reachable from the active L1 and from every
 * snapshot's L1.  Each reference is handed to a visitor (the map builder at
 * open, the reference counter of qcow_check).  Rules: every pointer is
 * validated (alignment, inside the file, not cluster 0) before it is
 * followed; an L2 table reached from several L1 tables is walked once per
 * L1 table, as QEMU counts it.  In check_mode problems are logged and
 * counted and the walk goes on; otherwise the first one stops it with a
 * message naming the structure, the index and the offsets.
 * What counts as a problem follows qemu-img check (QEMU's check_refcounts_l1,
 * check_refcounts_l2, check_refblocks and its bitmap walk): reserved bits
 * in L1, L2 and refcount-table entries, COPIED on a compressed cluster, an
 * L1 entry with flags but no table, references one cluster or more past the
 * end of the file.  Those QEMU reads past ("corruptions") stop only a
 * read-write open (tolerate_corruption lets a read-only open go on).
 * Bitmap structures (directory, tables, data) are references only while
 * the bitmaps autoclear bit says they are consistent, as in QEMU.  What
 * makes QEMU's open or check fail (a failed read, an invalid bitmap
 * directory or table entry) stops the walk in every mode, so qcow_check
 * then reports "could not check" as qemu-img check does.
 * With an external data file (incompatible bit 2) data clusters live in
 * that file and are no references of the qcow2 file; a compressed cluster
 * there is a problem (QEMU cannot have written it).
 */
#include "config.h"
#include "qcow_internal.h"
#include "qcow_subcluster.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

struct walk {
	struct qcow_scan_geometry *g;
	const struct qcow_scan_visitor *v;
	char *err;
	size_t errlen;
	uint64_t cs;
	unsigned cb;
};

/* How a finding is judged (see the file-top comment). */
enum finding {
	F_PROBLEM,   /* counted in check mode, else it stops the walk */
	F_IO,        /* a failed read: stops every mode, as QEMU's check stops */
	F_CORRUPT,   /* counted in check mode, a warning when corruption is
	              * tolerated (read-only opens), else it stops the walk */
};

/* Reports a finding; returns 0 to go on (skip the structure) or -errno. */
static int report(struct walk *w, enum finding kind, int e, const char *fmt, va_list ap)
{
	char msg[512];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	if (kind != F_IO && w->g->check_mode) {
		w->g->problems++;
		qcow_logf(QCOW_LOG_ERROR, "ERROR %s", msg);
		return 0;
	}
	if (kind == F_CORRUPT && w->g->tolerate_corruption) {
		if (w->g->corruptions++ < 8)
			qcow_logf(QCOW_LOG_WARNING, "%s (read-only: ignored)", msg);
		return 0;
	}
	if (kind == F_CORRUPT) {
		qcow_set_error(w->err, w->errlen, "%s; the image is corrupt (qemu-img check reports it): "
			       "repair it with 'qemu-img check -r all' or open it read-only", msg);
		return -EINVAL;
	}
	qcow_set_error(w->err, w->errlen, "%s", msg);
	return -e;
}

static int problem(struct walk *w, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int problem(struct walk *w, int e, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int ret = report(w, F_PROBLEM, e, fmt, ap);
	va_end(ap);
	return ret;
}

static int io_failed(struct walk *w, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int io_failed(struct walk *w, int e, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int ret = report(w, F_IO, e, fmt, ap);
	va_end(ap);
	return ret;
}

static int corrupt(struct walk *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int corrupt(struct walk *w, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int ret = report(w, F_CORRUPT, EINVAL, fmt, ap);
	va_end(ap);
	return ret;
}

const char *qcow_ref_kind_name(enum qcow_ref_kind k)
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
	case QREF_BITMAP_DIR: return "bitmap directory";
	case QREF_BITMAP_TABLE: return "bitmap table";
	case QREF_BITMAP_DATA: return "bitmap data cluster";
	}
	return "?";
}

static int visit(struct walk *w, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	return w->v->visit(w->v->opaque, kind, c, slot);
}

/* Visits every cluster of a table of len bytes at off.  Like QEMU, a
 * table may run into the last, partial cluster of the file, but one that
 * ends a whole cluster or more past the end is a corruption and is not
 * counted. */
static int visit_table(struct walk *w, enum qcow_ref_kind kind, uint64_t off, uint64_t len)
{
	if (len && off + len >= w->g->hdr->file_size + w->cs)
		return corrupt(w, "%s at offset 0x%" PRIx64 " with %" PRIu64 " bytes ends a cluster or more past the end of the file (%" PRIu64 " bytes)",
			       qcow_ref_kind_name(kind), off, len, w->g->hdr->file_size);
	for (uint64_t c = off >> w->cb; len && c <= (off + len - 1) >> w->cb; c++) {
		int ret = visit(w, kind, c, 0);
		if (ret)
			return ret;
	}
	return 0;
}

/* Checks a cluster-aligned pointer read from slot; returns 1 to follow,
 * 0 to skip (check mode), or -errno. */
static int check_pointer(struct walk *w, const char *what, uint64_t target, uint64_t slot)
{
	if (target & (w->cs - 1))
		return problem(w, EINVAL, "%s at offset 0x%" PRIx64 " points to unaligned offset 0x%" PRIx64,
			       what, slot, target);
	uint64_t c = target >> w->cb;
	if (c == 0)
		return problem(w, EINVAL, "%s at offset 0x%" PRIx64 " points into the image header (offset 0)", what, slot);
	if (c >= w->g->file_clusters)
		return problem(w, EINVAL, "%s at offset 0x%" PRIx64 " points to 0x%" PRIx64 ", past the end of the file (%" PRIu64 " bytes)",
			       what, slot, target, w->g->hdr->file_size);
	return 1;
}

#define L1E_RESERVED 0x7f000000000001ffull
#define L2E_STD_RESERVED 0x3f000000000001feull
#define REFT_RESERVED 0x1ffull

static int walk_l2(struct walk *w, uint64_t l2_off, bool snapshot, uint8_t *buf)
{
	const struct qcow_header *h = w->g->hdr;
	int ret = w->g->io->ops->pread(w->g->io, buf, w->cs, l2_off);
	if (ret < 0)
		return io_failed(w, -ret, "cannot read L2 table at 0x%" PRIx64 ": %s", l2_off, strerror(-ret));
	unsigned shift = qcow_header_l2_entry_shift(h);
	uint64_t n = w->cs >> shift;
	unsigned x = 62 - (w->cb - 8);
	for (uint64_t j = 0; j < n; j++) {
		uint64_t e = qcow_get_be64(buf + (j << shift));
		uint64_t slot = l2_off + (j << shift);
		/* extended L2: the subcluster bitmap follows the pointer */
		uint64_t bm = shift == 4 ? qcow_get_be64(buf + (j << shift) + 8) : 0;
		const char *bad = shift == 4 ? qcow_sc_invalid(e, bm) : NULL;
		if (bad) {
			ret = corrupt(w, "%sL2 entry at offset 0x%" PRIx64 " (0x%016" PRIx64 " 0x%016" PRIx64 "): %s",
				      snapshot ? "snapshot " : "", slot, e, bm, bad);
			if (ret)
				return ret;
		}
		if (!e)
			continue;
		if ((e & QCOW_OFLAG_COMPRESSED) && (h->incompatible_features & QCOW_INCOMPAT_DATA_FILE)) {
			/* QEMU: compressed clusters cannot live in a data file */
			ret = problem(w, EINVAL, "L2 entry at offset 0x%" PRIx64 " (entry 0x%" PRIx64 ") is a compressed cluster "
				      "in an image with an external data file", slot, e);
			if (ret)
				return ret;
			continue;
		}
		if (e & QCOW_OFLAG_COMPRESSED) {
			uint64_t off = e & ((1ull << x) - 1);
			uint64_t sectors = ((e >> x) & ((1ull << (w->cb - 8)) - 1)) + 1;
			uint64_t end = (off & ~511ull) + sectors * 512;
			if (e & QCOW_OFLAG_COPIED) {
				ret = corrupt(w, "compressed cluster at L2 offset 0x%" PRIx64 " (entry 0x%" PRIx64 ") has the COPIED flag",
					      slot, e);
				if (ret)
					return ret;
			}
			if (end >= w->g->hdr->file_size + w->cs || off == 0) {
				ret = problem(w, EINVAL, "compressed cluster at L2 offset 0x%" PRIx64 " lies outside the file (0x%" PRIx64 "..0x%" PRIx64 ")",
					      slot, off, end);
				if (ret)
					return ret;
				continue;
			}
			/* a stream may run into the cluster after the end of the
			 * file (it reads as zeros there): QEMU counts it */
			for (uint64_t c = off >> w->cb; c <= (end - 1) >> w->cb; c++) {
				ret = visit(w, QREF_COMPRESSED, c, slot);
				if (ret)
					return ret;
			}
			continue;
		}
		/* (with extended L2 entries the zero flag has no meaning: QEMU
		 * ignores it, and so does the engine) */
		if (e & L2E_STD_RESERVED) {
			ret = corrupt(w, "%sL2 entry at offset 0x%" PRIx64 " has reserved bits set (0x%" PRIx64 ")",
				      snapshot ? "snapshot " : "", slot, e);
			if (ret)
				return ret;
		}
		uint64_t target = e & QCOW_L2E_OFFSET_MASK;
		if (h->incompatible_features & QCOW_INCOMPAT_DATA_FILE)
			continue;   /* the data lives in the data file, unrefcounted (qcow_datafile.c) */
		if (!target)
			continue;   /* unallocated or plain zero cluster */
		if (h->version < 3 && (e & QCOW_OFLAG_ZERO) && !w->g->check_mode) {
			/* QEMU reads it as zeros, this engine's v2 reader would
			 * not: refuse rather than disagree (check: not an error) */
			ret = problem(w, EINVAL, "L2 entry at offset 0x%" PRIx64 " has the zero flag in a version 2 image", slot);
			if (ret)
				return ret;
		}
		ret = check_pointer(w, snapshot ? "snapshot L2 entry" : "L2 entry", target, slot);
		if (ret <= 0) {
			if (ret)
				return ret;
			continue;
		}
		ret = visit(w, snapshot ? QREF_SNAPSHOT_DATA : QREF_DATA, target >> w->cb, slot);
		if (ret == 0 && !snapshot && w->v->copied)
			ret = w->v->copied(w->v->opaque, target >> w->cb, e & QCOW_OFLAG_COPIED, slot);
		if (ret)
			return ret;
	}
	return 0;
}

static int walk_l1(struct walk *w, uint64_t l1_off, uint64_t entries, bool snapshot, uint8_t *l2buf)
{
	uint64_t bytes = entries * 8;
	uint8_t *l1 = qcow_malloc(bytes ? bytes : 8);
	if (!l1)
		return -ENOMEM;
	int ret = entries ? w->g->io->ops->pread(w->g->io, l1, bytes, l1_off) : 0;
	if (ret < 0) {
		ret = io_failed(w, -ret, "cannot read L1 table at 0x%" PRIx64 ": %s", l1_off, strerror(-ret));
		goto out;
	}
	for (uint64_t i = 0; i < entries; i++) {
		uint64_t e = qcow_get_be64(l1 + i * 8);
		uint64_t slot = l1_off + i * 8;
		uint64_t target = e & QCOW_L1E_OFFSET_MASK;
		if (!e)
			continue;
		if (e & L1E_RESERVED) {
			ret = corrupt(w, "%sL1 entry at offset 0x%" PRIx64 " has reserved bits set (0x%" PRIx64 ")",
				      snapshot ? "snapshot " : "", slot, e);
			if (ret)
				goto out;
		}
		if (!target) {
			/* QEMU would count (and walk) the image header as an L2
			 * table here */
			ret = corrupt(w, "%sL1 entry at offset 0x%" PRIx64 " (0x%" PRIx64 ") has flags but no L2 table offset",
				      snapshot ? "snapshot " : "", slot, e);
			if (ret)
				goto out;
			continue;
		}
		ret = check_pointer(w, snapshot ? "snapshot L1 entry" : "L1 entry", target, slot);
		if (ret <= 0) {
			if (ret)
				goto out;
			continue;
		}
		ret = visit(w, snapshot ? QREF_SNAPSHOT_L2 : QREF_L2, target >> w->cb, slot);
		if (ret == 0 && !snapshot && w->v->copied)
			ret = w->v->copied(w->v->opaque, target >> w->cb, e & QCOW_OFLAG_COPIED, slot);
		if (ret == 1) {   /* visitor asks not to walk this table (already broken) */
			ret = 0;
			continue;
		}
		if (ret)
			goto out;
		ret = walk_l2(w, target, snapshot, l2buf);
		if (ret)
			goto out;
	}
	ret = 0;
out:
	qcow_free(l1);
	return ret;
}

struct snapshot_l1 {
	uint64_t offset;
	uint32_t entries;
	bool skip;           /* invalid (check mode): counted as a corruption, not walked */
};

/* Reads and validates the snapshot table: each snapshot's L1 location,
 * and in *table_len the bytes up to the end of its last entry.  In check
 * mode, like QEMU's check, an L1 table that is unaligned or too large is
 * a corruption and not walked, and one at offset 0 or past the end of
 * the file is counted (and found wrong) like any other reference. */
static int read_snapshot_table(struct walk *w, struct snapshot_l1 **out, uint64_t *table_len)
{
	const struct qcow_header *h = w->g->hdr;
	struct qcow_io *io = w->g->io;
	uint64_t file_size = h->file_size;
	uint64_t cs = 1ull << h->cluster_bits;
	uint64_t pos = h->snapshots_offset;
	bool check = w->g->check_mode;
	*out = NULL;
	*table_len = 0;
	if (!h->nb_snapshots)
		return 0;
	struct snapshot_l1 *s = qcow_calloc(h->nb_snapshots, sizeof(*s));
	if (!s)
		return -ENOMEM;
	int ret = 0;
	for (uint32_t i = 0; i < h->nb_snapshots; i++) {
		uint8_t e[40];
		ret = io->ops->pread(io, e, sizeof(e), pos);
		if (ret < 0) {
			qcow_set_error(w->err, w->errlen, "cannot read snapshot %u at 0x%" PRIx64 ": %s", i, pos, strerror(-ret));
			goto out;
		}
		s[i].offset = qcow_get_be64(e);
		s[i].entries = qcow_get_be32(e + 8);
		uint32_t id_len = qcow_get_be16(e + 12), name_len = qcow_get_be16(e + 14);
		uint32_t extra = qcow_get_be32(e + 36);
		if (extra > 1024 || (pos >= file_size && !check)) {
			qcow_set_error(w->err, w->errlen, "snapshot table entry %u at offset 0x%" PRIx64 " is invalid (extra data size %u)", i, pos, extra);
			ret = -EINVAL;
			goto out;
		}
		if (h->version >= 3 && extra < 16) {
			/* version 3 snapshots carry the 64-bit VM state size and
			 * the disk size */
			ret = corrupt(w, "snapshot table entry %u at offset 0x%" PRIx64 " is incomplete (extra data size %u, needs 16)",
				      i, pos, extra);
			if (ret)
				goto out;
		}
		bool bad_shape = (s[i].offset & (cs - 1)) || (uint64_t)s[i].entries * 8 > QCOW_MAX_L1_BYTES;
		bool missing = s[i].entries && (s[i].offset == 0 || s[i].offset >= file_size);
		if (bad_shape && check) {
			ret = corrupt(w, "snapshot %u (table entry at 0x%" PRIx64 ") has an invalid L1 table 0x%" PRIx64 " with %u entries",
				      i, pos, s[i].offset, s[i].entries);
			s[i].skip = true;
		} else if (bad_shape || (missing && !check)) {
			qcow_set_error(w->err, w->errlen, "snapshot %u (table entry at 0x%" PRIx64 ") has an invalid L1 table 0x%" PRIx64 " with %u entries",
				       i, pos, s[i].offset, s[i].entries);
			ret = -EINVAL;
			goto out;
		}
		pos += (40 + (uint64_t)extra + id_len + name_len + 7) & ~7ull;
	}
	ret = 0;
out:
	if (ret) {
		qcow_free(s);
		return ret;
	}
	*out = s;
	*table_len = pos - h->snapshots_offset;
	return 0;
}

/* The bitmaps header extension (qcow2 spec, "Bitmaps extension"): 4 bytes
 * nb_bitmaps, 4 reserved, 8 directory size, 8 directory offset.  Returns 1
 * and fills the fields when it is present. */
int qcow_scan_bitmaps_ext(const struct qcow_header *h, uint32_t *nb, uint64_t *dir_size, uint64_t *dir_off, uint64_t *pos_out)
{
	uint64_t end = h->backing_file_offset ? h->backing_file_offset : h->raw_len;
	uint64_t pos = h->version >= 3 ? h->header_length : QCOW_V2_HEADER_LEN;
	while (pos + 8 <= end && pos + 8 <= h->raw_len) {
		uint32_t type = qcow_get_be32(h->raw + pos), len = qcow_get_be32(h->raw + pos + 4);
		if (type == QCOW_EXT_END)
			break;
		if (type == QCOW_EXT_BITMAPS && len >= 24 && pos + 8 + 24 <= h->raw_len) {
			const uint8_t *p = h->raw + pos + 8;
			*nb = qcow_get_be32(p);
			*dir_size = qcow_get_be64(p + 8);
			*dir_off = qcow_get_be64(p + 16);
			*pos_out = pos;
			return 1;
		}
		pos += 8 + (((uint64_t)len + 7) & ~7ull);
	}
	return 0;
}

/* Stops the walk in every mode: QEMU's open fails on it, so qemu-img
 * check cannot check the image either. */
static int bitmaps_refused(struct walk *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bitmaps_refused(struct walk *w, const char *fmt, ...)
{
	char msg[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	qcow_set_error(w->err, w->errlen, "%s", msg);
	return -EINVAL;
}

#define QCOW_MAX_BITMAPS 65535u
#define QCOW_MAX_BITMAP_DIR (QCOW_MAX_BITMAPS * 1024ull)

/* The directory as QEMU's open loads it: the entries fill exactly
 * dir_size bytes, there are exactly nb of them, none has extra data, and
 * each satisfies the format's constraints (type, granularity 9..31,
 * reserved flags, table placement and size, the table fits the disk). */
static int check_bitmap_dir(struct walk *w, const uint8_t *dir, uint64_t dir_size, uint64_t dir_off, uint32_t nb)
{
	const struct qcow_header *h = w->g->hdr;
	uint64_t pos = 0;
	uint32_t i = 0;
	while (pos < dir_size) {
		const uint8_t *d = dir + pos;
		uint64_t entry_pos = dir_off + pos;
		if (pos + 24 > dir_size)
			return bitmaps_refused(w, "bitmap directory at 0x%" PRIx64 " is broken: entry %u at 0x%" PRIx64 " is cut off by its end",
					       dir_off, i, entry_pos);
		if (++i > nb)
			return bitmaps_refused(w, "bitmap directory at 0x%" PRIx64 " holds more bitmaps than the %u of its header extension",
					       dir_off, nb);
		uint64_t table_off = qcow_get_be64(d);
		uint32_t table_size = qcow_get_be32(d + 8), flags = qcow_get_be32(d + 12);
		uint32_t name_size = qcow_get_be16(d + 18), extra = qcow_get_be32(d + 20);
		unsigned type = d[16], gran = d[17];
		uint64_t next = pos + ((24 + (uint64_t)extra + name_size + 7) & ~7ull);
		if (next > dir_size)
			return bitmaps_refused(w, "bitmap directory at 0x%" PRIx64 " is broken: entry %u at 0x%" PRIx64 " runs past its end",
					       dir_off, i - 1, entry_pos);
		if (extra)
			return bitmaps_refused(w, "bitmap %u (directory entry at 0x%" PRIx64 ") has %u bytes of extra data, which QEMU does not support",
					       i - 1, entry_pos, extra);
		/* a consistent bitmap's table must fit the disk size in whole
		 * sectors (QEMU loads it at open); one in use is never loaded,
		 * and after a resize that did not finish its table may have
		 * the old size */
		uint64_t bits = gran < 9 || gran > 31 ? 0 : (((h->size & ~511ull) + (1ull << gran) - 1) >> gran);
		uint64_t want = (((bits + 7) / 8) + w->cs - 1) / w->cs;
		if (table_size == 0 || table_off == 0 || (table_off & (w->cs - 1)) || table_size > 0x8000000u ||
		    gran < 9 || gran > 31 || (flags & ~3u) || name_size > 1023 || type != 1 ||
		    (uint64_t)table_size * w->cs > (512ull << 20) || (want != table_size && !(flags & 1)))
			return bitmaps_refused(w, "bitmap %u (directory entry at 0x%" PRIx64 ") is invalid: table 0x%" PRIx64 " with %u entries "
					       "(%" PRIu64 " needed for %" PRIu64 " bytes), flags 0x%x, type %u, granularity bits %u",
					       i - 1, entry_pos, table_off, table_size, want, h->size, flags, type, gran);
		pos = next;
	}
	if (i != nb)
		return bitmaps_refused(w, "bitmap directory at 0x%" PRIx64 " holds %u bitmaps, its header extension says %u", dir_off, i, nb);
	return 0;
}

/* Bitmap directory, tables and data clusters, counted as QEMU counts them
 * (only while autoclear bit 0 says the bitmaps are consistent). */
static int walk_bitmaps(struct walk *w, uint8_t *clusterbuf)
{
	const struct qcow_header *h = w->g->hdr;
	uint32_t nb;
	uint64_t dir_size, dir_off, ext_pos;
	uint8_t *dir = NULL;
	int ret = 0;
	(void)clusterbuf;
	if (!(h->autoclear_features & 1) || !qcow_scan_bitmaps_ext(h, &nb, &dir_size, &dir_off, &ext_pos))
		return 0;
	/* the extension as QEMU's open checks it */
	uint32_t reserved = qcow_get_be32(h->raw + ext_pos + 12);
	if (reserved || nb == 0 || nb > QCOW_MAX_BITMAPS || (dir_off & (w->cs - 1)) || dir_size > QCOW_MAX_BITMAP_DIR ||
	    dir_size == 0)
		return bitmaps_refused(w, "bitmaps extension at header offset %" PRIu64 " is invalid (%u bitmaps, reserved 0x%x, "
				       "directory 0x%" PRIx64 ", %" PRIu64 " bytes)", ext_pos, nb, reserved, dir_off, dir_size);
	if (dir_off + dir_size > h->file_size + w->cs)
		return bitmaps_refused(w, "bitmap directory 0x%" PRIx64 " (%" PRIu64 " bytes) lies past the end of the file", dir_off, dir_size);
	dir = qcow_calloc(1, dir_size);
	if (!dir)
		return -ENOMEM;
	ret = w->g->io->ops->pread(w->g->io, dir, dir_size, dir_off);
	if (ret < 0) {
		ret = io_failed(w, -ret, "cannot read the bitmap directory at 0x%" PRIx64 ": %s", dir_off, strerror(-ret));
		goto out;
	}
	ret = check_bitmap_dir(w, dir, dir_size, dir_off, nb);
	if (ret)
		goto out;
	ret = visit_table(w, QREF_BITMAP_DIR, dir_off, dir_size);
	if (ret)
		goto out;
	uint64_t pos = 0;
	for (uint32_t i = 0; i < nb; i++) {
		const uint8_t *d = dir + pos;
		uint64_t table_off = qcow_get_be64(d);
		uint32_t table_size = qcow_get_be32(d + 8);
		uint32_t name_size = qcow_get_be16(d + 18), extra = qcow_get_be32(d + 20);
		pos += (24 + (uint64_t)extra + name_size + 7) & ~7ull;
		ret = visit_table(w, QREF_BITMAP_TABLE, table_off, (uint64_t)table_size * 8);
		if (ret)
			goto out;
		for (uint64_t k = 0; k < table_size; k++) {
			uint8_t be[8];
			uint64_t slot = table_off + k * 8;
			ret = w->g->io->ops->pread(w->g->io, be, 8, slot);
			if (ret < 0) {
				ret = io_failed(w, -ret, "cannot read bitmap table entry at 0x%" PRIx64 ": %s", slot, strerror(-ret));
				goto out;
			}
			uint64_t e = qcow_get_be64(be), target = e & QCOW_L2E_OFFSET_MASK;
			if ((e & 0xff000000000001feull) || (target && ((e & 1) || (target & (w->cs - 1))))) {
				/* QEMU loads every bitmap table at open and refuses
				 * the image */
				qcow_set_error(w->err, w->errlen, "bitmap table entry at offset 0x%" PRIx64 " is invalid (0x%" PRIx64 ")", slot, e);
				ret = -EINVAL;
				goto out;
			}
			if (!target)
				continue;
			ret = check_pointer(w, "bitmap table entry", target, slot);
			if (ret <= 0) {
				if (ret)
					goto out;
				continue;
			}
			ret = visit(w, QREF_BITMAP_DATA, target >> w->cb, slot);
			if (ret)
				goto out;
		}
	}
	ret = 0;
out:
	qcow_free(dir);
	return ret;
}

int qcow_scan(struct qcow_scan_geometry *g, const struct qcow_scan_visitor *v, char *err, size_t errlen)
{
	const struct qcow_header *h = g->hdr;
	struct walk w = { .g = g, .v = v, .err = err, .errlen = errlen, .cs = 1ull << h->cluster_bits, .cb = h->cluster_bits };
	struct snapshot_l1 *snaps = NULL;
	uint8_t *buf = NULL, *l2buf = NULL;
	int ret;

	/* fixed structures first, so that pointers into them are caught as
	 * overlaps by the visitor */
	ret = visit(&w, QREF_HEADER, 0, 0);
	if (!ret)
		ret = visit_table(&w, QREF_L1, h->l1_table_offset, (uint64_t)h->l1_size * 8);
	if (!ret)
		ret = visit_table(&w, QREF_REFTABLE, h->refcount_table_offset, (uint64_t)h->refcount_table_clusters * w.cs);
	if (ret)
		goto out;
	if (h->nb_snapshots) {
		uint64_t table_len;
		ret = read_snapshot_table(&w, &snaps, &table_len);
		if (ret)
			goto out;
		ret = visit_table(&w, QREF_SNAPSHOT_TABLE, h->snapshots_offset, table_len);
		for (uint32_t i = 0; !ret && i < h->nb_snapshots; i++)
			if (!snaps[i].skip)
				ret = visit_table(&w, QREF_SNAPSHOT_L1, snaps[i].offset, (uint64_t)snaps[i].entries * 8);
		if (ret)
			goto out;
	}

	/* refcount table -> refcount blocks */
	uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters * w.cs;
	buf = qcow_malloc(rt_bytes ? rt_bytes : 8);
	l2buf = qcow_malloc(w.cs);
	if (!buf || !l2buf) {
		ret = -ENOMEM;
		goto out;
	}
	ret = rt_bytes ? g->io->ops->pread(g->io, buf, rt_bytes, h->refcount_table_offset) : 0;
	if (ret < 0) {
		ret = io_failed(&w, -ret, "cannot read the refcount table: %s", strerror(-ret));
		goto out;
	}
	for (uint64_t i = 0; i < rt_bytes / 8; i++) {
		uint64_t e = qcow_get_be64(buf + i * 8);
		uint64_t slot = h->refcount_table_offset + i * 8;
		if (!e)
			continue;
		if (e & REFT_RESERVED) {
			ret = corrupt(&w, "refcount table entry %" PRIu64 " at offset 0x%" PRIx64 " has reserved bits set (0x%" PRIx64 ")",
				      i, slot, e);
			if (ret)
				goto out;
		}
		uint64_t target = e & QCOW_REFT_OFFSET_MASK;
		if (!target)
			continue;   /* QEMU: no block */
		if (target & (w.cs - 1)) {
			g->reftable_unaligned = true;
			ret = corrupt(&w, "refcount table entry %" PRIu64 " at offset 0x%" PRIx64 " points to unaligned offset 0x%" PRIx64,
				      i, slot, target);
			if (ret)
				goto out;
			continue;
		}
		if ((target >> w.cb) >= g->file_clusters) {
			ret = corrupt(&w, "refcount table entry %" PRIu64 " at offset 0x%" PRIx64 " points to 0x%" PRIx64 ", past the end of the file (%" PRIu64 " bytes)",
				      i, slot, target, h->file_size);
			if (ret)
				goto out;
			continue;
		}
		ret = visit(&w, QREF_REFBLOCK, target >> w.cb, slot);
		if (ret)
			goto out;
	}

	ret = walk_bitmaps(&w, l2buf);
	if (ret)
		goto out;
	ret = walk_l1(&w, h->l1_table_offset, h->l1_size, false, l2buf);
	for (uint32_t i = 0; !ret && i < h->nb_snapshots; i++)
		if (!snaps[i].skip)
			ret = walk_l1(&w, snaps[i].offset, snaps[i].entries, true, l2buf);
out:
	qcow_free(snaps);
	qcow_free(buf);
	qcow_free(l2buf);
	return ret;
}

struct first_user {
	uint64_t c, slot;
	enum qcow_ref_kind kind;
	bool found;
};

static int first_user_visit(void *opaque, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	struct first_user *f = opaque;
	if (c != f->c)
		return 0;
	f->kind = kind;
	f->slot = slot;
	f->found = true;
	return -ECANCELED;   /* the first one names it: stop */
}

bool qcow_scan_first_user(const struct qcow_scan_geometry *g, uint64_t c, enum qcow_ref_kind *kind, uint64_t *slot)
{
	struct first_user f = { .c = c };
	struct qcow_scan_visitor v = { .visit = first_user_visit, .opaque = &f };
	struct qcow_scan_geometry g2 = *g;
	char ignored[8];
	g2.check_mode = false;
	g2.tolerate_corruption = true;
	(void)qcow_scan(&g2, &v, ignored, sizeof(ignored));
	*kind = f.kind;
	*slot = f.slot;
	return f.found;
}
