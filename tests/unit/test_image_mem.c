/*
 * test_image_mem.c - the whole engine on the memory backend.
 *
 * For cluster sizes 512, 4096 and 65536 and refcount orders 0, 4 and 6
 * (plus one version-2 image): an image made by qcow_create is opened over
 * a memory backend (wrapped so that its bytes outlive qcow_image_close),
 * then a random workload runs against a sparse shadow of the raw view:
 * unaligned writes crossing cluster and L2-table boundaries, reads,
 * discards and zero ranges of whole and partial clusters, SEEK_DATA /
 * SEEK_HOLE, flushes (no on-disk refcount below the map's projection, and
 * exactly the projection after one more flush), compactions, and a resize
 * that grows the virtual size (for 512-byte clusters past the L1 table's
 * cluster, so the L1 moves; for 512-byte clusters with 64-bit refcounts
 * far enough that the refcount table grows) with writes beyond the old
 * end.  qcow_map_check runs after every step.  At the end the image is
 * closed, its bytes are reopened (same contents, same map counts), checked
 * with qcow_check (0 errors, 0 leaks) and with qemu-img check and
 * qemu-img compare against the shadow.
 *
 * Then: qcow_image_compact with the recycler off (write, discard most,
 * compact: the file shrinks, contents survive, checks stay clean); partial
 * discards of holes (they stay holes) and of the disk's partial last
 * cluster (released); a refcount block move cancelled by a flush (no
 * leak may survive); QEMU-made images with internal snapshots and with
 * compressed clusters (copy-on-write, discards, compaction; QEMU still
 * reads the snapshot and the shadow); hostile L1/L2/refcount-table
 * pointers (open refuses them by name without writing; qcow_check agrees
 * with qemu-img check); read-only, corrupt and dirty images.
 * IMAGE_MEM_SEED and IMAGE_MEM_ROUNDS (environment) replay another random
 * sequence or scale it up.
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned long long seed = 0x1a9e0ull;
static bool have_qemu_img;
static unsigned tmp_counter;

/* ---- a backend wrapper whose bytes survive qcow_image_close ------------- */

struct keep_io {
	struct qcow_io io;
	struct qcow_io *inner;
	bool closed;
};

#define KEEP(x) ((struct keep_io *)(x))

static int k_pread(struct qcow_io *io, void *buf, size_t len, uint64_t off)
{
	return KEEP(io)->inner->ops->pread(KEEP(io)->inner, buf, len, off);
}
static int k_pwrite(struct qcow_io *io, const void *buf, size_t len, uint64_t off)
{
	return KEEP(io)->inner->ops->pwrite(KEEP(io)->inner, buf, len, off);
}
static int k_flush(struct qcow_io *io) { return KEEP(io)->inner->ops->flush(KEEP(io)->inner); }
static int k_punch(struct qcow_io *io, uint64_t off, uint64_t len)
{
	return KEEP(io)->inner->ops->punch(KEEP(io)->inner, off, len);
}
static int k_truncate(struct qcow_io *io, uint64_t size) { return KEEP(io)->inner->ops->truncate(KEEP(io)->inner, size); }
static int64_t k_size(struct qcow_io *io) { return KEEP(io)->inner->ops->size(KEEP(io)->inner); }
static int64_t k_allocated(struct qcow_io *io) { return KEEP(io)->inner->ops->allocated(KEEP(io)->inner); }
static int k_copy(struct qcow_io *io, uint64_t src, uint64_t dst, uint64_t len)
{
	return KEEP(io)->inner->ops->copy(KEEP(io)->inner, src, dst, len);
}
static void k_close(struct qcow_io *io) { KEEP(io)->closed = true; }

static const struct qcow_io_ops keep_ops = {
	.pread = k_pread, .pwrite = k_pwrite, .flush = k_flush, .punch = k_punch, .truncate = k_truncate,
	.size = k_size, .allocated = k_allocated, .copy = k_copy, .lock = NULL, .close = k_close,
};

static struct keep_io *keep_new(const void *data, size_t len)
{
	struct keep_io *k = calloc(1, sizeof(*k));
	k->inner = qcow_io_mem_new(data, len);
	REQUIRE(k->inner != NULL, "memory backend of %zu bytes", len);
	k->io.ops = &keep_ops;
	k->io.name = "kept-memory";
	return k;
}

static void keep_free(struct keep_io *k)
{
	qcow_io_close(k->inner);
	free(k);
}

/* ---- images -------------------------------------------------------------- */

static void tmp_path(char *buf, size_t len, const char *what)
{
	snprintf(buf, len, "/tmp/qcowfs-test-image-mem-%d-%u-%s.qcow2", (int)getpid(), tmp_counter++, what);
}

static uint8_t *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	REQUIRE(f != NULL, "open %s", path);
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	uint8_t *b = malloc(n ? (size_t)n : 1);
	REQUIRE(fread(b, 1, (size_t)n, f) == (size_t)n, "read %s", path);
	fclose(f);
	*len = (size_t)n;
	return b;
}

static void spill(const char *path, const uint8_t *b, size_t len)
{
	FILE *f = fopen(path, "wb");
	REQUIRE(f != NULL, "create %s", path);
	REQUIRE(fwrite(b, 1, len, f) == len, "write %s", path);
	fclose(f);
}

static struct qcow_open_opts test_opts(size_t cache_bytes)
{
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.no_locking = true;
	o.runtime_asserts = true;
	o.recycler = false;
	o.cache_bytes = cache_bytes;
	return o;
}

static struct qcow_image *open_io(struct qcow_io *io, size_t cache_bytes)
{
	struct qcow_open_opts o = test_opts(cache_bytes);
	struct qcow_image *img = NULL;
	char err[512] = "";
	int ret = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	REQUIRE(ret == 0, "qcow_image_open_io: %d %s", ret, err);
	return img;
}

static int run(const char *cmd, const char *log)
{
	char full[4200];
	snprintf(full, sizeof(full), "( %s ) > %s 2>&1", cmd, log);
	int st = system(full);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void show_log(const char *log)
{
	FILE *f = fopen(log, "r");
	if (!f)
		return;
	char line[512];
	int n = 0;
	while (fgets(line, sizeof(line), f) && n++ < 30)
		fprintf(stderr, "  | %s", line);
	fclose(f);
}

/* ---- the shadow of the raw view ------------------------------------------- */

#define PAGE 4096u

struct shadow {
	uint64_t size;
	unsigned cluster_bits;
	uint8_t **page;      /* NULL = zeros */
	uint64_t npages;
	uint8_t *alloc;      /* guest cluster has data (per the L2 table) */
	uint64_t nclusters;
};

static void shadow_resize(struct shadow *s, uint64_t size)
{
	uint64_t np = (size + PAGE - 1) / PAGE, nc = (size + (1ull << s->cluster_bits) - 1) >> s->cluster_bits;
	s->page = realloc(s->page, (np ? np : 1) * sizeof(*s->page));
	for (uint64_t i = s->npages; i < np; i++)
		s->page[i] = NULL;
	s->alloc = realloc(s->alloc, nc ? nc : 1);
	if (nc > s->nclusters)
		memset(s->alloc + s->nclusters, 0, nc - s->nclusters);
	s->npages = np;
	s->nclusters = nc;
	s->size = size;
}

static void shadow_free(struct shadow *s)
{
	for (uint64_t i = 0; i < s->npages; i++)
		free(s->page[i]);
	free(s->page);
	free(s->alloc);
}

static void shadow_write(struct shadow *s, const uint8_t *buf, uint64_t off, uint64_t len)
{
	for (uint64_t done = 0; done < len;) {
		uint64_t p = (off + done) / PAGE, o = (off + done) % PAGE;
		uint64_t n = PAGE - o < len - done ? PAGE - o : len - done;
		if (buf) {
			if (!s->page[p])
				s->page[p] = calloc(1, PAGE);
			memcpy(s->page[p] + o, buf + done, n);
		} else if (s->page[p]) {
			memset(s->page[p] + o, 0, n);
		}
		done += n;
	}
}

static void shadow_read(const struct shadow *s, uint8_t *out, uint64_t off, uint64_t len)
{
	for (uint64_t done = 0; done < len;) {
		uint64_t p = (off + done) / PAGE, o = (off + done) % PAGE;
		uint64_t n = PAGE - o < len - done ? PAGE - o : len - done;
		if (s->page[p])
			memcpy(out + done, s->page[p] + o, n);
		else
			memset(out + done, 0, n);
		done += n;
	}
}

/* ---- checks -------------------------------------------------------------------- */

static unsigned fails;
#define ICHECK(cond, ...) do { if (!(cond)) { if (fails++ < 25) CHECK(cond, __VA_ARGS__); } else CHECK(1, "ok"); } while (0)

static const char *cfg_name = "";

static void check_map(struct qcow_image *img, const char *after)
{
	const char *bad = qcow_map_check(&img->map);
	ICHECK(bad == NULL, "%s: map after %s: %s", cfg_name, after, bad);
}

static bool compare_range(struct qcow_image *img, const struct shadow *s, uint64_t off, uint64_t len, const char *what)
{
	uint8_t *a = malloc(len ? len : 1), *b = malloc(len ? len : 1);
	ssize_t r = qcow_image_read(img, a, len, off);
	shadow_read(s, b, off, len);
	bool ok = r == (ssize_t)len && memcmp(a, b, len) == 0;
	if (!ok) {
		uint64_t at = 0;
		while (at < len && a[at] == b[at])
			at++;
		ICHECK(ok, "%s: %s: read [%llu, +%llu) returned %zd, first difference at %llu (got %02x want %02x)", cfg_name,
		       what, (unsigned long long)off, (unsigned long long)len, r, (unsigned long long)(off + at),
		       at < len ? a[at] : 0, at < len ? b[at] : 0);
	}
	free(a);
	free(b);
	return ok;
}

/* Expected SEEK_DATA / SEEK_HOLE from the allocation model. */
static int64_t expect_seek(const struct shadow *s, uint64_t off, int whence)
{
	if (off >= s->size)
		return -ENXIO;
	uint64_t cs = 1ull << s->cluster_bits;
	for (uint64_t gc = off >> s->cluster_bits; gc < s->nclusters; gc++)
		if ((bool)s->alloc[gc] == (whence == SEEK_DATA)) {
			uint64_t r = gc * cs;
			return (int64_t)(r < off ? off : r);
		}
	return whence == SEEK_DATA ? -ENXIO : (int64_t)s->size;
}

static void check_seek(struct qcow_image *img, const struct shadow *s, uint64_t off)
{
	for (int w = 0; w < 2; w++) {
		int whence = w ? SEEK_HOLE : SEEK_DATA;
		int64_t got = qcow_image_seek(img, off, whence);
		int64_t want = expect_seek(s, off, whence);
		ICHECK(got == want, "%s: seek(%llu, %s) = %lld, expected %lld", cfg_name, (unsigned long long)off,
		       w ? "SEEK_HOLE" : "SEEK_DATA", (long long)got, (long long)want);
	}
}

/* Everything: walk data extents with SEEK_DATA/SEEK_HOLE (so no data shows
 * up where the model has holes) and read every data extent. */
static void verify_all(struct qcow_image *img, const struct shadow *s, const char *what)
{
	ICHECK(qcow_image_size(img) == s->size, "%s: %s: size %llu, shadow %llu", cfg_name, what,
	       (unsigned long long)qcow_image_size(img), (unsigned long long)s->size);
	uint64_t pos = 0;
	unsigned extents = 0;
	while (pos < s->size && extents < 100000) {
		int64_t d = qcow_image_seek(img, pos, SEEK_DATA);
		int64_t wd = expect_seek(s, pos, SEEK_DATA);
		if (d != wd) {
			ICHECK(d == wd, "%s: %s: SEEK_DATA from %llu = %lld, expected %lld", cfg_name, what,
			       (unsigned long long)pos, (long long)d, (long long)wd);
			break;
		}
		if (d < 0)
			break;
		int64_t h = qcow_image_seek(img, (uint64_t)d, SEEK_HOLE);
		int64_t wh = expect_seek(s, (uint64_t)d, SEEK_HOLE);
		if (h != wh) {
			ICHECK(h == wh, "%s: %s: SEEK_HOLE from %lld = %lld, expected %lld", cfg_name, what, (long long)d,
			       (long long)h, (long long)wh);
			break;
		}
		for (uint64_t o = (uint64_t)d; o < (uint64_t)h; o += 1u << 20) {
			uint64_t n = (uint64_t)h - o < (1u << 20) ? (uint64_t)h - o : (1u << 20);
			if (!compare_range(img, s, o, n, what))
				break;
		}
		pos = (uint64_t)h;
		extents++;
	}
	/* and the shadow has nothing outside the data extents */
	uint64_t cs = 1ull << s->cluster_bits;
	bool stray = false;
	for (uint64_t p = 0; p < s->npages && !stray; p++) {
		if (!s->page[p])
			continue;
		for (unsigned k = 0; k < PAGE; k++)
			if (s->page[p][k] && !s->alloc[(p * PAGE + k) / cs]) {
				ICHECK(false, "%s: %s: shadow has data at %llu in a hole cluster (test bug)", cfg_name, what,
				       (unsigned long long)(p * PAGE + k));
				stray = true;
				break;
			}
	}
}

/* Compares the on-disk refcounts with what the map wants: *low counts
 * clusters whose refcount is below it (corruption), *high those above (a
 * leak).  With show, lists the first differences on stderr. */
static void refcount_diff(struct qcow_image *img, uint64_t *low, uint64_t *high, bool show)
{
	uint64_t cs = img->cluster_size, per = 1ull << img->rb_shift;
	uint8_t *blk = malloc(cs);
	unsigned shown = 0;
	*low = *high = 0;
	uint64_t nblocks = (img->map.nclusters + per - 1) / per;
	if (nblocks < img->reftable_entries)
		nblocks = img->reftable_entries;
	for (uint64_t b = 0; b < nblocks; b++) {
		uint64_t host = b < img->reftable_entries ? img->reftable[b] : 0;
		if (!host && b * per >= img->map.nclusters)
			continue;
		if (host)
			img->io->ops->pread(img->io, blk, cs, host);
		else
			memset(blk, 0, cs);
		for (uint64_t i = 0; i < per; i++) {
			uint64_t c = b * per + i;
			uint64_t disk = qcow_rc_get(blk, img->hdr.refcount_order, i);
			uint64_t want = qcow_map_want_refcount(&img->map, c);
			if (disk == want)
				continue;
			if (disk < want)
				(*low)++;
			else
				(*high)++;
			if (show && shown++ < 8)
				fprintf(stderr, "  cluster %llu (0x%llx): on disk %llu, map wants %llu, state %s\n",
					(unsigned long long)c, (unsigned long long)(c * cs), (unsigned long long)disk,
					(unsigned long long)want,
					c < img->map.nclusters ? qcow_map_state_name(qcow_map_state(&img->map, c)) : "past the map");
		}
	}
	if (show)
		fprintf(stderr, "  refcount table: %u clusters at 0x%llx\n", img->hdr.refcount_table_clusters,
			(unsigned long long)img->hdr.refcount_table_offset);
	free(blk);
}

/* Called right after a flush: no refcount on disk may be below what the
 * map wants.  A flush may leave leaks behind (a refcount table it replaced
 * is freed only when it ends), but the next flush must leave the disk
 * exactly equal to the map's projection. */
static void check_refcounts(struct qcow_image *img, const char *after)
{
	uint64_t low, high;
	refcount_diff(img, &low, &high, false);
	ICHECK(low == 0, "%s: after %s, %llu on-disk refcounts are below the references", cfg_name, after,
	       (unsigned long long)low);
	if (low)
		refcount_diff(img, &low, &high, true);
	int r = qcow_image_flush(img);
	ICHECK(r == 0, "%s: second flush after %s: %d", cfg_name, after, r);
	refcount_diff(img, &low, &high, false);
	ICHECK(low == 0 && high == 0, "%s: after %s and one more flush, %llu refcounts too low and %llu too high", cfg_name,
	       after, (unsigned long long)low, (unsigned long long)high);
	if (low || high)
		refcount_diff(img, &low, &high, true);
	int64_t d = qcow_refcounts_compare(img);
	ICHECK(d == 0, "%s: after %s, qcow_refcounts_compare finds %lld differences", cfg_name, after, (long long)d);
}

static void fill_random(uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i += 8) {
		uint64_t r = tap_rand(&seed);
		memcpy(b + i, &r, n - i < 8 ? n - i : 8);
	}
}

/* ---- the workload ------------------------------------------------------------- */

struct cfg {
	unsigned cluster_bits, order, version;
	uint64_t size, grow_to;
	size_t cache_bytes;
	unsigned ops;
};

/* A random offset near an interesting place: 0, the end, a cluster or an
 * L2-table boundary, the old end after a resize. */
static uint64_t hot_offset(const struct shadow *s, uint64_t old_end)
{
	uint64_t cs = 1ull << s->cluster_bits, l2span = (cs / 8) * cs;
	uint64_t base;
	switch (tap_rand(&seed) % 6) {
	case 0: base = 0; break;
	case 1: base = s->size; break;
	case 2: base = old_end; break;
	case 3: base = (tap_rand(&seed) % (s->size / l2span + 1)) * l2span; break;
	case 4: base = (tap_rand(&seed) % (s->nclusters + 1)) * cs; break;
	default: base = tap_rand(&seed) % (s->size < 64 * cs ? s->size : 64 * cs); break;
	}
	int64_t delta = (int64_t)(tap_rand(&seed) % (4 * cs)) - (int64_t)(2 * cs);
	int64_t o = (int64_t)base + delta;
	if (o < 0)
		o = 0;
	if ((uint64_t)o >= s->size)
		o = (int64_t)(s->size - 1 - tap_rand(&seed) % (cs < s->size ? cs : s->size));
	return (uint64_t)o;
}

static void do_write(struct qcow_image *img, struct shadow *s, uint64_t off, uint64_t len)
{
	if (off + len > s->size)
		len = s->size - off;
	if (!len)
		return;
	uint8_t *b = malloc(len);
	fill_random(b, len);
	if (tap_rand(&seed) % 8 == 0)
		memset(b, 0, len / 2);   /* zeros inside data are data too */
	ssize_t r = qcow_image_write(img, b, len, off);
	ICHECK(r == (ssize_t)len, "%s: write [%llu, +%llu) returned %zd", cfg_name, (unsigned long long)off,
	       (unsigned long long)len, r);
	shadow_write(s, b, off, len);
	uint64_t cs = 1ull << s->cluster_bits;
	for (uint64_t gc = off / cs; gc <= (off + len - 1) / cs; gc++)
		s->alloc[gc] = 1;
	free(b);
}

/* Discard or zero.  Whole clusters become holes; the disk's last cluster
 * counts as whole when the range covers it from its start to the end of
 * the disk.  Partially covered clusters are zeroed in place: one with data
 * keeps it (zeros now), a hole stays a hole. */
static void do_discard(struct qcow_image *img, struct shadow *s, uint64_t off, uint64_t len, bool zero)
{
	uint64_t cs = 1ull << s->cluster_bits;
	if (off + len > s->size)
		len = s->size - off;
	if (!len)
		return;
	uint64_t end = off + len;
	int r = zero ? qcow_image_zero(img, off, len) : qcow_image_discard(img, off, len);
	ICHECK(r == 0, "%s: %s [%llu, +%llu) returned %d", cfg_name, zero ? "zero" : "discard", (unsigned long long)off,
	       (unsigned long long)len, r);
	shadow_write(s, NULL, off, len);
	for (uint64_t gc = off / cs; gc <= (end - 1) / cs; gc++) {
		uint64_t a = gc * cs, b = a + cs < s->size ? a + cs : s->size;
		if (off <= a && end >= b)
			s->alloc[gc] = 0;
	}
}

static void workload(const struct cfg *c)
{
	char name[96];
	snprintf(name, sizeof(name), "v%u cs=%u order=%u", c->version, 1u << c->cluster_bits, c->order);
	cfg_name = name;
	uint64_t cs = 1ull << c->cluster_bits;
	size_t len;
	uint8_t *bytes = create_bytes(c->size, c->cluster_bits, c->order, c->version, &len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, c->cache_bytes);
	struct shadow s = { .cluster_bits = c->cluster_bits };
	shadow_resize(&s, c->size);
	check_map(img, "open");
	verify_all(img, &s, "fresh image");
	uint64_t old_end = c->size;
	uint64_t l1_offset0 = img->hdr.l1_table_offset;
	unsigned compactions = 0;

	for (unsigned i = 0; i < c->ops && fails < 25; i++) {
		char what[64];
		unsigned op = (unsigned)(tap_rand(&seed) % 100);
		if (i == c->ops / 2 && c->grow_to) {
			/* grow; for small clusters the L1 table has to move */
			uint32_t l1_cap = img->l1_capacity;
			int r = qcow_image_resize(img, c->grow_to);
			ICHECK(r == 0, "%s: resize to %llu: %d", cfg_name, (unsigned long long)c->grow_to, r);
			uint64_t per_l1 = (cs / 8) * cs;
			uint64_t need = (c->grow_to + per_l1 - 1) / per_l1;
			if (need > l1_cap)
				ICHECK(img->hdr.l1_table_offset != l1_offset0 && img->l1_capacity >= need,
				       "%s: L1 table moved for %llu entries (capacity %u)", cfg_name, (unsigned long long)need,
				       img->l1_capacity);
			old_end = s.size;
			shadow_resize(&s, c->grow_to);
			check_map(img, "resize");
			verify_all(img, &s, "after resize");
			/* write right across the old end and at the new end */
			do_write(img, &s, old_end - cs / 2 - 3, cs + 100);
			do_write(img, &s, s.size - 2 * cs - 5, 2 * cs + 5);
			if (c->cluster_bits == 9) {
				/* 2.5 MiB more data: with 64-bit refcounts one
				 * refcount table cluster covers only 2 MiB of file */
				for (uint64_t o = old_end + cs; o < old_end + (5u << 19); o += 64 * 1024)
					do_write(img, &s, o + 3, 64 * 1024);
			}
			check_map(img, "writes after resize");
			continue;
		}
		if (op < 40) {
			uint64_t off = hot_offset(&s, old_end);
			uint64_t n = 1 + tap_rand(&seed) % (3 * cs);
			do_write(img, &s, off, n);
			snprintf(what, sizeof(what), "write %u", i);
		} else if (op < 45) {
			/* a long write across at least one L2 table boundary */
			uint64_t l2span = (cs / 8) * cs;
			uint64_t n = l2span < (1u << 20) ? l2span + cs * 3 + 7 : (1u << 20) + 7;
			uint64_t b = (tap_rand(&seed) % (s.size / l2span + 1)) * l2span;
			uint64_t off = b > n / 2 ? b - n / 2 : 0;
			if (off < s.size)
				do_write(img, &s, off, n);
			snprintf(what, sizeof(what), "long write %u", i);
		} else if (op < 60) {
			uint64_t off = hot_offset(&s, old_end);
			uint64_t n = 1 + tap_rand(&seed) % (6 * cs);
			do_discard(img, &s, off, n, false);
			snprintf(what, sizeof(what), "discard %u", i);
		} else if (op < 65) {
			uint64_t off = hot_offset(&s, old_end);
			uint64_t n = 1 + tap_rand(&seed) % (3 * cs);
			do_discard(img, &s, off, n, true);
			snprintf(what, sizeof(what), "zero %u", i);
		} else if (op < 80) {
			uint64_t off = hot_offset(&s, old_end);
			uint64_t n = 1 + tap_rand(&seed) % (4 * cs);
			if (off + n > s.size)
				n = s.size - off;
			compare_range(img, &s, off, n, "random read");
			snprintf(what, sizeof(what), "read %u", i);
		} else if (op < 90) {
			check_seek(img, &s, hot_offset(&s, old_end));
			check_seek(img, &s, tap_rand(&seed) % (s.size + 2 * cs));
			snprintf(what, sizeof(what), "seek %u", i);
		} else if (op < 98) {
			int r = qcow_image_flush(img);
			ICHECK(r == 0, "%s: flush: %d", cfg_name, r);
			check_refcounts(img, "flush");
			snprintf(what, sizeof(what), "flush %u", i);
		} else {
			/* compaction in the middle of the workload (recycler off:
			 * it runs here and now) */
			int64_t before = k->inner->ops->size(k->inner);
			int r = qcow_image_compact(img, NULL, NULL);
			ICHECK(r == 0, "%s: compact at step %u: %d", cfg_name, i, r);
			int64_t after = k->inner->ops->size(k->inner);
			ICHECK(after <= before, "%s: compaction grew the file from %lld to %lld", cfg_name, (long long)before,
			       (long long)after);
			snprintf(what, sizeof(what), "compact %u", i);
			check_map(img, what);
			verify_all(img, &s, what);
			check_refcounts(img, what);
			compactions++;
		}
		check_map(img, what);
	}
	verify_all(img, &s, "end of workload");
	printf("# %s: %u compactions during the workload\n", cfg_name, compactions);
	/* edge cases of the range checks */
	uint8_t byte = 0x5a;
	ICHECK(qcow_image_write(img, &byte, 1, s.size) == -EINVAL, "%s: write at the end is -EINVAL", cfg_name);
	ICHECK(qcow_image_write(img, &byte, 2, s.size - 1) == -EINVAL, "%s: write across the end is -EINVAL", cfg_name);
	ICHECK(qcow_image_read(img, &byte, 1, UINT64_MAX) == -EINVAL, "%s: read at 2^64-1 is -EINVAL", cfg_name);
	ICHECK(qcow_image_discard(img, s.size, 1) == -EINVAL, "%s: discard past the end is -EINVAL", cfg_name);
	ICHECK(qcow_image_read(img, &byte, 0, s.size) == 0, "%s: empty read at the end", cfg_name);
	ICHECK(qcow_image_seek(img, s.size, SEEK_DATA) == -ENXIO && qcow_image_seek(img, s.size, SEEK_HOLE) == -ENXIO,
	       "%s: seek at the end is -ENXIO", cfg_name);
	ICHECK(qcow_image_seek(img, 0, SEEK_SET) == -EINVAL, "%s: seek with SEEK_SET is -EINVAL", cfg_name);
	/* a shrink by one sector and a grow back: the sector reads zeros
	 * (a whole cluster past the end is unmapped, a partial one zeroed) */
	ICHECK(qcow_image_resize(img, s.size - 512) == 0, "%s: shrinking by a sector", cfg_name);
	shadow_write(&s, NULL, s.size - 512, 512);
	if (cs == 512)
		s.alloc[s.nclusters - 1] = 0;
	ICHECK(qcow_image_resize(img, s.size) == 0, "%s: growing back after the shrink", cfg_name);
	ICHECK(qcow_image_resize(img, s.size) == 0, "%s: resize to the same size", cfg_name);
	do_write(img, &s, s.size - 1, 1);   /* the very last byte */
	compare_range(img, &s, s.size - 1, 1, "last byte");

	ICHECK(qcow_image_flush(img) == 0, "%s: final flush", cfg_name);
	check_refcounts(img, "final flush");
	check_map(img, "final flush");

	/* what the reopened map must show */
	const struct qcow_map *m = &img->map;
	uint64_t last = qcow_map_last_block(m);
	uint64_t free_below = 0;
	for (uint64_t cl = 0; last != UINT64_MAX && cl < last; cl++) {
		enum qcow_cstate st = qcow_map_state(m, cl);
		if (st == QCS_JUNK || st == QCS_ERASED || st == QCS_AVAILABLE)
			free_below++;
	}
	uint64_t n_ref = m->count[QCS_REF], n_pinned = m->count[QCS_PINNED];
	ICHECK(m->count[QCS_ROOTS] == 0 && m->count[QCS_COPIES] == 0 && m->count[QCS_PENDING] == 0 &&
	       m->nmoves_active == 0, "%s: nothing in flight after the final flush", cfg_name);
	struct qcow_stats st;
	qcow_image_get_stats(img, &st);
	ICHECK(st.virtual_size == s.size && st.cluster_size == cs && st.clusters_total == m->nclusters,
	       "%s: stats geometry", cfg_name);

	printf("# %s: %llu clusters in the map (last block %llu), L1 %u entries at 0x%llx, refcount table %u clusters at 0x%llx\n",
	       cfg_name, (unsigned long long)m->nclusters, (unsigned long long)last, img->hdr.l1_size, (unsigned long long)img->hdr.l1_table_offset,
	       img->hdr.refcount_table_clusters, (unsigned long long)img->hdr.refcount_table_offset);
	ICHECK(c->cluster_bits != 9 || c->order != 6 || img->hdr.refcount_table_clusters > 1,
	       "%s: the refcount table grew (the workload writes more than one table cluster covers)", cfg_name);
	int r = qcow_image_close(img);
	ICHECK(r == 0, "%s: close: %d", cfg_name, r);
	ICHECK(k->closed, "%s: close closed the backend", cfg_name);
	size_t flen;
	const uint8_t *fb = qcow_io_mem_data(k->inner, &flen);
	uint8_t *final = malloc(flen);
	memcpy(final, fb, flen);
	ICHECK(last == UINT64_MAX || flen == (last + 1) * cs, "%s: file ends after the last block (%zu bytes, last block %llu)",
	       cfg_name, flen, (unsigned long long)last);

	/* reopen the bytes */
	struct keep_io *k2 = keep_new(final, flen);
	img = open_io(&k2->io, c->cache_bytes);
	check_map(img, "reopen");
	m = &img->map;
	ICHECK(m->count[QCS_REF] == n_ref && m->count[QCS_PINNED] == n_pinned,
	       "%s: reopened map has %llu referenced / %llu pinned, before close %llu / %llu", cfg_name,
	       (unsigned long long)m->count[QCS_REF], (unsigned long long)m->count[QCS_PINNED], (unsigned long long)n_ref,
	       (unsigned long long)n_pinned);
	ICHECK(m->count[QCS_JUNK] == free_below && m->count[QCS_AVAILABLE] == 0 && m->nclusters == flen / cs,
	       "%s: reopened map: %llu junk (expected %llu), %llu available, %llu clusters", cfg_name,
	       (unsigned long long)m->count[QCS_JUNK], (unsigned long long)free_below,
	       (unsigned long long)m->count[QCS_AVAILABLE], (unsigned long long)m->nclusters);
	check_refcounts(img, "reopen (no repair needed)");
	verify_all(img, &s, "reopened");
	qcow_image_close(img);
	size_t l2;
	const uint8_t *after = qcow_io_mem_data(k2->inner, &l2);
	ICHECK(l2 == flen && memcmp(after, final, flen) == 0, "%s: open + close without writes changes nothing", cfg_name);
	keep_free(k2);

	/* offline checks on a real file */
	char path[256], raw[256], log[256], cmd[1024], err[256] = "";
	tmp_path(path, sizeof(path), "final");
	tmp_path(raw, sizeof(raw), "raw");
	tmp_path(log, sizeof(log), "log");
	spill(path, final, flen);
	struct qcow_check_result res;
	r = qcow_check(path, &res, err, sizeof(err));
	ICHECK(r == 0 && res.errors == 0 && res.leaks == 0, "%s: qcow_check: ret %d, %llu errors, %llu leaks %s", cfg_name, r,
	       (unsigned long long)res.errors, (unsigned long long)res.leaks, err);
	uint64_t data_clusters = 0;
	for (uint64_t gc = 0; gc < s.nclusters; gc++)
		data_clusters += s.alloc[gc];
	ICHECK(r != 0 || res.allocated_clusters == data_clusters, "%s: qcow_check counts %llu data clusters, model %llu",
	       cfg_name, (unsigned long long)res.allocated_clusters, (unsigned long long)data_clusters);
	if (have_qemu_img) {
		snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s'", path);
		int q = run(cmd, log);
		ICHECK(q == 0, "%s: qemu-img check exited %d", cfg_name, q);
		if (q)
			show_log(log);
		/* qemu reads the same bytes as the shadow */
		int fd = open(raw, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		REQUIRE(fd >= 0, "create %s", raw);
		for (uint64_t p = 0; p < s.npages; p++)
			if (s.page[p]) {
				uint64_t n = s.size - p * PAGE < PAGE ? s.size - p * PAGE : PAGE;
				REQUIRE(pwrite(fd, s.page[p], n, (off_t)(p * PAGE)) == (ssize_t)n, "write raw");
			}
		REQUIRE(ftruncate(fd, (off_t)s.size) == 0, "truncate raw");
		close(fd);
		snprintf(cmd, sizeof(cmd), "qemu-img compare -f raw -F qcow2 '%s' '%s'", raw, path);
		q = run(cmd, log);
		ICHECK(q == 0, "%s: qemu-img compare with the shadow exited %d", cfg_name, q);
		if (q)
			show_log(log);
	}
	unlink(path);
	unlink(raw);
	unlink(log);
	free(final);
	keep_free(k);
	shadow_free(&s);
}

/* ---- compaction ------------------------------------------------------------------ */

struct prog {
	double last;
	unsigned calls;
	bool out_of_range;
};

static void progress(double p, void *opaque)
{
	struct prog *q = opaque;
	if (p < 0 || p > 1)
		q->out_of_range = true;
	q->last = p;
	q->calls++;
}

static void compaction(unsigned cluster_bits, unsigned order)
{
	char name[96];
	snprintf(name, sizeof(name), "compact cs=%u order=%u", 1u << cluster_bits, order);
	cfg_name = name;
	uint64_t cs = 1ull << cluster_bits;
	uint64_t nclusters = cluster_bits == 9 ? 6000 : cluster_bits == 12 ? 1500 : 160;
	/* a partial last cluster, where clusters are bigger than the 512-byte
	 * sectors QEMU counts sizes in */
	uint64_t size = nclusters * cs + (cs > 512 ? cs / 2 : 0);
	size_t len;
	uint8_t *bytes = create_bytes(size, cluster_bits, order, 3, &len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	struct shadow s = { .cluster_bits = cluster_bits };
	shadow_resize(&s, size);

	/* fill everything in a scattered order so L2 tables and refcount
	 * blocks end up in the middle of the data */
	for (uint64_t i = 0; i < s.nclusters; i++) {
		uint64_t gc = (i * 7919) % s.nclusters;
		uint64_t off = gc * cs, n = off + cs > size ? size - off : cs;
		do_write(img, &s, off, n);
	}
	ICHECK(qcow_image_flush(img) == 0, "%s: flush after filling", cfg_name);
	check_refcounts(img, "filling");
	/* discard about 85 %: keep every 7th cluster and a few runs */
	for (uint64_t gc = 0; gc < s.nclusters; gc++) {
		if (gc % 7 == 3 || (gc > s.nclusters / 2 && gc < s.nclusters / 2 + 5))
			continue;
		uint64_t off = gc * cs, n = off + cs > size ? size - off : cs;
		do_discard(img, &s, off, n, false);
	}
	ICHECK(qcow_image_flush(img) == 0, "%s: flush after discarding", cfg_name);
	check_map(img, "discarding");
	verify_all(img, &s, "before compaction");
	int64_t before = k->inner->ops->size(k->inner);
	struct qcow_stats st0;
	qcow_image_get_stats(img, &st0);

	struct prog pg = { -1, 0, false };
	int r = qcow_image_compact(img, progress, &pg);
	ICHECK(r == 0, "%s: qcow_image_compact: %d", cfg_name, r);
	ICHECK(pg.calls > 0 && pg.last == 1.0 && !pg.out_of_range, "%s: progress reported %u times, last %f%s", cfg_name,
	       pg.calls, pg.last, pg.out_of_range ? ", some out of 0..1" : "");
	check_map(img, "compaction");
	int64_t after = k->inner->ops->size(k->inner);
	struct qcow_stats st;
	qcow_image_get_stats(img, &st);
	/* what must remain: data kept, its L2 tables, refcount blocks, header structures */
	uint64_t used = st.clusters_header + st.clusters_referenced;
	ICHECK(after < before / 2, "%s: the file shrank from %lld to %lld bytes", cfg_name, (long long)before, (long long)after);
	ICHECK((uint64_t)after <= (used + 2) * cs, "%s: after compaction %lld bytes for %llu used clusters (%llu moved)",
	       cfg_name, (long long)after, (unsigned long long)used, (unsigned long long)st.clusters_moved);
	ICHECK(st.compactions_done == st0.compactions_done + 1 && st.clusters_moved > 0 && !st.compacting,
	       "%s: stats after compaction: done %llu moved %llu", cfg_name, (unsigned long long)st.compactions_done,
	       (unsigned long long)st.clusters_moved);
	verify_all(img, &s, "after compaction");
	/* the image stays fully usable */
	for (int i = 0; i < 40; i++)
		do_write(img, &s, tap_rand(&seed) % size, 1 + tap_rand(&seed) % (2 * cs));
	check_map(img, "writes after compaction");
	ICHECK(qcow_image_flush(img) == 0, "%s: flush after compaction", cfg_name);
	ICHECK(qcow_image_flush(img) == 0, "%s: second flush after compaction", cfg_name);
	check_refcounts(img, "flushes after compaction");
	verify_all(img, &s, "writes after compaction");
	r = qcow_image_close(img);
	ICHECK(r == 0, "%s: close after compaction: %d", cfg_name, r);

	size_t flen;
	const uint8_t *fb = qcow_io_mem_data(k->inner, &flen);
	struct keep_io *k2 = keep_new(fb, flen);
	img = open_io(&k2->io, 0);
	check_map(img, "reopen after compaction");
	check_refcounts(img, "reopen after compaction");
	verify_all(img, &s, "reopened after compaction");
	qcow_image_close(img);

	char path[256], log[256], cmd[512], err[256] = "";
	tmp_path(path, sizeof(path), "compacted");
	tmp_path(log, sizeof(log), "log");
	spill(path, fb, flen);
	struct qcow_check_result res;
	r = qcow_check(path, &res, err, sizeof(err));
	ICHECK(r == 0 && res.errors == 0 && res.leaks == 0, "%s: qcow_check: ret %d, %llu errors, %llu leaks %s", cfg_name, r,
	       (unsigned long long)res.errors, (unsigned long long)res.leaks, err);
	if (have_qemu_img) {
		snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s'", path);
		int q = run(cmd, log);
		ICHECK(q == 0, "%s: qemu-img check exited %d", cfg_name, q);
		if (q)
			show_log(log);
	}
	unlink(path);
	unlink(log);
	keep_free(k2);
	keep_free(k);
	shadow_free(&s);
}

/* ---- partial discards of holes ---------------------------------------------------- */

/* Zeroing part of a cluster that is a hole has nothing to do: the range
 * already reads zeros.  It must not allocate the cluster (that would grow
 * the file on every unaligned fstrim and turn holes into data). */
static void partial_discard_of_holes(void)
{
	cfg_name = "partial discard of holes";
	uint64_t cs = 65536;
	size_t len;
	uint8_t *bytes = create_bytes(64 * cs, 16, 4, 3, &len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	ICHECK(qcow_image_flush(img) == 0, "flush");
	int64_t size0 = k->inner->ops->size(k->inner);
	struct qcow_stats st0, st;
	qcow_image_get_stats(img, &st0);

	int r = qcow_image_discard(img, 100, 1000);              /* inside cluster 0 */
	ICHECK(r == 0, "discard inside a hole cluster: %d", r);
	r = qcow_image_discard(img, 3 * cs - 100, 200);          /* across two hole clusters */
	ICHECK(r == 0, "discard across two hole clusters: %d", r);
	r = qcow_image_zero(img, 10 * cs + 512, 3 * cs);         /* partial head and tail, holes */
	ICHECK(r == 0, "zero with partial head and tail over holes: %d", r);
	ICHECK(qcow_image_flush(img) == 0, "flush");
	check_map(img, "partial discards of holes");
	qcow_image_get_stats(img, &st);
	int64_t d = qcow_image_seek(img, 0, SEEK_DATA);
	ICHECK(d == -ENXIO, "partial discard of holes allocated clusters: SEEK_DATA(0) = %lld, expected -ENXIO (no data)",
	       (long long)d);
	ICHECK(st.clusters_referenced == st0.clusters_referenced,
	       "partial discard of holes allocated %lld clusters (referenced %llu -> %llu)",
	       (long long)(st.clusters_referenced - st0.clusters_referenced), (unsigned long long)st0.clusters_referenced,
	       (unsigned long long)st.clusters_referenced);
	ICHECK(k->inner->ops->size(k->inner) == size0, "partial discard of holes grew the file from %lld to %lld bytes",
	       (long long)size0, (long long)k->inner->ops->size(k->inner));
	uint8_t buf[4096];
	ICHECK(qcow_image_read(img, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf), "read");
	bool zero = true;
	for (size_t i = 0; i < sizeof(buf); i++)
		zero &= buf[i] == 0;
	ICHECK(zero, "holes read zeros");
	qcow_image_close(img);
	keep_free(k);
}

/* Discarding the last guest cluster of a disk whose size is not a cluster
 * multiple, from that cluster's start to the end of the disk, covers the
 * whole guest cluster: it must be released like any whole cluster (QEMU
 * does so too), not kept allocated and zero-filled. */
static void discard_of_the_partial_last_cluster(void)
{
	cfg_name = "discard of the partial last cluster";
	uint64_t cs = 4096, size = 10 * cs + 1536;
	size_t len;
	uint8_t *bytes = create_bytes(size, 12, 4, 3, &len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	uint8_t *buf = malloc(size);
	memset(buf, 0x77, size);
	ICHECK(qcow_image_write(img, buf, size, 0) == (ssize_t)size, "fill the disk");
	ICHECK(qcow_image_discard(img, 8 * cs, size - 8 * cs) == 0, "discard the last 2.4 clusters");
	ICHECK(qcow_image_read(img, buf, size, 0) == (ssize_t)size, "read back");
	bool ok = true;
	for (uint64_t i = 0; i < size; i++)
		ok &= buf[i] == (i < 8 * cs ? 0x77 : 0);
	ICHECK(ok, "contents after the discard");
	int64_t h = qcow_image_seek(img, 0, SEEK_HOLE);
	ICHECK(h == (int64_t)(8 * cs), "SEEK_HOLE(0) = %lld, expected %llu: the last cluster [%llu, %llu) is still allocated",
	       (long long)h, (unsigned long long)(8 * cs), (unsigned long long)(10 * cs), (unsigned long long)size);
	ICHECK(qcow_image_seek(img, 8 * cs, SEEK_DATA) == -ENXIO, "SEEK_DATA after the discard finds nothing (got %lld)",
	       (long long)qcow_image_seek(img, 8 * cs, SEEK_DATA));
	check_map(img, "tail discard");
	free(buf);
	qcow_image_close(img);
	keep_free(k);
}

/* ---- small things ----------------------------------------------------------------- */

/* The guest cluster whose L2 entry is the slot at byte offset slot, or
 * UINT64_MAX. */
static uint64_t guest_cluster_of_slot(struct qcow_image *img, uint64_t slot)
{
	uint64_t l2 = slot >> img->cluster_bits << img->cluster_bits;
	for (uint32_t i = 0; i < img->hdr.l1_size; i++)
		if ((img->l1[i] & QCOW_L1E_OFFSET_MASK) == l2)
			return ((uint64_t)i << img->l2_bits) + (slot - l2) / 8;
	return UINT64_MAX;
}

/* A flush that writes a refcount block cancels a move of that block (its
 * copy would be stale).  The cancel turns the move's destination from
 * Copies (refcount 1) back into Junk (0) and marks the destination's
 * refcount block dirty; when that block was already computed earlier in
 * the same flush, the mark must survive so the next flush writes the 0.
 * Here the compactor's situation is set up by hand: refcount block B
 * (high in the file) is moving into a cluster of refcount block 0, and
 * block B has a change to write when the Copied -> Flushed flush runs. */
static void refblock_move_cancelled_by_flush(void)
{
	cfg_name = "refcount block move cancelled by a flush";
	uint64_t cs = 512;
	size_t len;
	uint8_t *bytes = create_bytes(4u << 20, 9, 4, 3, &len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	uint8_t *buf = malloc(1500 * cs);
	fill_random(buf, 1500 * cs);
	ICHECK(qcow_image_write(img, buf, 1500 * cs, 0) == (ssize_t)(1500 * cs), "write 1500 clusters");
	free(buf);
	ICHECK(qcow_image_discard(img, 0, 4 * cs) == 0, "discard the first 4 guest clusters");
	ICHECK(qcow_image_flush(img) == 0, "flush");
	ICHECK(qcow_image_flush(img) == 0, "flush");

	/* the refcount block with the highest index, and a Junk cluster in block 0 */
	uint64_t per = 1ull << img->rb_shift, bidx = 0, src = 0;
	for (uint64_t b = 1; b < img->reftable_entries; b++)
		if (img->reftable[b]) {
			bidx = b;
			src = img->reftable[b] >> img->cluster_bits;
		}
	uint64_t dst = qcow_map_next_junk(&img->map, 0);
	REQUIRE(bidx >= 1 && src > dst && dst < per && qcow_map_state(&img->map, src) == QCS_REF,
		"layout: refcount block %llu at cluster %llu, junk cluster %llu", (unsigned long long)bidx,
		(unsigned long long)src, (unsigned long long)dst);
	/* a data cluster counted by block bidx, to discard while the block moves */
	uint64_t victim = UINT64_MAX;
	for (uint64_t c = bidx * per; c < (bidx + 1) * per && c < img->map.nclusters; c++)
		if (c != src && qcow_map_state(&img->map, c) == QCS_REF &&
		    guest_cluster_of_slot(img, qcow_map_slot(&img->map, c)) != UINT64_MAX) {
			victim = guest_cluster_of_slot(img, qcow_map_slot(&img->map, c));
			break;
		}
	REQUIRE(victim != UINT64_MAX, "a data cluster counted by refcount block %llu", (unsigned long long)bidx);

	/* the compactor: plan, copy, Copied.  Destinations are Available: walk
	 * the junk cluster through the erase states the recycler would (the
	 * state machine is checked in debug builds) */
	pthread_mutex_lock(&img->lock);
	static const enum qcow_cstate erase_path[] = { QCS_ERASING, QCS_ERASED, QCS_FLUSHING, QCS_AVAILABLE };
	for (size_t i = 0; i < sizeof(erase_path) / sizeof(erase_path[0]); i++)
		qcow_map_set_state(&img->map, dst, erase_path[i]);
	struct qcow_move *mv = qcow_map_move_start(&img->map, src, dst);
	pthread_mutex_unlock(&img->lock);
	REQUIRE(mv != NULL, "move start");
	uint8_t blk[512];
	REQUIRE(img->io->ops->pread(img->io, blk, cs, src * cs) == 0 && img->io->ops->pwrite(img->io, blk, cs, dst * cs) == 0,
		"copy the refcount block");
	pthread_mutex_lock(&img->lock);
	qcow_map_move_set_state(&img->map, mv, QMOVE_COPIED);
	pthread_mutex_unlock(&img->lock);
	/* meanwhile the guest frees a cluster that block bidx counts */
	ICHECK(qcow_image_discard(img, victim * cs, cs) == 0, "discard guest cluster %llu", (unsigned long long)victim);

	/* the Copied -> Flushed flush writes block bidx, so the move is cancelled */
	ICHECK(qcow_image_flush(img) == 0, "flush");
	ICHECK(mv->cancelled && qcow_map_state(&img->map, dst) == QCS_JUNK, "the move was cancelled, dst back to Junk");
	pthread_mutex_lock(&img->lock);
	qcow_map_move_complete(&img->map, mv);
	pthread_mutex_unlock(&img->lock);
	check_map(img, "cancelled move");
	ICHECK(qcow_image_flush(img) == 0, "second flush");
	uint64_t low, high;
	refcount_diff(img, &low, &high, false);
	ICHECK(low == 0 && high == 0,
	       "after two flushes %llu refcounts too low, %llu too high: the destination's refcount (cluster %llu) "
	       "went 0 -> 1 -> 0 in the map but its 0 is never written",
	       (unsigned long long)low, (unsigned long long)high, (unsigned long long)dst);
	if (high)
		refcount_diff(img, &low, &high, true);
	ICHECK(qcow_image_close(img) == 0, "close");

	size_t flen;
	const uint8_t *fb = qcow_io_mem_data(k->inner, &flen);
	char path[256], err[256] = "";
	tmp_path(path, sizeof(path), "refblock-move");
	spill(path, fb, flen);
	struct qcow_check_result res;
	int r = qcow_check(path, &res, err, sizeof(err));
	ICHECK(r == 0 && res.errors == 0 && res.leaks == 0, "after close: qcow_check: ret %d, %llu errors, %llu leaks %s", r,
	       (unsigned long long)res.errors, (unsigned long long)res.leaks, err);
	if (have_qemu_img) {
		char cmd[512], log[256];
		tmp_path(log, sizeof(log), "log");
		snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s'", path);
		int q = run(cmd, log);
		ICHECK(q == 0, "after close: qemu-img check exited %d (3 = leaked clusters)", q);
		if (q)
			show_log(log);
		unlink(log);
	}
	unlink(path);
	keep_free(k);
}

/* ---- compressed clusters (made by QEMU) ------------------------------------------- */

/* qemu-img convert -c writes compressed clusters, several per host
 * cluster.  The engine reads them, overwrites some partially (the cluster
 * is inflated, copied and rewritten uncompressed), discards others (the
 * shared host clusters keep their other users), compacts and closes. */
static void compressed(unsigned cluster_bits)
{
	char name[64];
	snprintf(name, sizeof(name), "compressed cs=%u", 1u << cluster_bits);
	cfg_name = name;
	if (!have_qemu_img) {
		printf("# %s: qemu-img missing, skipped\n", name);
		return;
	}
	uint64_t cs = 1ull << cluster_bits, size = 2u << 20;
	char raw[256], img_path[256], out_raw[256], log[256], cmd[2048];
	tmp_path(raw, sizeof(raw), "craw");
	tmp_path(img_path, sizeof(img_path), "cimg");
	tmp_path(out_raw, sizeof(out_raw), "cshadow");
	tmp_path(log, sizeof(log), "log");
	/* random letters from a 16-letter alphabet: compress to about half,
	 * so compressed clusters straddle host cluster boundaries; every
	 * fifth cluster zero */
	uint8_t *data = calloc(1, size);
	for (uint64_t i = 0; i < size; i++) {
		uint64_t c = i / cs;
		if (c % 5 == 4)
			continue;
		data[i] = (uint8_t)('a' + (tap_rand(&seed) & 15));
	}
	spill(raw, data, size);
	snprintf(cmd, sizeof(cmd), "qemu-img convert -c -f raw -O qcow2 -o cluster_size=%llu '%s' '%s'",
		 (unsigned long long)cs, raw, img_path);
	int q = run(cmd, log);
	REQUIRE(q == 0, "%s: qemu-img convert -c failed (%d)", name, q);

	size_t len;
	uint8_t *bytes = slurp(img_path, &len);
	ICHECK(len < size * 3 / 4, "%s: the image is compressed (%zu bytes)", name, len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	check_map(img, "open compressed");
	struct shadow s = { .cluster_bits = cluster_bits };
	shadow_resize(&s, size);
	shadow_write(&s, data, 0, size);
	free(data);
	for (uint64_t gc = 0; gc < s.nclusters; gc++)
		s.alloc[gc] = qcow_image_seek(img, gc * cs, SEEK_DATA) == (int64_t)(gc * cs);
	/* QEMU's convert leaves zero clusters unallocated: the shadow agrees */
	for (uint64_t gc = 0; gc < s.nclusters; gc++)
		if (!s.alloc[gc] && gc % 5 != 4) {
			ICHECK(false, "%s: data cluster %llu is not allocated", name, (unsigned long long)gc);
			break;
		}
	verify_all(img, &s, "compressed image as QEMU wrote it");
	printf("# %s: opened %zu bytes, %llu pinned clusters (compressed hosts and header)\n", name, len,
	       (unsigned long long)img->map.count[QCS_PINNED]);

	do_write(img, &s, 10, 100);                 /* partial: inflate, patch, rewrite */
	do_write(img, &s, 5 * cs, cs);               /* whole: no need to inflate */
	do_write(img, &s, 7 * cs - 3, 6);            /* across two compressed clusters */
	do_discard(img, &s, 11 * cs, 3 * cs, false); /* whole compressed clusters */
	do_discard(img, &s, 20 * cs + 1, cs, true);  /* partial */
	check_map(img, "writes over compressed clusters");
	verify_all(img, &s, "after writes over compressed clusters");
	ICHECK(qcow_image_flush(img) == 0, "%s: flush", name);
	check_refcounts(img, "flush over compressed clusters");
	for (int i = 0; i < 120; i++) {
		uint64_t off = tap_rand(&seed) % size, n = 1 + tap_rand(&seed) % (2 * cs);
		if (tap_rand(&seed) % 2)
			do_write(img, &s, off, off + n > size ? size - off : n);
		else
			do_discard(img, &s, off, n, false);
	}
	check_map(img, "random writes over compressed clusters");
	ICHECK(qcow_image_compact(img, NULL, NULL) == 0, "%s: compact", name);
	check_map(img, "compaction of a compressed image");
	check_refcounts(img, "compaction of a compressed image");
	verify_all(img, &s, "compressed image after compaction");
	ICHECK(qcow_image_close(img) == 0, "%s: close", name);

	size_t flen;
	const uint8_t *fb = qcow_io_mem_data(k->inner, &flen);
	spill(img_path, fb, flen);
	struct qcow_check_result res;
	char err[256] = "";
	int r = qcow_check(img_path, &res, err, sizeof(err));
	ICHECK(r == 0 && res.errors == 0 && res.leaks == 0, "%s: qcow_check: ret %d, %llu errors, %llu leaks %s", name, r,
	       (unsigned long long)res.errors, (unsigned long long)res.leaks, err);
	snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s'", img_path);
	q = run(cmd, log);
	ICHECK(q == 0, "%s: qemu-img check exited %d", name, q);
	if (q)
		show_log(log);
	uint8_t *sh = malloc(size);
	shadow_read(&s, sh, 0, size);
	spill(out_raw, sh, size);
	free(sh);
	snprintf(cmd, sizeof(cmd), "qemu-img compare -q -f raw -F qcow2 '%s' '%s'", out_raw, img_path);
	q = run(cmd, log);
	ICHECK(q == 0, "%s: QEMU reads the shadow (compare %d)", name, q);
	unlink(raw);
	unlink(img_path);
	unlink(out_raw);
	unlink(log);
	keep_free(k);
	shadow_free(&s);
}

/* ---- hostile metadata below the header ------------------------------------------- */

static unsigned log_lines;

static void count_log(enum qcow_log_level level, const char *msg, void *opaque)
{
	log_lines++;
}

/* Opening an image whose tables point to the wrong places fails with a
 * message naming the problem and leaves the bytes alone; qcow_check
 * counts the problem as an error instead of stopping. */
static void hostile_tables(void)
{
	cfg_name = "hostile tables";
	uint64_t cs = 4096;
	size_t len;
	uint8_t *bytes = create_bytes(8u << 20, 12, 4, 3, &len);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	uint8_t *buf = malloc(20 * cs);
	fill_random(buf, 20 * cs);
	ICHECK(qcow_image_write(img, buf, 20 * cs, 0) == (ssize_t)(20 * cs), "write");
	ICHECK(qcow_image_write(img, buf, cs, 4u << 20) == (ssize_t)cs, "write in the third L2 table");
	free(buf);
	ICHECK(qcow_image_close(img) == 0, "close");
	size_t glen;
	const uint8_t *g = qcow_io_mem_data(k->inner, &glen);
	uint8_t *good = malloc(glen);
	memcpy(good, g, glen);
	keep_free(k);

	uint64_t l1 = qcow_get_be64(good + QH_L1_OFFSET), rt = qcow_get_be64(good + QH_REFTABLE_OFFSET);
	uint64_t l2 = qcow_get_be64(good + l1) & QCOW_L1E_OFFSET_MASK;
	uint64_t d0 = qcow_get_be64(good + l2) & QCOW_L2E_OFFSET_MASK;
	REQUIRE(l2 && d0 && l2 < glen && d0 < glen, "layout: L1 0x%llx, L2 0x%llx, data 0x%llx", (unsigned long long)l1,
		(unsigned long long)l2, (unsigned long long)d0);
	/* (an entry with offset 0 is an unallocated table or cluster, so the
	 * header itself cannot be pointed at) */
	uint64_t rb = qcow_get_be64(good + rt) & QCOW_REFT_OFFSET_MASK;
	REQUIRE(rb && rb < glen, "refcount block 0 at 0x%llx", (unsigned long long)rb);
	struct { const char *what; uint64_t at; uint64_t value; const char *keyword; uint64_t at2; uint16_t v2; } cases[] = {
		{ "L1 entry unaligned", l1, QCOW_OFLAG_COPIED | (l2 + 512), "unaligned", 0, 0 },
		{ "L1 entry past the end", l1, QCOW_OFLAG_COPIED | (glen + 100 * cs), "past the end", 0, 0 },
		{ "L1 entry pointing at the L1 table", l1, QCOW_OFLAG_COPIED | l1, "inside a header structure", 0, 0 },
		{ "L1 entry pointing at the refcount table", l1, QCOW_OFLAG_COPIED | rt, "inside a header structure", 0, 0 },
		{ "L2 entry past the end", l2 + 8, QCOW_OFLAG_COPIED | (glen + 10 * cs), "past the end", 0, 0 },
		{ "L2 entry unaligned", l2 + 8, QCOW_OFLAG_COPIED | (d0 + 1024), "unaligned", 0, 0 },
		{ "two L2 entries, one data cluster", l2 + 8, QCOW_OFLAG_COPIED | d0, "referenced twice", 0, 0 },
		/* refcount 2 matches the two references, but COPIED says 1 */
		{ "two L2 entries with COPIED, one data cluster with refcount 2", l2 + 8, QCOW_OFLAG_COPIED | d0,
		  "referenced twice", rb + 2 * (d0 / cs), 2 },
		{ "L2 entry pointing at its own L2 table", l2 + 8, QCOW_OFLAG_COPIED | l2, "referenced twice", 0, 0 },
		{ "L2 entry pointing at the L1 table", l2 + 8, QCOW_OFLAG_COPIED | l1, "inside a header structure", 0, 0 },
		{ "refcount table entry pointing at the L1 table", rt, l1, "inside a header structure", 0, 0 },
		{ "refcount table entry pointing at a data cluster", rt, d0, "referenced twice", 0, 0 },
		{ "refcount table entry past the end", rt, glen + 50 * cs, "past the end", 0, 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint8_t *bad = malloc(glen);
		memcpy(bad, good, glen);
		qcow_put_be64(bad + cases[i].at, cases[i].value);
		if (cases[i].at2) {   /* a 16-bit refcount */
			bad[cases[i].at2] = (uint8_t)(cases[i].v2 >> 8);
			bad[cases[i].at2 + 1] = (uint8_t)cases[i].v2;
		}
		struct qcow_io *io = qcow_io_mem_new(bad, glen);
		struct qcow_open_opts o = test_opts(0);
		char err[512] = "";
		struct qcow_image *im = NULL;
		int r = qcow_image_open_io(io, &o, &im, err, sizeof(err));
		ICHECK(r < 0, "%s: open accepted it", cases[i].what);
		if (getenv("SHOW_MESSAGES"))
			printf("# %s: %d %s\n", cases[i].what, r, err);
		ICHECK(r >= 0 || (err[0] && strstr(err, cases[i].keyword)), "%s: message lacks '%s': %s", cases[i].what,
		       cases[i].keyword, err);
		size_t n;
		const uint8_t *d = qcow_io_mem_data(io, &n);
		ICHECK(n == glen && memcmp(d, bad, glen) == 0, "%s: bytes unchanged by the failed open", cases[i].what);
		if (r == 0)
			qcow_image_close(im);
		else
			qcow_io_close(io);
		/* the offline check runs to the end and counts it */
		char path[256];
		tmp_path(path, sizeof(path), "hostile");
		spill(path, bad, glen);
		struct qcow_check_result res;
		err[0] = 0;
		log_lines = 0;
		qcow_log_set_sink(count_log, NULL);
		r = qcow_check(path, &res, err, sizeof(err));
		qcow_log_set_sink(NULL, NULL);
		ICHECK(r == 0 && res.errors > 0, "%s: qcow_check returns %d with %llu errors and %llu leaks (%s)", cases[i].what,
		       r, (unsigned long long)res.errors, (unsigned long long)res.leaks, err);
		ICHECK(log_lines > 0, "%s: qcow_check logged the problem", cases[i].what);
		if (have_qemu_img) {
			/* QEMU's verdict (2 = corruption, 3 = leaks only) and ours agree */
			char cmd[512], log[256];
			tmp_path(log, sizeof(log), "log");
			snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s'", path);
			int q = run(cmd, log);
			ICHECK(q != 2 || res.errors > 0, "%s: qemu-img check finds corruption (exit 2), qcow_check %llu errors",
			       cases[i].what, (unsigned long long)res.errors);
			ICHECK(q != 3 || (res.errors == 0 && res.leaks > 0), "%s: qemu-img check finds only leaks, qcow_check %llu errors %llu leaks",
			       cases[i].what, (unsigned long long)res.errors, (unsigned long long)res.leaks);
			unlink(log);
		}
		unlink(path);
		free(bad);
	}
	free(good);
}

/* ---- images with internal snapshots (made by QEMU) ------------------------------ */

/* Same contents, where the longer file may only add zeros (QEMU converts
 * a snapshot at the disk's current size). */
static bool files_equal(const char *a, const char *b)
{
	size_t la, lb;
	uint8_t *x = slurp(a, &la), *y = slurp(b, &lb);
	size_t n = la < lb ? la : lb;
	bool eq = memcmp(x, y, n) == 0;
	for (size_t i = n; i < la; i++)
		eq &= x[i] == 0;
	for (size_t i = n; i < lb; i++)
		eq &= y[i] == 0;
	free(x);
	free(y);
	return eq;
}

/* QEMU writes an image, takes a snapshot and writes more; the engine then
 * overwrites and discards clusters and L2 tables shared with the snapshot
 * (copy-on-write), compacts and closes.  Afterwards qemu-img check is
 * clean, the active view equals the shadow and the snapshot still reads
 * exactly as before. */
static void snapshots(unsigned cluster_bits)
{
	char name[64];
	snprintf(name, sizeof(name), "snapshots cs=%u", 1u << cluster_bits);
	cfg_name = name;
	if (!have_qemu_img || system("qemu-io --version > /dev/null 2>&1") != 0) {
		printf("# %s: qemu-img/qemu-io missing, skipped\n", name);
		return;
	}
	uint64_t cs = 1ull << cluster_bits, size = 4u << 20;
	char img_path[256], active[256], snap0[256], snap1[256], out_raw[256], log[256], cmd[4096];
	tmp_path(img_path, sizeof(img_path), "snap");
	tmp_path(active, sizeof(active), "active");
	tmp_path(snap0, sizeof(snap0), "snap0");
	tmp_path(snap1, sizeof(snap1), "snap1");
	tmp_path(out_raw, sizeof(out_raw), "shadow");
	tmp_path(log, sizeof(log), "log");
	snprintf(cmd, sizeof(cmd),
		 "qemu-img create -q -f qcow2 -o cluster_size=%llu '%s' %llu && "
		 "qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x22 2M 512k' -c 'write -P 0x44 %llu 1000' '%s' && "
		 "qemu-img snapshot -c s1 '%s' && "
		 "qemu-io -f qcow2 -c 'write -P 0x33 512k 256k' -c 'write -P 0x55 3M 64k' '%s' && "
		 "qemu-img snapshot -c s2 '%s' && "
		 "qemu-img convert -O raw -l snapshot.name=s1 '%s' '%s' && "
		 "qemu-img convert -O raw '%s' '%s'",
		 (unsigned long long)cs, img_path, (unsigned long long)size, (unsigned long long)(size - 1000), img_path,
		 img_path, img_path, img_path, img_path, snap0, img_path, active);
	int q = run(cmd, log);
	REQUIRE(q == 0, "%s: QEMU setup failed (%d)", name, q);

	size_t len, alen;
	uint8_t *bytes = slurp(img_path, &len);
	uint8_t *act = slurp(active, &alen);
	REQUIRE(alen == size, "active view size");
	struct shadow s = { .cluster_bits = cluster_bits };
	shadow_resize(&s, size);
	shadow_write(&s, act, 0, size);
	free(act);
	struct keep_io *k = keep_new(bytes, len);
	free(bytes);
	struct qcow_image *img = open_io(&k->io, 0);
	check_map(img, "open with snapshots");
	ICHECK(img->map.count[QCS_SHARED] > 10, "%s: shared clusters keep every pointer (%llu shared)", name,
	       (unsigned long long)img->map.count[QCS_SHARED]);
	for (uint64_t gc = 0; gc < s.nclusters; gc++) {
		int64_t d = qcow_image_seek(img, gc * cs, SEEK_DATA);
		s.alloc[gc] = d == (int64_t)(gc * cs);   /* what QEMU allocated */
	}
	verify_all(img, &s, "QEMU's active view");
	printf("# %s: opened with %llu pinned (header structures), %llu shared and %llu referenced clusters\n", name,
	       (unsigned long long)img->map.count[QCS_PINNED], (unsigned long long)img->map.count[QCS_SHARED],
	       (unsigned long long)img->map.count[QCS_REF]);

	/* overwrite inside shared clusters (partial: the old contents are copied) */
	do_write(img, &s, 100, 200);
	do_write(img, &s, cs * 3 + 5, cs * 2);
	do_write(img, &s, (2u << 20) + cs / 2, 3 * cs);
	/* discard shared clusters, whole and partial */
	do_discard(img, &s, 8 * cs, 16 * cs, false);
	do_discard(img, &s, (3u << 20) + 7, 3 * cs, true);
	do_discard(img, &s, size - 2 * cs, 2 * cs, false);
	check_map(img, "copy-on-write");
	ICHECK(qcow_image_flush(img) == 0, "%s: flush", name);
	check_refcounts(img, "flush with snapshots");
	for (int i = 0; i < 150; i++) {
		uint64_t off = tap_rand(&seed) % size, n = 1 + tap_rand(&seed) % (3 * cs);
		if (tap_rand(&seed) % 3)
			do_write(img, &s, off, off + n > size ? size - off : n);
		else
			do_discard(img, &s, off, n, false);
	}
	check_map(img, "random writes over snapshots");
	/* the active disk grows; the snapshots keep their size */
	ICHECK(qcow_image_resize(img, size + (1u << 20)) == 0, "%s: resize", name);
	shadow_resize(&s, size + (1u << 20));
	size += 1u << 20;
	do_write(img, &s, size - (1u << 20) - 100, 300);
	do_write(img, &s, size - 10, 10);
	check_map(img, "resize with snapshots");
	ICHECK(qcow_image_compact(img, NULL, NULL) == 0, "%s: compact", name);
	check_map(img, "compaction with snapshots");
	check_refcounts(img, "compaction with snapshots");
	verify_all(img, &s, "after copy-on-write and compaction");
	printf("# %s: before close %llu pinned, %llu shared, %llu referenced, %llu moved by compaction\n", name,
	       (unsigned long long)img->map.count[QCS_PINNED], (unsigned long long)img->map.count[QCS_SHARED],
	       (unsigned long long)img->map.count[QCS_REF], (unsigned long long)img->clusters_moved);
	ICHECK(qcow_image_close(img) == 0, "%s: close", name);

	size_t flen;
	const uint8_t *fb = qcow_io_mem_data(k->inner, &flen);
	spill(img_path, fb, flen);
	struct qcow_check_result res;
	char err[256] = "";
	int r = qcow_check(img_path, &res, err, sizeof(err));
	ICHECK(r == 0 && res.errors == 0 && res.leaks == 0, "%s: qcow_check: ret %d, %llu errors, %llu leaks %s", name, r,
	       (unsigned long long)res.errors, (unsigned long long)res.leaks, err);
	snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s'", img_path);
	q = run(cmd, log);
	ICHECK(q == 0, "%s: qemu-img check exited %d", name, q);
	if (q)
		show_log(log);
	/* the snapshot is untouched, the active view is the shadow */
	snprintf(cmd, sizeof(cmd), "qemu-img convert -O raw -l snapshot.name=s1 '%s' '%s'", img_path, snap1);
	q = run(cmd, log);
	ICHECK(q == 0 && files_equal(snap0, snap1), "%s: snapshot s1 reads as before (convert %d)", name, q);
	uint8_t *sh = malloc(size);
	shadow_read(&s, sh, 0, size);
	spill(out_raw, sh, size);
	free(sh);
	snprintf(cmd, sizeof(cmd), "qemu-img compare -q -f raw -F qcow2 '%s' '%s'", out_raw, img_path);
	q = run(cmd, log);
	ICHECK(q == 0, "%s: QEMU reads the shadow from the active view (compare %d)", name, q);
	if (q)
		show_log(log);
	snprintf(cmd, sizeof(cmd), "qemu-img snapshot -l '%s'", img_path);
	q = run(cmd, log);
	ICHECK(q == 0, "%s: snapshots still listed", name);

	unlink(img_path);
	unlink(active);
	unlink(snap0);
	unlink(snap1);
	unlink(out_raw);
	unlink(log);
	keep_free(k);
	shadow_free(&s);
}

static void misc(void)
{
	cfg_name = "misc";
	/* opening garbage fails and leaves the caller owning the backend */
	uint8_t junk[4096];
	memset(junk, 0x41, sizeof(junk));
	struct qcow_io *io = qcow_io_mem_new(junk, sizeof(junk));
	struct qcow_open_opts o = test_opts(0);
	struct qcow_image *img = NULL;
	char err[256] = "";
	int r = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	ICHECK(r < 0 && strstr(err, "magic"), "garbage refused: %d %s", r, err);
	size_t n;
	const uint8_t *d = qcow_io_mem_data(io, &n);
	ICHECK(n == sizeof(junk) && memcmp(d, junk, n) == 0, "garbage untouched");
	qcow_io_close(io);

	/* a read-only open refuses writes */
	size_t len;
	uint8_t *bytes = create_bytes(1 << 20, 12, 4, 3, &len);
	io = qcow_io_mem_new(bytes, len);
	o.read_only = true;
	r = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	REQUIRE(r == 0, "read-only open: %s", err);
	uint8_t b[10] = { 1 };
	ICHECK(qcow_image_write(img, b, 10, 0) == -EROFS, "read-only write is -EROFS");
	ICHECK(qcow_image_discard(img, 0, 4096) == -EROFS, "read-only discard is -EROFS");
	ICHECK(qcow_image_resize(img, 2 << 20) == -EROFS, "read-only resize is -EROFS");
	ICHECK(qcow_image_compact(img, NULL, NULL) == -EROFS, "read-only compact is -EROFS");
	ICHECK(qcow_image_read(img, b, 10, 100) == 10 && b[0] == 0, "read-only read works");
	ICHECK(qcow_image_close(img) == 0, "read-only close");

	/* the corrupt bit: read-write open refused, read-only allowed */
	qcow_put_be64(bytes + QH_INCOMPAT, QCOW_INCOMPAT_CORRUPT);
	io = qcow_io_mem_new(bytes, len);
	o.read_only = false;
	r = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	ICHECK(r == -EACCES && strstr(err, "corrupt"), "corrupt image refused read-write: %d %s", r, err);
	d = qcow_io_mem_data(io, &n);
	ICHECK(n == len && memcmp(d, bytes, len) == 0, "refused image untouched");
	o.read_only = true;
	r = qcow_image_open_io(io, &o, &img, err, sizeof(err));
	ICHECK(r == 0, "corrupt image opens read-only: %s", err);
	if (r == 0)
		qcow_image_close(img);
	else
		qcow_io_close(io);

	/* the dirty bit: cleared by a read-write open, refcounts rebuilt */
	qcow_put_be64(bytes + QH_INCOMPAT, QCOW_INCOMPAT_DIRTY);
	struct keep_io *k = keep_new(bytes, len);
	img = open_io(&k->io, 0);
	check_map(img, "dirty open");
	qcow_image_close(img);
	d = qcow_io_mem_data(k->inner, &n);
	ICHECK(n >= 112 && qcow_get_be64(d + QH_INCOMPAT) == 0, "dirty bit cleared on disk");
	keep_free(k);
	free(bytes);
}

int main(void)
{
	/* IMAGE_MEM_SEED replays another sequence; IMAGE_MEM_ROUNDS scales the
	 * number of operations (soak runs) */
	const char *e = getenv("IMAGE_MEM_SEED");
	if (e)
		seed = strtoull(e, NULL, 0);
	e = getenv("IMAGE_MEM_ROUNDS");
	unsigned rounds = e ? (unsigned)strtoul(e, NULL, 0) : 1;
	if (rounds < 1)
		rounds = 1;
	have_qemu_img = system("qemu-img --version > /dev/null 2>&1") == 0;
	if (!have_qemu_img)
		printf("# qemu-img not found: its checks are skipped\n");
	qcow_log_set_verbosity(QCOW_LOG_WARNING);

	static const struct cfg cfgs[] = {
		/* 512-byte clusters: the L1 cluster holds 64 entries (2 MiB); growing to 6 MiB moves it */
		{ 9, 0, 3, (2u << 20) - 1536, (6u << 20) + 512, 16 * 512, 700 },
		{ 9, 4, 3, (2u << 20) - 1536, (6u << 20) + 512, 0, 700 },
		{ 9, 6, 3, (2u << 20) - 1536, (6u << 20) + 512, 64 * 512, 900 },
		/* 4 KiB: one L1 cluster maps 1 GiB; growing to 1 GiB + 1 MiB moves it */
		{ 12, 0, 3, (8u << 20) + 1536, (1u << 30) + (1u << 20), 8 * 4096, 500 },
		{ 12, 4, 3, (8u << 20) + 1536, (16u << 20) + 512, 0, 500 },
		{ 12, 6, 3, (8u << 20) + 1536, (1u << 30) + (1u << 20) + 512, 0, 500 },
		/* 64 KiB: an L2 table maps 512 MiB; the L1 grows inside its cluster */
		{ 16, 0, 3, (1u << 30) + 3584, (1u << 30) + (700u << 20), 4 * 65536, 300 },
		{ 16, 4, 3, (600u << 20) + 512, (1u << 30) + 512, 0, 300 },
		{ 16, 6, 3, (1u << 30) + 3584, (2ull << 30), 0, 300 },
		/* version 2 */
		{ 16, 4, 2, (600u << 20) + 512, (700u << 20), 0, 300 },
	};
	for (size_t i = 0; i < sizeof(cfgs) / sizeof(cfgs[0]); i++) {
		struct cfg c = cfgs[i];
		c.ops *= rounds;
		workload(&c);
	}
	compaction(12, 4);
	compaction(9, 0);
	compaction(16, 6);
	misc();
	partial_discard_of_holes();
	discard_of_the_partial_last_cluster();
	refblock_move_cancelled_by_flush();
	snapshots(16);
	snapshots(12);
	compressed(16);
	compressed(12);
	hostile_tables();
	return tap_done();
}
