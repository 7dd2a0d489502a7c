/*
 * cmd_map.c - qcowctl map: the guest-to-host mapping of an image, as
 * qemu-img map prints it, and (--picture) the image file drawn as a grid
 * of cells (ctl_picture.c draws it).
 *
 * Rules:
 *  - The mapping is qemu-img map's: the engine yields extents
 *    (qcow_image_map_extent) and they are merged here with qemu-img's
 *    rules (same depth, flags and file, contiguous host offsets), printed
 *    in its two formats.  The JSON has one key more than QEMU 7.2 prints:
 *    "compressed", as QEMU 8.2 and later print it (and merge on it).
 *  - An image file is opened read-only with its backing chain.  On a live
 *    mount the mapping is read from the image file the daemon names,
 *    opened read-only without locks (as qemu-img map -U does): it shows
 *    what the daemon has flushed.  The picture of a live mount comes from
 *    the daemon's own cluster map (QCOWFS_IOC_PICTURE), so it shows
 *    compaction as it happens.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"
#include "qcowctl.h"
#include "qcowfs_ioctl.h"

enum map_format { MAP_HUMAN, MAP_JSON };

/* qemu-img's merge rule (entry_mergeable), plus "compressed" as QEMU 8.2. */
static bool extents_merge(const struct qcow_map_extent *a, const struct qcow_map_extent *b)
{
	if (a->length == 0)
		return false;
	if (a->zero != b->zero || a->data != b->data || a->compressed != b->compressed ||
	    a->depth != b->depth || a->present != b->present || !a->file != !b->file ||
	    a->has_offset != b->has_offset)
		return false;
	if (a->file && strcmp(a->file, b->file) != 0)
		return false;
	return !a->has_offset || a->offset + a->length == b->offset;
}

/* Prints e (next: the extent after it, NULL at the end); -1 when the
 * human format cannot show it (as qemu-img). */
static int print_extent(enum map_format fmt, const char *image, const struct qcow_map_extent *e,
			struct qcow_map_extent *next)
{
	if (fmt == MAP_JSON) {
		printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %" PRIu32
		       ", \"present\": %s, \"zero\": %s, \"data\": %s, \"compressed\": %s",
		       e->start, e->length, e->depth, e->present ? "true" : "false",
		       e->zero ? "true" : "false", e->data ? "true" : "false",
		       e->compressed ? "true" : "false");
		if (e->has_offset)
			printf(", \"offset\": %" PRIu64, e->offset);
		putchar('}');
		if (next)
			puts(",");
		return 0;
	}
	if (e->data && !e->has_offset) {
		ctl_print_error("%s: file contains external, encrypted or compressed clusters "
				"(guest offset %" PRIu64 "); use --output=json", image, e->start);
		return -1;
	}
	if (e->data && !e->zero) {
		printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64, e->start, e->length, e->offset);
		ctl_print_text_safely(e->file ? e->file : image);
		putchar('\n');
	}
	/* this format does not tell zeros from holes: let them merge */
	if (next && (!next->data || next->zero)) {
		next->data = false;
		next->zero = true;
	}
	return 0;
}

static int print_map(struct qcow_image *img, const char *image, enum map_format fmt)
{
	uint64_t size = qcow_image_size(img);
	struct qcow_map_extent curr = { 0 }, next;
	int ret = 0;

	if (fmt == MAP_JSON)
		putchar('[');
	else
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
	while (curr.start + curr.length < size) {
		uint64_t off = curr.start + curr.length;
		ret = qcow_image_map_extent(img, off, size - off, &next);
		if (ret < 0) {
			ctl_print_error("%s: cannot map guest offset %" PRIu64 ": %s", image, off, strerror(-ret));
			return EXIT_FAILURE;
		}
		if (extents_merge(&curr, &next)) {
			curr.length += next.length;
			continue;
		}
		if (curr.length > 0 && print_extent(fmt, image, &curr, &next) < 0)
			return EXIT_FAILURE;
		curr = next;
	}
	if (curr.length > 0 && print_extent(fmt, image, &curr, NULL) < 0)
		return EXIT_FAILURE;
	if (fmt == MAP_JSON)
		printf("]\n");
	return EXIT_SUCCESS;
}

/* The image of a live mount, read-only and unlocked (qemu-img -U); its
 * path (malloc'ed) into *image. */
static int open_live_image(const char *mountpoint, const char *text, struct qcow_image **img, char **image_out)
{
	struct qcow_open_opts opts;
	char err[1024] = "", what[4200];
	char *image = ctl_status_value(text, "image");
	int ret;

	*image_out = NULL;
	if (!image || !*image) {
		free(image);
		ctl_print_error("%s: the daemon's status names no image", mountpoint);
		return -EPROTO;
	}
	qcow_open_opts_default(&opts);
	opts.read_only = true;
	opts.no_locking = true;
	opts.recycler = false;
	opts.compact = false;
	snprintf(what, sizeof(what), "cannot open %s (the image of %s)", image, mountpoint);
	ctl_engine_call_begin(true);
	ret = qcow_image_open(image, &opts, img, err, sizeof(err));
	ctl_engine_call_end(ret, what, err);
	if (ret < 0)
		free(image);
	else
		*image_out = image;
	return ret;
}

/* The daemon's picture (QCOWFS_IOC_PICTURE) into *pic. */
static int live_picture(const char *mountpoint, struct qcow_picture *pic)
{
	struct qcowfs_picture *p = calloc(1, sizeof(*p));
	int ret;

	if (!p)
		return -ENOMEM;
	ret = ctl_mount_ioctl(mountpoint, O_RDONLY, QCOWFS_IOC_PICTURE, p);
	if (ret == 0) {
		memset(pic, 0, sizeof(*pic));
		pic->file_size = p->file_size;
		pic->cluster_size = p->cluster_size;
		pic->clusters = p->clusters;
		pic->clusters_per_cell = p->clusters_per_cell;
		pic->cells = p->cells > QCOW_PICTURE_MAX_CELLS ? QCOW_PICTURE_MAX_CELLS : p->cells;
		for (unsigned k = 0; k < QCOW_PIC_NKINDS && k < QCOWFS_PICTURE_KINDS; k++)
			pic->totals[k] = p->totals[k];
		for (uint32_t i = 0; i < pic->cells; i++)
			pic->cell[i] = p->cell[i] < QCOW_PIC_NKINDS ? p->cell[i] : QCOW_PIC_JUNK;
	}
	free(p);
	return ret;
}

int cmd_map(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "picture", required_argument, NULL, 'p' },
		{ "data-file", required_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	enum map_format fmt = MAP_HUMAN;
	bool fmt_given = false;
	const char *picture = NULL, *target;
	struct qcow_image *img = NULL;
	struct qcow_picture *pic = NULL;
	char *text = NULL, *live_image = NULL;
	int opt, ret, status = EXIT_FAILURE;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'o':
			if (strcmp(optarg, "json") == 0)
				fmt = MAP_JSON;
			else if (strcmp(optarg, "human") == 0)
				fmt = MAP_HUMAN;
			else
				return ctl_usage_error(self, "--output must be human or json, not '%s'", optarg);
			fmt_given = true;
			break;
		case 'p':
			picture = optarg;
			break;
		case 'd':
			ctl_opt_data_file = optarg;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	if (picture && fmt_given)
		return ctl_usage_error(self, "--output and --picture do not go together");
	if ((ret = ctl_single_operand(self, argc, argv, "IMAGE or MOUNTPOINT", &target)))
		return ret;

	/* a live mount answers the status ioctl; an image file does not */
	ret = ctl_mount_read_status_text(target, &text);
	if (ret < 0 && !ctl_errno_means_not_qcowfs(-ret)) {
		ctl_report_target_error(target, ret);
		return EXIT_FAILURE;
	}
	bool live = ret == 0;

	if (picture) {
		pic = calloc(1, sizeof(*pic));
		if (!pic) {
			ctl_print_error("%s: out of memory", target);
			goto out;
		}
		if (live) {
			ret = live_picture(target, pic);
			if (ret < 0) {
				ctl_print_error("%s: cannot read the daemon's picture: %s%s", target, strerror(-ret),
						ret == -ENOTTY ? " (a qcowfs older than qcowctl map)" : "");
				goto out;
			}
		} else {
			if (ctl_image_open_offline(target, true, &img) < 0)
				goto out;
			ret = qcow_image_picture(img, 0, pic);
			if (ret < 0) {
				ctl_print_error("%s: cannot read the cluster map: %s", target, strerror(-ret));
				goto out;
			}
		}
		status = ctl_picture_draw(pic, target, picture) < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
		goto out;
	}

	if (live ? open_live_image(target, text, &img, &live_image) < 0 : ctl_image_open_offline(target, true, &img) < 0)
		goto out;
	/* the human format names the file holding the data: the image */
	status = print_map(img, live_image ? live_image : target, fmt);
out:
	if (img && ctl_image_close_offline(img, target) < 0)
		status = EXIT_FAILURE;
	free(pic);
	free(text);
	free(live_image);
	fflush(stdout);
	return status;
}
