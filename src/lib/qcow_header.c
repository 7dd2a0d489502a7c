/*
 * qcow_header.c - qcow2 header parser and validator (see qcow_header.h).
 *
 * Every limit below comes from research/qemu.md section 1: we accept what
 * QEMU accepts and refuse, with the field named, what QEMU refuses, plus
 * the features this engine does not implement yet (encryption, extended
 * L2).
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#define FAIL(e, ...) do { qcow_set_error(err, errlen, __VA_ARGS__); ret = -(e); goto out; } while (0)

/* Names of the incompatible bits QEMU defines, for messages. */
static const char *incompat_name(unsigned bit)
{
	switch (bit) {
	case 0: return "dirty bit";
	case 1: return "corrupt bit";
	case 2: return "external data file";
	case 3: return "compression type";
	case 4: return "extended L2 entries";
	default: return NULL;
	}
}

/* The name the image's feature name table extension gives incompatible
 * feature bit `bit` (QEMU's way of naming bits newer than itself), copied
 * into out; false if there is none.  Runs before the extensions are
 * validated, so every bound is checked here. */
static bool feature_table_name(const struct qcow_header *h, uint64_t cs, unsigned bit, char *out, size_t len)
{
	uint64_t end = cs, pos = h->header_length;

	if (h->backing_file_offset && h->backing_file_offset < end)
		end = h->backing_file_offset;
	while (pos + 8 <= end) {
		uint32_t type = qcow_get_be32(h->raw + pos);
		uint32_t n = qcow_get_be32(h->raw + pos + 4);
		if (type == QCOW_EXT_END || n > end - pos - 8)
			return false;
		if (type == QCOW_EXT_FEATURE_TABLE) {
			/* entries of 48 bytes: type (0 = incompatible), bit, name[46] */
			for (uint32_t e = 0; e + 48 <= n; e += 48) {
				const uint8_t *p = h->raw + pos + 8 + e;
				if (p[0] == 0 && p[1] == bit) {
					size_t k = strnlen((const char *)p + 2, 46);
					if (k >= len)
						k = len - 1;
					for (size_t i = 0; i < k; i++)   /* printable only: it goes into messages */
						out[i] = p[2 + i] >= 0x20 && p[2 + i] < 0x7f ? (char)p[2 + i] : '?';
					out[k] = '\0';
					return k > 0;
				}
			}
		}
		pos += 8 + (((uint64_t)n + 7) & ~7ull);
	}
	return false;
}

/* Checks that a table of len bytes at off is cluster aligned, inside the
 * addressable range and does not start inside cluster 0. */
static int check_table(const char *what, unsigned field_off, uint64_t off, uint64_t len,
		       uint64_t cluster_size, uint64_t file_size, bool like_qemu, char *err, size_t errlen)
{
	if (off % cluster_size) {
		qcow_set_error(err, errlen, "%s 0x%" PRIx64 " (header offset %u) is not aligned to the cluster size %" PRIu64,
			       what, off, field_off, cluster_size);
		return -EINVAL;
	}
	if (off == 0 && !like_qemu) {
		qcow_set_error(err, errlen, "%s (header offset %u) is 0: it would overlap the image header", what, field_off);
		return -EINVAL;
	}
	uint64_t limit = like_qemu ? (uint64_t)INT64_MAX : QCOW_MAX_HOST_OFFSET;
	if (off >= limit || len > limit - off) {
		qcow_set_error(err, errlen, "%s 0x%" PRIx64 " (header offset %u) with length %" PRIu64 " is out of range",
			       what, off, field_off, len);
		return -EINVAL;
	}
	/* QEMU files may end inside the last cluster of a table, but a table
	 * that starts at or after the end of the file is missing. */
	if (len && off >= file_size && !like_qemu) {
		qcow_set_error(err, errlen, "%s 0x%" PRIx64 " (header offset %u) lies past the end of the file (%" PRIu64 " bytes)",
			       what, off, field_off, file_size);
		return -EINVAL;
	}
	return 0;
}

static int header_read(struct qcow_io *io, struct qcow_header *h, bool info_only, bool like_qemu, char *err, size_t errlen);

int qcow_header_read(struct qcow_io *io, struct qcow_header *h, char *err, size_t errlen)
{
	return header_read(io, h, false, false, err, errlen);
}

int qcow_header_read_check(struct qcow_io *io, struct qcow_header *h, char *err, size_t errlen)
{
	return header_read(io, h, false, true, err, errlen);
}

int qcow_header_read_info(struct qcow_io *io, struct qcow_header *h, char *err, size_t errlen)
{
	return header_read(io, h, true, false, err, errlen);
}

static int header_read(struct qcow_io *io, struct qcow_header *h, bool info_only, bool like_qemu, char *err, size_t errlen)
{
	int ret;
	uint8_t first[QCOW_V3_NEW_HEADER_LEN];

	memset(h, 0, sizeof(*h));
	int64_t fsz = io->ops->size(io);
	if (fsz < 0) {
		qcow_set_error(err, errlen, "cannot get the size of the image: %s", strerror((int)-fsz));
		return (int)fsz;
	}
	h->file_size = (uint64_t)fsz;
	if (h->file_size < QCOW_V2_HEADER_LEN) {
		qcow_set_error(err, errlen, "file is too short to be a qcow2 image (%" PRIu64 " bytes, the header needs %u)",
			       h->file_size, QCOW_V2_HEADER_LEN);
		return -EINVAL;
	}
	ret = io->ops->pread(io, first, sizeof(first), 0);
	if (ret < 0) {
		qcow_set_error(err, errlen, "cannot read the header: %s", strerror(-ret));
		return ret;
	}
	uint32_t magic = qcow_get_be32(first + QH_MAGIC);
	if (magic != QCOW_MAGIC) {
		qcow_set_error(err, errlen, "not a qcow2 image: magic at offset 0 is 0x%08x, expected 0x%08x", magic, QCOW_MAGIC);
		return -EINVAL;
	}
	h->version = qcow_get_be32(first + QH_VERSION);
	if (h->version != 2 && h->version != 3) {
		qcow_set_error(err, errlen, "unsupported qcow2 version %u (header offset 4); versions 2 and 3 are supported", h->version);
		return -ENOTSUP;
	}
	h->cluster_bits = qcow_get_be32(first + QH_CLUSTER_BITS);
	if (h->cluster_bits < QCOW_MIN_CLUSTER_BITS || h->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
		qcow_set_error(err, errlen, "unsupported cluster_bits %u (header offset 20): must be %u..%u (512 B..2 MiB)",
			       h->cluster_bits, QCOW_MIN_CLUSTER_BITS, QCOW_MAX_CLUSTER_BITS);
		return -EINVAL;
	}
	uint64_t cs = 1ull << h->cluster_bits;
	h->raw_len = cs;
	h->raw = qcow_calloc(1, cs);
	if (!h->raw)
		return -ENOMEM;
	ret = io->ops->pread(io, h->raw, cs, 0);
	if (ret < 0)
		FAIL(-ret, "cannot read the header cluster: %s", strerror(-ret));
	const uint8_t *r = h->raw;
	h->backing_file_offset = qcow_get_be64(r + QH_BACKING_OFFSET);
	h->backing_file_size = qcow_get_be32(r + QH_BACKING_SIZE);
	h->size = qcow_get_be64(r + QH_SIZE);
	h->crypt_method = qcow_get_be32(r + QH_CRYPT);
	h->l1_size = qcow_get_be32(r + QH_L1_SIZE);
	h->l1_table_offset = qcow_get_be64(r + QH_L1_OFFSET);
	h->refcount_table_offset = qcow_get_be64(r + QH_REFTABLE_OFFSET);
	h->refcount_table_clusters = qcow_get_be32(r + QH_REFTABLE_CLUSTERS);
	h->nb_snapshots = qcow_get_be32(r + QH_NB_SNAPSHOTS);
	h->snapshots_offset = qcow_get_be64(r + QH_SNAPSHOTS_OFFSET);
	if (h->version == 2) {
		h->refcount_order = 4;
		h->header_length = QCOW_V2_HEADER_LEN;
	} else {
		h->incompatible_features = qcow_get_be64(r + QH_INCOMPAT);
		h->compatible_features = qcow_get_be64(r + QH_COMPAT);
		h->autoclear_features = qcow_get_be64(r + QH_AUTOCLEAR);
		h->refcount_order = qcow_get_be32(r + QH_REFCOUNT_ORDER);
		h->header_length = qcow_get_be32(r + QH_HEADER_LENGTH);
		if (h->header_length < QCOW_V3_MIN_HEADER_LEN)
			FAIL(EINVAL, "header_length %u (header offset 100) is too short: version 3 needs at least %u",
			     h->header_length, QCOW_V3_MIN_HEADER_LEN);
		if (h->header_length % 8 && !like_qemu)
			FAIL(EINVAL, "header_length %u (header offset 100) is not a multiple of 8", h->header_length);
		if (h->header_length > cs)
			FAIL(EINVAL, "header_length %u (header offset 100) exceeds the cluster size %" PRIu64, h->header_length, cs);
		if (h->header_length > QH_COMPRESSION_TYPE)
			h->compression_type = r[QH_COMPRESSION_TYPE];
	}
	if (h->refcount_order > 6)
		FAIL(EINVAL, "refcount_order %u (header offset 96) is too large: refcount widths go up to 64 bits (order 6)",
		     h->refcount_order);
	uint64_t unknown = h->incompatible_features & ~QCOW_INCOMPAT_SUPPORTED;
	if (info_only)
		unknown &= ~0x1full;   /* known to QEMU: report, do not refuse */
	if (unknown) {
		/* each bit by number, as the spec numbers them, with its name
		 * (ours, or the image's own feature name table) */
		char names[512] = "";
		unsigned count = 0;
		for (unsigned b = 0; b < 64; b++)
			if (unknown & (1ull << b)) {
				char one[96], tname[48];
				const char *n = incompat_name(b);
				if (!n && feature_table_name(h, cs, b, tname, sizeof(tname)))
					n = tname;
				snprintf(one, sizeof(one), "%sbit %u (%s)", names[0] ? ", " : "", b, n ? n : "unknown");
				strncat(names, one, sizeof(names) - strlen(names) - 1);
				count++;
			}
		FAIL(ENOTSUP, "unsupported incompatible feature%s %s (incompatible features 0x%" PRIx64 " at header offset 72)",
		     count == 1 ? "" : "s", names, unknown);
	}
	/* as QEMU: 32 subclusters of at least 512 bytes */
	if ((h->incompatible_features & QCOW_INCOMPAT_EXTL2) && h->cluster_bits < QCOW_EXTL2_MIN_CLUSTER_BITS)
		FAIL(EINVAL, "extended L2 entries (0x10 of the incompatible features at header offset 72) need a cluster "
		     "size of at least %u bytes, cluster_bits (header offset 20) is %u",
		     1u << QCOW_EXTL2_MIN_CLUSTER_BITS, h->cluster_bits);
	/* as QEMU: the incompatible bit announces exactly a non-zlib type */
	if (h->compression_type > QCOW_COMPRESSION_ZSTD && !info_only)
		FAIL(ENOTSUP, "unknown compression_type %u (header offset 104): 0 (zlib) and 1 (zstd) are defined",
		     h->compression_type);
	if (!info_only && h->compression_type != QCOW_COMPRESSION_ZLIB && !(h->incompatible_features & QCOW_INCOMPAT_COMPRESSION))
		FAIL(EINVAL, "compression_type %u (header offset 104) is not zlib, but the compression type bit "
		     "(0x8 of the incompatible features at header offset 72) is not set", h->compression_type);
	if (!info_only && h->compression_type == QCOW_COMPRESSION_ZLIB && (h->incompatible_features & QCOW_INCOMPAT_COMPRESSION))
		FAIL(EINVAL, "the compression type bit (0x8 of the incompatible features at header offset 72) is set, "
		     "but compression_type (header offset 104) is zlib");
	if (h->crypt_method != 0 && !info_only)
		FAIL(ENOTSUP, "encrypted images (%s) are not supported (crypt_method %u at header offset 32)",
		     h->crypt_method == 1 ? "AES" : h->crypt_method == 2 ? "LUKS" : "unknown method", h->crypt_method);

	/* backing file name: must lie in cluster 0 after the header */
	if (h->backing_file_offset) {
		if (h->backing_file_size > QCOW_MAX_BACKING_NAME)
			FAIL(EINVAL, "backing_file_size %u (header offset 16) is too long (at most %u)",
			     h->backing_file_size, QCOW_MAX_BACKING_NAME);
		/* (QEMU does not compare it with header_length: a name inside
		 * the header fields is the check's business, not the open's) */
		if ((h->backing_file_offset < h->header_length && !like_qemu) || h->backing_file_offset > cs ||
		    h->backing_file_offset + h->backing_file_size > cs)
			FAIL(EINVAL, "backing_file_offset 0x%" PRIx64 " (header offset 8) with size %u does not lie inside the header cluster",
			     h->backing_file_offset, h->backing_file_size);
		memcpy(h->backing_file, r + h->backing_file_offset, h->backing_file_size);
		h->backing_file[h->backing_file_size] = 0;
	}

	/* header extensions: 8-byte aligned records up to a type-0 terminator */
	uint64_t ext_end = h->backing_file_offset ? h->backing_file_offset : cs;
	uint64_t pos = h->header_length;
	while (like_qemu ? pos < ext_end : pos + 8 <= ext_end) {
		/* QEMU checks the unpadded length before it looks at the type */
		if (like_qemu && (pos + 8 > ext_end || qcow_get_be32(r + pos + 4) > ext_end - pos - 8))
			FAIL(EINVAL, "header extension at offset %" PRIu64 " runs past the end of the extension area (%" PRIu64 ")",
			     pos, ext_end);
		uint32_t type = qcow_get_be32(r + pos);
		uint32_t len = qcow_get_be32(r + pos + 4);
		if (type == QCOW_EXT_END)
			break;
		uint64_t padded = ((uint64_t)len + 7) & ~7ull;
		if (pos + 8 + padded > ext_end && !like_qemu)
			FAIL(EINVAL, "header extension 0x%08x at offset %" PRIu64 " with length %u runs past the end of the extension area (%" PRIu64 ")",
			     type, pos, len, ext_end);
		if (type == QCOW_EXT_BACKING_FORMAT) {
			/* the backing file's format name; qcow_chain.c judges it */
			if (len == 0 || len >= sizeof(h->backing_format))
				FAIL(EINVAL, "backing format extension at offset %" PRIu64 " has length %u (1..%zu)",
				     pos, len, sizeof(h->backing_format) - 1);
			memcpy(h->backing_format, r + pos + 8, len);
			h->backing_format[len] = 0;
		}
		if (type == QCOW_EXT_DATA_FILE) {
			/* the name, not NUL-terminated (qcow_datafile.c opens it) */
			if (len == 0 || len >= sizeof(h->data_file) || memchr(r + pos + 8, 0, len))
				FAIL(EINVAL, "external data file name (header extension at offset %" PRIu64 ") has length %u "
				     "or a NUL byte: it must be 1..%zu bytes", pos, len, sizeof(h->data_file) - 1);
			memcpy(h->data_file, r + pos + 8, len);
			h->data_file[len] = 0;
			h->data_file_ext = pos;
		}
		if (type == QCOW_EXT_CRYPTO && !info_only)
			FAIL(ENOTSUP, "encryption header extension at offset %" PRIu64 " is not supported", pos);
		pos += 8 + padded;
	}

	/* as QEMU: data_file_raw only means something with a data file */
	if (!info_only && (h->autoclear_features & QCOW_AUTOCLEAR_DATA_FILE_RAW) &&
	    !(h->incompatible_features & QCOW_INCOMPAT_DATA_FILE))
		FAIL(EINVAL, "data_file_raw (0x2 of the autoclear features at header offset 88) is set, but the image has "
		     "no external data file (0x4 of the incompatible features at header offset 72): data-file-raw requires a data file");

	/* QEMU reads a size-0 name as no backing file at all */
	if (h->backing_file_offset && h->backing_file_size == 0 && !info_only)
		FAIL(EINVAL, "backing_file_offset 0x%" PRIx64 " is set but backing_file_size (header offset 16) is 0",
		     h->backing_file_offset);

	/* tables */
	if ((uint64_t)h->l1_size * 8 > QCOW_MAX_L1_BYTES)
		FAIL(EFBIG, "l1_size %u (header offset 36) is too large: the L1 table may be at most %u bytes",
		     h->l1_size, QCOW_MAX_L1_BYTES);
	uint64_t l2_entries = cs >> qcow_header_l2_entry_shift(h);
	uint64_t per_l1 = l2_entries * cs;   /* guest bytes one L1 entry maps */
	uint64_t needed = h->size / per_l1 + (h->size % per_l1 != 0);
	if (h->size > (1ull << 62))
		FAIL(EFBIG, "virtual size %" PRIu64 " (header offset 24) is too large", h->size);
	if (needed > h->l1_size)
		FAIL(EINVAL, "l1_size %u (header offset 36) is too small for the virtual size %" PRIu64 " (needs %" PRIu64 " entries)",
		     h->l1_size, h->size, needed);
	if (h->l1_size) {
		ret = check_table("l1_table_offset", QH_L1_OFFSET, h->l1_table_offset, (uint64_t)h->l1_size * 8, cs,
				  h->file_size, like_qemu, err, errlen);
		if (ret)
			goto out;
	}
	if (h->refcount_table_clusters == 0 && !like_qemu)
		FAIL(EINVAL, "refcount_table_clusters (header offset 56) is 0: the image has no refcount table");
	if ((uint64_t)h->refcount_table_clusters * cs > QCOW_MAX_REFTABLE_BYTES)
		FAIL(EFBIG, "refcount_table_clusters %u (header offset 56) is too large: the table may be at most %u bytes",
		     h->refcount_table_clusters, QCOW_MAX_REFTABLE_BYTES);
	ret = !h->refcount_table_clusters ? 0 : check_table("refcount_table_offset", QH_REFTABLE_OFFSET, h->refcount_table_offset,
			  (uint64_t)h->refcount_table_clusters * cs, cs, h->file_size, like_qemu, err, errlen);
	if (ret)
		goto out;
	if (h->nb_snapshots > QCOW_MAX_SNAPSHOTS)
		FAIL(EINVAL, "nb_snapshots %u (header offset 60) is too large (at most %u)", h->nb_snapshots, QCOW_MAX_SNAPSHOTS);
	if (h->nb_snapshots) {
		ret = check_table("snapshots_offset", QH_SNAPSHOTS_OFFSET, h->snapshots_offset, 1, cs, h->file_size, like_qemu, err, errlen);
		if (ret)
			goto out;
	}
	/* L1 and refcount table must not overlap each other */
	uint64_t l1_lo = h->l1_table_offset, l1_hi = l1_lo + (uint64_t)h->l1_size * 8;
	uint64_t rt_lo = h->refcount_table_offset, rt_hi = rt_lo + (uint64_t)h->refcount_table_clusters * cs;
	if (h->l1_size && l1_lo < rt_hi && rt_lo < l1_hi && !like_qemu)
		FAIL(EINVAL, "L1 table 0x%" PRIx64 "..0x%" PRIx64 " overlaps the refcount table 0x%" PRIx64 "..0x%" PRIx64,
		     l1_lo, l1_hi, rt_lo, rt_hi);
	return 0;
out:
	qcow_header_free(h);
	return ret;
}

void qcow_header_free(struct qcow_header *h)
{
	qcow_free(h->raw);
	h->raw = NULL;
}

void qcow_header_encode(struct qcow_header *h)
{
	uint8_t *r = h->raw;
	qcow_put_be64(r + QH_SIZE, h->size);
	qcow_put_be32(r + QH_L1_SIZE, h->l1_size);
	qcow_put_be64(r + QH_L1_OFFSET, h->l1_table_offset);
	qcow_put_be64(r + QH_REFTABLE_OFFSET, h->refcount_table_offset);
	qcow_put_be32(r + QH_REFTABLE_CLUSTERS, h->refcount_table_clusters);
	if (h->version >= 3) {
		qcow_put_be64(r + QH_INCOMPAT, h->incompatible_features);
		qcow_put_be64(r + QH_COMPAT, h->compatible_features);
		qcow_put_be64(r + QH_AUTOCLEAR, h->autoclear_features);
	}
}

int qcow_header_write_fields(struct qcow_io *io, struct qcow_header *h, unsigned off, unsigned len)
{
	qcow_header_encode(h);
	return io->ops->pwrite(io, h->raw + off, len, off);
}
