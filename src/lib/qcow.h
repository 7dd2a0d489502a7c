/*
 * qcow.h - the public interface of libqcow, the qcow2 engine of qcowfs.
 *
 * libqcow turns a qcow2 image into a flat array of bytes (the "raw view")
 * that can be read, written, discarded, zeroed, flushed and grown from many
 * threads at once.  It knows nothing about FUSE: the qcowfs daemon, the
 * qcowctl tool and the unit tests all drive it through this header only.
 *
 * Rules every caller can rely on:
 *  - Every function returning int or ssize_t returns a negative errno on
 *    failure (FUSE's convention) and never aborts on bad image data.
 *  - Functions that can fail because of the image's contents write a
 *    human-readable message naming the field, its value and its file offset
 *    to the log sink (qcow_log_set_sink) and, for open/create/check, into
 *    the caller's error buffer.
 *  - All calls on one struct qcow_image are thread-safe, except
 *    qcow_image_close, which must be the last call.
 *  - qcow_image_flush makes every write acknowledged before it started
 *    durable; after a crash at any instant the image has no corruption
 *    (leaked clusters at most, repaired by the next read-write open).
 */
#ifndef QCOW_H
#define QCOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

struct qcow_image;
struct qcow_io;

/* ---- logging ---------------------------------------------------------- */

enum qcow_log_level { QCOW_LOG_ERROR, QCOW_LOG_WARNING, QCOW_LOG_INFO, QCOW_LOG_DEBUG };

/* Where messages go.  The default sink prints "qcowfs: <msg>\n" to stderr
 * for levels up to QCOW_LOG_INFO (DEBUG only when the verbosity is raised). */
typedef void (*qcow_log_sink)(enum qcow_log_level level, const char *msg, void *opaque);
void qcow_log_set_sink(qcow_log_sink sink, void *opaque);
void qcow_log_set_verbosity(enum qcow_log_level max_level);

/* ---- opening ---------------------------------------------------------- */

/* What a guest write of all-zero data over whole clusters becomes
 * (QEMU's detect-zeroes).  The engine's default (zeroed options) is OFF:
 * a library caller gets what it writes.  The qcowfs daemon defaults to
 * UNMAP (doc/qcowfs.1 says why). */
enum qcow_detect_zeroes {
	QCOW_DETECT_ZEROES_OFF = 0, /* written like any data */
	QCOW_DETECT_ZEROES_ON,      /* a zero write: the clusters read zero, the data is not written */
	QCOW_DETECT_ZEROES_UNMAP,   /* a discard: the clusters are freed when nothing can show through */
};

struct qcow_open_opts {
	bool read_only;          /* shared locks only; every write returns -EROFS */
	bool runtime_asserts;    /* check every cluster-state transition and "lock held"
	                            contract as it happens, and every cluster-map
	                            invariant at each compaction phase; abort on a
	                            violation (slow) */
	bool no_locking;         /* skip QEMU-compatible OFD locks (tests on the memory backend) */
	size_t cache_bytes;      /* L2 table cache budget; 0 = default (32 MiB).  Refcounts
	                            are not cached: the cluster map holds them */
	bool compact;            /* run the background compactor (issue 3); default on */
	uint64_t compact_threshold_bytes; /* free space below EOF that triggers compaction; 0 = default */
	unsigned compact_quiet_ms;        /* discards must be quiet this long before auto compaction; 0 = default */
	bool recycler;           /* start the recycler thread at all (erase + compact) */
	enum qcow_detect_zeroes detect_zeroes;   /* all-zero writes of whole clusters */
	const char *snapshot;    /* read-only view of this internal snapshot (id or
	                            name, as qemu-img looks it up); needs read_only.
	                            The locks then share writes (qemu-img -U), so a
	                            read-write user may have the image open */
	const char *backing;     /* this file instead of the backing name the image
	                            records (format probed); NULL: as recorded */
	const char *data_file;   /* the external data file to use instead of the
	                            name the image records (-o data_file=PATH) */
	struct qcow_io *data_io; /* or this backend (unit tests; stays the caller's) */
};

/* Fills *opts with the defaults (read-write, locking on, recycler on). */
void qcow_open_opts_default(struct qcow_open_opts *opts);

/* Opens and fully validates the image at path (one scan of all metadata).
 * On failure returns a negative errno, writes a message into err (if
 * errlen > 0; it does not repeat the path, callers name the image) and
 * leaves the file byte-for-byte unchanged. */
int qcow_image_open(const char *path, const struct qcow_open_opts *opts,
		    struct qcow_image **out, char *err, size_t errlen);

/* Same, over an already opened backend (memory or crash simulator in unit
 * tests).  On success the image owns io; on failure the caller still does. */
int qcow_image_open_io(struct qcow_io *io, const struct qcow_open_opts *opts,
		       struct qcow_image **out, char *err, size_t errlen);

/* Stops the recycler, stores the persistent bitmaps, flushes until
 * nothing is left to write (refcounts included), truncates the free tail,
 * releases the locks and frees everything.  Returns 0 if the image was
 * closed cleanly. */
int qcow_image_close(struct qcow_image *img);

/* ---- guest I/O on the raw view ------------------------------------- */

uint64_t qcow_image_size(struct qcow_image *img);           /* virtual size in bytes */

/* Reads/writes exactly len bytes at off, any alignment.  The range must lie
 * inside the virtual size (-EINVAL otherwise; callers clip at EOF).
 * Return len or a negative errno. */
ssize_t qcow_image_read(struct qcow_image *img, void *buf, size_t len, uint64_t off);
ssize_t qcow_image_write(struct qcow_image *img, const void *buf, size_t len, uint64_t off);

/* Makes everything acknowledged so far durable (the flush protocol). */
int qcow_image_flush(struct qcow_image *img);

/* Afterwards [off, off+len) reads as zeros.  Whole clusters are released;
 * over a backing file, whose data would show through, they are released
 * and zero-flagged instead (version 3), get their subclusters' zero bits
 * (extended L2), or are written as zeros (version 2: no zero flag).
 * Partial clusters (subclusters with extended L2) are zeroed in place.
 * discard and zero are the same operation (ZERO_RANGE has the same
 * contract); both free whole clusters. */
int qcow_image_discard(struct qcow_image *img, uint64_t off, uint64_t len);
int qcow_image_zero(struct qcow_image *img, uint64_t off, uint64_t len);

/* Changes the virtual size.  Growing: the L1 and refcount tables grow or
 * move as needed.  Shrinking frees every cluster past the new end (as a
 * discard does) and the L2 tables that covered only that part, and zeroes
 * the rest of the last partial cluster; it is refused with -ENOTSUP while
 * the image has internal snapshots (as QEMU refuses it). */
int qcow_image_resize(struct qcow_image *img, uint64_t new_size);

/* ---- sparsify --------------------------------------------------------- */

struct qcow_sparsify_result {
	uint64_t guest_clusters;     /* clusters of the virtual disk (progress total) */
	uint64_t guest_done;         /* of those, walked so far */
	uint64_t scanned;            /* allocated data clusters looked at */
	uint64_t freed;              /* found all zeros and freed (discarded) */
	uint64_t bytes_freed;        /* freed * cluster size */
	uint64_t skipped_shared;     /* shared with a snapshot (refcount > 1): left */
	uint64_t skipped_compressed; /* compressed: left */
	uint64_t skipped_changed;    /* written by the guest while being checked: left */
	uint64_t skipped_backing;    /* zeros that would hide backing data: left */
};
/* Called after each batch with the counts so far; a non-zero return stops
 * the scan (qcow_image_sparsify then returns -ECANCELED). */
typedef int (*qcow_sparsify_progress)(const struct qcow_sparsify_result *so_far, void *opaque);

/* Frees every allocated data cluster that reads all zeros, while guest I/O
 * continues (never one that a write is changing at the same moment), then
 * asks the recycler to give the space back.  res (required) holds the
 * counts, also on failure.  -EBUSY while another sparsify runs on img,
 * -EROFS on a read-only image. */
int qcow_image_sparsify(struct qcow_image *img, qcow_sparsify_progress progress, void *opaque,
			struct qcow_sparsify_result *res);

/* SEEK_DATA / SEEK_HOLE answered from the L2 tables (and, for clusters
 * that show the backing chain, from the backing images').  Returns the
 * offset or -ENXIO (no data at or after off / off past the end) or
 * -EINVAL. */
int64_t qcow_image_seek(struct qcow_image *img, uint64_t off, int whence);

/* ---- statistics and compaction ------------------------------------- */

struct qcow_stats {
	uint64_t virtual_size;
	uint64_t cluster_size;
	uint64_t file_size;            /* apparent size of the image file */
	uint64_t file_allocated;       /* bytes the host file system allocated (st_blocks*512) */
	uint64_t clusters_total;       /* clusters the map covers */
	uint64_t clusters_header;      /* header, active L1 table, refcount table */
	uint64_t clusters_referenced;  /* everything else referenced: L2 tables, refcount
	                                  blocks, data, snapshot table and L1 tables,
	                                  bitmap structures */
	uint64_t clusters_shared;      /* of those, clusters with several pointers
	                                  (shared with snapshots, compressed streams) */
	uint64_t map_bytes;            /* memory the cluster map uses */
	uint64_t clusters_junk;
	uint64_t clusters_erased;
	uint64_t clusters_available;
	uint64_t clusters_copies;
	uint64_t clusters_roots;
	uint64_t clusters_pending;     /* move sources waiting for their completing flush */
	uint64_t moves_in_flight;
	/* What the host got back since open: the decrease of the image
	 * file's host allocation (st_blocks * 512) over each step of the
	 * recycler (an erase batch's punches, a compaction pass with its
	 * copies and truncation, a tail trim), summed.  A punched cluster
	 * that a truncation later cuts off counts once (it holds no blocks
	 * by then), the unwritten headroom a truncation cuts off counts 0,
	 * and what a pass copies into punched holes is taken off again.
	 * Exact while the guest is idle during those steps; guest writes
	 * that allocate during one make it lower, never higher. */
	uint64_t bytes_reclaimed;
	/* Bytes of allocated host clusters that discards, unmapping zero
	 * writes (detect_zeroes=unmap), shrinks and sparsify freed since
	 * open: a host cluster counts once, when its last reference goes
	 * (not while a snapshot or another compressed stream still holds
	 * it); never-allocated ranges count 0.  (Older daemons sent the
	 * requested bytes under this key: now bytes_discard_requested.) */
	uint64_t bytes_discarded;
	/* Guest bytes of the whole clusters (subclusters) that those
	 * requests covered, allocated or not. */
	uint64_t bytes_discard_requested;
	uint64_t compactions_done;
	uint64_t clusters_moved;
	uint64_t streams_repacked;     /* compressed streams moved down by compaction */
	bool compacting;
	double compact_progress;       /* 0..1 of the current compaction, 1 when idle */
	bool punch_supported;          /* host file system can punch holes */
	bool read_only;
	/* errors and compaction outcome */
	int last_error;                /* negative errno of the background error not yet
	                                  recovered from (0: none; cleared by the next
	                                  successful flush, or for a failed compaction
	                                  pass by the next pass that works) */
	bool failed;                   /* the engine could not be sure of its state after
	                                  an I/O error: writes return -EIO until the image
	                                  is opened again, and close reports the error */
	uint64_t compactions_failed;   /* compaction passes that ended in an error */
	uint64_t min_file_size;        /* bytes in use (clusters referenced or being
	                                  allocated): the size a perfect compaction, or
	                                  qemu-img convert of the same clusters, gives */
	char blocker[160];             /* why the file cannot get below its current size,
	                                  when it is above min_file_size ("" otherwise) */
};
void qcow_image_get_stats(struct qcow_image *img, struct qcow_stats *st);

/* The status channel between the daemon and qcowctl: the daemon answers
 * the QCOWFS_IOC_STATUS ioctl on the mounted view with the text made by
 * qcow_stats_format (one "key=value" line per field of struct qcow_stats,
 * keys are the field names); qcowctl parses it back.  format returns the
 * text length (excluding the NUL) or -ERANGE if len is too small; parse
 * ignores unknown keys and returns 0 or -EINVAL. */
int qcow_stats_format(const struct qcow_stats *st, char *buf, size_t len);
int qcow_stats_parse(const char *text, struct qcow_stats *st);

/* Runs a full compaction now and returns when the file is as short as it
 * can get (or on error).  progress, if not NULL, is called from the calling
 * thread with values in 0..1.  Works while guest I/O continues. */
int qcow_image_compact(struct qcow_image *img, void (*progress)(double, void *), void *opaque);

/* Asks the recycler for a compaction pass without waiting for it. */
void qcow_image_request_compact(struct qcow_image *img);

/* ---- internal snapshots (qcow_snapshot.c) ------------------------------ */

/* Compatible with qemu-img snapshot in both directions.  A snapshot is
 * the raw view as of the call (everything acknowledged before it); the
 * VM state size is 0.  Names are looked up as QEMU does: an id first,
 * then a name.  Errors: -ENOENT (no such snapshot), -EEXIST (create: the
 * name is taken), -EBUSY (delete/apply: another process has a snapshot
 * mounted read-only), -EROFS, -EINVAL (empty or too long name), -ENOTSUP
 * (1-bit refcounts cannot share clusters), -ERANGE (create, apply: a
 * refcount would exceed the image's refcount width; nothing changed).
 * An I/O error before the header switch takes the operation back; one
 * after it (the last flush failed) leaves it in memory for the next flush
 * to write, like any write whose flush failed.  Either way the image on
 * disk is consistent at every instant; a version 3 image may stay marked
 * dirty until its next read-write open repairs it. */
#define QCOW_SNAPSHOT_NAME_MAX 255
struct qcow_snapshot_info {
	char id[32];
	char name[QCOW_SNAPSHOT_NAME_MAX + 1];
	uint64_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t vm_state_size;
	uint64_t disk_size;         /* the guest disk size it was taken with */
	uint64_t l1_offset;
	uint32_t l1_size;
	int64_t icount;             /* QEMU's instruction count at the snapshot,
	                               -1 when the entry records none (as QEMU) */
};
/* *out is an array of *count entries, freed with free(). */
int qcow_snapshot_list(struct qcow_image *img, struct qcow_snapshot_info **out, uint32_t *count);
/* The same list read from the file at path without opening the image
 * (no locks, header structure checked only, as qcow_info_read), for
 * `qcowctl info`.  -errno with a message in err on failure. */
int qcow_snapshot_list_file(const char *path, struct qcow_snapshot_info **out, uint32_t *count,
			    char *err, size_t errlen);
int qcow_snapshot_create(struct qcow_image *img, const char *name);
int qcow_snapshot_delete(struct qcow_image *img, const char *name);
/* The active disk becomes the snapshot's (its contents and its size);
 * the old active state is released.  Whoever uses the view must be told
 * (the daemon invalidates the kernel's cache of it). */
int qcow_snapshot_apply(struct qcow_image *img, const char *name);
bool qcow_snapshot_any(struct qcow_image *img);

/* ---- offline tools --------------------------------------------------- */

struct qcow_create_opts {
	uint64_t size;           /* virtual size, bytes */
	unsigned cluster_bits;   /* 9..21, default 16 */
	unsigned version;        /* 2 (compat 0.10) or 3 (compat 1.1), default 3 */
	unsigned refcount_order; /* 0..6, default 4; v2 requires 4 */
};
void qcow_create_opts_default(struct qcow_create_opts *opts);
/* Creates a new image (fails with -EEXIST if path exists). */
int qcow_create(const char *path, const struct qcow_create_opts *opts, char *err, size_t errlen);

struct qcow_check_result {
	uint64_t errors;           /* corruptions (refcount too low, bad pointers, ...) */
	uint64_t leaks;            /* clusters with refcount > references */
	uint64_t clusters_used;    /* clusters with at least one reference */
	uint64_t clusters_free;    /* clusters below the image end with no reference */
	uint64_t image_end_offset; /* end of the last used cluster */
	uint64_t total_clusters;   /* virtual size in clusters */
	uint64_t allocated_clusters; /* guest clusters with data */
};
/* Full consistency check without changing the file.  Prints one line per
 * problem to the log sink.  Returns 0 when the check ran (result filled),
 * or a negative errno with a message in err when it could not run. */
int qcow_check(const char *path, struct qcow_check_result *res, char *err, size_t errlen);

struct qcow_info {
	unsigned version;
	uint64_t virtual_size;
	unsigned cluster_bits;
	unsigned refcount_bits;
	unsigned compression_type; /* header byte 104: 0 zlib, 1 zstd */
	unsigned crypt_method;     /* 0 none, 1 AES (legacy), 2 LUKS */
	uint64_t file_size;
	uint64_t file_allocated;
	uint64_t incompatible_features, compatible_features, autoclear_features;
	uint32_t nb_snapshots;
	uint64_t l1_table_offset;
	uint32_t l1_size;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	char backing_file[1024];   /* empty if none */
	char backing_format[32];   /* the backing format extension, empty if none */
	bool dirty, corrupt;
	char data_file[1024];      /* external data file name as recorded; empty if none */
	bool has_data_file;        /* incompatible bit 2 (the name may still be missing) */
	bool data_file_raw;        /* autoclear bit 1 */
};
/* Reads and validates the header only (no locks taken). */
int qcow_info_read(const char *path, struct qcow_info *info, char *err, size_t errlen);

/* The LUKS header of a LUKS-encrypted image (crypt_method 2), decoded as
 * qemu-img info shows it (no key needed: nothing secret is read). */
struct qcow_luks_info {
	char cipher_alg[48];      /* "aes-256" */
	char cipher_mode[33];     /* "xts" */
	char ivgen_alg[33];       /* "plain64", "essiv" */
	char ivgen_hash_alg[33];  /* "" unless the IV generator has a hash */
	char hash_alg[33];        /* "sha256" */
	char uuid[41];
	uint64_t payload_offset;  /* bytes */
	uint32_t master_key_iters;
	struct {
		bool active;
		uint32_t iters, stripes;   /* meaningful for active slots */
		uint64_t key_offset;       /* bytes */
	} slots[8];
};
/* Reads it (no locks taken); -EINVAL with a message naming the offset when
 * the image has no readable LUKS version 1 header. */
int qcow_info_luks(const char *path, struct qcow_luks_info *out, char *err, size_t errlen);

/* ---- backing chains ---------------------------------------------- */

/* Images below a top image, at most this many (QEMU's limit too). */
#define QCOW_CHAIN_MAX_DEPTH 64

/* One image of a backing chain. */
struct qcow_chain_entry {
	char path[4096];     /* the file: a relative name resolved against the
	                        folder of the image that names it */
	char format[8];      /* "qcow2" or "raw" */
	char name[1024];     /* the name as the image above records it ("" for the top) */
};
/* Follows the backing names below the qcow2 image at path, reading headers
 * only (no locks): entries top first, *n of them; the caller frees *out
 * with free().  backing_override (NULL: as recorded) replaces the top's
 * backing name, as -o backing= does (its format is then probed).  A loop
 * or a chain deeper than QCOW_CHAIN_MAX_DEPTH is refused (-ELOOP) with the
 * chain in the message; so is a backing format other than qcow2 and raw. */
int qcow_chain_list(const char *path, const char *backing_override, struct qcow_chain_entry **out, size_t *n,
		    char *err, size_t errlen);

/* Persistent dirty bitmaps as `qemu-img info` lists them (none when the
 * bitmaps autoclear bit is clear); *out is freed with free(). */
#define QCOW_PBITMAP_IN_USE 1u
#define QCOW_PBITMAP_AUTO 2u
struct qcow_pbitmap_info {
	char name[1024];
	uint64_t granularity;      /* bytes per bit */
	uint32_t flags;            /* QCOW_PBITMAP_* */
};
int qcow_pbitmap_list_file(const char *path, struct qcow_pbitmap_info **out, uint32_t *count, char *err, size_t errlen);

/* ---- the map of an image: what qcowctl map shows (qcow_imgmap.c) ---- */

/* What guest bytes [start, start + length) show, as qemu-img map reports
 * it: depth is how many images down the backing chain it comes from;
 * present: allocated there (data or zero flag); offset (has_offset) the
 * host offset in file (NULL: the image itself; else the backing file or
 * the external data file, a path owned by the image). */
struct qcow_map_extent {
	uint64_t start, length;
	uint32_t depth;
	bool present, zero, data, compressed, has_offset;
	uint64_t offset;
	const char *file;
};
/* The extent from guest offset off (at most max_len bytes; one L2 table's
 * range at most, callers loop and merge): 0, -ENXIO past the end, or a
 * negative errno (an L2 table that cannot be read). */
int qcow_image_map_extent(struct qcow_image *img, uint64_t off, uint64_t max_len,
			  struct qcow_map_extent *ext);

/* What a cluster of the image file holds, for its picture. */
enum qcow_pic_kind {
	QCOW_PIC_HEADER, QCOW_PIC_L1, QCOW_PIC_L2, QCOW_PIC_REFTABLE, QCOW_PIC_REFBLOCK,
	QCOW_PIC_SNAPSHOT, QCOW_PIC_BITMAP, QCOW_PIC_DATA, QCOW_PIC_COMPRESSED, QCOW_PIC_SHARED,
	QCOW_PIC_JUNK, QCOW_PIC_ERASED, QCOW_PIC_AVAILABLE, QCOW_PIC_MOVING,
	QCOW_PIC_NKINDS
};
#define QCOW_PICTURE_MAX_CELLS 4096
/* The image file in at most QCOW_PICTURE_MAX_CELLS cells of
 * clusters_per_cell clusters each; a cell holds its dominant kind
 * (ties: the lower kind), totals counts clusters per kind. */
struct qcow_picture {
	uint64_t file_size, cluster_size, clusters, clusters_per_cell;
	uint32_t cells;
	uint64_t totals[QCOW_PIC_NKINDS];
	uint8_t cell[QCOW_PICTURE_MAX_CELLS];
};
/* Fills *pic from the cluster map (max_cells 0: the cap); 0 or -errno. */
int qcow_image_picture(struct qcow_image *img, uint32_t max_cells, struct qcow_picture *pic);

/* Version strings of the engine and the allocator. */
const char *qcow_version(void);
const char *qcow_allocator_version(void);

#ifdef __cplusplus
}
#endif
#endif
