/*
 * cmd_info.h - what the two files of "qcowctl info" share: the image as
 * info read it (struct info_image) and where the output goes (struct
 * info_out).  cmd_info.c reads images and runs the command,
 * cmd_info_blocks.c writes the blocks of the output.
 */
#ifndef QCOWCTL_CMD_INFO_H
#define QCOWCTL_CMD_INFO_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "qcow.h"
#include "qcowctl.h"

/* Everything info shows about one image of the chain. */
struct info_image {
	const char *filename;          /* as given (or as the chain names it) */
	const char *format;            /* "qcow2" or "raw" */
	uint64_t virtual_size;
	uint64_t actual_size;          /* bytes allocated on the host */
	struct qcow_info q;            /* qcow2 only */
	struct qcow_snapshot_info *snapshots;   /* qcow2 only, free() */
	uint32_t nb_snapshots;
	struct qcow_pbitmap_info *bitmaps;      /* qcow2 only, free() */
	uint32_t nb_bitmaps;
	bool has_luks;                 /* luks holds the decoded LUKS header */
	struct qcow_luks_info luks;
	char full_backing[PATH_MAX + 1024];     /* backing name resolved as QEMU does */
};

/* Where the blocks write: text lines indented like qemu-img's, or the
 * members of a JSON object. */
struct info_out {
	bool json;
	struct json_writer j;
	int indent;                    /* text: spaces before each line */
};

/* A qcow2 image (not a raw one of the chain): only those have qcow2 fields. */
static inline bool info_is_qcow2(const struct info_image *im)
{
	return strcmp(im->format, "qcow2") == 0;
}

/* One image, every block in qemu-img's order, as text or JSON (cmd_info_blocks.c). */
void info_print(struct info_out *o, const struct info_image *im);

#endif
