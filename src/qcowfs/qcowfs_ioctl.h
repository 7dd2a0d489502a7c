/*
 * qcowfs_ioctl.h - the control channel between the qcowfs daemon and
 * qcowctl (or any program): ioctls on the mounted raw view.
 *
 * Why ioctls and not extended attributes: a FUSE file system that answers
 * getxattr is asked for "security.capability" before every single write
 * (the kernel's check whether a write must drop privileges), which costs
 * one extra round trip per write and halved random-write throughput.
 * The daemon implements no xattr operation at all, so the kernel stops
 * asking after the first ENOSYS.
 *
 * Access: the kernel lets only a process that opened the view send these,
 * and the open was checked against the view's mode and owner.  STATUS needs
 * a descriptor open for reading (O_RDONLY or O_RDWR), COMPACT one open for
 * writing (O_WRONLY or O_RDWR); otherwise the ioctl fails with EBADF, as
 * write(2) does on a descriptor opened read-only.  FUSE passes them in
 * "restricted" mode: the size and direction come from the command number.
 */
#ifndef QCOWFS_IOCTL_H
#define QCOWFS_IOCTL_H
#include <stdint.h>
#include <sys/ioctl.h>

#define QCOWFS_IOC_MAGIC 'Q'
#define QCOWFS_STATUS_MAX 4096

/* The status as NUL-terminated text: the key=value lines of
 * qcow_stats_format (fields of struct qcow_stats), then "pid=" (the
 * daemon's process id), "image=" (the absolute image path) and, when the
 * daemon has one, "close_report=@NAME": the Unix socket in the abstract
 * namespace where it sends the result of its final close (qcowfs.c, "the
 * close report"; qcowctl unmount reads it). */
struct qcowfs_status_text {
	char text[QCOWFS_STATUS_MAX];
};
#define QCOWFS_IOC_STATUS _IOR(QCOWFS_IOC_MAGIC, 1, struct qcowfs_status_text)

/* Asks the recycler for a compaction pass and returns at once; follow it
 * with QCOWFS_IOC_STATUS (compacting, compact_progress, compactions_done,
 * compactions_failed). */
#define QCOWFS_IOC_COMPACT _IO(QCOWFS_IOC_MAGIC, 2)

/* Sparsify (qcowctl sparsify): frees every allocated cluster of the image
 * that reads all zeros, on a thread of the daemon while the view stays in
 * use (qcow_image_sparsify).  op START begins a run and needs a descriptor
 * open for writing (EBADF otherwise; EBUSY while a run is going on; EROFS
 * on a read-only mount); op QUERY (any descriptor that may read or write)
 * reports the current or last run.  Both answer with the state and the
 * counts of struct qcow_sparsify_result so far; error is 0 or the negative
 * errno the run ended with.  Numbers 4..9 are reserved for snapshots. */
enum { QCOWFS_SPARSIFY_START = 1, QCOWFS_SPARSIFY_QUERY = 2 };
enum { QCOWFS_SPARSIFY_NEVER = 0, QCOWFS_SPARSIFY_RUNNING = 1, QCOWFS_SPARSIFY_DONE = 2 };
struct qcowfs_sparsify {
	uint32_t op;                  /* in */
	uint32_t state;               /* out: NEVER, RUNNING or DONE */
	int32_t error;                /* out, when DONE */
	uint32_t reserved;
	uint64_t run;                 /* out: runs started since the mount (this one's number) */
	uint64_t cluster_size;
	uint64_t guest_clusters, guest_done;
	uint64_t scanned, freed, bytes_freed;
	uint64_t skipped_shared, skipped_compressed, skipped_changed, skipped_backing;
};
#define QCOWFS_IOC_SPARSIFY _IOWR(QCOWFS_IOC_MAGIC, 3, struct qcowfs_sparsify)
/* Internal snapshots (numbers 4..9; 3 belongs to sparsify).  FUSE passes
 * restricted ioctls with the fixed size of their argument, so the name
 * travels in a struct.  CREATE, DELETE and APPLY need a descriptor open
 * for writing, LIST one open for reading.  The daemon does the work in
 * the engine, which serialises it with flushes and compaction and waits
 * for the guest requests in flight (qcow_snapshot.c).  Errors: ENOENT no
 * such snapshot, EEXIST name taken, EBUSY another process has a snapshot
 * mounted read-only (delete, apply), EPERM apply without
 * QCOWFS_SNAPSHOT_FORCE, EROFS read-only mount, EINVAL empty name. */
#define QCOWFS_SNAPSHOT_NAME_MAX 256      /* including the NUL; QCOW_SNAPSHOT_NAME_MAX + 1 */
#define QCOWFS_SNAPSHOT_FORCE 1u          /* apply: change the disk under its users */
struct qcowfs_snapshot_req {
	char name[QCOWFS_SNAPSHOT_NAME_MAX];
	unsigned int flags;
};
#define QCOWFS_IOC_SNAPSHOT_CREATE _IOW(QCOWFS_IOC_MAGIC, 4, struct qcowfs_snapshot_req)
#define QCOWFS_IOC_SNAPSHOT_DELETE _IOW(QCOWFS_IOC_MAGIC, 5, struct qcowfs_snapshot_req)
#define QCOWFS_IOC_SNAPSHOT_APPLY _IOW(QCOWFS_IOC_MAGIC, 6, struct qcowfs_snapshot_req)

/* The snapshots as text, one line each, fields separated by tabs:
 * id, name, vm state size, date seconds, date nanoseconds, vm clock ns,
 * disk size.  Names with a tab or newline are not listed faithfully
 * (qcowctl snapshot list on the image file shows them). */
#define QCOWFS_SNAPSHOT_LIST_MAX 16000
struct qcowfs_snapshot_list {
	char text[QCOWFS_SNAPSHOT_LIST_MAX];
};
#define QCOWFS_IOC_SNAPSHOT_LIST _IOR(QCOWFS_IOC_MAGIC, 7, struct qcowfs_snapshot_list)

/* The picture of the image file (qcowctl map --picture on a mount): the
 * daemon's cluster map summed into at most QCOWFS_PICTURE_CELLS cells of
 * clusters_per_cell clusters; cell[i] is the kind most of its clusters
 * have (the numbering of enum qcow_pic_kind in qcow.h: 0 header, 1 L1,
 * 2 L2, 3 refcount table, 4 refcount block, 5 snapshot tables, 6 bitmap
 * structures, 7 data, 8 compressed data, 9 shared data, 10 junk,
 * 11 erased, 12 available, 13 moving), totals[k] the clusters of kind k
 * in the whole file.  Needs a descriptor that may read.  A fixed size
 * (4.3 KB) for FUSE's restricted ioctls. */
#define QCOWFS_PICTURE_CELLS 4096
#define QCOWFS_PICTURE_KINDS 16
struct qcowfs_picture {
	uint64_t file_size, cluster_size, clusters, clusters_per_cell;
	uint32_t cells, kinds;        /* kinds: how many of totals[] are used */
	uint64_t totals[QCOWFS_PICTURE_KINDS];
	uint8_t cell[QCOWFS_PICTURE_CELLS];
};
#define QCOWFS_IOC_PICTURE _IOR(QCOWFS_IOC_MAGIC, 10, struct qcowfs_picture)

#endif
