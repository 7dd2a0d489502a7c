/*
 * qcow_format.h - qcow2 on-disk constants and big-endian accessors.
 *
 * Owns: every number that comes from the qcow2 specification.  All on-disk
 * integers are big-endian; these helpers are the only place that converts.
 */
#ifndef QCOW_FORMAT_H
#define QCOW_FORMAT_H
#include <endian.h>
#include <stdint.h>
#include <string.h>

#define QCOW_MAGIC 0x514649fbu
#define QCOW_V2_HEADER_LEN 72u
#define QCOW_V3_MIN_HEADER_LEN 104u
#define QCOW_V3_NEW_HEADER_LEN 112u
#define QCOW_MIN_CLUSTER_BITS 9u
#define QCOW_MAX_CLUSTER_BITS 21u
#define QCOW_MAX_L1_BYTES (32u << 20)
#define QCOW_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW_MAX_SNAPSHOTS 65536u
#define QCOW_MAX_BACKING_NAME 1023u
#define QCOW_MAX_HOST_OFFSET (1ull << 56)

/* header field offsets */
#define QH_MAGIC 0
#define QH_VERSION 4
#define QH_BACKING_OFFSET 8
#define QH_BACKING_SIZE 16
#define QH_CLUSTER_BITS 20
#define QH_SIZE 24
#define QH_CRYPT 32
#define QH_L1_SIZE 36
#define QH_L1_OFFSET 40
#define QH_REFTABLE_OFFSET 48
#define QH_REFTABLE_CLUSTERS 56
#define QH_NB_SNAPSHOTS 60
#define QH_SNAPSHOTS_OFFSET 64
#define QH_INCOMPAT 72
#define QH_COMPAT 80
#define QH_AUTOCLEAR 88
#define QH_REFCOUNT_ORDER 96
#define QH_HEADER_LENGTH 100
#define QH_COMPRESSION_TYPE 104

#define QCOW_INCOMPAT_DIRTY (1ull << 0)
#define QCOW_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW_INCOMPAT_EXTL2 (1ull << 4)
/* incompatible bits this engine implements */
#define QCOW_INCOMPAT_SUPPORTED (QCOW_INCOMPAT_DIRTY | QCOW_INCOMPAT_CORRUPT | QCOW_INCOMPAT_COMPRESSION | \
				 QCOW_INCOMPAT_DATA_FILE | \
				 QCOW_INCOMPAT_EXTL2)
/* header byte 104 */
#define QCOW_COMPRESSION_ZLIB 0   /* raw deflate streams */
#define QCOW_COMPRESSION_ZSTD 1   /* zstd frames */
#define QCOW_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* autoclear bit 1: the external data file is a valid raw image by itself */
#define QCOW_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

#define QCOW_EXT_END 0x00000000u
#define QCOW_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW_EXT_BITMAPS 0x23852875u
#define QCOW_EXT_CRYPTO 0x0537be77u
#define QCOW_EXT_DATA_FILE 0x44415441u

/* L1 / L2 / refcount table entries */
#define QCOW_OFLAG_COPIED (1ull << 63)
#define QCOW_OFLAG_COMPRESSED (1ull << 62)
#define QCOW_OFLAG_ZERO (1ull << 0)
#define QCOW_L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW_L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW_REFT_OFFSET_MASK 0xfffffffffffffe00ull
/* extended L2 entries (incompatible bit 4): 16 bytes, the pointer as
 * above (its zero flag unused), then the subcluster bitmap: bit k
 * (0..31) subcluster k allocated, bit 32+k subcluster k reads zeros */
#define QCOW_SUBCLUSTERS 32u
#define QCOW_EXTL2_MIN_CLUSTER_BITS 14u
#define QCOW_SC_ALLOC_ALL 0x00000000ffffffffull
#define QCOW_SC_ZERO_ALL 0xffffffff00000000ull

/* QEMU's lock bytes (research/qemu.md section 3) */
#define QCOW_LOCK_PERM_BASE 100
#define QCOW_LOCK_SHARED_BASE 200
#define QCOW_PERM_CONSISTENT_READ 0
#define QCOW_PERM_WRITE 1
#define QCOW_PERM_RESIZE 3

static inline uint16_t qcow_get_be16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t qcow_get_be32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t qcow_get_be64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void qcow_put_be32(void *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void qcow_put_be64(void *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

#endif
