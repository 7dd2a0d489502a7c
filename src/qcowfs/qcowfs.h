/*
 * qcowfs.h - what the two files of the qcowfs daemon share: the parsed
 * command line (qcowfs_opts.c fills it, qcowfs.c acts on it).
 *
 * Rules:
 *  - qcowfs_opts.c only parses and prints; it opens no file, mounts
 *    nothing and never exits the process, so its parser can be driven by
 *    tests with any argv.
 *  - Every option the user may pass ends up in exactly one place: a field
 *    of struct qcow_open_opts (engine), a field of struct qcowfs_opts
 *    (daemon), or the mount option string handed to libfuse (kernel).
 *    Generic fstab options that mean nothing to a FUSE mount are dropped
 *    on purpose, so `mount -t fuse.qcowfs` and fstab lines work unchanged.
 */
#ifndef QCOWFS_H
#define QCOWFS_H

/* 3.12 is the first libfuse with fuse_loop_cfg_set_max_threads(). */
#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 312
#endif

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/types.h>

#include "qcow.h"

struct qcowfs_opts {
	const char *image;          /* first non-option argument, as given */
	const char *mountpoint;     /* second non-option argument, as given */

	struct qcow_open_opts open; /* engine options (qcow_open_opts_default first) */

	bool foreground;            /* -f: no fork, log to stderr */
	bool debug;                 /* -d: -f plus FUSE request tracing and DEBUG logs */
	bool show_help;             /* -h, --help, -o help */
	bool show_version;          /* -V, --version */

	bool allow_other;           /* other users may access the raw view */
	bool allow_root;            /* root may access it as well as the owner */
	bool has_uid, has_gid;      /* uid=/gid= given: report these as the owner */
	uid_t uid;
	gid_t gid;
	unsigned max_threads;       /* FUSE worker threads, 0 = the daemon's default (qcowfs.c) */

	bool has_fsname, has_subtype; /* the user chose them; do not add ours */
	char *snapshot;             /* snapshot=NAME (owned; open.snapshot points here) */
	char *backing;              /* backing=PATH, absolute (owned; open.backing points here) */
	char *data_file;            /* data_file=PATH, absolute (owned; open.data_file points here) */

	/* Options for libfuse and the kernel (comma separated, commas inside
	 * values escaped for fuse_opt), without the ones the daemon adds
	 * itself (fsname, subtype, default_permissions, ro).  Never NULL after
	 * a successful parse. */
	char *kernel_opts;
};

/* Parses argv (options may come before or after the two paths, as
 * mount.fuse3 puts "-o opts" last).  Returns 0, or -EINVAL with a message
 * naming the offending argument in err.  When show_help or show_version is
 * set the paths may be missing.  Call qcowfs_opts_free afterwards in every
 * case. */
int qcowfs_opts_parse(int argc, char **argv, struct qcowfs_opts *opts,
		      char *err, size_t errlen);
void qcowfs_opts_free(struct qcowfs_opts *opts);

/* The text for -h/--help/-o help: synopsis and every option. */
void qcowfs_print_usage(FILE *out, const char *progname);

/* The text for --version: daemon, engine, libfuse and allocator versions. */
void qcowfs_print_version(FILE *out);

#endif
