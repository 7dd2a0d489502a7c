/*
 * test_imgmap.c - what qcowctl map shows, on the engine (qcow_imgmap.c).
 *
 *  - the mapping: after random writes, zeroes and discards (whole and
 *    partial clusters) the extents tile the disk without gaps, every data
 *    extent's host bytes (read from the image file at its offset) are what
 *    the guest reads there, every zero extent reads zeros, and the data
 *    extents cover exactly the allocated clusters the picture counts;
 *  - a raw backing file: what shows through is depth 1, present, data at
 *    its own offset; past the backing file's end zeros of depth 0;
 *  - the picture: one header, an L1 table, a refcount table and block,
 *    the L2 tables and data clusters as many as there are; a discarded
 *    cluster is junk; totals add up to the clusters; the cell count never
 *    passes the cap asked for and every cell shows its dominant kind.
 * qemu-img map equality on real images is t350-map.sh's job.
 */
#include "config.h"
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#define MiB (1024ull * 1024)

static struct qcow_image *open_mem(const uint8_t *bytes, size_t len, struct qcow_backing *backing)
{
	struct qcow_open_opts o;
	struct qcow_image *img = NULL;
	char err[256] = "";
	test_open_opts(&o, 256 * 1024);
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	REQUIRE(io, "memory backend");
	int ret = backing ? qcow_image_open_io_backing(io, &o, backing, &img, err, sizeof(err))
			  : qcow_image_open_io(io, &o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "open: %s", err);
	return img;
}

/* Walks the whole mapping and checks it against the guest's reads;
 * returns the bytes of data extents with a host offset. */
static uint64_t check_mapping(struct qcow_image *img, const char *what)
{
	uint64_t size = qcow_image_size(img), off = 0, data_bytes = 0;
	uint8_t *guest = malloc(img->cluster_size), *host = malloc(img->cluster_size);
	unsigned extents = 0;
	bool ok = true;
	REQUIRE(guest && host, "memory");
	while (off < size && ok) {
		struct qcow_map_extent e;
		int ret = qcow_image_map_extent(img, off, size - off, &e);
		CHECK(ret == 0, "%s: map extent at %" PRIu64 ": %d", what, off, ret);
		if (ret) {
			ok = false;
			break;
		}
		CHECK(e.start == off && e.length > 0 && e.length <= size - off,
		      "%s: extent at %" PRIu64 " is [%" PRIu64 ", +%" PRIu64 ")", what, off, e.start, e.length);
		if (e.length == 0)
			break;
		extents++;
		if (e.data && e.has_offset && e.depth == 0)
			data_bytes += e.length;
		for (uint64_t p = 0; p < e.length && ok; p += img->cluster_size) {
			size_t n = e.length - p < img->cluster_size ? (size_t)(e.length - p) : img->cluster_size;
			REQUIRE(qcow_image_read(img, guest, n, off + p) == (ssize_t)n, "read");
			if (e.data && e.has_offset && e.depth == 0) {
				REQUIRE(img->data_io->ops->pread(img->data_io, host, n, e.offset + p) == 0, "host read");
				ok = memcmp(guest, host, n) == 0;
				CHECK(ok, "%s: host bytes at %" PRIu64 " are not guest offset %" PRIu64, what,
				      e.offset + p, off + p);
			} else if (e.zero) {
				for (size_t i = 0; i < n && ok; i++)
					ok = guest[i] == 0;
				CHECK(ok, "%s: zero extent at %" PRIu64 " reads data", what, off + p);
			}
		}
		off += e.length;
	}
	CHECK(!ok || off == size, "%s: the extents end at %" PRIu64 ", not at %" PRIu64, what, off, size);
	free(guest);
	free(host);
	(void)extents;
	return data_bytes;
}

static void random_mapping(unsigned seed_base)
{
	size_t len;
	uint8_t *bytes = create_bytes(16 * MiB, 12, 4, 3, &len);   /* 4 KiB clusters: many L2 tables */
	struct qcow_image *img = open_mem(bytes, len, NULL);
	unsigned long long seed = 0x9e3779b97f4a7c15ull ^ seed_base;
	uint8_t *buf = malloc(64 * 1024);
	REQUIRE(buf, "memory");
	for (unsigned i = 0; i < 300; i++) {
		uint64_t off = tap_rand(&seed) % (16 * MiB - 64 * 1024);
		size_t n = 1 + (size_t)(tap_rand(&seed) % (64 * 1024));
		switch (tap_rand(&seed) % 4) {
		case 0:
		case 1:
			memset(buf, (int)(1 + i % 250), n);
			REQUIRE(qcow_image_write(img, buf, n, off) == (ssize_t)n, "write");
			break;
		case 2:
			REQUIRE(qcow_image_zero(img, off, n) == 0, "zero");
			break;
		default:
			REQUIRE(qcow_image_discard(img, off, n) == 0, "discard");
			break;
		}
	}
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	char what[64];
	snprintf(what, sizeof(what), "random round %u", seed_base);
	uint64_t data_bytes = check_mapping(img, what);

	struct qcow_picture *pic = calloc(1, sizeof(*pic));
	REQUIRE(pic, "memory");
	REQUIRE(qcow_image_picture(img, 0, pic) == 0, "picture");
	uint64_t sum = 0;
	for (unsigned k = 0; k < QCOW_PIC_NKINDS; k++)
		sum += pic->totals[k];
	CHECK(sum == pic->clusters, "%s: totals add up to %" PRIu64 " of %" PRIu64 " clusters", what, sum, pic->clusters);
	CHECK(pic->totals[QCOW_PIC_DATA] * img->cluster_size == data_bytes,
	      "%s: the picture counts %" PRIu64 " data clusters, the mapping %" PRIu64 " bytes", what,
	      pic->totals[QCOW_PIC_DATA], data_bytes);
	CHECK(pic->totals[QCOW_PIC_HEADER] == 1 && pic->totals[QCOW_PIC_L1] >= 1 &&
	      pic->totals[QCOW_PIC_REFTABLE] >= 1 && pic->totals[QCOW_PIC_REFBLOCK] >= 1,
	      "%s: header %" PRIu64 ", L1 %" PRIu64 ", refcount table %" PRIu64 ", blocks %" PRIu64, what,
	      pic->totals[QCOW_PIC_HEADER], pic->totals[QCOW_PIC_L1], pic->totals[QCOW_PIC_REFTABLE],
	      pic->totals[QCOW_PIC_REFBLOCK]);
	CHECK(pic->cell[0] == QCOW_PIC_HEADER, "%s: cell 0 is kind %u, not the header", what, pic->cell[0]);

	/* a cap of 7 cells: the clusters per cell scale, dominant kinds */
	struct qcow_picture *small = calloc(1, sizeof(*small));
	REQUIRE(small, "memory");
	REQUIRE(qcow_image_picture(img, 7, small) == 0, "picture of 7 cells");
	CHECK(small->cells <= 7 && small->cells >= 1 &&
	      small->cells * small->clusters_per_cell >= small->clusters &&
	      (small->cells - 1) * small->clusters_per_cell < small->clusters,
	      "%s: %u cells of %" PRIu64 " clusters for %" PRIu64, what, small->cells,
	      small->clusters_per_cell, small->clusters);
	for (uint32_t c = 0; c < small->cells; c++) {
		uint64_t counts[QCOW_PIC_NKINDS] = { 0 };
		for (uint64_t i = c * small->clusters_per_cell;
		     i < (c + 1) * small->clusters_per_cell && i < pic->clusters; i++)
			counts[pic->cell[i]]++;   /* the big picture has one cluster per cell */
		bool dominant = true;
		for (unsigned k = 0; k < QCOW_PIC_NKINDS; k++)
			dominant = dominant && counts[small->cell[c]] >= counts[k];
		CHECK(pic->clusters_per_cell != 1 || dominant, "%s: cell %u shows kind %u, not its dominant one",
		      what, c, small->cell[c]);
	}
	free(small);
	free(pic);
	free(buf);
	REQUIRE(qcow_image_close(img) == 0, "close");
	free(bytes);
}

static void discarded_is_junk(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(4 * MiB, 16, 4, 3, &len);
	struct qcow_image *img = open_mem(bytes, len, NULL);
	uint8_t buf[65536];
	memset(buf, 0x5a, sizeof(buf));
	for (unsigned c = 0; c < 4; c++)
		REQUIRE(qcow_image_write(img, buf, sizeof(buf), c * 65536ull) == (ssize_t)sizeof(buf), "write");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	REQUIRE(qcow_image_discard(img, 65536, 65536) == 0, "discard");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	struct qcow_picture *pic = calloc(1, sizeof(*pic));
	REQUIRE(pic, "memory");
	REQUIRE(qcow_image_picture(img, 0, pic) == 0, "picture");
	CHECK(pic->totals[QCOW_PIC_DATA] == 3 && pic->totals[QCOW_PIC_L2] == 1 &&
	      pic->totals[QCOW_PIC_JUNK] + pic->totals[QCOW_PIC_ERASED] == 1 && pic->clusters_per_cell == 1,
	      "4 written, 1 discarded: data %" PRIu64 ", L2 %" PRIu64 ", junk %" PRIu64 ", erased %" PRIu64,
	      pic->totals[QCOW_PIC_DATA], pic->totals[QCOW_PIC_L2], pic->totals[QCOW_PIC_JUNK],
	      pic->totals[QCOW_PIC_ERASED]);
	struct qcow_map_extent e;
	REQUIRE(qcow_image_map_extent(img, 0, 4 * MiB, &e) == 0, "extent");
	CHECK(e.data && e.present && !e.zero && e.has_offset && e.length == 65536 && e.depth == 0,
	      "first cluster: data %d present %d length %" PRIu64, e.data, e.present, e.length);
	REQUIRE(qcow_image_map_extent(img, 65536, 4 * MiB - 65536, &e) == 0, "extent");
	CHECK(!e.data && e.zero && !e.present && e.length == 65536,
	      "discarded cluster: data %d zero %d present %d length %" PRIu64, e.data, e.zero, e.present, e.length);
	CHECK(qcow_image_map_extent(img, 4 * MiB, 1, &e) == -ENXIO, "past the end: -ENXIO");
	free(pic);
	REQUIRE(qcow_image_close(img) == 0, "close");
	free(bytes);
}

static void raw_backing(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(4 * MiB, 16, 4, 3, &len);
	/* the image records no backing file: the chain comes with the open */
	uint8_t *raw = calloc(1, 1 * MiB);
	REQUIRE(raw, "memory");
	memset(raw, 0x11, 1 * MiB);
	struct qcow_backing *b = test_raw_backing(raw, 1 * MiB);
	struct qcow_image *img = open_mem(bytes, len, b);
	uint8_t buf[65536];
	memset(buf, 0x22, sizeof(buf));
	REQUIRE(qcow_image_write(img, buf, sizeof(buf), 131072) == (ssize_t)sizeof(buf), "write");
	struct qcow_map_extent e;
	REQUIRE(qcow_image_map_extent(img, 0, 4 * MiB, &e) == 0, "extent");
	CHECK(e.depth == 1 && e.present && e.data && e.has_offset && e.offset == 0 && e.length == 131072,
	      "backing shows through: depth %u present %d data %d offset %" PRIu64 " length %" PRIu64, e.depth,
	      e.present, e.data, e.offset, e.length);
	REQUIRE(qcow_image_map_extent(img, 131072, 4 * MiB, &e) == 0, "extent");
	CHECK(e.depth == 0 && e.data && e.length == 65536, "the written cluster: depth %u length %" PRIu64, e.depth,
	      e.length);
	REQUIRE(qcow_image_map_extent(img, 1 * MiB, 3 * MiB, &e) == 0, "extent");
	CHECK(e.depth == 0 && e.zero && !e.present && !e.data && e.length == 3 * MiB,
	      "past the backing file: depth %u zero %d present %d length %" PRIu64, e.depth, e.zero, e.present,
	      e.length);
	REQUIRE(qcow_image_close(img) == 0, "close");
	free(raw);
	free(bytes);
}

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)level;
	(void)msg;
	(void)opaque;
}

int main(void)
{
	qcow_log_set_sink(quiet_sink, NULL);
	discarded_is_junk();
	raw_backing();
	for (unsigned i = 0; i < 6; i++)
		random_mapping(i);
	return tap_done();
}
