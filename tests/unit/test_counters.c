/*
 * test_counters.c - the status counters tell the truth (issue 9), on the
 * memory backend with no recycler thread:
 *
 *  - bytes_discarded counts the allocated host clusters that discards
 *    freed: a discard of never-allocated ranges counts 0 (but its request
 *    shows in bytes_discard_requested), of written clusters their bytes,
 *    of an already discarded range 0 again;
 *  - a host cluster shared by several references counts once, when its
 *    last reference goes: a snapshot's cluster counts nothing while the
 *    snapshot holds it; a host cluster holding several compressed streams
 *    (QEMU packs small streams into one) counts when its last stream's
 *    guest cluster is discarded, not before;
 *  - detect_zeroes=unmap, sparsify and a shrink count what they free;
 *  - bytes_reclaimed equals the host allocation the file lost over a
 *    compaction (the memory backend's allocation is its size), and a
 *    second pass that gives nothing back adds nothing.
 */
#include "config.h"
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <inttypes.h>
#include <string.h>

#define CS 65536ull
#define MiB (1024ull * 1024)

static struct qcow_image *open_bytes(uint8_t *bytes, size_t len, enum qcow_detect_zeroes dz)
{
	struct qcow_open_opts o;
	test_open_opts(&o, 1 << 20);
	o.detect_zeroes = dz;
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	REQUIRE(io, "memory backend");
	struct qcow_image *img = NULL;
	char err[256] = "";
	int ret = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "open: %s", err);
	return img;
}

static struct qcow_stats stats(struct qcow_image *img)
{
	struct qcow_stats st;
	qcow_image_get_stats(img, &st);
	return st;
}

static void fill(struct qcow_image *img, uint64_t off, uint64_t len, int byte)
{
	uint8_t *b = malloc(len);
	REQUIRE(b, "buffer");
	memset(b, byte, len);
	REQUIRE(qcow_image_write(img, b, len, off) == (ssize_t)len, "write %" PRIu64 "+%" PRIu64, off, len);
	free(b);
}

static void test_plain_and_snapshot(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(64 * MiB, 16, 4, 3, &len);
	struct qcow_image *img = open_bytes(bytes, len, QCOW_DETECT_ZEROES_OFF);
	free(bytes);

	REQUIRE(qcow_image_discard(img, 0, 64 * MiB) == 0, "discard of the whole empty disk");
	struct qcow_stats st = stats(img);
	CHECK(st.bytes_discarded == 0, "a discard of a never-written disk freed %" PRIu64 " bytes", st.bytes_discarded);
	CHECK(st.bytes_discard_requested == 64 * MiB, "requested %" PRIu64 " of 64 MiB", st.bytes_discard_requested);

	/* 4 written clusters inside a 1 MiB discard (the rest never written),
	 * partial clusters at both ends are zeroed, not freed */
	fill(img, 4 * MiB, 4 * CS, 0x11);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	REQUIRE(qcow_image_discard(img, 4 * MiB - 100, 1 * MiB + 200) == 0, "discard");
	st = stats(img);
	CHECK(st.bytes_discarded == 4 * CS, "4 written clusters discarded: %" PRIu64 " bytes counted",
	      st.bytes_discarded);
	REQUIRE(qcow_image_discard(img, 4 * MiB, 1 * MiB) == 0, "discard again");
	st = stats(img);
	CHECK(st.bytes_discarded == 4 * CS, "discarding the same range again counted: %" PRIu64, st.bytes_discarded);

	/* a snapshot shares clusters A: discarding them frees nothing */
	fill(img, 8 * MiB, 2 * CS, 0x22);
	REQUIRE(qcow_snapshot_create(img, "s1") == 0, "snapshot s1");
	uint64_t d0 = stats(img).bytes_discarded;
	REQUIRE(qcow_image_discard(img, 8 * MiB, 2 * CS) == 0, "discard shared");
	st = stats(img);
	CHECK(st.bytes_discarded == d0, "discarding clusters a snapshot still holds counted %" PRIu64 " bytes",
	      st.bytes_discarded - d0);
	/* once the snapshot is gone, the same kind of discard frees them */
	fill(img, 8 * MiB, 2 * CS, 0x33);
	REQUIRE(qcow_snapshot_delete(img, "s1") == 0, "delete s1");
	d0 = stats(img).bytes_discarded;
	REQUIRE(qcow_image_discard(img, 8 * MiB, 2 * CS) == 0, "discard unshared");
	st = stats(img);
	CHECK(st.bytes_discarded - d0 == 2 * CS, "discarding 2 own clusters counted %" PRIu64,
	      st.bytes_discarded - d0);

	/* a shrink frees the clusters past the end and their L2 table */
	fill(img, 40 * MiB, 3 * CS, 0x44);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	d0 = stats(img).bytes_discarded;
	REQUIRE(qcow_image_resize(img, 32 * MiB) == 0, "shrink");
	st = stats(img);
	/* 64 KiB clusters: one L2 table covers 512 MiB, so it stays */
	CHECK(st.bytes_discarded - d0 == 3 * CS, "a shrink over 3 written clusters counted %" PRIu64,
	      st.bytes_discarded - d0);
	REQUIRE(qcow_image_close(img) == 0, "close");
}

static void test_compressed(void)
{
	/* four tiny compressed streams: QEMU packs them into one host cluster */
	size_t len;
	uint8_t *bytes = qemu_bytes("qemu-img create -q -f qcow2 %s 16M && "
				    "qemu-io -f qcow2 -c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' "
				    "-c 'write -c -P 3 128k 64k' -c 'write -c -P 4 192k 64k' %s",
				    &len);
	struct qcow_image *img = open_bytes(bytes, len, QCOW_DETECT_ZEROES_OFF);
	free(bytes);
	struct qcow_stats st = stats(img);
	CHECK(st.clusters_shared == 1, "the 4 streams share %" PRIu64 " host clusters (expected 1)",
	      st.clusters_shared);
	for (uint64_t g = 0; g < 3; g++) {
		REQUIRE(qcow_image_discard(img, g * CS, CS) == 0, "discard stream %" PRIu64, g);
		st = stats(img);
		CHECK(st.bytes_discarded == 0, "discarding stream %" PRIu64 " of a shared host cluster counted %" PRIu64,
		      g, st.bytes_discarded);
	}
	REQUIRE(qcow_image_discard(img, 3 * CS, CS) == 0, "discard the last stream");
	st = stats(img);
	CHECK(st.bytes_discarded == CS, "the last stream's discard freed the host cluster: %" PRIu64 " counted",
	      st.bytes_discarded);
	REQUIRE(qcow_image_close(img) == 0, "close");
}

static void test_zeroes_and_reclaim(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(64 * MiB, 16, 4, 3, &len);
	struct qcow_image *img = open_bytes(bytes, len, QCOW_DETECT_ZEROES_UNMAP);
	free(bytes);

	fill(img, 0, 16 * CS, 0x55);
	fill(img, 1 * MiB, 8 * CS, 0x66);
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	/* detect_zeroes=unmap: 4 zero clusters over data, 4 over nothing */
	fill(img, 0, 4 * CS, 0);
	fill(img, 32 * MiB, 4 * CS, 0);
	struct qcow_stats st = stats(img);
	CHECK(st.bytes_discarded == 4 * CS, "zero writes with unmap freed %" PRIu64 " bytes (expected 4 clusters)",
	      st.bytes_discarded);

	/* sparsify finds zeros written as data (detect_zeroes off meanwhile
	 * would keep them; here the image's data is overwritten through
	 * the zero check, so write non-zero data and zero it in place
	 * with a partial write that the check does not cover) */
	uint8_t *z = calloc(1, CS);
	REQUIRE(z, "buffer");
	REQUIRE(qcow_image_write(img, z, CS - 512, 4 * CS) == (ssize_t)(CS - 512), "partial zero write");
	REQUIRE(qcow_image_write(img, z, 512, 5 * CS - 512) == 512, "rest of the cluster");
	free(z);
	uint64_t d0 = stats(img).bytes_discarded;
	struct qcow_sparsify_result r;
	REQUIRE(qcow_image_sparsify(img, NULL, NULL, &r) == 0, "sparsify");
	st = stats(img);
	CHECK(r.freed == 1, "sparsify freed %" PRIu64 " clusters (expected 1)", r.freed);
	CHECK(st.bytes_discarded - d0 == r.bytes_freed, "sparsify freed %" PRIu64 " bytes, counted %" PRIu64,
	      r.bytes_freed, st.bytes_discarded - d0);

	/* compaction: the memory backend's allocation is its size */
	REQUIRE(qcow_image_discard(img, 0, 1 * MiB) == 0, "discard");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	st = stats(img);
	uint64_t before = st.file_allocated, r0 = st.bytes_reclaimed;
	REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact");
	st = stats(img);
	CHECK(st.file_allocated < before, "compaction gave nothing back (%" PRIu64 " -> %" PRIu64 ")", before,
	      st.file_allocated);
	CHECK(st.bytes_reclaimed - r0 == before - st.file_allocated,
	      "bytes_reclaimed grew by %" PRIu64 ", the allocation fell by %" PRIu64, st.bytes_reclaimed - r0,
	      before - st.file_allocated);
	uint64_t r1 = st.bytes_reclaimed, a1 = st.file_allocated;
	REQUIRE(qcow_image_compact(img, NULL, NULL) == 0, "compact again");
	st = stats(img);
	CHECK(st.bytes_reclaimed - r1 == a1 - st.file_allocated,
	      "a second pass: bytes_reclaimed grew by %" PRIu64 ", the allocation fell by %" PRId64,
	      st.bytes_reclaimed - r1, (int64_t)(a1 - st.file_allocated));
	REQUIRE(qcow_image_close(img) == 0, "close");
}

int main(void)
{
	test_plain_and_snapshot();
	test_compressed();
	test_zeroes_and_reclaim();
	return tap_done();
}
