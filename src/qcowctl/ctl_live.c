/*
 * ctl_live.c - talking to a live qcowfs mount, finding qcowfs mounts in the
 * mount table, and the progress display of the commands that wait for one.
 *
 * Rules:
 *  - The only channel is the ioctls of qcowfs_ioctl.h on the raw view: the
 *    status through a descriptor opened for reading, requests that change
 *    the image through one opened for writing (the daemon checks the
 *    access mode).  A file that refuses the ioctl is "not a qcowfs mount",
 *    never an error of the daemon.
 *  - The status is text (key=value lines); a reply that does not parse is
 *    -EPROTO, never guessed at.
 *  - The progress display never prints 100 % for an operation that failed.
 *  - The mount table is read from /proc/self/mountinfo and a mountpoint is
 *    never stat'ed to find it: a dead daemon's mount answers ENOTCONN.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowfs_ioctl.h"
#include "qcowctl.h"

/* ---- waiting ------------------------------------------------------------ */

/* Polling a mount measures its waits on the monotonic clock (not moved by
 * clock changes) and sleeps through signals. */
uint64_t ctl_monotonic_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void ctl_sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* ---- talking to a live mount ------------------------------------------- */

/* ENOTTY: a file that knows no such ioctl (not a qcowfs mount); EINVAL,
 * ENOSYS: file systems that refuse unknown ioctls that way. */
bool ctl_errno_means_not_qcowfs(int err)
{
	return err == ENOTTY || err == EINVAL || err == ENOSYS || err == ENODATA || err == ENOTSUP || err == EOPNOTSUPP;
}

/* Sends one control ioctl (qcowfs_ioctl.h) to the raw view at path
 * through a descriptor opened with access (O_RDONLY for the status,
 * O_RDWR for a compaction: the daemon checks).  Returns 0 or a negative
 * errno. */
int ctl_mount_ioctl(const char *path, int access, unsigned long cmd, void *arg)
{
	int fd = open(path, access | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	int ret = ioctl(fd, cmd, arg) < 0 ? -errno : 0;
	close(fd);
	return ret;
}

/* The daemon's status text (NUL-terminated, malloc'ed). */
int ctl_mount_read_status_text(const char *mountpoint, char **out)
{
	struct qcowfs_status_text *st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	int ret = ctl_mount_ioctl(mountpoint, O_RDONLY, QCOWFS_IOC_STATUS, st);
	if (ret < 0) {
		free(st);
		return ret;
	}
	st->text[sizeof(st->text) - 1] = '\0';
	*out = st->text;   /* text is the first member: free(*out) frees st */
	return 0;
}

/* Reads and parses the status.  Returns 0, "not a qcowfs" errors
 * untouched (the caller decides what that means), or -EPROTO for text
 * that does not parse. */
int ctl_mount_read_status(const char *mountpoint, struct qcow_stats *st)
{
	char *text;
	int ret = ctl_mount_read_status_text(mountpoint, &text);

	if (ret < 0)
		return ret;
	ret = qcow_stats_parse(text, st);
	free(text);
	return ret < 0 ? -EPROTO : 0;
}

/* The value of "key=" in a status text, malloc'ed, or NULL. */
char *ctl_status_value(const char *text, const char *key)
{
	size_t klen = strlen(key);
	for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
		if (!strncmp(line, key, klen) && line[klen] == '=') {
			const char *v = line + klen + 1;
			return strndup(v, strcspn(v, "\n"));
		}
	}
	return NULL;
}

/* The message for a status read that failed, naming the path. */
void ctl_status_error_message(const char *mountpoint, int ret, char *buf, size_t len)
{
	if (ctl_errno_means_not_qcowfs(-ret))
		snprintf(buf, len, "%s is not a qcowfs mount", mountpoint);
	else if (ret == -ENOTCONN)
		snprintf(buf, len, "%s: the qcowfs daemon is gone (killed or crashed); "
			 "'qcowctl unmount %s' detaches the dead mount and checks the image", mountpoint, mountpoint);
	else if (ret == -EPROTO)
		snprintf(buf, len, "%s: the status from qcowfs could not be parsed (qcowctl and qcowfs versions differ?)",
			 mountpoint);
	else if (ret == -EACCES)
		snprintf(buf, len, "cannot read the status of %s: %s (it needs read permission on the view)",
			 mountpoint, strerror(EACCES));
	else
		snprintf(buf, len, "cannot read the status of %s: %s", mountpoint, strerror(-ret));
}

void ctl_report_status_error(const char *mountpoint, int ret)
{
	char msg[2 * PATH_MAX + 256];

	ctl_status_error_message(mountpoint, ret, msg, sizeof(msg));
	ctl_print_error("%s", msg);
}

/* For the commands that take a mountpoint or an image (compact, sparsify,
 * snapshot): the status read of target failed with ret, and target is not
 * an image file either.  A path that does not exist says so plainly. */
void ctl_report_target_error(const char *target, int ret)
{
	if (ret == -ENOENT)
		ctl_print_error("cannot access %s: %s", target, strerror(ENOENT));
	else
		ctl_report_status_error(target, ret);
}

/* The message for a compaction request the daemon refused. */
void ctl_report_compact_request_error(const char *mountpoint, int ret)
{
	if (ret == -EACCES || ret == -EBADF || ret == -EPERM)
		ctl_print_error("cannot request a compaction on %s: %s (it needs write permission on the view)",
			    mountpoint, strerror(-ret));
	else
		ctl_print_error("cannot request a compaction on %s: %s", mountpoint, strerror(-ret));
}

/* The error the engine reports, or NULL: a failed engine without an errno
 * failed with an I/O error. */
const char *ctl_status_error_text(const struct qcow_stats *st)
{
	if (st->last_error < 0)
		return strerror(-st->last_error);
	return st->failed ? strerror(EIO) : NULL;
}

/* ---- the mount table ------------------------------------------------------- */

/* A field of /proc/self/mountinfo with its octal escapes (\040 for a space,
 * \011, \012, \134) undone, in place. */
static void mountinfo_unescape(char *s)
{
	char *out = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' && s[3] >= '0' &&
		    s[3] <= '7') {
			*out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*out++ = *s;
		}
	}
	*out = '\0';
}

/* Splits one mountinfo line into the fields we use: "ID PARENT MAJ:MIN ROOT
 * MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS".  Returns
 * false for a line that does not have that shape. */
static bool mountinfo_split(char *line, char **mountpoint, char **fstype, char **source)
{
	char *save = NULL, *tok;
	int field = 0;
	bool dash = false;

	*mountpoint = *fstype = *source = NULL;
	for (tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save), field++) {
		if (field == 4)
			*mountpoint = tok;
		else if (field > 5 && !dash && strcmp(tok, "-") == 0)
			dash = true;
		else if (dash && !*fstype)
			*fstype = tok;
		else if (dash && !*source)
			*source = tok;
	}
	if (!*mountpoint || !*fstype || !*source)
		return false;
	mountinfo_unescape(*mountpoint);
	mountinfo_unescape(*source);
	return true;
}

/* qcowfs mounts carry the subtype "qcowfs" (fuse.qcowfs in the table). */
static bool fstype_is_qcowfs(const char *fstype)
{
	return strcmp(fstype, "fuse.qcowfs") == 0;
}

/*
 * The absolute form of path without stat'ing path itself: its directory
 * through realpath, then its last name.  A dead FUSE mount answers every
 * look at it with ENOTCONN, so realpath(path) would fail there.
 */
int ctl_absolute_path_nofollow(const char *path, char *out, size_t len)
{
	char dir[PATH_MAX], real[PATH_MAX];
	const char *slash = strrchr(path, '/'), *base;
	size_t dlen;
	int n;

	if (slash) {
		dlen = (size_t)(slash - path);
		if (dlen >= sizeof(dir))
			return -ENAMETOOLONG;
		memcpy(dir, path, dlen);
		dir[dlen] = '\0';
		if (dlen == 0)
			strcpy(dir, "/");
		base = slash + 1;
	} else {
		strcpy(dir, ".");
		base = path;
	}
	if (!realpath(dir, real))
		return -errno;
	if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
		/* "mnt/" and the like name a directory: realpath is fine there */
		if (!realpath(path, real))
			return -errno;
		n = snprintf(out, len, "%s", real);
	} else {
		n = snprintf(out, len, "%s%s%s", real, strcmp(real, "/") ? "/" : "", base);
	}
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int ctl_mount_table_lookup(const char *path, char *fstype, size_t fstype_len, char *source, size_t source_len)
{
	char abs[PATH_MAX], *line = NULL, *mnt, *type, *src;
	size_t cap = 0;
	bool found = false;
	FILE *f;
	int ret = ctl_absolute_path_nofollow(path, abs, sizeof(abs));

	if (ret < 0)
		return ret;
	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -errno;
	/* the last entry for a path is the mount on top, the one path reaches */
	while (getline(&line, &cap, f) > 0) {
		if (!mountinfo_split(line, &mnt, &type, &src) || strcmp(mnt, abs) != 0)
			continue;
		snprintf(fstype, fstype_len, "%s", type);
		snprintf(source, source_len, "%s", src);
		found = true;
	}
	free(line);
	fclose(f);
	return found ? 0 : -ENOENT;
}

/* Whether a and b name the same file (both must exist). */
static bool same_file(const char *a, const struct stat *b)
{
	struct stat sa;

	return stat(a, &sa) == 0 && sa.st_dev == b->st_dev && sa.st_ino == b->st_ino;
}

int ctl_find_image_mount(const char *image, char *mountpoint, size_t len, long *pid, bool *read_only)
{
	struct stat img_st;
	char *line = NULL, *mnt, *type, *src;
	size_t cap = 0;
	int ret = -ENOENT;
	FILE *f;

	if (stat(image, &img_st) < 0)
		return -errno;
	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -errno;
	while (ret == -ENOENT && getline(&line, &cap, f) > 0) {
		char *text = NULL, *status_image = NULL, *pid_text = NULL, *ro_text = NULL;
		bool match;

		if (!mountinfo_split(line, &mnt, &type, &src) || !fstype_is_qcowfs(type))
			continue;
		/* qcowfs sets fsname (the table's source) to the absolute image
		 * path; the daemon's status names it too, for a mount started
		 * with another fsname.  Only then is the mount asked: a look at
		 * a mount can hang on a daemon that hangs. */
		match = same_file(src, &img_st);
		if (match || access(src, F_OK) < 0) {
			if (ctl_mount_read_status_text(mnt, &text) == 0) {
				status_image = ctl_status_value(text, "image");
				pid_text = ctl_status_value(text, "pid");
				ro_text = ctl_status_value(text, "read_only");
			}
			match = match || (status_image && same_file(status_image, &img_st));
		}
		if (match) {
			snprintf(mountpoint, len, "%s", mnt);
			*pid = pid_text ? strtol(pid_text, NULL, 10) : 0;
			*read_only = ro_text && strcmp(ro_text, "1") == 0;
			ret = 0;
		}
		free(ro_text);
		free(pid_text);
		free(status_image);
		free(text);
	}
	free(line);
	fclose(f);
	return ret;
}

/* A path as a shell word: as it is when it has only harmless bytes, else in
 * single quotes (a quote inside as '\''). */
void ctl_shell_word(const char *path, char *out, size_t len)
{
	size_t used = 0;

	if (path[0] && strspn(path, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-+,:=@%") ==
			       strlen(path)) {
		snprintf(out, len, "%s", path);
		return;
	}
	if (len < 3) {
		if (len)
			out[0] = '\0';
		return;
	}
	out[used++] = '\'';
	for (const char *c = path; *c && used + 6 < len; c++) {
		if (*c == '\'') {
			memcpy(out + used, "'\\''", 4);
			used += 4;
		} else {
			out[used++] = *c;
		}
	}
	out[used++] = '\'';
	out[used] = '\0';
}

void ctl_report_image_mounted(const char *command, const char *image, const char *mountpoint, long pid,
			      bool read_only)
{
	char word[2 * PATH_MAX];
	char who[48] = "";

	ctl_shell_word(mountpoint, word, sizeof(word));
	if (pid > 0)
		snprintf(who, sizeof(who), " (qcowfs pid %ld)", pid);
	/* a read-only mount (a snapshot view, -o ro) refuses changes too */
	if (read_only)
		ctl_print_error("%s is mounted read-only at %s%s; it must be unmounted first: qcowctl unmount %s", image,
				mountpoint, who, word);
	else
		ctl_print_error("%s is mounted at %s%s; work through the mount: qcowctl %s %s", image, mountpoint, who,
				command, word);
}

/* ---- progress display --------------------------------------------------- */

#define PROGRESS_BAR_WIDTH 40
#define PROGRESS_BAR_FULL "########################################"
_Static_assert(sizeof(PROGRESS_BAR_FULL) - 1 == PROGRESS_BAR_WIDTH, "bar text must fill the bar");

void ctl_progress_init(struct progress_display *p)
{
	p->tty = isatty(STDOUT_FILENO);
	p->shown_percent = -1;
}

void ctl_progress_show(struct progress_display *p, double fraction)
{
	int percent;

	if (!(fraction >= 0.0))   /* also catches NaN */
		fraction = 0.0;
	if (fraction > 1.0)
		fraction = 1.0;
	percent = (int)(fraction * 100.0);
	if (p->tty) {
		int filled = (int)(fraction * PROGRESS_BAR_WIDTH);

		if (percent == p->shown_percent)
			return;
		printf("\r[%.*s%*s] %3d%%",
		       filled, PROGRESS_BAR_FULL,
		       PROGRESS_BAR_WIDTH - filled, "", percent);
		fflush(stdout);
		p->shown_percent = percent;
	} else if (p->shown_percent < 0 || percent / 10 > p->shown_percent / 10) {
		/* 100% is ctl_progress_finish's line, so that it appears once
		 * and only when the run really succeeded. */
		if (percent < 100) {
			printf("compacting: %d%%\n", percent);
			fflush(stdout);
		}
		p->shown_percent = percent;
	}
}

void ctl_progress_finish(struct progress_display *p, bool success)
{
	if (success) {
		if (p->tty) {
			ctl_progress_show(p, 1.0);
		} else {
			printf("compacting: 100%%\n");
		}
	}
	if (p->tty && p->shown_percent >= 0)
		putchar('\n');
	fflush(stdout);
}

void ctl_progress_callback(double fraction, void *opaque)
{
	ctl_progress_show(opaque, fraction);
}
