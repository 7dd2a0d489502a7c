/*
 * test_header.c - qcow_header_read on headers built in memory.
 *
 * A small builder writes version 2 (72-byte) and version 3 (104/112-byte,
 * with extensions) headers plus a plausible layout (refcount table, a
 * refcount block, the L1 table) into a byte buffer that the memory backend
 * serves.  Covers: valid images for cluster_bits 9, 16, 21 and every
 * refcount order; every hostile field the parser must refuse, each with a
 * negative errno and a message naming the field, with the file left
 * byte-for-byte unchanged; flags the parser must accept (dirty, corrupt);
 * qcow_header_read_info reporting unimplemented features (backing file,
 * extended L2, zstd, encryption, data file) instead of refusing them while
 * still refusing broken structure; and qcow_header_write_fields patching
 * only the bytes asked for, so unknown extensions and additional fields
 * survive.
 */
#include "qcow_internal.h"
#include "tap.h"

#include <errno.h>
#include <string.h>

/* ---- the builder ---------------------------------------------------------- */

struct ext {
	uint32_t type;
	uint32_t len;
	uint8_t fill;
};

struct hb {
	uint32_t magic, version, cluster_bits, crypt, l1_size, rt_clusters, nb_snapshots, refcount_order, header_length;
	uint64_t size, l1_off, rt_off, snap_off, incompat, compat, autoclear;
	uint8_t compression_type;
	uint64_t backing_off;
	uint32_t backing_size;
	const char *backing;
	struct ext ext[4];
	unsigned next;
	size_t file_len;
	bool raw_header_length;   /* write header_length even for v2 fields */
};

/* A valid layout: header, refcount table (1 cluster), one refcount block,
 * L1 table sized for `size`. */
static struct hb hb_default(unsigned version, unsigned cluster_bits, unsigned order, uint64_t size)
{
	struct hb b;
	memset(&b, 0, sizeof(b));
	uint64_t cs = 1ull << cluster_bits;
	uint64_t per_l1 = (cs / 8) * cs;
	b.magic = QCOW_MAGIC;
	b.version = version;
	b.cluster_bits = cluster_bits;
	b.size = size;
	b.l1_size = (uint32_t)(size / per_l1 + (size % per_l1 != 0));
	b.rt_off = cs;
	b.rt_clusters = 1;
	b.l1_off = 3 * cs;
	uint64_t l1_clusters = ((uint64_t)b.l1_size * 8 + cs - 1) / cs;
	b.file_len = (size_t)((3 + (l1_clusters ? l1_clusters : 1)) * cs);
	b.refcount_order = version == 2 ? 4 : order;
	b.header_length = version == 2 ? 72 : 112;
	return b;
}

static uint8_t *hb_build(const struct hb *b, size_t *len)
{
	uint64_t cs = 1ull << (b->cluster_bits >= 9 && b->cluster_bits <= 21 ? b->cluster_bits : 16);
	size_t n = b->file_len;
	size_t alloc = n > cs ? n : (size_t)cs;
	uint8_t *f = calloc(1, alloc + 8);
	qcow_put_be32(f + QH_MAGIC, b->magic);
	qcow_put_be32(f + QH_VERSION, b->version);
	qcow_put_be64(f + QH_BACKING_OFFSET, b->backing_off);
	qcow_put_be32(f + QH_BACKING_SIZE, b->backing_size);
	qcow_put_be32(f + QH_CLUSTER_BITS, b->cluster_bits);
	qcow_put_be64(f + QH_SIZE, b->size);
	qcow_put_be32(f + QH_CRYPT, b->crypt);
	qcow_put_be32(f + QH_L1_SIZE, b->l1_size);
	qcow_put_be64(f + QH_L1_OFFSET, b->l1_off);
	qcow_put_be64(f + QH_REFTABLE_OFFSET, b->rt_off);
	qcow_put_be32(f + QH_REFTABLE_CLUSTERS, b->rt_clusters);
	qcow_put_be32(f + QH_NB_SNAPSHOTS, b->nb_snapshots);
	qcow_put_be64(f + QH_SNAPSHOTS_OFFSET, b->snap_off);
	size_t pos = 72;
	if (b->version != 2) {
		qcow_put_be64(f + QH_INCOMPAT, b->incompat);
		qcow_put_be64(f + QH_COMPAT, b->compat);
		qcow_put_be64(f + QH_AUTOCLEAR, b->autoclear);
		qcow_put_be32(f + QH_REFCOUNT_ORDER, b->refcount_order);
		qcow_put_be32(f + QH_HEADER_LENGTH, b->header_length);
		if (b->header_length > QH_COMPRESSION_TYPE)
			f[QH_COMPRESSION_TYPE] = b->compression_type;
		pos = b->header_length;
	}
	/* extensions, then the end marker (zeros, already there) */
	for (unsigned i = 0; i < 4 && b->ext[i].type; i++) {
		if (pos + 8 > cs)
			break;
		qcow_put_be32(f + pos, b->ext[i].type);
		qcow_put_be32(f + pos + 4, b->ext[i].len);
		uint64_t padded = ((uint64_t)b->ext[i].len + 7) & ~7ull;
		for (uint64_t k = 0; k < padded && pos + 8 + k < cs; k++)
			f[pos + 8 + k] = k < b->ext[i].len ? b->ext[i].fill : 0;
		pos += 8 + (size_t)padded;
	}
	if (b->backing && b->backing_off + strlen(b->backing) <= cs)
		memcpy(f + b->backing_off, b->backing, strlen(b->backing));
	/* refcount table -> refcount block at 2 cs, if inside the file */
	if (2 * cs + 8 <= n && b->rt_off == cs)
		qcow_put_be64(f + cs, 2 * cs);
	*len = n;
	return f;
}

/* ---- helpers --------------------------------------------------------------- */

static char err[1024];
static bool info_mode;   /* parse with qcow_header_read_info */

/* Parses b; returns the result, with the header in *h (freed by caller on success). */
static int parse(const struct hb *b, struct qcow_header *h, struct qcow_io **io_out)
{
	size_t len;
	uint8_t *f = hb_build(b, &len);
	struct qcow_io *io = qcow_io_mem_new(f, len);
	REQUIRE(io != NULL, "memory backend");
	err[0] = 0;
	int ret = info_mode ? qcow_header_read_info(io, h, err, sizeof(err)) : qcow_header_read(io, h, err, sizeof(err));
	/* the parser never writes */
	size_t len2;
	const uint8_t *d = qcow_io_mem_data(io, &len2);
	CHECK(len2 == len && (len == 0 || memcmp(d, f, len) == 0), "file unchanged by parsing (ret %d)", ret);
	free(f);
	if (io_out)
		*io_out = io;
	else
		qcow_io_close(io);
	return ret;
}

static void expect_ok(const struct hb *b, const char *what)
{
	struct qcow_header h;
	int ret = parse(b, &h, NULL);
	CHECK(ret == 0, "%s: parse failed with %d: %s", what, ret, err);
	if (ret == 0)
		qcow_header_free(&h);
}

static void expect_fail(const struct hb *b, const char *what, const char *keyword, int want_errno)
{
	struct qcow_header h;
	int ret = parse(b, &h, NULL);
	CHECK(ret < 0, "%s: accepted (expected a failure naming '%s')", what, keyword);
	if (ret == 0) {
		qcow_header_free(&h);
		return;
	}
	if (want_errno)
		CHECK(ret == -want_errno, "%s: errno %d, expected %d (%s)", what, -ret, want_errno, err);
	CHECK(err[0] && strstr(err, keyword) != NULL, "%s: message lacks '%s': \"%s\"", what, keyword, err);
	CHECK(h.raw == NULL, "%s: raw copy freed on failure", what);
}

/* ---- valid images ------------------------------------------------------------ */

static void valid(void)
{
	static const unsigned bits[] = { 9, 16, 21 };
	for (int v = 2; v <= 3; v++)
		for (size_t i = 0; i < 3; i++)
			for (unsigned order = 0; order <= 6; order++) {
				if (v == 2 && order != 4)
					continue;
				unsigned cb = bits[i];
				uint64_t size = (1ull << 30) + 12345;   /* not a cluster multiple */
				if (cb == 9)
					size = 100ull << 20;
				struct hb b = hb_default((unsigned)v, cb, order, size);
				if (v == 3) {
					b.ext[0] = (struct ext){ QCOW_EXT_FEATURE_TABLE, 48, 0x11 };
					b.ext[1] = (struct ext){ 0x12345678, 13, 0xee };   /* unknown: ignored */
					b.compat = 1;
					b.autoclear = 1;
				} else {
					b.ext[0] = (struct ext){ QCOW_EXT_BACKING_FORMAT, 3, 'r' };
				}
				struct qcow_header h;
				struct qcow_io *io;
				size_t len;
				uint8_t *f = hb_build(&b, &len);
				free(f);
				int ret = parse(&b, &h, &io);
				CHECK(ret == 0, "v%d cluster_bits %u order %u: %d %s", v, cb, order, ret, err);
				if (ret == 0) {
					uint64_t cs = 1ull << cb;
					CHECK(h.version == (uint32_t)v && h.cluster_bits == cb && h.size == size &&
					      h.refcount_order == (v == 2 ? 4 : order), "v%d/%u/%u: decoded fields", v, cb, order);
					CHECK(h.l1_size == b.l1_size && h.l1_table_offset == 3 * cs && h.refcount_table_offset == cs &&
					      h.refcount_table_clusters == 1, "v%d/%u/%u: table fields", v, cb, order);
					CHECK(h.header_length == (v == 2 ? 72u : 112u), "v%d: header_length %u", v, h.header_length);
					CHECK(h.file_size == len && h.raw && h.raw_len == cs, "v%d/%u: raw copy of cluster 0", v, cb);
					size_t dl;
					const uint8_t *d = qcow_io_mem_data(io, &dl);
					CHECK(h.raw && memcmp(h.raw, d, (size_t)cs) == 0, "v%d/%u: raw equals cluster 0", v, cb);
					CHECK(h.backing_file[0] == 0 && h.nb_snapshots == 0 && h.compression_type == 0,
					      "v%d: no backing, snapshots, compression", v);
					if (v == 3)
						CHECK(h.compatible_features == 1 && h.autoclear_features == 1 && h.incompatible_features == 0,
						      "v3 feature fields");
					qcow_header_free(&h);
					CHECK(h.raw == NULL, "free clears raw");
				}
				qcow_io_close(io);
			}

	/* v3 with the minimum header_length 104: byte 104 starts the
	 * extension area and is not a compression type */
	struct hb b = hb_default(3, 16, 4, 1 << 20);
	b.header_length = 104;
	b.ext[0] = (struct ext){ 0x01020304, 8, 0x5a };
	expect_ok(&b, "header_length 104 with an extension whose first byte is 1");
	/* a longer header with unknown additional fields (zero) */
	b = hb_default(3, 16, 4, 1 << 20);
	b.header_length = 160;
	expect_ok(&b, "header_length 160");
	/* size 0 needs no L1 entries; an l1_size of 0 then needs no table */
	b = hb_default(3, 16, 4, 0);
	CHECK(b.l1_size == 0, "builder: size 0 has l1_size 0");
	expect_ok(&b, "size 0, l1_size 0");
	b.l1_off = 0;
	expect_ok(&b, "size 0, l1_size 0, L1 offset 0");
	/* the L1 table larger than needed */
	b = hb_default(3, 16, 4, 1 << 20);
	b.l1_size = 100;
	expect_ok(&b, "l1_size larger than needed");
	/* dirty and corrupt are for the caller to judge, the parser accepts them */
	b = hb_default(3, 16, 4, 1 << 20);
	b.incompat = QCOW_INCOMPAT_DIRTY | QCOW_INCOMPAT_CORRUPT;
	{
		struct qcow_header h;
		int ret = parse(&b, &h, NULL);
		CHECK(ret == 0 && h.incompatible_features == 3, "dirty+corrupt accepted by the parser (%d %s)", ret, err);
		if (ret == 0)
			qcow_header_free(&h);
	}
	/* L1 table reaching past the end of the file (starts inside it) */
	b = hb_default(3, 9, 4, 10 << 20);   /* 320 entries: 5 clusters */
	b.file_len = (size_t)(3 * 512 + 512);
	expect_ok(&b, "L1 table ending past EOF but starting inside");
	/* refcount table at the largest allowed size */
	b = hb_default(3, 16, 4, 1 << 20);
	b.rt_clusters = QCOW_MAX_REFTABLE_BYTES >> 16;
	b.rt_off = 4ull << 16;
	b.file_len = (size_t)(4 + b.rt_clusters) << 16;
	expect_ok(&b, "refcount table of exactly 8 MiB");
	/* L1 adjacent to (not overlapping) the refcount table */
	b = hb_default(3, 16, 4, 1 << 20);
	b.rt_off = 3ull << 16;
	b.l1_off = 4ull << 16;
	b.file_len = 5u << 16;
	expect_ok(&b, "L1 right after the refcount table");
	/* snapshots with a valid table offset */
	b = hb_default(3, 16, 4, 1 << 20);
	b.nb_snapshots = 1;
	b.snap_off = 2ull << 16;
	expect_ok(&b, "one snapshot with an aligned table in the file");
	b.nb_snapshots = 65536;
	expect_ok(&b, "65536 snapshots (the limit)");
}

/* ---- hostile images ---------------------------------------------------------- */

static void hostile(void)
{
	struct hb base = hb_default(3, 16, 4, 1ull << 30);
	base.ext[0] = (struct ext){ QCOW_EXT_FEATURE_TABLE, 48, 0x11 };
	uint64_t cs = 1ull << 16;
	struct hb b;

	b = base; b.magic = 0x514649fa;
	expect_fail(&b, "bad magic", "magic", EINVAL);
	b = base; b.version = 1;
	expect_fail(&b, "version 1", "version", 0);
	b = base; b.version = 4;
	expect_fail(&b, "version 4", "version", 0);
	b = base; b.version = 0;
	expect_fail(&b, "version 0", "version", 0);
	b = base; b.cluster_bits = 8;
	expect_fail(&b, "cluster_bits 8", "cluster_bits", EINVAL);
	b = base; b.cluster_bits = 22;
	expect_fail(&b, "cluster_bits 22", "cluster_bits", EINVAL);
	b = base; b.cluster_bits = 0xffffffffu;
	expect_fail(&b, "cluster_bits 2^32-1", "cluster_bits", EINVAL);
	b = base; b.header_length = 96;
	expect_fail(&b, "header_length 96", "header_length", EINVAL);
	b = base; b.header_length = 100;
	expect_fail(&b, "header_length 100", "header_length", EINVAL);
	b = base; b.header_length = 108;
	expect_fail(&b, "header_length 108 (not a multiple of 8)", "header_length", EINVAL);
	b = base; b.header_length = 113;
	expect_fail(&b, "header_length 113", "header_length", EINVAL);
	b = hb_default(3, 9, 4, 1 << 20); b.header_length = 520;
	expect_fail(&b, "header_length 520 > 512-byte cluster", "header_length", EINVAL);
	b = base; b.header_length = (uint32_t)cs + 8;
	expect_fail(&b, "header_length > cluster size", "header_length", EINVAL);
	b = base; b.refcount_order = 7;
	expect_fail(&b, "refcount_order 7", "refcount_order", EINVAL);
	b = base; b.refcount_order = 0xffffffffu;
	expect_fail(&b, "refcount_order 2^32-1", "refcount_order", EINVAL);
	b = base; b.incompat = 1ull << 5;
	expect_fail(&b, "incompatible bit 5", "incompatible", ENOTSUP);
	b = base; b.incompat = 1ull << 63;
	expect_fail(&b, "incompatible bit 63", "incompatible", ENOTSUP);
	b = base; b.incompat = QCOW_INCOMPAT_DIRTY | (1ull << 40);
	expect_fail(&b, "dirty plus bit 40", "incompatible", ENOTSUP);
	/* the data file bit parses (the open looks for the file, qcow_datafile.c) */
	b = base; b.incompat = QCOW_INCOMPAT_DATA_FILE;
	expect_ok(&b, "external data file bit");
	b = base; b.autoclear = QCOW_AUTOCLEAR_DATA_FILE_RAW;
	expect_fail(&b, "data_file_raw without the data file bit", "data-file-raw requires a data file", EINVAL);
	b = base; b.incompat = QCOW_INCOMPAT_DATA_FILE; b.autoclear = QCOW_AUTOCLEAR_DATA_FILE_RAW;
	expect_ok(&b, "data_file_raw with the data file bit");
	/* extended L2 entries: 16-byte L2 entries, so an L1 entry maps half
	 * as much; 16 KiB clusters at least, as QEMU */
	b = base; b.incompat = QCOW_INCOMPAT_EXTL2; b.l1_size = 4;
	expect_ok(&b, "extended L2 bit");
	b = base; b.incompat = QCOW_INCOMPAT_EXTL2;
	expect_fail(&b, "extended L2 with an L1 table sized for 8-byte entries", "l1_size", EINVAL);
	b = hb_default(3, 13, 4, 1ull << 30); b.incompat = QCOW_INCOMPAT_EXTL2; b.l1_size *= 2;
	expect_fail(&b, "extended L2 with 8 KiB clusters", "extended L2", EINVAL);
	/* zstd (type 1) goes with the compression type bit, as QEMU wants */
	b = base; b.incompat = QCOW_INCOMPAT_COMPRESSION; b.compression_type = 1;
	expect_ok(&b, "compression bit with zstd");
	b = base; b.compression_type = 1;
	expect_fail(&b, "compression_type 1 without the bit", "compression type bit", EINVAL);
	b = base; b.incompat = QCOW_INCOMPAT_COMPRESSION;
	expect_fail(&b, "compression bit with zlib", "compression type bit", EINVAL);
	b = base; b.incompat = QCOW_INCOMPAT_COMPRESSION; b.compression_type = 2;
	expect_fail(&b, "compression_type 2", "unknown compression_type", ENOTSUP);
	b = base; b.crypt = 1;
	expect_fail(&b, "crypt_method 1", "crypt_method", ENOTSUP);
	b = base; b.crypt = 2;
	expect_fail(&b, "crypt_method 2", "crypt_method", ENOTSUP);
	b = hb_default(2, 16, 4, 1 << 20); b.crypt = 1;
	expect_fail(&b, "v2 crypt_method 1", "crypt_method", ENOTSUP);

	/* L1 */
	b = base; b.l1_size = QCOW_MAX_L1_BYTES / 8 + 1;
	expect_fail(&b, "l1_size above 32 MiB of entries", "l1_size", EFBIG);
	b = base; b.l1_size = 0xffffffffu;
	expect_fail(&b, "l1_size 2^32-1", "l1_size", EFBIG);
	b = base; b.l1_size -= 1;
	expect_fail(&b, "l1_size one too small", "l1_size", EINVAL);
	b = base; b.l1_size = 0;
	expect_fail(&b, "l1_size 0 for a non-empty disk", "l1_size", EINVAL);
	b = base; b.size = 1ull << 62; b.l1_size = 0xffff;
	expect_fail(&b, "virtual size 2^62 with a small L1", "l1_size", 0);
	b = base; b.size = (1ull << 62) + 1; b.l1_size = QCOW_MAX_L1_BYTES / 8;
	expect_fail(&b, "virtual size above 2^62", "virtual size", EFBIG);
	b = base; b.l1_off = 0;
	expect_fail(&b, "L1 offset 0", "l1_table_offset", EINVAL);
	b = base; b.l1_off = 3 * cs + 8;
	expect_fail(&b, "L1 offset unaligned", "l1_table_offset", EINVAL);
	b = base; b.l1_off = 3 * cs + 512;
	expect_fail(&b, "L1 offset 512-aligned only", "l1_table_offset", EINVAL);
	b = base; b.l1_off = (uint64_t)b.file_len;
	expect_fail(&b, "L1 offset at EOF", "l1_table_offset", EINVAL);
	b = base; b.l1_off = 1000 * cs;
	expect_fail(&b, "L1 offset past EOF", "l1_table_offset", EINVAL);
	b = base; b.l1_off = 1ull << 56;
	expect_fail(&b, "L1 offset 2^56", "l1_table_offset", EINVAL);
	b = base; b.l1_off = UINT64_MAX & ~(cs - 1);
	expect_fail(&b, "L1 offset near 2^64", "l1_table_offset", EINVAL);

	/* refcount table */
	b = base; b.rt_off = 0;
	expect_fail(&b, "refcount table offset 0", "refcount_table_offset", EINVAL);
	b = base; b.rt_off = cs + 512;
	expect_fail(&b, "refcount table offset unaligned", "refcount_table_offset", EINVAL);
	b = base; b.rt_off = 64 * cs;
	expect_fail(&b, "refcount table past EOF", "refcount_table_offset", EINVAL);
	b = base; b.rt_clusters = 0;
	expect_fail(&b, "refcount_table_clusters 0", "refcount_table_clusters", EINVAL);
	b = base; b.rt_clusters = (QCOW_MAX_REFTABLE_BYTES >> 16) + 1;
	expect_fail(&b, "refcount table above 8 MiB", "refcount_table_clusters", EFBIG);
	b = base; b.rt_clusters = 0xffffffffu;
	expect_fail(&b, "refcount_table_clusters 2^32-1", "refcount_table_clusters", EFBIG);
	b = hb_default(3, 21, 4, 1 << 30); b.rt_clusters = 5;   /* 10 MiB */
	expect_fail(&b, "refcount table of 5 2-MiB clusters", "refcount_table_clusters", EFBIG);

	/* overlap */
	b = base; b.l1_off = b.rt_off;
	expect_fail(&b, "L1 at the refcount table", "overlap", EINVAL);
	b = base; b.rt_clusters = 3;   /* covers 1..3 cs, L1 at 3 cs */
	expect_fail(&b, "refcount table running into the L1", "overlap", EINVAL);
	b = base; b.l1_off = 1 * cs; b.rt_off = 2 * cs; b.l1_size = 9000;   /* 72000 bytes: into cluster 2 */
	expect_fail(&b, "L1 running into the refcount table", "overlap", EINVAL);

	/* snapshots */
	b = base; b.nb_snapshots = 65537; b.snap_off = 2 * cs;
	expect_fail(&b, "nb_snapshots 65537", "nb_snapshots", EINVAL);
	b = base; b.nb_snapshots = 0xffffffffu; b.snap_off = 2 * cs;
	expect_fail(&b, "nb_snapshots 2^32-1", "nb_snapshots", EINVAL);
	b = base; b.nb_snapshots = 1; b.snap_off = 0;
	expect_fail(&b, "snapshot table offset 0", "snapshots_offset", EINVAL);
	b = base; b.nb_snapshots = 1; b.snap_off = 2 * cs + 8;
	expect_fail(&b, "snapshot table offset unaligned", "snapshots_offset", EINVAL);
	b = base; b.nb_snapshots = 1; b.snap_off = 100 * cs;
	expect_fail(&b, "snapshot table past EOF", "snapshots_offset", EINVAL);

	/* extensions */
	b = base; b.ext[1] = (struct ext){ 0x77777777, (uint32_t)cs, 0x1 };
	expect_fail(&b, "extension running past the cluster", "extension", EINVAL);
	b = base; b.ext[0] = (struct ext){ 0x77777777, 0xfffffff0u, 0x1 };
	expect_fail(&b, "extension with a 4 GiB length", "extension", EINVAL);
	b = hb_default(3, 9, 4, 1 << 20); b.ext[0] = (struct ext){ 0x77777777, 512 - 112 - 8 + 1, 0x1 };
	expect_fail(&b, "extension one byte past a 512-byte cluster", "extension", EINVAL);
	b = hb_default(3, 9, 4, 1 << 20); b.ext[0] = (struct ext){ 0x77777777, 512 - 112 - 8, 0x1 };
	expect_ok(&b, "extension filling a 512-byte cluster exactly");
	/* the data file name extension: read wherever it lies */
	{
		struct qcow_header h;
		b = base; b.ext[1] = (struct ext){ QCOW_EXT_DATA_FILE, 16, 'x' };
		CHECK(parse(&b, &h, NULL) == 0 && strcmp(h.data_file, "xxxxxxxxxxxxxxxx") == 0 && h.data_file_ext,
		      "data file extension: name read (%s)", err);
		qcow_header_free(&h);
		b = base; b.ext[0] = (struct ext){ 0x77777777, 13, 0x1 }; b.ext[1] = (struct ext){ QCOW_EXT_DATA_FILE, 3, 'x' };
		CHECK(parse(&b, &h, NULL) == 0 && strcmp(h.data_file, "xxx") == 0,
		      "data file extension after a padded 13-byte one: name read (%s)", err);
		qcow_header_free(&h);
		b = base; b.ext[0] = (struct ext){ 0x77777777, 0, 0x1 }; b.ext[1] = (struct ext){ QCOW_EXT_DATA_FILE, 1, 'x' };
		CHECK(parse(&b, &h, NULL) == 0 && strcmp(h.data_file, "x") == 0,
		      "data file extension after an empty one: name read (%s)", err);
		qcow_header_free(&h);
	}
	b = base; b.ext[1] = (struct ext){ QCOW_EXT_DATA_FILE, 0, 'x' };
	expect_fail(&b, "empty data file name", "external data file name", EINVAL);
	b = base; b.ext[1] = (struct ext){ QCOW_EXT_DATA_FILE, 4, 0 };
	expect_fail(&b, "data file name of NUL bytes", "external data file name", EINVAL);
	b = base; b.ext[1] = (struct ext){ QCOW_EXT_CRYPTO, 16, 'x' };
	expect_fail(&b, "crypto extension", "encryption", ENOTSUP);
	b = hb_default(2, 16, 4, 1 << 20); b.ext[0] = (struct ext){ 0x77777777, (uint32_t)cs - 72, 0x1 };
	expect_fail(&b, "v2 extension running past the cluster", "extension", EINVAL);

	/* backing files */
	b = base; b.backing = "base.qcow2"; b.backing_off = cs - 64; b.backing_size = 10;
	b.ext[1] = (struct ext){ QCOW_EXT_BACKING_FORMAT, 5, 'q' };
	{
		struct qcow_header h;
		int ret = parse(&b, &h, NULL);
		CHECK(ret == 0, "backing file: parsed (%d %s)", ret, err);
		if (ret == 0) {
			CHECK(strcmp(h.backing_file, "base.qcow2") == 0 && strcmp(h.backing_format, "qqqqq") == 0,
			      "backing name \"%s\" and format \"%s\" decoded", h.backing_file, h.backing_format);
			qcow_header_free(&h);
		}
	}
	b = hb_default(2, 16, 4, 1 << 20); b.backing = "base.qcow2"; b.backing_off = 72; b.backing_size = 10;
	expect_ok(&b, "v2 backing file right after the header");
	/* loops (a name that leads back to the image) are the chain's
	 * business (qcow_chain.c, t275): a name alone does not say */
	b = base; b.backing = "memory"; b.backing_off = cs - 64; b.backing_size = 6;
	expect_ok(&b, "backing file named like the image");
	b = base; b.backing = "base.qcow2"; b.backing_off = cs - 64; b.backing_size = 10;
	b.ext[1] = (struct ext){ QCOW_EXT_BACKING_FORMAT, 40, 'q' };
	expect_fail(&b, "backing format name of 40 bytes", "backing format", EINVAL);
	b = base; b.backing_off = cs - 64; b.backing_size = 1024;
	expect_fail(&b, "backing_file_size 1024", "backing_file_size", EINVAL);
	b = base; b.backing_off = cs - 4; b.backing_size = 10; b.backing = NULL;
	expect_fail(&b, "backing name past the cluster", "backing_file_offset", EINVAL);
	b = base; b.backing_off = cs + 8; b.backing_size = 1;
	expect_fail(&b, "backing offset past the cluster", "backing_file_offset", EINVAL);
	b = base; b.backing_off = 40; b.backing_size = 4;   /* inside the header */
	expect_fail(&b, "backing name inside the header fields", "backing_file_offset", EINVAL);
	b = base; b.backing_off = cs - 64; b.backing_size = 0;
	expect_fail(&b, "backing offset with size 0", "backing_file_size", EINVAL);
	b = base; b.backing_off = UINT64_MAX - 3; b.backing_size = 8;
	expect_fail(&b, "backing offset near 2^64", "backing_file_offset", EINVAL);
	/* an extension area that runs into the backing name */
	b = base; b.backing = "base"; b.backing_off = 256; b.backing_size = 4;
	b.ext[0] = (struct ext){ 0x77777777, 256, 0x1 };
	expect_fail(&b, "extension running into the backing name", "extension", EINVAL);

	/* short files */
	b = base; b.file_len = 71;
	expect_fail(&b, "file of 71 bytes", "short", EINVAL);
	b = base; b.file_len = 0;
	expect_fail(&b, "empty file", "short", EINVAL);
	b = base; b.file_len = 1;
	expect_fail(&b, "file of 1 byte", "short", EINVAL);
	b = base; b.file_len = 72;   /* v3: header_length lies past EOF, reads 0 */
	expect_fail(&b, "v3 file cut after 72 bytes", "header_length", EINVAL);
	b = base; b.file_len = 112;   /* the whole header, no tables */
	expect_fail(&b, "v3 file that is just the header", "offset", EINVAL);
	b = hb_default(2, 16, 4, 1 << 20); b.file_len = 72;
	expect_fail(&b, "v2 file that is just the header", "offset", EINVAL);
}

/* ---- qcow_header_read_info ------------------------------------------------- */

/* The info variant reports features the engine does not implement instead
 * of refusing them, but validates the structure just as strictly. */
static void info(void)
{
	struct hb base = hb_default(3, 16, 4, 1ull << 30);
	base.ext[0] = (struct ext){ QCOW_EXT_FEATURE_TABLE, 48, 0x11 };
	uint64_t cs = 1ull << 16;
	struct hb b;
	struct qcow_header h;
	int ret;

	info_mode = true;
	expect_ok(&base, "info: a plain image");

	b = base; b.backing = "base.qcow2"; b.backing_off = cs - 64; b.backing_size = 10;
	ret = parse(&b, &h, NULL);
	CHECK(ret == 0, "info: backing file accepted (%d %s)", ret, err);
	if (ret == 0) {
		CHECK(strcmp(h.backing_file, "base.qcow2") == 0 && h.backing_file_size == 10 && h.backing_file_offset == cs - 64,
		      "info: backing file reported as \"%s\"", h.backing_file);
		qcow_header_free(&h);
	}
	b = base; b.backing = "memory"; b.backing_off = cs - 64; b.backing_size = 6;
	expect_ok(&b, "info: backing file named like the image");
	static const uint64_t bits[] = { QCOW_INCOMPAT_DATA_FILE, QCOW_INCOMPAT_COMPRESSION, QCOW_INCOMPAT_EXTL2,
					 QCOW_INCOMPAT_DIRTY | QCOW_INCOMPAT_CORRUPT | QCOW_INCOMPAT_EXTL2 };
	for (int i = 0; i < 4; i++) {
		b = base; b.incompat = bits[i]; b.l1_size = 4;   /* enough for 16-byte L2 entries too */
		ret = parse(&b, &h, NULL);
		CHECK(ret == 0, "info: incompatible bits 0x%llx accepted (%d %s)", (unsigned long long)bits[i], ret, err);
		if (ret == 0) {
			CHECK(h.incompatible_features == bits[i], "info: incompatible bits reported");
			qcow_header_free(&h);
		}
	}
	b = base; b.incompat = QCOW_INCOMPAT_COMPRESSION; b.compression_type = 1;
	ret = parse(&b, &h, NULL);
	CHECK(ret == 0, "info: zstd accepted (%d %s)", ret, err);
	if (ret == 0) {
		CHECK(h.compression_type == 1, "info: compression_type reported");
		qcow_header_free(&h);
	}
	for (uint32_t c = 1; c <= 2; c++) {
		b = base; b.crypt = c;
		ret = parse(&b, &h, NULL);
		CHECK(ret == 0, "info: crypt_method %u accepted (%d %s)", c, ret, err);
		if (ret == 0) {
			CHECK(h.crypt_method == c, "info: crypt_method reported");
			qcow_header_free(&h);
		}
	}
	b = base; b.ext[1] = (struct ext){ QCOW_EXT_DATA_FILE, 16, 'x' };
	expect_ok(&b, "info: data file extension");
	b = base; b.ext[1] = (struct ext){ QCOW_EXT_CRYPTO, 16, 'x' };
	expect_ok(&b, "info: crypto extension");

	/* structure: still refused */
	b = base; b.incompat = 1ull << 5;
	expect_fail(&b, "info: incompatible bit 5", "incompatible", ENOTSUP);
	b = base; b.incompat = QCOW_INCOMPAT_EXTL2 | (1ull << 63);
	expect_fail(&b, "info: extended L2 plus bit 63", "incompatible", ENOTSUP);
	b = base; b.magic = 0;
	expect_fail(&b, "info: bad magic", "magic", EINVAL);
	b = base; b.version = 4;
	expect_fail(&b, "info: version 4", "version", 0);
	b = base; b.cluster_bits = 22;
	expect_fail(&b, "info: cluster_bits 22", "cluster_bits", EINVAL);
	b = base; b.header_length = 108;
	expect_fail(&b, "info: header_length 108", "header_length", EINVAL);
	b = base; b.refcount_order = 7;
	expect_fail(&b, "info: refcount_order 7", "refcount_order", EINVAL);
	b = base; b.l1_off = 3 * cs + 8;
	expect_fail(&b, "info: L1 offset unaligned", "l1_table_offset", EINVAL);
	b = base; b.l1_size -= 1;
	expect_fail(&b, "info: l1_size too small", "l1_size", EINVAL);
	b = base; b.rt_clusters = 0;
	expect_fail(&b, "info: refcount_table_clusters 0", "refcount_table_clusters", EINVAL);
	b = base; b.l1_off = b.rt_off;
	expect_fail(&b, "info: L1 on the refcount table", "overlap", EINVAL);
	b = base; b.ext[1] = (struct ext){ 0x77777777, (uint32_t)cs, 0x1 };
	expect_fail(&b, "info: extension past the cluster", "extension", EINVAL);
	b = base; b.backing_off = cs - 64; b.backing_size = 1024;
	expect_fail(&b, "info: backing_file_size 1024", "backing_file_size", EINVAL);
	b = base; b.backing_off = cs - 4; b.backing_size = 10;
	expect_fail(&b, "info: backing name past the cluster", "backing_file_offset", EINVAL);
	b = base; b.file_len = 50;
	expect_fail(&b, "info: file of 50 bytes", "short", EINVAL);
	info_mode = false;
}

/* ---- rewriting fields ---------------------------------------------------------- */

static void write_fields(unsigned version)
{
	struct hb b = hb_default(version, 16, 4, 1 << 30);
	uint64_t cs = 1ull << 16;
	b.file_len = (size_t)(8 * cs);
	if (version == 3) {
		b.header_length = 120;   /* unknown additional field at 112..119 */
		b.ext[0] = (struct ext){ QCOW_EXT_FEATURE_TABLE, 48, 0x42 };
		b.ext[1] = (struct ext){ 0x0badf00d, 21, 0x99 };
		b.compat = 1ull << 5;   /* an unknown compatible bit */
	} else {
		b.ext[0] = (struct ext){ 0x0badf00d, 21, 0x99 };
	}
	size_t len;
	uint8_t *f = hb_build(&b, &len);
	if (version == 3)
		memset(f + 112, 0xab, 8);
	struct qcow_io *io = qcow_io_mem_new(f, len);
	struct qcow_header h;
	err[0] = 0;
	int ret = qcow_header_read(io, &h, err, sizeof(err));
	REQUIRE(ret == 0, "v%u: base image for write_fields: %s", version, err);

	/* change l1 fields plus fields that must NOT be written */
	h.l1_size = 40;
	h.l1_table_offset = 6 * cs;
	h.size = 5ull << 30;
	h.refcount_table_offset = 7 * cs;
	h.compatible_features = 0;
	ret = qcow_header_write_fields(io, &h, QH_L1_SIZE, 12);
	CHECK(ret == 0, "v%u: write_fields l1: %d", version, ret);
	size_t dl;
	const uint8_t *d = qcow_io_mem_data(io, &dl);
	CHECK(dl == len, "v%u: file length unchanged", version);
	size_t first_diff = SIZE_MAX, last_diff = 0;
	for (size_t i = 0; i < len && i < dl; i++)
		if (d[i] != f[i]) {
			if (first_diff == SIZE_MAX)
				first_diff = i;
			last_diff = i;
		}
	CHECK(first_diff >= 36 && last_diff <= 47 && first_diff != SIZE_MAX,
	      "v%u: l1 write changed bytes %zu..%zu, expected within 36..47", version, first_diff, last_diff);
	CHECK(qcow_get_be32(d + 36) == 40 && qcow_get_be64(d + 40) == 6 * cs, "v%u: new l1 fields on disk", version);
	CHECK(memcmp(d + 72, f + 72, (size_t)cs - 72) == 0, "v%u: extensions and additional fields intact", version);
	qcow_header_free(&h);

	/* read back: the new L1 fields, the untouched others */
	uint8_t *snapshot = malloc(dl);
	memcpy(snapshot, d, dl);
	ret = qcow_header_read(io, &h, err, sizeof(err));
	CHECK(ret == 0, "v%u: reread after the l1 write: %s", version, err);
	if (ret == 0) {
		CHECK(h.l1_size == 40 && h.l1_table_offset == 6 * cs && h.size == 1ull << 30 &&
		      h.refcount_table_offset == cs, "v%u: reread fields", version);
		if (version == 3)
			CHECK(h.compatible_features == 1ull << 5, "v3: unknown compatible bit preserved");
		/* now the refcount table pair */
		h.refcount_table_offset = 5 * cs;
		h.refcount_table_clusters = 2;
		h.l1_size = 77;   /* not written this time */
		ret = qcow_header_write_fields(io, &h, QH_REFTABLE_OFFSET, 12);
		CHECK(ret == 0, "v%u: write_fields reftable", version);
		d = qcow_io_mem_data(io, &dl);
		first_diff = SIZE_MAX;
		last_diff = 0;
		for (size_t i = 0; i < dl; i++)
			if (d[i] != snapshot[i]) {
				if (first_diff == SIZE_MAX)
					first_diff = i;
				last_diff = i;
			}
		CHECK(first_diff >= 48 && last_diff <= 59 && first_diff != SIZE_MAX,
		      "v%u: reftable write changed bytes %zu..%zu, expected within 48..59", version, first_diff, last_diff);
		CHECK(qcow_get_be64(d + 48) == 5 * cs && qcow_get_be32(d + 56) == 2, "v%u: new reftable fields", version);
		/* encode alone does no I/O */
		memcpy(snapshot, d, dl);
		h.size = 9ull << 30;
		qcow_header_encode(&h);
		d = qcow_io_mem_data(io, &dl);
		CHECK(memcmp(snapshot, d, dl) == 0, "v%u: encode does no I/O", version);
		CHECK(qcow_get_be64(h.raw + QH_SIZE) == 9ull << 30, "v%u: encode patches the raw copy", version);
		CHECK(memcmp(h.raw + 72, f + 72, (size_t)cs - 72) == 0, "v%u: encode keeps extensions in raw", version);
		if (version == 3)
			CHECK(qcow_get_be64(h.raw + QH_COMPAT) == 1ull << 5, "v3: encode keeps the compatible bits");
		qcow_header_free(&h);
	}
	free(snapshot);
	free(f);
	qcow_io_close(io);
}

int main(void)
{
	valid();
	hostile();
	info();
	write_fields(2);
	write_fields(3);
	return tap_done();
}
