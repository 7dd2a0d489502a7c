/*
 * qcow_check.c - the offline consistency check (qcowctl check).
 *
 * Owns: counting every reference with the shared metadata walk
 * (qcow_scan in check mode) and comparing the counts with the on-disk
 * refcounts.  Reports like qemu-img check: a refcount below the number of
 * references is an error (data may be overwritten), above it is a leak.
 * Rules: never writes; takes no locks (it may run on an image QEMU has
 * open, as `qemu-img check -U` does).  The verdict class (clean, leaks,
 * corrupt, could not check) is QEMU's on every image: the same references
 * are counted (qcow_scan), only the clusters of the file are compared,
 * and memory and time follow the clusters referenced and the refcount
 * blocks present, never a header field.
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
	uint32_t *refs;          /* references per cluster, for clusters 0..n-1 */
	uint8_t *fixed;          /* 1: refcount block */
	uint64_t n;
	uint64_t data_clusters;
	struct copied_ref *copied;
	size_t ncopied, copied_cap;
};

/* The counts grow with the clusters referenced, never with a field or
 * the file size: a file ending in a huge hole costs nothing here. */
static int grow_counts(struct count_ctx *k, uint64_t c)
{
	uint64_t n = c + 1 > k->n + k->n / 2 ? c + 1 : k->n + k->n / 2;
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
	(void)slot;
	if (c >= k->n && grow_counts(k, c))
		return -ENOMEM;
	if (k->refs[c] != UINT32_MAX)
		k->refs[c]++;
	if (kind == QREF_REFBLOCK)
		k->fixed[c] = 1;
	else if (kind == QREF_DATA)
		k->data_clusters++;
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

/* On-disk refcount of cluster c (0 where the table has no block), reading
 * through a one-block cache. */
struct rc_reader {
	struct qcow_io *io;
	const struct qcow_header *h;
	const uint8_t *rt;
	uint64_t entries, cs;
	unsigned rb_shift;
	uint8_t *block;
	uint64_t cached;     /* block index held, UINT64_MAX: none */
};

static int rc_lookup(struct rc_reader *r, uint64_t c, uint64_t *out)
{
	uint64_t b = c >> r->rb_shift;
	uint64_t host = b < r->entries ? qcow_get_be64(r->rt + b * 8) & QCOW_REFT_OFFSET_MASK : 0;
	*out = 0;
	if (!host)
		return 0;
	if (r->cached != b) {
		int ret = r->io->ops->pread(r->io, r->block, r->cs, host);
		if (ret)
			return ret;
		r->cached = b;
	}
	*out = qcow_rc_get(r->block, r->h->refcount_order, c & ((1ull << r->rb_shift) - 1));
	return 0;
}

int qcow_check(const char *path, struct qcow_check_result *res, char *err, size_t errlen)
{
	struct qcow_io *io;
	struct qcow_header h;
	struct count_ctx k = { .n = 0 };
	uint8_t *rt = NULL, *block = NULL;
	memset(res, 0, sizeof(*res));
	memset(&h, 0, sizeof(h));
	int ret = qcow_io_file_open(path, true, &io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot open %s: %s", path, strerror(-ret));
		return ret;
	}
	if (qcow_lock_writer_present(path)) {
		/* like qemu-img check: the counts of a live image are moving */
		qcow_set_error(err, errlen, "image %s is open for writing by another process (QEMU lock byte 101 is held); "
			       "unmount it first", path);
		ret = -EBUSY;
		goto out;
	}
	ret = qcow_header_read_check(io, &h, err, errlen);
	if (ret)
		goto out;
	uint64_t cs = 1ull << h.cluster_bits;
	uint64_t file_clusters = (h.file_size + cs - 1) / cs;
	/* what QEMU's open refuses even for a check */
	if ((h.autoclear_features & 2) && !(h.incompatible_features & QCOW_INCOMPAT_DATA_FILE)) {
		qcow_set_error(err, errlen, "autoclear bit 1 (raw external data, header offset 88) is set but the image has no external data file");
		ret = -EINVAL;
		goto out;
	}
	if ((h.snapshots_offset & (cs - 1)) || h.snapshots_offset > (uint64_t)INT64_MAX - (uint64_t)h.nb_snapshots * 40) {
		qcow_set_error(err, errlen, "snapshot table offset 0x%" PRIx64 " (header offset 64) is invalid", h.snapshots_offset);
		ret = -EINVAL;
		goto out;
	}
	rt = qcow_malloc((size_t)h.refcount_table_clusters * cs + 8);
	block = qcow_malloc(cs);
	if (!rt || !block || grow_counts(&k, 1023)) {
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

	ret = h.refcount_table_clusters ? io->ops->pread(io, rt, (size_t)h.refcount_table_clusters * cs, h.refcount_table_offset) : 0;
	if (ret)
		goto out;
	unsigned order = h.refcount_order;
	unsigned rb_shift = h.cluster_bits + 3 - order;
	uint64_t per_block = 1ull << rb_shift;
	uint64_t entries = (uint64_t)h.refcount_table_clusters * cs / 8;
	uint64_t rc_max = qcow_rc_max(order);
	/* QEMU compares the clusters of the file, and those a table reaches
	 * into past its end; refcounts beyond are never looked at */
	uint64_t limit = file_clusters;
	for (uint64_t c = limit; c < k.n; c++)
		if (k.refs[c])
			limit = c + 1;
	if (g.reftable_unaligned) {
		for (uint64_t b = 0; b < entries && (b << rb_shift) < limit; b++) {
			uint64_t e = qcow_get_be64(rt + b * 8) & QCOW_REFT_OFFSET_MASK;
			if (e & (cs - 1)) {
				/* QEMU cannot read these refcounts: its check fails */
				qcow_set_error(err, errlen, "refcount block %" PRIu64 " (refcount table entry at 0x%" PRIx64 ") is not cluster aligned (0x%" PRIx64 "): "
					       "the refcounts it covers cannot be read", b, h.refcount_table_offset + b * 8, e);
				ret = -EIO;
				goto out;
			}
		}
	}
	uint64_t last_used = 0;
	bool any_used = false;
	for (uint64_t b = 0; (b << rb_shift) < limit; b++) {
		uint64_t first = b << rb_shift;
		uint64_t host = b < entries ? qcow_get_be64(rt + b * 8) & QCOW_REFT_OFFSET_MASK : 0;
		uint64_t span = limit - first < per_block ? limit - first : per_block;
		bool any_ref = false;
		for (uint64_t i = 0; i < span && first + i < k.n && !any_ref; i++)
			any_ref = k.refs[first + i] != 0;
		if (!host && !any_ref) {
			/* no block, nothing referenced: all free (holes cost
			 * one step per block) */
			res->clusters_free += first < file_clusters ? (file_clusters - first < span ? file_clusters - first : span) : 0;
			continue;
		}
		if (host) {
			ret = io->ops->pread(io, block, cs, host);
			if (ret)
				goto out;
		} else {
			memset(block, 0, cs);
		}
		for (uint64_t i = 0; i < span; i++) {
			uint64_t c = first + i;
			uint64_t disk = host ? qcow_rc_get(block, order, i) : 0;
			uint64_t refs = c < k.n ? k.refs[c] : 0;
			if (disk || refs) {
				last_used = c;
				any_used = true;
			}
			if (refs > rc_max) {
				qcow_logf(QCOW_LOG_ERROR, "ERROR cluster %" PRIu64 " has %" PRIu64 " references, more than the refcount width holds (%" PRIu64 ")",
					  c, refs, rc_max);
				res->errors++;
				refs = rc_max;
			}
			if (c < k.n && k.fixed[c] && refs != 1) {
				qcow_logf(QCOW_LOG_ERROR, "ERROR cluster %" PRIu64 " is a refcount block but is referenced %" PRIu64 " times",
					  c, refs);
				res->errors++;
			}
			if (refs > disk) {
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
	struct rc_reader rr = { .io = io, .h = &h, .rt = rt, .entries = entries, .cs = cs, .rb_shift = rb_shift,
				.block = block, .cached = UINT64_MAX };
	for (size_t i = 0; i < k.ncopied; i++) {
		struct copied_ref *r = &k.copied[i];
		uint64_t disk;
		ret = rc_lookup(&rr, r->c, &disk);
		if (ret)
			goto out;
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
	qcow_free(rt);
	qcow_free(block);
	qcow_header_free(&h);
	qcow_io_close(io);
	return ret;
}
