/*
 * cmd_snapshot.c - "qcowctl snapshot": create, delete, list and apply
 * internal snapshots, through a live mount or offline.
 *
 * Rules:
 *  - Live requests go through the snapshot ioctls of qcowfs_ioctl.h;
 *    offline ones through libqcow; both report errors the same way
 *    (snapshot_report_error), naming the snapshot and the target.
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
#include <time.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowfs_ioctl.h"
#include "qcowctl.h"

/* ---- snapshot -------------------------------------------------------------- */

enum snap_action { SNAP_CREATE, SNAP_DELETE, SNAP_APPLY, SNAP_LIST };
static const char *const snap_action_names[] = { "create", "delete", "apply", "list" };

/* What a failed snapshot operation means, for the user. */
static void snapshot_report_error(enum snap_action act, const char *name, const char *target, int ret)
{
	const char *what = snap_action_names[act];
	switch (-ret) {
	case ENOENT:
		ctl_print_error("snapshot %s: %s has no snapshot with the id or name '%s'", what, target, name);
		break;
	case EEXIST:
		ctl_print_error("snapshot %s: %s already has a snapshot named '%s'", what, target, name);
		break;
	case EBUSY:
		ctl_print_error("snapshot %s: a snapshot of %s is mounted read-only by another process; unmount it first",
			    what, target);
		break;
	case EPERM:
		ctl_print_error("snapshot apply: %s is mounted: applying '%s' changes the disk under whoever uses it; "
			    "add --force if that is what you want", target, name);
		break;
	case EROFS:
		ctl_print_error("snapshot %s: %s is read-only", what, target);
		break;
	case EBADF:
	case EACCES:
		ctl_print_error("snapshot %s: no write permission on %s", what, target);
		break;
	case ENOTSUP:
		/* the engine's two refusals: no shared clusters possible, or
		 * (as QEMU) no internal snapshots beside an external data file */
		ctl_print_error("snapshot %s: %s cannot have internal snapshots: it has 1-bit refcounts, which cannot share "
			    "clusters, or an external data file, which QEMU allows no internal snapshots with", what, target);
		break;
	case ERANGE:
		ctl_print_error("snapshot %s: a cluster of %s would have more references than its refcount width holds "
			    "(qemu-img amend -o refcount_bits=16 widens it)", what, target);
		break;
	default:
		ctl_print_error("snapshot %s '%s' on %s failed: %s", what, name ? name : "", target, strerror(-ret));
	}
}

/* One line per snapshot, the columns of qemu-img snapshot -l. */
static void snapshot_print_list(const struct qcow_snapshot_info *v, uint32_t n)
{
	printf("Snapshot list:\n%-10s %-17s %10s %20s %13s %12s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "DISK SIZE");
	for (uint32_t i = 0; i < n; i++) {
		char date[32], vm[16], disk[32];
		time_t t = (time_t)v[i].date_sec;
		struct tm tm;
		localtime_r(&t, &tm);
		strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		uint64_t ms = v[i].vm_clock_nsec / 1000000;
		ctl_format_human_size(v[i].vm_state_size, vm, sizeof(vm));
		ctl_format_human_size(v[i].disk_size, disk, sizeof(disk));
		printf("%-10s %-17s %10s %20s %02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64 " %12s\n", v[i].id, v[i].name,
		       vm, date, ms / 3600000, ms / 60000 % 60, ms / 1000 % 60, ms % 1000, disk);
	}
}

/* The daemon's list text (qcowfs_ioctl.h) back into entries. */
static int snapshot_parse_list(const char *text, struct qcow_snapshot_info **out, uint32_t *count)
{
	uint32_t n = 0, cap = 16;
	struct qcow_snapshot_info *v = calloc(cap, sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (const char *line = text; *line;) {
		const char *end = strchr(line, '\n');
		if (!end)
			break;
		char buf[1024];
		size_t len = (size_t)(end - line) < sizeof(buf) - 1 ? (size_t)(end - line) : sizeof(buf) - 1;
		memcpy(buf, line, len);
		buf[len] = 0;
		line = end + 1;
		if (n == cap) {
			struct qcow_snapshot_info *nv = realloc(v, (cap *= 2) * sizeof(*v));
			if (!nv) {
				free(v);
				return -ENOMEM;
			}
			v = nv;
		}
		struct qcow_snapshot_info *e = &v[n];
		memset(e, 0, sizeof(*e));
		char *f[7], *p = buf;
		int k = 0;
		/* tab-separated; a field may be empty (strtok would skip it) */
		for (; k < 7; k++) {
			f[k] = p;
			char *tab = p ? strchr(p, '\t') : NULL;
			if (tab) {
				*tab = 0;
				p = tab + 1;
			} else {
				p = NULL;
			}
		}
		if (!f[6]) {
			free(v);
			return -EPROTO;
		}
		snprintf(e->id, sizeof(e->id), "%s", f[0]);
		snprintf(e->name, sizeof(e->name), "%s", f[1]);
		e->vm_state_size = strtoull(f[2], NULL, 10);
		e->date_sec = strtoull(f[3], NULL, 10);
		e->date_nsec = (uint32_t)strtoul(f[4], NULL, 10);
		e->vm_clock_nsec = strtoull(f[5], NULL, 10);
		e->disk_size = strtoull(f[6], NULL, 10);
		n++;
	}
	*out = v;
	*count = n;
	return 0;
}

static int snapshot_mount(enum snap_action act, const char *name, bool force, const char *target)
{
	int ret;
	if (act == SNAP_LIST) {
		struct qcowfs_snapshot_list *l = calloc(1, sizeof(*l));
		struct qcow_snapshot_info *v = NULL;
		uint32_t n = 0;
		if (!l)
			return EXIT_FAILURE;
		ret = ctl_mount_ioctl(target, O_RDONLY, QCOWFS_IOC_SNAPSHOT_LIST, l);
		if (!ret) {
			l->text[sizeof(l->text) - 1] = 0;
			ret = snapshot_parse_list(l->text, &v, &n);
		}
		free(l);
		if (ret) {
			snapshot_report_error(act, NULL, target, ret);
			return EXIT_FAILURE;
		}
		snapshot_print_list(v, n);
		free(v);
		return EXIT_SUCCESS;
	}
	struct qcowfs_snapshot_req r;
	memset(&r, 0, sizeof(r));
	snprintf(r.name, sizeof(r.name), "%s", name);
	r.flags = force ? QCOWFS_SNAPSHOT_FORCE : 0;
	static const unsigned long cmds[] = { QCOWFS_IOC_SNAPSHOT_CREATE, QCOWFS_IOC_SNAPSHOT_DELETE, QCOWFS_IOC_SNAPSHOT_APPLY };
	int fd = open(target, O_RDWR | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		snapshot_report_error(act, name, target, -errno);
		return EXIT_FAILURE;
	}
	/* a snapshot holds what was written before the command: what the
	 * kernel still caches must reach the daemon first */
	ret = act == SNAP_CREATE && fsync(fd) < 0 ? -errno : 0;
	if (!ret)
		ret = ioctl(fd, cmds[act], &r) < 0 ? -errno : 0;
	close(fd);
	if (ret) {
		snapshot_report_error(act, name, target, ret);
		return EXIT_FAILURE;
	}
	return EXIT_SUCCESS;
}

static int snapshot_image(enum snap_action act, const char *name, const char *image)
{
	struct qcow_image *img = NULL;
	char mountpoint[PATH_MAX], word[4 * QCOW_SNAPSHOT_NAME_MAX + 8], command[sizeof(word) + 32];
	long pid = 0;
	bool read_only = false;

	/* A mounted image is locked by its daemon: a list goes through the
	 * mount (it shows the same table); a change names where it is mounted. */
	if (ctl_find_image_mount(image, mountpoint, sizeof(mountpoint), &pid, &read_only) == 0) {
		if (act == SNAP_LIST)
			return snapshot_mount(act, NULL, false, mountpoint);
		ctl_shell_word(name, word, sizeof(word));
		snprintf(command, sizeof(command), "snapshot %s %s", snap_action_names[act], word);
		ctl_report_image_mounted(command, image, mountpoint, pid, read_only);
		return EXIT_FAILURE;
	}
	/* the image lock as a writer (a reader for list) */
	int ret = ctl_image_open_offline(image, act == SNAP_LIST, &img);
	if (ret < 0) {
		if (ret == -EAGAIN)
			fprintf(stderr, "qcowctl: if %s is mounted, run 'qcowctl snapshot %s ... MOUNTPOINT'\n", image,
				snap_action_names[act]);
		return EXIT_FAILURE;
	}
	if (act == SNAP_LIST) {
		struct qcow_snapshot_info *v;
		uint32_t n;
		ret = qcow_snapshot_list(img, &v, &n);
		if (!ret) {
			snapshot_print_list(v, n);
			free(v);
		}
	} else if (act == SNAP_CREATE) {
		ret = qcow_snapshot_create(img, name);
	} else if (act == SNAP_DELETE) {
		ret = qcow_snapshot_delete(img, name);
	} else {
		ret = qcow_snapshot_apply(img, name);
	}
	if (ret)
		snapshot_report_error(act, name, image, ret);
	if (ctl_image_close_offline(img, image) < 0)
		return EXIT_FAILURE;
	return ret ? EXIT_FAILURE : EXIT_SUCCESS;
}

int cmd_snapshot(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "force", no_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	bool force = false;
	int opt;
	/* GNU getopt permutes: options may come anywhere */
	while ((opt = getopt_long(argc, argv, ":hf", longopts, NULL)) != -1) {
		switch (opt) {
		case 'f':
			force = true;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	if (optind >= argc)
		return ctl_usage_error(self, "missing the action (create, delete, list or apply)");
	int act = -1;
	for (int i = 0; i < 4; i++)
		if (!strcmp(argv[optind], snap_action_names[i]))
			act = i;
	if (act < 0)
		return ctl_usage_error(self, "unknown action '%s' (create, delete, list or apply)", argv[optind]);
	optind++;
	int want = act == SNAP_LIST ? 1 : 2;
	if (argc - optind < want)
		return ctl_usage_error(self, "missing %s", act == SNAP_LIST || argc - optind == 1 ? "MOUNTPOINT or IMAGE" : "NAME");
	if (argc - optind > want)
		return ctl_usage_error(self, "unexpected argument '%s'", argv[optind + want]);
	if (force && act != SNAP_APPLY)
		return ctl_usage_error(self, "--force is only for apply");
	const char *name = act == SNAP_LIST ? NULL : argv[optind];
	const char *target = argv[optind + want - 1];
	if (name && (!*name || strlen(name) > QCOW_SNAPSHOT_NAME_MAX))
		return ctl_usage_error(self, "a snapshot name has 1 to %d bytes", QCOW_SNAPSHOT_NAME_MAX);

	/* A live mount answers the status ioctl; an image file does not. */
	struct qcow_stats st;
	int ret = ctl_mount_read_status(target, &st);
	if (ret == 0)
		return snapshot_mount((enum snap_action)act, name, force, target);
	if (ctl_errno_means_not_qcowfs(-ret))
		return snapshot_image((enum snap_action)act, name, target);
	ctl_report_target_error(target, ret);
	return EXIT_FAILURE;
}
