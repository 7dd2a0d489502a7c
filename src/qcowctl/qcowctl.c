/*
 * qcowctl.c - the qcowctl command-line tool: main, the command table, help
 * and the option parsing the commands share.
 *
 * The commands live one group per file (cmd_*.c), the shared helpers in
 * ctl_output.c (messages, numbers, JSON) and ctl_live.c (a live mount,
 * progress); qcowctl.h declares what they share.
 *
 *   create    make a new qcow2 image (qcow_create)                  cmd_image.c
 *   info      what "qemu-img info" shows of an image (or its chain)  cmd_info.c
 *   check     full consistency check, like "qemu-img check"          cmd_image.c
 *   status    live statistics of a mount (QCOWFS_IOC_STATUS)         cmd_status.c
 *   compact   shrink an image now: through a live mount, or offline  cmd_compact.c
 *   sparsify  free the clusters that read all zeros: live or offline cmd_compact.c
 *   snapshot  internal snapshots: create, delete, list, apply        cmd_snapshot.c
 *   unmount   unmount, wait for the daemon's close report, verify    cmd_unmount.c
 *   attach    an image as a loop block device (mounting it first)    cmd_attach.c
 *   detach    undo attach: loop device, mount, mountpoint file       cmd_attach.c
 *   map       qemu-img map's mapping, or a picture of the image file cmd_map.c
 *
 * Rules (for the whole tool):
 *  - Talks to a running daemon only through the ioctls of
 *    qcowfs_ioctl.h on the view (status through a descriptor opened for
 *    reading, compact through one opened for writing: the daemon checks
 *    the access mode) and, for unmount, the daemon's close report socket
 *    named in the status; qcowctl never needs to know how the daemon is
 *    built or where it logs.
 *  - Never reports success the engine did not report: a compaction that
 *    failed (compactions_failed went up, or the engine returned an error)
 *    exits 1 and never prints 100 %; unmount prints what the daemon said
 *    about its close and exits 1 when the daemon's close failed.
 *  - Every message for the user on stderr starts with "qcowctl: " and names
 *    the argument or the operation that failed.
 *  - Exit status: 0 success, 1 failure or usage error; check uses qemu-img's
 *    codes (0 clean, 1 could not run, 2 corruptions, 3 leaks only) so that
 *    scripts written for "qemu-img check" keep working.
 *  - Numbers go out locale-independent (the tool never calls setlocale),
 *    JSON goes to stdout pretty-printed like qemu-img's --output=json.
 *  - A --json command that fails still prints one JSON object on stdout
 *    (json_print_error: the message and the errno's name), so that a
 *    script parsing stdout gets an answer; the exit status is unchanged.
 *  - A new command goes into its group's cmd_*.c (or a new one), its entry
 *    into the table below, its prototype into qcowctl.h.
 */
/* config.h (PACKAGE_VERSION, _GNU_SOURCE) is forced into every compile by
 * Makefile.am's -include, so it is not included here a second time. */

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"
#include "qcowctl.h"

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "unknown"
#endif

/* ---- option parsing the commands share ----------------------------------- */

/* "qcowctl CMD --help": synopsis, summary, options, notes. */
static void print_command_help(const struct command *cmd, FILE *out)
{
	fprintf(out, "Usage: qcowctl %s\n%c%s.\n", cmd->synopsis,
		toupper((unsigned char)cmd->summary[0]), cmd->summary + 1);
	fprintf(out, "\nOptions:\n%s", cmd->options_help);
	fprintf(out, "  -h, --help               show this help\n");
	if (cmd->notes)
		fprintf(out, "\n%s", cmd->notes);
}

/* For every mistake on the command line: the reason, the synopsis, exit 1. */
int ctl_usage_error(const struct command *cmd, const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "qcowctl: %s: ", cmd->name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nUsage: qcowctl %s\nTry 'qcowctl %s --help' for more information.\n",
		cmd->synopsis, cmd->name);
	return EXIT_FAILURE;
}

/* getopt_long returned '?' or ':' (the option strings start with ':'). */
static int bad_option(const struct command *cmd, int opt, char **argv)
{
	const char *typed = argv[optind - 1];
	char short_name[3] = { '-', (char)optopt, '\0' };

	/* For a short option inside a cluster ("-xs") optopt is the culprit;
	 * for long options optopt is 0 or our internal value, so show what
	 * was typed. */
	if (optopt > ' ' && optopt < 127 && strncmp(typed, "--", 2) != 0)
		typed = short_name;
	if (opt == ':')
		return ctl_usage_error(cmd, "option '%s' needs an argument", typed);
	return ctl_usage_error(cmd, "unknown option '%s'", typed);
}

/* The end of every command's option switch: -h/--help prints the
 * command's help (exit 0), anything else is a usage error. */
int ctl_other_option(const struct command *cmd, int opt, char **argv)
{
	if (opt == 'h') {
		print_command_help(cmd, stdout);
		return EXIT_SUCCESS;
	}
	return bad_option(cmd, opt, argv);
}

/* Options of the commands that take only --json and --help (info, check).
 * Returns -1 to go on, or the exit status to return: EXIT_SUCCESS after
 * --help, a usage error's status otherwise. */
int ctl_parse_json_only(const struct command *self, int argc, char **argv, bool *json)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int opt;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'j':
			*json = true;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	return -1;
}

/* The one positional argument every command takes. */
int ctl_single_operand(const struct command *cmd, int argc, char **argv,
			  const char *what, const char **out)
{
	if (argc - optind < 1)
		return ctl_usage_error(cmd, "missing %s", what);
	if (argc - optind > 1)
		return ctl_usage_error(cmd, "unexpected argument '%s'", argv[optind + 1]);
	*out = argv[optind];
	return 0;
}

/* --data-file PATH of the commands that open an image offline: the
 * external data file to use instead of the name the image records */
const char *ctl_opt_data_file;

/* ---- help and the command table ------------------------------------------ */

static int cmd_help(const struct command *self, int argc, char **argv);

static const struct command commands[] = {
	{ "create", cmd_create,
	  "create [-s SIZE] [-c CLUSTER_SIZE] [--compat 0.10|1.1] [--refcount-bits N] IMAGE",
	  "create a new qcow2 image",
	  "  -s, --size SIZE          virtual size: bytes, or with a K, M, G or T suffix\n"
	  "                           (powers of 1024); default 8G\n"
	  "  -c, --cluster-size SIZE  a power of two from 512 to 2M; default 64K\n"
	  "      --compat 0.10|1.1    qcow2 version 2 or 3; default 1.1\n"
	  "      --refcount-bits N    1, 2, 4, 8, 16, 32 or 64; default 16 (compat 0.10: 16 only)\n",
	  NULL },
	{ "info", cmd_info, "info [--json] [--backing-chain] IMAGE",
	  "show what qemu-img info shows about an image",
	  "      --json               print a JSON object (qemu-img info --output=json's keys)\n"
	  "      --backing-chain      every image of the backing chain, top first\n"
	  "                           (with --json: an array)\n",
	  "Reads the headers only and takes no lock, so it also works on an image in\n"
	  "use, and on images qcowfs refuses to mount (encrypted, marked corrupt).\n" },
	{ "check", cmd_check, "check [--json] IMAGE",
	  "check an image for errors and leaks (like qemu-img check)",
	  "      --json               print a JSON object (also when the check cannot run:\n"
	  "                           {\"error\": {\"message\", \"errno\", \"errno-value\"}})\n",
	  "Exit status: 0 clean, 1 the check could not run, 2 corruptions found,\n"
	  "3 leaked clusters only (as qemu-img check).\n" },
	{ "status", cmd_status, "status [--json|--raw|--prometheus|--watch [--interval S]] MOUNTPOINT",
	  "show the live statistics of a qcowfs mount",
	  "      --json               print a JSON object\n"
	  "      --raw                print the daemon's key=value lines as they are (for scripts)\n"
	  "      --prometheus         print the Prometheus text exposition format (qcowfs_*)\n"
	  "      --watch              refresh until Ctrl-C or until the mount goes away, with a\n"
	  "                           progress line while a compaction runs\n"
	  "      --interval S         seconds between refreshes of --watch (default 2)\n",
	  "--prometheus writes a file for node_exporter's textfile collector, e.g.\n"
	  "  qcowctl status --prometheus /mnt/disk.raw > /var/lib/node_exporter/qcowfs.prom.tmp &&\n"
	  "  mv /var/lib/node_exporter/qcowfs.prom.tmp /var/lib/node_exporter/qcowfs.prom\n" },
	{ "compact", cmd_compact, "compact [--no-wait] [--data-file PATH] MOUNTPOINT|IMAGE",
	  "shrink an image file now, through its live mount or offline",
	  "      --no-wait            on a mountpoint: request the compaction and return at once\n"
	  "      --data-file PATH     offline: the image's external data file, instead of the\n"
	  "                           name the image records\n",
	  "On a mountpoint (needs write permission on it), asks the running qcowfs to\n"
	  "compact and follows its progress.  On an image that is not in use, compacts\n"
	  "it in place.  At the end it says how many clusters (and compressed streams)\n"
	  "moved and the file size before -> after, and, when the file stays above the\n"
	  "smallest size the engine could reach, what holds it there (a persistent\n"
	  "bitmap, a snapshot mounted by another process, ...).\n"
	  "An image file that a qcowfs mount serves is not opened: the message names\n"
	  "the mountpoint (and the daemon's pid) to use instead.\n"
	  "Exit status: 0 when the compaction worked, 1 when it failed (the engine\n"
	  "counted a failed compaction or returned an error; 100% is never shown then).\n" },
	{ "sparsify", cmd_sparsify, "sparsify MOUNTPOINT|IMAGE",
	  "free every cluster that reads all zeros, through a live mount or offline",
	  "",
	  "Scans every allocated data cluster of the image and frees those that read\n"
	  "all zeros (space a guest zero-filled instead of discarding), while the view\n"
	  "stays in use; a cluster that a write changes meanwhile is never freed.\n"
	  "Clusters shared with a snapshot and compressed clusters are left (the\n"
	  "summary counts them).  On a mountpoint (needs write permission on it) the\n"
	  "running qcowfs does it and compaction then shortens the file in the\n"
	  "background; on an image that is not in use, it is sparsified and compacted\n"
	  "in place.  Prints progress, then the clusters scanned and freed and the\n"
	  "bytes given back.\n"
	  "Exit status: 0 when the sparsify ran to the end, 1 otherwise.\n" },
	{ "snapshot", cmd_snapshot, "snapshot create|delete|apply [--force] NAME MOUNTPOINT|IMAGE | snapshot list MOUNTPOINT|IMAGE",
	  "create, delete, list or apply internal snapshots, live or offline",
	  "  -f, --force              apply on a live mount (it changes the disk under its users)\n",
	  "Internal snapshots, as qemu-img snapshot -c/-d/-l/-a makes and reads them (VM\n"
	  "state size 0).  NAME is looked up as an id first, then as a name.  On a\n"
	  "mountpoint the running qcowfs does it between requests (write permission\n"
	  "needed, read permission for list); a new snapshot holds everything written\n"
	  "before the command.  On an image that is not in use it is done in place.\n"
	  "apply on a mountpoint is refused without --force; with it, the view shows the\n"
	  "snapshot at once and the kernel's cached pages of it are dropped.  delete and\n"
	  "apply are refused while another process has a snapshot of the image mounted\n"
	  "read-only (qcowfs -o snapshot=NAME).\n" },
	{ "unmount", cmd_unmount, "unmount MOUNTPOINT",
	  "unmount, wait for qcowfs to close the image, and check it",
	  "",
	  "Before unmounting, connects to the daemon's close report (a socket named in\n"
	  "the status); after the close the daemon sends its exit status and messages,\n"
	  "which are printed when the close failed.  Then the image is checked.\n"
	  "A mount whose daemon is dead (\"Transport endpoint is not connected\") is\n"
	  "unmounted here (fusermount3 -u, or a lazy unmount when that fails) and its\n"
	  "image, found in the mount table, is checked.\n"
	  "Exit status: 0 when qcowfs closed the image cleanly and the check is clean\n"
	  "(or, from a qcowfs without a report, the check alone is clean; after a dead\n"
	  "daemon, the check found no errors); 1 otherwise.\n" },
	{ "attach", cmd_attach,
	  "attach [-o QCOWFS_OPTIONS] [--read-only] [--buffered] [--json] IMAGE [MOUNTPOINT]",
	  "an image as a block device with partitions: mount it, set up a loop device",
	  "  -o QCOWFS_OPTIONS        options for qcowfs when attach mounts the image\n"
	  "      --read-only          a read-only mount and loop device\n"
	  "      --buffered           a loop device through the page cache (default: direct I/O)\n"
	  "      --json               print {device, partitions, mountpoint, image}\n",
	  "Mounts IMAGE with qcowfs at MOUNTPOINT (default IMAGE.raw) unless it is\n"
	  "mounted already, then sets up a free loop device over the view with partition\n"
	  "scanning; discards on it free the image's clusters.  Makes the device nodes\n"
	  "where no udev does.  Prints the device, then one line per partition.\n"
	  "Needs root.  'qcowctl detach' undoes it.\n" },
	{ "detach", cmd_detach, "detach DEVICE|MOUNTPOINT|IMAGE",
	  "undo attach: detach the loop device, unmount, check the image",
	  "",
	  "Refuses while the device or one of its partitions is mounted (naming it) or\n"
	  "held by another kernel user.  Otherwise detaches every loop device over the\n"
	  "view, unmounts it as 'qcowctl unmount' does (waits for the clean close and\n"
	  "checks the image), and removes the mountpoint file if attach created it\n"
	  "(attach keeps that in /run/qcowfs/attach/loopN).\n"
	  "Exit status: 0 when all of that succeeded, 1 otherwise.\n" },
	{ "map", cmd_map, "map [--output=human|json] [--picture FILE.svg|-] [--data-file PATH] IMAGE|MOUNTPOINT",
	  "show where the guest's data lives in the image, or draw the image file",
	  "      --output=FORMAT      human (default) or json: qemu-img map's formats\n"
	  "      --picture FILE       draw the image file as a grid of cells coloured by\n"
	  "                           what they hold, into FILE (SVG); '-': one character\n"
	  "                           per cell on stdout, in colour on a terminal\n"
	  "      --data-file PATH     the image's external data file, instead of the name\n"
	  "                           the image records\n",
	  "The mapping is qemu-img map's: guest ranges merged by depth in the backing\n"
	  "chain, present/zero/data/compressed and the host offset (the JSON also has\n"
	  "\"compressed\", as QEMU 8.2 prints it).  On a mountpoint the mapping is read\n"
	  "from the image file without locks (as qemu-img map -U): what the daemon has\n"
	  "flushed.  The picture of a mountpoint is the daemon's live cluster map, so\n"
	  "running it again during a compaction shows the tail emptying.  At most 4096\n"
	  "cells (64 per row); a cell shows the kind most of its clusters hold.\n" },
	{ "help", cmd_help, "help [COMMAND]",
	  "show the help of qcowctl or of one command",
	  "", NULL },
};

#define COMMAND_COUNT (sizeof(commands) / sizeof(commands[0]))

static const struct command *command_find(const char *name)
{
	for (size_t i = 0; i < COMMAND_COUNT; i++)
		if (strcmp(commands[i].name, name) == 0)
			return &commands[i];
	return NULL;
}

static void print_global_usage(FILE *out)
{
	fprintf(out, "Usage: qcowctl COMMAND [options] ARGS\n"
		     "       qcowctl --help | --version\n"
		     "Manage qcow2 images and qcowfs mounts.\n\nCommands:\n");
	for (size_t i = 0; i < COMMAND_COUNT; i++)
		fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
	fprintf(out, "\nGlobal options (before COMMAND):\n"
		     "  -h, --help      show this help\n"
		     "  -V, --version   show the versions of qcowctl and libqcow\n"
		     "  -v, --verbose   also show the engine's debug messages\n"
		     "Run 'qcowctl COMMAND --help' for the options of a command.\n");
}

static int cmd_help(const struct command *self, int argc, char **argv)
{
	const struct command *cmd;

	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
		print_global_usage(stdout);
		return EXIT_SUCCESS;
	}
	if (argc > 2)
		return ctl_usage_error(self, "unexpected argument '%s'", argv[2]);
	cmd = command_find(argv[1]);
	if (!cmd)
		return ctl_usage_error(self, "unknown command '%s'", argv[1]);
	print_command_help(cmd, stdout);
	return EXIT_SUCCESS;
}

static void print_version(void)
{
	printf("qcowctl %s\nlibqcow %s\nallocator %s\n", PACKAGE_VERSION, qcow_version(),
	       qcow_allocator_version());
}

int main(int argc, char **argv)
{
	const struct command *cmd;
	int first = 1;

	ctl_engine_log_init();

	for (; first < argc && argv[first][0] == '-'; first++) {
		const char *arg = argv[first];

		if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
			print_global_usage(stdout);
			return EXIT_SUCCESS;
		} else if (strcmp(arg, "--version") == 0 || strcmp(arg, "-V") == 0) {
			print_version();
			return EXIT_SUCCESS;
		} else if (strcmp(arg, "--verbose") == 0 || strcmp(arg, "-v") == 0) {
			ctl_engine_log_verbose();
		} else {
			fprintf(stderr, "qcowctl: unknown option '%s'\n", arg);
			print_global_usage(stderr);
			return EXIT_FAILURE;
		}
	}
	if (first >= argc) {
		fprintf(stderr, "qcowctl: missing COMMAND\n");
		print_global_usage(stderr);
		return EXIT_FAILURE;
	}
	cmd = command_find(argv[first]);
	if (!cmd) {
		fprintf(stderr, "qcowctl: unknown command '%s'\n", argv[first]);
		print_global_usage(stderr);
		return EXIT_FAILURE;
	}
	/* The command sees itself as argv[0], so getopt starts at its options. */
	return cmd->run(cmd, argc - first, argv + first);
}
