/*
 * test_stats_text.c - the status text (qcow_stats_format / qcow_stats_parse):
 * every field of struct qcow_stats survives a round trip (a field missing
 * from the table would come back zero), the blocker text survives any byte
 * (newlines, '=', backslashes, control bytes, UTF-8) and never spans lines,
 * a text from an older daemon (without the issue-6 keys) still parses,
 * malformed values are refused and a short buffer gives -ERANGE.
 */
#include "qcow.h"
#include "tap.h"

#include <errno.h>
#include <string.h>

static void fill_all(struct qcow_stats *st, unsigned long long seed)
{
	memset(st, 0, sizeof(*st));
	st->virtual_size = tap_rand(&seed);
	st->cluster_size = tap_rand(&seed);
	st->file_size = tap_rand(&seed);
	st->file_allocated = tap_rand(&seed);
	st->clusters_total = tap_rand(&seed);
	st->clusters_header = tap_rand(&seed);
	st->clusters_referenced = tap_rand(&seed);
	st->clusters_junk = tap_rand(&seed);
	st->clusters_erased = tap_rand(&seed);
	st->clusters_available = tap_rand(&seed);
	st->clusters_copies = tap_rand(&seed);
	st->clusters_roots = tap_rand(&seed);
	st->clusters_pending = tap_rand(&seed);
	st->clusters_shared = tap_rand(&seed);
	st->map_bytes = tap_rand(&seed);
	st->moves_in_flight = tap_rand(&seed);
	st->bytes_reclaimed = tap_rand(&seed);
	st->bytes_discarded = tap_rand(&seed);
	st->bytes_discard_requested = tap_rand(&seed);
	st->compactions_done = tap_rand(&seed);
	st->clusters_moved = tap_rand(&seed);
	st->streams_repacked = tap_rand(&seed);
	st->compacting = true;
	st->compact_progress = 0.25;
	st->punch_supported = true;
	st->read_only = true;
	st->last_error = -ENOSPC;
	st->failed = true;
	st->compactions_failed = tap_rand(&seed);
	st->min_file_size = tap_rand(&seed);
	snprintf(st->blocker, sizeof(st->blocker), "compressed cluster at offset 0x%llx",
		 tap_rand(&seed) & 0xffffff);
}

static bool same_stats(const struct qcow_stats *a, const struct qcow_stats *b)
{
	/* Field by field: padding bytes may differ. */
	return a->virtual_size == b->virtual_size && a->cluster_size == b->cluster_size &&
	       a->file_size == b->file_size && a->file_allocated == b->file_allocated &&
	       a->clusters_total == b->clusters_total && a->clusters_header == b->clusters_header &&
	       a->clusters_referenced == b->clusters_referenced && a->clusters_junk == b->clusters_junk &&
	       a->clusters_erased == b->clusters_erased && a->clusters_available == b->clusters_available &&
	       a->clusters_copies == b->clusters_copies && a->clusters_roots == b->clusters_roots &&
	       a->clusters_pending == b->clusters_pending && a->moves_in_flight == b->moves_in_flight &&
	       a->clusters_shared == b->clusters_shared && a->map_bytes == b->map_bytes &&
	       a->bytes_reclaimed == b->bytes_reclaimed && a->bytes_discarded == b->bytes_discarded &&
	       a->bytes_discard_requested == b->bytes_discard_requested &&
	       a->compactions_done == b->compactions_done && a->clusters_moved == b->clusters_moved &&
	       a->streams_repacked == b->streams_repacked &&
	       a->compacting == b->compacting && a->compact_progress == b->compact_progress &&
	       a->punch_supported == b->punch_supported && a->read_only == b->read_only &&
	       a->last_error == b->last_error && a->failed == b->failed &&
	       a->compactions_failed == b->compactions_failed && a->min_file_size == b->min_file_size &&
	       strcmp(a->blocker, b->blocker) == 0;
}

static unsigned count_lines(const char *text)
{
	unsigned n = 0;
	for (; *text; text++)
		n += *text == '\n';
	return n;
}

int main(void)
{
	char buf[4096];
	struct qcow_stats a, b;

	/* every field, round trip */
	for (unsigned long long seed = 1; seed <= 50; seed++) {
		fill_all(&a, seed);
		int len = qcow_stats_format(&a, buf, sizeof(buf));
		REQUIRE(len > 0, "format: %d", len);
		CHECK((size_t)len == strlen(buf), "format length %d, strlen %zu", len, strlen(buf));
		memset(&b, 0x5a, sizeof(b));
		CHECK(qcow_stats_parse(buf, &b) == 0, "parse of\n%s", buf);
		CHECK(same_stats(&a, &b), "round trip differs (seed %llu):\n%s", seed, buf);
	}
	CHECK(strstr(buf, "\nlast_error=-28\n") != NULL, "last_error is a signed number:\n%s", buf);
	CHECK(strstr(buf, "\nfailed=1\n") != NULL, "failed is 0/1:\n%s", buf);

	/* the blocker: every byte 1..255 survives, on one line */
	fill_all(&a, 7);
	unsigned lines_plain;
	{
		int len = qcow_stats_format(&a, buf, sizeof(buf));
		REQUIRE(len > 0, "format");
		lines_plain = count_lines(buf);
	}
	for (unsigned start = 1; start < 256; start += (unsigned)sizeof(a.blocker) - 1) {
		size_t n = 0;
		for (unsigned c = start; c < 256 && n + 1 < sizeof(a.blocker); c++)
			a.blocker[n++] = (char)c;
		a.blocker[n] = '\0';
		int len = qcow_stats_format(&a, buf, sizeof(buf));
		REQUIRE(len > 0, "format with bytes from %u", start);
		CHECK(count_lines(buf) == lines_plain, "the blocker spans lines (bytes from %u)", start);
		CHECK(qcow_stats_parse(buf, &b) == 0 && same_stats(&a, &b),
		      "blocker with bytes from %u does not round-trip", start);
	}
	snprintf(a.blocker, sizeof(a.blocker), "a=b\nfailed=0\\x41\r\t%s", "\xc3\xa9t\xc3\xa9");
	REQUIRE(qcow_stats_format(&a, buf, sizeof(buf)) > 0, "format");
	CHECK(strstr(buf, "blocker=a=b\\x0afailed=0\\\\x41\\x0d\\x09\xc3\xa9t\xc3\xa9\n") != NULL,
	      "blocker escaped as documented:\n%s", buf);
	CHECK(qcow_stats_parse(buf, &b) == 0 && same_stats(&a, &b) && b.failed,
	      "a blocker that looks like a key does not change another field");
	/* a full-length blocker whose every byte needs escaping */
	memset(a.blocker, '\n', sizeof(a.blocker) - 1);
	a.blocker[sizeof(a.blocker) - 1] = '\0';
	REQUIRE(qcow_stats_format(&a, buf, sizeof(buf)) > 0, "format of the longest blocker");
	CHECK(qcow_stats_parse(buf, &b) == 0 && same_stats(&a, &b), "longest blocker round trip");

	/* a longer blocker from a newer daemon is cut, still terminated */
	{
		char text[1024];
		int n = snprintf(text, sizeof(text), "virtual_size=5\nblocker=");
		for (int i = 0; i < 300; i++)
			text[n++] = 'x';
		text[n++] = '\n';
		text[n] = '\0';
		CHECK(qcow_stats_parse(text, &b) == 0, "overlong blocker parses");
		CHECK(strlen(b.blocker) == sizeof(b.blocker) - 1 && b.virtual_size == 5,
		      "overlong blocker cut to %zu bytes", sizeof(b.blocker) - 1);
	}

	/* an older daemon's text: no issue-6 keys, the new fields stay zero */
	CHECK(qcow_stats_parse("virtual_size=1048576\ncompactions_done=3\ncompacting=0\n"
			       "compact_progress=1.000000\npid=17\nimage=/x\n", &b) == 0,
	      "old text parses");
	CHECK(b.virtual_size == 1048576 && b.compactions_done == 3 && b.last_error == 0 &&
	      !b.failed && b.compactions_failed == 0 && b.min_file_size == 0 && b.blocker[0] == '\0',
	      "old text: known fields set, new fields zero");

	/* malformed values are errors */
	static const char *const bad[] = {
		"last_error=abc\n", "last_error=--5\n", "last_error=5x\n", "last_error=\n",
		"last_error=99999999999\n", "failed=2\n", "min_file_size=-1\n",
		"blocker=a\\qb\n", "blocker=a\\x4\n", "blocker=a\\\n", "blocker=\\x00\n",
		"blocker=tab\there\n",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memset(&b, 0, sizeof(b));
		b.virtual_size = 99;
		CHECK(qcow_stats_parse(bad[i], &b) == -EINVAL && b.virtual_size == 99,
		      "refused, *st untouched: %s", bad[i]);
	}
	CHECK(qcow_stats_parse("last_error=-5\n", &b) == 0 && b.last_error == -5, "negative int");
	CHECK(qcow_stats_parse("blocker=\n", &b) == 0 && b.blocker[0] == '\0', "empty blocker");

	/* too small a buffer */
	fill_all(&a, 3);
	int full = qcow_stats_format(&a, buf, sizeof(buf));
	REQUIRE(full > 0, "format");
	for (size_t len = 0; len <= (size_t)full; len += len < 8 ? 1 : 37) {
		char small[4096];
		memset(small, 'z', sizeof(small));
		CHECK(qcow_stats_format(&a, len ? small : NULL, len) == -ERANGE, "len %zu: -ERANGE", len);
		CHECK(len == 0 || small[0] == '\0', "len %zu: empty text on -ERANGE", len);
	}
	CHECK(qcow_stats_format(&a, buf, (size_t)full + 1) == full, "exact fit");
	return tap_done();
}
