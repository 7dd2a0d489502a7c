/*
 * fuzz_image.c - fuzz target: open a hostile image, then run operations.
 *
 * Input layout: a little-endian u32 N, then N bytes of image, then
 * operations of 12 bytes each (kind, offset, length).  The image is opened
 * read-write on the memory backend with every invariant check on.  The
 * target must never crash, hang or trip an invariant; an image the engine
 * refuses must be left byte-for-byte unchanged and come with a message.
 *
 * Two builds:
 *  - with libFuzzer (configure --enable-fuzzer, clang): tests/fuzz/fuzz_image
 *    is a coverage-guided fuzzer (run it with a corpus directory);
 *  - without (the default, part of `make check` as tests/unit/test_fuzz):
 *    a deterministic driver mutates valid images (bit flips and pointer
 *    overwrites, weighted towards the metadata) and runs every mutant, so
 *    the sanitizer builds exercise the same paths.  FUZZ_ROUNDS (env)
 *    sets the number of mutants; `test_fuzz --write-corpus DIR` writes
 *    the valid seed images as inputs for the libFuzzer build.
 */
#include "qcow_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OPS 64
#define MAX_IO (256u << 10)

static void quiet(enum qcow_log_level level, const char *msg, void *opaque) {}

static uint64_t get_le(const uint8_t *p, unsigned n)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < n; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

/* Returns 0, or -1 for a finding (the caller aborts in libFuzzer mode). */
static int fuzz_one(const uint8_t *data, size_t size)
{
	if (size < 4)
		return 0;
	size_t n = (size_t)get_le(data, 4);
	if (n > size - 4)
		n = size - 4;
	const uint8_t *image = data + 4, *ops = data + 4 + n;
	size_t nops = (size - 4 - n) / 12;
	if (nops > MAX_OPS)
		nops = MAX_OPS;

	struct qcow_io *io = qcow_io_mem_new(image, n);
	if (!io)
		return 0;
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.recycler = false;
	o.runtime_asserts = true;
	o.cache_bytes = 64 * 1024;
	struct qcow_image *img;
	char err[512] = "";
	int ret = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	if (ret) {
		size_t len;
		const uint8_t *after = qcow_io_mem_data(io, &len);
		int finding = 0;
		if (len != n || (n && memcmp(after, image, n))) {
			fprintf(stderr, "refused image was changed (%s)\n", err);
			finding = -1;
		}
		if (!err[0]) {
			fprintf(stderr, "refused image without a message (ret %d)\n", ret);
			finding = -1;
		}
		qcow_io_close(io);
		return finding;
	}
	uint8_t *buf = qcow_malloc(MAX_IO);
	uint64_t vsize = qcow_image_size(img);
	for (size_t i = 0; i < nops && buf; i++) {
		const uint8_t *op = ops + i * 12;
		uint64_t off = vsize ? get_le(op + 1, 7) % vsize : 0;
		uint64_t len = get_le(op + 8, 4) % MAX_IO;
		if (off + len > vsize)
			len = vsize - off;
		memset(buf, op[0], len);
		switch (op[0] % 8) {
		case 0: case 1: qcow_image_write(img, buf, len, off); break;
		case 2: qcow_image_read(img, buf, len, off); break;
		case 3: qcow_image_discard(img, off, len); break;
		case 4: qcow_image_zero(img, off, len); break;
		case 5: qcow_image_flush(img); break;
		case 6: qcow_image_compact(img, NULL, NULL); break;
		case 7:
			if (vsize < (1ull << 32) && qcow_image_resize(img, vsize + len) == 0)
				vsize += len;
			break;
		}
		pthread_mutex_lock(&img->lock);
		const char *bad = qcow_map_check(&img->map);
		pthread_mutex_unlock(&img->lock);
		if (bad) {
			fprintf(stderr, "invariant after op %zu (kind %u): %s\n", i, op[0] % 8u, bad);
			qcow_free(buf);
			return -1;
		}
	}
	qcow_free(buf);
	qcow_image_close(img);
	return 0;
}

#ifdef FUZZ_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int once;
	if (!once++)
		qcow_log_set_sink(quiet, NULL);
	if (fuzz_one(data, size))
		abort();
	return 0;
}
#else
#include "tap.h"
#include "test_image.h"

/* A valid image with data, its bytes after a clean close. */
/* A valid image to mutate; cb 14: one QEMU made with extended L2
 * entries (16-byte L2 entries with subcluster bitmaps), written through
 * the engine like the others. */
static uint8_t *seed_image(unsigned cb, size_t *len, unsigned long long *rng)
{
	size_t n;
	uint8_t *bytes = cb == 14 ? qemu_bytes("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k %s 4M", &n)
				  : create_bytes(4u << 20, cb, 4, 3, &n);
	struct qcow_io *io = qcow_io_mem_new(bytes, n);
	free(bytes);
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.recycler = false;
	struct qcow_image *img;
	char err[256];
	REQUIRE(qcow_image_open_io(io, &o, &img, err, sizeof(err)) == 0, "open seed: %s", err);
	uint8_t chunk[3000];
	for (int i = 0; i < 40; i++) {
		memset(chunk, i + 1, sizeof(chunk));
		uint64_t off = tap_rand(rng) % ((4u << 20) - sizeof(chunk));
		REQUIRE(qcow_image_write(img, chunk, sizeof(chunk), off) == (ssize_t)sizeof(chunk), "seed write");
	}
	REQUIRE(qcow_image_discard(img, 1u << 20, 256u << 10) == 0, "seed discard");
	REQUIRE(qcow_image_flush(img) == 0 && qcow_image_flush(img) == 0, "seed flush");
	const uint8_t *d = qcow_io_mem_data(img->io, len);
	uint8_t *copy = malloc(*len);
	memcpy(copy, d, *len);
	qcow_image_close(img);
	return copy;
}

/* Writes each seed image, followed by a few operations, as one input. */
static int write_corpus(const char *dir, uint8_t **seeds, const size_t *len, int nseeds)
{
	for (int k = 0; k < nseeds; k++) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/seed-%d", dir, k);
		FILE *f = fopen(path, "wb");
		if (!f)
			return 1;
		uint8_t hdr[4] = { (uint8_t)len[k], (uint8_t)(len[k] >> 8), (uint8_t)(len[k] >> 16), (uint8_t)(len[k] >> 24) };
		static const uint8_t ops[36] = { 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0,   /* write */
						 3, 0, 0x10, 0, 0, 0, 0, 0, 0, 0x20, 0, 0,    /* discard */
						 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 };        /* compact */
		fwrite(hdr, 1, 4, f);
		fwrite(seeds[k], 1, len[k], f);
		fwrite(ops, 1, sizeof(ops), f);
		fclose(f);
	}
	return 0;
}

int main(int argc, char **argv)
{
	qcow_log_set_sink(quiet, NULL);
	const char *env = getenv("FUZZ_ROUNDS");
	unsigned rounds = env ? (unsigned)atoi(env) : 10000;
	unsigned long long rng = 0xf00d;
	size_t len[4];
	static const unsigned cbs[4] = { 9, 12, 16, 14 };
	uint8_t *seeds[4];
	for (int k = 0; k < 4; k++)
		seeds[k] = seed_image(cbs[k], &len[k], &rng);
	if (argc == 3 && !strcmp(argv[1], "--write-corpus")) {
		int ret = write_corpus(argv[2], seeds, len, 4);
		for (int k = 0; k < 4; k++)
			free(seeds[k]);
		return ret;
	}
	unsigned opened = 0, refused = 0, findings = 0;
	for (unsigned r = 0; r < rounds; r++) {
		int k = (int)(tap_rand(&rng) % 4);
		size_t n = len[k];
		size_t nops = 1 + tap_rand(&rng) % 24;
		uint8_t *in = malloc(4 + n + nops * 12);
		in[0] = (uint8_t)n;
		in[1] = (uint8_t)(n >> 8);
		in[2] = (uint8_t)(n >> 16);
		in[3] = (uint8_t)(n >> 24);
		memcpy(in + 4, seeds[k], n);
		uint8_t *img = in + 4;
		/* damage: mostly inside the metadata clusters at the start */
		unsigned flips = 1 + (unsigned)(tap_rand(&rng) % 6);
		size_t meta = (size_t)8 << cbs[k];
		for (unsigned f = 0; f < flips; f++) {
			size_t at = (size_t)(tap_rand(&rng) % (tap_rand(&rng) % 4 ? (meta < n ? meta : n) : n));
			switch (tap_rand(&rng) % 3) {
			case 0: img[at] ^= (uint8_t)(1u << (tap_rand(&rng) % 8)); break;
			case 1: img[at] = (uint8_t)tap_rand(&rng); break;
			default:   /* a plausible but wrong pointer */
				if (at + 8 <= n)
					qcow_put_be64(img + (at & ~7ull), (tap_rand(&rng) % (n * 2)) & ~511ull);
			}
		}
		if (tap_rand(&rng) % 16 == 0)   /* truncated file */
			n = (size_t)(tap_rand(&rng) % n);
		for (size_t i = 0; i < nops * 12; i++)
			in[4 + len[k] + i] = (uint8_t)tap_rand(&rng);
		if (n != len[k]) {
			in[0] = (uint8_t)n;
			in[1] = (uint8_t)(n >> 8);
			in[2] = (uint8_t)(n >> 16);
			in[3] = (uint8_t)(n >> 24);
			memmove(in + 4 + n, in + 4 + len[k], nops * 12);
		}
		struct qcow_io *probe = qcow_io_mem_new(img, n);
		struct qcow_header h;
		char err[256];
		bool header_ok = probe && qcow_header_read(probe, &h, err, sizeof(err)) == 0;
		if (header_ok)
			qcow_header_free(&h);
		qcow_io_close(probe);
		int f = fuzz_one(in, 4 + n + nops * 12);
		CHECK(f == 0, "mutant %u (seed cluster bits %u) is a finding", r, cbs[k]);
		findings += f != 0;
		header_ok ? opened++ : refused++;
		free(in);
	}
	printf("%u mutants: %u with a valid header, %u refused at the header, %u findings\n", rounds, opened, refused,
	       findings);
	for (int k = 0; k < 4; k++)
		free(seeds[k]);
	return tap_done();
}
#endif
