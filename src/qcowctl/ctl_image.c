/*
 * ctl_image.c - opening and closing an image offline, for the commands
 * that work on an image file directly (compact, sparsify, snapshot).
 *
 * Rules:
 *  - The work happens in the command's own thread: no recycler and no
 *    background compaction, which would only race it for the same
 *    clusters.  --data-file (ctl_opt_data_file) applies to every open.
 *  - Failures are reported here, once, naming the image; the caller only
 *    adds its own hint (a mounted image wants the live form of the
 *    command) and chooses the exit status.
 *  - An image is closed even after a failed operation: close writes exact
 *    refcounts, and an image left open would be left dirty.
 */

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "qcow.h"
#include "qcowctl.h"

int ctl_image_open_offline(const char *image, bool read_only, struct qcow_image **img)
{
	struct qcow_open_opts opts;
	char err[1024] = "", what[PATH_MAX + 32];
	int ret;

	qcow_open_opts_default(&opts);
	opts.read_only = read_only;
	opts.data_file = ctl_opt_data_file;
	opts.recycler = false;
	opts.compact = false;
	snprintf(what, sizeof(what), "cannot open %s", image);
	ctl_engine_call_begin(true);
	ret = qcow_image_open(image, &opts, img, err, sizeof(err));
	ctl_engine_call_end(ret, what, err);
	return ret;
}

int ctl_image_close_offline(struct qcow_image *img, const char *image)
{
	int ret = qcow_image_close(img);

	if (ret < 0)
		ctl_print_error("closing %s failed: %s", image, strerror(-ret));
	return ret;
}
