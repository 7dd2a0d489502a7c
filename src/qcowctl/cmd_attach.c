/*
 * cmd_attach.c - "qcowctl attach" and "qcowctl detach": an image as a block
 * device with its partitions, the qemu-nbd --connect of qcowfs, built from
 * a qcowfs mount and a loop device over its view.
 *
 * attach: finds a qcowfs mount of the image (or mounts it, at IMAGE.raw by
 * default), sets up a free loop device over the view with LOOP_CONFIGURE
 * (partition scanning, direct I/O unless --buffered, read-only on request;
 * discards reach the view as punched holes, which loop does for any file
 * that has fallocate), makes sure /dev has a node for the device and each
 * partition (a container's /dev may have no devtmpfs or udev behind it),
 * and prints the device and its partitions.
 *
 * The loop devices, partitions, nodes and mount table are ctl_loop.c's.
 *
 * detach: refuses while the device or a partition is mounted or held (by
 * device mapper, say), naming it; otherwise clears every loop device over
 * the view and waits until the kernel let go, removes the nodes attach
 * made, unmounts the view through ctl_unmount_and_check (unmount's wait for
 * the close report and check), and removes the mountpoint file when attach
 * created it.  The view is unmounted also when attach found it mounted:
 * detach undoes the whole block device.
 *
 * State: what detach must know and cannot see elsewhere (whether attach
 * created the mountpoint file, which device nodes it made) is kept in
 * ATTACH_STATE_DIR/loopN, key=value lines: image=, mountpoint=,
 * created_mountpoint=0|1, node= (one per node made).  /run is a tmpfs, so a
 * reboot forgets it together with the loop devices.  detach looks a state
 * file up by the view it names, not by the loop number (numbers are
 * reused), which also finds the state of a detach that stopped after
 * clearing the loop device; attach drops older state files naming the same
 * view.  Without one, detach works all the same and leaves the mountpoint
 * file.  detach takes down qcowfs views only, never a loop device over
 * another file.
 *
 * Rules:
 *  - Every step that fails is reported with the path or device it concerns,
 *    and the command exits 1; detach stops at the first failed step and
 *    keeps the state file, so that running it again finishes the job.
 *  - attach undoes what it did when a later step fails (loop device, mount,
 *    mountpoint file), so that a failed attach leaves nothing behind.
 *  - With --json, stdout carries exactly one JSON object, also on failure.
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qcowctl.h"
#include "ctl_loop.h"

#define ATTACH_STATE_DIR "/run/qcowfs/attach"
/* Loop devices over one view that detach clears (one, unless someone
 * attached more by hand). */
#define MAX_LOOPS 16

/* ---- the state file ------------------------------------------------------ */

struct attach_state {
	char image[PATH_MAX];
	char mountpoint[PATH_MAX];
	bool created_mountpoint;
	int node_count;
	char node[CTL_MAX_PARTS + 1][64];   /* the nodes attach made */
};

static void state_path(int nr, char *buf, size_t len)
{
	snprintf(buf, len, "%s/loop%d", ATTACH_STATE_DIR, nr);
}

static int mkdir_one(const char *path)
{
	return mkdir(path, 0755) == 0 || errno == EEXIST ? 0 : -errno;
}

/* Written to a temporary name and renamed, so a reader never sees half. */
static int state_write(int nr, const struct attach_state *s)
{
	char path[96], tmp[112];
	FILE *f;
	int ret;

	if ((ret = mkdir_one("/run/qcowfs")) < 0 || (ret = mkdir_one(ATTACH_STATE_DIR)) < 0) {
		ctl_print_error("cannot create %s: %s", ATTACH_STATE_DIR, strerror(-ret));
		return ret;
	}
	state_path(nr, path, sizeof(path));
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "we");
	if (!f) {
		ret = -errno;
		goto fail;
	}
	fprintf(f, "image=%s\nmountpoint=%s\ncreated_mountpoint=%d\n", s->image, s->mountpoint,
		s->created_mountpoint);
	for (int i = 0; i < s->node_count; i++)
		fprintf(f, "node=%s\n", s->node[i]);
	ret = ferror(f) ? -EIO : 0;
	if (fclose(f) != 0 && ret == 0)
		ret = -errno;
	if (ret == 0 && rename(tmp, path) < 0)
		ret = -errno;
	if (ret == 0)
		return 0;
	unlink(tmp);
fail:
	ctl_print_error("cannot write the attach state %s: %s", path, strerror(-ret));
	return ret;
}

/* Reads the state of loop device nr: 0, -ENOENT when there is none, or
 * -EPROTO for a file that does not parse (it is then ignored). */
static int state_read(int nr, struct attach_state *s)
{
	char path[96], *line = NULL;
	size_t cap = 0;
	ssize_t got;
	FILE *f;
	int ret = 0;

	memset(s, 0, sizeof(*s));
	state_path(nr, path, sizeof(path));
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while ((got = getline(&line, &cap, f)) > 0) {
		line[strcspn(line, "\n")] = '\0';
		if (!strncmp(line, "image=", 6))
			snprintf(s->image, sizeof(s->image), "%s", line + 6);
		else if (!strncmp(line, "mountpoint=", 11))
			snprintf(s->mountpoint, sizeof(s->mountpoint), "%s", line + 11);
		else if (!strcmp(line, "created_mountpoint=1"))
			s->created_mountpoint = true;
		else if (!strncmp(line, "node=/dev/", 10) && s->node_count <= CTL_MAX_PARTS)
			snprintf(s->node[s->node_count++], sizeof(s->node[0]), "%s", line + 5);
	}
	if (!s->mountpoint[0])
		ret = -EPROTO;
	free(line);
	fclose(f);
	return ret;
}

static int state_remove(int nr)
{
	char path[96];

	state_path(nr, path, sizeof(path));
	if (unlink(path) < 0 && errno != ENOENT) {
		ctl_print_error("warning: cannot remove %s: %s", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* The state attach left for the view: the loop device number it names
 * (which may be gone: a detach that stopped half way), or -1. */
static int state_find(const char *view, struct attach_state *s)
{
	DIR *d = opendir(ATTACH_STATE_DIR);
	struct dirent *e;
	int found = -1;

	while (d && found < 0 && (e = readdir(d))) {
		char *end;
		long n;

		if (strncmp(e->d_name, "loop", 4) != 0)
			continue;
		n = strtol(e->d_name + 4, &end, 10);
		if (*end || end == e->d_name + 4 || n < 0 || n > INT_MAX)
			continue;   /* a .tmp of a writer, or not ours */
		if (state_read((int)n, s) == 0 && strcmp(s->mountpoint, view) == 0)
			found = (int)n;
	}
	if (d)
		closedir(d);
	return found;
}

/* ---- mounting the view -------------------------------------------------- */

/* Runs qcowfs IMAGE MOUNTPOINT [-o OPTIONS]: the qcowfs installed next to
 * qcowctl, else the one on PATH.  qcowfs returns once the mount is live
 * (or has failed, saying why on stderr).  Returns its exit status, 127 when
 * it could not be started, or a negative errno. */
static int run_qcowfs(const char *image, const char *mountpoint, const char *options)
{
	char self[PATH_MAX], sibling[PATH_MAX + 16];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	const char *prog = "qcowfs";
	pid_t child;
	int status;

	if (n > 0) {
		self[n] = '\0';
		char *slash = strrchr(self, '/');
		if (slash) {
			*slash = '\0';
			snprintf(sibling, sizeof(sibling), "%s/qcowfs", self);
			if (access(sibling, X_OK) == 0)
				prog = sibling;
		}
	}
	fflush(NULL);
	child = fork();
	if (child < 0)
		return -errno;
	if (child == 0) {
		/* qcowfs's messages are for the user, not for a --json reader. */
		dup2(STDERR_FILENO, STDOUT_FILENO);
		if (options)
			execlp(prog, "qcowfs", image, mountpoint, "-o", options, (char *)NULL);
		else
			execlp(prog, "qcowfs", image, mountpoint, (char *)NULL);
		_exit(127);
	}
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			return -errno;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- attach -------------------------------------------------------------- */

struct attach_result {
	int nr;                 /* loop device number, -1 before there is one */
	struct ctl_part_list parts;
	struct attach_state state;
	struct attach_state old;   /* room for reading another state file */
};

/* The nodes of loop device nr and its partitions, recording the ones made. */
static int attach_make_nodes(struct attach_result *r)
{
	char path[64], sys[96];
	dev_t dev;
	bool made;
	int ret;

	snprintf(sys, sizeof(sys), "/sys/block/loop%d/dev", r->nr);
	snprintf(path, sizeof(path), "/dev/loop%d", r->nr);
	if ((ret = ctl_read_sysfs_devnum(sys, &dev)) < 0 || (ret = ctl_ensure_node(path, dev, &made)) < 0)
		return ret;
	if (made)
		snprintf(r->state.node[r->state.node_count++], sizeof(r->state.node[0]), "%s", path);
	ret = ctl_loop_partitions(r->nr, &r->parts);
	if (ret == 0 && r->parts.count == 0) {
		if (ctl_partx_add(path) == 127)
			ctl_print_error("warning: partx could not be run; partitions the kernel does not parse itself are not set up");
		ret = ctl_loop_partitions(r->nr, &r->parts);
	}
	if (ret < 0) {
		ctl_print_error("cannot list the partitions of %s: %s", path, strerror(-ret));
		return ret;
	}
	for (int i = 0; i < r->parts.count; i++) {
		snprintf(path, sizeof(path), "/dev/loop%dp%d", r->nr, r->parts.number[i]);
		if ((ret = ctl_ensure_node(path, r->parts.dev[i], &made)) < 0)
			return ret;
		if (made)
			snprintf(r->state.node[r->state.node_count++], sizeof(r->state.node[0]), "%s", path);
	}
	return 0;
}

static void attach_print(const struct attach_result *r, bool json)
{
	char path[64];

	if (!json) {
		printf("/dev/loop%d\n", r->nr);
		for (int i = 0; i < r->parts.count; i++)
			printf("/dev/loop%dp%d\n", r->nr, r->parts.number[i]);
		return;
	}
	struct json_writer j = { .out = stdout };
	json_object_begin(&j, NULL);
	snprintf(path, sizeof(path), "/dev/loop%d", r->nr);
	json_string(&j, "device", path);
	json_array_begin(&j, "partitions");
	for (int i = 0; i < r->parts.count; i++) {
		snprintf(path, sizeof(path), "/dev/loop%dp%d", r->nr, r->parts.number[i]);
		json_string(&j, NULL, path);
	}
	json_array_end(&j);
	json_string(&j, "mountpoint", r->state.mountpoint);
	json_string(&j, "image", r->state.image);
	json_object_end(&j);
}

int cmd_attach(const struct command *self, int argc, char **argv)
{
	enum { OPT_JSON = 256, OPT_RO, OPT_BUFFERED };
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, OPT_JSON },
		{ "read-only", no_argument, NULL, OPT_RO },
		{ "buffered", no_argument, NULL, OPT_BUFFERED },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct attach_result *r = NULL;
	const char *image, *options = NULL;
	char *existing = NULL, *mountpoint = NULL, *real = NULL, *mount_opts = NULL;
	char msg[2 * PATH_MAX + 128] = "";
	struct stat image_st, st;
	bool json = false, read_only = false, direct = true, mounted_here = false, made_node;
	int opt, ret, status = EXIT_FAILURE, view_fd = -1;

	while ((opt = getopt_long(argc, argv, ":ho:", longopts, NULL)) != -1) {
		switch (opt) {
		case 'o':
			options = optarg;
			break;
		case OPT_JSON:
			json = true;
			break;
		case OPT_RO:
			read_only = true;
			break;
		case OPT_BUFFERED:
			direct = false;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	if (argc - optind < 1)
		return ctl_usage_error(self, "missing IMAGE");
	if (argc - optind > 2)
		return ctl_usage_error(self, "unexpected argument '%s'", argv[optind + 2]);
	image = argv[optind];
	r = calloc(1, sizeof(*r));
	if (!r) {
		ret = -ENOMEM;
		snprintf(msg, sizeof(msg), "out of memory");
		goto fail_msg;
	}
	r->nr = -1;
	if (stat(image, &image_st) < 0 || !realpath(image, r->state.image)) {
		ret = -errno;
		snprintf(msg, sizeof(msg), "cannot access %s: %s", image, strerror(-ret));
		goto fail_msg;
	}

	ret = ctl_find_fuse_mount_of(&image_st, &existing);
	if (ret < 0) {
		snprintf(msg, sizeof(msg), "cannot read /proc/self/mountinfo: %s", strerror(-ret));
		goto fail_msg;
	}
	if (existing) {
		if (argc - optind == 2 && (!(real = realpath(argv[optind + 1], NULL)) || strcmp(real, existing) != 0)) {
			ret = -EBUSY;
			snprintf(msg, sizeof(msg), "%s is already mounted at %s, not at %s",
				 image, existing, argv[optind + 1]);
			goto fail_msg;
		}
		if (options)
			ctl_print_error("warning: %s is already mounted at %s; -o %s is not applied",
					image, existing, options);
		mountpoint = existing;
		existing = NULL;
	} else {
		if (argc - optind == 2)
			mountpoint = strdup(argv[optind + 1]);
		else if (asprintf(&mountpoint, "%s.raw", image) < 0)
			mountpoint = NULL;
		if (!mountpoint) {
			ret = -ENOMEM;
			snprintf(msg, sizeof(msg), "out of memory");
			goto fail_msg;
		}
		/* qcowfs creates a missing mountpoint file; detach removes it again. */
		r->state.created_mountpoint = lstat(mountpoint, &st) < 0 && errno == ENOENT;
		if (read_only && asprintf(&mount_opts, "%s%sro", options ? options : "",
					  options ? "," : "") < 0) {
			ret = -ENOMEM;
			snprintf(msg, sizeof(msg), "out of memory");
			goto fail_msg;
		}
		ret = run_qcowfs(image, mountpoint, read_only ? mount_opts : options);
		if (ret != 0) {
			if (ret == 127)
				snprintf(msg, sizeof(msg), "cannot mount %s: qcowfs could not be run", image);
			else if (ret < 0)
				snprintf(msg, sizeof(msg), "cannot mount %s: %s", image, strerror(-ret));
			else
				snprintf(msg, sizeof(msg), "cannot mount %s at %s: qcowfs exited with status %d",
					 image, mountpoint, ret);
			ret = -EIO;
			goto fail_msg;
		}
		mounted_here = true;
	}
	if (!realpath(mountpoint, r->state.mountpoint)) {
		ret = -errno;
		snprintf(msg, sizeof(msg), "cannot resolve %s: %s", mountpoint, strerror(-ret));
		goto fail_msg;
	}

	r->nr = ctl_loop_over(r->state.mountpoint);
	if (r->nr >= 0) {
		/* Attached already: say so and show it again. */
		ctl_print_error("%s is already attached as /dev/loop%d", r->state.mountpoint, r->nr);
		if (state_read(r->nr, &r->old) == 0 && strcmp(r->old.mountpoint, r->state.mountpoint) == 0)
			r->state = r->old;
		ret = ctl_loop_partitions(r->nr, &r->parts);
		if (ret < 0) {
			snprintf(msg, sizeof(msg), "cannot list the partitions of /dev/loop%d: %s", r->nr,
				 strerror(-ret));
			r->nr = -1;   /* not ours to undo */
			goto fail_msg;
		}
		attach_print(r, json);
		status = EXIT_SUCCESS;
		goto out;
	}

	view_fd = open(r->state.mountpoint, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (view_fd < 0) {
		ret = -errno;
		if (ret == -EROFS || ret == -EACCES || ret == -EPERM)
			snprintf(msg, sizeof(msg), "cannot open %s for writing: %s (a read-only mount? then attach --read-only)",
				 r->state.mountpoint, strerror(-ret));
		else
			snprintf(msg, sizeof(msg), "cannot open %s: %s", r->state.mountpoint, strerror(-ret));
		goto undo;
	}
	ret = ctl_loop_configure(view_fd, r->state.mountpoint, read_only, direct, &r->nr, &made_node);
	close(view_fd);
	if (ret < 0)
		goto undo;   /* reported */
	if (made_node)
		snprintf(r->state.node[r->state.node_count++], sizeof(r->state.node[0]), "/dev/loop%d", r->nr);
	if ((ret = attach_make_nodes(r)) < 0)
		goto undo;   /* reported */
	/* A state file of an earlier attach of this view (its detach never
	 * ran) would be found before ours. */
	for (int old; (old = state_find(r->state.mountpoint, &r->old)) >= 0;)
		if (state_remove(old) < 0)
			break;
	if ((ret = state_write(r->nr, &r->state)) < 0)
		goto undo;   /* reported */
	attach_print(r, json);
	status = EXIT_SUCCESS;
	goto out;

undo:
	/* Leave nothing of this attach behind. */
	for (int i = 0; i < r->state.node_count; i++)
		unlink(r->state.node[i]);
	if (r->nr >= 0 && ctl_loop_clear(r->nr) < 0)
		ctl_print_error("warning: /dev/loop%d stays attached to %s", r->nr, r->state.mountpoint);
	else if (mounted_here && ctl_unmount_and_check(r->state.mountpoint, stderr) == 0 &&
		 r->state.created_mountpoint)
		unlink(r->state.mountpoint);
fail_msg:
	if (msg[0])
		ctl_print_error("%s", msg);
	if (json)
		json_print_error("image", image, msg[0] ? msg : "attach failed", ret < 0 ? -ret : EIO);
out:
	free(existing);
	free(mountpoint);
	free(real);
	free(mount_opts);
	free(r);
	return status;
}

/* ---- detach -------------------------------------------------------------- */

/* The view target stands for: the file of a loop device (or of the device
 * of a partition), a view with a loop device over it or attach's state,
 * or an image mounted at such a view.  Fills view; 0 or a negative errno
 * (reported). */
static int detach_resolve(const char *target, char *view, size_t len, struct attach_state *s)
{
	char sys[96], link[PATH_MAX], real[PATH_MAX];
	char *mountpoint = NULL;
	struct stat st;
	int nr = -1, ret;

	if (stat(target, &st) < 0) {
		ret = -errno;
		ctl_print_error("cannot access %s: %s", target, strerror(-ret));
		return ret;
	}
	if (S_ISBLK(st.st_mode)) {
		const char *name;
		ssize_t n;

		snprintf(sys, sizeof(sys), "/sys/dev/block/%u:%u", major(st.st_rdev), minor(st.st_rdev));
		n = readlink(sys, link, sizeof(link) - 1);
		if (n > 0) {
			link[n] = '\0';
			name = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;
			if (sscanf(name, "loop%d", &nr) != 1)
				nr = -1;
		}
		if (nr < 0 || ctl_loop_backing_file(nr, view, len) < 0) {
			ctl_print_error("%s is not an attached loop device", target);
			return -ENXIO;
		}
		return 0;
	}
	if (!realpath(target, real)) {
		ret = -errno;
		ctl_print_error("cannot resolve %s: %s", target, strerror(-ret));
		return ret;
	}
	if (ctl_loop_over(real) >= 0 || state_find(real, s) >= 0) {
		snprintf(view, len, "%s", real);
		return 0;
	}
	/* An image: its qcowfs mount, which must be attached (or half detached). */
	ret = ctl_find_fuse_mount_of(&st, &mountpoint);
	if (ret > 0) {
		snprintf(view, len, "%s", mountpoint);
		free(mountpoint);
		if (ctl_loop_over(view) >= 0 || state_find(view, s) >= 0)
			return 0;
		ctl_print_error("%s is mounted at %s, but not attached: no loop device reads from it (qcowctl unmount %s unmounts it)",
				target, view, view);
		return -ENXIO;
	}
	ctl_print_error("%s is not an attached loop device, nor a view or image with one", target);
	return -ENXIO;
}

int cmd_detach(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct attach_state *state = NULL;
	const char *target;
	char view[PATH_MAX];
	struct stat st;
	bool mounted;
	int opt, ret, nr, count, loops[MAX_LOOPS], status = EXIT_FAILURE;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	ret = ctl_single_operand(self, argc, argv, "DEVICE|MOUNTPOINT|IMAGE", &target);
	if (ret)
		return ret;
	state = calloc(1, sizeof(*state));
	if (!state) {
		ctl_print_error("out of memory");
		return EXIT_FAILURE;
	}
	if (detach_resolve(target, view, sizeof(view), state) < 0)
		goto out;
	/* A state file whose loop device is gone is a detach that stopped
	 * half way: this one goes on from there. */
	nr = state_find(view, state);
	/* Only a qcowfs view is ours to take down: a loop device over another
	 * file (or FUSE export) stays, before anything is changed. */
	mounted = ctl_is_mount_point(view);
	if (mounted) {
		char *text = NULL;

		ret = ctl_mount_read_status_text(view, &text);
		free(text);
		if (ret < 0) {
			ctl_report_status_error(view, ret);
			goto out;
		}
	} else if (nr < 0) {
		ctl_print_error("%s is not a qcowfs view; detach undoes qcowctl attach only (losetup -d detaches other loop devices)",
				view);
		goto out;
	}

	/* Every loop device over the view goes (the view cannot be unmounted
	 * while one holds it), and all are checked before any is cleared. */
	count = ctl_loops_over(view, loops, MAX_LOOPS);
	for (int i = 0; i < count; i++)
		if (ctl_loop_check_unused(loops[i]) < 0)
			goto out;
	for (int i = 0; i < count; i++) {
		if (ctl_loop_clear(loops[i]) < 0)
			goto out;
		printf("detached /dev/loop%d\n", loops[i]);
		if (loops[i] != nr)
			state_remove(loops[i]);   /* stale: about another view */
	}
	if (nr >= 0) {
		for (int i = 0; i < state->node_count; i++)
			if (unlink(state->node[i]) < 0 && errno != ENOENT)
				ctl_print_error("warning: cannot remove the device node %s: %s",
						state->node[i], strerror(errno));
	}
	fflush(stdout);
	if (mounted && ctl_unmount_and_check(view, stdout) < 0)
		goto out;
	/* qcowfs may remove a file it created itself; an empty regular file
	 * left is ours to remove, anything else someone put there since. */
	if (nr >= 0 && state->created_mountpoint && lstat(view, &st) == 0 &&
	    S_ISREG(st.st_mode) && st.st_size == 0 && unlink(view) < 0) {
		ctl_print_error("cannot remove the mountpoint file %s: %s", view, strerror(errno));
		goto out;
	}
	if (nr >= 0)
		state_remove(nr);
	status = EXIT_SUCCESS;
out:
	free(state);
	return status;
}
