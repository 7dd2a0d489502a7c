/*
 * test_errors.c - one test per engine defect of issue 6 that the engine's
 * API can drive: every failed write, sync or relocation step must leave
 * the old data readable and the image consistent, and the engine must
 * never report a clean close of an image that is not clean.
 *
 * Each test runs the engine on a memory file (images made by qemu-img and
 * qemu-io where the state needs QEMU: compressed clusters, internal
 * snapshots) under the fault-injecting backend (qcow_io_fault.c), recycler
 * off so that every call happens in this thread in a repeatable order.
 * Where a defect depends on which call fails, a dry run records the calls
 * of the operation (struct rec_io in test_image.h) and the test fails each
 * of them in turn, naming the call in its message.
 *
 *   D1  failed overwrite of compressed, snapshot-shared, unallocated and
 *       allocated clusters keeps the old contents
 *       and a write whose data landed does not report its automatic
 *       flush's failure
 *   D2  L2 cache entry used after its eviction (8-table cache)
 *   D3  refcount-table switch lost after one failed pwrite in a flush
 *   D7  grown view size is the one QEMU sees
 *   D8  grow_l1 and table relocation leave no pinned (leaked) cluster
 *       when their first flush fails
 *       and two resizes that race on flush_lock never shrink the view
 *   D9  a failed compaction is not a sticky error: after a successful
 *       flush, close returns 0; the counters tell failures from passes
 *   D10 a single failed write or sync in any flush step: a later flush
 *       recovers everything, or close reports the failure
 *
 * ERRORS_VERBOSE=1 prints the engine's log.
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <unistd.h>

static unsigned long long seed = 0xe770;
static bool verbose;

static void sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)opaque;
	if (verbose)
		fprintf(stderr, "engine[%d]: %s\n", (int)level, msg);
}

static void fill_random(uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i += 8) {
		unsigned long long r = tap_rand(&seed);
		memcpy(p + i, &r, n - i < 8 ? n - i : 8);
	}
}

/* ---- an engine over fault(rec(memory)) ----------------------------------- */

struct fimg {
	struct rec_io *rec;
	struct qcow_io *fio;
	struct qcow_image *img;
};

static struct qcow_open_opts test_opts(size_t cache_bytes)
{
	struct qcow_open_opts o;
	test_open_opts(&o, cache_bytes);
	return o;
}

static int fimg_open(struct fimg *f, const uint8_t *bytes, size_t len, size_t cache_bytes)
{
	struct qcow_open_opts o = test_opts(cache_bytes);
	char err[256] = "";
	f->rec = rec_new(bytes, len);
	f->fio = qcow_io_fault_new(&f->rec->io);
	REQUIRE(f->fio, "fault backend");
	f->img = NULL;
	int ret = qcow_image_open_io(f->fio, &o, &f->img, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "# open: %s (%d)\n", err, ret);
		qcow_io_close(f->fio);
	}
	return ret;
}

static int fimg_close(struct fimg *f)
{
	int ret = qcow_image_close(f->img);
	f->img = NULL;
	return ret;
}

/* The current file bytes (a copy). */
static uint8_t *fimg_bytes(struct fimg *f, size_t *len)
{
	const uint8_t *b = rec_bytes(f->rec, len);
	uint8_t *copy = malloc(*len ? *len : 1);
	memcpy(copy, b, *len);
	return copy;
}

static void fimg_free(struct fimg *f)
{
	if (f->img)
		fimg_close(f);
	rec_free(f->rec);
	f->rec = NULL;
}

/* Checks the bytes of a closed image: no errors (qcow_check, and qemu-img
 * check when with_qemu), and no leaks when want_no_leaks.  Returns true
 * when clean by those rules. */
static bool check_closed(struct fimg *f, bool want_no_leaks, bool with_qemu, const char *what)
{
	size_t len;
	const uint8_t *b = rec_bytes(f->rec, &len);
	struct qcow_check_result r;
	int q = 0;
	char out[2048] = "";
	int ret = check_image_bytes(b, len, &r, with_qemu ? &q : NULL, out, sizeof(out));
	bool ok = ret == 0 && r.errors == 0 && (!want_no_leaks || r.leaks == 0) &&
		  (!with_qemu || q == 0 || (q == 3 && !want_no_leaks));
	char qs[32] = "not run";
	if (with_qemu)
		snprintf(qs, sizeof(qs), "exit %d", q);
	CHECK(ok, "%s: qcow_check ret %d, %llu errors, %llu leaks; qemu-img check %s%s%.600s", what, ret,
	      (unsigned long long)r.errors, (unsigned long long)r.leaks, qs, *out && q ? ":\n" : "", q ? out : "");
	return ok;
}

/* Reads [off, off+len) of a reopened copy of the image bytes. */
static int read_reopened(struct fimg *f, uint8_t *buf, size_t len, uint64_t off, uint64_t *size)
{
	size_t blen;
	uint8_t *b = fimg_bytes(f, &blen);
	struct fimg g;
	int ret = fimg_open(&g, b, blen, 0);
	free(b);
	if (ret) {
		rec_free(g.rec);
		return ret;
	}
	if (size)
		*size = qcow_image_size(g.img);
	ssize_t n = len ? qcow_image_read(g.img, buf, len, off) : 0;
	int c = fimg_close(&g);
	rec_free(g.rec);
	if (n != (ssize_t)len)
		return n < 0 ? (int)n : -EIO;
	return c;
}

/* Dry run helper: the calls of the kinds in ops that op() makes on an
 * image opened from bytes after setup() ran. */
struct scenario {
	const char *name;
	uint8_t *bytes;
	size_t len;
	size_t cache_bytes;
	/* runs before the operation (no fault armed); fills the model */
	void (*setup)(struct fimg *f, struct scenario *s);
	/* the operation under test; returns 0 or -errno */
	int (*op)(struct fimg *f, struct scenario *s);
	uint8_t *model;          /* guest contents acknowledged so far */
	uint64_t model_len;
	uint64_t param;
};

static size_t dry_run(struct scenario *s, unsigned ops, struct rec_call **calls)
{
	struct fimg f;
	REQUIRE(fimg_open(&f, s->bytes, s->len, s->cache_bytes) == 0, "%s: open", s->name);
	s->setup(&f, s);
	rec_start(f.rec, ops);
	int ret = s->op(&f, s);
	rec_stop(f.rec);
	REQUIRE(ret == 0, "%s: the operation fails without a fault (%d)", s->name, ret);
	CHECK(fimg_close(&f) == 0, "%s: close after the dry run", s->name);
	check_closed(&f, true, true, s->name);
	size_t n = f.rec->ncalls;
	*calls = malloc((n ? n : 1) * sizeof(**calls));
	memcpy(*calls, f.rec->calls, n * sizeof(**calls));
	fimg_free(&f);
	return n;
}

/* The rule of D8 and D10 after one fault in s->op: a later flush either
 * succeeds, and then the close is clean and everything acknowledged reads
 * back, or it fails, and then close must fail too and the image have no
 * errors.  Returns false on a violation. */
static bool fault_then_recover(struct scenario *s, unsigned ops, uint64_t k, int err, const char *call, bool qemu)
{
	char what[256];
	snprintf(what, sizeof(what), "%s: call %llu (%s) fails with %s%s", s->name, (unsigned long long)k, call,
		 strerror(-err), (ops & QFAULT_TORN) ? ", torn" : "");
	struct fimg f;
	REQUIRE(fimg_open(&f, s->bytes, s->len, s->cache_bytes) == 0, "%s: open", what);
	s->setup(&f, s);
	unsigned before = tap_failed;
	qcow_io_fault_arm(f.fio, ops, k, err);
	int ret = s->op(&f, s);
	bool fired = qcow_io_fault_fired(f.fio);
	qcow_io_fault_arm(f.fio, 0, 0, 0);
	CHECK(fired, "%s: the fault did not fire (the operation made fewer calls than its dry run)", what);
	CHECK(!fired || ret != 0, "%s: the operation returned 0 although a call failed", what);
	int r2 = qcow_image_flush(f.img);
	struct qcow_stats st;
	qcow_image_get_stats(f.img, &st);
	int c = fimg_close(&f);
	if (r2 == 0 && c == 0) {
		check_closed(&f, true, qemu, what);
	} else if (r2 == 0) {
		/* the engine says the close failed (a sticky error, D9 tests
		 * that): leaks allowed, errors not */
		printf("# %s: a later flush succeeded, close returned %d (%s)\n", what, c, strerror(-c));
		check_closed(&f, false, qemu, what);
	} else {
		CHECK(c != 0, "%s: the later flush failed (%d), but close returned 0", what, r2);
		CHECK(st.failed, "%s: the later flush failed (%d), but stats.failed is false", what, r2);
		check_closed(&f, false, qemu, what);
	}
	if (r2 == 0) {
		uint8_t *buf = malloc(s->model_len);
		int rr = read_reopened(&f, buf, s->model_len, 0, NULL);
		CHECK(rr == 0 && memcmp(buf, s->model, s->model_len) == 0,
		      "%s: after a later successful flush and close, the data acknowledged before it %s", what,
		      rr ? "cannot be read" : "differs");
		free(buf);
	}
	fimg_free(&f);
	return tap_failed == before;
}

/* Fails each recorded call of s->op in turn (every stride-th, and every
 * call chosen by pick); returns the number of fault points that broke the
 * rule. */
static unsigned sweep(struct scenario *s, unsigned ops, const int *errs, unsigned nerrs, size_t stride,
		      bool (*pick)(const struct rec_call *c, struct scenario *s))
{
	struct rec_call *calls;
	size_t n = dry_run(s, ops & QFAULT_ALL, &calls);
	unsigned bad = 0, tried = 0;
	if (n <= 40) {   /* short: show what is failed in turn */
		printf("# %s: the calls:", s->name);
		for (size_t i = 0; i < n; i++) {
			char d[96];
			printf(" %s%s", rec_describe(&calls[i], d, sizeof(d)), i + 1 < n ? "," : "\n");
		}
	}
	for (size_t i = 0; i < n; i++) {
		if (stride > 1 && i % stride && i + 1 != n && !(pick && pick(&calls[i], s)))
			continue;
		char desc[96];
		rec_describe(&calls[i], desc, sizeof(desc));
		for (unsigned e = 0; e < nerrs; e++) {
			unsigned o = ops;
			int err = errs[e];
			if (err > 0) {   /* positive: torn */
				o |= QFAULT_TORN;
				err = -err;
			}
			tried++;
			if (!fault_then_recover(s, o, i + 1, err, desc, tried % 8 == 1))
				bad++;
		}
	}
	printf("# %s: %zu calls, %u fault points, %u broke the rule\n", s->name, n, tried, bad);
	free(calls);
	return bad;
}

/* ---- D1: a failed overwrite keeps the old contents --------------------- */

enum d1_kind { D1_COMPRESSED, D1_SHARED, D1_UNALLOCATED, D1_COPIED };
static const char *d1_names[] = { "compressed", "shared with a snapshot", "unallocated", "allocated (COPIED)" };

static bool sector_old_or_new(const uint8_t *got, const uint8_t *old, const uint8_t *new_, uint64_t base,
			      uint64_t off, uint64_t len, uint64_t *bad_at)
{
	/* sectors are absolute guest 512-byte units; got/old/new_ start at base */
	for (uint64_t s = off & ~511ull; s < off + len; s += 512) {
		uint64_t a = s < off ? off : s, b = s + 512 > off + len ? off + len : s + 512;
		const uint8_t *g = got + (a - base);
		if (memcmp(g, old + (a - base), b - a) && memcmp(g, new_ + (a - base), b - a)) {
			*bad_at = s;
			return false;
		}
	}
	return true;
}

static void d1_case(const char *img_name, const uint8_t *bytes, size_t len, uint64_t cs, enum d1_kind kind, uint64_t gc)
{
	static const int errs[] = { -EIO, -ENOSPC, EIO };   /* positive: torn */
	for (int partial = 0; partial < 2; partial++) {
		uint64_t off = gc * cs + (partial ? 1024 : 0), n = partial ? cs / 2 : cs;
		uint64_t base = gc * cs;
		uint8_t *old = malloc(cs), *new_ = malloc(cs), *got = malloc(cs);
		fill_random(new_ + (off - base), n);
		/* dry run: the old contents and the pwrites of a good write */
		struct fimg f;
		REQUIRE(fimg_open(&f, bytes, len, 0) == 0, "D1 %s: open", img_name);
		REQUIRE(qcow_image_read(f.img, old, cs, base) == (ssize_t)cs, "D1: read old");
		memcpy(new_, old, cs);
		fill_random(new_ + (off - base), n);
		uint64_t w0 = qcow_io_fault_count(f.fio, QFAULT_PWRITE);
		REQUIRE(qcow_image_write(f.img, new_ + (off - base), n, off) == (ssize_t)n, "D1: write without a fault");
		uint64_t writes = qcow_io_fault_count(f.fio, QFAULT_PWRITE) - w0;
		REQUIRE(qcow_image_read(f.img, got, cs, base) == (ssize_t)cs && memcmp(got, new_, cs) == 0,
			"D1: a good write reads back");
		fimg_free(&f);
		REQUIRE(writes >= 1, "D1: the write wrote nothing");

		for (unsigned e = 0; e < sizeof(errs) / sizeof(errs[0]); e++) {
			bool torn = errs[e] > 0;
			int err = torn ? -errs[e] : errs[e];
			for (uint64_t k = 1; k <= writes; k++) {
				char what[256];
				snprintf(what, sizeof(what), "D1 %s, cluster size %llu, %s %s write (pwrite %llu of %llu fails with %s%s)",
					 img_name, (unsigned long long)cs, d1_names[kind], partial ? "partial" : "full-cluster",
					 (unsigned long long)k, (unsigned long long)writes, strerror(-err), torn ? ", torn" : "");
				REQUIRE(fimg_open(&f, bytes, len, 0) == 0, "%s: open", what);
				qcow_io_fault_arm(f.fio, QFAULT_PWRITE | (torn ? QFAULT_TORN : 0), k, err);
				ssize_t w = qcow_image_write(f.img, new_ + (off - base), n, off);
				bool fired = qcow_io_fault_fired(f.fio);
				qcow_io_fault_arm(f.fio, 0, 0, 0);
				CHECK(fired, "%s: the fault did not fire", what);
				CHECK(w < 0, "%s: the write returned %zd although its pwrite failed", what, w);
				/* in place and torn: the sectors may hold either;
				 * anything else must keep the old contents */
				bool either = kind == D1_COPIED && torn;
				memset(got, 0, cs);
				REQUIRE(qcow_image_read(f.img, got, cs, base) == (ssize_t)cs, "%s: read", what);
				uint64_t at = 0;
				bool outside_ok = memcmp(got, old, off - base) == 0 &&
						  memcmp(got + (off - base) + n, old + (off - base) + n, cs - (off - base) - n) == 0;
				bool inside_ok = either ? sector_old_or_new(got, old, new_, base, off, n, &at)
							: memcmp(got + (off - base), old + (off - base), n) == 0;
				CHECK(outside_ok && inside_ok, "%s: while open the cluster reads %s (first byte 0x%02x, old 0x%02x)", what,
				      !outside_ok ? "changed outside the write" : either ? "a sector that is neither old nor new"
											 : "other than its old contents",
				      got[off - base], old[off - base]);
				int fl = qcow_image_flush(f.img);
				CHECK(fl == 0, "%s: the flush after the failed write failed (%d)", what, fl);
				int c = fimg_close(&f);
				CHECK(c == 0, "%s: close returned %d", what, c);
				check_closed(&f, true, k == 1, what);
				uint8_t *again = malloc(cs);
				int rr = read_reopened(&f, again, cs, base, NULL);
				CHECK(rr == 0 && memcmp(again, got, cs) == 0,
				      "%s: after flush, close and reopen the cluster %s what it read while open (first byte 0x%02x, old 0x%02x)",
				      what, rr ? "cannot be read" : "differs from", again[off - base], old[off - base]);
				free(again);
				fimg_free(&f);
			}
		}
		free(old);
		free(new_);
		free(got);
	}
}

static void d1_failed_overwrite(void)
{
	static const uint64_t sizes[] = { 4096, 65536 };
	for (unsigned i = 0; i < 2; i++) {
		uint64_t cs = sizes[i];
		unsigned before = tap_failed;
		char script[2048], raw[64];
		/* compressed: 8 clusters of compressible letters */
		test_tmp_path(raw, sizeof(raw), "d1raw");
		uint8_t *data = malloc(8 * cs);
		for (uint64_t b = 0; b < 8 * cs; b++)
			data[b] = (uint8_t)('a' + (tap_rand(&seed) & 7));
		test_spill(raw, data, 8 * cs);
		free(data);
		snprintf(script, sizeof(script), "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=%llu '%s' %%s",
			 (unsigned long long)cs, raw);
		size_t clen;
		uint8_t *cbytes = qemu_bytes(script, &clen);
		unlink(raw);
		/* snapshot: clusters 0-3 shared with s1, 4-7 COPIED, 8- unallocated */
		snprintf(script, sizeof(script),
			 "qemu-img create -q -f qcow2 -o cluster_size=%llu %%s 1M && "
			 "qemu-io -f qcow2 -c 'write -P 0x11 0 %llu' %%s && qemu-img snapshot -c s1 %%s && "
			 "qemu-io -f qcow2 -c 'write -P 0x22 %llu %llu' %%s",
			 (unsigned long long)cs, (unsigned long long)(4 * cs), (unsigned long long)(4 * cs),
			 (unsigned long long)(4 * cs));
		size_t slen;
		uint8_t *sbytes = qemu_bytes(script, &slen);

		d1_case("qemu-img convert -c", cbytes, clen, cs, D1_COMPRESSED, 2);
		d1_case("qemu-img snapshot -c", sbytes, slen, cs, D1_SHARED, 1);
		d1_case("qemu-img snapshot -c", sbytes, slen, cs, D1_UNALLOCATED, 10);
		d1_case("qemu-img snapshot -c", sbytes, slen, cs, D1_COPIED, 5);
		free(cbytes);
		free(sbytes);
		printf("# D1 cluster size %llu: %u failures\n", (unsigned long long)cs, tap_failed - before);
	}
}

/* A write whose own data I/O succeeded must not report the failure of the
 * automatic flush it runs afterwards (half the cache dirty): a failed
 * write leaves the old contents, a write whose new contents are there
 * succeeded. */
static void d1_autoflush(void)
{
	const uint64_t cs = 512, span = 64 * cs;
	size_t len;
	uint8_t *bytes = create_bytes(1u << 20, 9, 4, 3, &len);
	for (unsigned k = 1; k <= 2; k++) {
		struct fimg f;
		REQUIRE(fimg_open(&f, bytes, len, 8 * cs) == 0, "D1 autoflush: open");
		/* five new L2 tables in one write: more than half of the
		 * 8-table cache dirty, so the write flushes after its data */
		uint64_t n = 5 * span;
		uint8_t *buf = malloc(n), *got = malloc(n);
		fill_random(buf, n);
		qcow_io_fault_arm(f.fio, QFAULT_FLUSH, k, -EIO);   /* its first or second sync */
		ssize_t w = qcow_image_write(f.img, buf, n, 0);
		bool fired = qcow_io_fault_fired(f.fio);
		qcow_io_fault_arm(f.fio, 0, 0, 0);
		REQUIRE(qcow_image_read(f.img, got, n, 0) == (ssize_t)n, "D1 autoflush: read");
		bool is_new = memcmp(got, buf, n) == 0;
		bool is_zero = true;
		for (uint64_t i = 0; i < n && is_zero; i++)
			is_zero = got[i] == 0;
		CHECK(fired, "D1 autoflush: the automatic flush's sync %u did not fail (no automatic flush?)", k);
		CHECK(w == (ssize_t)n ? is_new : is_zero,
		      "D1 autoflush: the write returned %zd after its automatic flush's sync %u failed, and reads %s", w, k,
		      is_new ? "the new data" : is_zero ? "the old data" : "a mix");
		/* a failed sync may put the engine in the failed state (the
		 * kernel may have dropped what it could not write): then it must
		 * say so, refuse to flush and not close cleanly, and the image
		 * must still have no errors */
		struct qcow_stats st;
		qcow_image_get_stats(f.img, &st);
		if (st.failed) {
			CHECK(qcow_image_flush(f.img) < 0, "D1 autoflush: a flush in the failed state must fail");
			CHECK(qcow_image_write(f.img, buf, cs, 0) == -EIO, "D1 autoflush: a write in the failed state is -EIO");
			CHECK(fimg_close(&f) != 0, "D1 autoflush: close in the failed state must report the error");
			check_closed(&f, false, false, "D1 autoflush (failed state)");
		} else {
			CHECK(qcow_image_flush(f.img) == 0, "D1 autoflush: flush");
			CHECK(fimg_close(&f) == 0, "D1 autoflush: close");
			check_closed(&f, true, false, "D1 autoflush");
		}
		fimg_free(&f);
		free(buf);
		free(got);
	}
	free(bytes);
}

/* ---- D8: resize compares sizes under flush_lock --------------------------- */

struct resize_arg { struct qcow_image *img; uint64_t size; int ret; };

static void *resize_main(void *arg)
{
	struct resize_arg *a = arg;
	a->ret = qcow_image_resize(a->img, a->size);
	return NULL;
}

/* Two resizes queue on flush_lock (held by a flush here): a grow to 2 MiB
 * and one to 1.5 MiB.  Whichever runs second must see the other's result:
 * both succeed and the view ends at the size of one of them (since the
 * shrink exists, 1.5 MiB when the grow to 2 MiB ran first: a shrink that
 * compared sizes before the lock would have taken itself for a grow and
 * left the view at a size nobody asked for, or refused). */
static void d8_resize_race(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(1u << 20, 16, 4, 3, &len);
	unsigned shrunk = 0;
	for (unsigned i = 0; i < 20; i++) {
		struct fimg f;
		REQUIRE(fimg_open(&f, bytes, len, 0) == 0, "D8 resize race: open");
		struct resize_arg big = { f.img, 2u << 20, 0 }, small = { f.img, 3u << 19, 0 };
		pthread_t a, b;
		pthread_mutex_lock(&f.img->flush_lock);
		pthread_create(&a, NULL, resize_main, i % 2 ? &small : &big);
		usleep(20000);
		pthread_create(&b, NULL, resize_main, i % 2 ? &big : &small);
		usleep(20000);
		pthread_mutex_unlock(&f.img->flush_lock);
		pthread_join(a, NULL);
		pthread_join(b, NULL);
		uint64_t size = qcow_image_size(f.img);
		if ((size != 2u << 20 && size != 3u << 19) || small.ret != 0) {
			if (shrunk++ == 0)
				fprintf(stderr, "# D8 resize race, round %u: resize to 2 MiB returned %d, to 1.5 MiB %d, the view is %llu bytes\n",
					i, big.ret, small.ret, (unsigned long long)size);
		}
		CHECK(big.ret == 0, "D8 resize race: the grow to 2 MiB returned %d", big.ret);
		CHECK(fimg_close(&f) == 0, "D8 resize race: close");
		fimg_free(&f);
	}
	CHECK(shrunk == 0, "D8 resize race: in %u of 20 rounds a resize failed or the view ended at neither 2 MiB nor "
	      "1.5 MiB after a grow to 2 MiB and one to 1.5 MiB raced", shrunk);
	free(bytes);
}

/* ---- D2: L2 cache entry used after eviction ------------------------------ */

static void d2_cache_eviction(void)
{
	/* 512-byte clusters: an L2 table maps 64 clusters (32 KiB).  Table 8
	 * holds QEMU's data; its L1 entry loses COPIED (refcount stays 1). */
	const uint64_t cs = 512, span = 64 * cs, x = 8;
	char script[1024];
	snprintf(script, sizeof(script),
		 "qemu-img create -q -f qcow2 -o cluster_size=512 %%s 1M && qemu-io -f qcow2 -c 'write -P 0x33 %llu %llu' %%s",
		 (unsigned long long)(x * span), (unsigned long long)span);
	size_t len;
	uint8_t *bytes = qemu_bytes(script, &len);
	uint64_t l1_off = qcow_get_be64(bytes + 40);
	uint64_t e = qcow_get_be64(bytes + l1_off + x * 8);
	REQUIRE(e & QCOW_OFLAG_COPIED, "D2: QEMU's L1 entry %llu has COPIED", (unsigned long long)x);

	uint64_t size = (x + 1) * span;
	uint8_t *model = calloc(1, size);
	memset(model + x * span, 0x33, span);
	/* one write dirties tables 0..7 (the whole 8-entry cache), then
	 * reaches table 8 through the L1 entry without COPIED */
	uint64_t n = x * span + 2 * cs;
	uint8_t *buf = malloc(n);
	fill_random(buf, n);
	struct fimg f;
	REQUIRE(fimg_open(&f, bytes, len, 8 * cs) == 0, "D2: open");
	/* An image whose L1 entry lacks COPIED at refcount 1 is corrupt to
	 * qemu-img check and refused (or, dirty, repaired) by a read-write
	 * open, so the engine meets such an entry only at run time: clear the
	 * flag in memory, as an online snapshot deletion would leave it. */
	pthread_mutex_lock(&f.img->lock);
	f.img->l1[x] &= ~QCOW_OFLAG_COPIED;
	pthread_mutex_unlock(&f.img->lock);
	CHECK(qcow_image_write(f.img, buf, n, 0) == (ssize_t)n, "D2: the write");
	memcpy(model, buf, n);
	uint8_t *got = malloc(size);
	REQUIRE(qcow_image_read(f.img, got, size, 0) == (ssize_t)size, "D2: read");
	uint64_t first = 0;
	while (first < size && got[first] == model[first])
		first++;
	CHECK(first == size, "D2: while open, guest byte %llu (table %llu) reads 0x%02x, written 0x%02x",
	      (unsigned long long)first, (unsigned long long)(first / span), first < size ? got[first] : 0,
	      first < size ? model[first] : 0);
	CHECK(qcow_image_flush(f.img) == 0, "D2: flush");
	CHECK(fimg_close(&f) == 0, "D2: close");
	check_closed(&f, true, true, "D2 after close");
	memset(got, 0, size);
	CHECK(read_reopened(&f, got, size, 0, NULL) == 0, "D2: reopen");
	first = 0;
	while (first < size && got[first] == model[first])
		first++;
	CHECK(first == size, "D2: after reopening, guest byte %llu (table %llu) reads 0x%02x, written 0x%02x",
	      (unsigned long long)first, (unsigned long long)(first / span), first < size ? got[first] : 0,
	      first < size ? model[first] : 0);
	fimg_free(&f);
	free(got);
	free(buf);
	free(model);
	free(bytes);
}

/* ---- D3: the refcount-table switch after a failed pwrite ----------------- */

static void big_write_setup(struct fimg *f, struct scenario *s)
{
	if (!s->model) {
		s->model = malloc(s->model_len);
		fill_random(s->model, s->model_len);
	}
	REQUIRE(qcow_image_write(f->img, s->model, s->model_len, 0) == (ssize_t)s->model_len, "%s: write", s->name);
}

static int flush_op(struct fimg *f, struct scenario *s)
{
	(void)s;
	return qcow_image_flush(f->img);
}

static bool d3_pick(const struct rec_call *c, struct scenario *s)
{
	/* header fields and anything outside the data and table runs are
	 * rare and interesting: the header, the refcount table */
	(void)s;
	return c->off < 512 || c->len != 512;
}

static void d3_reftable_switch(void)
{
	struct scenario s = { .name = "D3 (512-byte clusters, 64-bit refcounts, 8 MiB written)", .setup = big_write_setup,
			      .op = flush_op, .model_len = 8u << 20 };
	s.bytes = qemu_bytes("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 %s 16M", &s.len);
	struct rec_call *calls;
	size_t n = dry_run(&s, QFAULT_PWRITE, &calls);
	unsigned bad = 0, tried = 0, switch_lost = 0;
	size_t h = n;   /* the header switch to the new refcount table */
	for (size_t i = 0; i < n; i++)
		if (calls[i].off == 48 && calls[i].len == 12)
			h = i;
	CHECK(h < n, "D3: the flush did not switch the refcount table");
	for (size_t i = 0; i < n; i++) {
		bool near = h < n && i + 24 >= h && i <= h + 4;
		if (i % 64 && i + 1 != n && i > 4 && !near && !d3_pick(&calls[i], &s))
			continue;
		char desc[96], what[256];
		rec_describe(&calls[i], desc, sizeof(desc));
		snprintf(what, sizeof(what), "%s: pwrite %zu of %zu (%s) fails", s.name, i + 1, n, desc);
		tried++;
		unsigned before = tap_failed;
		struct fimg f;
		REQUIRE(fimg_open(&f, s.bytes, s.len, 0) == 0, "D3: open");
		s.setup(&f, &s);
		qcow_io_fault_arm(f.fio, QFAULT_PWRITE, i + 1, -EIO);
		int r1 = qcow_image_flush(f.img);
		CHECK(qcow_io_fault_fired(f.fio) && r1 != 0, "%s: the flush returned %d", what, r1);
		int r2 = qcow_image_flush(f.img);
		int c = fimg_close(&f);
		size_t len;
		const uint8_t *b = rec_bytes(f.rec, &len);
		struct qcow_check_result r;
		int q = 0;
		char out[4096] = "";
		check_image_bytes(b, len, &r, &q, out, sizeof(out));
		bool lost = strstr(out, "refcount=0 reference=1") != NULL;
		switch_lost += lost;
		CHECK(!lost, "%s: next flush %d, close %d; qemu-img check: %.300s", what, r2, c, out);
		if (c == 0) {
			CHECK(r.errors == 0 && (q == 0 || q == 3),
			      "%s: close returned 0 but qcow_check finds %llu errors, qemu-img check exits %d", what,
			      (unsigned long long)r.errors, q);
			uint8_t *got = malloc(s.model_len);
			int rr = read_reopened(&f, got, s.model_len, 0, NULL);
			CHECK(rr == 0 && memcmp(got, s.model, s.model_len) == 0, "%s: after a clean close the data %s", what,
			      rr ? "cannot be read" : "differs");
			free(got);
		}
		fimg_free(&f);
		bad += tap_failed != before;
	}
	printf("# D3: %zu pwrites in the flush, %u tried, %u broke the rule, %u lost the refcount-table switch\n", n, tried,
	       bad, switch_lost);
	free(calls);
	free(s.bytes);
	free(s.model);
}

/* ---- D7: the grown size is the one QEMU sees ------------------------------ */

static void d7_qemu_size(void)
{
	size_t len;
	uint8_t *bytes = qemu_bytes("qemu-img create -q -f qcow2 %s 1M", &len);
	struct fimg f;
	REQUIRE(fimg_open(&f, bytes, len, 0) == 0, "D7: open");
	free(bytes);
	int ret = qcow_image_resize(f.img, 1049000);
	CHECK(ret == 0, "D7: resize to 1049000 returned %d", ret);
	uint64_t size = qcow_image_size(f.img);
	uint8_t tail[100];
	memset(tail, 0x5a, sizeof(tail));
	REQUIRE(size >= sizeof(tail), "D7: size");
	CHECK(qcow_image_write(f.img, tail, sizeof(tail), size - sizeof(tail)) == (ssize_t)sizeof(tail),
	      "D7: write the last 100 bytes of the view");
	CHECK(fimg_close(&f) == 0, "D7: close");
	char path[64];
	test_tmp_path(path, sizeof(path), "d7");
	const uint8_t *b = rec_bytes(f.rec, &len);
	test_spill(path, b, len);
	char cmd[256];
	snprintf(cmd, sizeof(cmd), "qemu-img info --output=json '%s'", path);
	FILE *p = popen(cmd, "r");
	REQUIRE(p, "popen qemu-img info");
	char line[512];
	unsigned long long qsize = 0;
	while (fgets(line, sizeof(line), p))
		if (strstr(line, "\"virtual-size\""))
			sscanf(strchr(line, ':') + 1, "%llu", &qsize);
	pclose(p);
	CHECK(qsize == size, "D7: after growing to 1049000 the view is %llu bytes, QEMU sees %llu", (unsigned long long)size,
	      qsize);
	uint64_t reopened = 0;
	CHECK(read_reopened(&f, NULL, 0, 0, &reopened) == 0 && reopened == qsize,
	      "D7: reopened, the view is %llu bytes, QEMU sees %llu", (unsigned long long)reopened, qsize);
	/* QEMU reads what the view wrote at its end, and writes its last byte */
	int q = test_sh(NULL, "out=$(qemu-io -f qcow2 -c 'read -P 0x5a %llu 100' '%s' 2>&1); "
			"echo \"$out\" | grep -q 'read 100/100' && ! echo \"$out\" | grep -qi 'fail'",
			qsize - 100, path);
	CHECK(q == 0, "D7: qemu-io does not read the last 100 bytes the view wrote (size %llu)", qsize);
	q = test_sh(NULL, "out=$(qemu-io -f qcow2 -c 'write -P 0x66 %llu 1' '%s' 2>&1); "
		    "echo \"$out\" | grep -q 'wrote 1/1' && ! echo \"$out\" | grep -qi 'fail\\|error'",
		    qsize - 1, path);
	CHECK(q == 0, "D7: qemu-io cannot write the last byte of the view (offset %llu)", qsize - 1);
	unlink(path);
	fimg_free(&f);
}

/* ---- D8: no pinned cluster after a failed first flush ---------------------- */

static void d8_grow_setup(struct fimg *f, struct scenario *s)
{
	/* data to flush, so the resize's first flush has writes to fail */
	if (!s->model) {
		s->model = calloc(1, s->model_len);
		fill_random(s->model + 4096, 64 * 1024);
	}
	REQUIRE(qcow_image_write(f->img, s->model + 4096, 64 * 1024, 4096) == 64 * 1024, "%s: write", s->name);
}

static int d8_grow_op(struct fimg *f, struct scenario *s)
{
	return qcow_image_resize(f->img, s->param);
}

static void d8_reloc_setup(struct fimg *f, struct scenario *s)
{
	/* data low, then a grown L1 above it, then the data discarded: the
	 * compaction moves the L1 table down into the hole */
	uint64_t n = 256 * 1024;
	uint8_t *buf = malloc(n);
	fill_random(buf, n);
	REQUIRE(qcow_image_write(f->img, buf, n, 0) == (ssize_t)n, "%s: write", s->name);
	free(buf);
	REQUIRE(qcow_image_resize(f->img, s->param) == 0, "%s: resize", s->name);
	REQUIRE(qcow_image_discard(f->img, 0, n) == 0, "%s: discard", s->name);
	if (!s->model)
		s->model = calloc(1, s->model_len);
	/* a little data the relocation must keep */
	memset(s->model + n, 0x77, 4096);
	REQUIRE(qcow_image_write(f->img, s->model + n, 4096, n) == 4096, "%s: write", s->name);
	REQUIRE(qcow_image_flush(f->img) == 0, "%s: flush", s->name);
}

static int compact_op(struct fimg *f, struct scenario *s)
{
	(void)s;
	return qcow_image_compact(f->img, NULL, NULL);
}

static void d8_pinned_after_failed_flush(void)
{
	static const int errs[] = { -EIO };
	/* 2 MiB at 512-byte clusters: the L1 table is exactly one cluster;
	 * 4 MiB needs two, in a new place */
	struct scenario g = { .name = "D8 grow_l1 (resize 2 MiB -> 4 MiB, 512-byte clusters)", .setup = d8_grow_setup,
			      .op = d8_grow_op, .param = 4u << 20, .model_len = 2u << 20 };
	g.bytes = qemu_bytes("qemu-img create -q -f qcow2 -o cluster_size=512 %s 2M", &g.len);
	/* the first call is the first write or sync of the first flush */
	unsigned bad = sweep(&g, QFAULT_PWRITE | QFAULT_FLUSH, errs, 1, 1, NULL);
	printf("# D8 grow_l1: %u fault points broke the rule\n", bad);
	free(g.bytes);
	free(g.model);

	struct scenario r = { .name = "D8 table relocation (compaction moves the grown L1 down)", .setup = d8_reloc_setup,
			      .op = compact_op, .param = 4u << 20, .model_len = 4u << 20 };
	r.bytes = qemu_bytes("qemu-img create -q -f qcow2 -o cluster_size=512 %s 2M", &r.len);
	/* the dry run must really relocate the L1 table */
	struct fimg f;
	REQUIRE(fimg_open(&f, r.bytes, r.len, 0) == 0, "D8: open");
	r.setup(&f, &r);
	uint64_t l1_before = f.img->hdr.l1_table_offset;
	REQUIRE(qcow_image_compact(f.img, NULL, NULL) == 0, "D8: compact");
	uint64_t l1_after = f.img->hdr.l1_table_offset;
	fimg_free(&f);
	CHECK(l1_after < l1_before, "D8: the compaction did not move the L1 table (0x%llx -> 0x%llx)",
	      (unsigned long long)l1_before, (unsigned long long)l1_after);
	bad = sweep(&r, QFAULT_PWRITE | QFAULT_FLUSH, errs, 1, 1, NULL);
	printf("# D8 relocation: %u fault points broke the rule\n", bad);
	free(r.bytes);
	free(r.model);
}

/* ---- D9: a failed compaction is not a sticky error ------------------------- */

static void d9_failed_compaction(void)
{
	size_t len;
	uint8_t *bytes = create_bytes(4u << 20, 12, 4, 3, &len);
	struct fimg f;
	REQUIRE(fimg_open(&f, bytes, len, 0) == 0, "D9: open");
	free(bytes);
	uint64_t size = 4u << 20;
	uint8_t *model = malloc(size);
	fill_random(model, size);
	REQUIRE(qcow_image_write(f.img, model, size, 0) == (ssize_t)size, "D9: write");
	REQUIRE(qcow_image_discard(f.img, 0, size / 2) == 0, "D9: discard");
	memset(model, 0, size / 2);
	REQUIRE(qcow_image_flush(f.img) == 0, "D9: flush");
	/* the host disk is full while the compactor copies */
	qcow_io_fault_arm(f.fio, QFAULT_COPY, 1, -ENOSPC);
	int r1 = qcow_image_compact(f.img, NULL, NULL);
	CHECK(qcow_io_fault_fired(f.fio) && r1 == -ENOSPC, "D9: the compaction with a failing copy returned %d", r1);
	struct qcow_stats st;
	qcow_image_get_stats(f.img, &st);
	CHECK(st.compactions_failed == 1 && st.compactions_done == 0,
	      "D9: after one failed compaction: compactions_done %llu, compactions_failed %llu",
	      (unsigned long long)st.compactions_done, (unsigned long long)st.compactions_failed);
	/* space is back */
	int r2 = qcow_image_compact(f.img, NULL, NULL);
	CHECK(r2 == 0, "D9: the next compaction returned %d", r2);
	CHECK(qcow_image_flush(f.img) == 0, "D9: flush");
	qcow_image_get_stats(f.img, &st);
	CHECK(st.last_error == 0 && !st.failed, "D9: after a successful compaction and flush: last_error %d, failed %d",
	      st.last_error, (int)st.failed);
	CHECK(st.compactions_done == 1 && st.compactions_failed == 1,
	      "D9: after one failed and one good compaction: compactions_done %llu, compactions_failed %llu",
	      (unsigned long long)st.compactions_done, (unsigned long long)st.compactions_failed);
	int c = fimg_close(&f);
	CHECK(c == 0, "D9: close after recovery returned %d (%s)", c, strerror(-c));
	check_closed(&f, true, true, "D9");
	uint8_t *got = malloc(size);
	CHECK(read_reopened(&f, got, size, 0, NULL) == 0 && memcmp(got, model, size) == 0, "D9: data after reopen");
	free(got);
	free(model);
	fimg_free(&f);
}

/* ---- D10: one failed write or sync in any flush step ----------------------- */

static void d10_setup(struct fimg *f, struct scenario *s)
{
	/* data in place, then discards (refcounts lowered), overwrites and
	 * new L2 tables (L1 written), all in the flush under test */
	uint64_t cs = f->img->cluster_size, size = s->model_len;
	if (!s->model) {
		s->model = malloc(size);
		fill_random(s->model, size);
		memset(s->model + size / 4, 0, 8 * cs);
		fill_random(s->model + size / 8, 3 * cs + 100);
		memset(s->model + size / 2, 0, size / 2);
		fill_random(s->model + size - 5 * cs, 2 * cs);
	}
	uint8_t *tmp = malloc(size);
	fill_random(tmp, size / 2);
	memcpy(tmp + size / 8, s->model + size / 8, 3 * cs + 100);
	REQUIRE(qcow_image_write(f->img, tmp, size / 2, 0) == (ssize_t)(size / 2), "%s: write", s->name);
	REQUIRE(qcow_image_flush(f->img) == 0, "%s: flush", s->name);
	REQUIRE(qcow_image_write(f->img, s->model, size / 2, 0) == (ssize_t)(size / 2), "%s: rewrite", s->name);
	REQUIRE(qcow_image_discard(f->img, size / 4, 8 * cs) == 0, "%s: discard", s->name);
	REQUIRE(qcow_image_write(f->img, s->model + size - 5 * cs, 2 * cs, size - 5 * cs) == (ssize_t)(2 * cs), "%s: write",
		s->name);
	free(tmp);
}

static int d10_resize_op(struct fimg *f, struct scenario *s)
{
	return qcow_image_resize(f->img, s->param);
}

static void d10_resize_setup(struct fimg *f, struct scenario *s)
{
	d10_setup(f, s);
	/* the model covers the grown size: zeros after the old end */
	if (s->model_len < s->param) {
		s->model = realloc(s->model, s->param);
		memset(s->model + s->model_len, 0, s->param - s->model_len);
	}
}

static void d10_flush_steps(void)
{
	static const int errs[] = { -EIO, ENOSPC };   /* positive: torn */
	unsigned bad;
	size_t len;

	struct scenario a = { .name = "D10 flush after writes, overwrites and discards (4 KiB clusters)", .setup = d10_setup,
			      .op = flush_op, .model_len = 4u << 20 };
	a.bytes = create_bytes(4u << 20, 12, 4, 3, &a.len);
	bad = sweep(&a, QFAULT_PWRITE | QFAULT_FLUSH, errs, 2, 1, NULL);
	printf("# D10 flush: %u fault points broke the rule\n", bad);
	free(a.bytes);
	free(a.model);

	/* resize inside the L1 cluster: L1 and header fields in one flush */
	struct scenario b = { .name = "D10 resize (L1 entries and header in the flush, 64 KiB clusters)",
			      .setup = d10_resize_setup, .op = d10_resize_op, .model_len = 8u << 20, .param = 1536u << 20 };
	b.bytes = create_bytes(8u << 20, 16, 4, 3, &b.len);
	bad = sweep(&b, QFAULT_PWRITE | QFAULT_FLUSH, errs, 2, 1, NULL);
	printf("# D10 resize: %u fault points broke the rule\n", bad);
	/* the scenario resized the model: use only the first 8 MiB next time */
	free(b.bytes);
	free(b.model);

	/* the flush that grows the refcount table (64-bit refcounts: one
	 * table cluster covers 2 MiB of file) */
	struct scenario c = { .name = "D10 flush growing the refcount table (512-byte clusters, 64-bit refcounts)",
			      .setup = big_write_setup, .op = flush_op, .model_len = 3u << 20 };
	c.bytes = create_bytes(4u << 20, 9, 6, 3, &c.len);
	bad = sweep(&c, QFAULT_PWRITE | QFAULT_FLUSH, errs, 2, 4, d3_pick);
	printf("# D10 refcount-table growth: %u fault points broke the rule\n", bad);
	free(c.bytes);
	free(c.model);
	(void)len;
}

/* ---- D8: no waits inside a resolved request ------------------------------
 *
 * A write resolved its first cluster (written in place) and then had to
 * grow the file while a truncation ran: it waited inside its resolution,
 * unregistered.  Meanwhile the guest discarded that first cluster and the
 * recycler erased it (no registered request stopped it) and made it
 * available; the write then went on into the freed cluster, and its data
 * for that guest cluster was lost.  Now the write gives back what it
 * resolved, waits, and resolves again. */
struct d8_writer {
	struct qcow_image *img;
	const uint8_t *buf;
	size_t len;
	ssize_t ret;
};

static void *d8_write_main(void *arg)
{
	struct d8_writer *w = arg;
	w->ret = qcow_image_write(w->img, w->buf, w->len, 0);
	return NULL;
}

static void d8_wait_in_resolve(void)
{
	const uint64_t cs = 4096;
	size_t len;
	uint8_t *bytes = create_bytes(1u << 20, 12, 4, 3, &len);
	struct qcow_open_opts o = test_opts(0);
	o.recycler = true;     /* the eraser must run during the wait */
	o.compact = false;     /* but no compaction or trim (they truncate) */
	struct qcow_io *io = qcow_io_mem_new(bytes, len);
	struct qcow_image *img = NULL;
	char err[256];
	REQUIRE(qcow_image_open_io(io, &o, &img, err, sizeof(err)) == 0, "D8 wait: open: %s", err);
	uint8_t *old = malloc(cs), *buf = malloc(2 * cs), *got = malloc(2 * cs);
	fill_random(old, cs);
	fill_random(buf, 2 * cs);
	REQUIRE(qcow_image_write(img, old, cs, 0) == (ssize_t)cs, "D8 wait: first cluster");
	REQUIRE(qcow_image_flush(img) == 0, "D8 wait: flush");
	/* no Available cluster left, and a truncation in progress: the next
	 * allocation has to wait for it */
	pthread_mutex_lock(&img->lock);
	for (uint64_t c = qcow_map_lowest_available(&img->map); c != UINT64_MAX; c = qcow_map_lowest_available(&img->map))
		qcow_map_set_state(&img->map, c, QCS_ROOTS);
	img->truncating = true;
	pthread_mutex_unlock(&img->lock);

	struct d8_writer w = { .img = img, .buf = buf, .len = 2 * cs };
	pthread_t th;
	pthread_create(&th, NULL, d8_write_main, &w);
	usleep(200 * 1000);
	/* the guest discards the first cluster; the recycler erases it and a
	 * flush makes it Available */
	CHECK(qcow_image_discard(img, 0, cs) == 0, "D8 wait: discard");
	for (int i = 0; i < 40; i++) {
		usleep(50 * 1000);
		pthread_mutex_lock(&img->lock);
		bool done = img->map.count[QCS_JUNK] == 0 && img->map.count[QCS_ERASING] == 0 &&
			    img->map.count[QCS_ERASED] == 0 && img->map.count[QCS_FLUSHING] == 0;
		pthread_mutex_unlock(&img->lock);
		if (done)
			break;
	}
	pthread_mutex_lock(&img->lock);
	CHECK(img->claims_len == 0 && img->map.count[QCS_ROOTS] > 0,
	      "D8 wait: the waiting write holds %zu claims", img->claims_len);
	img->truncating = false;
	pthread_cond_broadcast(&img->truncate_done);
	pthread_mutex_unlock(&img->lock);
	pthread_join(th, NULL);
	CHECK(w.ret == (ssize_t)(2 * cs), "D8 wait: the write returned %zd", w.ret);
	REQUIRE(qcow_image_read(img, got, 2 * cs, 0) == (ssize_t)(2 * cs), "D8 wait: read");
	CHECK(memcmp(got, buf, cs) == 0, "D8 wait: the write's first cluster was lost (written into a cluster "
	      "the discard freed while the write waited inside its resolution)");
	CHECK(memcmp(got + cs, buf + cs, cs) == 0, "D8 wait: the write's second cluster reads wrong");
	qcow_image_close(img);
	free(bytes);
	free(old);
	free(buf);
	free(got);
}

int main(int argc, char **argv)
{
	verbose = getenv("ERRORS_VERBOSE") != NULL;
	qcow_log_set_sink(sink, NULL);
	REQUIRE(test_sh(NULL, "qemu-img --version && qemu-io --version") == 0, "qemu-img and qemu-io are needed");
	const char *only = argc > 1 ? argv[1] : NULL;
#define RUN(name, fn) do { if (!only || strcmp(only, name) == 0) { unsigned b_ = tap_failed; fn(); \
	printf("# %s: %s\n", name, tap_failed == b_ ? "passed" : "FAILED"); } } while (0)
	RUN("D1", d1_failed_overwrite);
	RUN("D1-autoflush", d1_autoflush);
	RUN("D2", d2_cache_eviction);
	RUN("D3", d3_reftable_switch);
	RUN("D7", d7_qemu_size);
	RUN("D8", d8_pinned_after_failed_flush);
	RUN("D8-resize-race", d8_resize_race);
	RUN("D8-wait", d8_wait_in_resolve);
	RUN("D9", d9_failed_compaction);
	RUN("D10", d10_flush_steps);
	return tap_done();
}
