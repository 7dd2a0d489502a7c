/*
 * qcow_check.c - the offline consistency check (qcowctl check).
 *
 * Owns: counting every reference with the shared metadata walk
 * (qcow_scan in check mode) and comparing the counts with the on-disk
 * refcounts.  Reports like qemu-img check: a refcount below the number of
 * references is an error (data may be overwritten), above it is a leak.
 * Rules: never writes; takes no locks (it may run on an image QEMU has
 * open, as `qemu-img check -U` does).
 */
#include "config.h"
#include "qcow_internal.h"
#include "qcow_lock.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

struct copied_ref {
	uint64_t c, slot;
	bool flag;
};

struct count_ctx {
	uint32_t *refs;
	uint8_t *fixed;          /* 1: header structure or refcount block */
	uint64_t n;
	uint64_t data_clusters;
	struct copied_ref *copied;
	size_t ncopied, copied_cap;
};

static int grow_counts(struct count_ctx *k, uint64_t c)
{
	uint64_t n = c + 1 > k->n * 2 ? c + 1 : k->n * 2;
	uint32_t *r = qcow_realloc(k->refs, n * sizeof(*r));
	if (!r)
		return -ENOMEM;
	k->refs = r;
	uint8_t *f = qcow_realloc(k->fixed, n);
	if (!f)
		return -ENOMEM;
	k->fixed = f;
	memset(r + k->n, 0, (n - k->n) * sizeof(*r));
	memset(f + k->n, 0, n - k->n);
	k->n = n;
	return 0;
}

static int count_visit(void *opaque, enum qcow_ref_kind kind, uint64_t c, uint64_t slot)
{
	struct count_ctx *k = opaque;
	if (c >= k->n && grow_counts(k, c))
		return -ENOMEM;
	if (k->refs[c] != UINT32_MAX)
		k->refs[c]++;
	switch (kind) {
	case QREF_HEADER: case QREF_L1: case QREF_REFTABLE: case QREF_REFBLOCK:
	case QREF_SNAPSHOT_TABLE: case QREF_SNAPSHOT_L1:
		k->fixed[c] = 1;
		break;
	case QREF_DATA:
		k->data_clusters++;
		break;
	default:
		break;
	}
	return 0;
}

static int copied_visit(void *opaque, uint64_t c, bool flag, uint64_t slot)
{
	struct count_ctx *k = opaque;
	if (k->ncopied == k->copied_cap) {
		size_t cap = k->copied_cap ? k->copied_cap * 2 : 1024;
		struct copied_ref *p = qcow_realloc(k->copied, cap * sizeof(*p));
		if (!p)
			return -ENOMEM;
		k->copied = p;
		k->copied_cap = cap;
	}
	k->copied[k->ncopied++] = (struct copied_ref){ .c = c, .slot = slot, .flag = flag };
	return 0;
}

int qcow_check(const char *path, struct qcow_check_result *res, char *err, size_t errlen)
{
	struct qcow_io *io;
	struct qcow_header h;
	memset(res, 0, sizeof(*res));
	int ret = qcow_io_file_open(path, true, &io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot open %s: %s", path, strerror(-ret));
		return ret;
	}
	if (qcow_lock_writer_present(path)) {
		/* like qemu-img check: the counts of a live image are moving */
		qcow_set_error(err, errlen, "image %s is open for writing by another process (QEMU lock byte 101 is held); "
			       "unmount it first", path);
		qcow_io_close(io);
		return -EBUSY;
	}
	ret = qcow_header_read(io, &h, err, errlen);
	if (ret) {
		qcow_io_close(io);
		return ret;
	}
	uint64_t cs = 1ull << h.cluster_bits;
	uint64_t file_clusters = (h.file_size + cs - 1) / cs;
	struct count_ctx k = { .n = file_clusters ? file_clusters : 1 };
	k.refs = qcow_calloc(k.n, sizeof(*k.refs));
	k.fixed = qcow_calloc(k.n, 1);
	uint64_t *disk_rc = NULL;
	uint8_t *rt = qcow_malloc((size_t)h.refcount_table_clusters * cs);
	uint8_t *block = qcow_malloc(cs);
	if (!k.refs || !k.fixed || !rt || !block) {
		ret = -ENOMEM;
		goto out;
	}
	struct qcow_scan_geometry g = { .io = io, .hdr = &h, .file_clusters = file_clusters, .check_mode = true };
	struct qcow_scan_visitor v = { .visit = count_visit, .copied = copied_visit, .opaque = &k };
	ret = qcow_scan(&g, &v, err, errlen);
	if (ret)
		goto out;
	res->errors += g.problems;
	res->allocated_clusters = k.data_clusters;
	res->total_clusters = (h.size + cs - 1) / cs;

	ret = io->ops->pread(io, rt, (size_t)h.refcount_table_clusters * cs, h.refcount_table_offset);
	if (ret)
		goto out;
	unsigned order = h.refcount_order;
	unsigned rb_shift = h.cluster_bits + 3 - order;
	uint64_t entries = (uint64_t)h.refcount_table_clusters * cs / 8;
	uint64_t last_used = 0;
	bool any_used = false;
	for (uint64_t c = 0; c < k.n; c++)
		if (k.refs[c]) {
			last_used = c;
			any_used = true;
		}
	uint64_t limit = k.n;
	for (uint64_t b = 0; b < entries; b++)
		if (qcow_get_be64(rt + b * 8) && ((b + 1) << rb_shift) > limit)
			limit = (b + 1) << rb_shift;
	disk_rc = qcow_calloc(limit, sizeof(*disk_rc));
	if (!disk_rc) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint64_t b = 0; (b << rb_shift) < limit; b++) {
		uint64_t host = b < entries ? qcow_get_be64(rt + b * 8) & QCOW_REFT_OFFSET_MASK : 0;
		bool readable = host && !(host & (cs - 1)) && host < h.file_size;
		if (readable) {
			ret = io->ops->pread(io, block, cs, host);
			if (ret)
				goto out;
		} else {
			memset(block, 0, cs);
		}
		for (uint64_t i = 0; i < (1ull << rb_shift); i++) {
			uint64_t c = (b << rb_shift) + i;
			if (c >= limit)
				break;
			uint64_t disk = qcow_rc_get(block, order, i);
			uint64_t refs = c < k.n ? k.refs[c] : 0;
			disk_rc[c] = disk;
			if (disk && c >= last_used) {
				/* like qemu-img: the image ends after the last
				 * cluster in use by either count, leaks included */
				last_used = c;
				any_used = true;
			}
			if (c < k.n && k.fixed[c] && refs > 1) {
				qcow_logf(QCOW_LOG_ERROR, "ERROR cluster %" PRIu64 " is a header structure or refcount block but is referenced %" PRIu64 " times",
					  c, refs);
				res->errors++;
			}
			if (refs && refs > disk) {
				qcow_logf(QCOW_LOG_ERROR, "ERROR cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64, c, disk, refs);
				res->errors++;
			} else if (disk > refs) {
				qcow_logf(QCOW_LOG_WARNING, "Leaked cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64, c, disk, refs);
				res->leaks++;
			}
			if (refs)
				res->clusters_used++;
			else if (c < file_clusters)
				res->clusters_free++;
		}
	}
	/* COPIED must say exactly "refcount is 1" in the active tables:
	 * set with a higher count lets writes leak into snapshots */
	for (size_t i = 0; i < k.ncopied; i++) {
		struct copied_ref *r = &k.copied[i];
		uint64_t disk = r->c < limit ? disk_rc[r->c] : 0;
		if ((disk == 1) != r->flag) {
			qcow_logf(QCOW_LOG_ERROR, "ERROR OFLAG_COPIED: entry at offset 0x%" PRIx64 " for cluster %" PRIu64
				  " has COPIED %s but refcount=%" PRIu64, r->slot, r->c, r->flag ? "set" : "clear", disk);
			res->errors++;
		}
	}
	res->image_end_offset = any_used ? (last_used + 1) * cs : cs;
	ret = 0;
out:
	qcow_free(k.refs);
	qcow_free(k.fixed);
	qcow_free(k.copied);
	qcow_free(disk_rc);
	qcow_free(rt);
	qcow_free(block);
	qcow_header_free(&h);
	qcow_io_close(io);
	return ret;
}
