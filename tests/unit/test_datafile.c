/*
 * test_datafile.c - images with an external data file on two crash
 * simulators: the qcow2 file and the data file each lose power.
 *
 * The images come from qemu-img (data_file, with data_file_raw off and
 * on, filled by qemu-io).  Each round runs random writes, discards,
 * flushes and compactions through the engine, with the qcow2 file on one
 * crash simulator and the data file on another, kills one of the two
 * disks after a random number of writes, and then crashes both (each
 * keeps a random subset of its unflushed writes, torn at 512 bytes).  The
 * crashed pair must
 *   - pass qcow_check on the qcow2 file with no errors (leaks allowed),
 *   - open again, with a consistent map,
 *   - show, for every 512-byte sector not written since the last
 *     completed flush, exactly the data of that flush: the flush made the
 *     data file durable before the pointers to it.
 * Every fifth round ends with a clean close instead; with data_file_raw
 * the data file must then be the disk itself, byte for byte.
 * DATAFILE_ROUNDS (env) sets the number of rounds (default 300).
 */
#include "qcow_internal.h"
#include "tap.h"
#include "test_image.h"

#include <string.h>
#include <unistd.h>

static unsigned long long seed = 0xda7af11e;

static void quiet_sink(enum qcow_log_level level, const char *msg, void *opaque) {}

struct pair {
	bool raw;
	uint64_t size, cs;
	uint8_t *img, *data;     /* the two files as QEMU left them */
	size_t img_len, data_len;
	uint8_t *view;           /* what the disk shows (the model's start) */
};

/* the next open's detect_zeroes (whole zero clusters of a write become
 * discards or zero flags, punched in the data file) */
static enum qcow_detect_zeroes next_detect = QCOW_DETECT_ZEROES_OFF;

static struct qcow_image *open_pair(struct qcow_io *io, struct qcow_io *dio, char *err, size_t errlen)
{
	struct qcow_open_opts o;
	qcow_open_opts_default(&o);
	o.detect_zeroes = next_detect;
	o.no_locking = true;
	o.recycler = false;
	o.runtime_asserts = true;
	o.cache_bytes = 32 * 1024;
	o.data_io = dio;
	struct qcow_image *img = NULL;
	if (qcow_image_open_io(io, &o, &img, err, errlen))
		return NULL;
	return img;
}

static void make_pair(struct pair *p, bool raw)
{
	char dir[] = "/tmp/qcow-df-XXXXXX";
	REQUIRE(mkdtemp(dir), "mkdtemp");
	p->raw = raw;
	p->size = 4u << 20;
	p->cs = 65536;
	/* QEMU 7.2 opens the data file relative to its working directory */
	int q = test_sh(NULL, "cd '%s' && qemu-img create -q -f qcow2 -o data_file=d.raw,data_file_raw=%s i.qcow2 4M && "
			"qemu-io -c 'write -P 0x5a 0 100k' -c 'write -P 0x33 1M 192k' -c 'write -z 1088k 64k' "
			"-c 'discard 1152k 64k' -c 'write -P 0x77 4032k 64k' i.qcow2",
			dir, raw ? "on" : "off");
	REQUIRE(q == 0, "qemu-img/qemu-io with a data file failed (%d)", q);
	char path[128];
	snprintf(path, sizeof(path), "%s/i.qcow2", dir);
	p->img = test_slurp(path, &p->img_len);
	unlink(path);
	snprintf(path, sizeof(path), "%s/d.raw", dir);
	p->data = test_slurp(path, &p->data_len);
	unlink(path);
	rmdir(dir);

	/* the disk as the engine shows it; QEMU wrote it, so spot-check it */
	struct qcow_io *io = qcow_io_mem_new(p->img, p->img_len);
	struct qcow_io *dio = qcow_io_mem_new(p->data, p->data_len);
	char err[256];
	struct qcow_image *img = open_pair(io, dio, err, sizeof(err));
	REQUIRE(img, "open the qemu-made data-file image (raw %d): %s", raw, err);
	p->view = malloc(p->size);
	REQUIRE(p->view && qcow_image_read(img, p->view, p->size, 0) == (ssize_t)p->size, "read the view");
	CHECK(p->view[0] == 0x5a && p->view[1 << 20] == 0x33 && p->view[1088 << 10] == 0 && p->view[1152 << 10] == 0 &&
	      p->view[1030 << 10] == 0x33 && p->view[4032 << 10] == 0x77, "raw %d: the view shows what qemu-io wrote", raw);
	if (raw)
		CHECK(p->data_len == p->size && memcmp(p->data, p->view, p->size) == 0,
		      "raw: QEMU's data file is the disk");
	CHECK(qcow_image_close(img) == 0, "close (raw %d)", raw);
	qcow_io_close(dio);
}

static void one_round(struct pair *p, unsigned round)
{
	uint64_t size = p->size, cs = p->cs;
	bool clean = round % 5 == 4;
	/* a clean round keeps the qcow2 file's bytes past the close */
	struct rec_io *rec = clean ? rec_new(p->img, p->img_len) : NULL;
	struct qcow_io *io = clean ? &rec->io : qcow_io_crash_new(p->img, p->img_len);
	struct qcow_io *dio = clean ? qcow_io_mem_new(p->data, p->data_len) : qcow_io_crash_new(p->data, p->data_len);
	char err[256], what[64];
	snprintf(what, sizeof(what), "round %u (data_file_raw %s)", round, p->raw ? "on" : "off");
	next_detect = (enum qcow_detect_zeroes)(tap_rand(&seed) % 3);
	struct qcow_image *img = open_pair(io, dio, err, sizeof(err));
	next_detect = QCOW_DETECT_ZEROES_OFF;
	REQUIRE(img, "%s: open: %s", what, err);
	struct crash_model m;
	crash_model_init(&m, size, p->view);
	uint8_t *buf = qcow_malloc(4 * cs);
	if (!clean)
		qcow_io_crash_die_after(tap_rand(&seed) & 1 ? io : dio, 1 + tap_rand(&seed) % 120);
	for (unsigned op = 0; op < 50; op++) {
		unsigned kind = (unsigned)(tap_rand(&seed) % 100);
		uint64_t off = tap_rand(&seed) % size;
		uint64_t n = 1 + tap_rand(&seed) % (3 * cs);
		if (tap_rand(&seed) % 3 == 0)
			off &= ~(cs - 1);
		if (n > size - off)
			n = size - off;
		enum crash_guest_op w = kind < 50 ? CRASH_WRITE : kind < 75 ? CRASH_DISCARD : kind < 92 ? CRASH_FLUSH : CRASH_COMPACT;
		bool zeros = tap_rand(&seed) % 4 == 0;
		for (uint64_t i = 0; w == CRASH_WRITE && i < n; i++)
			buf[i] = zeros ? 0 : (uint8_t)tap_rand(&seed);
		if (!crash_model_do(img, &m, w, buf, off, n))
			break;
	}
	if (clean) {
		CHECK(qcow_image_close(img) == 0, "%s: clean close", what);
		size_t dlen, ilen;
		const uint8_t *d = qcow_io_mem_data(dio, &dlen);
		if (p->raw)
			CHECK(dlen == size && memcmp(d, m.current, size) == 0, "%s: the raw data file is the disk after a clean close",
			      what);
		/* and the pair opens again showing the same disk */
		const uint8_t *ib = rec_bytes(rec, &ilen);
		struct qcow_io *io2 = qcow_io_mem_new(ib, ilen);
		struct qcow_io *dio2 = qcow_io_mem_new(d, dlen);
		rec_free(rec);
		qcow_io_close(dio);
		crash_model_synced(&m);
		struct qcow_image *img2 = open_pair(io2, dio2, err, sizeof(err));
		CHECK(img2 != NULL, "%s: reopen after a clean close: %s", what, err);
		if (img2) {
			CHECK(crash_model_verify(img2, &m, what) == 0, "%s: the disk after a clean close and reopen", what);
			CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
		} else {
			qcow_io_close(io2);
		}
		qcow_io_close(dio2);
		goto out;
	}

	struct qcow_io *after = qcow_io_crash_crash(io, tap_rand(&seed));
	struct qcow_io *dafter = qcow_io_crash_crash(dio, tap_rand(&seed));
	REQUIRE(after && dafter, "crash");
	qcow_image_close(img);   /* the dead disks refuse everything; this only frees */
	qcow_io_close(dio);      /* the caller's backend */
	size_t alen;
	const uint8_t *abytes = qcow_io_mem_data(after, &alen);
	crash_check_bytes(abytes, alen, false, what);
	struct qcow_image *img2 = open_pair(after, dafter, err, sizeof(err));
	CHECK(img2 != NULL, "%s: the crashed pair does not open: %s", what, err);
	if (img2) {
		uint64_t bad = crash_model_verify(img2, &m, what);
		CHECK(bad == 0, "%s: %llu flushed sectors differ after the crash", what, (unsigned long long)bad);
		pthread_mutex_lock(&img2->lock);
		const char *inv = qcow_map_check(&img2->map);
		pthread_mutex_unlock(&img2->lock);
		CHECK(!inv, "%s: map after reopen: %s", what, inv);
		CHECK(qcow_image_close(img2) == 0, "%s: close after reopen", what);
	} else {
		qcow_io_close(after);
	}
	qcow_io_close(dafter);
out:
	crash_model_free(&m);
	qcow_free(buf);
}

int main(void)
{
	qcow_log_set_sink(quiet_sink, NULL);
	if (test_sh(NULL, "command -v qemu-img && command -v qemu-io") != 0) {
		/* CI installs QEMU (check.sh); a missing tool is a failure */
		CHECK(0, "qemu-img and qemu-io are needed");
		return tap_done();
	}
	const char *env = getenv("DATAFILE_ROUNDS");
	unsigned rounds = env ? (unsigned)strtoul(env, NULL, 10) : 300;
	struct pair pairs[2];
	make_pair(&pairs[0], false);
	make_pair(&pairs[1], true);
	for (unsigned r = 0; r < rounds; r++)
		one_round(&pairs[r & 1], r);
	for (unsigned i = 0; i < 2; i++) {
		free(pairs[i].img);
		free(pairs[i].data);
		free(pairs[i].view);
	}
	return tap_done();
}
