/*
 * cmd_status.c - "qcowctl status": the live statistics of a mount, read
 * with the QCOWFS_IOC_STATUS ioctl (ctl_live.c), as text or JSON.
 *
 * Three more forms: --raw (the daemon's key=value text), --prometheus
 * (the Prometheus text exposition format, for node_exporter's textfile
 * collector) and --watch (the human form refreshed in place, with a
 * progress line while a compaction runs).
 *
 * Rules:
 *  - Shows what the daemon reported, never a value computed from guesses;
 *    a value the daemon does not know (min_file_size 0) is left out.  The
 *    one exception is --watch's rate and estimated end, which are derived
 *    from successive samples and say so ("about").
 *  - The engine's health (failed, last error) is shown first: it is what
 *    a user must not miss.
 *  - --watch ends with exit 0 on SIGINT/SIGTERM (the cursor restored) and
 *    when the mount goes away (with a line saying so); only a mount that
 *    cannot be read at the first sample is an error.
 */

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowctl.h"

/* ---- status -------------------------------------------------------------- */

/* The words for the engine's health (struct qcow_stats: failed, last_error). */
static const char *status_state_name(const struct qcow_stats *st)
{
	return st->failed ? "failed" : st->last_error ? "error" : "ok";
}

/* Whether the status explains why the file is longer than it could be:
 * min_file_size 0 comes from a daemon that does not know. */
static bool status_file_held(const struct qcow_stats *st)
{
	return st->min_file_size && st->file_size > st->min_file_size;
}

static void status_print_human(const struct qcow_stats *st)
{
	char text[128], allocated[32];
	const char *error = ctl_status_error_text(st);

	/* The health first: it is what a user must not miss. */
	if (st->failed)
		printf("state:              " STATE_FAILED_TEXT "\n");
	else if (error)
		printf("state:              error; background work retries, and the error clears "
		       "when a flush succeeds again\n");
	else
		printf("state:              ok\n");
	if (error)
		printf("error:              %s\n", error);

	ctl_format_size_and_bytes(st->virtual_size, text, sizeof(text));
	printf("virtual size:       %s\n", text);
	ctl_format_size_and_bytes(st->file_size, text, sizeof(text));
	ctl_format_human_size(st->file_allocated, allocated, sizeof(allocated));
	printf("image file:         %s, %s allocated\n", text, allocated);
	printf("cluster size:       %" PRIu64 "\n", st->cluster_size);
	printf("clusters:           %" PRIu64 " in the file\n", st->clusters_total);
	printf("  header            %" PRIu64 "\n", st->clusters_header);
	printf("  used              %" PRIu64 " (%" PRIu64 " shared)\n", st->clusters_referenced, st->clusters_shared);
	printf("  junk              %" PRIu64 "\n", st->clusters_junk);
	printf("  erased            %" PRIu64 "\n", st->clusters_erased);
	printf("  available         %" PRIu64 "\n", st->clusters_available);
	printf("  copies            %" PRIu64 "\n", st->clusters_copies);
	printf("  roots             %" PRIu64 "\n", st->clusters_roots);
	printf("  pending           %" PRIu64 "\n", st->clusters_pending);
	printf("moves in flight:    %" PRIu64 "\n", st->moves_in_flight);
	ctl_format_size_and_bytes(st->map_bytes, text, sizeof(text));
	printf("cluster map memory: %s\n", text);
	printf("clusters moved:     %" PRIu64 "\n", st->clusters_moved);
	printf("streams repacked:   %" PRIu64 " (compressed)\n", st->streams_repacked);
	ctl_format_size_and_bytes(st->bytes_reclaimed, text, sizeof(text));
	printf("bytes reclaimed:    %s\n", text);
	ctl_format_size_and_bytes(st->bytes_discarded, text, sizeof(text));
	printf("bytes discarded:    %s\n", text);
	ctl_format_size_and_bytes(st->bytes_discard_requested, text, sizeof(text));
	printf("discards requested: %s\n", text);
	printf("compactions done:   %" PRIu64 "\n", st->compactions_done);
	printf("compactions failed: %" PRIu64 "\n", st->compactions_failed);
	if (st->min_file_size) {
		ctl_format_size_and_bytes(st->min_file_size, text, sizeof(text));
		printf("smallest file:      %s\n", text);
	}
	if (status_file_held(st) && st->blocker[0]) {
		printf("held by:            ");
		ctl_print_text_safely(st->blocker);
		putchar('\n');
	}
	if (st->compacting)
		printf("compaction:         running, %.1f%% done\n", 100.0 * st->compact_progress);
	else
		printf("compaction:         idle\n");
	printf("punch supported:    %s\n", st->punch_supported ? "yes" : "no");
	printf("read-only:          %s\n", st->read_only ? "yes" : "no");
}

static void status_print_json(const char *mountpoint, const struct qcow_stats *st)
{
	struct json_writer j = { .out = stdout };

	json_object_begin(&j, NULL);
	json_string(&j, "mountpoint", mountpoint);
	json_u64(&j, "virtual-size", st->virtual_size);
	json_u64(&j, "cluster-size", st->cluster_size);
	json_u64(&j, "file-size", st->file_size);
	json_u64(&j, "file-allocated", st->file_allocated);
	json_u64(&j, "clusters-total", st->clusters_total);
	json_u64(&j, "clusters-header", st->clusters_header);
	json_u64(&j, "clusters-used", st->clusters_referenced);
	json_u64(&j, "clusters-junk", st->clusters_junk);
	json_u64(&j, "clusters-erased", st->clusters_erased);
	json_u64(&j, "clusters-available", st->clusters_available);
	json_u64(&j, "clusters-copies", st->clusters_copies);
	json_u64(&j, "clusters-roots", st->clusters_roots);
	json_u64(&j, "clusters-pending", st->clusters_pending);
	json_u64(&j, "clusters-shared", st->clusters_shared);
	json_u64(&j, "map-bytes", st->map_bytes);
	json_u64(&j, "moves-in-flight", st->moves_in_flight);
	json_u64(&j, "clusters-moved", st->clusters_moved);
	json_u64(&j, "streams-repacked", st->streams_repacked);
	json_u64(&j, "bytes-reclaimed", st->bytes_reclaimed);
	json_u64(&j, "bytes-discarded", st->bytes_discarded);
	json_u64(&j, "bytes-discard-requested", st->bytes_discard_requested);
	json_u64(&j, "compactions-done", st->compactions_done);
	json_bool(&j, "compacting", st->compacting);
	json_double(&j, "compact-progress", st->compact_progress);
	json_bool(&j, "punch-supported", st->punch_supported);
	json_bool(&j, "read-only", st->read_only);
	json_string(&j, "state", status_state_name(st));
	json_string(&j, "error", ctl_status_error_text(st) ? ctl_status_error_text(st) : "");
	json_u64(&j, "errno", st->last_error < 0 ? (uint64_t)-(int64_t)st->last_error : 0);
	json_bool(&j, "failed", st->failed);
	json_u64(&j, "compactions-failed", st->compactions_failed);
	json_u64(&j, "min-file-size", st->min_file_size);
	json_string(&j, "blocker", st->blocker);
	json_object_end(&j);
}

/* ---- --prometheus ---------------------------------------------------------- */

/*
 * The Prometheus text exposition format: for each metric family a
 * "# HELP name text" and a "# TYPE name counter|gauge" line, then one
 * sample per line: name{label="value",...} number.  Names match
 * [a-zA-Z_:][a-zA-Z0-9_:]*; counters end in _total; in a label value a
 * backslash, a double quote and a newline are written \\, \" and \n; in a
 * HELP text only the backslash and the newline are escaped.  Our names and
 * help texts are constants without either, so only the image label needs
 * escaping.  Every sample carries image="PATH": one textfile may hold the
 * output for several mounts.
 */

/* A label value escaped per the format, into a malloc'ed string (NULL: no memory). */
static char *prom_escape_label(const char *value)
{
	size_t len = strlen(value);
	char *out = malloc(2 * len + 1), *p = out;

	if (!out)
		return NULL;
	for (const char *c = value; *c; c++) {
		if (*c == '\\' || *c == '"') {
			*p++ = '\\';
			*p++ = *c;
		} else if (*c == '\n') {
			*p++ = '\\';
			*p++ = 'n';
		} else {
			*p++ = *c;
		}
	}
	*p = '\0';
	return out;
}

static void prom_family(const char *name, const char *type, const char *help)
{
	printf("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void prom_sample(const char *name, const char *label, const char *extra, uint64_t value)
{
	printf("%s{image=\"%s\"%s} %" PRIu64 "\n", name, label, extra ? extra : "", value);
}

/* One family with one sample. */
static void prom_metric(const char *name, const char *type, const char *help, const char *label, uint64_t value)
{
	prom_family(name, type, help);
	prom_sample(name, label, NULL, value);
}

static int status_print_prometheus(const char *label, const struct qcow_stats *st)
{
	static const char *const G = "gauge", *const C = "counter";
	/* the cluster states of the map, one series each */
	const struct { const char *state; uint64_t value; } states[] = {
		{ "header", st->clusters_header }, { "used", st->clusters_referenced },
		{ "junk", st->clusters_junk }, { "erased", st->clusters_erased },
		{ "available", st->clusters_available }, { "copies", st->clusters_copies },
		{ "roots", st->clusters_roots }, { "pending", st->clusters_pending },
	};
	char extra[64];

	prom_metric("qcowfs_virtual_size_bytes", G, "Size of the disk the image holds.", label, st->virtual_size);
	prom_metric("qcowfs_cluster_size_bytes", G, "Cluster size of the image.", label, st->cluster_size);
	prom_metric("qcowfs_file_size_bytes", G, "Apparent size of the image file.", label, st->file_size);
	prom_metric("qcowfs_file_allocated_bytes", G, "Bytes the host file system allocated to the image file.",
		    label, st->file_allocated);
	if (st->min_file_size)
		prom_metric("qcowfs_min_file_size_bytes", G,
			    "Smallest size the image file could have after a full compaction.", label,
			    st->min_file_size);
	prom_metric("qcowfs_image_clusters", G, "Clusters the image file covers.", label, st->clusters_total);
	prom_family("qcowfs_clusters", G, "Clusters of the image file by state.");
	for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++) {
		snprintf(extra, sizeof(extra), ",state=\"%s\"", states[i].state);
		prom_sample("qcowfs_clusters", label, extra, states[i].value);
	}
	prom_metric("qcowfs_clusters_shared", G, "Used clusters with more than one reference (snapshots).", label,
		    st->clusters_shared);
	prom_metric("qcowfs_map_memory_bytes", G, "Memory the cluster map uses.", label, st->map_bytes);
	prom_metric("qcowfs_moves_in_flight", G, "Cluster moves of the compactor not yet complete.", label,
		    st->moves_in_flight);
	prom_metric("qcowfs_clusters_moved_total", C, "Clusters moved by compaction since the mount.", label,
		    st->clusters_moved);
	prom_metric("qcowfs_compressed_streams_repacked_total", C,
		    "Compressed streams moved by compaction since the mount.", label, st->streams_repacked);
	prom_metric("qcowfs_reclaimed_bytes_total", C,
		    "Bytes of the image file given back to the host since the mount.", label, st->bytes_reclaimed);
	prom_metric("qcowfs_discarded_bytes_total", C,
		    "Bytes of allocated host clusters that discards freed since the mount.", label, st->bytes_discarded);
	prom_metric("qcowfs_discard_requested_bytes_total", C,
		    "Guest bytes the discard requests covered since the mount, allocated or not.", label,
		    st->bytes_discard_requested);
	prom_metric("qcowfs_compactions_total", C, "Compaction passes completed since the mount.", label,
		    st->compactions_done);
	prom_metric("qcowfs_compactions_failed_total", C, "Compaction passes that ended in an error.", label,
		    st->compactions_failed);
	prom_metric("qcowfs_compacting", G, "1 while a compaction runs.", label, st->compacting);
	prom_family("qcowfs_compact_progress_ratio", G, "Fraction done of the running compaction (1 when idle).");
	printf("qcowfs_compact_progress_ratio{image=\"%s\"} %.6f\n", label,
	       st->compact_progress >= 0.0 && st->compact_progress <= 1.0 ? st->compact_progress : 0.0);
	prom_metric("qcowfs_punch_supported", G, "1 when the host file system can punch holes.", label,
		    st->punch_supported);
	prom_metric("qcowfs_read_only", G, "1 for a read-only mount.", label, st->read_only);
	prom_metric("qcowfs_failed", G, "1 when the engine refuses writes after an I/O error.", label, st->failed);
	prom_metric("qcowfs_last_error_errno", G, "errno of the background error not yet recovered from (0: none).",
		    label, st->last_error < 0 ? (uint64_t)-(int64_t)st->last_error : 0);
	fflush(stdout);
	return ferror(stdout) ? -EIO : 0;
}

/* Reads the status once and prints it for Prometheus. */
static int status_prometheus(const char *mountpoint)
{
	struct qcow_stats st;
	char *text = NULL, *image = NULL, *label = NULL;
	int status = EXIT_FAILURE;
	int ret = ctl_mount_read_status_text(mountpoint, &text);

	if (ret < 0) {
		ctl_report_status_error(mountpoint, ret);
		goto out;
	}
	if (qcow_stats_parse(text, &st) < 0) {
		ctl_report_status_error(mountpoint, -EPROTO);
		goto out;
	}
	/* an older daemon names no image: the mountpoint still tells them apart */
	image = ctl_status_value(text, "image");
	label = prom_escape_label(image ? image : mountpoint);
	if (!label) {
		ctl_print_error("%s", strerror(ENOMEM));
		goto out;
	}
	if (status_print_prometheus(label, &st) < 0) {
		ctl_print_error("cannot write the metrics: %s", strerror(EIO));
		goto out;
	}
	status = EXIT_SUCCESS;
out:
	free(label);
	free(image);
	free(text);
	return status;
}

/* ---- --watch --------------------------------------------------------------- */

/* Set by SIGINT/SIGTERM: the loop ends at its next look. */
static volatile sig_atomic_t watch_stop;

static void watch_on_signal(int sig)
{
	(void)sig;
	watch_stop = 1;
}

/*
 * What successive samples tell about the running compaction.  The engine
 * publishes the fraction of the free space below the end that is filled
 * (compact_progress) and the clusters moved since the mount; each move
 * fills about one cluster of that space, so the clusters this pass plans
 * to move are about moved-since-first-sample / progress-since-first-sample.
 */
struct watch_pass {
	bool active;
	uint64_t first_ms, first_moved;   /* the first sample that saw the pass */
	double first_progress;
	uint64_t last_ms, last_moved;     /* the previous sample */
	double rate;                      /* bytes per second, smoothed; < 0: not known yet */
};

static void watch_pass_update(struct watch_pass *w, const struct qcow_stats *st, uint64_t now_ms)
{
	if (!st->compacting) {
		w->active = false;
		return;
	}
	if (!w->active || st->clusters_moved < w->last_moved) {
		*w = (struct watch_pass){ .active = true, .first_ms = now_ms, .first_moved = st->clusters_moved,
					  .first_progress = st->compact_progress, .last_ms = now_ms,
					  .last_moved = st->clusters_moved, .rate = -1.0 };
		return;
	}
	if (now_ms > w->last_ms) {
		double sample = (double)(st->clusters_moved - w->last_moved) * (double)st->cluster_size * 1000.0 /
				(double)(now_ms - w->last_ms);
		/* smoothed so that one pause (a flush) does not swing it */
		w->rate = w->rate < 0 ? sample : 0.5 * w->rate + 0.5 * sample;
	}
	w->last_ms = now_ms;
	w->last_moved = st->clusters_moved;
}

/* "[#####     ]  42% moved ~120 / planned ~290 clusters, 35.2 MB/s, about 12 s left" */
static void watch_print_progress(const struct watch_pass *w, const struct qcow_stats *st, uint64_t now_ms)
{
	enum { WIDTH = 30 };
	double p = st->compact_progress >= 0.0 && st->compact_progress <= 1.0 ? st->compact_progress : 0.0;
	double dp = p - w->first_progress;
	uint64_t moved = st->clusters_moved - w->first_moved;
	int filled = (int)(p * WIDTH);

	printf("progress:           [");
	for (int i = 0; i < WIDTH; i++)
		putchar(i < filled ? '#' : ' ');
	printf("] %3d%%", (int)(p * 100.0));
	if (dp > 0.01 && moved) {
		double planned = (double)moved / dp;
		printf(", moved ~%" PRIu64 " / planned ~%" PRIu64 " clusters", (uint64_t)(planned * p + 0.5),
		       (uint64_t)(planned + 0.5));
	} else {
		printf(", %" PRIu64 " clusters moved since watching", moved);
	}
	if (w->rate >= 0)
		printf(", %.1f MB/s", w->rate / 1e6);
	/* the end from the progress made while we watched */
	if (dp > 0.01 && now_ms > w->first_ms) {
		double left_s = (1.0 - p) * (double)(now_ms - w->first_ms) / 1000.0 / dp;
		time_t end = time(NULL) + (time_t)(left_s + 0.5);
		struct tm tm;
		char at[16] = "";

		if (localtime_r(&end, &tm))
			strftime(at, sizeof(at), "%H:%M:%S", &tm);
		printf(", about %.0f s left (%s)", left_s, at);
	} else {
		printf(", end not estimated yet");
	}
	putchar('\n');
}

/* Whether a failed status read means the mount is gone (unmounted: the
 * path is a plain file or missing; daemon dead: ENOTCONN). */
static bool watch_mount_gone(int ret)
{
	return ret == -ENOENT || ret == -ENOTCONN || ctl_errno_means_not_qcowfs(-ret);
}

/* The first line of each refresh: which mount, when, how often. */
static void watch_print_header(const char *mountpoint, unsigned interval_ms, bool tty)
{
	time_t t = time(NULL);
	struct tm tm;
	char at[32] = "";

	if (localtime_r(&t, &tm))
		strftime(at, sizeof(at), "%Y-%m-%d %H:%M:%S", &tm);
	printf("mountpoint:         ");
	ctl_print_text_safely(mountpoint);
	printf(" (%s, every %.1f s%s)\n", at, interval_ms / 1000.0, tty ? ", Ctrl-C ends" : "");
}

static int status_watch(const char *mountpoint, unsigned interval_ms)
{
	struct sigaction sa = { .sa_handler = watch_on_signal };
	struct watch_pass pass = { .active = false };
	bool tty = isatty(STDOUT_FILENO);
	int status = EXIT_SUCCESS;

	/* no SA_RESTART: the sleep must end at once */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	if (tty)
		fputs("\033[?25l", stdout);   /* hide the cursor while redrawing */
	for (unsigned round = 0; !watch_stop; round++) {
		struct qcow_stats st;
		uint64_t now;
		int ret = ctl_mount_read_status(mountpoint, &st);

		if (ret < 0 && watch_stop)
			break;   /* the signal interrupted the read (EINTR): not an error */
		if (ret < 0) {
			if (round > 0 && watch_mount_gone(ret)) {
				printf("%s%s is no longer mounted%s; stopped watching\n", tty ? "\n" : "", mountpoint,
				       ret == -ENOTCONN ? " (the qcowfs daemon is gone)" : "");
			} else {
				ctl_report_status_error(mountpoint, ret);
				status = EXIT_FAILURE;
			}
			break;
		}
		now = ctl_monotonic_ms();
		watch_pass_update(&pass, &st, now);
		if (tty)
			fputs("\033[H\033[2J", stdout);   /* cursor home, clear the screen */
		else if (round > 0)
			putchar('\n');
		watch_print_header(mountpoint, interval_ms, tty);
		status_print_human(&st);
		if (st.compacting)
			watch_print_progress(&pass, &st, now);
		fflush(stdout);
		for (uint64_t start = ctl_monotonic_ms(); !watch_stop && ctl_monotonic_ms() - start < interval_ms;)
			usleep(20000);   /* ends within 20 ms of a signal */
	}
	if (tty)
		fputs("\033[?25h", stdout);   /* the cursor back, whatever ended us */
	fflush(stdout);
	return status;
}

/* --interval: seconds, a fraction allowed, 0.1 to 3600. */
static int status_parse_interval(const char *text, unsigned *ms)
{
	char *end;
	double s;

	errno = 0;
	s = strtod(text, &end);
	if (errno || end == text || *end || !(s >= 0.1 && s <= 3600.0))
		return -EINVAL;
	*ms = (unsigned)(s * 1000.0 + 0.5);
	return 0;
}

int cmd_status(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "raw", no_argument, NULL, 'r' },
		{ "prometheus", no_argument, NULL, 'p' },
		{ "watch", no_argument, NULL, 'w' },
		{ "interval", required_argument, NULL, 'i' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	bool json = false, raw = false, prometheus = false, watch = false, interval_given = false;
	unsigned interval_ms = 2000;
	const char *mountpoint;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'j':
			json = true;
			break;
		case 'r':
			raw = true;
			break;
		case 'p':
			prometheus = true;
			break;
		case 'w':
			watch = true;
			break;
		case 'i':
			if (status_parse_interval(optarg, &interval_ms) < 0)
				return ctl_usage_error(self, "--interval wants seconds from 0.1 to 3600, not '%s'", optarg);
			interval_given = true;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	if ((int)json + (int)raw + (int)prometheus + (int)watch > 1)
		return ctl_usage_error(self, "--json, --raw, --prometheus and --watch exclude each other");
	if (interval_given && !watch)
		return ctl_usage_error(self, "--interval goes with --watch");
	ret = ctl_single_operand(self, argc, argv, "MOUNTPOINT", &mountpoint);
	if (ret)
		return ret;

	if (prometheus)
		return status_prometheus(mountpoint);
	if (watch)
		return status_watch(mountpoint, interval_ms);
	if (raw) {
		/* the daemon's key=value text as is, for scripts */
		char *text;
		ret = ctl_mount_read_status_text(mountpoint, &text);
		if (ret < 0) {
			ctl_report_status_error(mountpoint, ret);
			return EXIT_FAILURE;
		}
		fputs(text, stdout);
		free(text);
		return EXIT_SUCCESS;
	}
	ret = ctl_mount_read_status(mountpoint, &st);
	if (ret < 0) {
		char msg[2 * PATH_MAX + 256];

		ctl_status_error_message(mountpoint, ret, msg, sizeof(msg));
		ctl_print_error("%s", msg);
		if (json)
			json_print_error("mountpoint", mountpoint, msg, ret);
		return EXIT_FAILURE;
	}
	if (json)
		status_print_json(mountpoint, &st);
	else
		status_print_human(&st);
	return EXIT_SUCCESS;
}
