/*
 * qcowctl.h - what the files of the qcowctl tool share.
 *
 * The tool is split by concern (see doc/design.md): qcowctl.c holds main,
 * the command table, help and option parsing; ctl_output.c the messages,
 * number formatting and parsing, and the JSON writer; ctl_live.c talking
 * to a live mount and the progress display; ctl_image.c opening an image
 * offline; ctl_loop.c (ctl_loop.h) loop devices for attach/detach; cmd_*.c
 * one command group each.
 *
 * Rules:
 *  - Only what more than one file uses is declared here; everything else
 *    stays static in its file.
 *  - Shared functions carry the ctl_ prefix (the JSON writer keeps json_,
 *    the commands keep cmd_).
 *  - Every message for the user on stderr starts with "qcowctl: ";
 *    ctl_print_error and the usage helpers write that prefix.
 */
#ifndef QCOWCTL_H
#define QCOWCTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "qcow.h"

/* The words for a failed engine (struct qcow_stats: failed), in status and compact. */
#define STATE_FAILED_TEXT "failed: writes refused after an I/O error; unmount and check the image"

/* One entry of the command table (qcowctl.c). */
struct command {
	const char *name;
	int (*run)(const struct command *self, int argc, char **argv);
	const char *synopsis;     /* after "qcowctl " */
	const char *summary;      /* one line for the command list */
	const char *options_help; /* option lines for "qcowctl CMD --help" */
	const char *notes;        /* after the options, or NULL */
};

/* Just enough of a writer for flat and nested objects, indented like
 * qemu-img's --output=json. */
struct json_writer {
	FILE *out;
	int depth;
	bool need_comma;
};

/* On a terminal a bar redrawn in place; in a pipe or log, a line per 10%
 * so that logs stay short. */
struct progress_display {
	bool tty;
	int shown_percent;   /* -1 before the first draw */
};

/* ---- the commands (cmd_*.c), run from the command table ----------------- */

/* create: make a new qcow2 image (cmd_image.c). */
int cmd_create(const struct command *self, int argc, char **argv);
/* check: consistency check with qemu-img check's output and exit codes (cmd_image.c). */
int cmd_check(const struct command *self, int argc, char **argv);
/* info: what qemu-img info shows, or the backing chain (cmd_info.c). */
int cmd_info(const struct command *self, int argc, char **argv);
/* status: live statistics of a mount (cmd_status.c). */
int cmd_status(const struct command *self, int argc, char **argv);
/* compact: shrink an image now, live or offline (cmd_compact.c). */
int cmd_compact(const struct command *self, int argc, char **argv);
/* sparsify: free the clusters that read all zeros, live or offline (cmd_compact.c). */
int cmd_sparsify(const struct command *self, int argc, char **argv);
/* snapshot: create, delete, list, apply internal snapshots (cmd_snapshot.c). */
int cmd_snapshot(const struct command *self, int argc, char **argv);
/* unmount: unmount, wait for the close report, verify the image (cmd_unmount.c). */
int cmd_unmount(const struct command *self, int argc, char **argv);
/* attach: an image as a loop block device, mounting it first if needed (cmd_attach.c). */
int cmd_attach(const struct command *self, int argc, char **argv);
/* detach: undo attach: the loop device, the mount, the mountpoint file (cmd_attach.c). */
int cmd_detach(const struct command *self, int argc, char **argv);
/* unmount's work after its options: 0, or -1 after reporting; out gets its
 * success line and the check's findings (cmd_unmount.c). */
int ctl_unmount_and_check(const char *mountpoint, FILE *out);

/* map: qemu-img map's mapping, or the picture of the image file (cmd_map.c). */
int cmd_map(const struct command *self, int argc, char **argv);

/* ---- the picture of an image file (ctl_picture.c) ------------------------ */

/* Draws pic of target into out: an SVG file, or "-" one character per
 * cell on stdout (coloured on a terminal); 0 or -1 after reporting. */
int ctl_picture_draw(const struct qcow_picture *pic, const char *target, const char *out);

/* ---- option parsing (qcowctl.c) ------------------------------------------ */

/* --data-file PATH of the commands that open an image offline, or NULL. */
extern const char *ctl_opt_data_file;

/* A command-line mistake: prints the reason and the synopsis, returns EXIT_FAILURE. */
int ctl_usage_error(const struct command *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The default of every option switch: 'h' prints the help (EXIT_SUCCESS), else a usage error. */
int ctl_other_option(const struct command *cmd, int opt, char **argv);
/* Options of commands taking only --json and --help: -1 to go on, else the exit status. */
int ctl_parse_json_only(const struct command *self, int argc, char **argv, bool *json);
/* The one positional argument (argv[optind]) into *out: 0, or a usage error's status. */
int ctl_single_operand(const struct command *cmd, int argc, char **argv,
		       const char *what, const char **out);

/* ---- an image opened offline (ctl_image.c) ------------------------------- */

/* Opens image for work in this thread (no recycler, --data-file applied); a failure is reported. */
int ctl_image_open_offline(const char *image, bool read_only, struct qcow_image **img);
/* Closes an image opened so: 0, or a negative errno after reporting it. */
int ctl_image_close_offline(struct qcow_image *img, const char *image);

/* ---- messages and the engine's log (ctl_output.c) ------------------------ */

/* "qcowctl: MESSAGE" on stderr, stdout flushed first to keep the order. */
void ctl_print_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Installs the engine's log sink (stderr, info level); first thing main does. */
void ctl_engine_log_init(void);
/* --verbose: let the engine's debug messages through. */
void ctl_engine_log_verbose(void);
/* bare: engine messages as they are on stream (check's output); else "qcowctl: ..." on stream. */
void ctl_engine_log_route(bool bare, FILE *stream);
/* Before an engine call with an err buffer; hold_errors folds its logged errors into one message. */
void ctl_engine_call_begin(bool hold_errors);
/* After that call: on failure prints "qcowctl: WHAT: REASON" and copies REASON to reason. */
void ctl_engine_call_end_reason(int ret, const char *what, const char *err, char *reason, size_t len);
/* ctl_engine_call_end_reason without wanting the reason back. */
void ctl_engine_call_end(int ret, const char *what, const char *err);
/* Text from the engine or an image on stdout, control bytes shown as '?'. */
void ctl_print_text_safely(const char *text);
/* The same, padded with spaces to width bytes. */
void ctl_print_padded_safely(const char *text, size_t width);

/* ---- numbers (ctl_output.c) ---------------------------------------------- */

/* "1 GiB", "196 KiB", "1.5 MiB": three significant digits. */
void ctl_format_human_size(uint64_t bytes, char *buf, size_t len);
/* "1 GiB (1073741824 bytes)". */
void ctl_format_size_and_bytes(uint64_t bytes, char *buf, size_t len);
/* A whole byte count with an optional K/M/G/T suffix: 0 or -EINVAL/-ERANGE. */
int ctl_parse_size(const char *text, uint64_t *out);
/* Plain decimal, no sign, no suffix: 0 or a negative errno. */
int ctl_parse_unsigned(const char *text, uint64_t *out);
/* v is a power of two (0 is not). */
bool ctl_is_power_of_two(uint64_t v);
/* log2 of a power of two. */
unsigned ctl_log2_exact(uint64_t v);

/* ---- JSON output (ctl_output.c) ------------------------------------------ */

/* Opens an object; key is NULL for the outermost one. */
void json_object_begin(struct json_writer *j, const char *key);
/* Closes an object (a newline after the outermost). */
void json_object_end(struct json_writer *j);
/* "key": unsigned number. */
void json_u64(struct json_writer *j, const char *key, uint64_t value);
/* "key": true/false. */
void json_bool(struct json_writer *j, const char *key, bool value);
/* "key": number with a fraction, locale-independent. */
void json_double(struct json_writer *j, const char *key, double value);
/* "key": string, escaped, invalid UTF-8 replaced. */
void json_string(struct json_writer *j, const char *key, const char *value);
/* Opens an array; key is NULL inside an array. */
void json_array_begin(struct json_writer *j, const char *key);
/* Closes an array. */
void json_array_end(struct json_writer *j);
/* A --json failure on stdout: {key: path, "error": {message, errno name, value}}. */
void json_print_error(const char *key, const char *path, const char *message, int err);

/* ---- a live mount (ctl_live.c) -------------------------------------------- */

/* Milliseconds of CLOCK_MONOTONIC, for timeouts. */
uint64_t ctl_monotonic_ms(void);
/* Sleeps ms milliseconds, resuming after signals. */
void ctl_sleep_ms(unsigned ms);
/* err (positive) from an ioctl means "this file is not a qcowfs view". */
bool ctl_errno_means_not_qcowfs(int err);
/* One qcowfs_ioctl.h ioctl on the view at path opened with access: 0 or a negative errno. */
int ctl_mount_ioctl(const char *path, int access, unsigned long cmd, void *arg);
/* The daemon's status text, NUL-terminated and malloc'ed into *out. */
int ctl_mount_read_status_text(const char *mountpoint, char **out);
/* The status parsed into *st: 0, "not a qcowfs" errors untouched, or -EPROTO. */
int ctl_mount_read_status(const char *mountpoint, struct qcow_stats *st);
/* The value of "key=" in a status text, malloc'ed, or NULL. */
char *ctl_status_value(const char *text, const char *key);
/* The message for a failed status read, naming the path, into buf. */
void ctl_status_error_message(const char *mountpoint, int ret, char *buf, size_t len);
/* Prints that message. */
void ctl_report_status_error(const char *mountpoint, int ret);
/* Target is neither a mount nor an image: "cannot access" when missing, else the status error. */
void ctl_report_target_error(const char *target, int ret);
/* Prints the message for a compaction request the daemon refused. */
void ctl_report_compact_request_error(const char *mountpoint, int ret);
/* The engine's error in a status as text, or NULL when it has none. */
const char *ctl_status_error_text(const struct qcow_stats *st);

/* ---- the mount table (ctl_live.c) ---------------------------------------- */

/* The absolute form of path without looking at path itself (a dead mount answers ENOTCONN). */
int ctl_absolute_path_nofollow(const char *path, char *out, size_t len);
/* The file system type and source of the mount on top of path: 0, or -ENOENT when path is no mount point. */
int ctl_mount_table_lookup(const char *path, char *fstype, size_t fstype_len, char *source, size_t source_len);
/* The qcowfs mount serving image (its mountpoint, the daemon's pid or 0, whether read-only): 0 or -ENOENT. */
int ctl_find_image_mount(const char *image, char *mountpoint, size_t len, long *pid, bool *read_only);
/* A path as one shell word (single-quoted unless harmless), for commands we suggest. */
void ctl_shell_word(const char *path, char *out, size_t len);
/* "IMAGE is mounted at MOUNTPOINT (qcowfs pid N); work through the mount: qcowctl COMMAND MOUNTPOINT",
 * or for a read-only mount, that it must be unmounted first. */
void ctl_report_image_mounted(const char *command, const char *image, const char *mountpoint, long pid,
			      bool read_only);

/* ---- progress display (ctl_live.c) ---------------------------------------- */

/* Before the first draw: a bar on a terminal, lines per 10% otherwise. */
void ctl_progress_init(struct progress_display *p);
/* Shows fraction (0..1) done. */
void ctl_progress_show(struct progress_display *p, double fraction);
/* Ends the display: 100 % only on success. */
void ctl_progress_finish(struct progress_display *p, bool success);
/* The engine's progress callback; opaque is a struct progress_display. */
void ctl_progress_callback(double fraction, void *opaque);

#endif
