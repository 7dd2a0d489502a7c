/*
 * ctl_loop.c - the block-device side of qcowctl attach/detach: loop devices
 * over a view (LOOP_CONFIGURE, LOOP_CLR_FD), their partitions (sysfs, partx)
 * and device nodes, and the mount table (/proc/self/mountinfo).
 *
 * Rules:
 *  - The kernel's word is read from sysfs and mountinfo each time, never
 *    cached: other programs attach, mount and detach meanwhile.
 *  - A device node is made here only when devtmpfs or udev made none within
 *    NODE_WAIT_MS (a container's /dev); a node of the wrong number is stale
 *    and replaced.
 *  - Direct I/O is asked for, never assumed: a kernel that refuses it gets
 *    a buffered device and the user a warning.
 *  - Every failure is reported here, naming the device or file.
 */

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/loop.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qcowctl.h"
#include "ctl_loop.h"

/* How long devtmpfs or udev get to create a node before we make it. */
#define NODE_WAIT_MS 2000
/* How long the kernel gets to release a cleared loop device. */
#define LOOP_RELEASE_WAIT_MS 10000

/* ---- small file helpers ------------------------------------------------- */

/* The first line of a small text file (sysfs), without its newline. */
static int read_line_file(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "re");
	int ret = 0;

	if (!f)
		return -errno;
	if (!fgets(buf, (int)len, f))
		ret = ferror(f) ? -EIO : -ENODATA;
	else
		buf[strcspn(buf, "\n")] = '\0';
	fclose(f);
	return ret;
}

/* The device number in a sysfs "dev" file ("7:3"). */
int ctl_read_sysfs_devnum(const char *path, dev_t *dev)
{
	char text[64];
	unsigned maj, min;
	int ret = read_line_file(path, text, sizeof(text));

	if (ret < 0)
		return ret;
	if (sscanf(text, "%u:%u", &maj, &min) != 2)
		return -EPROTO;
	*dev = makedev(maj, min);
	return 0;
}

/* The file loop device number nr reads from, or -ENXIO when it has none. */
int ctl_loop_backing_file(int nr, char *buf, size_t len)
{
	char path[96];
	int ret;

	snprintf(path, sizeof(path), "/sys/block/loop%d/loop/backing_file", nr);
	ret = read_line_file(path, buf, len);
	return ret == -ENOENT ? -ENXIO : ret;
}

/* ---- mounts (/proc/self/mountinfo) -------------------------------------- */

/* mountinfo writes space, tab, newline and backslash as \ooo. */
static void mountinfo_unescape(char *s)
{
	char *out = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*out++ = *s;
		}
	}
	*out = '\0';
}

/* One line of mountinfo: the device, where, the type and the source. */
struct mount_line {
	dev_t dev;
	char *mountpoint;
	char *fstype;
	char *source;
};

/* Splits a mountinfo line in place; false for a line that does not parse. */
static bool mountinfo_parse(char *line, struct mount_line *m)
{
	char *field[6] = { NULL }, *save = NULL, *tok;
	unsigned maj, min;
	int n = 0;
	bool after_dash = false;

	for (tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
		if (!after_dash) {
			if (strcmp(tok, "-") == 0)
				after_dash = true;
			else if (n < 5)
				field[n++] = tok;   /* id parent maj:min root mountpoint */
		} else if (!field[5]) {
			field[5] = tok;             /* type */
		} else {
			m->source = tok;
			break;
		}
	}
	if (n < 5 || !field[5] || !tok || sscanf(field[2], "%u:%u", &maj, &min) != 2)
		return false;
	m->dev = makedev(maj, min);
	m->mountpoint = field[4];
	m->fstype = field[5];
	mountinfo_unescape(m->mountpoint);
	mountinfo_unescape(m->source);
	return true;
}

/* Calls match on each mount of /proc/self/mountinfo until it returns
 * true: 1 then, 0 when none did, or a negative errno. */
static int mountinfo_find(bool (*match)(const struct mount_line *m, void *arg), void *arg)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int found = 0;

	if (!f)
		return -errno;
	while (!found && getline(&line, &cap, f) > 0) {
		struct mount_line m;

		found = mountinfo_parse(line, &m) && match(&m, arg);
	}
	free(line);
	fclose(f);
	return found;
}

struct device_mount { dev_t dev; char *buf; size_t len; };

static bool is_device_mount(const struct mount_line *m, void *arg)
{
	struct device_mount *d = arg;

	if (m->dev != d->dev)
		return false;
	snprintf(d->buf, d->len, "%s", m->mountpoint);
	return true;
}

/* Where block device dev is mounted (the first place), into buf: 1 when
 * it is, 0 when not, or a negative errno. */
static int mount_of_device(dev_t dev, char *buf, size_t len)
{
	struct device_mount d = { .dev = dev, .buf = buf, .len = len };

	return mountinfo_find(is_device_mount, &d);
}

struct image_mount { const struct stat *image_st; char *mountpoint; };

static bool is_image_mount(const struct mount_line *m, void *arg)
{
	struct image_mount *im = arg;
	struct stat st;

	if (strncmp(m->fstype, "fuse", 4) != 0 || m->source[0] != '/' || stat(m->source, &st) < 0 ||
	    st.st_dev != im->image_st->st_dev || st.st_ino != im->image_st->st_ino)
		return false;
	im->mountpoint = strdup(m->mountpoint);   /* NULL: out of memory, said by the caller */
	return true;
}

/* The mountpoint of a qcowfs mount of the image with inode *image_st
 * (qcowfs names the image as the mount's source), malloc'ed into *out:
 * 1 found, 0 none, or a negative errno. */
int ctl_find_fuse_mount_of(const struct stat *image_st, char **out)
{
	struct image_mount im = { .image_st = image_st, .mountpoint = NULL };
	int found = mountinfo_find(is_image_mount, &im);

	if (found == 1 && !im.mountpoint)
		return -ENOMEM;
	*out = im.mountpoint;
	return found;
}

static bool is_mount_at(const struct mount_line *m, void *arg)
{
	return strcmp(m->mountpoint, arg) == 0;
}

/* Whether path is where something is mounted (a half-finished detach may
 * have unmounted the view already). */
bool ctl_is_mount_point(const char *path)
{
	int found = mountinfo_find(is_mount_at, (void *)path);

	return found != 0;   /* cannot tell (an error): let the unmount say */
}

/* ---- device nodes -------------------------------------------------------- */

/* Set once a node had to be made: nothing makes nodes here, so the next
 * ones are made at once instead of after NODE_WAIT_MS each. */
static bool nodes_made_by_nobody;

/* Makes sure path is a block device node for dev: waits a moment for
 * devtmpfs or udev, then makes it (replacing a stale node of another
 * number).  *made tells whether we did. */
int ctl_ensure_node(const char *path, dev_t dev, bool *made)
{
	uint64_t start = ctl_monotonic_ms();
	struct stat st;

	*made = false;
	for (;;) {
		if (stat(path, &st) == 0 && S_ISBLK(st.st_mode) && st.st_rdev == dev)
			return 0;
		if (nodes_made_by_nobody || ctl_monotonic_ms() - start >= NODE_WAIT_MS)
			break;
		ctl_sleep_ms(50);
	}
	nodes_made_by_nobody = true;
	if (lstat(path, &st) == 0) {
		if (!S_ISBLK(st.st_mode)) {
			ctl_print_error("%s exists and is not a block device; cannot make the node of %u:%u there",
					path, major(dev), minor(dev));
			return -EEXIST;
		}
		unlink(path);   /* stale: a device of another number */
	}
	if (mknod(path, S_IFBLK | 0660, dev) < 0 && errno != EEXIST) {
		int err = errno;
		ctl_print_error("cannot make the device node %s (%u:%u): %s", path, major(dev),
				minor(dev), strerror(err));
		return -err;
	}
	*made = true;
	return 0;
}

static int cmp_int(const void *a, const void *b)
{
	int x = *(const int *)a, y = *(const int *)b;
	return (x > y) - (x < y);
}

int ctl_loop_partitions(int nr, struct ctl_part_list *parts)
{
	char dirpath[64], prefix[32], path[PATH_MAX];
	struct dirent *e;
	DIR *d;
	int numbers[CTL_MAX_PARTS], n = 0, ret = 0;

	parts->count = 0;
	snprintf(dirpath, sizeof(dirpath), "/sys/block/loop%d", nr);
	snprintf(prefix, sizeof(prefix), "loop%dp", nr);
	d = opendir(dirpath);
	if (!d)
		return -errno;
	while ((e = readdir(d)) && n < CTL_MAX_PARTS) {
		size_t plen = strlen(prefix);
		char *end;
		long k;

		if (strncmp(e->d_name, prefix, plen) != 0 || !isdigit((unsigned char)e->d_name[plen]))
			continue;
		k = strtol(e->d_name + plen, &end, 10);
		if (*end == '\0' && k > 0 && k < INT_MAX)
			numbers[n++] = (int)k;
	}
	closedir(d);
	qsort(numbers, (size_t)n, sizeof(int), cmp_int);
	for (int i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "/sys/block/loop%d/loop%dp%d/dev", nr, nr, numbers[i]);
		ret = ctl_read_sysfs_devnum(path, &parts->dev[parts->count]);
		if (ret == -ENOENT)
			continue;   /* gone meanwhile (a rescan) */
		if (ret < 0)
			return ret;
		parts->number[parts->count++] = numbers[i];
	}
	return 0;
}

/* ---- the loop device ---------------------------------------------------- */

/* Sets up a free loop device over the open view fd; its number in *nr.
 * Direct I/O when asked, falling back to the page cache with a warning when
 * the kernel refuses it for this file. */
int ctl_loop_configure(int view_fd, const char *view, bool read_only, bool direct, int *nr,
		       bool *made_node)
{
	struct loop_config cfg;
	struct loop_info64 info;
	char path[64];
	dev_t dev;
	int ctl_fd, dev_fd = -1, ret = 0;
	bool made = false;

	*made_node = false;
	ctl_fd = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (ctl_fd < 0) {
		ret = -errno;
		ctl_print_error("cannot open /dev/loop-control: %s (is the loop module loaded? are we root?)",
				strerror(-ret));
		return ret;
	}
	/* Another program may take the free device between our asking and
	 * configuring it (EBUSY): ask again. */
	for (int attempt = 0; attempt < 20; attempt++) {
		int n = ioctl(ctl_fd, LOOP_CTL_GET_FREE);

		if (n < 0) {
			ret = -errno;
			ctl_print_error("no free loop device: %s", strerror(-ret));
			goto out;
		}
		snprintf(path, sizeof(path), "/sys/block/loop%d/dev", n);
		if ((ret = ctl_read_sysfs_devnum(path, &dev)) < 0) {
			ctl_print_error("cannot read %s: %s", path, strerror(-ret));
			goto out;
		}
		snprintf(path, sizeof(path), "/dev/loop%d", n);
		if ((ret = ctl_ensure_node(path, dev, &made)) < 0)
			goto out;
		dev_fd = open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
		if (dev_fd < 0) {
			ret = -errno;
			ctl_print_error("cannot open %s: %s", path, strerror(-ret));
			goto out;
		}
		memset(&cfg, 0, sizeof(cfg));
		cfg.fd = (unsigned)view_fd;
		cfg.info.lo_flags = LO_FLAGS_PARTSCAN | (read_only ? LO_FLAGS_READ_ONLY : 0) |
				    (direct ? LO_FLAGS_DIRECT_IO : 0);
		/* Only a name for people (losetup -l shows it), cut to fit. */
		memcpy(cfg.info.lo_file_name, view,
		       strnlen(view, sizeof(cfg.info.lo_file_name) - 1));
		ret = ioctl(dev_fd, LOOP_CONFIGURE, &cfg) < 0 ? -errno : 0;
		if (ret == -EINVAL && direct) {
			/* Newer kernels refuse the whole configuration when the
			 * file cannot do direct I/O; older ones quietly go
			 * buffered (checked below). */
			cfg.info.lo_flags &= ~(uint32_t)LO_FLAGS_DIRECT_IO;
			ret = ioctl(dev_fd, LOOP_CONFIGURE, &cfg) < 0 ? -errno : 0;
			if (ret == 0) {
				int dio = ioctl(dev_fd, LOOP_SET_DIRECT_IO, 1UL) < 0 ? errno : 0;
				if (dio)
					ctl_print_error("warning: the kernel refuses direct I/O for a loop device over %s (%s); using the page cache",
							view, strerror(dio));
			}
		}
		if (ret != -EBUSY)
			break;
		close(dev_fd);
		dev_fd = -1;
		if (made)
			unlink(path);
	}
	if (ret < 0) {
		ctl_print_error("cannot set up %s over %s: %s", path, view, strerror(-ret));
		goto out;
	}
	*nr = atoi(path + strlen("/dev/loop"));
	if (direct && ioctl(dev_fd, LOOP_GET_STATUS64, &info) == 0 &&
	    !(info.lo_flags & LO_FLAGS_DIRECT_IO))
		ctl_print_error("warning: the kernel did not enable direct I/O for %s over %s; it uses the page cache",
				path, view);
out:
	if (ret < 0 && made)
		unlink(path);
	*made_node = ret == 0 && made;
	if (dev_fd >= 0)
		close(dev_fd);
	close(ctl_fd);
	return ret;
}

/* Clears loop device nr and waits until the kernel let go of its file.
 * One still open elsewhere is only marked to go at its last close: then
 * this fails after LOOP_RELEASE_WAIT_MS. */
int ctl_loop_clear(int nr)
{
	char path[64], backing[PATH_MAX];
	uint64_t start;
	int fd, ret = 0;

	char was[PATH_MAX];
	if (ctl_loop_backing_file(nr, was, sizeof(was)) < 0)
		was[0] = '\0';
	snprintf(path, sizeof(path), "/dev/loop%d", nr);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		ctl_print_error("cannot open %s: %s", path, strerror(-ret));
		return ret;
	}
	if (ioctl(fd, LOOP_CLR_FD) < 0 && errno != ENXIO)
		ret = -errno;
	close(fd);
	if (ret < 0) {
		ctl_print_error("cannot detach %s: %s", path, strerror(-ret));
		return ret;
	}
	start = ctl_monotonic_ms();
	/* (once free, the number may serve someone else's file at once:
	 * only ours still being there counts) */
	while (ctl_loop_backing_file(nr, backing, sizeof(backing)) == 0 && strcmp(backing, was) == 0) {
		if (ctl_monotonic_ms() - start >= LOOP_RELEASE_WAIT_MS) {
			ctl_print_error("%s is still open by another program; the kernel detaches it when that closes it",
					path);
			return -EBUSY;
		}
		ctl_sleep_ms(50);
	}
	return 0;
}

/* Runs "partx -a DEVICE": reads the partition table in user space and adds
 * the partitions the kernel did not find itself (a kernel built without the
 * table's parser finds none).  Its complaint about a disk without a table
 * is no news; other failures show as missing partitions.  Returns its exit
 * status, 127 when it could not be started, or a negative errno. */
int ctl_partx_add(const char *device)
{
	pid_t child;
	int status;

	fflush(NULL);
	child = fork();
	if (child < 0)
		return -errno;
	if (child == 0) {
		int devnull = open("/dev/null", O_WRONLY);
		if (devnull >= 0) {
			dup2(devnull, STDOUT_FILENO);
			dup2(devnull, STDERR_FILENO);
		}
		execlp("partx", "partx", "-a", "--", device, (char *)NULL);
		_exit(127);
	}
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			return -errno;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* The loop devices over the view, at most max of them, into list: how many. */
int ctl_loops_over(const char *view, int *list, int max)
{
	char backing[PATH_MAX];
	DIR *d = opendir("/sys/block");
	struct dirent *e;
	int count = 0;

	if (!d)
		return 0;
	while (count < max && (e = readdir(d))) {
		char *end;
		long n;

		if (strncmp(e->d_name, "loop", 4) != 0)
			continue;
		n = strtol(e->d_name + 4, &end, 10);
		if (*end || end == e->d_name + 4 || n < 0 || n > INT_MAX)
			continue;
		if (ctl_loop_backing_file((int)n, backing, sizeof(backing)) == 0 && strcmp(backing, view) == 0)
			list[count++] = (int)n;
	}
	closedir(d);
	return count;
}

/* A loop device over the view: its number, or -1. */
int ctl_loop_over(const char *view)
{
	int nr;

	return ctl_loops_over(view, &nr, 1) == 1 ? nr : -1;
}

/* Refuses (naming it) when loop device nr or a partition is mounted, held
 * by another kernel user (device mapper, ...) or open exclusively (swap,
 * a file system mounted in another mount namespace).  Partitions first:
 * holding one makes the whole device busy too, and the partition is the
 * name the user needs. */
int ctl_loop_check_unused(int nr)
{
	struct ctl_part_list parts;
	char name[64], where[PATH_MAX], path[128];
	dev_t whole, dev;
	int ret, fd;

	snprintf(path, sizeof(path), "/sys/block/loop%d/dev", nr);
	if ((ret = ctl_read_sysfs_devnum(path, &whole)) < 0 || (ret = ctl_loop_partitions(nr, &parts)) < 0) {
		ctl_print_error("cannot read the partitions of /dev/loop%d: %s", nr, strerror(-ret));
		return ret;
	}
	for (int i = 0; i <= parts.count; i++) {
		DIR *d;
		struct dirent *e;

		if (i == parts.count) {
			dev = whole;
			snprintf(name, sizeof(name), "loop%d", nr);
			snprintf(path, sizeof(path), "/sys/block/%s/holders", name);
		} else {
			dev = parts.dev[i];
			snprintf(name, sizeof(name), "loop%dp%d", nr, parts.number[i]);
			snprintf(path, sizeof(path), "/sys/block/loop%d/%s/holders", nr, name);
		}
		ret = mount_of_device(dev, where, sizeof(where));
		if (ret < 0) {
			ctl_print_error("cannot read /proc/self/mountinfo: %s", strerror(-ret));
			return ret;
		}
		if (ret > 0) {
			ctl_print_error("/dev/%s is mounted on %s; unmount it first", name, where);
			return -EBUSY;
		}
		d = opendir(path);
		while (d && (e = readdir(d))) {
			if (e->d_name[0] == '.')
				continue;
			ctl_print_error("/dev/%s is in use by %s; release it first", name, e->d_name);
			closedir(d);
			return -EBUSY;
		}
		if (d)
			closedir(d);
		snprintf(path, sizeof(path), "/dev/%s", name);
		fd = open(path, O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK);
		if (fd < 0 && errno == EBUSY) {
			ctl_print_error("/dev/%s is in use (open exclusively: swap, or mounted in another namespace?); release it first",
					name);
			return -EBUSY;
		}
		if (fd >= 0)
			close(fd);
	}
	return 0;
}
