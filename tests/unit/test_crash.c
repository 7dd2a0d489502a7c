/*
 * test_crash.c - crash simulation: power loss at any point, including
 * inside every state of a cluster move.
 *
 * Each round creates a small image on the crash-simulator backend, runs
 * random writes, discards, flushes and compactions, and kills the disk
 * after a random number of writes (so the crash lands in the middle of an
 * operation: a copy, a flush step, a pointer rewrite, a truncation).  The
 * simulator then keeps a random subset of the unflushed writes, each torn
 * at 512 bytes.  The crashed image must
 *   - open (the map builds; refcounts are repaired if needed),
 *   - pass qcow_check with no errors (leaks are allowed), and qemu-img
 *     check with no corruption on some rounds,
 *   - show, for every 512-byte sector not written since the last completed
 *     flush, exactly the data of that flush.
 * CRASH_ROUNDS (env) sets the number of rounds (default 1500).
 *
 * The same rounds run on images QEMU made with internal snapshots and with
 * compressed clusters (QEMU_CRASH_ROUNDS, default 200), where compaction
 * moves clusters that several pointers share and repacks compressed
 * streams; every snapshot must still read exactly what QEMU wrote.
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned long long seed = 0xc0ffee;
static unsigned move_states_hit[4];
static unsigned repack_phases_hit;   /* of those, inside a stream repack */

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque) {}

/* qcow_create syncs: make each kind of image once and copy it */
static struct template { uint64_t size; unsigned cb, order; uint8_t *bytes; size_t len; } templates[32];

static uint8_t *image_bytes(uint64_t size, unsigned cb, unsigned order, size_t *len)
{
	struct template *t = NULL;
	for (unsigned i = 0; i < 32 && !t; i++)
		if (!templates[i].bytes || (templates[i].size == size && templates[i].cb == cb && templates[i].order == order))
			t = &templates[i];
	REQUIRE(t, "template table full");
	if (!t->bytes) {
		t->bytes = create_bytes(size, cb, order, 3, &t->len);
		t->size = size;
		t->cb = cb;
		t->order = order;
	}
	uint8_t *copy = qcow_malloc(t->len);
	memcpy(copy, t->bytes, t->len);
	*len = t->len;
	return copy;
}

/* The raw backing file of the round (NULL: none): every open of the
 * round's image, before and after the crash, reads through a copy. */
static const uint8_t *round_backing;
static size_t round_backing_len;

static struct qcow_image *open_io(struct qcow_io *io, char *err, size_t errlen, int *ret)
{
	struct qcow_open_opts o;
	test_open_opts(&o, 32 * 1024);
	struct qcow_image *img = NULL;
	struct qcow_backing *b = round_backing ? test_raw_backing(round_backing, round_backing_len) : NULL;
	*ret = qcow_image_open_io_backing(io, &o, b, &img, err, errlen);
	if (*ret)
		qcow_backing_free(b);
	return img;
}

/* Arms the dying disk at a chosen move phase, so crashes land inside
 * every state of the move state machine, not only where writes are
 * dense. */
struct phase_arm {
	struct qcow_io *io;
	int target;        /* phase to arm at, -1 = none */
	bool fired;
	uint64_t after;    /* writes the disk survives once armed */
	bool repack_only;  /* arm only inside a stream repack */
};

static void on_phase(struct qcow_image *img, enum qcow_move_state reached, void *opaque)
{
	struct phase_arm *a = opaque;
	if (a->fired || (int)reached != a->target || (img->map.nmoves_active == 0 && !img->repacking) ||
	    (a->repack_only && !img->repacking))
		return;
	if (img->repacking)
		repack_phases_hit++;
	a->fired = true;
	move_states_hit[reached]++;
	qcow_io_crash_die_after(a->io, a->after);
}

/* Crashes the simulated disk under img and checks what it kept: the
 * bytes check without errors (inspect, if given, looks at them too), the
 * image opens, every sector not written since the last completed flush
 * reads as that flush left it, and the rebuilt map is consistent. */
static void crash_and_verify(struct qcow_io *io, struct qcow_image *img, const struct crash_model *m, bool with_qemu,
			     const char *what, void (*inspect)(const uint8_t *, size_t, void *), void *opaque)
{
	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(&seed));
	REQUIRE(after, "crash");
	qcow_image_close(img);   /* the dead disk refuses everything; this only frees */
	size_t alen;
	const uint8_t *abytes = qcow_io_mem_data(after, &alen);
	crash_check_bytes(abytes, alen, with_qemu, what);
	if (inspect)
		inspect(abytes, alen, opaque);
	char err[256];
	int ret;
	struct qcow_image *img2 = open_io(after, err, sizeof(err), &ret);
	CHECK(img2 != NULL, "%s: crashed image does not open: %s", what, err);
	if (!img2) {
		qcow_io_close(after);
		return;
	}
	uint64_t bad = crash_model_verify(img2, m, what);
	CHECK(bad == 0, "%s: %llu flushed sectors differ after the crash", what, (unsigned long long)bad);
	pthread_mutex_lock(&img2->lock);
	const char *inv = qcow_map_check(&img2->map);
	pthread_mutex_unlock(&img2->lock);
	CHECK(!inv, "%s: map after reopen: %s", what, inv);
	CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
}

static void one_round(unsigned round)
{
	static const unsigned cbs[] = { 9, 12, 16 };
	unsigned cb = cbs[tap_rand(&seed) % 3];
	unsigned order = (unsigned)(tap_rand(&seed) % 4 == 0 ? tap_rand(&seed) % 7 : 4);
	uint64_t cs = 1ull << cb;
	uint64_t size = cb == 9 ? (512u << 10) : cb == 12 ? (2u << 20) : (8u << 20);
	size_t len;
	uint8_t *bytes = image_bytes(size, cb, order, &len);
	struct qcow_io *io = qcow_io_crash_new(bytes, len);
	qcow_free(bytes);
	/* every third round the image has a raw backing file (sometimes
	 * shorter than the disk: the rest reads zeros): reads fall through,
	 * partial writes fill from it, discards must keep it from showing */
	uint8_t *backing = NULL;
	if (round % 3 == 1) {
		round_backing_len = tap_rand(&seed) % 2 ? size : (size_t)(tap_rand(&seed) % size) & ~511ul;
		backing = qcow_malloc(size);
		REQUIRE(backing, "backing");
		memset(backing, 0, size);
		for (size_t i = 0; i < round_backing_len; i += 8) {
			uint64_t v = tap_rand(&seed);
			memcpy(backing + i, &v, 8);
		}
		round_backing = backing;
	}
	char err[256];
	int ret;
	struct qcow_image *img = open_io(io, err, sizeof(err), &ret);
	REQUIRE(img, "round %u: open fresh image: %s", round, err);

	struct crash_model m;
	crash_model_init(&m, size, backing);
	uint8_t *buf = qcow_malloc(8 * cs + 512);

	/* half the rounds crash after a random number of writes, the other
	 * half a few writes after a chosen move phase */
	unsigned ops = 5 + (unsigned)(tap_rand(&seed) % 40);
	uint64_t die_at = 1 + tap_rand(&seed) % 300;
	bool by_phase = tap_rand(&seed) & 1;
	struct phase_arm arm = { .io = io, .target = -1, .after = 1 + tap_rand(&seed) % 6 };
	if (by_phase) {
		static const int phases[] = { QMOVE_COPIED, QMOVE_FLUSHED, QMOVE_REFERENCED };
		arm.target = phases[tap_rand(&seed) % 3];
		img->move_phase_hook = on_phase;
		img->move_phase_opaque = &arm;
	}
	bool armed = by_phase;
	for (unsigned op = 0; op < ops + 40; op++) {
		if (op == ops / 2 && !armed) {
			qcow_io_crash_die_after(io, die_at);
			armed = true;
		}
		unsigned kind = (unsigned)(tap_rand(&seed) % 100);
		uint64_t off = tap_rand(&seed) % size;
		uint64_t n = 1 + tap_rand(&seed) % (4 * cs);
		if (n > size - off)
			n = size - off;
		enum crash_guest_op what = kind < 45 ? CRASH_WRITE : kind < 65 ? CRASH_DISCARD : kind < 85 ? CRASH_FLUSH : CRASH_COMPACT;
		for (uint64_t i = 0; what == CRASH_WRITE && i < n; i++)
			buf[i] = (uint8_t)tap_rand(&seed);
		if (!crash_model_do(img, &m, what, buf, off, n))
			break;
	}
	char what[64];
	snprintf(what, sizeof(what), "round %u (cluster size %llu%s)", round, (unsigned long long)cs,
		 backing ? ", backing file" : "");
	crash_and_verify(io, img, &m, round % 150 == 0, what, NULL, NULL);
	crash_model_free(&m);
	qcow_free(buf);
	round_backing = NULL;
	qcow_free(backing);
}

/* ---- a replaced cluster survives until its replacement is durable ----
 *
 * A partial write into a compressed cluster (made by qemu-img convert -c)
 * links a new cluster and releases the compressed host clusters.  Until
 * the next flush, the durable L2 entry still points at the compressed
 * data; if the eraser punched those clusters first (they used to become
 * Junk at once), a crash before the flush left the guest cluster reading
 * garbage - losing the unwritten, long durable rest of the cluster.  The
 * disk dies after k writes of an erase-and-flush (qcow_image_compact
 * erases first), for every k until it completes. */
static void replaced_clusters(void)
{
	const unsigned cb = 16;
	const uint64_t cs = 1ull << cb, size = 8 * cs;
	if (access("/usr/bin/qemu-img", X_OK) != 0) {
		CHECK(getenv("CI") == NULL || strcmp(getenv("CI"), "true") != 0, "qemu-img missing in CI");
		printf("# replaced clusters: qemu-img missing, skipped\n");
		return;
	}
	char raw[] = "/tmp/qcow-craw-XXXXXX", img_path[] = "/tmp/qcow-cimg-XXXXXX";
	int fd = mkstemp(raw);
	REQUIRE(fd >= 0, "mkstemp");
	uint8_t *old = qcow_malloc(size);
	for (uint64_t i = 0; i < size; i++)
		old[i] = (uint8_t)('a' + (tap_rand(&seed) & 15));   /* compresses to about half */
	REQUIRE(write(fd, old, size) == (ssize_t)size, "write raw");
	close(fd);
	fd = mkstemp(img_path);
	REQUIRE(fd >= 0, "mkstemp");
	close(fd);
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "qemu-img convert -c -f raw -O qcow2 -o cluster_size=%llu %s %s >/dev/null 2>&1",
		 (unsigned long long)cs, raw, img_path);
	REQUIRE(system(cmd) == 0, "qemu-img convert -c");
	unlink(raw);
	FILE *f = fopen(img_path, "rb");
	REQUIRE(f, "open %s", img_path);
	uint8_t *bytes = qcow_malloc(size * 2);
	size_t len = fread(bytes, 1, size * 2, f);
	fclose(f);
	unlink(img_path);

	uint8_t piece[512], *got = qcow_malloc(size);
	memset(piece, 'X', sizeof(piece));
	bool completed = false;
	unsigned crashes = 0;
	for (uint64_t k = 1; k < 400 && !completed; k++) {
		for (uint64_t crash_seed = 0; crash_seed < 3; crash_seed++) {
			struct qcow_io *io = qcow_io_crash_new(bytes, len);
			char err[256];
			int ret;
			struct qcow_image *img = open_io(io, err, sizeof(err), &ret);
			REQUIRE(img, "open the compressed image: %s", err);
			for (uint64_t gc = 0; gc < size / cs; gc++)
				REQUIRE(qcow_image_write(img, piece, sizeof(piece), gc * cs + 1024) == (ssize_t)sizeof(piece),
					"partial write into compressed cluster %llu", (unsigned long long)gc);
			qcow_io_crash_die_after(io, k);
			ret = qcow_image_compact(img, NULL, NULL);
			if (ret == 0) {
				completed = true;
				qcow_image_close(img);
				break;
			}
			crashes++;
			struct qcow_io *after = qcow_io_crash_crash(io, crash_seed);
			qcow_image_close(img);   /* the dead disk refuses everything; this only frees */
			struct qcow_image *again = open_io(after, err, sizeof(err), &ret);
			CHECK(again != NULL, "k=%llu: reopen after the crash: %s", (unsigned long long)k, err);
			if (!again) {
				qcow_io_close(after);
				continue;
			}
			ssize_t r = qcow_image_read(again, got, size, 0);
			CHECK(r == (ssize_t)size, "k=%llu seed %llu: read after the crash: %zd", (unsigned long long)k,
			      (unsigned long long)crash_seed, r);
			for (uint64_t gc = 0; r == (ssize_t)size && gc < size / cs; gc++) {
				const uint8_t *g = got + gc * cs, *o = old + gc * cs;
				bool rest_ok = memcmp(g, o, 1024) == 0 && memcmp(g + 1536, o + 1536, cs - 1536) == 0;
				bool piece_ok = memcmp(g + 1024, o + 1024, 512) == 0 || memcmp(g + 1024, piece, 512) == 0;
				CHECK(rest_ok && piece_ok, "k=%llu seed %llu: guest cluster %llu lost data it held before the write",
				      (unsigned long long)k, (unsigned long long)crash_seed, (unsigned long long)gc);
			}
			qcow_image_close(again);
		}
	}
	CHECK(completed, "the erase-and-flush completed for some k");
	printf("# replaced clusters: %u crashes inside erase-and-flush checked\n", crashes);
	qcow_free(bytes);
	qcow_free(old);
	qcow_free(got);
}

/* ---- crashes while shared clusters move and streams are repacked ----
 * (QEMU images: internal snapshots, deflate and zstd compressed streams) */

struct qimage {
	const char *name;
	uint8_t *bytes;          /* the image as QEMU left it */
	size_t len;
	uint64_t size, cs;
	uint8_t *active;         /* its active disk */
	char snap_raw[2][64];    /* its snapshots' disks, as files */
	unsigned nsnap;
};

static uint8_t *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	REQUIRE(f, "open %s", path);
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	uint8_t *b = qcow_malloc(n ? (size_t)n : 1);
	REQUIRE(fread(b, 1, (size_t)n, f) == (size_t)n, "read %s", path);
	fclose(f);
	*len = (size_t)n;
	return b;
}

static void sh(const char *cmd)
{
	char full[4096];
	snprintf(full, sizeof(full), "( %s ) >/dev/null 2>&1", cmd);
	REQUIRE(system(full) == 0, "%s", cmd);
}

/* compression: NULL for the snapshot image, else the compressed image's
 * compression type (zlib or zstd). */
static void make_qimage(struct qimage *q, const char *compression, const char *dir)
{
	char cmd[2048], path[256], raw[256];
	q->size = 4u << 20;
	q->cs = 4096;
	snprintf(path, sizeof(path), "%s/%s.qcow2", dir, q->name);
	snprintf(raw, sizeof(raw), "%s/%s-active.raw", dir, q->name);
	if (!compression) {
		/* s1 and s2 share most clusters with each other and the active
		 * disk; the active disk overwrote and discarded some */
		snprintf(cmd, sizeof(cmd),
			 "qemu-img create -q -f qcow2 -o cluster_size=4096 %s 4M && "
			 "qemu-io -f qcow2 -c 'write -P 1 0 3M' -c 'write -P 7 3500k 100k' %s && qemu-img snapshot -c s1 %s && "
			 "qemu-io -f qcow2 -c 'write -P 2 1M 1M' -c 'discard 2560k 256k' %s && qemu-img snapshot -c s2 %s && "
			 "qemu-io -f qcow2 -c 'write -P 3 1536k 1M' -c 'write -P 4 100k 8k' %s",
			 path, path, path, path, path, path);
		sh(cmd);
		q->nsnap = 2;
		for (unsigned i = 0; i < 2; i++) {
			snprintf(q->snap_raw[i], sizeof(q->snap_raw[i]), "%s/%s-s%u.raw", dir, q->name, i + 1);
			snprintf(cmd, sizeof(cmd), "qemu-img convert -O raw -l snapshot.name=s%u %s %s", i + 1, path, q->snap_raw[i]);
			sh(cmd);
		}
	} else {
		/* compresses to about half: streams of about 2 KiB, most of them
		 * crossing from one host cluster into the next */
		uint8_t *d = qcow_malloc(q->size);
		for (uint64_t i = 0; i < q->size; i++)
			d[i] = (uint8_t)('a' + (tap_rand(&seed) & 15));
		FILE *f = fopen(raw, "wb");
		REQUIRE(f && fwrite(d, 1, q->size, f) == q->size, "write %s", raw);
		fclose(f);
		qcow_free(d);
		snprintf(cmd, sizeof(cmd), "qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=%s %s %s",
			 compression, raw, path);
		sh(cmd);
	}
	snprintf(cmd, sizeof(cmd), "qemu-img convert -O raw %s %s", path, raw);
	sh(cmd);
	size_t alen;
	q->active = slurp(raw, &alen);
	REQUIRE(alen == q->size, "%s: active disk size", q->name);
	q->bytes = slurp(path, &q->len);
}

/* One crash round on a copy of q: discards (so shared and compressed
 * clusters have space to move into), writes, flushes and compactions;
 * the disk dies after a random number of writes or a few writes after a
 * move phase. */
/* Every snapshot, as QEMU reads it from the crashed image, is what QEMU
 * wrote. */
struct snap_inspect {
	const struct qimage *q;
	const char *what;
	unsigned *checks;
};

static void check_snapshots(const uint8_t *bytes, size_t len, void *opaque)
{
	struct snap_inspect *si = opaque;
	char path[] = "/tmp/qcow-snapcrash-XXXXXX", out[64], cmd[512];
	int fd = mkstemp(path);
	REQUIRE(fd >= 0 && write(fd, bytes, len) == (ssize_t)len, "write crashed image");
	close(fd);
	snprintf(out, sizeof(out), "%s.raw", path);
	for (unsigned i = 0; i < si->q->nsnap; i++) {
		snprintf(cmd, sizeof(cmd), "qemu-img convert -O raw -l snapshot.name=s%u %s %s >/dev/null 2>&1 && cmp -s %s %s",
			 i + 1, path, out, out, si->q->snap_raw[i]);
		CHECK(system(cmd) == 0, "%s: snapshot s%u differs after the crash", si->what, i + 1);
		(*si->checks)++;
	}
	unlink(out);
	unlink(path);
}

static void qimage_round(struct qimage *q, unsigned round, unsigned *snap_checks)
{
	uint64_t size = q->size, cs = q->cs;
	struct qcow_io *io = qcow_io_crash_new(q->bytes, q->len);
	char err[256];
	int ret;
	struct qcow_image *img = open_io(io, err, sizeof(err), &ret);
	REQUIRE(img, "%s round %u: open: %s", q->name, round, err);
	struct crash_model m;
	crash_model_init(&m, size, q->active);
	uint8_t *buf = qcow_malloc(8 * cs);
	struct phase_arm arm = { .io = io, .target = -1, .after = 1 + tap_rand(&seed) % 8 };
	bool by_phase = tap_rand(&seed) & 1;
	if (by_phase) {
		static const int phases[] = { QMOVE_COPIED, QMOVE_FLUSHED, QMOVE_REFERENCED };
		arm.target = phases[tap_rand(&seed) % 3];
		/* compressed images: half of these inside a stream repack (it
		 * has a Copied and a Referenced phase) */
		if (!q->nsnap && arm.target != QMOVE_FLUSHED && tap_rand(&seed) % 2)
			arm.repack_only = true;
		img->move_phase_hook = on_phase;
		img->move_phase_opaque = &arm;
	} else {
		qcow_io_crash_die_after(io, 1 + tap_rand(&seed) % 400);
	}
	for (unsigned op = 0; op < 60; op++) {
		unsigned kind = (unsigned)(tap_rand(&seed) % 100);
		uint64_t off = tap_rand(&seed) % size;
		uint64_t n = 1 + tap_rand(&seed) % (kind < 50 ? 64 * cs : 4 * cs);
		if (n > size - off)
			n = size - off;
		enum crash_guest_op what = kind < 50 ? CRASH_DISCARD : kind < 70 ? CRASH_WRITE : kind < 80 ? CRASH_FLUSH : CRASH_COMPACT;
		for (uint64_t i = 0; what == CRASH_WRITE && i < n; i++)
			buf[i] = (uint8_t)tap_rand(&seed);
		if (!crash_model_do(img, &m, what, buf, off, n))
			break;
	}
	char what[64];
	snprintf(what, sizeof(what), "%s round %u", q->name, round);
	struct snap_inspect si = { .q = q, .what = what, .checks = snap_checks };
	bool snaps = q->nsnap && round % 6 == 0;
	crash_and_verify(io, img, &m, round % 10 == 0, what, snaps ? check_snapshots : NULL, &si);
	crash_model_free(&m);
	qcow_free(buf);
}

static void qemu_image_rounds(void)
{
	if (access("/usr/bin/qemu-img", X_OK) != 0) {
		CHECK(getenv("CI") == NULL || strcmp(getenv("CI"), "true") != 0, "qemu-img missing in CI");
		printf("# shared and compressed clusters: qemu-img missing, skipped\n");
		return;
	}
	char dir[] = "/tmp/qcow-qcrash-XXXXXX";
	REQUIRE(mkdtemp(dir), "mkdtemp");
	struct qimage q[3] = { { .name = "snapshots" }, { .name = "compressed" }, { .name = "zstd" } };
	make_qimage(&q[0], NULL, dir);
	make_qimage(&q[1], "zlib", dir);
	make_qimage(&q[2], "zstd", dir);
	const char *env = getenv("QEMU_CRASH_ROUNDS");
	unsigned rounds = env ? (unsigned)atoi(env) : 200, snap_checks = 0;
	unsigned before[4];
	memcpy(before, move_states_hit, sizeof(before));
	for (unsigned r = 0; r < rounds; r++)
		qimage_round(&q[r % 3], r, &snap_checks);
	printf("# shared and compressed clusters: %u rounds, crashes inside move states copied %u, flushed %u, "
	       "referenced %u (%u of them inside a stream repack), %u snapshot reads after a crash\n", rounds,
	       move_states_hit[QMOVE_COPIED] - before[QMOVE_COPIED], move_states_hit[QMOVE_FLUSHED] - before[QMOVE_FLUSHED],
	       move_states_hit[QMOVE_REFERENCED] - before[QMOVE_REFERENCED], repack_phases_hit, snap_checks);
	if (rounds >= 100) {
		CHECK(move_states_hit[QMOVE_REFERENCED] > before[QMOVE_REFERENCED],
		      "no crash landed after a shared or compressed move's pointer rewrite");
		CHECK(repack_phases_hit > 0, "no crash landed inside a stream repack");
	}
	for (int i = 0; i < 3; i++) {
		qcow_free(q[i].bytes);
		qcow_free(q[i].active);
	}
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	sh(cmd);
}

int main(void)
{
	replaced_clusters();
	qcow_log_set_sink(quiet_sink, NULL);
	qemu_image_rounds();
	qcow_log_set_sink(quiet_sink, NULL);
	const char *env = getenv("CRASH_ROUNDS");
	unsigned rounds = env ? (unsigned)atoi(env) : 1500;
	for (unsigned r = 0; r < rounds; r++)
		one_round(r);
	printf("crashes armed inside move states: copied %u, flushed %u, referenced %u\n",
	       move_states_hit[QMOVE_COPIED], move_states_hit[QMOVE_FLUSHED], move_states_hit[QMOVE_REFERENCED]);
	if (rounds >= 300)
		for (int s = QMOVE_COPIED; s <= QMOVE_REFERENCED; s++)
			CHECK(move_states_hit[s] > 0, "no crash landed in move state %d", s);
	return tap_done();
}
