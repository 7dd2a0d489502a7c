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
 */
#include "config.h"
#include "qcow_internal.h"

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

/* Reports a problem; in check mode counts it and returns 0 (skip). */
static int problem(struct walk *w, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int problem(struct walk *w, int e, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (w->g->check_mode) {
		w->g->problems++;
		qcow_logf(QCOW_LOG_ERROR, "ERROR %s", msg);
		return 0;
	}
	qcow_set_error(w->err, w->errlen, "%s", msg);
	return -e;
}

static int visit(struct walk *w, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	return w->v->visit(w->v->opaque, kind, c, slot);
}

/* Visits every cluster of a table of len bytes at off. */
static int visit_table(struct walk *w, enum qcow_ref_kind kind, uint64_t off, uint64_t len)
{
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

static int walk_l2(struct walk *w, uint64_t l2_off, bool snapshot, uint8_t *buf)
{
	const struct qcow_header *h = w->g->hdr;
	int ret = w->g->io->ops->pread(w->g->io, buf, w->cs, l2_off);
	if (ret < 0)
		return problem(w, -ret, "cannot read L2 table at 0x%" PRIx64 ": %s", l2_off, strerror(-ret));
	uint64_t n = w->cs / 8;
	unsigned x = 62 - (w->cb - 8);
	for (uint64_t j = 0; j < n; j++) {
		uint64_t e = qcow_get_be64(buf + j * 8);
		uint64_t slot = l2_off + j * 8;
		if (!e)
			continue;
		if (e & QCOW_OFLAG_COMPRESSED) {
			uint64_t off = e & ((1ull << x) - 1);
			uint64_t sectors = ((e >> x) & ((1ull << (w->cb - 8)) - 1)) + 1;
			uint64_t end = (off & ~511ull) + sectors * 512;
			if (end > w->g->hdr->file_size + w->cs || off == 0) {
				ret = problem(w, EINVAL, "compressed cluster at L2 offset 0x%" PRIx64 " lies outside the file (0x%" PRIx64 "..0x%" PRIx64 ")",
					      slot, off, end);
				if (ret)
					return ret;
				continue;
			}
			for (uint64_t c = off >> w->cb; c <= (end - 1) >> w->cb; c++) {
				if (c >= w->g->file_clusters)
					break;
				ret = visit(w, QREF_COMPRESSED, c, slot);
				if (ret)
					return ret;
			}
			continue;
		}
		uint64_t target = e & QCOW_L2E_OFFSET_MASK;
		if (!target)
			continue;   /* unallocated or plain zero cluster */
		if (h->version < 3 && (e & QCOW_OFLAG_ZERO)) {
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
		ret = problem(w, -ret, "cannot read L1 table at 0x%" PRIx64 ": %s", l1_off, strerror(-ret));
		goto out;
	}
	for (uint64_t i = 0; i < entries; i++) {
		uint64_t e = qcow_get_be64(l1 + i * 8);
		uint64_t slot = l1_off + i * 8;
		uint64_t target = e & QCOW_L1E_OFFSET_MASK;
		if (!target)
			continue;
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
};

/* Reads and validates the snapshot table: each snapshot's L1 location,
 * and in *table_len the bytes up to the end of its last entry. */
static int read_snapshot_table(struct qcow_io *io, const struct qcow_header *h, uint64_t file_size,
			       struct snapshot_l1 **out, uint64_t *table_len, char *err, size_t errlen)
{
	uint64_t cs = 1ull << h->cluster_bits;
	uint64_t pos = h->snapshots_offset;
	*out = NULL;
	*table_len = 0;
	if (!h->nb_snapshots)
		return 0;
	struct snapshot_l1 *s = qcow_calloc(h->nb_snapshots, sizeof(*s));
	if (!s)
		return -ENOMEM;
	for (uint32_t i = 0; i < h->nb_snapshots; i++) {
		uint8_t e[40];
		int ret = io->ops->pread(io, e, sizeof(e), pos);
		if (ret < 0) {
			qcow_free(s);
			qcow_set_error(err, errlen, "cannot read snapshot %u at 0x%" PRIx64 ": %s", i, pos, strerror(-ret));
			return ret;
		}
		s[i].offset = qcow_get_be64(e);
		s[i].entries = qcow_get_be32(e + 8);
		uint32_t id_len = qcow_get_be16(e + 12), name_len = qcow_get_be16(e + 14);
		uint32_t extra = qcow_get_be32(e + 36);
		if (extra > 1024 || pos >= file_size) {
			qcow_free(s);
			qcow_set_error(err, errlen, "snapshot table entry %u at offset 0x%" PRIx64 " is invalid (extra data size %u)", i, pos, extra);
			return -EINVAL;
		}
		if ((s[i].offset & (cs - 1)) || (s[i].entries && s[i].offset == 0) || (uint64_t)s[i].entries * 8 > QCOW_MAX_L1_BYTES ||
		    (s[i].entries && s[i].offset >= file_size)) {
			qcow_set_error(err, errlen, "snapshot %u (table entry at 0x%" PRIx64 ") has an invalid L1 table 0x%" PRIx64 " with %u entries",
				       i, pos, s[i].offset, s[i].entries);
			qcow_free(s);
			return -EINVAL;
		}
		pos += (40 + (uint64_t)extra + id_len + name_len + 7) & ~7ull;
	}
	*out = s;
	*table_len = pos - h->snapshots_offset;
	return 0;
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
		ret = read_snapshot_table(g->io, h, h->file_size, &snaps, &table_len, err, errlen);
		if (ret)
			goto out;
		ret = visit_table(&w, QREF_SNAPSHOT_TABLE, h->snapshots_offset, table_len);
		for (uint32_t i = 0; !ret && i < h->nb_snapshots; i++)
			ret = visit_table(&w, QREF_SNAPSHOT_L1, snaps[i].offset, (uint64_t)snaps[i].entries * 8);
		if (ret)
			goto out;
	}

	/* refcount table -> refcount blocks */
	uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters * w.cs;
	buf = qcow_malloc(rt_bytes);
	l2buf = qcow_malloc(w.cs);
	if (!buf || !l2buf) {
		ret = -ENOMEM;
		goto out;
	}
	ret = g->io->ops->pread(g->io, buf, rt_bytes, h->refcount_table_offset);
	if (ret < 0) {
		ret = problem(&w, -ret, "cannot read the refcount table: %s", strerror(-ret));
		goto out;
	}
	for (uint64_t i = 0; i < rt_bytes / 8; i++) {
		uint64_t e = qcow_get_be64(buf + i * 8);
		uint64_t slot = h->refcount_table_offset + i * 8;
		if (!e)
			continue;
		ret = check_pointer(&w, "refcount table entry", e & QCOW_REFT_OFFSET_MASK, slot);
		if (ret < 0)
			goto out;
		if (ret == 0)
			continue;
		ret = visit(&w, QREF_REFBLOCK, e >> w.cb, slot);
		if (ret)
			goto out;
	}

	ret = walk_l1(&w, h->l1_table_offset, h->l1_size, false, l2buf);
	for (uint32_t i = 0; !ret && i < h->nb_snapshots; i++)
		ret = walk_l1(&w, snaps[i].offset, snaps[i].entries, true, l2buf);
out:
	qcow_free(snaps);
	qcow_free(buf);
	qcow_free(l2buf);
	return ret;
}
