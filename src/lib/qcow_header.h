/*
 * qcow_header.h - parsing, validating and rewriting the qcow2 header.
 *
 * Owns: the in-memory copy of cluster 0 (header, unknown header fields,
 * header extensions, backing file name) and the decoded fields.  Rules:
 *  - Parsing treats every field as hostile: each check that fails names
 *    the field, its value and its offset.
 *  - Rewrites patch only the bytes of the changed fields inside the raw
 *    copy and write them back, so unknown fields and extensions survive
 *    byte-exact.  Fields that must change together (l1_size+l1_offset,
 *    reftable offset+clusters) are written in one write.
 */
#ifndef QCOW_HEADER_H
#define QCOW_HEADER_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow_format.h"

struct qcow_io;

struct qcow_header {
	uint32_t version;
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
	char backing_file[1024];
	char backing_format[32];     /* backing format extension; empty: probe */
	/* the external data file's name (header extension 0x44415441), ""
	 * without one; data_file_ext: the extension's offset, 0 without one */
	char data_file[1024];
	uint64_t data_file_ext;
	/* raw bytes of cluster 0 as read (up to the cluster size) */
	uint8_t *raw;
	size_t raw_len;
	uint64_t file_size;
};

/* Bytes of one L2 entry: 16 with extended L2 entries (incompatible bit
 * 4: the pointer, then the subcluster bitmap), else 8.  Every L2 index
 * to byte conversion goes through this (or qcow_l2_entry_shift). */
static inline unsigned qcow_header_l2_entry_shift(const struct qcow_header *h)
{
	return (h->incompatible_features & QCOW_INCOMPAT_EXTL2) ? 4 : 3;
}

/* Reads cluster 0 and validates every header field and extension against
 * the file size.  Returns 0 or a negative errno with a message in err. */
int qcow_header_read(struct qcow_io *io, struct qcow_header *h, char *err, size_t errlen);
/* Same, but only the structure is validated: features this engine does
 * not implement (backing files, extended L2, zstd, ...) are reported in h
 * instead of refused.  For `qcowctl info`, never for opening. */
int qcow_header_read_info(struct qcow_io *io, struct qcow_header *h, char *err, size_t errlen);
/* Same as qcow_header_read, but refuses only what QEMU's open refuses:
 * tables at offset 0, past the end of the file or overlapping each other,
 * and a header_length that is not a multiple of 8, are left to the
 * consistency check to count (for qcow_check, never for opening). */
int qcow_header_read_check(struct qcow_io *io, struct qcow_header *h, char *err, size_t errlen);
void qcow_header_free(struct qcow_header *h);

/* Patches field bytes [off, off+len) of the raw copy from h and writes them
 * to the file in one write. */
int qcow_header_write_fields(struct qcow_io *io, struct qcow_header *h, unsigned off, unsigned len);
/* Encodes h's numeric fields into h->raw (no I/O). */
void qcow_header_encode(struct qcow_header *h);

#endif
