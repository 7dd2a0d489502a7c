/*
 * qcow_internal.h - the engine's shared internals: the image structure and
 * the functions the engine's files call in each other.
 *
 * LOCK ORDER (never take an earlier lock while holding a later one):
 *   1. img->flush_lock   serialises flushes, resizes and the recycler's
 *                        pointer rewrites and truncations with each other
 *   2. img->lock         guards the cluster map, L1, refcount table, the
 *                        metadata cache, the in-flight list and the
 *                        counters; held only for short sections (the one
 *                        exception: a metadata cache miss reads one cluster)
 *   3. img->err_lock     the health fields (qcow_health.c); held for a few
 *                        instructions, nothing is taken under it
 *   4. backend locks     inside struct qcow_io, never held across calls
 * A backing image (img->backing->img) is another struct qcow_image with
 * locks of its own; they are taken only inside ours (a read or seek
 * falls through to the chain), never the other way round: a chain only
 * goes down, so no cycle can form.
 * Guest data I/O is done with no engine lock held.  Instead every guest
 * request registers itself in the in-flight list while its physical
 * extents are in use; the recycler waits for a grace period
 * (qcow_inflight_wait_before) before erasing a cluster or copying a move
 * source, so a request never sees its clusters change under it
 * (doc/design.md, invariants 5 and 6).
 */
#ifndef QCOW_INTERNAL_H
#define QCOW_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "qcow.h"
#include "qcow_mem.h"
#include "qcow_cache.h"
#include "qcow_format.h"
#include "qcow_header.h"
#include "qcow_io.h"
#include "qcow_map.h"
#include "qcow_pbitmap.h"
#include "qcow_refcount.h"

void qcow_logf(enum qcow_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void qcow_set_error(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* One guest request (or recycler step) whose physical extents are in use. */
struct qcow_inflight {
	uint64_t ticket;
	struct qcow_inflight *prev, *next;
};

/* The image a qcow2 image reads through where its clusters are
 * unallocated (qcow_open.c opens it, qcow_image.c reads it): a qcow2
 * image opened read-only (itself with a chain of its own), or a raw file.
 * Reads past `size` are zeros. */
struct qcow_backing {
	struct qcow_image *img;      /* qcow2 backing image, or NULL */
	struct qcow_io *raw;         /* raw backing file, or NULL */
	uint64_t size;               /* guest bytes it covers */
	char *path;                  /* as opened (resolved against the naming image's folder) */
	char format[8];              /* "qcow2" or "raw" */
};

struct qcow_image {
	struct qcow_io *io;
	/* where guest data lives: the external data file (qcow_datafile.c),
	 * or io itself without one */
	struct qcow_io *data_io;
	bool data_owned;             /* data_io was opened here (closed with the image) */
	bool data_raw;               /* data_file_raw: the data file stays a raw image of the disk */
	char *data_path;             /* the data file as opened, or NULL */
	/* the backing chain's next image; NULL: unallocated clusters read zeros */
	struct qcow_backing *backing;
	struct qcow_header hdr;
	struct qcow_open_opts opts;
	bool read_only;

	/* geometry */
	unsigned cluster_bits;
	uint64_t cluster_size;
	unsigned l2_bits;            /* log2(entries per L2 table) */
	unsigned rb_shift;           /* log2(entries per refcount block) */
	uint64_t virtual_size;

	/* active L1 table, host endian; capacity = whole clusters it occupies */
	uint64_t *l1;
	uint32_t l1_capacity;
	struct qcow_bitmap l1_dirty;     /* per L1 cluster */

	/* refcount table, host endian */
	uint64_t *reftable;
	uint64_t reftable_entries;
	struct qcow_bitmap reftable_dirty;  /* per reftable cluster */

	/* pending header fields to write at the next flush */
	bool header_dirty;

	struct qcow_map map;
	struct qcow_cache cache;

	pthread_mutex_t lock;
	pthread_mutex_t flush_lock;

	/* in-flight requests, oldest first */
	uint64_t next_ticket;
	struct qcow_inflight inflight_head;
	pthread_cond_t inflight_done;
	unsigned inflight_waiters;

	/* erase -> flush -> available */
	struct qcow_u64_list erased;
	/* clusters whose last pointer was replaced (an overwrite, a table
	 * copy): Pending until a flush has made the replacement durable, then
	 * Junk (qcow_free_after_flush) */
	struct qcow_u64_list released;
	/* the same for a replaced pointer to a cluster others still use:
	 * (cluster, slot) pairs whose reference goes when a flush has made
	 * the replacement durable - until then the durable pointer may still
	 * be the old one, so the cluster must not become free even if its
	 * other users go meanwhile */
	struct qcow_u64_list released_refs;
	bool data_dirty;             /* something was written since the last sync */
	bool punch_supported;

	/* truncation in progress: allocations that need to grow give up
	 * (-EAGAIN) and their requests wait for truncate_done */
	bool truncating;
	pthread_cond_t truncate_done;

	/* guest clusters a write is filling in a new host cluster
	 * (qcow_inflight.c): an open-addressing set */
	uint64_t *claims;
	size_t claims_cap, claims_len, claims_used;
	unsigned claim_waiters;
	pthread_cond_t claim_released;

	/* table switches not yet known to be durable (qcow_relocate.c,
	 * qcow_flush.c): the header must be written again by the next
	 * flush, and the old tables' clusters stay allocated until then */
	bool reftable_switch_pending;    /* header's refcount table fields, in flush step 1 */
	struct qcow_extent { uint64_t first, n; } *pending_free;
	size_t pending_free_len;

	bool lock_asserts;               /* qcow_assert_locked checks (debug, runtime_asserts) */

	/* recycler */
	pthread_t recycler_thread;
	bool recycler_running;
	bool recycler_stop;
	pthread_cond_t recycler_wake;
	pthread_cond_t compact_done;
	bool compact_requested;
	bool compacting;
	double compact_progress;
	uint64_t compact_generation;     /* bumped when a requested pass ends */
	uint64_t last_discard_ms;
	uint64_t trim_discard_mark;      /* bytes_discard_requested when the free tail was last trimmed */
	uint64_t compactions_failed;     /* passes that ended in an error */
	int last_compact_ret;            /* result of the last pass (0 or -errno) */
	/* what holds the file above its minimum, found by the last pass
	 * (qcow_recycler.c); blocker_cluster 0: nothing known */
	uint64_t blocker_cluster;
	char blocker[160];
	/* health (qcow_health.c, under err_lock) */
	pthread_mutex_t err_lock;
	int last_error;                  /* background error not yet cleared by a flush */
	const char *last_error_what;     /* what failed (a string literal), for the log */
	bool failed;                     /* state uncertain: writes refused until reopened */
	int failed_error;

	/* test hook: called by the compactor after each move phase with the
	 * state the batch's moves reached (crash tests arm the simulator);
	 * the stream repacker calls it too, with repacking set, after its
	 * copies are written (Copied) and after it re-pointed the streams
	 * (Referenced) */
	void (*move_phase_hook)(struct qcow_image *img, enum qcow_move_state reached, void *opaque);
	void *move_phase_opaque;
	bool repacking;
	/* test hook: compaction leaves the snapshot tables where they are
	 * (tests then drive qcow_snapshot_relocate themselves) */
	bool compact_keeps_snapshot_tables;
	/* test hook: called by a guest write after it resolved its extents and
	 * before its data I/O (tests run a compaction in that window) */
	void (*write_io_hook)(struct qcow_image *img, void *opaque);
	void *write_io_opaque;
	/* test hook: the same for a guest read (tests truncate in that window) */
	void (*read_io_hook)(struct qcow_image *img, void *opaque);
	void *read_io_opaque;

	/* the sparsify running now, or NULL (qcow_sparsify.c: its candidate
	 * marks, which every write resolution of a marked guest cluster
	 * clears) */
	struct qcow_sparsify_marks *sparsify;
	/* the persistent dirty bitmaps (qcow_persistent_bitmap.c), or NULL */
	struct qcow_pbitmaps *pbitmaps;
	/* another process holds QEMU's read lock while we write: a snapshot
	 * is mounted read-only (qcow_snapshot_reader_present) */
	bool snapshot_reader;

	/* statistics (meanings: struct qcow_stats in qcow.h) */
	int64_t bytes_reclaimed;         /* signed sum of the recycler's measured steps
	                                    (qcow_recycler.c, reclaim_begin); atomic */
	int reclaim_depth;               /* recycler steps measuring now (nested: the
	                                    outermost measures); atomic */
	uint64_t bytes_discard_requested; /* also the recycler's discard stamp */
	uint64_t bytes_discard_freed;    /* host clusters whose last reference a
	                                    discard, unmap, shrink or sparsify dropped */
	uint64_t compactions_done;
	uint64_t clusters_moved;
	uint64_t streams_repacked;     /* compressed streams moved (qcow_repack.c) */
};

static inline void qcow_lock(struct qcow_image *img) { pthread_mutex_lock(&img->lock); }
static inline void qcow_unlock(struct qcow_image *img) { pthread_mutex_unlock(&img->lock); }

/* Lock-ownership assertion for functions whose contract is "img->lock
 * held" (debug builds and runtime_asserts).  glibc records the kernel
 * thread id of a mutex's owner in every mutex kind, and pthread_cond_wait
 * keeps it right, so no wrapper around the lock is needed. */
void qcow_assert_failed(const char *what, const char *func);
static inline void qcow_assert_locked_at(struct qcow_image *img, const char *func)
{
	if (img->lock_asserts && __atomic_load_n(&img->lock.__data.__owner, __ATOMIC_RELAXED) != (int)gettid())
		qcow_assert_failed("img->lock is not held by this thread", func);
}
#define qcow_assert_locked(img) qcow_assert_locked_at((img), __func__)
static inline void qcow_assert_flush_locked_at(struct qcow_image *img, const char *func)
{
	if (img->lock_asserts && __atomic_load_n(&img->flush_lock.__data.__owner, __ATOMIC_RELAXED) != (int)gettid())
		qcow_assert_failed("img->flush_lock is not held by this thread", func);
}
#define qcow_assert_flush_locked(img) qcow_assert_flush_locked_at((img), __func__)

static inline uint64_t qcow_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* qcow_scan.c: one pass over all metadata, calling visit for each
 * reference.  Used to build the map at open and by qcow_check. */
enum qcow_ref_kind { QREF_HEADER, QREF_L1, QREF_REFTABLE, QREF_REFBLOCK, QREF_L2, QREF_DATA,
		     QREF_SNAPSHOT_TABLE, QREF_SNAPSHOT_L1, QREF_SNAPSHOT_L2, QREF_SNAPSHOT_DATA,
		     QREF_COMPRESSED, QREF_BITMAP_DIR, QREF_BITMAP_TABLE, QREF_BITMAP_DATA };
const char *qcow_ref_kind_name(enum qcow_ref_kind k);
struct qcow_scan_visitor {
	/* one reference to host cluster c from the slot at byte offset slot
	 * (0 for header structures); return a negative errno to stop */
	int (*visit)(void *opaque, enum qcow_ref_kind kind, uint64_t c, uint64_t slot);
	/* optional: every pointer of the active L1 and L2 tables to an
	 * allocated cluster, with its COPIED flag */
	int (*copied)(void *opaque, uint64_t c, bool copied_flag, uint64_t slot);
	void *opaque;
};
struct qcow_scan_geometry {
	struct qcow_io *io;
	const struct qcow_header *hdr;
	uint64_t file_clusters;      /* clusters the file covers (rounded up) */
	bool check_mode;             /* report problems and go on instead of stopping */
	/* open mode: corruptions QEMU's check reports but reads past
	 * (reserved bits, COPIED on a compressed cluster) are warnings, not
	 * refusals (read-only opens) */
	bool tolerate_corruption;
	uint64_t problems;           /* check mode: everything found */
	uint64_t corruptions;        /* open mode with tolerate_corruption */
	/* check mode: a refcount-table entry is unaligned (QEMU's check then
	 * cannot read the refcounts it covers) */
	bool reftable_unaligned;
};
int qcow_scan(struct qcow_scan_geometry *g, const struct qcow_scan_visitor *v, char *err, size_t errlen);
/* The first reference to cluster c in the walk's order (header structures,
 * then the active tables, then the snapshots'), corruption tolerated: true
 * with its kind and pointer slot (0 for header structures), false when
 * nothing on disk references c.  For messages that name a cluster's user. */
bool qcow_scan_first_user(const struct qcow_scan_geometry *g, uint64_t c, enum qcow_ref_kind *kind, uint64_t *slot);
/* The bitmaps header extension: 1 and its fields (and its header offset)
 * when present, else 0.  Its directory is validated by qcow_scan. */
int qcow_scan_bitmaps_ext(const struct qcow_header *h, uint32_t *nb, uint64_t *dir_size, uint64_t *dir_off, uint64_t *pos);

/* ---- services (img->lock held for all of them unless said otherwise) ---- */

/* qcow_tables.c: L1 and L2 tables */
/* L2 entries are 8 bytes, or 16 with extended L2 entries (the pointer,
 * then the subcluster bitmap): every index <-> byte conversion of an L2
 * table goes through these.  A pointer's slot (the map's reverse
 * reference) is the file offset of its entry's first byte. */
static inline unsigned qcow_l2_entry_shift(const struct qcow_image *img)
{
	return qcow_header_l2_entry_shift(&img->hdr);
}
static inline bool qcow_extl2(const struct qcow_image *img)
{
	return img->hdr.incompatible_features & QCOW_INCOMPAT_EXTL2;
}
/* The slot of entry idx of the L2 table at host cluster table. */
static inline uint64_t qcow_l2_slot(const struct qcow_image *img, uint64_t table, uint64_t idx)
{
	return (table << img->cluster_bits) + (idx << qcow_l2_entry_shift(img));
}
/* The entry index of a slot inside its L2 table. */
static inline uint64_t qcow_l2_slot_index(const struct qcow_image *img, uint64_t slot)
{
	return (slot & (img->cluster_size - 1)) >> qcow_l2_entry_shift(img);
}
/* The 8-byte pointer at file offset slot, in the cached table t holding
 * it: any pointer table (an L2 table of either entry size, whose slots
 * are its entries' first bytes; a snapshot L1 table; a bitmap table). */
static inline uint64_t qcow_slot_get(const struct qcow_image *img, const struct qcow_cached *t, uint64_t slot)
{
	return qcow_get_be64(t->data + (slot & (img->cluster_size - 1)));
}
/* Sets it, marks t dirty and cancels a move of t (qcow_tables.c). */
void qcow_slot_set(struct qcow_image *img, struct qcow_cached *t, uint64_t slot, uint64_t v);
/* The pointer of entry idx. */
static inline uint64_t qcow_l2_entry(const struct qcow_image *img, const struct qcow_cached *t, uint64_t idx)
{
	return qcow_get_be64(t->data + (idx << qcow_l2_entry_shift(img)));
}
/* The subcluster bitmap of entry idx (0 without extended L2 entries). */
static inline uint64_t qcow_l2_bitmap(const struct qcow_image *img, const struct qcow_cached *t, uint64_t idx)
{
	return qcow_extl2(img) ? qcow_get_be64(t->data + (idx << 4) + 8) : 0;
}
/* Which table holds the 8-byte pointer at file offset slot: the active L1
 * table or the refcount table (*index = its entry), a bitmap table (its
 * entries point at bitmap data clusters, with the L2 offset mask), a
 * snapshot's L1 table (another pinned whole table), or else an L2 table
 * (img->lock held). */
enum qcow_slot_kind { QSLOT_L2, QSLOT_ACTIVE_L1, QSLOT_SNAPSHOT_L1, QSLOT_REFTABLE, QSLOT_BITMAP_TABLE };
enum qcow_slot_kind qcow_slot_kind(const struct qcow_image *img, uint64_t slot, uint64_t *index);
/* The entry at slot of the L2 (or other pointer) table holding it, through
 * the cache; false if the table cannot be read. */
bool qcow_l2_entry_at(struct qcow_image *img, uint64_t slot, uint64_t *e);
/* The L2 table at host cluster l2_cluster, read on a miss; NULL and *ret. */
struct qcow_cached *qcow_l2_get(struct qcow_image *img, uint64_t l2_cluster, int *ret);
/* Sets entry idx of L2 table t, marks it dirty and cancels a move of t. */
void qcow_l2_set_entry(struct qcow_image *img, struct qcow_cached *t, uint64_t idx, uint64_t v);
/* Sets the subcluster bitmap of entry idx (extended L2 entries only),
 * likewise. */
void qcow_l2_set_bitmap(struct qcow_image *img, struct qcow_cached *t, uint64_t idx, uint64_t bm);
/* The pointer and subcluster bitmap of guest cluster gc (0, 0 when there
 * is no L2 table). */
int qcow_l2_lookup_bitmap(struct qcow_image *img, uint64_t gc, uint64_t *entry, uint64_t *bitmap);
void qcow_l1_set(struct qcow_image *img, uint64_t idx, uint64_t v);
/* The L2 entry of guest cluster gc (0 when there is no L2 table). */
int qcow_l2_lookup(struct qcow_image *img, uint64_t gc, uint64_t *entry);
/* The L2 table of L1 index l1i made writable in place (allocated, or
 * copied when shared); NULL and *ret (-EAGAIN: see qcow_alloc.c). */
struct qcow_cached *qcow_l2_for_write(struct qcow_image *img, uint64_t l1i, int *ret);

/* qcow_alloc.c: clusters (Available -> Roots) and file growth; -EAGAIN
 * while a truncation runs (then qcow_alloc_wait_truncation and retry) */
int qcow_alloc_cluster(struct qcow_image *img, uint64_t *out);
int qcow_alloc_contiguous(struct qcow_image *img, uint64_t n, uint64_t *out);
void qcow_alloc_wait_truncation(struct qcow_image *img);
/* Drops one reference to c whose pointer was just replaced by another:
 * if it was the last, c stays allocated (Pending) until the next flush has
 * made the replacement durable, and only then becomes Junk - erasing it
 * earlier would destroy what the durable pointer still shows after a
 * crash. */
void qcow_free_after_flush(struct qcow_image *img, uint64_t c, uint64_t slot);
/* Appends c (Pending) to the list the next flush frees; 0 or -ENOMEM. */
int qcow_released_add(struct qcow_image *img, uint64_t c);

/* qcow_datafile.c: the external data file (doc/design.md, "The external
 * data file").  Host offset of a data cluster == its guest offset; data
 * clusters are not in the map. */
static inline bool qcow_datafile_present(const struct qcow_image *img)
{
	return img->hdr.incompatible_features & QCOW_INCOMPAT_DATA_FILE;
}
/* Opens and locks the data file the header names (or opts.data_file,
 * opts.data_io); sets img->data_io (img->io without a data file). */
int qcow_datafile_open(struct qcow_image *img, char *err, size_t errlen);
void qcow_datafile_close(struct qcow_image *img);
/* Syncs the data file (flush step 2); a failure fails the image. */
int qcow_datafile_sync(struct qcow_image *img);
/* Claims guest clusters [gc, gc+count) for a release (img->lock held):
 * -EAGAIN with *wait_gc when a write holds one of them. */
int qcow_datafile_claim(struct qcow_image *img, uint64_t gc, uint64_t count, uint64_t *wait_gc);
/* After the claimed clusters' entries were unmapped and ticket taken
 * (img->lock not held): waits for the requests before the ticket, zeros
 * (punches) their range of the data file, drops the claims. */
int qcow_datafile_release(struct qcow_image *img, uint64_t gc, uint64_t count, uint64_t ticket);
/* A raw data file takes the disk's new size (flush_lock held): before
 * the disk grows, after it shrank.  0 or -errno. */
int qcow_datafile_resize(struct qcow_image *img, uint64_t new_size);

/* qcow_compress.c: compressed clusters (no lock needed) */
void qcow_compressed_range(const struct qcow_image *img, uint64_t e, uint64_t *off, uint64_t *len);
/* The descriptor of a stream of `bytes` bytes at host offset off. */
uint64_t qcow_compressed_descriptor(const struct qcow_image *img, uint64_t off, uint64_t bytes);
/* Decompresses the stream in[0..len) (read from host offset off, for the
 * message) into one cluster, by the image's compression type (deflate or
 * zstd); *consumed (if not NULL) gets the stream's true length in bytes. */
int qcow_compressed_inflate(const struct qcow_image *img, const uint8_t *in, size_t len, uint64_t off, uint8_t *out,
			    uint64_t *consumed);
/* The host clusters an L2 entry references (a compressed stream may span
 * several); false when it references none. */
bool qcow_entry_clusters(const struct qcow_image *img, uint64_t e, uint64_t *first, uint64_t *last);
int qcow_compressed_read(struct qcow_image *img, uint64_t e, uint8_t *out);

/* qcow_inflight.c: allocation claims on guest clusters */
bool qcow_claims_held(const struct qcow_image *img, uint64_t gc);
int qcow_claims_add(struct qcow_image *img, uint64_t gc);
void qcow_claims_drop(struct qcow_image *img, uint64_t gc);
void qcow_claims_wait(struct qcow_image *img, uint64_t gc);
void qcow_claims_free(struct qcow_image *img);

/* qcow_health.c: background errors and the failed state (see there).
 * what is a string literal naming the operation ("compaction"). */
void qcow_note_error(struct qcow_image *img, int err, const char *what);
void qcow_set_failed(struct qcow_image *img, int err, const char *what);
int qcow_health_failed(struct qcow_image *img);    /* 0, or the error that failed it */
void qcow_health_flush_ok(struct qcow_image *img);
void qcow_health_get(struct qcow_image *img, int *last_error, bool *failed);

/* After the L1 (refcount) table moved in memory: marks its first
 * `clusters` clusters dirty (entries changed in memory reach the new place
 * with the next flush) and points the reverse references of what it holds
 * at its new slots (qcow_tables.c). */
void qcow_l1_rehome(struct qcow_image *img, uint64_t old_off, uint64_t old_len, uint64_t clusters);
void qcow_reftable_rehome(struct qcow_image *img, uint64_t old_off, uint64_t old_len, uint64_t clusters);

/* qcow_repack.c (no lock held): moves the streams of the highest
 * compressed host clusters above free space into new clusters at the
 * lowest free place; returns how many streams moved or -errno.  Their old
 * clusters are released at the next flush. */
int64_t qcow_repack_streams(struct qcow_image *img);

/* qcow_relocate.c (above the flush layer; flush_lock held, img->lock
 * not): moves the L1 or refcount table into the n clusters at start,
 * which the caller allocated and pinned.  New table durable, header
 * switched with one write and made durable, old clusters freed.  On an
 * error before the switch the new clusters become Junk; on an error in
 * the switch both tables stay allocated and the next flush writes the
 * header again (reftable_switch_pending / header_dirty). */
enum qcow_table { QCOW_TABLE_L1, QCOW_TABLE_REFCOUNT };
int qcow_table_relocate(struct qcow_image *img, enum qcow_table which, uint64_t start, uint64_t n,
			uint32_t new_l1_size);

/* Waits on cond for at most ms milliseconds (mutex held). */
static inline void qcow_cond_wait_ms(pthread_cond_t *cond, pthread_mutex_t *mutex, unsigned ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_cond_timedwait(cond, mutex, &ts);
}

/* in-flight tracking (qcow_inflight.c) */
void qcow_inflight_begin(struct qcow_image *img, struct qcow_inflight *req);
void qcow_inflight_end(struct qcow_image *img, struct qcow_inflight *req);
/* Returns a ticket; qcow_inflight_wait_before(t) returns once every
 * request that began before the ticket was taken has ended.  Call the
 * first with img->lock held, the second without. */
uint64_t qcow_inflight_ticket(struct qcow_image *img);
void qcow_inflight_wait_before(struct qcow_image *img, uint64_t ticket);

/* qcow_flush.c */
/* The flush protocol.  qcow_flush takes flush_lock itself; the other is
 * for callers that already hold flush_lock (and not img->lock). */
int qcow_flush(struct qcow_image *img);
/* Whether a flush has anything left to write or complete (img->lock held). */
bool qcow_flush_needed(struct qcow_image *img);
int qcow_flush_holding_flush_lock(struct qcow_image *img);
/* Remembers clusters of an old table to free once a flush has written the
 * header that stops pointing at them (img->lock held). */
int qcow_pending_free_add(struct qcow_image *img, uint64_t first, uint64_t n);
/* Compares the on-disk refcounts with the map; marks differing blocks
 * dirty.  Returns the number of clusters that differ, or -errno. */
int64_t qcow_refcounts_compare(struct qcow_image *img);

/* qcow_snapshot.c (flush_lock held for relocate) */
/* Moves the snapshot table or one snapshot L1 table into a lower free
 * run: 1 if something moved, 0 if not, -errno. */
int qcow_snapshot_relocate(struct qcow_image *img);
/* Makes a read-only image show snapshot key (qcow_open.c). */
int qcow_snapshot_load_view(struct qcow_image *img, const char *key, char *err, size_t errlen);
/* Whether another process holds a read lock that shares writes (a
 * snapshot mounted read-only): nothing it may read may move or be freed.
 * One probe per call; records the answer in img->snapshot_reader. */
bool qcow_snapshot_reader_present(struct qcow_image *img);
#define QCOW_SNAPSHOT_READER_BLOCKER "a snapshot is mounted read-only by another process"

/* qcow_persistent_bitmap.c (doc/design.md, "Persistent dirty bitmaps") */
/* Reads the bitmap directory (qcow_scan has validated it) into
 * img->pbitmaps; nothing when autoclear bit 0 is clear or there is no
 * extension.  Every open. */
int qcow_pbitmap_open(struct qcow_image *img, char *err, size_t errlen);
/* Read-write open, after the repair: loads the bits of every enabled
 * bitmap not in use and sets its in_use flag, durable before returning. */
int qcow_pbitmap_load(struct qcow_image *img, char *err, size_t errlen);
/* Whether the bitmaps are kept (autoclear bit 0 stays set). */
bool qcow_pbitmap_present(const struct qcow_image *img);
/* Guest bytes [off, off+len) were written, zeroed or discarded: their
 * granules become dirty in every loaded bitmap.  Takes only the bitmaps'
 * own lock. */
void qcow_pbitmap_note(struct qcow_image *img, uint64_t off, uint64_t len);
/* Before a resize to new_size: -ENOTSUP when a bitmap is not loaded
 * (disabled or in use: its table could not follow), else the loaded bits
 * grow to cover new_size.  After it (whatever its result): bits past the
 * disk's size now are cleared.  No lock held. */
int qcow_pbitmap_resize_begin(struct qcow_image *img, uint64_t new_size);
void qcow_pbitmap_resize_end(struct qcow_image *img);
/* Clean close: stores every loaded bitmap in new clusters with in_use
 * clear (new copy durable, then the header's directory pointer, then the
 * old clusters freed).  flush_lock not held.  0 or -errno (in_use stays). */
int qcow_pbitmap_store(struct qcow_image *img);
/* Compaction: moves the bitmap tables and directory into lower free runs
 * (flush_lock held): 1 if something moved, 0 if not, -errno. */
int qcow_pbitmap_relocate(struct qcow_image *img);
void qcow_pbitmap_free(struct qcow_image *img);

/* qcow_recycler.c */
int qcow_recycler_start(struct qcow_image *img);
void qcow_recycler_stop(struct qcow_image *img);
void qcow_recycler_kick(struct qcow_image *img);
int qcow_compact_run(struct qcow_image *img, void (*progress)(double, void *), void *opaque);
/* Frees every move slot that is finished or cancelled and cancels every
 * move short of Referenced (img->lock held). */
void qcow_retire_moves(struct qcow_image *img);
/* truncates the file after the last block; flush_lock held */
int qcow_truncate_tail(struct qcow_image *img);
/* Fills the compaction-outcome fields of st (compactions_failed,
 * min_file_size, blocker) and reports a failing pass in last_error; takes
 * img->lock (qcow_image_get_stats, after qcow_health_get). */
void qcow_compact_outcome(struct qcow_image *img, struct qcow_stats *st);

/* qcow_sparsify.c (just below qcow_image.c; img->lock held) */
/* A write is resolving guest cluster gc: a sparsify must not free it. */
void qcow_sparsify_note_write(struct qcow_image *img, uint64_t gc);
/* Whether guest cluster gc reads zeros once unmapped (nothing from a
 * backing file could show through); false means "keep it allocated, or
 * zero-flag it". */
bool qcow_sparsify_unmap_reads_zero(struct qcow_image *img, uint64_t gc);
/* Whether len bytes at p are all zero (word-wise, stops at the first
 * non-zero word; no lock needed). */
bool qcow_sparsify_buffer_is_zero(const void *p, size_t len);

/* qcow_open.c: an open over a backend with the backing chain below it
 * already open (the image owns backing on success; on failure the caller
 * keeps both).  Tests use it with a raw backing on the memory backend. */
int qcow_image_open_io_backing(struct qcow_io *io, const struct qcow_open_opts *opts, struct qcow_backing *backing,
			       struct qcow_image **out, char *err, size_t errlen);
/* Closes a backing chain (NULL: nothing). */
void qcow_backing_free(struct qcow_backing *b);

/* qcow_chain.c (no lock): the file a backing name means (relative to the
 * folder of image_path), and a backing file's format ("qcow2" or "raw":
 * the recorded one if any, else probed); 0 or -errno with a message. */
int qcow_chain_resolve(const char *image_path, const char *name, char *out, size_t outlen, char *err, size_t errlen);
int qcow_chain_probe(const char *path, const char *recorded, char format[8], char *err, size_t errlen);

/* qcow_lock.c is declared in qcow_lock.h */

#define QCOW_DEFAULT_CACHE_BYTES (32u << 20)
#define QCOW_DEFAULT_COMPACT_THRESHOLD (64ull << 20)
#define QCOW_DEFAULT_QUIET_MS 1000u

#endif
