/*
 * cmd_status.c - "qcowctl status": the live statistics of a mount, read
 * with the QCOWFS_IOC_STATUS ioctl (ctl_live.c), as text or JSON.
 *
 * Rules:
 *  - Shows what the daemon reported, never a value computed from guesses;
 *    a value the daemon does not know (min_file_size 0) is left out.
 *  - The engine's health (failed, last error) is shown first: it is what
 *    a user must not miss.
 */

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

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

int cmd_status(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "raw", no_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	bool json = false, raw = false;
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
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	ret = ctl_single_operand(self, argc, argv, "MOUNTPOINT", &mountpoint);
	if (ret)
		return ret;

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
