/*
 * qcow_create.c - creating new, empty images, and reading what `qcowctl
 * info` shows of an image without opening it.
 *
 * Owns: the initial layout, which mirrors qemu-img's: header in cluster 0,
 * then the refcount table, the refcount blocks that count the initial
 * clusters, and the L1 table sized exactly for the virtual size.  Rules:
 * the file is built in memory and written with one write, then synced;
 * an existing path is never overwritten.
 * Also owns the offline readers for info: the header fields
 * (qcow_info_read) and the LUKS header of an encrypted image
 * (qcow_info_luks).  They take no lock and write nothing; every field
 * read from the file is bounds-checked before use.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

void qcow_create_opts_default(struct qcow_create_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->size = 8ull << 30;
	o->cluster_bits = 16;
	o->version = 3;
	o->refcount_order = 4;
}

int qcow_create(const char *path, const struct qcow_create_opts *o, char *err, size_t errlen)
{
	if (o->cluster_bits < QCOW_MIN_CLUSTER_BITS || o->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
		qcow_set_error(err, errlen, "cluster size 2^%u is not supported (512 B to 2 MiB)", o->cluster_bits);
		return -EINVAL;
	}
	if (o->version != 2 && o->version != 3) {
		qcow_set_error(err, errlen, "version %u is not supported (2 = compat 0.10, 3 = compat 1.1)", o->version);
		return -EINVAL;
	}
	if (o->refcount_order > 6 || (o->version == 2 && o->refcount_order != 4)) {
		qcow_set_error(err, errlen, "refcount width %u bits is not supported%s", 1u << (o->refcount_order > 6 ? 0 : o->refcount_order),
			       o->version == 2 ? " by compat 0.10 images (16 bits only)" : "");
		return -EINVAL;
	}
	uint64_t cs = 1ull << o->cluster_bits;
	uint64_t per_l1 = (cs / 8) * cs;
	if (o->size > (1ull << 62)) {
		qcow_set_error(err, errlen, "virtual size %" PRIu64 " is too large", o->size);
		return -EFBIG;
	}
	/* rounded up to whole 512-byte sectors, as qemu-img create does: QEMU
	 * would not see a partial sector */
	uint64_t size = (o->size + 511) & ~511ull;
	uint64_t l1_entries = size / per_l1 + (size % per_l1 != 0);
	if (l1_entries * 8 > QCOW_MAX_L1_BYTES) {
		qcow_set_error(err, errlen, "virtual size %" PRIu64 " is too large for %" PRIu64 "-byte clusters", o->size, cs);
		return -EFBIG;
	}
	uint64_t l1_clusters = (l1_entries * 8 + cs - 1) / cs;
	if (l1_clusters == 0)
		l1_clusters = 1;
	uint64_t per_rb = cs * 8 >> o->refcount_order;
	uint64_t rt = 1, rb = 1;
	for (;;) {   /* fixed point: blocks must count the table and themselves */
		uint64_t total = 1 + rt + rb + l1_clusters;
		uint64_t nrb = (total + per_rb - 1) / per_rb;
		uint64_t nrt = (nrb * 8 + cs - 1) / cs;
		if (nrb == rb && nrt == rt)
			break;
		rb = nrb;
		rt = nrt;
	}
	uint64_t total = 1 + rt + rb + l1_clusters;
	if (total * cs > (256ull << 20)) {
		qcow_set_error(err, errlen, "initial metadata would take %" PRIu64 " bytes; use bigger clusters", total * cs);
		return -EFBIG;
	}
	uint8_t *f = qcow_calloc(total, cs);
	if (!f)
		return -ENOMEM;
	uint64_t rt_off = cs, rb_off = (1 + rt) * cs, l1_off = (1 + rt + rb) * cs;
	qcow_put_be32(f + QH_MAGIC, QCOW_MAGIC);
	qcow_put_be32(f + QH_VERSION, o->version);
	qcow_put_be32(f + QH_CLUSTER_BITS, o->cluster_bits);
	qcow_put_be64(f + QH_SIZE, size);
	qcow_put_be32(f + QH_L1_SIZE, (uint32_t)l1_entries);
	qcow_put_be64(f + QH_L1_OFFSET, l1_off);
	qcow_put_be64(f + QH_REFTABLE_OFFSET, rt_off);
	qcow_put_be32(f + QH_REFTABLE_CLUSTERS, (uint32_t)rt);
	if (o->version == 3) {
		qcow_put_be32(f + QH_REFCOUNT_ORDER, o->refcount_order);
		qcow_put_be32(f + QH_HEADER_LENGTH, QCOW_V3_NEW_HEADER_LEN);
		/* extension area: just the end marker (8 zero bytes) */
	}
	for (uint64_t i = 0; i < rb; i++)
		qcow_put_be64(f + rt_off + i * 8, rb_off + i * cs);
	for (uint64_t c = 0; c < total; c++)
		qcow_rc_set(f + rb_off + (c / per_rb) * cs, o->refcount_order, c % per_rb, 1);

	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		int e = errno;
		qcow_free(f);
		qcow_set_error(err, errlen, "cannot create %s: %s", path, strerror(e));
		return -e;
	}
	int ret = 0;
	size_t len = total * cs, done = 0;
	while (done < len) {
		ssize_t n = write(fd, f + done, len - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			ret = -errno;
			break;
		}
		done += (size_t)n;
	}
	if (ret == 0 && fsync(fd) < 0)
		ret = -errno;
	close(fd);
	qcow_free(f);
	if (ret) {
		unlink(path);
		qcow_set_error(err, errlen, "cannot write %s: %s", path, strerror(-ret));
	}
	return ret;
}

int qcow_info_read(const char *path, struct qcow_info *info, char *err, size_t errlen)
{
	struct qcow_io *io;
	struct qcow_header h;
	int ret = qcow_io_file_open(path, true, &io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot open %s: %s", path, strerror(-ret));
		return ret;
	}
	ret = qcow_header_read_info(io, &h, err, errlen);
	if (ret == 0) {
		memset(info, 0, sizeof(*info));
		info->version = h.version;
		info->virtual_size = h.size;
		info->cluster_bits = h.cluster_bits;
		info->refcount_bits = 1u << h.refcount_order;
		info->compression_type = h.compression_type;
		info->crypt_method = h.crypt_method;
		info->file_size = h.file_size;
		int64_t a = io->ops->allocated(io);
		info->file_allocated = a > 0 ? (uint64_t)a : 0;
		info->incompatible_features = h.incompatible_features;
		info->compatible_features = h.compatible_features;
		info->autoclear_features = h.autoclear_features;
		info->nb_snapshots = h.nb_snapshots;
		info->l1_table_offset = h.l1_table_offset;
		info->l1_size = h.l1_size;
		info->refcount_table_offset = h.refcount_table_offset;
		info->refcount_table_clusters = h.refcount_table_clusters;
		memcpy(info->backing_file, h.backing_file, sizeof(info->backing_file));
		_Static_assert(sizeof(info->backing_format) == sizeof(h.backing_format), "backing format sizes");
		memcpy(info->backing_format, h.backing_format, sizeof(info->backing_format));
		info->dirty = h.incompatible_features & QCOW_INCOMPAT_DIRTY;
		info->corrupt = h.incompatible_features & QCOW_INCOMPAT_CORRUPT;
		memcpy(info->data_file, h.data_file, sizeof(info->data_file));
		info->has_data_file = h.incompatible_features & QCOW_INCOMPAT_DATA_FILE;
		info->data_file_raw = h.autoclear_features & QCOW_AUTOCLEAR_DATA_FILE_RAW;
		qcow_header_free(&h);
	}
	qcow_io_close(io);
	return ret;
}

/* ---- the LUKS header of an encrypted image, for info ------------------- */

/* LUKS1 on-disk header (the cryptsetup format QEMU writes into the
 * clusters the crypto header extension points at): big-endian, fixed
 * offsets. */
#define LUKS_MAGIC "LUKS\xba\xbe"
#define LUKS_HDR_BYTES 592u
#define LUKS_CIPHER_NAME 8u
#define LUKS_CIPHER_MODE 40u
#define LUKS_HASH_SPEC 72u
#define LUKS_PAYLOAD_OFFSET 104u      /* 512-byte sectors */
#define LUKS_KEY_BYTES 108u
#define LUKS_MK_ITERS 164u
#define LUKS_UUID 168u
#define LUKS_SLOTS 208u               /* 8 slots of 48 bytes */
#define LUKS_SLOT_BYTES 48u
#define LUKS_SLOT_ACTIVE 0x00AC71F3u

/* A fixed-size text field: up to the first NUL, printable ASCII only
 * (the header is hostile input and the text ends up on a terminal). */
static void luks_text(const uint8_t *p, size_t n, char *out, size_t len)
{
	size_t k = 0;

	for (; k < n && k + 1 < len && p[k]; k++)
		out[k] = p[k] >= 0x20 && p[k] < 0x7f ? (char)p[k] : '?';
	out[k] = '\0';
}

/* The crypto header extension (offset and length of the LUKS header). */
static bool luks_extension(const struct qcow_header *h, uint64_t *off, uint64_t *len)
{
	uint64_t end = h->backing_file_offset ? h->backing_file_offset : h->raw_len;
	uint64_t pos = h->header_length;

	if (end > h->raw_len)
		end = h->raw_len;
	while (pos + 8 <= end) {
		uint32_t type = qcow_get_be32(h->raw + pos);
		uint32_t n = qcow_get_be32(h->raw + pos + 4);
		if (type == QCOW_EXT_END || n > end - pos - 8)
			return false;
		if (type == QCOW_EXT_CRYPTO && n >= 16) {
			*off = qcow_get_be64(h->raw + pos + 8);
			*len = qcow_get_be64(h->raw + pos + 16);
			return true;
		}
		pos += 8 + (((uint64_t)n + 7) & ~7ull);
	}
	return false;
}

int qcow_info_luks(const char *path, struct qcow_luks_info *out, char *err, size_t errlen)
{
	struct qcow_io *io;
	struct qcow_header h;
	uint8_t b[LUKS_HDR_BYTES];
	uint64_t off = 0, len = 0;
	int ret = qcow_io_file_open(path, true, &io);

	memset(out, 0, sizeof(*out));
	memset(&h, 0, sizeof(h));   /* qcow_header_free is safe on it */
	if (ret) {
		qcow_set_error(err, errlen, "cannot open %s: %s", path, strerror(-ret));
		return ret;
	}
	ret = qcow_header_read_info(io, &h, err, errlen);
	if (ret)
		goto out;
	if (h.crypt_method != 2 || !luks_extension(&h, &off, &len)) {
		qcow_set_error(err, errlen, "no LUKS header: crypt_method %u (header offset 32)%s", h.crypt_method,
			       h.crypt_method == 2 ? ", but no crypto header extension" : "");
		ret = -EINVAL;
		goto out;
	}
	if (len < LUKS_HDR_BYTES || off > h.file_size || h.file_size - off < LUKS_HDR_BYTES) {
		qcow_set_error(err, errlen, "the LUKS header at offset 0x%" PRIx64 " (%" PRIu64 " bytes, named by the crypto header extension) "
			       "does not fit in the extension's length or the file", off, len);
		ret = -EINVAL;
		goto out;
	}
	ret = io->ops->pread(io, b, sizeof(b), off);
	if (ret) {
		qcow_set_error(err, errlen, "cannot read the LUKS header at offset 0x%" PRIx64 ": %s", off, strerror(-ret));
		goto out;
	}
	if (memcmp(b, LUKS_MAGIC, 6) != 0 || qcow_get_be16(b + 6) != 1) {
		qcow_set_error(err, errlen, "no LUKS version 1 header at offset 0x%" PRIx64 " (magic or version wrong)", off);
		ret = -EINVAL;
		goto out;
	}

	char name[33], mode[33];
	uint32_t key_bytes = qcow_get_be32(b + LUKS_KEY_BYTES);
	luks_text(b + LUKS_CIPHER_NAME, 32, name, sizeof(name));
	luks_text(b + LUKS_CIPHER_MODE, 32, mode, sizeof(mode));
	luks_text(b + LUKS_HASH_SPEC, 32, out->hash_alg, sizeof(out->hash_alg));
	luks_text(b + LUKS_UUID, 40, out->uuid, sizeof(out->uuid));
	/* "xts-plain64", "cbc-essiv:sha256": the mode, the IV generator and
	 * its hash, as QEMU splits them */
	char *dash = strchr(mode, '-');
	if (dash) {
		*dash = '\0';
		char *colon = strchr(dash + 1, ':');
		if (colon) {
			*colon = '\0';
			snprintf(out->ivgen_hash_alg, sizeof(out->ivgen_hash_alg), "%s", colon + 1);
		}
		snprintf(out->ivgen_alg, sizeof(out->ivgen_alg), "%s", dash + 1);
	}
	snprintf(out->cipher_mode, sizeof(out->cipher_mode), "%s", mode);
	/* QEMU names a cipher by algorithm and key size; XTS keys are two
	 * keys of the cipher's size */
	uint32_t bits = (strcmp(mode, "xts") == 0 ? key_bytes / 2 : key_bytes) * 8;
	if (strcmp(name, "sm4") == 0)
		snprintf(out->cipher_alg, sizeof(out->cipher_alg), "sm4");
	else
		snprintf(out->cipher_alg, sizeof(out->cipher_alg), "%s-%u", name, bits);
	out->payload_offset = (uint64_t)qcow_get_be32(b + LUKS_PAYLOAD_OFFSET) * 512;
	out->master_key_iters = qcow_get_be32(b + LUKS_MK_ITERS);
	for (unsigned i = 0; i < 8; i++) {
		const uint8_t *s = b + LUKS_SLOTS + i * LUKS_SLOT_BYTES;
		out->slots[i].active = qcow_get_be32(s) == LUKS_SLOT_ACTIVE;
		out->slots[i].iters = qcow_get_be32(s + 4);
		out->slots[i].key_offset = (uint64_t)qcow_get_be32(s + 40) * 512;
		out->slots[i].stripes = qcow_get_be32(s + 44);
	}
	ret = 0;
out:
	qcow_header_free(&h);
	qcow_io_close(io);
	return ret;
}
