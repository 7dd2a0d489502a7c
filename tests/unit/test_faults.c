/*
 * test_faults.c - the randomized fault campaign of issue 6: thousands of
 * (workload, fault point) pairs.
 *
 * First a few checks of the fault backend itself.  Then each round takes a
 * fresh small image (several cluster sizes and refcount widths, some made
 * by QEMU with internal snapshots and compressed clusters), arms ONE fault
 * (the nth pread, pwrite, flush, punch, truncate or copy fails with EIO or
 * ENOSPC, torn or not) or a full host disk (a space limit lifted later),
 * and runs a random workload of writes (whole, partial, over compressed or
 * shared clusters), reads, discards, flushes, grows and compactions (the
 * recycler is off, so compaction runs in this thread) against a byte-array
 * model.  Rules checked:
 *  - while open every acknowledged write reads back; a failed write or
 *    discard leaves each 512-byte sector of its range old or new, and
 *    exactly old when the fault was not torn and the write lay in one
 *    guest cluster;
 *  - after the fault the workload goes on; an operation the engine fails
 *    after the fault has fired is allowed only if the engine says it is
 *    in the failed state (qcow_image_get_stats: failed), which ends the
 *    workload;
 *  - close returning 0 means clean: qcow_check finds no errors and no
 *    leaks, and the reopened image holds every acknowledged write;
 *  - close returning an error: no errors in qcow_check (leaks allowed) and
 *    every sector not written since the last successful flush holds that
 *    flush's data after reopening;
 *  - qemu-img check agrees (every 50th round and the last).
 * Each round runs in a child process, so that an abort (runtime_asserts)
 * or a crash costs one round, not the campaign.  The seed and round of
 * every failure are printed; details for the first few.
 *
 * FAULT_ROUNDS (default 2000) sets the number of rounds, FAULT_SEED the
 * seed, FAULT_ROUND=n runs round n only, with an operation trace and the
 * engine's log, FAULT_DETAILS=1 describes every failing round (not only
 * the first 8).
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void quiet(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)level;
	(void)msg;
	(void)opaque;
}

static void loud(enum qcow_log_level level, const char *msg, void *opaque)
{
	(void)opaque;
	if (level <= QCOW_LOG_WARNING)
		fprintf(stderr, "    engine: %s\n", msg);
}

/* ---- the fault backend itself -------------------------------------------- */

static void backend_checks(void)
{
	uint8_t buf[4096], zero[4096] = { 0 };
	memset(buf, 0xab, sizeof(buf));
	struct rec_io *r = rec_new(NULL, 0);
	struct qcow_io *io = qcow_io_fault_new(&r->io);
	REQUIRE(io, "qcow_io_fault_new");
	/* the 3rd pwrite fails once, then writes work again */
	qcow_io_fault_arm(io, QFAULT_PWRITE, 3, -EIO);
	CHECK(io->ops->pwrite(io, buf, 512, 0) == 0 && io->ops->pwrite(io, buf, 512, 512) == 0, "pwrites 1-2");
	CHECK(!qcow_io_fault_fired(io), "not fired before the 3rd call");
	CHECK(io->ops->flush(io) == 0, "a flush does not count towards a pwrite fault");
	CHECK(io->ops->pwrite(io, buf, 512, 1024) == -EIO, "the 3rd pwrite fails");
	CHECK(qcow_io_fault_fired(io), "fired");
	CHECK(io->ops->pwrite(io, buf, 512, 1024) == 0, "the 4th pwrite works again");
	CHECK(qcow_io_fault_count(io, QFAULT_PWRITE) == 4 && qcow_io_fault_count(io, QFAULT_FLUSH) == 1 &&
	      qcow_io_fault_count(io, QFAULT_ALL) == 5, "counts");
	/* torn: the prefix up to the middle (512-byte boundary) is written */
	qcow_io_fault_arm(io, QFAULT_PWRITE | QFAULT_TORN, 1, -ENOSPC);
	CHECK(io->ops->pwrite(io, buf, 4096, 8192) == -ENOSPC, "torn write fails");
	uint8_t got[4096];
	io->ops->pread(io, got, 4096, 8192);
	CHECK(memcmp(got, buf, 2048) == 0 && memcmp(got + 2048, zero, 2048) == 0, "torn write left its first half only");
	/* a failing copy, torn */
	qcow_io_fault_arm(io, QFAULT_COPY | QFAULT_TORN, 1, -EIO);
	CHECK(io->ops->copy(io, 8192, 16384, 2048) == -EIO, "torn copy fails");
	io->ops->pread(io, got, 2048, 16384);
	CHECK(memcmp(got, buf, 1024) == 0 && memcmp(got + 1024, zero, 1024) == 0, "torn copy copied its first half");
	/* other kinds, any of several */
	qcow_io_fault_arm(io, QFAULT_PUNCH | QFAULT_TRUNCATE | QFAULT_PREAD, 2, -EIO);
	CHECK(io->ops->punch(io, 0, 512) == 0, "punch 1");
	int64_t sz = io->ops->size(io);
	CHECK(io->ops->truncate(io, 65536) == -EIO && io->ops->size(io) == sz, "truncate 2 fails and changes nothing");
	CHECK(io->ops->pread(io, got, 512, 0) == 0 && memcmp(got, zero, 512) == 0, "then reads work");
	/* space limit: growth past it fails, writes inside the file do not */
	qcow_io_fault_set_space_limit(io, 20000);
	CHECK(io->ops->pwrite(io, buf, 512, 0) == 0, "write inside the file under a limit");
	CHECK(io->ops->truncate(io, 18432) == 0, "truncate under the limit");
	CHECK(io->ops->pwrite(io, buf, 4096, 18432) == -ENOSPC, "write past the limit");
	CHECK(io->ops->truncate(io, 30000) == -ENOSPC && io->ops->truncate(io, 19000) == 0, "truncate against the limit");
	CHECK(io->ops->copy(io, 0, 19500, 1024) == -ENOSPC, "copy past the limit");
	qcow_io_fault_set_space_limit(io, UINT64_MAX);
	CHECK(io->ops->pwrite(io, buf, 4096, 18432) == 0, "limit lifted");
	qcow_io_fault_arm(io, QFAULT_ALL, 0, -EIO);
	CHECK(!qcow_io_fault_fired(io), "disarmed");
	CHECK(qcow_io_fault_inner(io) == &r->io, "inner");
	qcow_io_close(io);
	rec_free(r);
}

/* Many threads: the armed call fails exactly once, and every call is
 * counted. */
struct hammer { struct qcow_io *io; unsigned fails; };

static void *hammer_main(void *arg)
{
	struct hammer *h = arg;
	uint8_t buf[512];
	memset(buf, 0x5c, sizeof(buf));
	for (unsigned i = 0; i < 2000; i++) {
		int r = (i % 3) ? h->io->ops->pwrite(h->io, buf, sizeof(buf), (uint64_t)(i % 64) * 512)
				: h->io->ops->flush(h->io);
		if (r)
			h->fails++;
	}
	return NULL;
}

static void backend_threads(void)
{
	struct rec_io *r = rec_new(NULL, 0);
	struct qcow_io *io = qcow_io_fault_new(&r->io);
	qcow_io_fault_arm(io, QFAULT_PWRITE | QFAULT_FLUSH, 3777, -EIO);
	pthread_t t[4];
	struct hammer h[4];
	for (int i = 0; i < 4; i++) {
		h[i] = (struct hammer){ .io = io };
		pthread_create(&t[i], NULL, hammer_main, &h[i]);
	}
	unsigned fails = 0;
	for (int i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		fails += h[i].fails;
	}
	CHECK(fails == 1 && qcow_io_fault_fired(io), "4 threads: %u calls failed, want exactly 1", fails);
	CHECK(qcow_io_fault_count(io, QFAULT_PWRITE | QFAULT_FLUSH) == 8000, "4 threads: %llu calls counted, want 8000",
	      (unsigned long long)qcow_io_fault_count(io, QFAULT_PWRITE | QFAULT_FLUSH));
	qcow_io_close(io);
	rec_free(r);
}

/* ---- base images, made once ------------------------------------------------ */

struct base {
	const char *name;
	uint8_t *bytes;
	size_t len;
	uint8_t *guest;          /* what QEMU reads from it */
	uint64_t size, cs;
	uint64_t special, special_len;   /* compressed / shared data lies here */
};
static struct base bases[12];
static unsigned nbases;

static void add_base(const char *name, uint64_t cs, uint64_t special, uint64_t special_len, const char *script_fmt, ...)
	__attribute__((format(printf, 5, 6)));
static void add_base(const char *name, uint64_t cs, uint64_t special, uint64_t special_len, const char *script_fmt, ...)
{
	char img[64], raw[64], script[2048];
	test_tmp_path(img, sizeof(img), "fbase");
	test_tmp_path(raw, sizeof(raw), "fraw");
	unlink(img);
	va_list ap;
	va_start(ap, script_fmt);
	vsnprintf(script, sizeof(script), script_fmt, ap);
	va_end(ap);
	/* IMG in the script is the image path */
	int q = test_sh(NULL, "IMG='%s'; %s && qemu-img convert -O raw \"$IMG\" '%s'", img, script, raw);
	REQUIRE(q == 0, "making base image %s failed (%d): %s", name, q, script);
	struct base *b = &bases[nbases++];
	b->name = name;
	b->cs = cs;
	b->bytes = test_slurp(img, &b->len);
	size_t glen;
	b->guest = test_slurp(raw, &glen);
	b->size = glen;
	b->special = special;
	b->special_len = special_len;
	unlink(img);
	unlink(raw);
}

static void make_bases(void)
{
	add_base("fresh, 64 KiB clusters", 65536, 0, 0, "qemu-img create -q -f qcow2 \"$IMG\" 2M");
	add_base("fresh, 4 KiB clusters", 4096, 0, 0, "qemu-img create -q -f qcow2 -o cluster_size=4096 \"$IMG\" 1M");
	add_base("512-byte clusters, 64-bit refcounts, data", 512, 0, 0,
		 "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 \"$IMG\" 512K && "
		 "qemu-io -f qcow2 -c 'write -P 0x21 0 64k' -c 'write -P 0x22 200k 30k' \"$IMG\" >/dev/null");
	/* the refcount table (one cluster: 2 MiB of file) must grow soon */
	add_base("512-byte clusters, 64-bit refcounts, 1.98 MiB of data", 512, 0, 0,
		 "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 \"$IMG\" 2560K && "
		 "qemu-io -f qcow2 -c 'write -P 0x41 0 1980k' \"$IMG\" >/dev/null");
	add_base("512-byte clusters, compat 0.10, data", 512, 0, 0,
		 "qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 \"$IMG\" 512K && "
		 "qemu-io -f qcow2 -c 'write -P 0x31 4k 100k' \"$IMG\" >/dev/null");
	add_base("internal snapshot, 4 KiB clusters", 4096, 0, 640 << 10,
		 "qemu-img create -q -f qcow2 -o cluster_size=4096 \"$IMG\" 1M && "
		 "qemu-io -f qcow2 -c 'write -P 0x11 0 256k' -c 'write -P 0x12 512k 128k' \"$IMG\" >/dev/null && "
		 "qemu-img snapshot -c s1 \"$IMG\" && qemu-io -f qcow2 -c 'write -P 0x13 128k 64k' \"$IMG\" >/dev/null");
	add_base("compressed, 4 KiB clusters", 4096, 0, 512 << 10,
		 "R=\"$IMG.raw\"; qemu-img create -q -f raw \"$R\" 1M && "
		 "qemu-io -f raw -c 'write -P 0x61 0 100k' -c 'write -P 0x62 100k 150k' -c 'write -P 0x63 300k 212k' \"$R\" >/dev/null && "
		 "qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 \"$R\" \"$IMG\" && rm -f \"$R\"");
	add_base("compressed and a snapshot, 64 KiB clusters", 65536, 0, 768 << 10,
		 "R=\"$IMG.raw\"; qemu-img create -q -f raw \"$R\" 1M && "
		 "qemu-io -f raw -c 'write -P 0x71 0 400k' -c 'write -P 0x72 400k 368k' \"$R\" >/dev/null && "
		 "qemu-img convert -c -f raw -O qcow2 \"$R\" \"$IMG\" && rm -f \"$R\" && qemu-img snapshot -c s1 \"$IMG\" && "
		 "qemu-io -f qcow2 -c 'write -P 0x73 64k 64k' \"$IMG\" >/dev/null");
}

/* ---- one round ------------------------------------------------------------- */

enum category {
	CAT_NONE,
	CAT_FAILED_WRITE,      /* a failed write/discard left other contents */
	CAT_READ,              /* acknowledged data reads back wrong while open */
	CAT_UNEXPECTED,        /* an operation failed with no fault, or the
				  engine refused without saying it failed */
	CAT_DIRTY_CLOSE,       /* close 0 but qcow_check errors */
	CAT_LEAKY_CLOSE,       /* close 0 but leaks */
	CAT_ERRORS,            /* close failed and qcow_check errors */
	CAT_REOPEN,            /* the image does not open again */
	CAT_LOST,              /* after a clean close, data differs */
	CAT_LOST_FLUSHED,      /* after a failed close, flushed data differs */
	CAT_QEMU,              /* qemu-img check disagrees */
	CAT_MAP,               /* map invariant broken */
	CAT_CRASH,             /* the round died (signal, abort, REQUIRE) */
	CAT_NOT_RECOVERED,     /* a flush succeeded after the fault, yet the
				  closed image has errors or leaks */
	CAT_COUNT
};
static const char *cat_names[CAT_COUNT] = {
	"none",
	"a failed write or discard left a sector neither old nor new (or not old after a non-torn fault in one cluster)",
	"acknowledged data read back wrong while open",
	"an operation failed with no fault active, or the engine refused one without stats.failed",
	"close returned 0 but qcow_check finds errors",
	"close returned 0 but qcow_check finds leaks",
	"close failed and qcow_check finds errors",
	"the closed image does not open again",
	"after a clean close the reopened image differs from the model",
	"after a failed close data of the last successful flush is lost",
	"qemu-img check disagrees with qcow_check or finds corruption",
	"cluster map invariant broken",
	"the round died (abort, crash or a failed requirement)",
	"a flush succeeded after the fault, yet the closed image has errors or leaks",
};

static bool details;
static bool trace;
static bool all_details;   /* FAULT_DETAILS: describe every failing round */   /* FAULT_ROUND: print every operation */

static void trace_op(const char *what, long long ret, bool fired_now)
{
	if (trace)
		fprintf(stderr, "    %s -> %lld%s\n", what, ret, fired_now ? "  <- the fault fired here" : "");
}
static unsigned long long campaign_seed = 0xfa017;
static enum category first_cat;
static unsigned round_no;

static char round_desc[256];
#define FCHECK(cat, cond, ...) do { if (!(cond)) { \
	if (!first_cat && details) fprintf(stderr, "%s", round_desc); \
	if (!first_cat) first_cat = (cat); \
	if (details) { fprintf(stderr, "  round %u: ", round_no); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } \
	} } while (0)

struct rstate {
	unsigned long long rs;
	struct base *b;
	struct rec_io *rec;
	struct qcow_io *fio;
	struct qcow_image *img;
	uint64_t size, cap, cs;
	uint8_t *model, *flushed, *dirty;   /* dirty: per sector since the last good flush */
	unsigned fault_ops;                  /* armed kinds (QFAULT_TORN included) */
	bool limit_on;
	bool limit_used;                     /* the disk was full at some point */
	bool refused;                        /* the engine is in its failed state */
	bool flushed_after_fault;
	char what[160];
};

static uint64_t rnd(struct rstate *s, uint64_t n) { return n ? tap_rand(&s->rs) % n : 0; }

static void fill(struct rstate *s, uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i += 8) {
		unsigned long long r = tap_rand(&s->rs);
		memcpy(p + i, &r, n - i < 8 ? n - i : 8);
	}
}

static void mark_dirty(struct rstate *s, uint64_t off, uint64_t len)
{
	for (uint64_t sec = off / 512; sec <= (off + len - 1) / 512; sec++)
		s->dirty[sec] = 1;
}

static void grow_model(struct rstate *s, uint64_t ns)
{
	if (ns > s->cap) {
		s->model = realloc(s->model, ns);
		s->flushed = realloc(s->flushed, ns);
		s->dirty = realloc(s->dirty, ns / 512 + 1);
		memset(s->model + s->cap, 0, ns - s->cap);
		memset(s->flushed + s->cap, 0, ns - s->cap);
		memset(s->dirty + s->cap / 512, 0, ns / 512 + 1 - s->cap / 512);
		s->cap = ns;
	}
	/* bytes past the old size read as zeros, in the model too */
	memset(s->model + s->size, 0, ns - s->size);
	s->size = ns;
}

/* An operation failed.  Returns true when that was the fault (or the
 * engine's declared failed state); records a failure otherwise. */
static bool failure_expected(struct rstate *s, bool fired_now, int ret)
{
	if (fired_now || s->limit_on)
		return true;
	struct qcow_stats st;
	qcow_image_get_stats(s->img, &st);
	if (st.failed) {
		s->refused = true;
		return true;
	}
	FCHECK(CAT_UNEXPECTED, false, "%s failed (%d, %s) with no fault active and stats.failed false%s", s->what, ret,
	       strerror(-ret), qcow_io_fault_fired(s->fio) ? " (the fault fired earlier)" : " (the fault has not fired)");
	s->refused = true;   /* nothing sensible follows */
	return true;
}

/* After a failed write or discard of [off, off+n) with new contents nw:
 * each sector old or new; exactly old if not torn in one cluster. */
static void check_failed_range(struct rstate *s, uint64_t off, uint64_t n, const uint8_t *nw, bool may_be_new)
{
	uint8_t *got = malloc(n);
	ssize_t r = qcow_image_read(s->img, got, n, off);
	if (r != (ssize_t)n) {
		FCHECK(CAT_UNEXPECTED, false, "read after the failed %s returned %zd", s->what, r);
		free(got);
		return;
	}
	const uint8_t *old = s->model + off;
	for (uint64_t sec = off & ~511ull; sec < off + n; sec += 512) {
		uint64_t a = sec < off ? off : sec, e = sec + 512 > off + n ? off + n : sec + 512;
		bool is_old = memcmp(got + (a - off), old + (a - off), e - a) == 0;
		bool is_new = memcmp(got + (a - off), nw + (a - off), e - a) == 0;
		if (!(is_old || (may_be_new && is_new))) {
			FCHECK(CAT_FAILED_WRITE, false, "after the failed %s, sector at %llu holds %s (byte 0x%02x, old 0x%02x, new 0x%02x)",
			       s->what, (unsigned long long)sec, is_new ? "the new data although nothing was torn" : "neither old nor new data",
			       got[a - off], old[a - off], nw[a - off]);
			break;
		}
	}
	/* from now on the model is what the engine shows */
	memcpy(s->model + off, got, n);
	mark_dirty(s, off, n);
	free(got);
}

static void do_write(struct rstate *s)
{
	uint64_t cs = s->cs, off, n;
	unsigned shape = (unsigned)rnd(s, 5);
	if (shape == 4) {
		/* large: new L2 tables, refcount blocks, file growth */
		off = rnd(s, s->size);
		n = 1 + rnd(s, 64 * cs < (256u << 10) ? 64 * cs : (256u << 10));
	} else if (shape == 3 && s->b->special_len && s->b->special + s->b->special_len <= s->size) {
		off = s->b->special + rnd(s, s->b->special_len);
		n = rnd(s, 2) ? cs - off % cs : 1 + rnd(s, cs);
		if (rnd(s, 2))
			off -= off % cs;   /* whole clusters over compressed or shared ones */
	} else if (shape == 0) {
		off = rnd(s, s->size / cs) * cs;
		n = cs * (1 + rnd(s, 3));
	} else if (shape == 1) {
		off = rnd(s, s->size);
		n = 1 + rnd(s, cs - off % cs);
	} else {
		off = rnd(s, s->size);
		n = 1 + rnd(s, 3 * cs);
	}
	if (off >= s->size)
		off = s->size - 1;
	if (n > s->size - off)
		n = s->size - off;
	uint8_t *buf = malloc(n);
	fill(s, buf, n);
	snprintf(s->what, sizeof(s->what), "write %llu+%llu", (unsigned long long)off, (unsigned long long)n);
	bool before = qcow_io_fault_fired(s->fio);
	ssize_t r = qcow_image_write(s->img, buf, n, off);
	bool fired_now = !before && qcow_io_fault_fired(s->fio);
	trace_op(s->what, r, fired_now);
	if (r == (ssize_t)n) {
		memcpy(s->model + off, buf, n);
		mark_dirty(s, off, n);
	} else if (failure_expected(s, fired_now, (int)r)) {
		bool one_cluster = off / cs == (off + n - 1) / cs;
		bool torn = fired_now && (s->fault_ops & QFAULT_TORN) && (s->fault_ops & (QFAULT_PWRITE | QFAULT_COPY));
		check_failed_range(s, off, n, buf, torn || !one_cluster);
	}
	free(buf);
}

static void do_discard(struct rstate *s)
{
	uint64_t off = rnd(s, s->size), n = 1 + rnd(s, rnd(s, 4) ? 4 * s->cs : s->size / 4);
	if (n > s->size - off)
		n = s->size - off;
	snprintf(s->what, sizeof(s->what), "discard %llu+%llu", (unsigned long long)off, (unsigned long long)n);
	bool before = qcow_io_fault_fired(s->fio);
	int r = rnd(s, 4) ? qcow_image_discard(s->img, off, n) : qcow_image_zero(s->img, off, n);
	bool fired_now = !before && qcow_io_fault_fired(s->fio);
	trace_op(s->what, r, fired_now);
	if (r == 0) {
		memset(s->model + off, 0, n);
		mark_dirty(s, off, n);
	} else if (failure_expected(s, fired_now, r)) {
		uint8_t *zeros = calloc(1, n);
		check_failed_range(s, off, n, zeros, true);
		free(zeros);
	}
}

static void good_flush(struct rstate *s)
{
	memcpy(s->flushed, s->model, s->size);
	memset(s->dirty, 0, s->size / 512 + 1);
	/* after the fault: it fired, or the full disk has space again */
	if (qcow_io_fault_fired(s->fio) || (s->limit_used && !s->limit_on))
		s->flushed_after_fault = true;
}

static void do_flush_or_compact(struct rstate *s, bool compact)
{
	snprintf(s->what, sizeof(s->what), compact ? "compaction" : "flush");
	bool before = qcow_io_fault_fired(s->fio);
	int r = compact ? qcow_image_compact(s->img, NULL, NULL) : qcow_image_flush(s->img);
	bool fired_now = !before && qcow_io_fault_fired(s->fio);
	trace_op(s->what, r, fired_now);
	if (r == 0)
		good_flush(s);   /* a compaction ends with a flush */
	else
		failure_expected(s, fired_now, r);
}

static void do_resize(struct rstate *s)
{
	/* small steps, or doubling (the L1 table of 512-byte clusters
	 * outgrows its cluster at 2 MiB) */
	uint64_t ns = rnd(s, 2) ? s->size + s->cs * (1 + rnd(s, 16)) : 2 * s->size;
	snprintf(s->what, sizeof(s->what), "resize to %llu", (unsigned long long)ns);
	bool before = qcow_io_fault_fired(s->fio);
	int r = qcow_image_resize(s->img, ns);
	bool fired_now = !before && qcow_io_fault_fired(s->fio);
	trace_op(s->what, r, fired_now);
	uint64_t now = qcow_image_size(s->img);
	if (r != 0)
		failure_expected(s, fired_now, r);
	FCHECK(CAT_UNEXPECTED, now == ns || (r != 0 && now == s->size), "%s returned %d and left the size %llu", s->what, r,
	       (unsigned long long)now);
	if (now > s->size)
		grow_model(s, now);
}

static void do_read(struct rstate *s)
{
	uint64_t off = rnd(s, s->size), n = 1 + rnd(s, 4 * s->cs);
	if (n > s->size - off)
		n = s->size - off;
	snprintf(s->what, sizeof(s->what), "read %llu+%llu", (unsigned long long)off, (unsigned long long)n);
	uint8_t *buf = malloc(n);
	bool before = qcow_io_fault_fired(s->fio);
	ssize_t r = qcow_image_read(s->img, buf, n, off);
	bool fired_now = !before && qcow_io_fault_fired(s->fio);
	trace_op(s->what, r, fired_now);
	if (r == (ssize_t)n) {
		uint64_t i = memcmp(buf, s->model + off, n) ? 0 : n;
		while (i < n && buf[i] == s->model[off + i])
			i++;
		FCHECK(CAT_READ, i == n, "%s: byte %llu reads 0x%02x, acknowledged 0x%02x", s->what, (unsigned long long)(off + i),
		       i < n ? buf[i] : 0, i < n ? s->model[off + i] : 0);
	} else if (!fired_now) {
		failure_expected(s, false, (int)r);
	}
	free(buf);
}

static struct qcow_image *open_bytes(struct rec_io **rec, struct qcow_io **fio, const uint8_t *bytes, size_t len,
				     size_t cache, char *err, size_t errlen)
{
	struct qcow_open_opts o;
	test_open_opts(&o, cache);
	*rec = rec_new(bytes, len);
	*fio = qcow_io_fault_new(&(*rec)->io);
	struct qcow_image *img = NULL;
	if (qcow_image_open_io(*fio, &o, &img, err, errlen)) {
		qcow_io_close(*fio);
		return NULL;
	}
	return img;
}

static const char *kind_name(unsigned ops)
{
	switch (ops & QFAULT_ALL) {
	case QFAULT_PREAD: return "pread";
	case QFAULT_PWRITE: return "pwrite";
	case QFAULT_FLUSH: return "flush";
	case QFAULT_PUNCH: return "punch";
	case QFAULT_TRUNCATE: return "truncate";
	case QFAULT_COPY: return "copy";
	}
	return "?";
}

/* One round; returns the category of its first failure (0: passed);
 * *fired_out: whether the fault fired (or the disk was full). */
static enum category one_round(unsigned round, bool with_qemu, bool *fired_out, unsigned *kind_out)
{
	struct rstate s = { 0 };
	char err[256] = "";
	round_no = round;
	first_cat = CAT_NONE;
	s.rs = campaign_seed ^ (0x9e3779b97f4a7c15ull * (round + 1));
	s.b = &bases[rnd(&s, nbases)];
	s.cs = s.b->cs;
	s.size = s.cap = s.b->size;
	s.model = malloc(s.size);
	s.flushed = malloc(s.size);
	s.dirty = calloc(1, s.size / 512 + 1);
	memcpy(s.model, s.b->guest, s.size);
	memcpy(s.flushed, s.b->guest, s.size);
	size_t cache = rnd(&s, 3) ? 0 : 16 * s.cs;   /* small caches evict and flush by themselves */
	s.img = open_bytes(&s.rec, &s.fio, s.b->bytes, s.b->len, cache, err, sizeof(err));
	REQUIRE(s.img, "round %u: open %s: %s", round, s.b->name, err);

	/* the fault */
	static const unsigned kinds[] = { QFAULT_PREAD, QFAULT_PWRITE, QFAULT_PWRITE, QFAULT_FLUSH,
					  QFAULT_PUNCH, QFAULT_TRUNCATE, QFAULT_COPY, QFAULT_PWRITE };
	static const uint64_t spread[] = { 10, 60, 60, 12, 3, 3, 3, 60 };
	unsigned nops = 10 + (unsigned)rnd(&s, 40);
	unsigned limit_at = UINT32_MAX, lift_at = UINT32_MAX;
	char fault_desc[128];
	if (rnd(&s, 8) == 0) {
		limit_at = (unsigned)rnd(&s, nops / 2);
		lift_at = limit_at + 1 + (unsigned)rnd(&s, nops / 2);
		snprintf(fault_desc, sizeof(fault_desc), "host disk full from op %u to op %u", limit_at, lift_at);
	} else {
		unsigned k = (unsigned)rnd(&s, sizeof(kinds) / sizeof(kinds[0]));
		uint64_t nth = 1 + rnd(&s, spread[k]);
		int e = rnd(&s, 2) ? -EIO : -ENOSPC;
		s.fault_ops = kinds[k] | (rnd(&s, 2) ? QFAULT_TORN : 0);
		qcow_io_fault_arm(s.fio, s.fault_ops, nth, e);
		snprintf(fault_desc, sizeof(fault_desc), "%s %llu fails with %s%s", kind_name(s.fault_ops), (unsigned long long)nth,
			 strerror(-e), (s.fault_ops & QFAULT_TORN) ? ", torn" : "");
	}
	snprintf(round_desc, sizeof(round_desc), "  round %u: seed 0x%llx, %s, %u operations, %s\n", round, campaign_seed,
		 s.b->name, nops, fault_desc);
	if (trace)
		fprintf(stderr, "%s", round_desc);

	for (unsigned op = 0; op < nops && !s.refused; op++) {
		if (op == limit_at) {
			int64_t fsz = s.fio->ops->size(s.fio);
			qcow_io_fault_set_space_limit(s.fio, (uint64_t)(fsz > 0 ? fsz : 0) + rnd(&s, 4) * s.cs);
			s.limit_on = s.limit_used = true;
		}
		if (op == lift_at) {
			qcow_io_fault_set_space_limit(s.fio, UINT64_MAX);
			s.limit_on = false;
		}
		unsigned k = (unsigned)rnd(&s, 100);
		if (k < 45)
			do_write(&s);
		else if (k < 57)
			do_discard(&s);
		else if (k < 70)
			do_read(&s);
		else if (k < 84)
			do_flush_or_compact(&s, false);
		else if (k < 95)
			do_flush_or_compact(&s, true);
		else if (s.size < s.b->size * 4 && s.size < (3u << 20))
			do_resize(&s);
	}
	if (s.limit_on) {
		qcow_io_fault_set_space_limit(s.fio, UINT64_MAX);
		s.limit_on = false;
	}
	bool fired = qcow_io_fault_fired(s.fio) || limit_at != UINT32_MAX;
	*fired_out = fired;
	*kind_out = s.fault_ops & QFAULT_ALL;
	qcow_io_fault_arm(s.fio, 0, 0, 0);

	/* everything acknowledged reads back while open */
	if (!s.refused) {
		uint8_t *all = malloc(s.size);
		ssize_t r = qcow_image_read(s.img, all, s.size, 0);
		uint64_t i = r == (ssize_t)s.size && memcmp(all, s.model, s.size) == 0 ? s.size : 0;
		while (r == (ssize_t)s.size && i < s.size && all[i] == s.model[i])
			i++;
		FCHECK(CAT_READ, r == (ssize_t)s.size && i == s.size, "at the end, guest byte %llu reads 0x%02x, acknowledged 0x%02x (read %zd)",
		       (unsigned long long)i, i < s.size ? all[i] : 0, i < s.size ? s.model[i] : 0, r);
		free(all);
	}
	pthread_mutex_lock(&s.img->lock);
	const char *bad = qcow_map_check(&s.img->map);
	pthread_mutex_unlock(&s.img->lock);
	FCHECK(CAT_MAP, !bad, "map invariant: %s", bad);

	struct qcow_stats st;
	qcow_image_get_stats(s.img, &st);
	int c = qcow_image_close(s.img);
	size_t len;
	const uint8_t *bytes = rec_bytes(s.rec, &len);
	struct qcow_check_result cr;
	int q = -1;
	char qout[1024] = "";
	check_image_bytes(bytes, len, &cr, with_qemu ? &q : NULL, qout, sizeof(qout));
	if (c == 0) {
		FCHECK(CAT_DIRTY_CLOSE, cr.errors == 0, "close returned 0, qcow_check finds %llu errors (fault %s)",
		       (unsigned long long)cr.errors, fired ? "fired" : "did not fire");
		FCHECK(CAT_LEAKY_CLOSE, cr.leaks == 0, "close returned 0, qcow_check finds %llu leaks (fault %s)",
		       (unsigned long long)cr.leaks, fired ? "fired" : "did not fire");
	} else {
		FCHECK(CAT_ERRORS, cr.errors == 0, "close returned %d (%s), qcow_check finds %llu errors", c, strerror(-c),
		       (unsigned long long)cr.errors);
		FCHECK(CAT_UNEXPECTED, fired, "close returned %d (%s) although the fault never fired", c, strerror(-c));
	}
	FCHECK(CAT_NOT_RECOVERED, !s.flushed_after_fault || (cr.errors == 0 && cr.leaks == 0),
	       "a flush succeeded after the fault; after close (returned %d) qcow_check finds %llu errors, %llu leaks", c,
	       (unsigned long long)cr.errors, (unsigned long long)cr.leaks);
	if (with_qemu) {
		bool agree = (q == 0 && cr.errors == 0 && cr.leaks == 0) || (q == 3 && cr.errors == 0 && cr.leaks > 0) ||
			     (q == 2 && cr.errors > 0);
		FCHECK(CAT_QEMU, agree, "qemu-img check exits %d, qcow_check %llu errors %llu leaks: %.300s", q,
		       (unsigned long long)cr.errors, (unsigned long long)cr.leaks, qout);
	}

	/* reopen: a clean close kept everything, a failed one what was flushed */
	struct rec_io *rec2;
	struct qcow_io *fio2;
	struct qcow_image *img2 = open_bytes(&rec2, &fio2, bytes, len, 0, err, sizeof(err));
	FCHECK(CAT_REOPEN, img2, "the closed image does not open: %s", err);
	if (img2) {
		uint64_t sz = qcow_image_size(img2);
		FCHECK(c ? CAT_LOST_FLUSHED : CAT_LOST, sz >= s.size || c, "reopened size %llu, expected %llu",
		       (unsigned long long)sz, (unsigned long long)s.size);
		uint64_t n = sz < s.size ? sz : s.size;
		uint8_t *all = malloc(n ? n : 1);
		ssize_t r = qcow_image_read(img2, all, n, 0);
		FCHECK(CAT_REOPEN, r == (ssize_t)n, "reading the reopened image: %zd", r);
		if (r == (ssize_t)n) {
			uint64_t lost = 0, first = 0;
			const uint8_t *want0 = c == 0 ? s.model : s.flushed;
			bool same = memcmp(all, want0, n) == 0;
			for (uint64_t sec = 0; !same && sec * 512 < n; sec++) {
				uint64_t a = sec * 512, l = n - a < 512 ? n - a : 512;
				const uint8_t *want = c == 0 ? s.model : s.flushed;
				if (c && s.dirty[sec])
					continue;
				if (memcmp(all + a, want + a, l) && lost++ == 0)
					first = a;
			}
			FCHECK(c ? CAT_LOST_FLUSHED : CAT_LOST, lost == 0,
			       "after %s close %llu sectors differ, the first at %llu (reads 0x%02x, expected 0x%02x)",
			       c ? "a failed" : "a clean", (unsigned long long)lost, (unsigned long long)first, all[first],
			       (c ? s.flushed : s.model)[first]);
		}
		free(all);
		qcow_image_close(img2);
	}
	rec_free(rec2);
	rec_free(s.rec);
	free(s.model);
	free(s.flushed);
	free(s.dirty);
	(void)st;
	return first_cat;
}

/* Campaign totals (parent). */
static unsigned failed, fired_rounds, per_cat[CAT_COUNT], first_round[CAT_COUNT];

struct result {
	unsigned round;
	int code;        /* 10 + category, + 50 if the fault fired */
	unsigned kind;   /* the fault's kind (enum qcow_fault_op), 0: full disk */
};
static unsigned fired_by_kind[7];   /* index: bit of the kind, 6: full disk */

static void tally(unsigned round, int code, int status, unsigned kind)
{
	if (code >= 60) {
		unsigned k = 6;
		for (unsigned i = 0; i < 6; i++)
			if (kind & (1u << i))
				k = i;
		fired_by_kind[k]++;
		fired_rounds++;
		code -= 50;
	}
	enum category cat = code >= 10 && code - 10 < CAT_COUNT ? (enum category)(code - 10) : CAT_CRASH;
	if (cat == CAT_NONE)
		return;
	{   /* one line for every failing round; the worker printed the details of the first ones */
		fprintf(stderr, "FAIL round %u (seed 0x%llx): %s", round, campaign_seed, cat_names[cat]);
		if (cat == CAT_CRASH && WIFSIGNALED(status))
			fprintf(stderr, " (signal %d)", WTERMSIG(status));
		else if (cat == CAT_CRASH && WIFEXITED(status))
			fprintf(stderr, " (exit status %d)", WEXITSTATUS(status));
		fputc('\n', stderr);
	}
	failed++;
	per_cat[cat]++;
	if (first_round[cat] == UINT32_MAX)
		first_round[cat] = round;
}

static void worker(int fd, unsigned from, unsigned rounds, unsigned failed_before)
{
	unsigned seen = failed_before;
	for (unsigned r = from; r < rounds; r++) {
		details = seen < 8 || all_details;
		bool f = false;
		unsigned kind = 0;
		enum category cat = one_round(r, r % 50 == 0 || r + 1 == rounds, &f, &kind);
		seen += cat != CAT_NONE;
		fflush(stdout);
		fflush(stderr);
		struct result res = { r, 10 + (int)cat + (f ? 50 : 0), kind };
		if (write(fd, &res, sizeof(res)) != (ssize_t)sizeof(res))
			_exit(2);
	}
	_exit(0);
}

int main(void)
{
	qcow_log_set_sink(quiet, NULL);
	REQUIRE(test_sh(NULL, "qemu-img --version && qemu-io --version") == 0, "qemu-img and qemu-io are needed");
	backend_checks();
	backend_threads();
	make_bases();

	const char *env = getenv("FAULT_ROUNDS");
	unsigned rounds = env ? (unsigned)atoi(env) : 2000;
	if ((env = getenv("FAULT_SEED")))
		campaign_seed = strtoull(env, NULL, 0);
	unsigned only = UINT32_MAX;
	all_details = getenv("FAULT_DETAILS") != NULL;
	if ((env = getenv("FAULT_ROUND"))) {
		only = (unsigned)atoi(env);
		qcow_log_set_sink(loud, NULL);
		trace = true;
	}
	printf("# fault campaign: seed 0x%llx, %u rounds, %u base images\n", campaign_seed, rounds, nbases);
	unsigned first = 0;
	if (only != UINT32_MAX) {
		first = only;
		rounds = only + 1;
	}
	for (unsigned c = 0; c < CAT_COUNT; c++)
		first_round[c] = UINT32_MAX;
	fflush(stdout);
	fflush(stderr);
	/* A worker process runs the rounds in order and reports each on a
	 * pipe; when it dies, the round it did not report is a crash and a
	 * new worker goes on after it. */
	for (unsigned next = first; next < rounds;) {
		int fds[2];
		REQUIRE(pipe(fds) == 0, "pipe");
		pid_t pid = fork();
		REQUIRE(pid >= 0, "fork");
		if (pid == 0) {
			close(fds[0]);
			worker(fds[1], next, rounds, failed);
		}
		close(fds[1]);
		struct result res;
		while (read(fds[0], &res, sizeof(res)) == (ssize_t)sizeof(res)) {
			tally(res.round, res.code, 0, res.kind);
			next = res.round + 1;
		}
		close(fds[0]);
		int status;
		REQUIRE(waitpid(pid, &status, 0) == pid, "waitpid");
		if (next < rounds) {
			tally(next, -1, status, 0);
			next++;
		}
	}
	for (unsigned c = 1; c < CAT_COUNT; c++)
		if (per_cat[c])
			printf("# %u rounds: %s (first: round %u)\n", per_cat[c], cat_names[c], first_round[c]);
	printf("# the fault fired (or the disk was full) in %u rounds: pread %u, pwrite %u, flush %u, punch %u, "
	       "truncate %u, copy %u, full disk %u\n", fired_rounds, fired_by_kind[0], fired_by_kind[1], fired_by_kind[2],
	       fired_by_kind[3], fired_by_kind[4], fired_by_kind[5], fired_by_kind[6]);
	printf("# %u of %u rounds failed; replay one with FAULT_SEED=0x%llx FAULT_ROUND=n\n", failed,
	       only != UINT32_MAX ? 1 : rounds, campaign_seed);
	CHECK(failed == 0, "%u of %u fault rounds failed", failed, only != UINT32_MAX ? 1 : rounds);
	return tap_done();
}
