/*
 * ctl_loop.h - loop devices, their partitions and device nodes, and the
 * mount table, for qcowctl attach/detach (ctl_loop.c).
 */
#ifndef CTL_LOOP_H
#define CTL_LOOP_H

#include <stdbool.h>
#include <sys/stat.h>
#include <sys/types.h>

/* Partitions of a loop device beyond this many are not listed (GPT's
 * default table has 128 entries). */
#define CTL_MAX_PARTS 128

/* The partitions of loop device nr, as the kernel lists them in sysfs. */
struct ctl_part_list {
	int count;
	int number[CTL_MAX_PARTS];
	dev_t dev[CTL_MAX_PARTS];
};

/* The device number in a sysfs "dev" file ("7:3"): 0 or a negative errno. */
int ctl_read_sysfs_devnum(const char *path, dev_t *dev);
/* The file loop device nr reads from, into buf; -ENXIO when it has none. */
int ctl_loop_backing_file(int nr, char *buf, size_t len);
/* The mountpoint of a FUSE mount whose source is the file *image_st (qcowfs
 * names its image so), malloc'ed into *out: 1 found, 0 none, or -errno. */
int ctl_find_fuse_mount_of(const struct stat *image_st, char **out);
/* Whether something is mounted at path (true when that cannot be told). */
bool ctl_is_mount_point(const char *path);
/* path is a block node for dev, waiting a moment for devtmpfs or udev,
 * else made here (*made).  0 or a negative errno, reported. */
int ctl_ensure_node(const char *path, dev_t dev, bool *made);
/* The partitions sysfs lists for loop device nr, by number. */
int ctl_loop_partitions(int nr, struct ctl_part_list *parts);
/* A free loop device over the open view fd with partition scanning (and
 * direct I/O, read-only); its number in *nr, and in *made_node whether its
 * /dev node was made here.  0 or -errno, reported. */
int ctl_loop_configure(int view_fd, const char *view, bool read_only, bool direct, int *nr,
		       bool *made_node);
/* Clears loop device nr and waits until the kernel let go: 0 or -errno, reported. */
int ctl_loop_clear(int nr);
/* partx -a DEVICE, quietly: its exit status, 127 when it could not run. */
int ctl_partx_add(const char *device);
/* The loop devices over view, at most max, into list: how many. */
int ctl_loops_over(const char *view, int *list, int max);
/* A loop device over view, or -1. */
int ctl_loop_over(const char *view);
/* -EBUSY, naming it, when loop device nr or a partition is mounted, held or
 * open exclusively; else 0. */
int ctl_loop_check_unused(int nr);

#endif
