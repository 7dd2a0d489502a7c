/*
 * cmd_compact.c - "qcowctl compact" and "qcowctl sparsify": shrink an
 * image now, through a live mount (a request ioctl, then polling the
 * status) or offline (libqcow directly).
 *
 * Rules:
 *  - Never reports success the engine did not report: a pass that failed
 *    (compactions_failed went up, or the engine returned an error) exits 1
 *    and never prints 100 %.
 *  - A live request the daemon never reports as started nor finished
 *    within COMPACT_PICKUP_GRACE_MS found nothing to do: no complaint.
 *  - An image file that a qcowfs mount serves is not opened offline: the
 *    message names the mountpoint to use instead.
 */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowfs_ioctl.h"
#include "qcowctl.h"

/* Polling a live mount: often enough that a progress bar moves smoothly,
 * rarely enough that the daemon does not notice us. */
#define STATUS_POLL_MS 200
/* A compaction request that the daemon never reports as started nor as
 * finished within this long found nothing to do (or was merged into a
 * pass that ended between two polls): stop waiting, without complaint. */
#define COMPACT_PICKUP_GRACE_MS 5000

/* ---- compact ------------------------------------------------------------- */

/*
 * The end of every compaction that worked: what it did (clusters moved,
 * the file's size before -> after) and, when the file is still longer than
 * the engine says it could be, what holds it there.
 */
static void print_compact_result(uint64_t moved, uint64_t streams, uint64_t size_before, uint64_t alloc_before,
				 uint64_t size_after, uint64_t alloc_after,
				 const struct qcow_stats *after)
{
	char size_a[32], size_b[32], alloc_a[32], alloc_b[32], min[32];

	ctl_format_human_size(size_before, size_a, sizeof(size_a));
	ctl_format_human_size(size_after, size_b, sizeof(size_b));
	ctl_format_human_size(alloc_before, alloc_a, sizeof(alloc_a));
	ctl_format_human_size(alloc_after, alloc_b, sizeof(alloc_b));
	printf("moved %" PRIu64 " cluster%s", moved, moved == 1 ? "" : "s");
	if (streams)
		printf(" and %" PRIu64 " compressed stream%s", streams, streams == 1 ? "" : "s");
	printf("; image file %s -> %s (%" PRIu64 " -> %" PRIu64 " bytes), allocated %s -> %s\n", size_a, size_b,
	       size_before, size_after, alloc_a, alloc_b);
	if (after->min_file_size && size_after > after->min_file_size) {
		ctl_format_human_size(after->min_file_size, min, sizeof(min));
		printf("the file stays above its minimum of %s (%" PRIu64 " bytes): ", min,
		       after->min_file_size);
		if (after->blocker[0])
			ctl_print_text_safely(after->blocker);
		else
			fputs("the engine gave no reason", stdout);
		putchar('\n');
	}
	fflush(stdout);
}

/* Why a compaction failed, from the engine's status (never "Success").
 * The engine clears last_error at the next successful flush, which may come
 * before we look: then only its log names the error. */
static const char *compact_failure_text(const struct qcow_stats *st)
{
	const char *error = ctl_status_error_text(st);
	return error ? error : "the engine counted a failed compaction; the qcowfs log names the error";
}

/*
 * Whether the pass we asked for is over.  The daemon may start it before
 * our first poll and finish it between two polls, so "compacting" alone can
 * be missed both ways; compactions_done or compactions_failed moving on is
 * the reliable sign.  A pass seen running that stopped counts too (an
 * engine that does not count aborted passes).  If neither ever shows, the
 * request had nothing to do.
 */
static bool compact_request_finished(const struct qcow_stats *before, const struct qcow_stats *now,
				     bool seen_running, uint64_t waited_ms)
{
	if (now->compacting)
		return false;
	if (now->compactions_done != before->compactions_done ||
	    now->compactions_failed != before->compactions_failed)
		return true;
	if (now->failed && !before->failed)
		return true;
	if (seen_running && !before->compacting)
		return true;
	return waited_ms >= COMPACT_PICKUP_GRACE_MS;
}

static int compact_mount(const char *mountpoint, const struct qcow_stats *before)
{
	struct progress_display progress;
	struct qcow_stats now = *before;
	bool seen_running = false;
	int seen_error = 0;   /* the last error the status showed while we waited */
	uint64_t start;
	int ret;

	if (before->read_only) {
		ctl_print_error("cannot compact %s: the mount is read-only", mountpoint);
		return EXIT_FAILURE;
	}
	if (before->failed) {
		ctl_print_error("cannot compact %s: the image is in the " STATE_FAILED_TEXT " state (%s)",
			    mountpoint, compact_failure_text(before));
		return EXIT_FAILURE;
	}
	ret = ctl_mount_ioctl(mountpoint, O_RDWR, QCOWFS_IOC_COMPACT, NULL);
	if (ret < 0) {
		ctl_report_compact_request_error(mountpoint, ret);
		return EXIT_FAILURE;
	}
	start = ctl_monotonic_ms();
	ctl_progress_init(&progress);
	for (;;) {
		ctl_sleep_ms(STATUS_POLL_MS);
		ret = ctl_mount_read_status(mountpoint, &now);
		if (ret < 0) {
			ctl_progress_finish(&progress, false);
			ctl_report_status_error(mountpoint, ret);
			return EXIT_FAILURE;
		}
		/* A pass that was already running when we asked is not the one
		 * we asked for; only one that starts afterwards counts as "seen". */
		if (now.compacting && (!before->compacting || now.compactions_done != before->compactions_done))
			seen_running = true;
		if (now.compacting)
			ctl_progress_show(&progress, now.compact_progress);
		if (now.last_error < 0)
			seen_error = now.last_error;
		if (compact_request_finished(before, &now, seen_running, ctl_monotonic_ms() - start))
			break;
	}
	/* An error that a flush cleared before our last poll still names
	 * what went wrong. */
	if (!now.last_error && !now.failed && seen_error)
		now.last_error = seen_error;
	/* A failure counted while we waited is ours (or one of a pass ours
	 * was merged into): either way the file did not get compacted. */
	if (now.compactions_failed != before->compactions_failed || (now.failed && !before->failed)) {
		ctl_progress_finish(&progress, false);
		ctl_print_error("compacting %s failed: %s", mountpoint, compact_failure_text(&now));
		if (now.failed)
			ctl_print_error("%s: " STATE_FAILED_TEXT, mountpoint);
		return EXIT_FAILURE;
	}
	/* No pass ran while an error is pending: the engine is backing off
	 * after a failure (or cannot write at all), so nothing was done. */
	if (now.compactions_done == before->compactions_done && !seen_running && now.last_error < 0) {
		ctl_progress_finish(&progress, false);
		ctl_print_error("compacting %s did not run: the engine reports an error: %s", mountpoint,
			    compact_failure_text(&now));
		return EXIT_FAILURE;
	}
	ctl_progress_finish(&progress, true);
	print_compact_result(now.clusters_moved - before->clusters_moved, now.streams_repacked - before->streams_repacked,
			     before->file_size,
			     before->file_allocated, now.file_size, now.file_allocated, &now);
	return EXIT_SUCCESS;
}

/* An image a qcowfs mount serves is locked by its daemon: say where it is
 * mounted (the engine's lock message can only say "in use"). */
static bool image_is_mounted(const char *command, const char *image)
{
	char mountpoint[PATH_MAX];
	long pid = 0;
	bool read_only = false;

	if (ctl_find_image_mount(image, mountpoint, sizeof(mountpoint), &pid, &read_only) < 0)
		return false;
	ctl_report_image_mounted(command, image, mountpoint, pid, read_only);
	return true;
}

static int compact_image(const char *image)
{
	struct qcow_image *img = NULL;
	struct qcow_stats st_before, st_after;
	struct progress_display progress;
	struct stat before, after;
	int ret;

	if (image_is_mounted("compact", image))
		return EXIT_FAILURE;
	if (stat(image, &before) < 0) {
		ctl_print_error("cannot access %s: %s", image, strerror(errno));
		return EXIT_FAILURE;
	}
	ret = ctl_image_open_offline(image, false, &img);
	if (ret < 0) {
		if (ret == -EAGAIN || ret == -EBUSY || ret == -EWOULDBLOCK)
			fprintf(stderr, "qcowctl: if %s is mounted, run 'qcowctl compact MOUNTPOINT'\n", image);
		return EXIT_FAILURE;
	}

	qcow_image_get_stats(img, &st_before);
	ctl_progress_init(&progress);
	ret = qcow_image_compact(img, ctl_progress_callback, &progress);
	qcow_image_get_stats(img, &st_after);
	/* An engine that counts a failure but returns 0 still failed. */
	if (ret == 0 && (st_after.compactions_failed != st_before.compactions_failed || st_after.failed))
		ret = st_after.last_error < 0 ? st_after.last_error : -EIO;
	ctl_progress_finish(&progress, ret == 0);
	if (ret < 0)
		ctl_print_error("compacting %s failed: %s", image, strerror(-ret));

	/* Close even after a failed compaction: close writes the refcounts,
	 * and an image left open would be left dirty. */
	if (ctl_image_close_offline(img, image) < 0)
		return EXIT_FAILURE;
	if (ret < 0)
		return EXIT_FAILURE;

	if (stat(image, &after) < 0) {
		ctl_print_error("cannot access %s after compaction: %s", image, strerror(errno));
		return EXIT_FAILURE;
	}
	print_compact_result(st_after.clusters_moved - st_before.clusters_moved,
			     st_after.streams_repacked - st_before.streams_repacked, (uint64_t)before.st_size, (uint64_t)before.st_blocks * 512,
			     (uint64_t)after.st_size, (uint64_t)after.st_blocks * 512, &st_after);
	return EXIT_SUCCESS;
}

int cmd_compact(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "no-wait", no_argument, NULL, 'n' },
		{ "data-file", required_argument, NULL, 'D' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	const char *target;
	bool no_wait = false;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'n':
			no_wait = true;
			break;
		case 'D':
			ctl_opt_data_file = optarg;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	ret = ctl_single_operand(self, argc, argv, "MOUNTPOINT or IMAGE", &target);
	if (ret)
		return ret;

	/* A live mount answers the status ioctl; an image file does not. */
	ret = ctl_mount_read_status(target, &st);
	if (ret == 0 && no_wait) {
		ret = ctl_mount_ioctl(target, O_RDWR, QCOWFS_IOC_COMPACT, NULL);
		if (ret < 0) {
			ctl_report_compact_request_error(target, ret);
			return EXIT_FAILURE;
		}
		return EXIT_SUCCESS;
	}
	if (ret == 0)
		return compact_mount(target, &st);
	if (no_wait) {
		ctl_print_error("--no-wait needs a qcowfs mountpoint; %s is not one", target);
		return EXIT_FAILURE;
	}
	if (ctl_errno_means_not_qcowfs(-ret))
		return compact_image(target);
	ctl_report_target_error(target, ret);
	return EXIT_FAILURE;
}

/* ---- sparsify ------------------------------------------------------------ */

/* Progress of a sparsify: on a terminal one line redrawn in place, in a
 * pipe or log a line per 10 % (the compaction's bar says "compacting"). */
struct sparsify_display {
	bool tty;
	int shown;   /* percent last shown, -1 before the first */
};

static void sparsify_show(struct sparsify_display *d, uint64_t done, uint64_t total, uint64_t freed)
{
	/* total 0: a run that has not counted the disk yet */
	int percent = total ? (int)(100.0 * (double)done / (double)total) : 0;
	if (percent > 100)
		percent = 100;
	if (d->tty) {
		if (percent == d->shown)
			return;
		printf("\rsparsify: %3d%%, %" PRIu64 " clusters freed", percent, freed);
	} else {
		if (d->shown >= 0 && percent / 10 <= d->shown / 10)
			return;
		printf("sparsify: %d%%, %" PRIu64 " clusters freed\n", percent, freed);
	}
	fflush(stdout);
	d->shown = percent;
}

/* complete: the run reached the end of the disk (100 % shown once) */
static void sparsify_display_end(struct sparsify_display *d, bool complete, uint64_t freed)
{
	if (complete && d->shown < 100) {
		d->shown = -1;
		sparsify_show(d, 1, 1, freed);
	}
	if (d->tty && d->shown >= 0)
		putchar('\n');
	fflush(stdout);
}

/* The summary line, and what was left and why. */
static void sparsify_summary(uint64_t scanned, uint64_t freed, uint64_t bytes, uint64_t shared,
			     uint64_t compressed, uint64_t changed, uint64_t backing)
{
	char size[32];
	ctl_format_human_size(bytes, size, sizeof(size));
	printf("scanned %" PRIu64 " allocated cluster%s, freed %" PRIu64 " that read all zeros: %s (%" PRIu64
	       " bytes) given back\n", scanned, scanned == 1 ? "" : "s", freed, size, bytes);
	if (shared || compressed || changed || backing) {
		printf("left allocated:");
		const char *sep = " ";
		if (shared)
			printf("%s%" PRIu64 " shared with a snapshot", sep, shared), sep = ", ";
		if (compressed)
			printf("%s%" PRIu64 " compressed", sep, compressed), sep = ", ";
		if (changed)
			printf("%s%" PRIu64 " written while being checked", sep, changed), sep = ", ";
		if (backing)
			printf("%s%" PRIu64 " whose zeros hide backing data", sep, backing);
		putchar('\n');
	}
	fflush(stdout);
}

static int sparsify_mount(const char *mountpoint, const struct qcow_stats *before)
{
	struct qcowfs_sparsify sp = { .op = QCOWFS_SPARSIFY_START };
	struct sparsify_display d = { .tty = isatty(STDOUT_FILENO), .shown = -1 };
	struct qcow_stats after;

	if (before->read_only) {
		ctl_print_error("cannot sparsify %s: the mount is read-only", mountpoint);
		return EXIT_FAILURE;
	}
	int ret = ctl_mount_ioctl(mountpoint, O_RDWR, QCOWFS_IOC_SPARSIFY, &sp);
	if (ret < 0) {
		if (ret == -EBUSY)
			ctl_print_error("cannot sparsify %s: a sparsify is already running on it", mountpoint);
		else if (ret == -EACCES || ret == -EBADF || ret == -EPERM)
			ctl_print_error("cannot sparsify %s: %s (it needs write permission on the view)", mountpoint,
				    strerror(-ret));
		else if (ctl_errno_means_not_qcowfs(-ret))
			ctl_print_error("cannot sparsify %s: this qcowfs does not know sparsify (older daemon?)", mountpoint);
		else
			ctl_print_error("cannot sparsify %s: %s", mountpoint, strerror(-ret));
		return EXIT_FAILURE;
	}
	uint64_t run = sp.run;
	for (;;) {
		sparsify_show(&d, sp.guest_done, sp.guest_clusters, sp.freed);
		if (sp.state != QCOWFS_SPARSIFY_RUNNING || sp.run != run)
			break;
		ctl_sleep_ms(STATUS_POLL_MS);
		sp = (struct qcowfs_sparsify){ .op = QCOWFS_SPARSIFY_QUERY };
		ret = ctl_mount_ioctl(mountpoint, O_RDONLY, QCOWFS_IOC_SPARSIFY, &sp);
		if (ret < 0) {
			sparsify_display_end(&d, false, 0);
			ctl_print_error("lost track of the sparsify on %s: %s", mountpoint, strerror(-ret));
			return EXIT_FAILURE;
		}
	}
	sparsify_display_end(&d, sp.run == run && sp.state == QCOWFS_SPARSIFY_DONE && sp.error == 0, sp.freed);
	if (sp.run != run) {
		ctl_print_error("lost track of the sparsify on %s: another one started", mountpoint);
		return EXIT_FAILURE;
	}
	sparsify_summary(sp.scanned, sp.freed, sp.bytes_freed, sp.skipped_shared, sp.skipped_compressed,
			 sp.skipped_changed, sp.skipped_backing);
	if (sp.error < 0) {
		ctl_print_error("sparsify of %s failed: %s", mountpoint, strerror(-sp.error));
		return EXIT_FAILURE;
	}
	if (ctl_mount_read_status(mountpoint, &after) == 0 && sp.freed)
		printf("the image file is %" PRIu64 " bytes; compaction shortens it in the background "
		       "('qcowctl compact %s' waits for it)\n", after.file_size, mountpoint);
	return EXIT_SUCCESS;
}

static int sparsify_image_progress(const struct qcow_sparsify_result *r, void *opaque)
{
	sparsify_show(opaque, r->guest_done, r->guest_clusters, r->freed);
	return 0;
}

/* Offline: sparsify, then compact (no recycler runs in this process). */
static int sparsify_image(const char *image)
{
	struct qcow_image *img = NULL;
	struct qcow_sparsify_result r;
	struct sparsify_display d = { .tty = isatty(STDOUT_FILENO), .shown = -1 };
	struct stat before, after;

	if (image_is_mounted("sparsify", image))
		return EXIT_FAILURE;
	if (stat(image, &before) < 0) {
		ctl_print_error("cannot access %s: %s", image, strerror(errno));
		return EXIT_FAILURE;
	}
	int ret = ctl_image_open_offline(image, false, &img);
	if (ret < 0) {
		if (ret == -EAGAIN || ret == -EBUSY || ret == -EWOULDBLOCK)
			fprintf(stderr, "qcowctl: if %s is mounted, run 'qcowctl sparsify MOUNTPOINT'\n", image);
		return EXIT_FAILURE;
	}
	ret = qcow_image_sparsify(img, sparsify_image_progress, &d, &r);
	sparsify_display_end(&d, ret == 0, r.freed);
	sparsify_summary(r.scanned, r.freed, r.bytes_freed, r.skipped_shared, r.skipped_compressed,
			 r.skipped_changed, r.skipped_backing);
	if (ret < 0)
		ctl_print_error("sparsify of %s failed: %s", image, strerror(-ret));
	else if (r.freed && (ret = qcow_image_compact(img, NULL, NULL)) < 0)
		ctl_print_error("compacting %s after the sparsify failed: %s", image, strerror(-ret));
	/* close even after a failure: it writes the refcounts */
	if (ctl_image_close_offline(img, image) < 0)
		return EXIT_FAILURE;
	if (ret < 0)
		return EXIT_FAILURE;
	if (stat(image, &after) == 0)
		printf("image file %" PRIu64 " -> %" PRIu64 " bytes\n", (uint64_t)before.st_size,
		       (uint64_t)after.st_size);
	return EXIT_SUCCESS;
}

int cmd_sparsify(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	const char *target;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1)
		return ctl_other_option(self, opt, argv);
	ret = ctl_single_operand(self, argc, argv, "MOUNTPOINT or IMAGE", &target);
	if (ret)
		return ret;
	/* A live mount answers the status ioctl; an image file does not. */
	ret = ctl_mount_read_status(target, &st);
	if (ret == 0)
		return sparsify_mount(target, &st);
	if (ctl_errno_means_not_qcowfs(-ret))
		return sparsify_image(target);
	ctl_report_target_error(target, ret);
	return EXIT_FAILURE;
}
