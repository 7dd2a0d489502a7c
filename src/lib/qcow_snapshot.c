/*
 * qcow_snapshot.c - internal snapshots: list, create, delete, apply
 * (goto), the snapshot table and snapshot L1 tables moving down, and the
 * read-only view of one snapshot (doc/design.md, "Internal snapshots").
 *
 * Owns: the snapshot table (reading, encoding, writing a new copy) and
 * the reference changes of whole L1 trees.  Layer: above the flush (it
 * flushes) and the table services, below the recycler (which calls
 * qcow_snapshot_relocate) and the API files (qcow_open.c opens a snapshot
 * view through qcow_snapshot_load_view).
 * Rules:
 *  - Everything runs with flush_lock held from start to end, so no other
 *    flush, resize or compaction pointer rewrite sees half of it; guest
 *    I/O goes on (it takes img->lock only).
 *  - The snapshot table and snapshot L1 tables are never changed in
 *    place: a new copy is written into new clusters, made durable, and
 *    the header switched to it with one write of its first sector; the
 *    old clusters are freed by the flush that wrote the switch.
 *  - References follow the map interface of qcow_map.h: an L2 table from
 *    the slot of its L1 entry, a data cluster (or each host cluster of a
 *    compressed descriptor) from the slot of its L2 entry, whole tables
 *    pinned with slot 0.  Each L1 path counts once, as QEMU counts.
 *  - COPIED says "refcount is exactly 1" in the active tree, and no crash
 *    may leave it set on a cluster that has another reference.  The
 *    change of a refcount and of the flag pointing at it cannot be one
 *    write, so on version 3 images the dirty bit (QEMU's "refcounts may
 *    be wrong, repair at open") is made durable before the first of them
 *    and cleared by the header write that ends the operation.  The write
 *    order of each operation and its crash states are in doc/design.md.
 *  - Errors are negative errnos; an operation that fails before its
 *    header switch gives back what it took in memory; the image on disk
 *    stays as consistent as at any crash (at worst marked dirty).
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define SN_FIXED 40u              /* fixed part of a table entry */
#define SN_EXTRA_NEW 24u          /* extra data QEMU writes: vm state, disk size, icount */
#define SN_MAX_EXTRA 1024u
#define SN_MAX_TABLE (64ull << 20)

struct sn_entry {
	uint64_t l1_offset;
	uint32_t l1_size;
	char *id, *name;          /* NUL-terminated copies */
	uint16_t id_len, name_len;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	uint32_t vm_state_size32;
	uint8_t *extra;           /* kept byte-exact: unknown extra data survives */
	uint32_t extra_len;
};

struct sn_table {
	struct sn_entry *v;
	uint32_t n;
};

static void table_free(struct sn_table *t)
{
	for (uint32_t i = 0; i < t->n; i++) {
		qcow_free(t->v[i].id);
		qcow_free(t->v[i].name);
		qcow_free(t->v[i].extra);
	}
	qcow_free(t->v);
	t->v = NULL;
	t->n = 0;
}

static char *dup_bytes(const uint8_t *p, size_t n)
{
	char *s = qcow_malloc(n + 1);
	if (s) {
		memcpy(s, p, n);
		s[n] = 0;
	}
	return s;
}

/* Reads the snapshot table the header points at (validated at open by
 * qcow_scan; read again here because only this file writes it, under
 * flush_lock). */
static int table_read(struct qcow_io *io, const struct qcow_header *h, struct sn_table *t)
{
	memset(t, 0, sizeof(*t));
	if (!h->nb_snapshots)
		return 0;
	t->v = qcow_calloc(h->nb_snapshots, sizeof(*t->v));
	if (!t->v)
		return -ENOMEM;
	uint64_t pos = h->snapshots_offset;
	int ret = 0;
	for (uint32_t i = 0; i < h->nb_snapshots; i++) {
		uint8_t f[SN_FIXED];
		ret = io->ops->pread(io, f, sizeof(f), pos);
		if (ret)
			goto out;
		struct sn_entry *e = &t->v[i];
		t->n = i + 1;
		e->l1_offset = qcow_get_be64(f);
		e->l1_size = qcow_get_be32(f + 8);
		e->id_len = qcow_get_be16(f + 12);
		e->name_len = qcow_get_be16(f + 14);
		e->date_sec = qcow_get_be32(f + 16);
		e->date_nsec = qcow_get_be32(f + 20);
		e->vm_clock_nsec = qcow_get_be64(f + 24);
		e->vm_state_size32 = qcow_get_be32(f + 32);
		e->extra_len = qcow_get_be32(f + 36);
		if (e->extra_len > SN_MAX_EXTRA) {
			qcow_logf(QCOW_LOG_ERROR, "snapshot table entry %u at offset 0x%" PRIx64 " has %u bytes of extra data (at most %u)",
				  i, pos, e->extra_len, SN_MAX_EXTRA);
			ret = -EINVAL;
			goto out;
		}
		size_t var = (size_t)e->extra_len + e->id_len + e->name_len;
		uint8_t *b = qcow_malloc(var ? var : 1);
		if (!b) {
			ret = -ENOMEM;
			goto out;
		}
		ret = var ? io->ops->pread(io, b, var, pos + SN_FIXED) : 0;
		if (!ret) {
			e->extra = qcow_malloc(e->extra_len ? e->extra_len : 1);
			e->id = dup_bytes(b + e->extra_len, e->id_len);
			e->name = dup_bytes(b + e->extra_len + e->id_len, e->name_len);
			if (!e->extra || !e->id || !e->name)
				ret = -ENOMEM;
			else
				memcpy(e->extra, b, e->extra_len);
		}
		qcow_free(b);
		if (ret)
			goto out;
		pos += (SN_FIXED + var + 7) & ~7ull;
	}
out:
	if (ret)
		table_free(t);
	return ret;
}

static uint64_t entry_bytes(const struct sn_entry *e)
{
	return (SN_FIXED + (uint64_t)e->extra_len + e->id_len + e->name_len + 7) & ~7ull;
}

static uint64_t table_bytes(const struct sn_table *t)
{
	uint64_t n = 0;
	for (uint32_t i = 0; i < t->n; i++)
		n += entry_bytes(&t->v[i]);
	return n;
}

/* The table in its on-disk form, zero padded to whole clusters. */
static uint8_t *table_encode(const struct sn_table *t, uint64_t cs, uint64_t *clusters)
{
	uint64_t bytes = table_bytes(t);
	*clusters = (bytes + cs - 1) / cs;
	uint8_t *buf = qcow_calloc(*clusters ? *clusters : 1, cs);
	if (!buf)
		return NULL;
	uint8_t *p = buf;
	for (uint32_t i = 0; i < t->n; i++) {
		const struct sn_entry *e = &t->v[i];
		qcow_put_be64(p, e->l1_offset);
		qcow_put_be32(p + 8, e->l1_size);
		p[12] = (uint8_t)(e->id_len >> 8);
		p[13] = (uint8_t)e->id_len;
		p[14] = (uint8_t)(e->name_len >> 8);
		p[15] = (uint8_t)e->name_len;
		qcow_put_be32(p + 16, e->date_sec);
		qcow_put_be32(p + 20, e->date_nsec);
		qcow_put_be64(p + 24, e->vm_clock_nsec);
		qcow_put_be32(p + 32, e->vm_state_size32);
		qcow_put_be32(p + 36, e->extra_len);
		memcpy(p + SN_FIXED, e->extra, e->extra_len);
		memcpy(p + SN_FIXED + e->extra_len, e->id, e->id_len);
		memcpy(p + SN_FIXED + e->extra_len + e->id_len, e->name, e->name_len);
		p += entry_bytes(e);
	}
	return buf;
}

/* The guest disk size a snapshot was taken with: its extra data, or (as
 * QEMU assumes for old entries) the current size. */
static uint64_t entry_disk_size(const struct sn_entry *e, uint64_t current)
{
	return e->extra_len >= 16 ? qcow_get_be64(e->extra + 8) : current;
}

static uint64_t entry_vm_state(const struct sn_entry *e)
{
	return e->extra_len >= 8 ? qcow_get_be64(e->extra) : e->vm_state_size32;
}

/* QEMU's lookup (qemu-img snapshot -a/-d): an id first, then a name. */
static int table_find(const struct sn_table *t, const char *key)
{
	for (uint32_t i = 0; i < t->n; i++)
		if (!strcmp(t->v[i].id, key))
			return (int)i;
	for (uint32_t i = 0; i < t->n; i++)
		if (!strcmp(t->v[i].name, key))
			return (int)i;
	return -1;
}

/* ---- whole L1 trees ----------------------------------------------------- */

enum tree_op {
	TREE_ADD,       /* one more reference from each pointer; COPIED cleared on the way */
	TREE_UNDO_ADD,  /* exactly reverses TREE_ADD (nothing durable points there yet) */
	TREE_RELEASE,   /* the pointers go: references dropped after the next flush */
	TREE_COPIED,    /* COPIED exactly where the refcount is 1 (active tree only) */
	TREE_CHECK,     /* -ERANGE if a refcount exceeds what the image's width holds */
};

static void ref_add(struct qcow_image *img, uint64_t c, uint64_t slot)
{
	/* a copy made by a move would not carry the new reference */
	qcow_map_move_cancel(&img->map, c);
	qcow_map_add_ref(&img->map, c, slot);
}

static void ref_release(struct qcow_image *img, uint64_t c, uint64_t slot)
{
	qcow_map_move_cancel(&img->map, c);
	bool last = qcow_map_refcount(&img->map, c) <= 1;
	qcow_free_after_flush(img, c, slot);
	if (last) {
		/* a cached copy of a freed table must not outlive it (the
		 * cluster is reused after the flush) */
		struct qcow_cached *t = qcow_cache_find(&img->cache, c);
		if (t)
			qcow_cache_remove(&img->cache, t);
	}
}

/* Applies op to every reference of the tree under the L1 table l1 (n
 * entries, host endian) whose entries live at file offset l1_off.
 * img->lock held.  On an I/O error *done says how many L1 entries were
 * processed completely. */
static int tree_walk(struct qcow_image *img, enum tree_op op, uint64_t *l1, uint32_t n, uint64_t l1_off,
		     bool active, uint32_t *done)
{
	qcow_assert_locked(img);
	uint64_t per = 1ull << img->l2_bits;
	uint64_t max = qcow_rc_max(img->hdr.refcount_order);
	*done = 0;
	for (uint32_t i = 0; i < n; i++, *done = i) {
		uint64_t l2off = l1[i] & QCOW_L1E_OFFSET_MASK;
		uint64_t l2c = l2off >> img->cluster_bits;
		uint64_t l1_slot = l1_off + (uint64_t)i * 8;
		if (!l2off || l2c >= img->map.nclusters)
			continue;
		int ret;
		struct qcow_cached *t = qcow_l2_get(img, l2c, &ret);
		if (!t)
			return ret ? ret : -ENOMEM;
		for (uint64_t j = 0; j < per; j++) {
			uint64_t e = qcow_l2_entry(img, t, j), first, last;
			uint64_t slot = qcow_l2_slot(img, l2c, j);
			if (!e || !qcow_entry_clusters(img, e, &first, &last) || first >= img->map.nclusters)
				continue;   /* (the open's scan refused pointers past the map) */
			for (uint64_t c = first; c <= last && c < img->map.nclusters; c++) {
				if (op == TREE_ADD)
					ref_add(img, c, slot);
				else if (op == TREE_UNDO_ADD)
					qcow_map_drop_ref(&img->map, c, slot);
				else if (op == TREE_RELEASE)
					ref_release(img, c, slot);
				else if (op == TREE_CHECK && qcow_map_refcount(&img->map, c) > max)
					return -ERANGE;
			}
			if (op == TREE_CHECK)
				continue;
			if (e & QCOW_OFLAG_COMPRESSED)
				continue;   /* never COPIED */
			uint64_t want = e;
			if (op == TREE_ADD)
				want = e & ~QCOW_OFLAG_COPIED;
			else if (op == TREE_COPIED || (op == TREE_UNDO_ADD && active))
				want = qcow_map_refcount(&img->map, first) == 1 ? e | QCOW_OFLAG_COPIED : e & ~QCOW_OFLAG_COPIED;
			if (want != e && op != TREE_RELEASE)
				qcow_l2_set_entry(img, t, j, want);
		}
		if (op == TREE_CHECK) {
			if (qcow_map_refcount(&img->map, l2c) > max)
				return -ERANGE;
			continue;
		}
		if (op == TREE_ADD)
			ref_add(img, l2c, l1_slot);
		else if (op == TREE_UNDO_ADD)
			qcow_map_drop_ref(&img->map, l2c, l1_slot);
		else if (op == TREE_RELEASE)
			ref_release(img, l2c, l1_slot);
		if (active && op != TREE_RELEASE) {
			/* the live entry: l1 may be a copy taken before an earlier
			 * walk changed the flags */
			uint64_t cur = img->l1[i];
			bool one = qcow_map_refcount(&img->map, l2c) == 1;
			uint64_t v = one && op != TREE_ADD ? cur | QCOW_OFLAG_COPIED : cur & ~QCOW_OFLAG_COPIED;
			if (v != cur)
				qcow_l1_set(img, i, v);
		}
	}
	*done = n;
	return 0;
}

/* ---- helpers ------------------------------------------------------------ */

static uint64_t clusters_for(struct qcow_image *img, uint64_t bytes)
{
	return (bytes + img->cluster_size - 1) >> img->cluster_bits;
}

/* n contiguous new clusters, pinned (a whole table); img->lock held. */
static int alloc_table(struct qcow_image *img, uint64_t n, uint64_t *start)
{
	*start = 0;
	if (!n)
		return 0;
	int ret = qcow_alloc_contiguous(img, n, start);
	if (ret)
		return ret;
	for (uint64_t i = 0; i < n; i++)
		qcow_map_set_pinned(&img->map, *start + i, 1);
	return 0;
}

/* Gives back a table allocated by alloc_table that was never published:
 * it may hold a partial copy, so it is Junk (erased before reuse). */
static void free_unpublished(struct qcow_image *img, uint64_t start, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		qcow_map_set_state(&img->map, start + i, QCS_JUNK);
}

/* The dirty bit on (version 3) and durable, before the first refcount
 * or COPIED change of an operation.  flush_lock held. */
static int mark_dirty(struct qcow_image *img)
{
	if (img->hdr.version < 3)
		return 0;
	qcow_lock(img);
	img->hdr.incompatible_features |= QCOW_INCOMPAT_DIRTY;
	qcow_unlock(img);
	int ret = qcow_header_write_fields(img->io, &img->hdr, QH_INCOMPAT, 8);
	if (!ret) {
		ret = img->io->ops->flush(img->io);
		if (ret)
			qcow_set_failed(img, ret, "sync of the dirty bit");
	}
	return ret;
}

/* After an operation that failed (ret) was taken back in memory: if it
 * had set the dirty bit (marked) but no flush of it was attempted, the
 * disk holds exactly what it held before plus that bit, which the next
 * flush may clear again.  Otherwise a failed flush may have left raised
 * refcounts or cleared flags behind: the bit stays until the next open
 * repairs.  Takes img->lock. */
static void undo_dirty(struct qcow_image *img, int ret, bool marked, bool flushed)
{
	if (!ret || !marked || flushed || img->hdr.version < 3)
		return;
	qcow_lock(img);
	img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
	img->header_dirty = true;
	qcow_unlock(img);
}

/* The header's snapshot fields (not in qcow_header_encode: patched into
 * the raw copy here, which the flush writes with the rest); the dirty bit
 * goes with them.  img->lock held. */
static void set_header_snapshots(struct qcow_image *img, uint32_t n, uint64_t off)
{
	img->hdr.nb_snapshots = n;
	img->hdr.snapshots_offset = off;
	qcow_put_be32(img->hdr.raw + QH_NB_SNAPSHOTS, n);
	qcow_put_be64(img->hdr.raw + QH_SNAPSHOTS_OFFSET, off);
	img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
	img->header_dirty = true;
}

/* Writes buf (whole clusters) at cluster start; not durable yet (the
 * next flush's first sync makes it so, before the header points there). */
static int write_clusters(struct qcow_image *img, const void *buf, uint64_t start, uint64_t n)
{
	if (!n)
		return 0;
	int ret = img->io->ops->pwrite(img->io, buf, n << img->cluster_bits, start << img->cluster_bits);
	if (!ret) {
		qcow_lock(img);
		img->data_dirty = true;
		qcow_unlock(img);
	}
	return ret;
}

/* A snapshot's L1 table from disk, host endian, n entries. */
static int read_l1(struct qcow_image *img, uint64_t off, uint32_t n, uint64_t **out)
{
	*out = qcow_calloc(n ? n : 1, 8);
	if (!*out)
		return -ENOMEM;
	if (!n)
		return 0;
	uint8_t *b = qcow_malloc((size_t)n * 8);
	int ret = b ? img->io->ops->pread(img->io, b, (size_t)n * 8, off) : -ENOMEM;
	for (uint32_t i = 0; ret == 0 && i < n; i++)
		(*out)[i] = qcow_get_be64(b + (size_t)i * 8);
	qcow_free(b);
	if (ret) {
		qcow_free(*out);
		*out = NULL;
	}
	return ret;
}

/* The common start of every change: flush_lock taken, engine healthy,
 * everything so far durable, the table read. */
static int op_begin(struct qcow_image *img, struct sn_table *t)
{
	memset(t, 0, sizeof(*t));
	if (img->read_only)
		return -EROFS;
	pthread_mutex_lock(&img->flush_lock);
	int ret = qcow_health_failed(img) ? -EIO : 0;
	if (!ret)
		ret = qcow_flush_holding_flush_lock(img);
	if (!ret)
		ret = table_read(img->io, &img->hdr, t);
	if (ret)
		pthread_mutex_unlock(&img->flush_lock);
	return ret;
}

static void op_end(struct qcow_image *img, struct sn_table *t, int ret, const char *what)
{
	table_free(t);
	if (ret)
		qcow_note_error(img, ret, what);
	pthread_mutex_unlock(&img->flush_lock);
}

/* ---- create ------------------------------------------------------------- */

/* QEMU's id for a new snapshot: one more than the largest numeric id. */
static void new_id(const struct sn_table *t, char *out, size_t len)
{
	unsigned long max = 0;
	for (uint32_t i = 0; i < t->n; i++) {
		unsigned long v = strtoul(t->v[i].id, NULL, 10);
		if (v > max)
			max = v;
	}
	snprintf(out, len, "%lu", max + 1);
}

int qcow_snapshot_create(struct qcow_image *img, const char *name)
{
	struct sn_table t;
	uint64_t *l1 = NULL;
	uint8_t *l1buf = NULL, *tbuf = NULL;
	uint64_t l1_start = 0, l1_n = 0, t_start = 0, t_n = 0;
	uint32_t done = 0;
	bool refs_added = false, flushed = false, marked = false;
	size_t name_len = name ? strlen(name) : 0;
	if (!name_len || name_len > QCOW_SNAPSHOT_NAME_MAX)
		return -EINVAL;
	/* as QEMU: the data file is overwritten in place, a snapshot could
	 * keep nothing */
	if (qcow_datafile_present(img))
		return -ENOTSUP;
	int ret = op_begin(img, &t);
	if (ret)
		return ret;
	if (table_find(&t, name) >= 0) {
		ret = -EEXIST;
		goto out;
	}
	if (t.n >= QCOW_MAX_SNAPSHOTS) {
		ret = -EFBIG;
		goto out;
	}
	if (img->hdr.refcount_order == 0) {
		ret = -ENOTSUP;   /* 1-bit refcounts cannot share a cluster */
		goto out;
	}

	/* the new entry (QEMU's qemu-img snapshot -c: wall clock, no VM) */
	struct sn_entry *nv = qcow_realloc(t.v, (t.n + 1) * sizeof(*t.v));
	if (!nv) {
		ret = -ENOMEM;
		goto out;
	}
	t.v = nv;
	struct sn_entry *e = &t.v[t.n];
	memset(e, 0, sizeof(*e));
	char id[24];
	new_id(&t, id, sizeof(id));
	struct timeval tv;
	gettimeofday(&tv, NULL);
	e->id = dup_bytes((const uint8_t *)id, strlen(id));
	e->name = dup_bytes((const uint8_t *)name, name_len);
	e->extra = qcow_calloc(1, SN_EXTRA_NEW);
	t.n++;
	if (!e->id || !e->name || !e->extra) {
		ret = -ENOMEM;
		goto out;
	}
	e->id_len = (uint16_t)strlen(id);
	e->name_len = (uint16_t)name_len;
	e->date_sec = (uint32_t)tv.tv_sec;
	e->date_nsec = (uint32_t)tv.tv_usec * 1000;
	e->extra_len = SN_EXTRA_NEW;
	qcow_put_be64(e->extra, 0);                          /* vm state size */
	qcow_put_be64(e->extra + 8, img->virtual_size);      /* disk size */
	qcow_put_be64(e->extra + 16, 0);                     /* icount, as qemu-img snapshot -c writes it */
	if (table_bytes(&t) > SN_MAX_TABLE) {
		ret = -EFBIG;
		goto out;
	}

	marked = true;
	ret = mark_dirty(img);
	if (ret)
		goto out;

	qcow_lock(img);
	uint32_t l1_size = img->hdr.l1_size;
	l1_n = clusters_for(img, (uint64_t)l1_size * 8);
	ret = alloc_table(img, l1_n, &l1_start);
	if (!ret) {
		e->l1_offset = l1_start << img->cluster_bits;
		e->l1_size = l1_size;
		tbuf = table_encode(&t, img->cluster_size, &t_n);
		ret = tbuf ? alloc_table(img, t_n, &t_start) : -ENOMEM;
		if (ret) {
			free_unpublished(img, l1_start, l1_n);
			l1_n = 0;
		}
	}
	if (!ret) {
		l1buf = qcow_calloc(l1_n ? l1_n : 1, img->cluster_size);
		l1 = qcow_calloc(l1_size ? l1_size : 1, 8);
		if (!l1buf || !l1)
			ret = -ENOMEM;
	}
	if (!ret) {
		memcpy(l1, img->l1, (size_t)l1_size * 8);
		for (uint32_t i = 0; i < l1_size; i++)
			qcow_put_be64(l1buf + (size_t)i * 8, l1[i] & ~QCOW_OFLAG_COPIED);
		refs_added = true;
		ret = tree_walk(img, TREE_ADD, l1, l1_size, e->l1_offset, true, &done);
		/* QEMU refuses a count past the width too (ERANGE) */
		uint32_t checked;
		if (!ret)
			ret = tree_walk(img, TREE_CHECK, l1, l1_size, e->l1_offset, false, &checked);
	}
	uint64_t ticket = qcow_inflight_ticket(img);
	qcow_unlock(img);
	if (ret)
		goto out;
	/* writes that resolved before the references were added may still
	 * be writing in place into clusters the snapshot now shares: they
	 * end before the snapshot is published (later ones copy) */
	qcow_inflight_wait_before(img, ticket);

	ret = write_clusters(img, l1buf, l1_start, l1_n);
	if (!ret)
		ret = write_clusters(img, tbuf, t_start, t_n);
	/* 1: refcounts raised, the new tables and the cleared COPIED flags durable */
	if (!ret) {
		flushed = true;
		ret = qcow_flush_holding_flush_lock(img);
	}
	if (ret)
		goto out;
	/* 2: the header switch (and the dirty bit off) in one write; the old
	 * table is freed by the flush that wrote it */
	qcow_lock(img);
	uint64_t old_off = img->hdr.snapshots_offset, old_n = 0;
	if (img->hdr.nb_snapshots) {
		struct sn_table old = { .v = t.v, .n = t.n - 1 };
		old_n = clusters_for(img, table_bytes(&old));
	}
	ret = old_n ? qcow_pending_free_add(img, old_off >> img->cluster_bits, old_n) : 0;
	if (ret)
		qcow_logf(QCOW_LOG_WARNING, "out of memory: the old snapshot table at 0x%" PRIx64 " stays allocated (a leak)", old_off);
	set_header_snapshots(img, t.n, t_start << img->cluster_bits);
	qcow_unlock(img);
	refs_added = false;   /* published in memory: the flush below (or a later one) writes it */
	ret = qcow_flush_holding_flush_lock(img);
	if (!ret)
		qcow_logf(QCOW_LOG_DEBUG, "snapshot '%s' (id %s) created: L1 table at 0x%" PRIx64 ", table at 0x%" PRIx64,
			  name, id, l1_start << img->cluster_bits, t_start << img->cluster_bits);
out:
	if (ret && refs_added) {
		/* nothing durable points at the new tables: take everything
		 * back (the dirty bit stays until the next open repairs) */
		qcow_lock(img);
		uint32_t undone;
		if (done && tree_walk(img, TREE_UNDO_ADD, l1, done, e->l1_offset, true, &undone))
			qcow_set_failed(img, -EIO, "undoing a failed snapshot create");
		free_unpublished(img, l1_start, l1_n);
		free_unpublished(img, t_start, t_n);
		qcow_unlock(img);
	}
	undo_dirty(img, ret, marked, flushed);
	qcow_free(l1);
	qcow_free(l1buf);
	qcow_free(tbuf);
	op_end(img, &t, ret, "snapshot create");
	return ret;
}

/* ---- delete ------------------------------------------------------------- */

/* Writes the table without entry k into new clusters and publishes it in
 * memory (header fields, dirty bit off, old table and snapshot L1 to free
 * after the flush that writes the header).  flush_lock held. */
static int publish_without(struct qcow_image *img, struct sn_table *t, uint32_t k, uint64_t *t_start, uint64_t *t_n)
{
	struct sn_entry gone = t->v[k];
	memmove(&t->v[k], &t->v[k + 1], (t->n - k - 1) * sizeof(*t->v));
	t->n--;
	uint8_t *tbuf = table_encode(t, img->cluster_size, t_n);
	/* keep the removed entry's memory owned by the table for freeing */
	t->v[t->n] = gone;
	if (!tbuf)
		return -ENOMEM;
	qcow_lock(img);
	int ret = alloc_table(img, *t_n, t_start);
	qcow_unlock(img);
	if (!ret)
		ret = write_clusters(img, tbuf, *t_start, *t_n);
	qcow_free(tbuf);
	if (ret) {
		qcow_lock(img);
		free_unpublished(img, *t_start, *t_n);
		qcow_unlock(img);
		*t_n = 0;
	}
	return ret;
}

int qcow_snapshot_delete(struct qcow_image *img, const char *key)
{
	struct sn_table t;
	uint64_t *sl1 = NULL;
	uint64_t t_start = 0, t_n = 0;
	bool removed = false, marked = false, flushed = false;
	int ret = op_begin(img, &t);
	if (ret)
		return ret;
	int k = table_find(&t, key);
	if (k < 0) {
		ret = -ENOENT;
		goto out;
	}
	if (qcow_snapshot_reader_present(img)) {
		ret = -EBUSY;
		goto out;
	}
	struct sn_entry e = t.v[k];
	ret = read_l1(img, e.l1_offset, e.l1_size, &sl1);
	if (!ret) {
		marked = true;
		ret = mark_dirty(img);
	}
	/* 1: a table without the entry, durable with the next flush */
	if (!ret) {
		ret = publish_without(img, &t, (uint32_t)k, &t_start, &t_n);
		removed = true;
	}
	if (ret)
		goto out;
	/* 2: the header switch; the snapshot's references go after the
	 * flush that makes it durable (Pending until then) */
	qcow_lock(img);
	uint64_t old_off = img->hdr.snapshots_offset;
	uint64_t old_n = clusters_for(img, table_bytes(&t) + entry_bytes(&t.v[t.n]));
	uint64_t l1_n = clusters_for(img, (uint64_t)e.l1_size * 8);
	if (qcow_pending_free_add(img, old_off >> img->cluster_bits, old_n) ||
	    (l1_n && qcow_pending_free_add(img, e.l1_offset >> img->cluster_bits, l1_n)))
		qcow_logf(QCOW_LOG_WARNING, "out of memory: old snapshot tables stay allocated (a leak)");
	uint32_t done;
	ret = tree_walk(img, TREE_RELEASE, sl1, e.l1_size, e.l1_offset, false, &done);
	set_header_snapshots(img, t.n, t_start << img->cluster_bits);
	if (img->hdr.version >= 3)
		img->hdr.incompatible_features |= QCOW_INCOMPAT_DIRTY;   /* until step 3 is durable */
	qcow_unlock(img);
	if (ret) {
		/* an L2 table could not be read: its references stay (leaks) */
		qcow_logf(QCOW_LOG_WARNING, "snapshot delete: %s; the clusters of the snapshot's L1 entries %u.. stay allocated (leaks)",
			  strerror(-ret), done);
	}
	flushed = true;
	ret = qcow_flush_holding_flush_lock(img);
	if (ret)
		goto out;
	/* 3: COPIED where the active tree's clusters are back to one
	 * reference (the refcounts were lowered by the flush above) */
	qcow_lock(img);
	ret = tree_walk(img, TREE_COPIED, img->l1, img->hdr.l1_size, img->hdr.l1_table_offset, true, &done);
	qcow_unlock(img);
	if (!ret)
		ret = qcow_flush_holding_flush_lock(img);
	/* 4: clean again */
	if (!ret && img->hdr.version >= 3) {
		qcow_lock(img);
		img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
		img->header_dirty = true;
		qcow_unlock(img);
		ret = qcow_flush_holding_flush_lock(img);
	}
	if (!ret)
		qcow_logf(QCOW_LOG_DEBUG, "snapshot '%s' (id %s) deleted", e.name, e.id);
out:
	undo_dirty(img, ret, marked, flushed);
	if (removed)
		t.n++;   /* the removed entry sits after the others: free it too */
	qcow_free(sl1);
	op_end(img, &t, ret, "snapshot delete");
	return ret;
}

/* ---- apply (goto) ------------------------------------------------------- */

int qcow_snapshot_apply(struct qcow_image *img, const char *key)
{
	struct sn_table t;
	uint64_t *sl1 = NULL, *nl1 = NULL;
	uint8_t *l1buf = NULL;
	uint64_t l1_start = 0, l1_n = 0;
	uint32_t done = 0;
	bool refs_added = false, flushed = false, marked = false;
	int ret = op_begin(img, &t);
	if (ret)
		return ret;
	int k = table_find(&t, key);
	if (k < 0) {
		ret = -ENOENT;
		goto out;
	}
	if (qcow_snapshot_reader_present(img)) {
		ret = -EBUSY;
		goto out;
	}
	struct sn_entry *e = &t.v[k];
	uint64_t size = entry_disk_size(e, img->hdr.size);
	uint64_t per_l1 = img->cluster_size << img->l2_bits;
	uint64_t need = size / per_l1 + (size % per_l1 != 0);
	uint32_t n = e->l1_size > need ? e->l1_size : (uint32_t)need;
	if ((uint64_t)n * 8 > QCOW_MAX_L1_BYTES) {
		ret = -EFBIG;
		goto out;
	}
	ret = read_l1(img, e->l1_offset, e->l1_size, &sl1);
	if (!ret) {
		marked = true;
		ret = mark_dirty(img);
	}
	if (ret)
		goto out;
	qcow_lock(img);
	l1_n = clusters_for(img, (uint64_t)n * 8);
	if (!l1_n)
		l1_n = 1;
	ret = alloc_table(img, l1_n, &l1_start);
	if (!ret) {
		nl1 = qcow_calloc(l1_n, img->cluster_size);   /* capacity: whole clusters */
		l1buf = qcow_calloc(l1_n, img->cluster_size);
		if (!nl1 || !l1buf) {
			ret = -ENOMEM;
			free_unpublished(img, l1_start, l1_n);
		}
	}
	if (!ret) {
		for (uint32_t i = 0; i < e->l1_size; i++) {
			nl1[i] = sl1[i] & ~QCOW_OFLAG_COPIED;
			qcow_put_be64(l1buf + (size_t)i * 8, nl1[i]);
		}
		/* the new active tree: every table and data cluster gains a
		 * reference from the new L1 (the snapshot keeps its own, so
		 * all of them are shared and none may keep COPIED, even where
		 * an earlier delete set it in the snapshot's tables) */
		refs_added = true;
		ret = tree_walk(img, TREE_ADD, nl1, n, l1_start << img->cluster_bits, false, &done);
		uint32_t checked;
		if (!ret)
			ret = tree_walk(img, TREE_CHECK, nl1, n, l1_start << img->cluster_bits, false, &checked);
	}
	qcow_unlock(img);
	if (!ret)
		ret = write_clusters(img, l1buf, l1_start, l1_n);
	/* 1: the new tree's refcounts, its L1 and its cleared flags durable */
	if (!ret) {
		flushed = true;
		ret = qcow_flush_holding_flush_lock(img);
	}
	if (ret)
		goto out;
	/* 2: switch: L1 offset, L1 size, disk size and the dirty bit off in
	 * one header write; the old tree's references go after it */
	qcow_lock(img);
	uint64_t old_off = img->hdr.l1_table_offset;
	uint64_t old_n = clusters_for(img, (uint64_t)img->hdr.l1_size * 8);
	uint32_t odone;
	ret = tree_walk(img, TREE_RELEASE, img->l1, img->hdr.l1_size, old_off, false, &odone);
	if (ret)
		qcow_logf(QCOW_LOG_WARNING, "snapshot apply: %s; the old active tree's clusters from L1 entry %u on stay allocated (leaks)",
			  strerror(-ret), odone);
	if (old_n && qcow_pending_free_add(img, old_off >> img->cluster_bits, old_n))
		qcow_logf(QCOW_LOG_WARNING, "out of memory: the old L1 table at 0x%" PRIx64 " stays allocated (a leak)", old_off);
	ret = qcow_bitmap_resize(&img->l1_dirty, l1_n);
	if (ret)
		qcow_logf(QCOW_LOG_WARNING, "out of memory resizing the L1 dirty map");
	qcow_free(img->l1);
	img->l1 = nl1;
	nl1 = NULL;
	img->l1_capacity = (uint32_t)(l1_n * img->cluster_size / 8);
	img->hdr.l1_table_offset = l1_start << img->cluster_bits;
	img->hdr.l1_size = n;
	img->hdr.size = size;
	img->virtual_size = size & ~511ull;
	img->hdr.incompatible_features &= ~QCOW_INCOMPAT_DIRTY;
	img->header_dirty = true;
	refs_added = false;
	qcow_unlock(img);
	ret = qcow_flush_holding_flush_lock(img);
	if (!ret)
		qcow_logf(QCOW_LOG_DEBUG, "snapshot '%s' (id %s) applied: the disk is %" PRIu64 " bytes", e->name, e->id, size);
out:
	if (ret && refs_added) {
		qcow_lock(img);
		uint32_t undone;
		if (done && tree_walk(img, TREE_UNDO_ADD, nl1, done, l1_start << img->cluster_bits, false, &undone))
			qcow_set_failed(img, -EIO, "undoing a failed snapshot apply");
		free_unpublished(img, l1_start, l1_n);
		qcow_unlock(img);
	}
	undo_dirty(img, ret, marked, flushed);
	qcow_free(sl1);
	qcow_free(nl1);
	qcow_free(l1buf);
	op_end(img, &t, ret, "snapshot apply");
	return ret;
}

/* ---- list, any, view ---------------------------------------------------- */

/* One entry of the table as the public API shows it; cur is the image's
 * virtual size (QEMU's disk size of entries that do not record one). */
static void entry_info(const struct sn_entry *e, uint64_t cur, struct qcow_snapshot_info *v)
{
	snprintf(v->id, sizeof(v->id), "%s", e->id);
	snprintf(v->name, sizeof(v->name), "%s", e->name);
	v->date_sec = e->date_sec;
	v->date_nsec = e->date_nsec;
	v->vm_clock_nsec = e->vm_clock_nsec;
	v->vm_state_size = entry_vm_state(e);
	v->disk_size = entry_disk_size(e, cur);
	v->l1_offset = e->l1_offset;
	v->l1_size = e->l1_size;
	/* QEMU: the icount is extra data bytes 16..23, "none" (-1) in
	 * entries written before it existed */
	v->icount = e->extra_len >= 24 ? (int64_t)qcow_get_be64(e->extra + 16) : -1;
}

/* The table read by table_read, as an array the caller frees with free(). */
static int table_to_info(struct sn_table *t, uint64_t cur, struct qcow_snapshot_info **out, uint32_t *count)
{
	struct qcow_snapshot_info *v = calloc(t->n ? t->n : 1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (uint32_t i = 0; i < t->n; i++)
		entry_info(&t->v[i], cur, &v[i]);
	*out = v;
	*count = t->n;
	return 0;
}

int qcow_snapshot_list(struct qcow_image *img, struct qcow_snapshot_info **out, uint32_t *count)
{
	struct sn_table t;
	*out = NULL;
	*count = 0;
	pthread_mutex_lock(&img->flush_lock);
	int ret = table_read(img->io, &img->hdr, &t);
	uint64_t cur = img->hdr.size;
	pthread_mutex_unlock(&img->flush_lock);
	if (ret)
		return ret;
	ret = table_to_info(&t, cur, out, count);
	table_free(&t);
	return ret;
}

int qcow_snapshot_list_file(const char *path, struct qcow_snapshot_info **out, uint32_t *count,
			    char *err, size_t errlen)
{
	struct qcow_io *io;
	struct qcow_header h;
	struct sn_table t;

	*out = NULL;
	*count = 0;
	int ret = qcow_io_file_open(path, true, &io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot open %s: %s", path, strerror(-ret));
		return ret;
	}
	ret = qcow_header_read_info(io, &h, err, errlen);
	if (ret)
		goto out;
	ret = table_read(io, &h, &t);
	if (ret == 0) {
		ret = table_to_info(&t, h.size, out, count);
		table_free(&t);
	} else {
		qcow_set_error(err, errlen, "cannot read the snapshot table (%u entries at offset 0x%" PRIx64 "): %s",
			       h.nb_snapshots, h.snapshots_offset, strerror(-ret));
	}
	qcow_header_free(&h);
out:
	qcow_io_close(io);
	return ret;
}

bool qcow_snapshot_any(struct qcow_image *img)
{
	return img->hdr.nb_snapshots != 0;
}

int qcow_snapshot_load_view(struct qcow_image *img, const char *key, char *err, size_t errlen)
{
	struct sn_table t;
	uint64_t *l1 = NULL;
	int ret = table_read(img->io, &img->hdr, &t);
	if (ret) {
		qcow_set_error(err, errlen, "cannot read the snapshot table at 0x%" PRIx64 ": %s", img->hdr.snapshots_offset, strerror(-ret));
		return ret;
	}
	int k = table_find(&t, key);
	if (k < 0) {
		qcow_set_error(err, errlen, "no snapshot with the id or name '%s' (the image has %u snapshots)", key, t.n);
		ret = -ENOENT;
		goto out;
	}
	struct sn_entry *e = &t.v[k];
	uint64_t size = entry_disk_size(e, img->hdr.size);
	uint64_t per_l1 = img->cluster_size << img->l2_bits;
	uint64_t need = size / per_l1 + (size % per_l1 != 0);
	uint32_t n = e->l1_size > need ? e->l1_size : (uint32_t)need;
	ret = read_l1(img, e->l1_offset, e->l1_size, &l1);
	if (ret) {
		qcow_set_error(err, errlen, "cannot read the L1 table of snapshot '%s' at 0x%" PRIx64 ": %s", e->name, e->l1_offset, strerror(-ret));
		goto out;
	}
	uint64_t *v = qcow_calloc(n ? n : 1, 8);
	if (!v) {
		ret = -ENOMEM;
		goto out;
	}
	memcpy(v, l1, (size_t)e->l1_size * 8);
	/* the view's reads go through img->l1 (read-only: nothing is ever
	 * written from this copy) */
	qcow_free(img->l1);
	img->l1 = v;
	img->l1_capacity = n;
	img->hdr.l1_size = n;
	img->hdr.l1_table_offset = e->l1_offset;
	img->virtual_size = size & ~511ull;
	qcow_logf(QCOW_LOG_INFO, "viewing snapshot '%s' (id %s): %" PRIu64 " bytes, read-only", e->name, e->id, size);
out:
	qcow_free(l1);
	table_free(&t);
	return ret;
}

/* ---- moving the snapshot table and snapshot L1 tables down ---------------- */

int qcow_snapshot_relocate(struct qcow_image *img)
{
	qcow_assert_flush_locked(img);
	struct sn_table t;
	uint8_t *l1buf = NULL, *tbuf = NULL;
	uint64_t l1_start = 0, l1_n = 0, t_start = 0, t_n = 0, old_l1 = 0;
	bool published = false;
	int pick = -1;
	if (img->read_only || !img->hdr.nb_snapshots || qcow_snapshot_reader_present(img))
		return 0;
	if (qcow_health_failed(img))
		return -EIO;
	int ret = table_read(img->io, &img->hdr, &t);
	if (ret)
		return ret;
	uint64_t cs = img->cluster_size;
	uint64_t old_t = img->hdr.snapshots_offset >> img->cluster_bits;
	uint64_t old_tn = clusters_for(img, table_bytes(&t));

	/* at most one snapshot L1 table per call: the highest one that has a
	 * lower Available run of its size; claimed at once (Available ->
	 * pinned table, nothing points there yet) */
	qcow_lock(img);
	for (uint32_t i = 0; i < t.n; i++) {
		uint64_t c = t.v[i].l1_offset >> img->cluster_bits;
		uint64_t k = clusters_for(img, (uint64_t)t.v[i].l1_size * 8);
		uint64_t dst = k ? qcow_map_available_run(&img->map, k, c) : UINT64_MAX;
		if (dst != UINT64_MAX && (pick < 0 || c > (t.v[pick].l1_offset >> img->cluster_bits))) {
			pick = (int)i;
			l1_start = dst;
			l1_n = k;
		}
	}
	for (uint64_t i = 0; pick >= 0 && i < l1_n; i++)
		qcow_map_set_pinned(&img->map, l1_start + i, 1);
	/* the table: a new copy whenever an L1 table moves (it names the L1
	 * offset), and whenever a lower run can take it */
	tbuf = table_encode(&t, cs, &t_n);   /* size only: the L1 offset is patched below */
	uint64_t dst = tbuf ? qcow_map_available_run(&img->map, t_n, old_t) : UINT64_MAX;
	if (!tbuf)
		ret = -ENOMEM;
	else if (dst != UINT64_MAX)
		for (uint64_t i = 0; i < t_n; i++)
			qcow_map_set_pinned(&img->map, (t_start = dst) + i, 1);
	else if (pick >= 0)
		ret = alloc_table(img, t_n, &t_start);
	qcow_unlock(img);
	if (ret || (pick < 0 && dst == UINT64_MAX))
		goto out;   /* (nothing lower to go to: ret 0) */

	/* the copies, durable with the flush below */
	if (pick >= 0) {
		struct sn_entry *e = &t.v[pick];
		old_l1 = e->l1_offset;
		l1buf = qcow_calloc(l1_n, cs);
		ret = l1buf ? img->io->ops->pread(img->io, l1buf, (size_t)e->l1_size * 8, old_l1) : -ENOMEM;
		if (!ret)
			ret = write_clusters(img, l1buf, l1_start, l1_n);
		e->l1_offset = l1_start << img->cluster_bits;
		qcow_free(tbuf);
		tbuf = ret ? NULL : table_encode(&t, cs, &t_n);
		if (!ret && !tbuf)
			ret = -ENOMEM;
	}
	if (!ret)
		ret = write_clusters(img, tbuf, t_start, t_n);
	if (!ret)
		ret = qcow_flush_holding_flush_lock(img);
	if (ret)
		goto out;

	/* the switch: in memory now (the moved L1's L2 tables hang off its
	 * new slots), on disk with the next flush, which frees the old
	 * clusters once the header it wrote is durable */
	qcow_lock(img);
	if (pick >= 0) {
		for (uint32_t i = 0; i < t.v[pick].l1_size; i++) {
			uint64_t c = (qcow_get_be64(l1buf + (size_t)i * 8) & QCOW_L1E_OFFSET_MASK) >> img->cluster_bits;
			if (c && c < img->map.nclusters)
				qcow_map_replace_ref(&img->map, c, old_l1 + (uint64_t)i * 8,
						     (l1_start << img->cluster_bits) + (uint64_t)i * 8);
		}
		if (qcow_pending_free_add(img, old_l1 >> img->cluster_bits, l1_n))
			qcow_logf(QCOW_LOG_WARNING, "out of memory: an old snapshot L1 table at 0x%" PRIx64 " stays allocated (a leak)",
				  old_l1);
	}
	if (qcow_pending_free_add(img, old_t, old_tn))
		qcow_logf(QCOW_LOG_WARNING, "out of memory: the old snapshot table at 0x%" PRIx64 " stays allocated (a leak)",
			  old_t << img->cluster_bits);
	bool dirty = img->hdr.incompatible_features & QCOW_INCOMPAT_DIRTY;
	set_header_snapshots(img, t.n, t_start << img->cluster_bits);
	if (dirty)
		img->hdr.incompatible_features |= QCOW_INCOMPAT_DIRTY;   /* not ours to clear */
	qcow_unlock(img);
	published = true;
	ret = qcow_flush_holding_flush_lock(img);
	if (!ret) {
		ret = 1;
		qcow_logf(QCOW_LOG_DEBUG, "snapshot table moved to 0x%" PRIx64 "%s", t_start << img->cluster_bits,
			  pick >= 0 ? ", and a snapshot L1 table down" : "");
	}
out:
	if (ret < 0 && !published) {
		/* nothing points at the new copies: they may be partial */
		qcow_lock(img);
		if (pick >= 0)
			free_unpublished(img, l1_start, l1_n);
		if (t_start)
			free_unpublished(img, t_start, t_n);
		qcow_unlock(img);
	}
	qcow_free(l1buf);
	qcow_free(tbuf);
	table_free(&t);
	return ret;
}

bool qcow_snapshot_reader_present(struct qcow_image *img)
{
	bool held = img->io->ops->other_reader && img->io->ops->other_reader(img->io);
	qcow_lock(img);
	img->snapshot_reader = held;
	qcow_unlock(img);
	return held;
}
