/*
 * qcow_persistent_bitmap.c - persistent dirty bitmaps (qcow2 spec,
 * "Bitmaps"), kept as QEMU keeps them while an image is open.
 *
 * Owns: the bitmap directory and tables in memory (img->pbitmaps), the
 * bits of the bitmaps a read-write open loads, their in_use flags, the
 * store at the clean close, moving the tables and the directory down for
 * compaction, and the bitmap list `qcowctl info` shows.
 * Rules (doc/design.md, "Persistent dirty bitmaps"):
 *  - The directory was validated by qcow_scan before anything here reads
 *    it; this file only re-checks what it needs to stay in bounds.
 *  - The directory and the bitmap tables are whole tables (pinned); every
 *    bitmap data cluster is a reference from the table entry that points
 *    at it (its slot), so compaction moves data clusters like data
 *    (qcow_slot_kind says QSLOT_BITMAP_TABLE) and tables through
 *    qcow_pbitmap_relocate.
 *  - A read-write open loads every enabled bitmap that is not in use and
 *    sets its in_use flag, durable before the first guest write.  Bitmaps
 *    already in use (inconsistent) and disabled ones are never changed.
 *  - Every guest write, zero or discard marks its granules
 *    (qcow_pbitmap_note) under the bitmaps' own lock, which nests inside
 *    nothing.
 *  - The clean close stores each loaded bitmap into new clusters with
 *    in_use clear: new tables, data and directory durable, then the
 *    header's directory pointer (one aligned 8-byte write), then the old
 *    clusters freed by the flush protocol.  Any failure before the pointer
 *    leaves the old directory with in_use set (QEMU: inconsistent).
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BME_IN_USE 1u
#define BME_AUTO 2u
#define BME_FIXED 24u          /* fixed part of a directory entry */
#define BTE_ALL_ONES 1ull      /* entry without cluster: every bit set */
#define EXT_DIR_OFFSET 24u     /* directory offset inside the extension (after type, length) */

static uint64_t granules(uint64_t size, unsigned g)
{
	return (size + (1ull << g) - 1) >> g;
}

static uint64_t table_entries(const struct qcow_image *img, uint64_t nbits)
{
	return ((nbits + 7) / 8 + img->cluster_size - 1) >> img->cluster_bits;
}

static uint64_t clusters_for(const struct qcow_image *img, uint64_t bytes)
{
	return (bytes + img->cluster_size - 1) >> img->cluster_bits;
}

/* ---- the directory -------------------------------------------------------- */

static void entries_free(struct qcow_pbitmap_entry *v, uint32_t n)
{
	for (uint32_t i = 0; v && i < n; i++) {
		free(v[i].name);
		qcow_free(v[i].bits);
	}
	qcow_free(v);
}

/* Decodes a directory of dir_size bytes read from dir_off into *out.
 * Bounds only: the format's rules were checked by qcow_scan (open) or
 * are left to qcow_check (info). */
static int parse_dir(const uint8_t *dir, uint64_t dir_size, uint64_t dir_off, uint32_t nb,
		     struct qcow_pbitmap_entry **out, char *err, size_t errlen)
{
	struct qcow_pbitmap_entry *v = qcow_calloc(nb ? nb : 1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	uint64_t pos = 0;
	int ret = 0;
	for (uint32_t i = 0; i < nb; i++) {
		const uint8_t *d = dir + pos;
		if (pos + BME_FIXED > dir_size) {
			qcow_set_error(err, errlen, "bitmap directory at 0x%" PRIx64 " ends inside entry %u (offset 0x%" PRIx64 ")",
				       dir_off, i, dir_off + pos);
			ret = -EINVAL;
			goto fail;
		}
		uint32_t name_size = qcow_get_be16(d + 18), extra = qcow_get_be32(d + 20);
		if (pos + BME_FIXED + (uint64_t)extra + name_size > dir_size) {
			qcow_set_error(err, errlen, "bitmap directory entry %u at 0x%" PRIx64 " runs past the directory's end",
				       i, dir_off + pos);
			ret = -EINVAL;
			goto fail;
		}
		v[i].table_off = qcow_get_be64(d);
		v[i].table_size = qcow_get_be32(d + 8);
		v[i].flags = qcow_get_be32(d + 12);
		v[i].gran_bits = d[17];
		v[i].dir_pos = pos;
		v[i].name = strndup((const char *)d + BME_FIXED + extra, name_size);
		if (!v[i].name) {
			ret = -ENOMEM;
			goto fail;
		}
		pos += (BME_FIXED + (uint64_t)extra + name_size + 7) & ~7ull;
	}
	*out = v;
	return 0;
fail:
	entries_free(v, nb);
	return ret;
}

int qcow_pbitmap_open(struct qcow_image *img, char *err, size_t errlen)
{
	uint32_t nb;
	uint64_t dir_size, dir_off, pos;
	if (!(img->hdr.autoclear_features & 1) || !qcow_scan_bitmaps_ext(&img->hdr, &nb, &dir_size, &dir_off, &pos))
		return 0;
	struct qcow_pbitmaps *p = qcow_calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	pthread_mutex_init(&p->lock, NULL);
	p->ext_pos = pos;
	p->dir_off = dir_off;
	p->dir_size = dir_size;
	p->n = nb;
	p->dir = qcow_malloc(dir_size ? dir_size : 1);
	int ret = p->dir ? img->io->ops->pread(img->io, p->dir, dir_size, dir_off) : -ENOMEM;
	if (ret < 0)
		qcow_set_error(err, errlen, "cannot read the bitmap directory at 0x%" PRIx64 ": %s", dir_off, strerror(-ret));
	else
		ret = parse_dir(p->dir, dir_size, dir_off, nb, &p->v, err, errlen);
	if (ret) {
		qcow_free(p->dir);
		pthread_mutex_destroy(&p->lock);
		qcow_free(p);
		return ret;
	}
	img->pbitmaps = p;
	return 0;
}

bool qcow_pbitmap_present(const struct qcow_image *img)
{
	return img->pbitmaps && img->pbitmaps->n;
}

void qcow_pbitmap_free(struct qcow_image *img)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p)
		return;
	entries_free(p->v, p->n);
	qcow_free(p->dir);
	pthread_mutex_destroy(&p->lock);
	qcow_free(p);
	img->pbitmaps = NULL;
}

/* ---- the bits -------------------------------------------------------------- */

static void set_bits(uint64_t *w, uint64_t first, uint64_t last)
{
	for (uint64_t b = first; b <= last;) {
		if ((b & 63) == 0 && last - b >= 63) {
			w[b >> 6] = ~0ull;
			b += 64;
		} else {
			w[b >> 6] |= 1ull << (b & 63);
			b++;
		}
	}
}

/* Bits [first, first + 8 * len) from the serialized form (bit k of byte
 * j is granule 8j + k, as QEMU stores them); first is a multiple of 64. */
static void bits_from_le(struct qcow_pbitmap_entry *e, uint64_t first, const uint8_t *buf, uint64_t len)
{
	uint64_t words = (e->nbits + 63) / 64;
	for (uint64_t j = 0; j + 8 <= len && (first >> 6) + j / 8 < words; j += 8) {
		uint64_t v;
		memcpy(&v, buf + j, 8);
		e->bits[(first >> 6) + j / 8] = le64toh(v);
	}
	if (e->nbits & 63)   /* QEMU keeps bits past the disk clear: so do we */
		e->bits[words - 1] &= (1ull << (e->nbits & 63)) - 1;
}

/* Serializes bits [first, first + 8 * len) into buf; false when all clear. */
static bool bits_to_le(const uint64_t *bits, uint64_t nbits, uint64_t first, uint8_t *buf, uint64_t len)
{
	uint64_t words = (nbits + 63) / 64;
	bool any = false;
	memset(buf, 0, len);
	for (uint64_t j = 0; j + 8 <= len && (first >> 6) + j / 8 < words; j += 8) {
		uint64_t v = bits[(first >> 6) + j / 8];
		if ((first >> 6) + j / 8 == words - 1 && (nbits & 63))
			v &= (1ull << (nbits & 63)) - 1;
		any |= v != 0;
		v = htole64(v);
		memcpy(buf + j, &v, 8);
	}
	return any;
}

/* Reads bitmap e's bits from its table (it is not in use, so they are
 * consistent). */
static int load_one(struct qcow_image *img, struct qcow_pbitmap_entry *e, uint8_t *buf, char *err, size_t errlen)
{
	uint64_t cs = img->cluster_size;
	e->nbits = granules(img->virtual_size, e->gran_bits);
	uint64_t words = (e->nbits + 63) / 64;
	e->bits = qcow_calloc(words ? words : 1, 8);
	uint8_t *tbl = qcow_malloc((uint64_t)e->table_size * 8 + 8);
	int ret = 0;
	if (!e->bits || !tbl) {
		ret = -ENOMEM;
		goto out;
	}
	ret = img->io->ops->pread(img->io, tbl, (uint64_t)e->table_size * 8, e->table_off);
	if (ret < 0) {
		qcow_set_error(err, errlen, "cannot read the table of bitmap '%s' at 0x%" PRIx64 ": %s", e->name, e->table_off,
			       strerror(-ret));
		goto out;
	}
	for (uint64_t k = 0; k < e->table_size; k++) {
		uint64_t te = qcow_get_be64(tbl + k * 8), off = te & QCOW_L2E_OFFSET_MASK;
		uint64_t first = k * cs * 8;
		if (first >= e->nbits)
			break;
		if (!off) {
			if (te & BTE_ALL_ONES) {
				uint64_t last = first + cs * 8 - 1;
				set_bits(e->bits, first, last < e->nbits ? last : e->nbits - 1);
			}
			continue;
		}
		ret = img->io->ops->pread(img->io, buf, cs, off);
		if (ret < 0) {
			qcow_set_error(err, errlen, "cannot read bitmap '%s' data at 0x%" PRIx64 " (table entry at 0x%" PRIx64 "): %s",
				       e->name, off, e->table_off + k * 8, strerror(-ret));
			goto out;
		}
		bits_from_le(e, first, buf, cs);
	}
	ret = 0;
out:
	qcow_free(tbl);
	if (ret) {
		qcow_free(e->bits);
		e->bits = NULL;
	}
	return ret;
}

int qcow_pbitmap_load(struct qcow_image *img, char *err, size_t errlen)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p || img->read_only)
		return 0;
	uint8_t *buf = qcow_malloc(img->cluster_size);
	if (!buf)
		return -ENOMEM;
	int ret = 0;
	for (uint32_t i = 0; i < p->n && ret == 0; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!(e->flags & BME_AUTO) || (e->flags & BME_IN_USE))
			continue;   /* disabled, or inconsistent already: left as they are */
		ret = load_one(img, e, buf, err, errlen);
		if (ret == 0)
			e->loaded = true;
	}
	qcow_free(buf);
	/* in_use on disk before the first guest write (QEMU sets it while a
	 * bitmap is loaded): each flag is one aligned 4-byte write, so a crash
	 * leaves every bitmap either untouched or marked */
	for (uint32_t i = 0; i < p->n && ret == 0; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!e->loaded)
			continue;
		e->flags |= BME_IN_USE;
		qcow_put_be32(p->dir + e->dir_pos + 12, e->flags);
		ret = img->io->ops->pwrite(img->io, p->dir + e->dir_pos + 12, 4, p->dir_off + e->dir_pos + 12);
		if (ret)
			qcow_set_error(err, errlen, "cannot mark bitmap '%s' in use (directory entry at 0x%" PRIx64 "): %s",
				       e->name, p->dir_off + e->dir_pos, strerror(-ret));
		else
			p->nloaded++;
	}
	if (ret == 0 && p->nloaded) {
		ret = img->io->ops->flush(img->io);
		if (ret)
			qcow_set_error(err, errlen, "cannot make the bitmaps' in_use flags durable: %s", strerror(-ret));
		else
			qcow_logf(QCOW_LOG_INFO, "%s: %u persistent bitmap%s loaded and marked in use", img->io->name, p->nloaded,
				  p->nloaded == 1 ? "" : "s");
	}
	return ret;
}

void qcow_pbitmap_note(struct qcow_image *img, uint64_t off, uint64_t len)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p || !p->nloaded || !len)
		return;
	pthread_mutex_lock(&p->lock);
	for (uint32_t i = 0; i < p->n; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!e->loaded || !e->bits)
			continue;
		uint64_t first = off >> e->gran_bits, last = (off + len - 1) >> e->gran_bits;
		if (last >= e->nbits)
			last = e->nbits ? e->nbits - 1 : 0;   /* the range is inside the disk: rounding only */
		if (e->nbits && first <= last)
			set_bits(e->bits, first, last);
	}
	pthread_mutex_unlock(&p->lock);
}

int qcow_pbitmap_resize_begin(struct qcow_image *img, uint64_t new_size)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p || !p->n)
		return 0;
	for (uint32_t i = 0; i < p->n; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!e->loaded || !e->bits) {
			/* its table on disk would no longer fit the disk (QEMU
			 * too resizes only bitmaps it has in memory) */
			qcow_logf(QCOW_LOG_ERROR, "%s: cannot resize: persistent bitmap '%s' is %s", img->io->name, e->name,
				  (e->flags & BME_IN_USE) ? "in use (inconsistent)" : "disabled");
			return -ENOTSUP;
		}
	}
	int ret = 0;
	pthread_mutex_lock(&p->lock);
	for (uint32_t i = 0; i < p->n && ret == 0; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		uint64_t need = granules(new_size, e->gran_bits);
		uint64_t words = (e->nbits + 63) / 64, nwords = (need + 63) / 64;
		if (need <= e->nbits)
			continue;   /* the array only grows: bits past the disk stay clear */
		if (nwords > words) {
			uint64_t *b = qcow_realloc(e->bits, nwords * 8);
			if (!b) {
				ret = -ENOMEM;
				break;
			}
			memset(b + words, 0, (nwords - words) * 8);
			e->bits = b;
		}
		e->nbits = need;
	}
	pthread_mutex_unlock(&p->lock);
	return ret;
}

void qcow_pbitmap_resize_end(struct qcow_image *img)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p || !p->nloaded)
		return;
	qcow_lock(img);
	uint64_t size = img->virtual_size;
	qcow_unlock(img);
	/* what lies past the disk now is gone; if the disk grows again it
	 * comes back clear, as QEMU's bitmaps do */
	pthread_mutex_lock(&p->lock);
	for (uint32_t i = 0; i < p->n; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!e->loaded || !e->bits)
			continue;
		for (uint64_t k = granules(size, e->gran_bits); k < e->nbits; k++)
			e->bits[k >> 6] &= ~(1ull << (k & 63));
	}
	pthread_mutex_unlock(&p->lock);
}

/* ---- new structures -------------------------------------------------------- */

/* n clusters pinned as a whole table: the lowest run below `below` if
 * there is one, else (anywhere) when any_place; img->lock held.  0 and
 * *start, 1 when no place (not any_place), or -errno. */
static int claim_table(struct qcow_image *img, uint64_t n, uint64_t below, bool any_place, uint64_t *start)
{
	uint64_t c = qcow_map_available_run(&img->map, n, below);
	if (c == UINT64_MAX) {
		if (!any_place)
			return 1;
		int ret = qcow_alloc_contiguous(img, n, &c);
		if (ret)
			return ret;
	}
	for (uint64_t i = 0; i < n; i++)
		qcow_map_set_pinned(&img->map, c + i, 1);
	*start = c;
	return 0;
}

/* What a store or relocation made that nothing points at yet. */
struct fresh {
	uint64_t *c;        /* data clusters (Roots, later REF) and their slots */
	uint64_t *slot;
	size_t n, cap;
	struct qcow_extent *tables;   /* pinned runs: tables, directory */
	size_t ntables;
	bool linked;        /* the data clusters are REF from their slots */
};

static int fresh_add_data(struct fresh *f, uint64_t c, uint64_t slot)
{
	if (f->n == f->cap) {
		size_t cap = f->cap ? f->cap * 2 : 64;
		uint64_t *a = qcow_realloc(f->c, cap * sizeof(*a));
		if (!a)
			return -ENOMEM;
		f->c = a;
		uint64_t *b = qcow_realloc(f->slot, cap * sizeof(*b));
		if (!b)
			return -ENOMEM;
		f->slot = b;
		f->cap = cap;
	}
	f->c[f->n] = c;
	f->slot[f->n++] = slot;
	return 0;
}

static int fresh_add_table(struct fresh *f, uint64_t first, uint64_t n)
{
	struct qcow_extent *t = qcow_realloc(f->tables, (f->ntables + 1) * sizeof(*t));
	if (!t)
		return -ENOMEM;
	f->tables = t;
	t[f->ntables++] = (struct qcow_extent){ .first = first, .n = n };
	return 0;
}

/* Nothing points at them: they may hold partial copies, so Junk. */
static void fresh_drop(struct qcow_image *img, struct fresh *f)
{
	qcow_lock(img);
	for (size_t i = 0; i < f->n; i++)
		if (f->linked)
			qcow_map_drop_ref(&img->map, f->c[i], f->slot[i]);
		else
			qcow_map_set_state(&img->map, f->c[i], QCS_JUNK);
	for (size_t i = 0; i < f->ntables; i++)
		for (uint64_t k = 0; k < f->tables[i].n; k++)
			qcow_map_set_state(&img->map, f->tables[i].first + k, QCS_JUNK);
	qcow_unlock(img);
}

static void fresh_free(struct fresh *f)
{
	qcow_free(f->c);
	qcow_free(f->slot);
	qcow_free(f->tables);
}

static int write_run(struct qcow_image *img, const uint8_t *buf, uint64_t len, uint64_t start)
{
	int ret = img->io->ops->pwrite(img->io, buf, len, start << img->cluster_bits);
	qcow_lock(img);
	img->data_dirty = true;
	qcow_unlock(img);
	return ret;
}

/* The header's directory pointer (one aligned 8-byte write, so never
 * torn), made durable.  A failure leaves the disk uncertain: failed
 * state, both copies stay allocated (a leak at worst). */
static int switch_directory(struct qcow_image *img, uint64_t new_off)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	uint8_t be[8];
	qcow_put_be64(be, new_off);
	int ret = img->io->ops->pwrite(img->io, be, 8, p->ext_pos + EXT_DIR_OFFSET);
	if (!ret)
		ret = img->io->ops->flush(img->io);
	if (ret) {
		qcow_set_failed(img, ret, "bitmap directory switch");
		return ret;
	}
	qcow_lock(img);
	if (p->ext_pos + EXT_DIR_OFFSET + 8 <= img->hdr.raw_len)
		memcpy(img->hdr.raw + p->ext_pos + EXT_DIR_OFFSET, be, 8);
	qcow_unlock(img);
	return 0;
}

/* After the switch: the old table's data clusters (those not kept) go
 * after the next flush, the old table's clusters with the header's, and
 * its cached copy (a move may have rewritten entries there) is dropped.
 * img->lock held. */
static void release_old_table(struct qcow_image *img, const struct qcow_pbitmap_entry *e, bool data_too)
{
	uint64_t n = clusters_for(img, (uint64_t)e->table_size * 8);
	for (uint64_t k = 0; data_too && k < e->table_size; k++) {
		uint64_t te, slot = e->table_off + k * 8;
		if (!qcow_l2_entry_at(img, slot, &te))
			continue;   /* unreadable: its data stays allocated (a leak) */
		uint64_t c = (te & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
		if (c && c < img->map.nclusters && qcow_map_has_ref(&img->map, c, slot))
			qcow_free_after_flush(img, c, slot);
	}
	for (uint64_t k = 0; k < n; k++) {
		struct qcow_cached *t = qcow_cache_find(&img->cache, (e->table_off >> img->cluster_bits) + k);
		if (t)
			qcow_cache_remove(&img->cache, t);
	}
	if (qcow_pending_free_add(img, e->table_off >> img->cluster_bits, n))
		qcow_logf(QCOW_LOG_WARNING, "out of memory: the old table of bitmap '%s' at 0x%" PRIx64 " stays allocated (a leak)",
			  e->name, e->table_off);
}

/* ---- the clean close ----------------------------------------------------- */

int qcow_pbitmap_store(struct qcow_image *img)
{
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p || !p->nloaded || img->read_only)
		return 0;
	if (qcow_health_failed(img))
		return -EIO;
	uint64_t cs = img->cluster_size;
	struct fresh f = { 0 };
	uint8_t *buf = qcow_malloc(cs), *newdir = qcow_malloc(p->dir_size), *tbl = NULL;
	uint64_t *new_off = qcow_calloc(p->n, sizeof(uint64_t));
	uint32_t *new_size = qcow_calloc(p->n, sizeof(uint32_t));
	uint64_t dir_start = 0, dir_n = clusters_for(img, p->dir_size);
	bool published = false;
	int ret = 0;
	pthread_mutex_lock(&img->flush_lock);
	if (!buf || !newdir || !new_off || !new_size) {
		ret = -ENOMEM;
		goto out;
	}
	memcpy(newdir, p->dir, p->dir_size);
	/* a compaction may have rewritten table entries in the cache: make
	 * them durable, so the disk is what the old tables say */
	ret = qcow_flush_holding_flush_lock(img);
	if (ret)
		goto out;

	/* no guest writes at a close: the bits are read without p->lock
	 * (which must nest inside nothing, and img->lock is taken here) */
	for (uint32_t i = 0; i < p->n && ret == 0; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		/* sized for the disk as it is now; a bitmap whose bits do not
		 * cover it (a snapshot apply grew the disk) stays in use */
		uint64_t nbits = granules(img->virtual_size, e->gran_bits);
		if (!e->loaded || !e->bits || nbits > e->nbits)
			continue;
		uint64_t entries = table_entries(img, nbits), tn = clusters_for(img, entries * 8), start = 0;
		qcow_free(tbl);
		tbl = qcow_calloc(tn ? tn : 1, cs);
		if (!tbl) {
			ret = -ENOMEM;
			break;
		}
		qcow_lock(img);
		ret = claim_table(img, tn, 0, true, &start);
		if (ret == 0)
			ret = fresh_add_table(&f, start, tn);
		qcow_unlock(img);
		if (ret)
			break;
		for (uint64_t k = 0; k < entries && ret == 0; k++) {
			if (!bits_to_le(e->bits, nbits, k * cs * 8, buf, cs))
				continue;   /* all clear: no cluster (entry 0), as QEMU stores it */
			uint64_t c = 0;
			qcow_lock(img);
			ret = qcow_alloc_cluster(img, &c);
			if (ret == 0 && (ret = fresh_add_data(&f, c, (start << img->cluster_bits) + k * 8)))
				qcow_map_set_state(&img->map, c, QCS_JUNK);
			qcow_unlock(img);
			if (ret == 0)
				ret = write_run(img, buf, cs, c);
			qcow_put_be64(tbl + k * 8, c << img->cluster_bits);
		}
		if (ret == 0)
			ret = write_run(img, tbl, tn * cs, start);
		new_off[i] = start << img->cluster_bits;
		new_size[i] = (uint32_t)entries;
		uint8_t *d = newdir + e->dir_pos;
		qcow_put_be64(d, new_off[i]);
		qcow_put_be32(d + 8, new_size[i]);
		qcow_put_be32(d + 12, e->flags & ~BME_IN_USE);
	}
	if (ret)
		goto out;
	qcow_lock(img);
	ret = claim_table(img, dir_n, 0, true, &dir_start);
	if (ret == 0)
		ret = fresh_add_table(&f, dir_start, dir_n);
	qcow_unlock(img);
	if (ret == 0)
		ret = write_run(img, newdir, p->dir_size, dir_start);
	if (ret)
		goto out;
	/* linked: every new data cluster referenced from its new slot, counted
	 * by the flush that makes it all durable */
	qcow_lock(img);
	for (size_t i = 0; i < f.n; i++)
		qcow_map_set_ref(&img->map, f.c[i], f.slot[i]);
	f.linked = true;
	qcow_unlock(img);
	ret = qcow_flush_holding_flush_lock(img);
	if (ret)
		goto out;

	ret = switch_directory(img, dir_start << img->cluster_bits);
	if (ret)
		goto out;
	published = true;
	qcow_lock(img);
	for (uint32_t i = 0; i < p->n; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!new_off[i])
			continue;   /* not stored: its old entry, in use, stays */
		release_old_table(img, e, true);
		e->table_off = new_off[i];
		e->table_size = new_size[i];
		e->flags &= ~BME_IN_USE;
		e->loaded = false;
		p->nloaded--;
	}
	if (qcow_pending_free_add(img, p->dir_off >> img->cluster_bits, clusters_for(img, p->dir_size)))
		qcow_logf(QCOW_LOG_WARNING, "out of memory: the old bitmap directory at 0x%" PRIx64 " stays allocated (a leak)",
			  p->dir_off);
	memcpy(p->dir, newdir, p->dir_size);
	p->dir_off = dir_start << img->cluster_bits;
	img->header_dirty = true;   /* the flush that frees the old tables */
	qcow_unlock(img);
	ret = qcow_flush_holding_flush_lock(img);
	if (ret == 0)
		qcow_logf(QCOW_LOG_INFO, "%s: persistent bitmaps stored, directory at 0x%" PRIx64, img->io->name,
			  p->dir_off);
out:
	if (ret && !published) {
		/* the old directory stays, in_use set: QEMU calls those bitmaps
		 * inconsistent; the new clusters are leaks at worst */
		fresh_drop(img, &f);
		qcow_logf(QCOW_LOG_ERROR, "%s: cannot store the persistent bitmaps (%s): they stay marked in use", img->io->name,
			  strerror(-ret));
	}
	pthread_mutex_unlock(&img->flush_lock);
	fresh_free(&f);
	qcow_free(buf);
	qcow_free(newdir);
	qcow_free(tbl);
	qcow_free(new_off);
	qcow_free(new_size);
	return ret;
}

/* ---- compaction ----------------------------------------------------------- */

int qcow_pbitmap_relocate(struct qcow_image *img)
{
	qcow_assert_flush_locked(img);
	struct qcow_pbitmaps *p = img->pbitmaps;
	if (!p || !p->n || img->read_only)
		return 0;
	if (qcow_health_failed(img))
		return -EIO;
	uint64_t cs = img->cluster_size;
	struct fresh f = { 0 };
	uint64_t *new_off = qcow_calloc(p->n, sizeof(uint64_t));
	uint8_t *newdir = qcow_malloc(p->dir_size), *tbl = NULL;
	uint64_t dir_n = clusters_for(img, p->dir_size), dir_start = 0;
	bool any = false, published = false;
	int ret = 0;
	if (!new_off || !newdir) {
		ret = -ENOMEM;
		goto out;
	}
	memcpy(newdir, p->dir, p->dir_size);
	/* each table into a lower free run when there is one; the directory
	 * too, and into any place when a table moved (it names the tables) */
	qcow_lock(img);
	for (uint32_t i = 0; i < p->n && ret == 0; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		uint64_t tn = clusters_for(img, (uint64_t)e->table_size * 8), start;
		int r = tn ? claim_table(img, tn, e->table_off >> img->cluster_bits, false, &start) : 1;
		if (r < 0)
			ret = r;
		if (r == 0) {
			ret = fresh_add_table(&f, start, tn);
			new_off[i] = start << img->cluster_bits;
			qcow_put_be64(newdir + e->dir_pos, new_off[i]);
			any = true;
		}
	}
	if (ret == 0) {
		int r = claim_table(img, dir_n, p->dir_off >> img->cluster_bits, any, &dir_start);
		if (r < 0)
			ret = r;
		else if (r == 0)
			ret = fresh_add_table(&f, dir_start, dir_n);
		else
			dir_start = 0;
	}
	qcow_unlock(img);
	if (ret || !dir_start)
		goto out;   /* (nothing lower to go to: ret 0) */

	/* copies of the tables as they are now (entries a move rewrote in the
	 * cache are written first) */
	ret = qcow_flush_holding_flush_lock(img);
	for (uint32_t i = 0; i < p->n && ret == 0; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!new_off[i])
			continue;
		uint64_t tn = clusters_for(img, (uint64_t)e->table_size * 8);
		qcow_free(tbl);
		tbl = qcow_calloc(tn, cs);
		ret = tbl ? img->io->ops->pread(img->io, tbl, (uint64_t)e->table_size * 8, e->table_off) : -ENOMEM;
		if (ret == 0)
			ret = write_run(img, tbl, tn * cs, new_off[i] >> img->cluster_bits);
	}
	if (ret == 0)
		ret = write_run(img, newdir, p->dir_size, dir_start);
	if (ret == 0)
		ret = qcow_flush_holding_flush_lock(img);
	if (ret == 0)
		ret = switch_directory(img, dir_start << img->cluster_bits);
	if (ret)
		goto out;
	published = true;

	/* the data clusters' references follow their table */
	qcow_lock(img);
	for (uint32_t i = 0; i < p->n; i++) {
		struct qcow_pbitmap_entry *e = &p->v[i];
		if (!new_off[i])
			continue;
		for (uint64_t k = 0; k < e->table_size; k++) {
			uint64_t te, slot = e->table_off + k * 8;
			if (!qcow_l2_entry_at(img, slot, &te))
				continue;
			uint64_t c = (te & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
			if (c && c < img->map.nclusters && qcow_map_has_ref(&img->map, c, slot))
				qcow_map_replace_ref(&img->map, c, slot, new_off[i] + k * 8);
		}
		release_old_table(img, e, false);
		e->table_off = new_off[i];
	}
	if (qcow_pending_free_add(img, p->dir_off >> img->cluster_bits, dir_n))
		qcow_logf(QCOW_LOG_WARNING, "out of memory: the old bitmap directory at 0x%" PRIx64 " stays allocated (a leak)",
			  p->dir_off);
	memcpy(p->dir, newdir, p->dir_size);
	p->dir_off = dir_start << img->cluster_bits;
	img->header_dirty = true;
	qcow_unlock(img);
	ret = qcow_flush_holding_flush_lock(img);
	if (ret == 0) {
		ret = 1;
		qcow_logf(QCOW_LOG_DEBUG, "bitmap directory moved to 0x%" PRIx64, p->dir_off);
	}
out:
	if (ret < 0 && !published)
		fresh_drop(img, &f);
	fresh_free(&f);
	qcow_free(new_off);
	qcow_free(newdir);
	qcow_free(tbl);
	return ret;
}

/* ---- the list for qcowctl info --------------------------------------------- */

int qcow_pbitmap_list_file(const char *path, struct qcow_pbitmap_info **out, uint32_t *count, char *err, size_t errlen)
{
	struct qcow_io *io = NULL;
	struct qcow_header h = { 0 };
	struct qcow_pbitmap_entry *v = NULL;
	uint8_t *dir = NULL;
	uint32_t nb = 0;
	uint64_t dir_size, dir_off, pos;
	*out = NULL;
	*count = 0;
	int ret = qcow_io_file_open(path, true, &io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot open %s: %s", path, strerror(-ret));
		io = NULL;
		goto out;
	}
	ret = qcow_header_read_info(io, &h, err, errlen);
	if (ret)
		goto out;
	/* QEMU shows no bitmaps when the autoclear bit says they are stale */
	if (!(h.autoclear_features & 1) || !qcow_scan_bitmaps_ext(&h, &nb, &dir_size, &dir_off, &pos) || nb == 0)
		goto out;
	if (dir_size > (64u << 20) || nb > 65535) {
		qcow_set_error(err, errlen, "bitmaps extension at header offset %" PRIu64 " is invalid (%u bitmaps, %" PRIu64 " bytes)",
			       pos, nb, dir_size);
		ret = -EINVAL;
		goto out;
	}
	dir = qcow_malloc(dir_size ? dir_size : 1);
	ret = dir ? io->ops->pread(io, dir, dir_size, dir_off) : -ENOMEM;
	if (ret) {
		qcow_set_error(err, errlen, "cannot read the bitmap directory at 0x%" PRIx64 ": %s", dir_off, strerror(-ret));
		goto out;
	}
	ret = parse_dir(dir, dir_size, dir_off, nb, &v, err, errlen);
	if (ret)
		goto out;
	struct qcow_pbitmap_info *l = calloc(nb, sizeof(*l));
	if (!l) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint32_t i = 0; i < nb; i++) {
		snprintf(l[i].name, sizeof(l[i].name), "%s", v[i].name);
		l[i].granularity = v[i].gran_bits < 64 ? 1ull << v[i].gran_bits : 0;
		l[i].flags = v[i].flags;
	}
	*out = l;
	*count = nb;
out:
	entries_free(v, nb);
	qcow_free(dir);
	qcow_header_free(&h);
	if (io)
		qcow_io_close(io);
	return ret;
}
