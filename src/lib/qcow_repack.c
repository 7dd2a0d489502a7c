/*
 * qcow_repack.c - moving compressed data down: repacking streams.
 *
 * Owns: the compaction of host clusters that hold compressed streams.
 * QEMU packs compressed clusters back to back, byte by byte, so most
 * streams cross from one host cluster into the next and the clusters of a
 * compressed image form one long chain: they cannot move one by one like
 * plain clusters (a cluster's copy would cut every stream that crosses
 * its edges).  Instead the streams move, one at a time, as a guest write
 * moves data: each stream touching one of the highest compressed
 * clusters is copied byte-exact (its true length, found by inflating it)
 * into new clusters at the lowest free place, packed back to back byte by
 * byte as QEMU packs them (across a cluster edge only into a free next
 * cluster); then its descriptor is pointed at the
 * copy and the old clusters lose that reference.  A cluster whose every
 * stream moved becomes free and compaction truncates it away.
 *
 * Rules (doc/design.md: "Compressed data moves by repacking streams", invariants 8 and 13):
 *  - The same order as a write into a new cluster (invariant 8): the copy
 *    is written before the descriptor changes, so the flush protocol
 *    makes the copy durable (step 2) before the pointer (step 3), raises
 *    the new clusters' refcounts first (step 1) and lowers the old ones
 *    only after the pointer is durable (step 5): a crash shows either the
 *    old stream or the copy, both intact.
 *  - The old clusters are released like an overwritten cluster
 *    (qcow_free_after_flush): they stay until the flush that makes the
 *    new descriptor durable.
 *  - The repacker registers as a request in flight while it reads the old
 *    streams, so no erase or truncation destroys them under it; a stream
 *    whose descriptor changed meanwhile (a guest wrote or discarded that
 *    cluster) is left alone and its copy wasted.
 *  - A descriptor in an L2 table that several L1 tables share carries one
 *    reference per path (as QEMU counts): all of them move together.
 *  - Called by the recycler without locks; takes img->lock itself.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

/* Streams and bytes moved per round: bounded so one round's copies stay
 * small and its lock holds short. */
#define REPACK_STREAMS 512u
#define REPACK_BYTES (8u << 20)

struct stream {
	uint64_t slot;       /* the L2 entry holding the descriptor */
	uint64_t entry;      /* the descriptor as found */
	uint64_t refs;       /* references the slot holds on each old cluster (counted again at the link) */
	uint64_t bytes;      /* true length of the stream */
	uint64_t new_off;    /* where the copy goes (0: not placed) */
	uint8_t *data;
};

/* Whether host cluster c holds compressed streams: its first pointer is
 * an L2 entry with a compressed descriptor. */
static bool holds_streams(struct qcow_image *img, uint64_t c)
{
	uint64_t slot = qcow_map_ref_slot(&img->map, c, 0), index, e;
	if (qcow_slot_kind(img, slot, &index) != QSLOT_L2 || slot >> img->cluster_bits >= img->map.nclusters)
		return false;   /* a table's pointer, not an L2 entry */
	return qcow_l2_entry_at(img, slot, &e) && (e & QCOW_OFLAG_COMPRESSED);
}

/* Collects the streams of the highest compressed clusters that lie above
 * the lowest Available cluster (img->lock held). */
static size_t collect_streams(struct qcow_image *img, struct stream *v)
{
	struct qcow_map *m = &img->map;
	uint64_t lowest = qcow_map_lowest_available(m);
	size_t n = 0;
	uint64_t bytes = 0;
	if (lowest == UINT64_MAX)
		return 0;
	for (uint64_t c = qcow_map_highest_movable(m, m->nclusters);
	     c != UINT64_MAX && c > lowest && n < REPACK_STREAMS && bytes < REPACK_BYTES; c = qcow_map_highest_movable(m, c)) {
		if (!holds_streams(img, c))
			continue;
		for (uint64_t i = 0, refs = qcow_map_refcount(m, c); i < refs && n < REPACK_STREAMS; i++) {
			uint64_t slot = qcow_map_ref_slot(m, c, i);
			bool seen = false;
			for (size_t k = 0; k < n && !seen; k++)
				seen = v[k].slot == slot;
			uint64_t e;
			if (seen || !qcow_l2_entry_at(img, slot, &e) || !(e & QCOW_OFLAG_COMPRESSED))
				continue;
			uint64_t count = 0, off, len;
			for (uint64_t j = 0; j < refs; j++)
				count += qcow_map_ref_slot(m, c, j) == slot;
			qcow_compressed_range(img, e, &off, &len);
			bytes += len;
			v[n++] = (struct stream){ .slot = slot, .entry = e, .refs = count };
		}
	}
	return n;
}

/* Reads each stream and finds its true length (no lock held; the caller
 * is registered in flight).  A stream that cannot be read or inflated,
 * or is longer than a cluster (QEMU stores a cluster uncompressed rather
 * than as a longer stream; only a stream whose end inflating cannot find
 * counts its whole descriptor range), is left where it is (bytes 0). */
static void read_streams(struct qcow_image *img, struct stream *v, size_t n)
{
	uint8_t *out = qcow_malloc(img->cluster_size);
	for (size_t i = 0; out && i < n; i++) {
		uint64_t off, len;
		qcow_compressed_range(img, v[i].entry, &off, &len);
		v[i].data = qcow_malloc((size_t)len);
		if (!v[i].data)
			break;
		if (img->io->ops->pread(img->io, v[i].data, (size_t)len, off) ||
		    qcow_compressed_inflate(img, v[i].data, (size_t)len, off, out, &v[i].bytes) ||
		    v[i].bytes == 0 || v[i].bytes > img->cluster_size) {
			qcow_free(v[i].data);
			v[i].data = NULL;
			v[i].bytes = 0;
		}
	}
	qcow_free(out);
}

/* Places the streams into new clusters, lowest first, back to back byte
 * by byte as QEMU packs them (img->lock held).  A stream may
 * run into the next cluster when that one is free too (it is then taken
 * next); otherwise the rest of the cluster stays unused.  Fills
 * clusters[] with the clusters taken (Roots), in order; returns how many. */
static size_t place_streams(struct qcow_image *img, struct stream *v, size_t n, uint64_t *clusters)
{
	struct qcow_map *m = &img->map;
	uint64_t cs = img->cluster_size, used = cs;
	size_t nc = 0;
	for (size_t i = 0; i < n; i++) {
		if (!v[i].bytes)
			continue;
		uint64_t need = v[i].bytes, first, last;
		qcow_entry_clusters(img, v[i].entry, &first, &last);
		if (used + need > cs) {
			/* only downwards: a copy above its stream gains nothing */
			uint64_t next = nc ? clusters[nc - 1] + 1 : UINT64_MAX;
			if (used < cs && next < first && next < m->nclusters && qcow_map_state(m, next) == QCS_AVAILABLE) {
				qcow_map_set_state(m, next, QCS_ROOTS);   /* the stream runs on into it */
				clusters[nc++] = next;
				v[i].new_off = (next << img->cluster_bits) - (cs - used);
				used = used + need - cs;
				continue;
			}
			uint64_t c;
			if (qcow_map_lowest_available(m) >= first || qcow_alloc_cluster(img, &c))
				break;
			clusters[nc++] = c;
			used = 0;
		}
		v[i].new_off = (clusters[nc - 1] << img->cluster_bits) + used;
		used += need;
	}
	return nc;
}

/* Writes the packed clusters (no lock held): the streams are laid out in
 * one buffer in the order of clusters[], where a stream that runs into
 * the next cluster finds it right behind. */
static int write_clusters(struct qcow_image *img, const struct stream *v, size_t n, const uint64_t *clusters,
			  size_t nc)
{
	uint64_t cs = img->cluster_size;
	if (!nc)
		return 0;
	uint8_t *buf = qcow_calloc(nc, cs);
	if (!buf)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (!v[i].new_off)
			continue;
		uint64_t c = v[i].new_off >> img->cluster_bits;
		for (size_t k = 0; k < nc; k++)
			if (clusters[k] == c) {
				memcpy(buf + k * cs + (v[i].new_off & (cs - 1)), v[i].data, v[i].bytes);
				break;
			}
	}
	int ret = 0;
	for (size_t k = 0; k < nc && ret == 0;) {
		size_t j = k + 1;
		while (j < nc && clusters[j] == clusters[j - 1] + 1)
			j++;
		ret = img->io->ops->pwrite(img->io, buf + k * cs, (j - k) * cs, clusters[k] << img->cluster_bits);
		k = j;
	}
	qcow_free(buf);
	return ret;
}

/* Points each placed stream's descriptor at its copy, unless it changed
 * meanwhile (img->lock held).  Returns the number re-pointed. */
static size_t link_streams(struct qcow_image *img, struct stream *v, size_t n)
{
	size_t linked = 0;
	for (size_t i = 0; i < n; i++) {
		if (!v[i].new_off)
			continue;
		int ret;
		struct qcow_cached *t = qcow_l2_get(img, v[i].slot >> img->cluster_bits, &ret);
		uint64_t idx = qcow_l2_slot_index(img, v[i].slot);
		if (!t || qcow_l2_entry(img, t, idx) != v[i].entry)
			continue;   /* a guest changed it: the copy is wasted */
		uint64_t first, last, nfirst, nlast;
		uint64_t ne = qcow_compressed_descriptor(img, v[i].new_off, v[i].bytes);
		qcow_entry_clusters(img, v[i].entry, &first, &last);
		qcow_entry_clusters(img, ne, &nfirst, &nlast);
		/* one reference per L1 path through the slot, as it is now (a
		 * copy-on-write of a shared L2 table since the collection moved
		 * the active path to another slot) */
		v[i].refs = 0;
		for (uint64_t k = 0, n = qcow_map_refcount(&img->map, first); k < n; k++)
			v[i].refs += qcow_map_ref_slot(&img->map, first, k) == v[i].slot;
		if (!v[i].refs)
			continue;
		bool refs_ok = true;
		for (uint64_t c = nfirst; c <= nlast && refs_ok; c++)
			for (uint64_t k = 0; k < v[i].refs && refs_ok; k++)
				refs_ok = qcow_map_add_ref(&img->map, c, v[i].slot) == 0;
		if (!refs_ok) {
			for (uint64_t c = nfirst; c <= nlast; c++)
				while (qcow_map_has_ref(&img->map, c, v[i].slot))
					qcow_map_drop_ref(&img->map, c, v[i].slot);
			continue;   /* out of memory: the stream stays where it is */
		}
		qcow_l2_set_entry(img, t, idx, ne);
		for (uint64_t c = first; c <= last && c < img->map.nclusters; c++)
			for (uint64_t k = 0; k < v[i].refs && qcow_map_has_ref(&img->map, c, v[i].slot); k++)
				qcow_free_after_flush(img, c, v[i].slot);
		linked++;
	}
	return linked;
}

static void phase_hook(struct qcow_image *img, enum qcow_move_state reached)
{
	if (!img->move_phase_hook)
		return;
	img->repacking = true;
	img->move_phase_hook(img, reached, img->move_phase_opaque);
	img->repacking = false;
}

int64_t qcow_repack_streams(struct qcow_image *img)
{
	struct stream *v = qcow_calloc(REPACK_STREAMS, sizeof(*v));
	uint64_t *clusters = qcow_calloc(REPACK_STREAMS, sizeof(uint64_t));
	struct qcow_inflight req;
	int64_t ret = 0;
	size_t n = 0, nc = 0;
	if (!v || !clusters) {
		ret = -ENOMEM;
		goto out;
	}
	qcow_lock(img);
	n = collect_streams(img, v);
	if (n == 0) {
		qcow_unlock(img);
		goto out;
	}
	qcow_inflight_begin(img, &req);
	qcow_unlock(img);

	read_streams(img, v, n);

	qcow_lock(img);
	nc = place_streams(img, v, n, clusters);
	qcow_unlock(img);

	ret = write_clusters(img, v, n, clusters, nc);
	phase_hook(img, QMOVE_COPIED);

	qcow_lock(img);
	if (ret == 0) {
		ret = (int64_t)link_streams(img, v, n);
		img->streams_repacked += (uint64_t)ret;
	}
	/* packed clusters nothing points at: written, so Junk (never
	 * Available: they are not known to read zeros) */
	for (size_t k = 0; k < nc; k++)
		if (qcow_map_state(&img->map, clusters[k]) == QCS_ROOTS)
			qcow_map_set_state(&img->map, clusters[k], QCS_JUNK);
	img->data_dirty = true;
	qcow_inflight_end(img, &req);
	qcow_unlock(img);
	if (ret > 0)
		phase_hook(img, QMOVE_REFERENCED);
out:
	for (size_t i = 0; v && i < n; i++)
		qcow_free(v[i].data);
	qcow_free(v);
	qcow_free(clusters);
	return ret;
}
