/*
 * qcow_compress.c - compressed clusters, as QEMU writes them: raw deflate
 * streams (compression type 0) or zstd frames (type 1, header byte 104).
 *
 * Owns: decoding a compressed L2 entry into the host byte range of its
 * stream, and decompressing that stream into one guest cluster.  Rules:
 * the range is derived from the entry alone (the scan at open has checked
 * it lies inside the file); a stream that does not decompress to exactly
 * one full cluster is an I/O error with the offset in the log, never a
 * crash.
 * No lock is needed: the caller keeps the host clusters referenced (or
 * registered in flight) while it reads.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

void qcow_compressed_range(const struct qcow_image *img, uint64_t e, uint64_t *off, uint64_t *len)
{
	unsigned x = 62 - (img->cluster_bits - 8);
	uint64_t o = e & ((1ull << x) - 1);
	uint64_t sectors = ((e >> x) & ((1ull << (img->cluster_bits - 8)) - 1)) + 1;
	*off = o;
	*len = sectors * 512 - (o & 511);
}

bool qcow_entry_clusters(const struct qcow_image *img, uint64_t e, uint64_t *first, uint64_t *last)
{
	if (e & QCOW_OFLAG_COMPRESSED) {
		uint64_t off, len;
		qcow_compressed_range(img, e, &off, &len);
		*first = off >> img->cluster_bits;
		*last = (off + len - 1) >> img->cluster_bits;
		return off != 0;
	}
	*first = *last = (e & QCOW_L2E_OFFSET_MASK) >> img->cluster_bits;
	return *first != 0;
}

/* One zstd frame (QEMU writes one per cluster) into one cluster; the
 * frame's own length says where the stream ends. */
static int zstd_decompress(const struct qcow_image *img, const uint8_t *in, size_t len, uint64_t off, uint8_t *out,
			   uint64_t *consumed)
{
	size_t frame = ZSTD_findFrameCompressedSize(in, len);
	size_t got = ZSTD_isError(frame) ? frame : ZSTD_decompress(out, img->cluster_size, in, frame);
	if (ZSTD_isError(got) || got != img->cluster_size) {
		qcow_logf(QCOW_LOG_ERROR, "corrupt zstd-compressed cluster at 0x%" PRIx64 "%s%s", off,
			  ZSTD_isError(got) ? ": " : " (short output)", ZSTD_isError(got) ? ZSTD_getErrorName(got) : "");
		return -EIO;
	}
	if (consumed)
		*consumed = frame;
	return 0;
}

int qcow_compressed_inflate(const struct qcow_image *img, const uint8_t *in, size_t len, uint64_t off, uint8_t *out,
			    uint64_t *consumed)
{
	if (img->hdr.compression_type == QCOW_COMPRESSION_ZSTD)
		return zstd_decompress(img, in, len, off, out, consumed);
	z_stream zs;
	memset(&zs, 0, sizeof(zs));
	if (inflateInit2(&zs, -15) != Z_OK)
		return -ENOMEM;
	zs.next_in = (uint8_t *)in;
	zs.avail_in = (uInt)len;
	zs.next_out = out;
	zs.avail_out = (uInt)img->cluster_size;
	int zr = inflate(&zs, Z_FINISH);
	int ret = 0;
	/* the stream's true length is known only when its end was seen;
	 * otherwise all the bytes given count */
	if (consumed)
		*consumed = zr == Z_STREAM_END ? zs.total_in : len;
	/* the stream may end early or be followed by padding; what matters
	 * is one full cluster of output */
	if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) || zs.avail_out != 0) {
		qcow_logf(QCOW_LOG_ERROR, "corrupt compressed cluster at 0x%" PRIx64, off);
		ret = -EIO;
	}
	inflateEnd(&zs);
	return ret;
}

int qcow_compressed_read(struct qcow_image *img, uint64_t e, uint8_t *out)
{
	uint64_t off, len;
	qcow_compressed_range(img, e, &off, &len);
	uint8_t *in = qcow_malloc((size_t)len);
	if (!in)
		return -ENOMEM;
	int ret = img->io->ops->pread(img->io, in, (size_t)len, off);
	if (ret == 0)
		ret = qcow_compressed_inflate(img, in, (size_t)len, off, out, NULL);
	qcow_free(in);
	return ret;
}

uint64_t qcow_compressed_descriptor(const struct qcow_image *img, uint64_t off, uint64_t bytes)
{
	unsigned x = 62 - (img->cluster_bits - 8);
	uint64_t sectors = ((off & 511) + bytes + 511) / 512;
	return QCOW_OFLAG_COMPRESSED | ((sectors - 1) << x) | off;
}
