/*
 * test_recycler.c - the recycler thread as users see it (issue 6: items 9,
 * 14, 15 and the table-relocation leak of item 8).
 *
 *  - disk full during compaction: a backend whose copies fail with ENOSPC
 *    (what copying into punched clusters gets on a full host file system).
 *    In 5 s the recycler may try only a few times (exponential back-off),
 *    compactions_done stays 0, compactions_failed counts the failures and
 *    last_error is ENOSPC; when the disk has room again the next automatic
 *    pass works, the error clears, the file shrinks and the close is clean.
 *    A request (qcow_image_compact) does not wait for the back-off.
 *  - the free tail: 8 MiB written into a fresh 64 MiB image and discarded;
 *    within 2 s the file is truncated, without a compaction pass.
 *  - nothing can move (QEMU-made images: compressed clusters after a
 *    discard of the first 40 MiB, clusters shared with an internal
 *    snapshot): once the first pass is over the recycler sleeps: no more
 *    passes and under 5 % of a CPU over 2 s; min_file_size and blocker say
 *    what holds the file.
 *  - a failed first flush while the L1 table moves: a sweep fails each
 *    sync of a compaction that relocates the L1 table, one at a time;
 *    afterwards no cluster may stay PINNED that is not the header or an
 *    L1 or refcount table (before: the new table's clusters leaked).
 * Uses qemu-img (required: nothing may skip in CI).
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- a backend over memory that can be "full" and fail syncs -------------- */

struct tio {
	struct qcow_io io;
	struct qcow_io *inner;
	pthread_mutex_t mu;
	bool full;               /* copies fail with ENOSPC */
	uint64_t copies;         /* copy calls, failed ones included */
	uint64_t flushes;        /* flush calls */
	uint64_t fail_flush_at;  /* this flush call fails once with EIO; 0 never */
	bool fired;
	bool closed;
};

#define TIO(x) ((struct tio *)(x))

static int t_pread(struct qcow_io *io, void *buf, size_t len, uint64_t off)
{
	return TIO(io)->inner->ops->pread(TIO(io)->inner, buf, len, off);
}
static int t_pwrite(struct qcow_io *io, const void *buf, size_t len, uint64_t off)
{
	return TIO(io)->inner->ops->pwrite(TIO(io)->inner, buf, len, off);
}
static int t_flush(struct qcow_io *io)
{
	struct tio *t = TIO(io);
	pthread_mutex_lock(&t->mu);
	bool fail = ++t->flushes == t->fail_flush_at;
	if (fail)
		t->fired = true;
	pthread_mutex_unlock(&t->mu);
	return fail ? -EIO : t->inner->ops->flush(t->inner);
}
static int t_punch(struct qcow_io *io, uint64_t off, uint64_t len)
{
	return TIO(io)->inner->ops->punch(TIO(io)->inner, off, len);
}
static int t_truncate(struct qcow_io *io, uint64_t size) { return TIO(io)->inner->ops->truncate(TIO(io)->inner, size); }
static int64_t t_size(struct qcow_io *io) { return TIO(io)->inner->ops->size(TIO(io)->inner); }
static int64_t t_allocated(struct qcow_io *io) { return TIO(io)->inner->ops->allocated(TIO(io)->inner); }
static int t_copy(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len)
{
	struct tio *t = TIO(io);
	pthread_mutex_lock(&t->mu);
	t->copies++;
	bool full = t->full;
	pthread_mutex_unlock(&t->mu);
	return full ? -ENOSPC : t->inner->ops->copy(t->inner, src, dst, len);
}
static void t_close(struct qcow_io *io) { TIO(io)->closed = true; }

static const struct qcow_io_ops tio_ops = {
	.pread = t_pread, .pwrite = t_pwrite, .flush = t_flush, .punch = t_punch, .truncate = t_truncate,
	.size = t_size, .allocated = t_allocated, .copy = t_copy, .lock = NULL, .close = t_close,
};

static struct tio *tio_new(const uint8_t *bytes, size_t len)
{
	struct tio *t = calloc(1, sizeof(*t));
	REQUIRE(t, "calloc");
	t->inner = qcow_io_mem_new(bytes, len);
	REQUIRE(t->inner, "qcow_io_mem_new");
	pthread_mutex_init(&t->mu, NULL);
	t->io.ops = &tio_ops;
	t->io.name = "test image";
	return t;
}

static void tio_free(struct tio *t)
{
	qcow_io_close(t->inner);
	pthread_mutex_destroy(&t->mu);
	free(t);
}

static void tio_set_full(struct tio *t, bool full)
{
	pthread_mutex_lock(&t->mu);
	t->full = full;
	pthread_mutex_unlock(&t->mu);
}

static uint64_t tio_copies(struct tio *t)
{
	pthread_mutex_lock(&t->mu);
	uint64_t n = t->copies;
	pthread_mutex_unlock(&t->mu);
	return n;
}

static struct qcow_image *open_io(struct qcow_io *io, const struct qcow_open_opts *o)
{
	struct qcow_image *img;
	char err[256];
	int ret = qcow_image_open_io(io, o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "open: %s (%d)", err, ret);
	return img;
}

static void stats(struct qcow_image *img, struct qcow_stats *st) { qcow_image_get_stats(img, st); }

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

static double cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* qcow_check of the bytes of a closed image: no errors, no leaks. */
static void check_bytes(struct qcow_io *mem, const char *what)
{
	size_t len;
	const uint8_t *b = qcow_io_mem_data(mem, &len);
	char path[] = "/tmp/qcow-recycler-XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0, "mkstemp");
	REQUIRE(write(fd, b, len) == (ssize_t)len, "write %s", path);
	close(fd);
	struct qcow_check_result r;
	char err[256];
	int ret = qcow_check(path, &r, err, sizeof(err));
	CHECK(ret == 0 && r.errors == 0 && r.leaks == 0, "%s: qcow_check: ret %d (%s), %llu errors, %llu leaks", what, ret,
	      ret ? err : "", (unsigned long long)r.errors, (unsigned long long)r.leaks);
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s' >/dev/null 2>&1", path);
	CHECK(system(cmd) == 0, "%s: qemu-img check is not clean", what);
	unlink(path);
}

static void fill(uint8_t *buf, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)(i * 31 + seed * 7 + (i >> 12));
}

/* ---- disk full during compaction (item 9) ---------------------------------- */

static void test_disk_full(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(64ull << 20, 16, 4, 3, &len);
	struct tio *t = tio_new(bytes, len);
	free(bytes);
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.compact_threshold_bytes = 1u << 20;
	o.compact_quiet_ms = 50;
	struct qcow_image *img = open_io(&t->io, &o);

	size_t n = 8u << 20;
	uint8_t *buf = malloc(n), *back = malloc(n);
	REQUIRE(buf && back, "malloc");
	fill(buf, n, 1);
	REQUIRE(qcow_image_write(img, buf, n, 0) == (ssize_t)n, "write");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	/* the first 6 MiB free low clusters; the last 2 MiB must move down */
	tio_set_full(t, true);
	REQUIRE(qcow_image_discard(img, 0, 6u << 20) == 0, "discard");
	uint64_t c0 = tio_copies(t);
	sleep_ms(5000);
	struct qcow_stats st;
	stats(img, &st);
	uint64_t tries = tio_copies(t) - c0;
	printf("# disk full for 5 s: %llu copy attempts, %llu compactions done, %llu failed, last_error %d\n",
	       (unsigned long long)tries, (unsigned long long)st.compactions_done,
	       (unsigned long long)st.compactions_failed, st.last_error);
	CHECK(tries >= 1 && tries <= 5, "%llu copy attempts in 5 s of a full disk (back-off 1, 2, 4 s allows 3)",
	      (unsigned long long)tries);
	CHECK(st.compactions_done == 0, "compactions_done %llu counts failed passes", (unsigned long long)st.compactions_done);
	CHECK(st.compactions_failed >= 1 && st.compactions_failed <= 5, "compactions_failed %llu",
	      (unsigned long long)st.compactions_failed);
	CHECK(st.last_error == -ENOSPC, "last_error %d, want %d", st.last_error, -ENOSPC);
	CHECK(!st.failed, "a full disk during compaction must not fail the engine");
	uint64_t size_full = st.file_size;

	/* room again: the next automatic pass works, within the back-off */
	tio_set_full(t, false);
	bool ok = false;
	for (int i = 0; i < 200 && !ok; i++) {
		sleep_ms(100);
		stats(img, &st);
		ok = st.compactions_done >= 1 && !st.compacting;
	}
	CHECK(ok, "no successful pass within 20 s after the disk got room (failed %llu)", (unsigned long long)st.compactions_failed);
	stats(img, &st);
	CHECK(st.last_error == 0, "last_error %d after a successful pass", st.last_error);
	CHECK(st.file_size < size_full / 2, "file %llu bytes, was %llu", (unsigned long long)st.file_size,
	      (unsigned long long)size_full);
	REQUIRE(qcow_image_read(img, back, 2u << 20, 6u << 20) == (ssize_t)(2u << 20), "read");
	CHECK(memcmp(back, buf + (6u << 20), 2u << 20) == 0, "data moved by the compaction changed");

	/* full again, then a request: it runs at once, back-off or not */
	tio_set_full(t, true);
	REQUIRE(qcow_image_write(img, buf, 4u << 20, 16u << 20) == (ssize_t)(4u << 20), "write 2");
	REQUIRE(qcow_image_discard(img, 0, 2u << 20) == 0, "discard 2");  /* the moved data */
	sleep_ms(3500);
	stats(img, &st);
	uint64_t failed = st.compactions_failed;
	CHECK(failed >= 2, "compactions_failed %llu: the second full period failed nothing", (unsigned long long)failed);
	tio_set_full(t, false);
	uint64_t t0 = qcow_now_ms();
	int ret = qcow_image_compact(img, NULL, NULL);
	uint64_t took = qcow_now_ms() - t0;
	CHECK(ret == 0, "requested compaction after the disk got room: %d", ret);
	CHECK(took < 3000, "the request waited %llu ms (for the back-off?)", (unsigned long long)took);
	REQUIRE(qcow_image_read(img, back, 4u << 20, 16u << 20) == (ssize_t)(4u << 20), "read 2");
	CHECK(memcmp(back, buf, 4u << 20) == 0, "data of the second write changed");
	stats(img, &st);
	CHECK(st.last_error == 0, "last_error %d after the requested pass", st.last_error);

	CHECK(qcow_image_close(img) == 0, "close after the fault cleared is not clean");
	CHECK(t->closed, "backend not closed");
	check_bytes(t->inner, "disk full");
	tio_free(t);
	free(buf);
	free(back);
}

/* ---- the free tail is given back (item 15) -------------------------------- */

/* A fresh 64 MiB image with 64 KiB clusters on a recording backend,
 * opened with o (the recycler running unless o says otherwise). */
static struct qcow_image *open_fresh(struct tio **t, const struct qcow_open_opts *o)
{
	size_t len;
	uint8_t *bytes = create_bytes(64ull << 20, 16, 4, 3, &len);
	*t = tio_new(bytes, len);
	free(bytes);
	return open_io(&(*t)->io, o);
}

static void test_free_tail(void)
{
	struct tio *t;
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;   /* default threshold and quiet period */
	struct qcow_image *img = open_fresh(&t, &o);
	size_t n = 8u << 20;
	uint8_t *buf = malloc(n);
	REQUIRE(buf, "malloc");
	fill(buf, n, 2);
	REQUIRE(qcow_image_write(img, buf, n, 0) == (ssize_t)n, "write");
	REQUIRE(qcow_image_flush(img) == 0, "flush");
	struct qcow_stats st;
	stats(img, &st);
	uint64_t before = st.file_size;
	REQUIRE(qcow_image_discard(img, 0, n) == 0, "discard");
	uint64_t t0 = qcow_now_ms(), took = 0;
	for (;;) {
		stats(img, &st);
		took = qcow_now_ms() - t0;
		if (st.file_size < (1u << 20) || took > 5000)
			break;
		sleep_ms(50);
	}
	printf("# free tail: file %llu -> %llu bytes in %llu ms, %llu compactions\n", (unsigned long long)before,
	       (unsigned long long)st.file_size, (unsigned long long)took, (unsigned long long)st.compactions_done);
	CHECK(st.file_size < (1u << 20) && took <= 2000, "the free tail was not truncated within 2 s: %llu bytes after %llu ms",
	      (unsigned long long)st.file_size, (unsigned long long)took);
	CHECK(st.compactions_done == 0, "a free tail alone ran %llu compaction passes", (unsigned long long)st.compactions_done);
	CHECK(qcow_image_close(img) == 0, "close");
	check_bytes(t->inner, "free tail");
	tio_free(t);
	free(buf);
}

/* A growing file keeps the headroom it grew by: with no discard, the
 * recycler must not truncate the free tail a sequential writer is about to
 * fill (it did, every round: each chunk then waited for a truncation and
 * grew the file again, and sequential writes on a fresh image ran at a
 * third of their speed). */
static void test_growth_headroom(void)
{
	struct tio *t;
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.compact_quiet_ms = 50;   /* the recycler looks often */
	o.compact_threshold_bytes = 64 << 10;   /* any headroom would be worth a trim */
	struct qcow_image *img = open_fresh(&t, &o);
	size_t n = 1u << 20;
	uint8_t *buf = malloc(n);
	REQUIRE(buf, "malloc");
	fill(buf, n, 3);
	for (unsigned i = 0; i < 12; i++) {
		REQUIRE(qcow_image_write(img, buf, n, (uint64_t)i * n) == (ssize_t)n, "write MiB %u", i);
		sleep_ms(150);
	}
	struct qcow_stats st;
	stats(img, &st);
	CHECK(st.bytes_reclaimed == 0, "with no discard the recycler truncated %llu bytes of a growing file's headroom",
	      (unsigned long long)st.bytes_reclaimed);
	CHECK(qcow_image_close(img) == 0, "close");
	tio_free(t);
	free(buf);
}

/* ---- nothing can move: the recycler sleeps (item 14) ----------------------- */

static void run(const char *cmd)
{
	char full[1024];
	snprintf(full, sizeof(full), "%s >/dev/null 2>&1", cmd);
	REQUIRE(system(full) == 0, "%s", cmd);
}

/* Opens the image, discards discard_len bytes from 0 (and with pin_last
 * pins the last data cluster, as if it could not move), lets compaction
 * settle, then checks that an idle recycler does not spin; with a
 * blocker_prefix the file must stay above its minimum and the blocker
 * say why, without one it must reach the minimum. */
static uint64_t last_streams_repacked;   /* by the last idle_image's live open */

static void idle_image(const char *path, const char *what, const char *blocker_prefix, uint64_t discard_len,
		       bool pin_last)
{
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.compact_quiet_ms = 100;
	struct qcow_image *img;
	char err[256];
	int ret = qcow_image_open(path, &o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "%s: open: %s", what, err);
	if (pin_last) {
		pthread_mutex_lock(&img->lock);
		uint64_t c = qcow_map_highest_movable(&img->map, img->map.nclusters);
		REQUIRE(c != UINT64_MAX, "%s: a movable cluster to pin", what);
		qcow_map_set_pinned(&img->map, c, 1);
		pthread_mutex_unlock(&img->lock);
	}
	if (discard_len)
		REQUIRE(qcow_image_discard(img, 0, discard_len) == 0, "%s: discard", what);
	/* let the first passes run */
	struct qcow_stats st;
	for (int i = 0; i < 50; i++) {
		sleep_ms(100);
		stats(img, &st);
		if (st.compactions_done >= 1 && !st.compacting && st.clusters_junk == 0 && st.clusters_erased == 0)
			break;
	}
	sleep_ms(1500);
	stats(img, &st);
	uint64_t done0 = st.compactions_done;
	double cpu0 = cpu_seconds();
	uint64_t t0 = qcow_now_ms();
	sleep_ms(2000);
	double cpu = cpu_seconds() - cpu0;
	double wall = (double)(qcow_now_ms() - t0) / 1000.0;
	stats(img, &st);
	printf("# %s: %llu passes in %.1f s idle, CPU %.1f %%, file %llu, min %llu, blocker \"%s\"\n", what,
	       (unsigned long long)(st.compactions_done - done0), wall, 100.0 * cpu / wall,
	       (unsigned long long)st.file_size, (unsigned long long)st.min_file_size, st.blocker);
	CHECK(st.compactions_done == done0, "%s: %llu compaction passes while idle", what,
	      (unsigned long long)(st.compactions_done - done0));
	CHECK(cpu / wall < 0.05, "%s: an idle recycler used %.1f %% of a CPU", what, 100.0 * cpu / wall);
	if (blocker_prefix) {
		CHECK(st.min_file_size > 0 && st.min_file_size < st.file_size, "%s: min_file_size %llu, file %llu", what,
		      (unsigned long long)st.min_file_size, (unsigned long long)st.file_size);
		CHECK(strncmp(st.blocker, blocker_prefix, strlen(blocker_prefix)) == 0, "%s: blocker \"%s\", want \"%s...\"",
		      what, st.blocker, blocker_prefix);
	} else {
		CHECK(st.min_file_size > 0 && st.file_size == st.min_file_size && !st.blocker[0],
		      "%s: compaction reached the minimum: file %llu, min %llu, blocker \"%s\"", what,
		      (unsigned long long)st.file_size, (unsigned long long)st.min_file_size, st.blocker);
	}
	last_streams_repacked = st.streams_repacked;
	CHECK(qcow_image_close(img) == 0, "%s: close", what);
	if (pin_last)
		return;   /* the pin lived in that open only */

	/* offline (qcowctl compact): the pass ends and says the same */
	o.recycler = false;
	ret = qcow_image_open(path, &o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "%s: open offline: %s", what, err);
	CHECK(qcow_image_compact(img, NULL, NULL) == 0, "%s: offline compaction", what);
	stats(img, &st);
	CHECK(st.compactions_done == 1 && st.compactions_failed == 0, "%s: offline: %llu done, %llu failed", what,
	      (unsigned long long)st.compactions_done, (unsigned long long)st.compactions_failed);
	CHECK(st.file_size == st.min_file_size && !st.blocker[0], "%s: offline: blocker \"%s\", min %llu, file %llu", what,
	      st.blocker, (unsigned long long)st.min_file_size, (unsigned long long)st.file_size);
	CHECK(qcow_image_close(img) == 0, "%s: close offline", what);
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s' >/dev/null 2>&1", path);
	CHECK(system(cmd) == 0, "%s: qemu-img check is not clean after close", what);
}

/* Every cluster moves now (issue 7): a snapshot image and a compressed
 * image compact down to the clusters in use, byte-exact, and then the
 * recycler sleeps; a cluster that cannot move (pinned here by hand) is
 * named, and the recycler sleeps too. */
static void test_minimum_then_idle(void)
{
	char dir[] = "/tmp/qcow-recycler-XXXXXX";
	REQUIRE(mkdtemp(dir), "mkdtemp");
	char cmd[4096], path[512], raw[512], ref[512];

	/* clusters shared with an internal snapshot */
	snprintf(path, sizeof(path), "%s/sn.qcow2", dir);
	snprintf(ref, sizeof(ref), "%s/s1.raw", dir);
	snprintf(raw, sizeof(raw), "%s/s1-after.raw", dir);
	snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 '%s' 64M", path);
	run(cmd);
	snprintf(cmd, sizeof(cmd), "qemu-io -f qcow2 -c 'write -P 1 40M 20M' -c 'write -P 2 20M 20M' -c 'discard 40M 20M' '%s'", path);
	run(cmd);
	snprintf(cmd, sizeof(cmd), "qemu-img snapshot -c s1 '%s' && qemu-img convert -O raw -l snapshot.name=s1 '%s' '%s'", path,
		 path, ref);
	run(cmd);
	idle_image(path, "snapshot image", NULL, 0, false);
	snprintf(cmd, sizeof(cmd), "qemu-img convert -O raw -l snapshot.name=s1 '%s' '%s' && cmp -s '%s' '%s'", path, raw, ref,
		 raw);
	CHECK(system(cmd) == 0, "snapshot image: the snapshot reads the same after compaction");

	/* compressed clusters: half-random data compresses to about half */
	snprintf(raw, sizeof(raw), "%s/src.raw", dir);
	FILE *f = fopen(raw, "wb");
	REQUIRE(f, "fopen %s", raw);
	unsigned long long s = 0x5eed;
	uint8_t block[4096];
	for (int i = 0; i < (64 << 20) / 4096; i++) {
		memset(block, 0, sizeof(block));
		for (int k = 0; k < 2048; k += 8) {
			unsigned long long r = tap_rand(&s);
			memcpy(block + k, &r, 8);
		}
		REQUIRE(fwrite(block, 1, sizeof(block), f) == sizeof(block), "fwrite");
	}
	fclose(f);
	snprintf(path, sizeof(path), "%s/c.qcow2", dir);
	snprintf(cmd, sizeof(cmd), "qemu-img convert -c -f raw -O qcow2 '%s' '%s'", raw, path);
	run(cmd);
	idle_image(path, "compressed image", NULL, 40ull << 20, false);
	CHECK(last_streams_repacked > 0, "compressed image: the stats count the repacked streams (%llu)",
	      (unsigned long long)last_streams_repacked);
	/* what is left reads as before: the discarded part zero */
	snprintf(cmd, sizeof(cmd), "dd if=/dev/zero of='%s' bs=1M count=40 conv=notrunc status=none && "
		 "qemu-img convert -O raw '%s' '%s/c.raw' && cmp -s '%s' '%s/c.raw'", raw, path, dir, raw, dir);
	CHECK(system(cmd) == 0, "compressed image: the streams read the same after they moved");

	/* a cluster that cannot move: named, and the recycler still sleeps */
	snprintf(path, sizeof(path), "%s/p.qcow2", dir);
	snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 '%s' 64M && qemu-io -f qcow2 -c 'write -P 3 0 64M' '%s'", path,
		 path);
	run(cmd);
	idle_image(path, "pinned cluster", "data cluster at 0x", 40ull << 20, true);

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	run(cmd);
}

/* ---- a failed first flush while the L1 table moves (item 8) -------------- */

/* An image whose L1 table lies at the end of the file, above data that a
 * discard frees: 512-byte clusters, 1 MiB grown to 4 MiB (the L1 table
 * outgrows its cluster and moves to the end), 256 KiB of data. */
static uint8_t *relocation_image(size_t *len)
{
	uint8_t *bytes = create_bytes(1u << 20, 9, 4, 3, len);
	struct tio *t = tio_new(bytes, *len);
	free(bytes);
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.recycler = false;
	struct qcow_image *img = open_io(&t->io, &o);
	uint8_t buf[4096];
	fill(buf, sizeof(buf), 3);
	for (uint64_t off = 0; off < (256u << 10); off += sizeof(buf))
		REQUIRE(qcow_image_write(img, buf, sizeof(buf), off) == (ssize_t)sizeof(buf), "write");
	REQUIRE(qcow_image_resize(img, 4u << 20) == 0, "resize");
	REQUIRE(qcow_image_write(img, buf, sizeof(buf), (4u << 20) - sizeof(buf)) == (ssize_t)sizeof(buf), "write end");
	REQUIRE(qcow_image_close(img) == 0, "close");
	const uint8_t *b = qcow_io_mem_data(t->inner, len);
	uint8_t *copy = malloc(*len);
	REQUIRE(copy, "malloc");
	memcpy(copy, b, *len);
	tio_free(t);
	return copy;
}

static bool in_range(uint64_t c, uint64_t off, uint64_t clusters, unsigned bits)
{
	return c >= off >> bits && c < (off >> bits) + clusters;
}

static void test_relocation_leak(void)
{
	size_t len;
	uint8_t *bytes = relocation_image(&len);
	unsigned swept = 0;
	bool relocated_clean = false, any_fired = true;
	for (uint64_t k = 1; any_fired && k < 400; k++) {
		struct tio *t = tio_new(bytes, len);
		struct qcow_open_opts o;
		qcow_open_opts_default(&o);
		o.no_locking = true;
		o.recycler = false;
		struct qcow_image *img = open_io(&t->io, &o);
		unsigned bits = img->cluster_bits;
		uint64_t cs = img->cluster_size;
		uint64_t l1_0 = img->hdr.l1_table_offset, rt_0 = img->hdr.refcount_table_offset;
		uint64_t l1_n = ((uint64_t)img->hdr.l1_size * 8 + cs - 1) / cs, rt_n = img->hdr.refcount_table_clusters;
		REQUIRE(qcow_image_discard(img, 0, 256u << 10) == 0, "discard");
		pthread_mutex_lock(&t->mu);
		t->fail_flush_at = t->flushes + k;
		t->fired = false;
		pthread_mutex_unlock(&t->mu);
		int ret = qcow_image_compact(img, NULL, NULL);
		pthread_mutex_lock(&t->mu);
		any_fired = t->fired;
		t->fail_flush_at = 0;
		pthread_mutex_unlock(&t->mu);
		if (!any_fired) {
			CHECK(ret == 0, "compaction without a fault: %d", ret);
			relocated_clean = img->hdr.l1_table_offset < l1_0;
		}
		/* a failed sync puts the engine in the failed state (the kernel
		 * may have dropped what it could not write): then every later
		 * flush must fail too; otherwise the next flush must work */
		int fr = qcow_image_flush(img);
		struct qcow_stats st;
		qcow_image_get_stats(img, &st);
		CHECK(st.failed ? fr < 0 : fr == 0, "sync %llu failed: the next flush returns %d (failed state: %d)",
		      (unsigned long long)k, fr, st.failed);
		/* every PINNED cluster is the header, or the L1 or refcount
		 * table now or before the compaction (a failed header switch
		 * keeps both) */
		uint64_t l1 = img->hdr.l1_table_offset, rt = img->hdr.refcount_table_offset;
		uint64_t stray = UINT64_MAX;
		for (uint64_t c = 1; c < img->map.nclusters && stray == UINT64_MAX; c++)
			if (qcow_map_state(&img->map, c) == QCS_PINNED && !in_range(c, l1, l1_n, bits) &&
			    !in_range(c, rt, img->hdr.refcount_table_clusters, bits) && !in_range(c, l1_0, l1_n, bits) &&
			    !in_range(c, rt_0, rt_n, bits))
				stray = c;
		CHECK(stray == UINT64_MAX, "sync %llu of the compaction failed (%d): cluster %llu (0x%llx) stays PINNED, leaked",
		      (unsigned long long)k, ret, (unsigned long long)stray, (unsigned long long)(stray << bits));
		CHECK(qcow_image_close(img) == 0 || any_fired, "close");
		tio_free(t);
		swept++;
	}
	printf("# relocation sweep: %u runs\n", swept);
	CHECK(relocated_clean, "setup: the compaction without a fault did not move the L1 table down");
	free(bytes);
}

int main(void)
{
	REQUIRE(system("qemu-img --version >/dev/null 2>&1") == 0, "qemu-img is needed (install qemu-utils)");
	test_relocation_leak();
	test_free_tail();
	test_growth_headroom();
	test_minimum_then_idle();
	test_disk_full();
	return tap_done();
}
