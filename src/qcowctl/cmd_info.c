/*
 * cmd_info.c - "qcowctl info": reads an image (or its whole backing chain)
 * into struct info_image and prints it with cmd_info_blocks.c, as
 * "qemu-img info" does.
 *
 * Rules:
 *  - Reads the image's metadata only (qcow_info_read and the list
 *    functions, never writes); what is extra (the bitmaps, the LUKS
 *    details) is left out with a warning when it cannot be read, rather
 *    than failing the command.
 *  - A failure with --json still prints one JSON object (json_print_error).
 */

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "qcow.h"
#include "qcowctl.h"
#include "cmd_info.h"

/* QEMU's path_combine: a relative backing name is relative to the folder
 * of the image that names it; an image named without a folder leaves it
 * as it is. */
static void info_resolve_backing(const char *image, const char *backing, char *out, size_t len)
{
	const char *slash = strrchr(image, '/');

	if (backing[0] == '/' || !slash)
		snprintf(out, len, "%s", backing);
	else
		snprintf(out, len, "%.*s%s", (int)(slash - image + 1), image, backing);
}

static void info_image_free(struct info_image *im)
{
	free(im->snapshots);
	im->snapshots = NULL;
	im->nb_snapshots = 0;
	free(im->bitmaps);
	im->bitmaps = NULL;
	im->nb_bitmaps = 0;
}

/* Reads what info shows of the image at path in the given format
 * (format NULL: qcow2).  Prints the reason and returns -errno on failure;
 * reason (if not NULL) receives it for a JSON error object. */
static int info_image_read(const char *path, const char *format, struct info_image *im,
			   char *reason, size_t reason_len)
{
	char err[1024] = "", what[PATH_MAX + 32];
	int ret;

	memset(im, 0, sizeof(*im));
	im->filename = path;
	im->format = format && strcmp(format, "raw") == 0 ? "raw" : "qcow2";
	snprintf(what, sizeof(what), "cannot read %s", path);
	if (!info_is_qcow2(im)) {
		struct stat st;

		if (stat(path, &st) < 0) {
			ret = -errno;
			ctl_engine_call_begin(true);
			ctl_engine_call_end_reason(ret, what, "", reason, reason_len);
			return ret;
		}
		im->virtual_size = (uint64_t)st.st_size;
		im->actual_size = (uint64_t)st.st_blocks * 512;
		return 0;
	}
	ctl_engine_call_begin(true);
	ret = qcow_info_read(path, &im->q, err, sizeof(err));
	if (ret == 0 && im->q.nb_snapshots)
		ret = qcow_snapshot_list_file(path, &im->snapshots, &im->nb_snapshots, err, sizeof(err));
	ctl_engine_call_end_reason(ret, what, err, reason, reason_len);
	if (ret < 0) {
		info_image_free(im);
		return ret;
	}
	/* The bitmaps are extra: without them the rest still stands (a
	 * warning says why they are missing). */
	if (qcow_pbitmap_list_file(path, &im->bitmaps, &im->nb_bitmaps, err, sizeof(err)) < 0) {
		fprintf(stderr, "qcowctl: warning: cannot list the bitmaps of %s: %s\n", path, err);
		im->bitmaps = NULL;
		im->nb_bitmaps = 0;
	}
	for (uint32_t i = 0; i < im->nb_bitmaps; i++)
		im->bitmaps[i].name[sizeof(im->bitmaps[i].name) - 1] = '\0';
	/* The engine fills fixed arrays; never trust them to be terminated. */
	im->q.backing_file[sizeof(im->q.backing_file) - 1] = '\0';
	im->q.backing_format[sizeof(im->q.backing_format) - 1] = '\0';
	/* The LUKS details are extra: without them the format is still shown
	 * (with a warning), where qemu-img would refuse the image. */
	if (im->q.crypt_method == 2) {
		ret = qcow_info_luks(path, &im->luks, err, sizeof(err));
		if (ret == 0)
			im->has_luks = true;
		else
			ctl_print_error("warning: %s: %s", path, err[0] ? err : strerror(-ret));
	}
	im->virtual_size = im->q.virtual_size;
	im->actual_size = im->q.file_allocated;
	info_resolve_backing(path, im->q.backing_file, im->full_backing, sizeof(im->full_backing));
	return 0;
}

/* --backing-chain: every image of the chain, top first, as "qemu-img info
 * --backing-chain" shows them (text: one block each, a blank line between;
 * JSON: an array).  The top keeps the name it was given; the others are
 * named by their path resolved as QEMU resolves it. */
static int info_chain(struct info_out *o, const char *image)
{
	struct qcow_chain_entry *chain = NULL;
	struct info_image *ims = NULL;
	size_t n = 0;
	char err[2048] = "", what[PATH_MAX + 64], reason[PATH_MAX + 64 + 2048 + 64] = "";
	int ret, status = EXIT_FAILURE;

	snprintf(what, sizeof(what), "cannot follow the backing chain of %s", image);
	ctl_engine_call_begin(true);
	ret = qcow_chain_list(image, NULL, &chain, &n, err, sizeof(err));
	ctl_engine_call_end_reason(ret, what, err, reason, sizeof(reason));
	if (ret < 0)
		goto fail;
	ims = calloc(n ? n : 1, sizeof(*ims));
	if (!ims) {
		ret = -ENOMEM;
		snprintf(reason, sizeof(reason), "%s: %s", what, strerror(ENOMEM));
		ctl_print_error("%s", reason);
		goto fail;
	}
	/* everything read before anything is printed: a chain that fails
	 * half-way prints an error, not half an answer */
	for (size_t i = 0; i < n; i++) {
		chain[i].path[sizeof(chain[i].path) - 1] = '\0';
		chain[i].format[sizeof(chain[i].format) - 1] = '\0';
		ret = info_image_read(i == 0 ? image : chain[i].path, chain[i].format, &ims[i],
				      reason, sizeof(reason));
		if (ret < 0)
			goto fail;
	}
	if (o->json)
		json_array_begin(&o->j, NULL);
	for (size_t i = 0; i < n; i++) {
		if (i && !o->json)
			putchar('\n');
		info_print(o, &ims[i]);
	}
	if (o->json)
		json_array_end(&o->j);
	status = EXIT_SUCCESS;
	goto out;
fail:
	if (o->json)
		json_print_error("filename", image, reason, ret);
out:
	for (size_t i = 0; ims && i < n; i++)
		info_image_free(&ims[i]);
	free(ims);
	free(chain);
	return status;
}

int cmd_info(const struct command *self, int argc, char **argv)
{
	enum { OPT_BACKING_CHAIN = 1000 };
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct info_out o = { .j = { .out = stdout } };
	struct info_image im;
	bool chain = false;
	const char *image;
	char reason[2048] = "";
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'j':
			o.json = true;
			break;
		case OPT_BACKING_CHAIN:
			chain = true;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	ret = ctl_single_operand(self, argc, argv, "IMAGE", &image);
	if (ret)
		return ret;
	if (chain)
		return info_chain(&o, image);

	ret = info_image_read(image, NULL, &im, reason, sizeof(reason));
	if (ret < 0) {
		if (o.json)
			json_print_error("filename", image, reason, ret);
		return EXIT_FAILURE;
	}
	info_print(&o, &im);
	info_image_free(&im);
	return EXIT_SUCCESS;
}
