/*
 * cmd_unmount.c - "qcowctl unmount": unmount a view, wait for the daemon's
 * close report and verify the image.
 *
 * Rules:
 *  - Prints what the daemon said about its close (read from its close
 *    report socket, named in the status) and exits 1 when that close
 *    failed.
 *  - Waits for the daemon to exit (up to UNMOUNT_WAIT_MS) before checking
 *    the image: the image is only consistent once the daemon has closed it.
 *  - A mount whose daemon is dead (ENOTCONN) is unmounted here, and its
 *    image (from the mount table) checked: the user is never told to do it.
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
#include <poll.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/un.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowctl.h"

/* Closing an image flushes and writes the refcounts, which can take a
 * while on a large, busy image; give up only after this long. */
#define UNMOUNT_WAIT_MS (600 * 1000)

/* ---- unmount ------------------------------------------------------------- */

/* Runs "fusermount3 -u [-z] MOUNTPOINT"; returns its exit status, 127 when
 * it could not be started, or -errno when fork failed.  quiet: its stderr
 * goes to /dev/null (an attempt that will be retried); lazy: -z, detach
 * now and let go when the last user does. */
static int run_fusermount(const char *mountpoint, bool quiet, bool lazy)
{
	char path[PATH_MAX + 3];
	int status;
	pid_t child;

	/* fusermount3 would read "-foo" as an option. */
	snprintf(path, sizeof(path), "%s%s", mountpoint[0] == '-' ? "./" : "", mountpoint);
	fflush(NULL);
	child = fork();
	if (child < 0)
		return -errno;
	if (child == 0) {
		if (quiet) {
			int devnull = open("/dev/null", O_WRONLY);
			if (devnull >= 0)
				dup2(devnull, STDERR_FILENO);
		}
		if (lazy)
			execlp("fusermount3", "fusermount3", "-u", "-z", path, (char *)NULL);
		else
			execlp("fusermount3", "fusermount3", "-u", path, (char *)NULL);
		_exit(127);
	}
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			return -errno;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Whether pid still runs.  A zombie has closed everything already; it
 * lingers only when its parent (a foreground "qcowfs -f" started by some
 * script) does not reap it, and must not keep us waiting. */
static bool process_running(pid_t pid)
{
	char path[64], stat_text[256];
	const char *after_name;
	FILE *f;
	size_t got;

	/* EPERM: alive, just not ours to signal. */
	if (kill(pid, 0) < 0 && errno != EPERM)
		return false;
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	f = fopen(path, "r");
	if (!f)
		return true;   /* no /proc: trust kill() */
	got = fread(stat_text, 1, sizeof(stat_text) - 1, f);
	fclose(f);
	stat_text[got] = '\0';
	/* "pid (comm) S ...": comm may contain spaces and parentheses. */
	after_name = strrchr(stat_text, ')');
	return !(after_name && after_name[1] == ' ' && after_name[2] == 'Z');
}

/* Reads the daemon's pid, image path and close report name (NULL from a
 * daemon without one) from the mountpoint's status. */
static int unmount_identify(const char *mountpoint, pid_t *pid, char **image, char **report)
{
	char *text = NULL, *pid_text = NULL;
	uint64_t value;
	int ret = ctl_mount_read_status_text(mountpoint, &text);

	if (ret < 0) {
		if (ret == -ENOTCONN)
			return ret;   /* a dead daemon: the caller unmounts it */
		if (ctl_errno_means_not_qcowfs(-ret))
			ctl_report_status_error(mountpoint, ret);
		else
			ctl_print_error("cannot query %s: %s", mountpoint, strerror(-ret));
		return ret;
	}
	pid_text = ctl_status_value(text, "pid");
	*image = ctl_status_value(text, "image");
	*report = ctl_status_value(text, "close_report");
	free(text);
	if (!pid_text || !*image || ctl_parse_unsigned(pid_text, &value) < 0 || value < 2 || value > INT_MAX) {
		ctl_print_error("%s: qcowfs reported no valid pid and image path", mountpoint);
		free(pid_text);
		free(*image);
		free(*report);
		*image = *report = NULL;
		return -EPROTO;
	}
	*pid = (pid_t)value;
	free(pid_text);
	return 0;
}

/* Right after the last close of the raw view (a loop device being torn
 * down, a guest just stopped) the kernel may still call the mount busy for
 * a moment, so a failing fusermount3 gets a few more tries. */
#define UNMOUNT_ATTEMPTS 10
#define UNMOUNT_RETRY_MS 500

static int unmount_mountpoint(const char *mountpoint)
{
	int status = 1;

	for (int attempt = 1; attempt <= UNMOUNT_ATTEMPTS; attempt++) {
		bool last = attempt == UNMOUNT_ATTEMPTS;

		status = run_fusermount(mountpoint, !last, false);
		if (status == 0)
			return 0;
		if (status == 127 || status < 0)
			break;   /* not installed: retrying will not help */
		if (!last)
			ctl_sleep_ms(UNMOUNT_RETRY_MS);
	}
	/* Root can unmount without fusermount3 (not installed, or it refused
	 * for a reason umount2 does not share). */
	if (geteuid() == 0) {
		if (umount2(mountpoint, 0) == 0)
			return 0;
		ctl_print_error("cannot unmount %s: %s", mountpoint, strerror(errno));
		return -1;
	}
	if (status == 127)
		ctl_print_error("cannot unmount %s: fusermount3 could not be run", mountpoint);
	else if (status < 0)
		ctl_print_error("cannot unmount %s: %s", mountpoint, strerror(-status));
	else
		ctl_print_error("cannot unmount %s: fusermount3 -u failed", mountpoint);
	return -1;
}

/* The daemon closes the image (flush, refcounts, unlock) after the
 * unmount and exits only then; its exit is the sign the image is free. */
static int wait_for_daemon_exit(pid_t pid, const char *image)
{
	uint64_t start = ctl_monotonic_ms();
	bool announced = false;

	while (process_running(pid)) {
		uint64_t waited = ctl_monotonic_ms() - start;

		if (waited >= UNMOUNT_WAIT_MS) {
			ctl_print_error("qcowfs (pid %ld) did not exit within %d s; %s may still be in use",
				    (long)pid, UNMOUNT_WAIT_MS / 1000, image);
			return -1;
		}
		if (!announced && waited >= 2000) {
			fprintf(stderr, "qcowctl: waiting for qcowfs (pid %ld) to close %s...\n",
				(long)pid, image);
			announced = true;
		}
		ctl_sleep_ms(100);
	}
	return 0;
}

/*
 * The daemon's close report (qcowfs.c, "the close report"): the daemon's
 * exit status and the lines it logged about its shutdown, sent over a Unix
 * socket in the abstract namespace once it has unmounted and closed the
 * image.  We connect before unmounting; the connection waits in the
 * daemon's listen backlog until then.
 */
struct close_report {
	bool received;      /* a complete report arrived */
	int exit_status;    /* the daemon's */
	char lines[4096];   /* its messages, one per line */
};

/* Connects to the report socket named (as "@NAME") in the status, and
 * makes sure the daemon itself listens there.  Returns the descriptor or
 * a negative errno. */
static int close_report_connect(const char *name, pid_t pid)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct ucred cred;
	socklen_t cred_len = sizeof(cred);
	size_t len;
	int fd, ret;

	if (!name || name[0] != '@' || (len = strlen(name + 1)) == 0 || len >= sizeof(sa.sun_path))
		return -EPROTO;
	memcpy(sa.sun_path + 1, name + 1, len);   /* sun_path[0] '\0': abstract */
	/* Non-blocking: a full backlog must not hang the unmount (EAGAIN). */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len)) < 0) {
		ret = -errno;
		goto fail;
	}
	/* Anyone can bind a name in the abstract namespace: a report from
	 * another process than the daemon would be worthless. */
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) < 0) {
		ret = -errno;
		goto fail;
	}
	if (cred.pid != pid) {
		ret = -EPERM;
		goto fail;
	}
	return fd;

fail:
	close(fd);
	return ret;
}

/* Reads the report until the daemon closes the connection, which it does
 * right after its close, or dies (then there is no report).  Closes fd. */
static void close_report_read(int fd, pid_t pid, const char *image, struct close_report *rep)
{
	char text[sizeof(rep->lines) + 32];
	size_t len = 0;
	uint64_t start = ctl_monotonic_ms();
	bool announced = false, eof = false;

	memset(rep, 0, sizeof(*rep));
	while (!eof) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		uint64_t waited = ctl_monotonic_ms() - start;

		if (waited >= UNMOUNT_WAIT_MS) {
			ctl_print_error("qcowfs (pid %ld) sent no close report within %d s",
				    (long)pid, UNMOUNT_WAIT_MS / 1000);
			break;
		}
		if (!announced && waited >= 2000) {
			fprintf(stderr, "qcowctl: waiting for qcowfs (pid %ld) to close %s...\n",
				(long)pid, image);
			announced = true;
		}
		int ready = poll(&pfd, 1, 100);
		if (ready < 0 && errno != EINTR)
			break;
		if (ready <= 0)
			continue;
		ssize_t got = read(fd, text + len, sizeof(text) - 1 - len);
		if (got < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (got <= 0 || (len += (size_t)got) == sizeof(text) - 1)
			eof = true;   /* end, reset by a dying daemon, or full */
	}
	close(fd);
	text[len] = '\0';

	/* "exit=N\n" then the lines */
	char *nl = strchr(text, '\n');
	uint64_t status;
	if (!eof || strncmp(text, "exit=", 5) != 0 || !nl)
		return;
	*nl = '\0';
	if (ctl_parse_unsigned(text + 5, &status) < 0 || status > 255)
		return;
	rep->received = true;
	rep->exit_status = (int)status;
	snprintf(rep->lines, sizeof(rep->lines), "%s", nl + 1);
}

/* Prints the daemon's lines, each as "qcowctl: qcowfs: LINE". */
static void close_report_print(const struct close_report *rep)
{
	const char *line = rep->lines;

	while (*line) {
		size_t n = strcspn(line, "\n");
		ctl_print_error("qcowfs: %.*s", (int)n, line);
		line += n + (line[n] == '\n');
	}
}

/* ---- a mount whose daemon is dead ------------------------------------------ */

/*
 * A qcowfs daemon that was killed (or crashed) leaves its mount behind,
 * answering every access with ENOTCONN ("Transport endpoint is not
 * connected").  Nothing is left to flush: what the daemon had not written
 * is lost, and the image is as the crash left it.  So: find the image in
 * the mount table (qcowfs sets fsname to it), unmount as fusermount3 -u
 * would (lazily when something still holds the mount), check the image and
 * say what the check found.  Leaked clusters are expected after a crash
 * and harm no data; errors are what the user must hear about.
 */
static int unmount_detach_dead(const char *mountpoint)
{
	char abs[PATH_MAX];
	int status = run_fusermount(mountpoint, true, false);

	if (status == 0)
		return 0;
	/* busy (a process still has the view open) or no fusermount3:
	 * detach now, the kernel lets go when the last user does */
	if (geteuid() == 0 && ctl_absolute_path_nofollow(mountpoint, abs, sizeof(abs)) == 0 &&
	    umount2(abs, MNT_DETACH) == 0)
		return 0;
	status = run_fusermount(mountpoint, false, true);
	if (status == 0)
		return 0;
	ctl_print_error("cannot unmount %s: %s", mountpoint,
			status == 127 ? "fusermount3 could not be run" :
			status < 0    ? strerror(-status) :
					"fusermount3 -u and -u -z failed");
	return -1;
}

/* Checks the image of the mount just taken down; the engine's findings
 * go to out (they are the news here, shown like check shows them).  0, or
 * -1 when it could not be checked (said on stderr). */
static int check_unmounted(const char *mountpoint, const char *image, FILE *out, struct qcow_check_result *res)
{
	char err[1024] = "", what[2 * PATH_MAX + 64];
	int ret;

	ctl_engine_log_route(true, out);
	memset(res, 0, sizeof(*res));
	snprintf(what, sizeof(what), "unmounted %s, but cannot check %s", mountpoint, image);
	ctl_engine_call_begin(false);
	ret = qcow_check(image, res, err, sizeof(err));
	ctl_engine_log_route(false, stderr);
	ctl_engine_call_end(ret, what, err);
	return ret < 0 ? -1 : 0;
}

static int unmount_dead_mount(const char *mountpoint, FILE *out)
{
	struct qcow_check_result res;
	struct stat st;
	char fstype[64], image[PATH_MAX];
	int ret = ctl_mount_table_lookup(mountpoint, fstype, sizeof(fstype), image, sizeof(image));

	if (ret < 0) {
		ctl_print_error("%s: %s, but it is not in the mount table (%s)", mountpoint, strerror(ENOTCONN),
				strerror(-ret));
		return -1;
	}
	if (strcmp(fstype, "fuse.qcowfs") != 0) {
		ctl_print_error("%s: %s, and it is a %s mount, not qcowfs; 'fusermount3 -u %s' detaches it",
				mountpoint, strerror(ENOTCONN), fstype, mountpoint);
		return -1;
	}
	ctl_print_error("%s: the qcowfs daemon is gone (killed or crashed); unmounting it and checking %s",
			mountpoint, image);
	if (unmount_detach_dead(mountpoint) < 0)
		return -1;
	if (stat(image, &st) < 0 || !S_ISREG(st.st_mode)) {
		ctl_print_error("unmounted %s; the mount table names %s as its image, which is not a file here: "
				"check the image with 'qcowctl check IMAGE'", mountpoint, image);
		return -1;
	}

	if (check_unmounted(mountpoint, image, out, &res) < 0)
		return -1;
	if (res.errors) {
		ctl_print_error("unmounted %s, but %s has %" PRIu64 " errors after the daemon's death: "
				"data may be corrupted ('qcowctl check %s' lists them)", mountpoint, image, res.errors,
				image);
		return -1;
	}
	if (res.leaks)
		fprintf(out, "unmounted %s (its qcowfs daemon had died); %s has no errors, %" PRIu64
		       " leaked clusters (space only, no harm to data; the next read-write open repairs them)\n",
		       mountpoint, image, res.leaks);
	else
		fprintf(out, "unmounted %s (its qcowfs daemon had died); %s checks clean\n", mountpoint, image);
	return 0;
}

int cmd_unmount(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *mountpoint;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	ret = ctl_single_operand(self, argc, argv, "MOUNTPOINT", &mountpoint);
	if (ret)
		return ret;
	return ctl_unmount_and_check(mountpoint, stdout) < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* The whole of unmount after its options; detach (cmd_attach.c) runs it too.
 * out gets the success line and the check's findings (detach's callers
 * may want stdout for something else). */
int ctl_unmount_and_check(const char *mountpoint, FILE *out)
{
	struct qcow_check_result res;
	struct close_report report = { .received = false };
	char *image = NULL, *report_name = NULL;
	pid_t pid = 0;
	int ret, status = -1, report_fd = -1;

	ret = unmount_identify(mountpoint, &pid, &image, &report_name);
	if (ret == -ENOTCONN)
		return unmount_dead_mount(mountpoint, out);
	if (ret < 0)
		return -1;
	/* Before the unmount: afterwards the daemon is about to go. */
	report_fd = report_name ? close_report_connect(report_name, pid) : -ENOENT;
	if (report_fd < 0 && report_name)
		ctl_print_error("warning: no close report from qcowfs at %s: %s; the image will be checked instead",
			    report_name, strerror(-report_fd));
	if (unmount_mountpoint(mountpoint) < 0)
		goto out;
	if (report_fd >= 0) {
		close_report_read(report_fd, pid, image, &report);
		report_fd = -1;
	}
	if (wait_for_daemon_exit(pid, image) < 0)
		goto out;
	if (report.received && report.exit_status != 0) {
		ctl_print_error("unmounted %s, but qcowfs reported a failure (exit status %d):",
			    mountpoint, report.exit_status);
		close_report_print(&report);
		goto out;
	}

	/* Problems found are the news here: show them like check does. */
	if (check_unmounted(mountpoint, image, out, &res) < 0)
		goto out;
	if (res.errors || res.leaks) {
		ctl_print_error("unmounted %s, but %s was not closed cleanly: %" PRIu64 " errors, %" PRIu64
			    " leaked clusters", mountpoint, image, res.errors, res.leaks);
		goto out;
	}
	if (report.received)
		fprintf(out, "unmounted %s; %s closed cleanly\n", mountpoint, image);
	else
		fprintf(out, "unmounted %s; qcowfs sent no close report, but %s checks clean\n",
			mountpoint, image);
	status = 0;
out:
	if (report_fd >= 0)
		close(report_fd);
	free(image);
	free(report_name);
	return status;
}
