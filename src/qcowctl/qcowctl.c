/*
 * qcowctl.c - the qcowctl command-line tool.
 *
 * Owns the user-facing commands around libqcow and a running qcowfs:
 *
 *   create    make a new qcow2 image (qcow_create)
 *   info      what "qemu-img info" shows of an image (or of its backing chain)
 *   check     full consistency check, output and exit codes like "qemu-img check"
 *   status    live statistics of a mount, read with the QCOWFS_IOC_STATUS ioctl
 *   compact   shrink an image now: through a live mount, or offline
 *   snapshot  internal snapshots: create, delete, list, apply (live or offline)
 *   sparsify  free the clusters that read all zeros: through a live mount, or offline
 *   unmount   unmount, wait for the daemon's close report, verify the image
 *
 * Rules:
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
 */
/* config.h (PACKAGE_VERSION, _GNU_SOURCE) is forced into every compile by
 * Makefile.am's -include, so it is not included here a second time. */

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/ioctl.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "qcow.h"
#include "qcowfs_ioctl.h"

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "unknown"
#endif

/* The daemon's side of the channel; names shared with src/qcowfs. */

#define DEFAULT_VIRTUAL_SIZE (8ULL << 30)

/* qemu-img check's exit codes. */
enum check_exit {
	CHECK_EXIT_CLEAN = 0,
	CHECK_EXIT_FAILED = 1,
	CHECK_EXIT_CORRUPT = 2,
	CHECK_EXIT_LEAKS = 3,
};

/* Polling a live mount: often enough that a progress bar moves smoothly,
 * rarely enough that the daemon does not notice us. */
#define STATUS_POLL_MS 200
/* A compaction request that the daemon never reports as started nor as
 * finished within this long found nothing to do (or was merged into a
 * pass that ended between two polls): stop waiting, without complaint. */
#define COMPACT_PICKUP_GRACE_MS 5000
/* Closing an image flushes and writes exact refcounts, which can take a
 * while on a large, busy image; give up only after this long. */
#define UNMOUNT_WAIT_MS (600 * 1000)

struct command {
	const char *name;
	int (*run)(const struct command *self, int argc, char **argv);
	const char *synopsis;     /* after "qcowctl " */
	const char *summary;      /* one line for the command list */
	const char *options_help; /* option lines for "qcowctl CMD --help" */
	const char *notes;        /* after the options, or NULL */
};

/* ---- messages ----------------------------------------------------------- */

static void print_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void print_error(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);   /* keep stdout and stderr in order on a terminal */
	fputs("qcowctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

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
static int usage_error(const struct command *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int usage_error(const struct command *cmd, const char *fmt, ...)
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
		return usage_error(cmd, "option '%s' needs an argument", typed);
	return usage_error(cmd, "unknown option '%s'", typed);
}

/* Options of the commands that take only --json and --help (info, check).
 * Returns -1 to go on, or the exit status to return: EXIT_SUCCESS after
 * --help, a usage error's status otherwise. */
static int parse_json_only(const struct command *self, int argc, char **argv, bool *json)
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
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	return -1;
}

/* The one positional argument every command takes. */
static int single_operand(const struct command *cmd, int argc, char **argv,
			  const char *what, const char **out)
{
	if (argc - optind < 1)
		return usage_error(cmd, "missing %s", what);
	if (argc - optind > 1)
		return usage_error(cmd, "unexpected argument '%s'", argv[optind + 1]);
	*out = argv[optind];
	return 0;
}

/*
 * Where libqcow's messages go.  The library's sink is process-wide and the
 * recycler thread may log at any moment, so this is the one piece of global
 * mutable state here, with its own lock.
 *
 * open, create, info and check return their failure reason in an err
 * buffer *and* log it; during those calls errors are held back (the last
 * one kept) so that the user sees one line naming the operation, not the
 * same reason twice.
 */
struct engine_log {
	pthread_mutex_t lock;
	FILE *stream;          /* stdout while check output is the product, else stderr */
	bool bare;             /* check problems print as they are, one per line */
	bool hold_errors;      /* inside a call that reports through an err buffer */
	enum qcow_log_level max_level;
	char last_error[1024]; /* held back, or already printed if !hold_errors */
};

static struct engine_log engine_log = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.max_level = QCOW_LOG_INFO,
};

static void engine_log_sink(enum qcow_log_level level, const char *msg, void *opaque)
{
	struct engine_log *log = opaque;
	static const char *const level_prefix[] = {
		[QCOW_LOG_ERROR] = "",
		[QCOW_LOG_WARNING] = "warning: ",
		[QCOW_LOG_INFO] = "",
		[QCOW_LOG_DEBUG] = "debug: ",
	};

	if (level > log->max_level)
		return;
	pthread_mutex_lock(&log->lock);
	if (level == QCOW_LOG_ERROR)
		snprintf(log->last_error, sizeof(log->last_error), "%s", msg);
	if (level == QCOW_LOG_ERROR && log->hold_errors) {
		/* printed, or folded into the failure message, by engine_call_end */
	} else if (log->bare) {
		fprintf(log->stream, "%s\n", msg);
	} else {
		fflush(stdout);
		fprintf(log->stream, "qcowctl: %s%s\n",
			(unsigned)level < sizeof(level_prefix) / sizeof(level_prefix[0]) ? level_prefix[level] : "",
			msg);
	}
	pthread_mutex_unlock(&log->lock);
}

/* bare: print to stdout without a prefix (the problems check finds are its
 * output, like qemu-img check); otherwise "qcowctl: ..." on stderr. */
static void engine_log_route(bool bare, FILE *stream)
{
	pthread_mutex_lock(&engine_log.lock);
	engine_log.bare = bare;
	engine_log.stream = stream;
	pthread_mutex_unlock(&engine_log.lock);
}

/* Around an engine call that fills an err buffer (see struct engine_log).
 * check passes hold_errors = false: the errors it logs are the problems it
 * found, its output. */
static void engine_call_begin(bool hold_errors)
{
	pthread_mutex_lock(&engine_log.lock);
	engine_log.hold_errors = hold_errors;
	engine_log.last_error[0] = '\0';
	pthread_mutex_unlock(&engine_log.lock);
}

/*
 * Ends the call.  On failure prints "qcowctl: WHAT: REASON", REASON being
 * the err buffer, else the last error logged, else strerror; an error the
 * sink already printed verbatim is not repeated.  An error held back from a
 * call that then succeeded is still news, so it is shown on its own.
 * reason (if len > 0) receives "WHAT: REASON" on failure, for the JSON
 * error object of --json.
 */
static void engine_call_end_reason(int ret, const char *what, const char *err, char *reason, size_t len)
{
	char last[sizeof(engine_log.last_error)];
	bool held;

	pthread_mutex_lock(&engine_log.lock);
	held = engine_log.hold_errors;
	engine_log.hold_errors = false;
	memcpy(last, engine_log.last_error, sizeof(last));
	engine_log.last_error[0] = '\0';
	pthread_mutex_unlock(&engine_log.lock);

	if (ret >= 0) {
		if (held && last[0])
			print_error("%s", last);
		return;
	}
	if (!err || !err[0])
		err = held ? last : "";
	if (err[0] && !(!held && strcmp(err, last) == 0))
		print_error("%s: %s", what, err);
	else
		print_error("%s: %s", what, strerror(-ret));
	if (len)
		snprintf(reason, len, "%s: %s", what, err[0] ? err : strerror(-ret));
}

static void engine_call_end(int ret, const char *what, const char *err)
{
	engine_call_end_reason(ret, what, err, NULL, 0);
}

/* Text from the engine or an image (the blocker, snapshot names) on a
 * terminal: control bytes become '?' so that a hostile image cannot drive
 * the terminal through them. */
static void print_text_safely(const char *text)
{
	for (const unsigned char *p = (const unsigned char *)text; *p; p++)
		putchar(*p < 0x20 || *p == 0x7f ? '?' : *p);
}

/* The same, padded with spaces to width columns (bytes, as printf's %-Ns). */
static void print_padded_safely(const char *text, size_t width)
{
	size_t len = strlen(text);

	print_text_safely(text);
	if (len < width)
		printf("%*s", (int)(width - len), "");
}

/* ---- numbers ------------------------------------------------------------ */

/* "1 GiB", "196 KiB", "1.5 MiB": three significant digits, never "1e+03". */
static void format_human_size(uint64_t bytes, char *buf, size_t len)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	double value = (double)bytes;
	unsigned unit = 0;

	/* Switch units before 1000, not 1024, so the number never needs four
	 * digits; 999.5 would round to "1e+03" with %.3g. */
	while (value >= 999.5 && unit + 1 < sizeof(units) / sizeof(units[0])) {
		value /= 1024.0;
		unit++;
	}
	snprintf(buf, len, "%.3g %s", value, units[unit]);
}

/* "1 GiB (1073741824 bytes)" */
static void format_size_and_bytes(uint64_t bytes, char *buf, size_t len)
{
	char human[32];

	format_human_size(bytes, human, sizeof(human));
	snprintf(buf, len, "%s (%" PRIu64 " bytes)", human, bytes);
}

/*
 * A byte count: decimal digits with an optional binary suffix K, M, G or T
 * (also KiB/KB and lower case).  Whole numbers only: "1.5G" is refused
 * rather than rounded, the user can write 1536M.
 */
static int parse_size(const char *text, uint64_t *out)
{
	static const char suffixes[] = "KMGT";
	const char *p = text;
	uint64_t value = 0;
	unsigned shift = 0;

	if (*p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		unsigned digit = (unsigned)(*p - '0');
		if (value > (UINT64_MAX - digit) / 10)
			return -ERANGE;
		value = value * 10 + digit;
	}
	if (*p) {
		const char *s = strchr(suffixes, *p >= 'a' && *p <= 'z' ? *p - 'a' + 'A' : *p);
		if (!s || !*s)
			return -EINVAL;
		shift = 10 * (unsigned)(s - suffixes + 1);
		p++;
		if (strcmp(p, "iB") == 0 || strcmp(p, "B") == 0 || strcmp(p, "b") == 0)
			p += strlen(p);
		if (*p)
			return -EINVAL;
	}
	if (shift && value > (UINT64_MAX >> shift))
		return -ERANGE;
	*out = value << shift;
	return 0;
}

/* Plain decimal, no sign, no suffix. */
static int parse_unsigned(const char *text, uint64_t *out)
{
	char *end;
	unsigned long long value;

	if (*text < '0' || *text > '9')
		return -EINVAL;
	errno = 0;
	value = strtoull(text, &end, 10);
	if (errno || *end)
		return -EINVAL;
	*out = value;
	return 0;
}

static bool is_power_of_two(uint64_t v)
{
	return v && !(v & (v - 1));
}

static unsigned log2_exact(uint64_t v)
{
	unsigned bits = 0;

	while (v > 1) {
		v >>= 1;
		bits++;
	}
	return bits;
}

static uint64_t monotonic_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* ---- JSON output ---------------------------------------------------------- */

/* Just enough of a writer for flat and nested objects, indented like
 * qemu-img's --output=json. */
struct json_writer {
	FILE *out;
	int depth;
	bool need_comma;
};

/* JSON wants valid UTF-8; file names are arbitrary bytes.  Valid sequences
 * pass through, each invalid byte becomes U+FFFD. */
static size_t utf8_sequence_length(const unsigned char *s)
{
	size_t len;
	uint32_t cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		len = 2, cp = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		len = 3, cp = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		len = 4, cp = s[0] & 0x07;
	else
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	/* Overlong forms, UTF-16 surrogates and past U+10FFFF are invalid. */
	if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return len;
}

static void json_write_string(FILE *out, const char *text)
{
	const unsigned char *s = (const unsigned char *)text;

	fputc('"', out);
	while (*s) {
		size_t len;

		switch (*s) {
		case '"':  fputs("\\\"", out); s++; continue;
		case '\\': fputs("\\\\", out); s++; continue;
		case '\b': fputs("\\b", out); s++; continue;
		case '\f': fputs("\\f", out); s++; continue;
		case '\n': fputs("\\n", out); s++; continue;
		case '\r': fputs("\\r", out); s++; continue;
		case '\t': fputs("\\t", out); s++; continue;
		}
		if (*s < 0x20) {
			fprintf(out, "\\u%04x", *s);
			s++;
			continue;
		}
		len = utf8_sequence_length(s);
		if (len == 0) {
			fputs("\\ufffd", out);
			s++;
			continue;
		}
		fwrite(s, 1, len, out);
		s += len;
	}
	fputc('"', out);
}

static void json_member_start(struct json_writer *j, const char *key)
{
	if (j->need_comma)
		fputc(',', j->out);
	if (j->depth > 0)
		fprintf(j->out, "\n%*s", 4 * j->depth, "");
	if (key) {
		json_write_string(j->out, key);
		fputs(": ", j->out);
	}
	j->need_comma = true;
}

/* key is NULL for the outermost object. */
static void json_object_begin(struct json_writer *j, const char *key)
{
	json_member_start(j, key);
	fputc('{', j->out);
	j->depth++;
	j->need_comma = false;
}

static void json_object_end(struct json_writer *j)
{
	j->depth--;
	fprintf(j->out, "\n%*s}", 4 * j->depth, "");
	j->need_comma = true;
	if (j->depth == 0)
		fputc('\n', j->out);
}

static void json_u64(struct json_writer *j, const char *key, uint64_t value)
{
	json_member_start(j, key);
	fprintf(j->out, "%" PRIu64, value);
}

static void json_bool(struct json_writer *j, const char *key, bool value)
{
	json_member_start(j, key);
	fputs(value ? "true" : "false", j->out);
}

static void json_double(struct json_writer *j, const char *key, double value)
{
	json_member_start(j, key);
	if (isfinite(value))
		fprintf(j->out, "%.6f", value);
	else
		fputs("null", j->out);   /* JSON has no NaN */
}

static void json_string(struct json_writer *j, const char *key, const char *value)
{
	json_member_start(j, key);
	json_write_string(j->out, value);
}

static void json_array_begin(struct json_writer *j, const char *key)
{
	json_member_start(j, key);
	fputc('[', j->out);
	j->depth++;
	j->need_comma = false;
}

static void json_array_end(struct json_writer *j)
{
	j->depth--;
	fprintf(j->out, "\n%*s]", 4 * j->depth, "");
	j->need_comma = true;
	if (j->depth == 0)
		fputc('\n', j->out);
}

/* The symbolic name of an errno for JSON error objects ("ENOTSUP"), which
 * scripts can test without parsing a translated message. */
static const char *errno_name(int err)
{
	static const struct { int value; const char *name; } names[] = {
		{ EPERM, "EPERM" }, { ENOENT, "ENOENT" }, { EIO, "EIO" }, { ENXIO, "ENXIO" },
		{ EBADF, "EBADF" }, { EAGAIN, "EAGAIN" }, { ENOMEM, "ENOMEM" }, { EACCES, "EACCES" },
		{ EBUSY, "EBUSY" }, { EEXIST, "EEXIST" }, { ENODEV, "ENODEV" }, { ENOTDIR, "ENOTDIR" },
		{ EISDIR, "EISDIR" }, { EINVAL, "EINVAL" }, { ENOTTY, "ENOTTY" }, { EFBIG, "EFBIG" },
		{ ENOSPC, "ENOSPC" }, { EROFS, "EROFS" }, { ERANGE, "ERANGE" }, { ENAMETOOLONG, "ENAMETOOLONG" },
		{ ENOSYS, "ENOSYS" }, { ELOOP, "ELOOP" }, { ENODATA, "ENODATA" }, { EPROTO, "EPROTO" },
		{ EOVERFLOW, "EOVERFLOW" }, { ENOTSUP, "ENOTSUP" }, { ENOTCONN, "ENOTCONN" },
		{ ETIMEDOUT, "ETIMEDOUT" }, { ECANCELED, "ECANCELED" }, { EOPNOTSUPP, "EOPNOTSUPP" },
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (names[i].value == err)
			return names[i].name;
	return "EUNKNOWN";
}

/* ---- talking to a live mount ------------------------------------------- */

/* ENOTTY: a file that knows no such ioctl (not a qcowfs mount); EINVAL,
 * ENOSYS: file systems that refuse unknown ioctls that way. */
static bool errno_means_not_qcowfs(int err)
{
	return err == ENOTTY || err == EINVAL || err == ENOSYS || err == ENODATA || err == ENOTSUP || err == EOPNOTSUPP;
}

/* Sends one control ioctl (qcowfs_ioctl.h) to the raw view at path
 * through a descriptor opened with access (O_RDONLY for the status,
 * O_RDWR for a compaction: the daemon checks).  Returns 0 or a negative
 * errno. */
static int mount_ioctl(const char *path, int access, unsigned long cmd, void *arg)
{
	int fd = open(path, access | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	int ret = ioctl(fd, cmd, arg) < 0 ? -errno : 0;
	close(fd);
	return ret;
}

/* The daemon's status text (NUL-terminated, malloc'ed). */
static int mount_read_status_text(const char *mountpoint, char **out)
{
	struct qcowfs_status_text *st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	int ret = mount_ioctl(mountpoint, O_RDONLY, QCOWFS_IOC_STATUS, st);
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
static int mount_read_status(const char *mountpoint, struct qcow_stats *st)
{
	char *text;
	int ret = mount_read_status_text(mountpoint, &text);

	if (ret < 0)
		return ret;
	ret = qcow_stats_parse(text, st);
	free(text);
	return ret < 0 ? -EPROTO : 0;
}

/* The value of "key=" in a status text, malloc'ed, or NULL. */
static char *status_value(const char *text, const char *key)
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
static void status_error_message(const char *mountpoint, int ret, char *buf, size_t len)
{
	if (errno_means_not_qcowfs(-ret))
		snprintf(buf, len, "%s is not a qcowfs mount", mountpoint);
	else if (ret == -ENOTCONN)
		snprintf(buf, len, "%s: the qcowfs daemon is gone (killed or crashed); "
			 "'fusermount3 -u %s' detaches the dead mount", mountpoint, mountpoint);
	else if (ret == -EPROTO)
		snprintf(buf, len, "%s: the status from qcowfs could not be parsed (qcowctl and qcowfs versions differ?)",
			 mountpoint);
	else if (ret == -EACCES)
		snprintf(buf, len, "cannot read the status of %s: %s (it needs read permission on the view)",
			 mountpoint, strerror(EACCES));
	else
		snprintf(buf, len, "cannot read the status of %s: %s", mountpoint, strerror(-ret));
}

static void report_status_error(const char *mountpoint, int ret)
{
	char msg[2 * PATH_MAX + 256];

	status_error_message(mountpoint, ret, msg, sizeof(msg));
	print_error("%s", msg);
}

/* The message for a compaction request the daemon refused. */
static void report_compact_request_error(const char *mountpoint, int ret)
{
	if (ret == -EACCES || ret == -EBADF || ret == -EPERM)
		print_error("cannot request a compaction on %s: %s (it needs write permission on the view)",
			    mountpoint, strerror(-ret));
	else
		print_error("cannot request a compaction on %s: %s", mountpoint, strerror(-ret));
}

/* ---- progress display --------------------------------------------------- */

/* On a terminal a bar redrawn in place; in a pipe or log, a line per 10%
 * so that logs stay short. */
struct progress_display {
	bool tty;
	int shown_percent;   /* -1 before the first draw */
};

#define PROGRESS_BAR_WIDTH 40
#define PROGRESS_BAR_FULL "########################################"
_Static_assert(sizeof(PROGRESS_BAR_FULL) - 1 == PROGRESS_BAR_WIDTH, "bar text must fill the bar");

static void progress_init(struct progress_display *p)
{
	p->tty = isatty(STDOUT_FILENO);
	p->shown_percent = -1;
}

static void progress_show(struct progress_display *p, double fraction)
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
		/* 100% is progress_finish's line, so that it appears once
		 * and only when the run really succeeded. */
		if (percent < 100) {
			printf("compacting: %d%%\n", percent);
			fflush(stdout);
		}
		p->shown_percent = percent;
	}
}

static void progress_finish(struct progress_display *p, bool success)
{
	if (success) {
		if (p->tty) {
			progress_show(p, 1.0);
		} else {
			printf("compacting: 100%%\n");
		}
	}
	if (p->tty && p->shown_percent >= 0)
		putchar('\n');
	fflush(stdout);
}

static void progress_callback(double fraction, void *opaque)
{
	progress_show(opaque, fraction);
}

/* ---- create ------------------------------------------------------------- */

static int cmd_create(const struct command *self, int argc, char **argv)
{
	enum { OPT_COMPAT = 1000, OPT_REFCOUNT_BITS };
	static const struct option longopts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "cluster-size", required_argument, NULL, 'c' },
		{ "compat", required_argument, NULL, OPT_COMPAT },
		{ "refcount-bits", required_argument, NULL, OPT_REFCOUNT_BITS },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_create_opts opts;
	uint64_t size = DEFAULT_VIRTUAL_SIZE;
	uint64_t cluster_size = 0, refcount_bits = 0;
	bool refcount_bits_given = false;
	const char *image;
	char err[1024] = "", what[PATH_MAX + 32];
	int opt, ret;

	qcow_create_opts_default(&opts);
	while ((opt = getopt_long(argc, argv, ":s:c:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 's':
			if (parse_size(optarg, &size) < 0)
				return usage_error(self, "invalid size '%s': expected a whole number of bytes "
						   "with an optional K, M, G or T suffix", optarg);
			break;
		case 'c':
			if (parse_size(optarg, &cluster_size) < 0 || !is_power_of_two(cluster_size) ||
			    cluster_size < 512 || cluster_size > (2u << 20))
				return usage_error(self, "invalid cluster size '%s': must be a power of two "
						   "from 512 to 2M", optarg);
			opts.cluster_bits = log2_exact(cluster_size);
			break;
		case OPT_COMPAT:
			if (strcmp(optarg, "0.10") == 0 || strcmp(optarg, "v2") == 0)
				opts.version = 2;
			else if (strcmp(optarg, "1.1") == 0 || strcmp(optarg, "v3") == 0)
				opts.version = 3;
			else
				return usage_error(self, "invalid --compat '%s': expected 0.10 or 1.1", optarg);
			break;
		case OPT_REFCOUNT_BITS:
			if (parse_unsigned(optarg, &refcount_bits) < 0 || !is_power_of_two(refcount_bits) ||
			    refcount_bits > 64)
				return usage_error(self, "invalid --refcount-bits '%s': must be 1, 2, 4, 8, 16, "
						   "32 or 64", optarg);
			refcount_bits_given = true;
			break;
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	ret = single_operand(self, argc, argv, "IMAGE", &image);
	if (ret)
		return ret;

	/* Checked after all options, so their order does not matter. */
	if (refcount_bits_given) {
		if (opts.version == 2 && refcount_bits != 16)
			return usage_error(self, "--refcount-bits %" PRIu64 " needs --compat 1.1 "
					   "(compat 0.10 images have 16-bit refcounts)", refcount_bits);
		opts.refcount_order = log2_exact(refcount_bits);
	} else if (opts.version == 2) {
		opts.refcount_order = 4;
	}
	/* QEMU sees a disk in whole 512-byte sectors and would silently drop
	 * a partial last one; round up as qemu-img create does. */
	if (size > UINT64_MAX - 511)
		return usage_error(self, "invalid size: %" PRIu64 " bytes is too large", size);
	opts.size = (size + 511) & ~(uint64_t)511;

	snprintf(what, sizeof(what), "cannot create %s", image);
	engine_call_begin(true);
	ret = qcow_create(image, &opts, err, sizeof(err));
	engine_call_end(ret, what, err);
	if (ret < 0)
		return EXIT_FAILURE;
	printf("Formatting '%s', fmt=qcow2 cluster_size=%" PRIu64 " compat=%s refcount_bits=%u size=%" PRIu64 "\n",
	       image, (uint64_t)1 << opts.cluster_bits, opts.version == 2 ? "0.10" : "1.1",
	       1u << opts.refcount_order, opts.size);
	return EXIT_SUCCESS;
}

/* ---- info ---------------------------------------------------------------- */

/*
 * qcowctl info shows what "qemu-img info" shows for the same image, in the
 * same order and, with --json, with the same key names and nesting
 * (ImageInfo of QEMU's QAPI schema); --backing-chain shows every image of
 * the chain, top first, as "qemu-img info --backing-chain" does.  What
 * qemu-img leaves out and a qcowfs user wants (table offsets, feature
 * bits, the file size) comes after it: "qcowfs details:" in the text, a
 * "qcowfs" object in JSON, so that no qemu-img key changes meaning.
 *
 * One function per block of the output (info_block_*), each writing both
 * forms through struct info_out, so that a new block (the bitmaps, the
 * external data file) is one new function called at its place.
 */

/* Header feature bits (qcow2 spec), named for the output. */
#define INCOMPAT_EXTENDED_L2       (1ULL << 4)
#define COMPAT_LAZY_REFCOUNTS      (1ULL << 0)

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

static void out_str(struct info_out *o, const char *text_key, const char *json_key, const char *value)
{
	if (o->json)
		json_string(&o->j, json_key, value);
	else
		printf("%*s%s: %s\n", o->indent, "", text_key, value);
}

static void out_bool(struct info_out *o, const char *text_key, const char *json_key, bool value)
{
	if (o->json)
		json_bool(&o->j, json_key, value);
	else
		printf("%*s%s: %s\n", o->indent, "", text_key, value ? "true" : "false");
}

static void out_u64(struct info_out *o, const char *text_key, const char *json_key, uint64_t value)
{
	if (o->json)
		json_u64(&o->j, json_key, value);
	else
		printf("%*s%s: %" PRIu64 "\n", o->indent, "", text_key, value);
}

/* A nested object: "text_key:" with its lines indented below it. */
static void out_section_begin(struct info_out *o, const char *text_key, const char *json_key)
{
	if (o->json) {
		json_object_begin(&o->j, json_key);
	} else {
		printf("%*s%s:\n", o->indent, "", text_key);
		o->indent += 4;
	}
}

static void out_section_end(struct info_out *o)
{
	if (o->json)
		json_object_end(&o->j);
	else
		o->indent -= 4;
}

static bool info_is_qcow2(const struct info_image *im)
{
	return strcmp(im->format, "qcow2") == 0;
}

static const char *info_compat_name(const struct qcow_info *info)
{
	return info->version == 2 ? "0.10" : "1.1";
}

/* The types the format defines (header byte 104); QEMU refuses others. */
static const char *info_compression_name(const struct qcow_info *info)
{
	switch (info->compression_type) {
	case 0: return "zlib";
	case 1: return "zstd";
	default: return "unknown";
	}
}

/* QEMU's names of the encryption methods (header offset 32). */
static const char *info_encrypt_format(const struct qcow_info *info)
{
	switch (info->crypt_method) {
	case 1: return "aes";
	case 2: return "luks";
	default: return "unknown";
	}
}

/* QEMU's path_combine: a relative backing name is relative to the folder
 * of the image that names it; an image named without a folder leaves it
 * as it is. */
static void info_resolve_backing(const char *image, const char *backing, char *out, size_t len)
{
	const char *slash = strrchr(image, '/');

	if (backing[0] == '/' || !slash)
		snprintf(out, len, "%s", backing);
	else
		snprintf(out, len, "%.*s%s", (int)(slash - image + 1), image, backing);
}

/* image, file format, sizes, encryption, cluster size, the dirty flag
 * (the JSON has it as "dirty-flag", after the format-specific data). */
static void info_block_general(struct info_out *o, const struct info_image *im)
{
	char text[128];
	bool encrypted = info_is_qcow2(im) && im->q.crypt_method != 0;

	if (o->json) {
		json_u64(&o->j, "virtual-size", im->virtual_size);
		json_string(&o->j, "filename", im->filename);
		if (info_is_qcow2(im))
			json_u64(&o->j, "cluster-size", (uint64_t)1 << im->q.cluster_bits);
		json_string(&o->j, "format", im->format);
		json_u64(&o->j, "actual-size", im->actual_size);
		if (encrypted)
			json_bool(&o->j, "encrypted", true);
		return;
	}
	printf("image: %s\n", im->filename);
	printf("file format: %s\n", im->format);
	format_size_and_bytes(im->virtual_size, text, sizeof(text));
	printf("virtual size: %s\n", text);
	format_human_size(im->actual_size, text, sizeof(text));
	printf("disk size: %s\n", text);
	if (encrypted)
		printf("encrypted: yes\n");
	if (info_is_qcow2(im))
		printf("cluster_size: %" PRIu64 "\n", (uint64_t)1 << im->q.cluster_bits);
	if (info_is_qcow2(im) && im->q.dirty)
		printf("cleanly shut down: no\n");
}

/* The backing file as the header names it, where QEMU finds it, and its
 * format from the backing format extension. */
static void info_block_backing(struct info_out *o, const struct info_image *im)
{
	if (!info_is_qcow2(im) || !im->q.backing_file[0])
		return;
	if (o->json) {
		json_string(&o->j, "backing-filename", im->q.backing_file);
		json_string(&o->j, "full-backing-filename", im->full_backing);
		if (im->q.backing_format[0])
			json_string(&o->j, "backing-filename-format", im->q.backing_format);
		return;
	}
	/* names are bytes from the image: no terminal control through them */
	printf("backing file: ");
	print_text_safely(im->q.backing_file);
	if (strcmp(im->q.backing_file, im->full_backing) != 0) {
		printf(" (actual path: ");
		print_text_safely(im->full_backing);
		putchar(')');
	}
	putchar('\n');
	if (im->q.backing_format[0]) {
		printf("backing file format: ");
		print_text_safely(im->q.backing_format);
		putchar('\n');
	}
}

/* The internal snapshots: qemu-img's table (its columns and widths: rows
 * are "%-9s %-16s %8s%20s%13s%11s", so a long name shifts the rest by the
 * same amount as in qemu-img), or
 * an array of objects with QEMU's SnapshotInfo keys. */
static void info_block_snapshots(struct info_out *o, const struct info_image *im)
{
	if (!im->nb_snapshots)
		return;
	if (o->json) {
		json_array_begin(&o->j, "snapshots");
		for (uint32_t i = 0; i < im->nb_snapshots; i++) {
			const struct qcow_snapshot_info *s = &im->snapshots[i];

			json_object_begin(&o->j, NULL);
			if (s->icount >= 0)
				json_u64(&o->j, "icount", (uint64_t)s->icount);
			json_u64(&o->j, "vm-clock-nsec", s->vm_clock_nsec % 1000000000);
			json_string(&o->j, "name", s->name);
			json_u64(&o->j, "date-sec", s->date_sec);
			json_u64(&o->j, "date-nsec", s->date_nsec);
			json_u64(&o->j, "vm-clock-sec", s->vm_clock_nsec / 1000000000);
			json_string(&o->j, "id", s->id);
			json_u64(&o->j, "vm-state-size", s->vm_state_size);
			json_object_end(&o->j);
		}
		json_array_end(&o->j);
		return;
	}
	printf("Snapshot list:\n");
	printf("%-9s %-17s %7s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
	for (uint32_t i = 0; i < im->nb_snapshots; i++) {
		const struct qcow_snapshot_info *s = &im->snapshots[i];
		char size[32], date[32] = "", clock[32], icount[32] = "";
		time_t t = (time_t)s->date_sec;
		struct tm tm;
		uint64_t ms = s->vm_clock_nsec / 1000000;

		format_human_size(s->vm_state_size, size, sizeof(size));
		if (localtime_r(&t, &tm))
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64,
			 ms / 3600000, ms / 60000 % 60, ms / 1000 % 60, ms % 1000);
		if (s->icount >= 0)
			snprintf(icount, sizeof(icount), "%" PRId64, s->icount);
		/* names are bytes from the image: no terminal control through them */
		print_padded_safely(s->id, 9);
		putchar(' ');
		print_padded_safely(s->name, 16);
		printf(" %8s%20s%13s%11s\n", size, date, clock, icount);
	}
}

/* The persistent dirty bitmaps (name, granularity, flags), between the
 * lazy refcounts and the refcount bits as qemu-img shows them (a list of
 * objects; the flags a list of names).  Names come from the image:
 * printed safely. */
static void info_block_bitmaps(struct info_out *o, const struct info_image *im)
{
	static const char *const flag_names[] = { "in-use", "auto" };
	if (!im->nb_bitmaps)
		return;
	if (o->json)
		json_array_begin(&o->j, "bitmaps");
	else
		printf("%*sbitmaps:\n", o->indent, "");
	for (uint32_t i = 0; i < im->nb_bitmaps; i++) {
		const struct qcow_pbitmap_info *b = &im->bitmaps[i];
		if (o->json) {
			json_object_begin(&o->j, NULL);
			json_array_begin(&o->j, "flags");
		} else {
			printf("%*s[%u]:\n%*sflags:\n", o->indent + 4, "", i, o->indent + 8, "");
		}
		for (unsigned f = 0, k = 0; f < 2; f++) {
			if (!(b->flags & (1u << f)))
				continue;
			if (o->json)
				json_string(&o->j, NULL, flag_names[f]);
			else
				printf("%*s[%u]: %s\n", o->indent + 12, "", k++, flag_names[f]);
		}
		if (o->json) {
			json_array_end(&o->j);
			json_string(&o->j, "name", b->name);
			json_u64(&o->j, "granularity", b->granularity);
			json_object_end(&o->j);
		} else {
			printf("%*sname: ", o->indent + 8, "");
			print_text_safely(b->name);
			printf("\n%*sgranularity: %" PRIu64 "\n", o->indent + 8, "", b->granularity);
		}
	}
	if (o->json)
		json_array_end(&o->j);
}

/* The external data file (data-file, data-file-raw), after the refcount
 * bits as qemu-img shows it.  The name comes from the image: printed
 * safely, as the backing file's. */
static void info_block_data_file(struct info_out *o, const struct info_image *im)
{
	if (!im->q.has_data_file)
		return;
	if (o->json) {
		json_string(&o->j, "data-file", im->q.data_file);
	} else {
		printf("%*sdata file: ", o->indent, "");
		print_text_safely(im->q.data_file);
		putchar('\n');
	}
	out_bool(o, "data file raw", "data-file-raw", im->q.data_file_raw);
}

/* The encryption format, as qemu-img names it, and for LUKS the header
 * fields qemu-img decodes, in its order (QCryptoBlockInfoLUKS). */
static void info_block_encrypt(struct info_out *o, const struct info_image *im)
{
	const struct qcow_luks_info *l = &im->luks;

	if (!im->q.crypt_method)
		return;
	out_section_begin(o, "encrypt", "encrypt");
	if (im->has_luks) {
		out_str(o, "ivgen alg", "ivgen-alg", l->ivgen_alg);
		out_str(o, "hash alg", "hash-alg", l->hash_alg);
		out_str(o, "cipher alg", "cipher-alg", l->cipher_alg);
		out_str(o, "uuid", "uuid", l->uuid);
		if (l->ivgen_hash_alg[0])
			out_str(o, "ivgen hash alg", "ivgen-hash-alg", l->ivgen_hash_alg);
	}
	out_str(o, "format", "format", info_encrypt_format(&im->q));
	if (im->has_luks) {
		out_str(o, "cipher mode", "cipher-mode", l->cipher_mode);
		if (o->json)
			json_array_begin(&o->j, "slots");
		else
			printf("%*sslots:\n", o->indent, "");
		for (unsigned i = 0; i < 8; i++) {
			if (o->json) {
				json_object_begin(&o->j, NULL);
			} else {
				printf("%*s[%u]:\n", o->indent + 4, "", i);
				o->indent += 8;
			}
			out_bool(o, "active", "active", l->slots[i].active);
			if (l->slots[i].active)
				out_u64(o, "iters", "iters", l->slots[i].iters);
			out_u64(o, "key offset", "key-offset", l->slots[i].key_offset);
			if (l->slots[i].active)
				out_u64(o, "stripes", "stripes", l->slots[i].stripes);
			if (o->json)
				json_object_end(&o->j);
			else
				o->indent -= 8;
		}
		if (o->json)
			json_array_end(&o->j);
		out_u64(o, "payload offset", "payload-offset", l->payload_offset);
		out_u64(o, "master key iters", "master-key-iters", l->master_key_iters);
	}
	out_section_end(o);
}

/* "Format specific information" / "format-specific": {"type": "qcow2",
 * "data": {...}}, keys in qemu-img's order. */
static void info_block_format_specific(struct info_out *o, const struct info_image *im)
{
	const struct qcow_info *q = &im->q;
	bool v3 = q->version >= 3;

	if (!info_is_qcow2(im))
		return;
	if (o->json) {
		json_object_begin(&o->j, "format-specific");
		json_string(&o->j, "type", "qcow2");
		json_object_begin(&o->j, "data");
	} else {
		printf("Format specific information:\n");
		o->indent += 4;
	}
	out_str(o, "compat", "compat", info_compat_name(q));
	out_str(o, "compression type", "compression-type", info_compression_name(q));
	if (v3)
		out_bool(o, "lazy refcounts", "lazy-refcounts", q->compatible_features & COMPAT_LAZY_REFCOUNTS);
	info_block_bitmaps(o, im);
	out_u64(o, "refcount bits", "refcount-bits", q->refcount_bits);
	info_block_data_file(o, im);
	info_block_encrypt(o, im);
	if (v3) {
		out_bool(o, "corrupt", "corrupt", q->corrupt);
		out_bool(o, "extended l2", "extended-l2", q->incompatible_features & INCOMPAT_EXTENDED_L2);
	}
	if (o->json) {
		json_object_end(&o->j);
		json_object_end(&o->j);
	} else {
		o->indent -= 4;
	}
}

/* What qemu-img leaves out: the file size, the tables, the feature bits. */
static void info_block_qcowfs(struct info_out *o, const struct info_image *im)
{
	const struct qcow_info *q = &im->q;
	char text[128];

	if (!info_is_qcow2(im))
		return;
	if (o->json) {
		json_object_begin(&o->j, "qcowfs");
		json_u64(&o->j, "file-size", q->file_size);
		json_u64(&o->j, "l1-table-offset", q->l1_table_offset);
		json_u64(&o->j, "l1-size", q->l1_size);
		json_u64(&o->j, "refcount-table-offset", q->refcount_table_offset);
		json_u64(&o->j, "refcount-table-clusters", q->refcount_table_clusters);
		json_u64(&o->j, "incompatible-features", q->incompatible_features);
		json_u64(&o->j, "compatible-features", q->compatible_features);
		json_u64(&o->j, "autoclear-features", q->autoclear_features);
		json_object_end(&o->j);
		return;
	}
	printf("qcowfs details:\n");
	printf("    dirty: %s\n", q->dirty ? "true" : "false");
	format_size_and_bytes(q->file_size, text, sizeof(text));
	printf("    file size: %s\n", text);
	printf("    l1 table: offset 0x%" PRIx64 ", %" PRIu32 " entries\n", q->l1_table_offset, q->l1_size);
	printf("    refcount table: offset 0x%" PRIx64 ", %" PRIu32 " cluster%s\n",
	       q->refcount_table_offset, q->refcount_table_clusters,
	       q->refcount_table_clusters == 1 ? "" : "s");
	if (q->version >= 3)
		printf("    features: incompatible 0x%" PRIx64 ", compatible 0x%" PRIx64
		       ", autoclear 0x%" PRIx64 "\n", q->incompatible_features,
		       q->compatible_features, q->autoclear_features);
}

/* One image, every block in qemu-img's order. */
static void info_print(struct info_out *o, const struct info_image *im)
{
	if (o->json)
		json_object_begin(&o->j, NULL);
	info_block_general(o, im);
	info_block_backing(o, im);
	info_block_snapshots(o, im);
	info_block_format_specific(o, im);
	if (o->json)
		json_bool(&o->j, "dirty-flag", info_is_qcow2(im) && im->q.dirty);
	info_block_qcowfs(o, im);
	if (o->json)
		json_object_end(&o->j);
}

static void info_image_free(struct info_image *im)
{
	free(im->snapshots);
	im->snapshots = NULL;
	im->nb_snapshots = 0;
	free(im->bitmaps);
	im->bitmaps = NULL;
	im->nb_bitmaps = 0;
}

/* Reads what info shows of the image at path in the given format
 * (format NULL: qcow2).  Prints the reason and returns -errno on failure;
 * reason (if not NULL) receives it for a JSON error object. */
static int info_image_read(const char *path, const char *format, struct info_image *im,
			   char *reason, size_t reason_len)
{
	char err[1024] = "", what[PATH_MAX + 32];
	int ret;

	memset(im, 0, sizeof(*im));
	im->filename = path;
	im->format = format && strcmp(format, "raw") == 0 ? "raw" : "qcow2";
	snprintf(what, sizeof(what), "cannot read %s", path);
	if (!info_is_qcow2(im)) {
		struct stat st;

		if (stat(path, &st) < 0) {
			ret = -errno;
			engine_call_begin(true);
			engine_call_end_reason(ret, what, "", reason, reason_len);
			return ret;
		}
		im->virtual_size = (uint64_t)st.st_size;
		im->actual_size = (uint64_t)st.st_blocks * 512;
		return 0;
	}
	engine_call_begin(true);
	ret = qcow_info_read(path, &im->q, err, sizeof(err));
	if (ret == 0 && im->q.nb_snapshots)
		ret = qcow_snapshot_list_file(path, &im->snapshots, &im->nb_snapshots, err, sizeof(err));
	engine_call_end_reason(ret, what, err, reason, reason_len);
	if (ret < 0) {
		info_image_free(im);
		return ret;
	}
	/* The bitmaps are extra: without them the rest still stands (a
	 * warning says why they are missing). */
	if (qcow_pbitmap_list_file(path, &im->bitmaps, &im->nb_bitmaps, err, sizeof(err)) < 0) {
		fprintf(stderr, "qcowctl: warning: cannot list the bitmaps of %s: %s\n", path, err);
		im->bitmaps = NULL;
		im->nb_bitmaps = 0;
	}
	for (uint32_t i = 0; i < im->nb_bitmaps; i++)
		im->bitmaps[i].name[sizeof(im->bitmaps[i].name) - 1] = '\0';
	/* The engine fills fixed arrays; never trust them to be terminated. */
	im->q.backing_file[sizeof(im->q.backing_file) - 1] = '\0';
	im->q.backing_format[sizeof(im->q.backing_format) - 1] = '\0';
	/* The LUKS details are extra: without them the format is still shown
	 * (with a warning), where qemu-img would refuse the image. */
	if (im->q.crypt_method == 2) {
		ret = qcow_info_luks(path, &im->luks, err, sizeof(err));
		if (ret == 0)
			im->has_luks = true;
		else
			print_error("warning: %s: %s", path, err[0] ? err : strerror(-ret));
	}
	im->virtual_size = im->q.virtual_size;
	im->actual_size = im->q.file_allocated;
	info_resolve_backing(path, im->q.backing_file, im->full_backing, sizeof(im->full_backing));
	return 0;
}

/* A failure as JSON, so that a script reading stdout gets an answer it
 * can parse instead of nothing: {"filename": ..., "error": {"message":
 * ..., "errno": "EINVAL", "errno-value": 22}} (key "mountpoint" instead of
 * "filename" for status).  The message is on stderr
 * as well, and the exit status stays what it was. */
static void json_print_error(const char *key, const char *path, const char *message, int err)
{
	struct json_writer j = { .out = stdout };

	if (err < 0)
		err = -err;
	json_object_begin(&j, NULL);
	json_string(&j, key, path);
	json_object_begin(&j, "error");
	json_string(&j, "message", message);
	json_string(&j, "errno", errno_name(err));
	json_u64(&j, "errno-value", (uint64_t)err);
	json_object_end(&j);
	json_object_end(&j);
	fflush(stdout);
}

/* --backing-chain: every image of the chain, top first, as "qemu-img info
 * --backing-chain" shows them (text: one block each, a blank line between;
 * JSON: an array).  The top keeps the name it was given; the others are
 * named by their path resolved as QEMU resolves it. */
static int info_chain(struct info_out *o, const char *image)
{
	struct qcow_chain_entry *chain = NULL;
	struct info_image *ims = NULL;
	size_t n = 0;
	char err[2048] = "", what[PATH_MAX + 64], reason[PATH_MAX + 64 + 2048 + 64] = "";
	int ret, status = EXIT_FAILURE;

	snprintf(what, sizeof(what), "cannot follow the backing chain of %s", image);
	engine_call_begin(true);
	ret = qcow_chain_list(image, NULL, &chain, &n, err, sizeof(err));
	engine_call_end_reason(ret, what, err, reason, sizeof(reason));
	if (ret < 0)
		goto fail;
	ims = calloc(n ? n : 1, sizeof(*ims));
	if (!ims) {
		ret = -ENOMEM;
		snprintf(reason, sizeof(reason), "%s: %s", what, strerror(ENOMEM));
		print_error("%s", reason);
		goto fail;
	}
	/* everything read before anything is printed: a chain that fails
	 * half-way prints an error, not half an answer */
	for (size_t i = 0; i < n; i++) {
		chain[i].path[sizeof(chain[i].path) - 1] = '\0';
		chain[i].format[sizeof(chain[i].format) - 1] = '\0';
		ret = info_image_read(i == 0 ? image : chain[i].path, chain[i].format, &ims[i],
				      reason, sizeof(reason));
		if (ret < 0)
			goto fail;
	}
	if (o->json)
		json_array_begin(&o->j, NULL);
	for (size_t i = 0; i < n; i++) {
		if (i && !o->json)
			putchar('\n');
		info_print(o, &ims[i]);
	}
	if (o->json)
		json_array_end(&o->j);
	status = EXIT_SUCCESS;
	goto out;
fail:
	if (o->json)
		json_print_error("filename", image, reason, ret);
out:
	for (size_t i = 0; ims && i < n; i++)
		info_image_free(&ims[i]);
	free(ims);
	free(chain);
	return status;
}

static int cmd_info(const struct command *self, int argc, char **argv)
{
	enum { OPT_BACKING_CHAIN = 1000 };
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct info_out o = { .j = { .out = stdout } };
	struct info_image im;
	bool chain = false;
	const char *image;
	char reason[2048] = "";
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'j':
			o.json = true;
			break;
		case OPT_BACKING_CHAIN:
			chain = true;
			break;
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	ret = single_operand(self, argc, argv, "IMAGE", &image);
	if (ret)
		return ret;
	if (chain)
		return info_chain(&o, image);

	ret = info_image_read(image, NULL, &im, reason, sizeof(reason));
	if (ret < 0) {
		if (o.json)
			json_print_error("filename", image, reason, ret);
		return EXIT_FAILURE;
	}
	info_print(&o, &im);
	info_image_free(&im);
	return EXIT_SUCCESS;
}

/* ---- check --------------------------------------------------------------- */

static void check_print_human(const struct qcow_check_result *res)
{
	if (res->errors == 0 && res->leaks == 0) {
		printf("No errors were found on the image.\n");
	} else {
		/* Wording of qemu-img check, which scripts grep for. */
		if (res->errors)
			printf("\n%" PRIu64 " errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       res->errors);
		if (res->leaks)
			printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       res->leaks);
	}
	if (res->total_clusters && res->allocated_clusters)
		printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated clusters\n",
		       res->allocated_clusters, res->total_clusters,
		       100.0 * (double)res->allocated_clusters / (double)res->total_clusters);
	printf("Image clusters: %" PRIu64 " used, %" PRIu64 " free below the image end\n",
	       res->clusters_used, res->clusters_free);
	if (res->image_end_offset)
		printf("Image end offset: %" PRIu64 "\n", res->image_end_offset);
}

static void check_print_json(const char *image, const struct qcow_check_result *res)
{
	struct json_writer j = { .out = stdout };

	json_object_begin(&j, NULL);
	json_u64(&j, "image-end-offset", res->image_end_offset);
	json_u64(&j, "total-clusters", res->total_clusters);
	/* qemu's "check-errors" counts checks that could not complete; when
	 * qcow_check returns 0 the whole check ran. */
	json_u64(&j, "check-errors", 0);
	json_u64(&j, "corruptions", res->errors);
	json_u64(&j, "leaks", res->leaks);
	json_u64(&j, "allocated-clusters", res->allocated_clusters);
	json_u64(&j, "used-clusters", res->clusters_used);
	json_u64(&j, "free-clusters", res->clusters_free);
	json_string(&j, "filename", image);
	json_string(&j, "format", "qcow2");
	json_object_end(&j);
}

static enum check_exit check_exit_status(const struct qcow_check_result *res)
{
	if (res->errors)
		return CHECK_EXIT_CORRUPT;
	if (res->leaks)
		return CHECK_EXIT_LEAKS;
	return CHECK_EXIT_CLEAN;
}

static int cmd_check(const struct command *self, int argc, char **argv)
{
	struct qcow_check_result res;
	bool json = false;
	const char *image;
	char err[1024] = "", what[PATH_MAX + 32];
	char reason[2048] = "";
	int ret = parse_json_only(self, argc, argv, &json);

	if (ret == EXIT_SUCCESS)
		return ret;
	if (ret >= 0)
		return CHECK_EXIT_FAILED;   /* usage errors: "could not run", as qemu-img */
	ret = single_operand(self, argc, argv, "IMAGE", &image);
	if (ret)
		return CHECK_EXIT_FAILED;

	/* The problems are the output of check; with --json they would break
	 * the JSON on stdout, so they go to stderr instead. */
	if (json)
		engine_log_route(false, stderr);
	else
		engine_log_route(true, stdout);
	memset(&res, 0, sizeof(res));
	snprintf(what, sizeof(what), "cannot check %s", image);
	engine_call_begin(false);
	ret = qcow_check(image, &res, err, sizeof(err));
	engine_log_route(false, stderr);
	engine_call_end_reason(ret, what, err, reason, sizeof(reason));
	if (ret < 0) {
		if (json)
			json_print_error("filename", image, reason, ret);
		return CHECK_EXIT_FAILED;
	}
	if (json)
		check_print_json(image, &res);
	else
		check_print_human(&res);
	return check_exit_status(&res);
}

/* ---- status -------------------------------------------------------------- */

/* The words for the engine's health (struct qcow_stats: failed, last_error). */
#define STATE_FAILED_TEXT "failed: writes refused after an I/O error; unmount and check the image"

static const char *status_state_name(const struct qcow_stats *st)
{
	return st->failed ? "failed" : st->last_error ? "error" : "ok";
}

/* The error the engine reports, or NULL: a failed engine without an errno
 * failed with an I/O error. */
static const char *status_error_text(const struct qcow_stats *st)
{
	if (st->last_error < 0)
		return strerror(-st->last_error);
	return st->failed ? strerror(EIO) : NULL;
}

/* Whether the status explains why the file is longer than it could be:
 * min_file_size 0 comes from a daemon that does not know. */
static bool status_file_held(const struct qcow_stats *st)
{
	return st->min_file_size && st->file_size > st->min_file_size;
}

static void status_print_human(const struct qcow_stats *st)
{
	char text[128], allocated[32];
	const char *error = status_error_text(st);

	/* The health first: it is what a user must not miss. */
	if (st->failed)
		printf("state:              " STATE_FAILED_TEXT "\n");
	else if (error)
		printf("state:              error; background work retries, and the error clears "
		       "when a flush succeeds again\n");
	else
		printf("state:              ok\n");
	if (error)
		printf("error:              %s\n", error);

	format_size_and_bytes(st->virtual_size, text, sizeof(text));
	printf("virtual size:       %s\n", text);
	format_size_and_bytes(st->file_size, text, sizeof(text));
	format_human_size(st->file_allocated, allocated, sizeof(allocated));
	printf("image file:         %s, %s allocated\n", text, allocated);
	printf("cluster size:       %" PRIu64 "\n", st->cluster_size);
	printf("clusters:           %" PRIu64 " in the file\n", st->clusters_total);
	printf("  header            %" PRIu64 "\n", st->clusters_header);
	printf("  used              %" PRIu64 " (%" PRIu64 " shared)\n", st->clusters_referenced, st->clusters_shared);
	printf("  junk              %" PRIu64 "\n", st->clusters_junk);
	printf("  erased            %" PRIu64 "\n", st->clusters_erased);
	printf("  available         %" PRIu64 "\n", st->clusters_available);
	printf("  copies            %" PRIu64 "\n", st->clusters_copies);
	printf("  roots             %" PRIu64 "\n", st->clusters_roots);
	printf("  pending           %" PRIu64 "\n", st->clusters_pending);
	printf("moves in flight:    %" PRIu64 "\n", st->moves_in_flight);
	format_size_and_bytes(st->map_bytes, text, sizeof(text));
	printf("cluster map memory: %s\n", text);
	printf("clusters moved:     %" PRIu64 "\n", st->clusters_moved);
	printf("streams repacked:   %" PRIu64 " (compressed)\n", st->streams_repacked);
	format_size_and_bytes(st->bytes_reclaimed, text, sizeof(text));
	printf("bytes reclaimed:    %s\n", text);
	format_size_and_bytes(st->bytes_discarded, text, sizeof(text));
	printf("bytes discarded:    %s\n", text);
	printf("compactions done:   %" PRIu64 "\n", st->compactions_done);
	printf("compactions failed: %" PRIu64 "\n", st->compactions_failed);
	if (st->min_file_size) {
		format_size_and_bytes(st->min_file_size, text, sizeof(text));
		printf("smallest file:      %s\n", text);
	}
	if (status_file_held(st) && st->blocker[0]) {
		printf("held by:            ");
		print_text_safely(st->blocker);
		putchar('\n');
	}
	if (st->compacting)
		printf("compaction:         running, %.1f%% done\n", 100.0 * st->compact_progress);
	else
		printf("compaction:         idle\n");
	printf("punch supported:    %s\n", st->punch_supported ? "yes" : "no");
	printf("read-only:          %s\n", st->read_only ? "yes" : "no");
}

static void status_print_json(const char *mountpoint, const struct qcow_stats *st)
{
	struct json_writer j = { .out = stdout };

	json_object_begin(&j, NULL);
	json_string(&j, "mountpoint", mountpoint);
	json_u64(&j, "virtual-size", st->virtual_size);
	json_u64(&j, "cluster-size", st->cluster_size);
	json_u64(&j, "file-size", st->file_size);
	json_u64(&j, "file-allocated", st->file_allocated);
	json_u64(&j, "clusters-total", st->clusters_total);
	json_u64(&j, "clusters-header", st->clusters_header);
	json_u64(&j, "clusters-used", st->clusters_referenced);
	json_u64(&j, "clusters-junk", st->clusters_junk);
	json_u64(&j, "clusters-erased", st->clusters_erased);
	json_u64(&j, "clusters-available", st->clusters_available);
	json_u64(&j, "clusters-copies", st->clusters_copies);
	json_u64(&j, "clusters-roots", st->clusters_roots);
	json_u64(&j, "clusters-pending", st->clusters_pending);
	json_u64(&j, "clusters-shared", st->clusters_shared);
	json_u64(&j, "map-bytes", st->map_bytes);
	json_u64(&j, "moves-in-flight", st->moves_in_flight);
	json_u64(&j, "clusters-moved", st->clusters_moved);
	json_u64(&j, "streams-repacked", st->streams_repacked);
	json_u64(&j, "bytes-reclaimed", st->bytes_reclaimed);
	json_u64(&j, "bytes-discarded", st->bytes_discarded);
	json_u64(&j, "compactions-done", st->compactions_done);
	json_bool(&j, "compacting", st->compacting);
	json_double(&j, "compact-progress", st->compact_progress);
	json_bool(&j, "punch-supported", st->punch_supported);
	json_bool(&j, "read-only", st->read_only);
	json_string(&j, "state", status_state_name(st));
	json_string(&j, "error", status_error_text(st) ? status_error_text(st) : "");
	json_u64(&j, "errno", st->last_error < 0 ? (uint64_t)-(int64_t)st->last_error : 0);
	json_bool(&j, "failed", st->failed);
	json_u64(&j, "compactions-failed", st->compactions_failed);
	json_u64(&j, "min-file-size", st->min_file_size);
	json_string(&j, "blocker", st->blocker);
	json_object_end(&j);
}

static int cmd_status(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "raw", no_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	bool json = false, raw = false;
	const char *mountpoint;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'j':
			json = true;
			break;
		case 'r':
			raw = true;
			break;
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	ret = single_operand(self, argc, argv, "MOUNTPOINT", &mountpoint);
	if (ret)
		return ret;

	if (raw) {
		/* the daemon's key=value text as is, for scripts */
		char *text;
		ret = mount_read_status_text(mountpoint, &text);
		if (ret < 0) {
			report_status_error(mountpoint, ret);
			return EXIT_FAILURE;
		}
		fputs(text, stdout);
		free(text);
		return EXIT_SUCCESS;
	}
	ret = mount_read_status(mountpoint, &st);
	if (ret < 0) {
		char msg[2 * PATH_MAX + 256];

		status_error_message(mountpoint, ret, msg, sizeof(msg));
		print_error("%s", msg);
		if (json)
			json_print_error("mountpoint", mountpoint, msg, ret);
		return EXIT_FAILURE;
	}
	if (json)
		status_print_json(mountpoint, &st);
	else
		status_print_human(&st);
	return EXIT_SUCCESS;
}

/* ---- compact ------------------------------------------------------------- */

/*
 * The end of every compaction that worked: what it did (clusters moved,
 * the file's size before -> after) and, when the file is still longer than
 * the engine says it could be, what holds it there.
 */
static void print_compact_result(uint64_t moved, uint64_t streams, uint64_t size_before, uint64_t alloc_before,
				 uint64_t size_after, uint64_t alloc_after,
				 const struct qcow_stats *after)
{
	char size_a[32], size_b[32], alloc_a[32], alloc_b[32], min[32];

	format_human_size(size_before, size_a, sizeof(size_a));
	format_human_size(size_after, size_b, sizeof(size_b));
	format_human_size(alloc_before, alloc_a, sizeof(alloc_a));
	format_human_size(alloc_after, alloc_b, sizeof(alloc_b));
	printf("moved %" PRIu64 " cluster%s", moved, moved == 1 ? "" : "s");
	if (streams)
		printf(" and %" PRIu64 " compressed stream%s", streams, streams == 1 ? "" : "s");
	printf("; image file %s -> %s (%" PRIu64 " -> %" PRIu64 " bytes), allocated %s -> %s\n", size_a, size_b,
	       size_before, size_after, alloc_a, alloc_b);
	if (after->min_file_size && size_after > after->min_file_size) {
		format_human_size(after->min_file_size, min, sizeof(min));
		printf("the file stays above its minimum of %s (%" PRIu64 " bytes): ", min,
		       after->min_file_size);
		if (after->blocker[0])
			print_text_safely(after->blocker);
		else
			fputs("the engine gave no reason", stdout);
		putchar('\n');
	}
	fflush(stdout);
}

/* Why a compaction failed, from the engine's status (never "Success").
 * The engine clears last_error at the next successful flush, which may come
 * before we look: then only its log names the error. */
static const char *compact_failure_text(const struct qcow_stats *st)
{
	const char *error = status_error_text(st);
	return error ? error : "the engine counted a failed compaction; the qcowfs log names the error";
}

/*
 * Whether the pass we asked for is over.  The daemon may start it before
 * our first poll and finish it between two polls, so "compacting" alone can
 * be missed both ways; compactions_done or compactions_failed moving on is
 * the reliable sign.  A pass seen running that stopped counts too (an
 * engine that does not count aborted passes).  If neither ever shows, the
 * request had nothing to do.
 */
static bool compact_request_finished(const struct qcow_stats *before, const struct qcow_stats *now,
				     bool seen_running, uint64_t waited_ms)
{
	if (now->compacting)
		return false;
	if (now->compactions_done != before->compactions_done ||
	    now->compactions_failed != before->compactions_failed)
		return true;
	if (now->failed && !before->failed)
		return true;
	if (seen_running && !before->compacting)
		return true;
	return waited_ms >= COMPACT_PICKUP_GRACE_MS;
}

static int compact_mount(const char *mountpoint, const struct qcow_stats *before)
{
	struct progress_display progress;
	struct qcow_stats now = *before;
	bool seen_running = false;
	int seen_error = 0;   /* the last error the status showed while we waited */
	uint64_t start;
	int ret;

	if (before->read_only) {
		print_error("cannot compact %s: the mount is read-only", mountpoint);
		return EXIT_FAILURE;
	}
	if (before->failed) {
		print_error("cannot compact %s: the image is in the " STATE_FAILED_TEXT " state (%s)",
			    mountpoint, compact_failure_text(before));
		return EXIT_FAILURE;
	}
	ret = mount_ioctl(mountpoint, O_RDWR, QCOWFS_IOC_COMPACT, NULL);
	if (ret < 0) {
		report_compact_request_error(mountpoint, ret);
		return EXIT_FAILURE;
	}
	start = monotonic_ms();
	progress_init(&progress);
	for (;;) {
		sleep_ms(STATUS_POLL_MS);
		ret = mount_read_status(mountpoint, &now);
		if (ret < 0) {
			progress_finish(&progress, false);
			report_status_error(mountpoint, ret);
			return EXIT_FAILURE;
		}
		/* A pass that was already running when we asked is not the one
		 * we asked for; only one that starts afterwards counts as "seen". */
		if (now.compacting && (!before->compacting || now.compactions_done != before->compactions_done))
			seen_running = true;
		if (now.compacting)
			progress_show(&progress, now.compact_progress);
		if (now.last_error < 0)
			seen_error = now.last_error;
		if (compact_request_finished(before, &now, seen_running, monotonic_ms() - start))
			break;
	}
	/* An error that a flush cleared before our last poll still names
	 * what went wrong. */
	if (!now.last_error && !now.failed && seen_error)
		now.last_error = seen_error;
	/* A failure counted while we waited is ours (or one of a pass ours
	 * was merged into): either way the file did not get compacted. */
	if (now.compactions_failed != before->compactions_failed || (now.failed && !before->failed)) {
		progress_finish(&progress, false);
		print_error("compacting %s failed: %s", mountpoint, compact_failure_text(&now));
		if (now.failed)
			print_error("%s: " STATE_FAILED_TEXT, mountpoint);
		return EXIT_FAILURE;
	}
	/* No pass ran while an error is pending: the engine is backing off
	 * after a failure (or cannot write at all), so nothing was done. */
	if (now.compactions_done == before->compactions_done && !seen_running && now.last_error < 0) {
		progress_finish(&progress, false);
		print_error("compacting %s did not run: the engine reports an error: %s", mountpoint,
			    compact_failure_text(&now));
		return EXIT_FAILURE;
	}
	progress_finish(&progress, true);
	print_compact_result(now.clusters_moved - before->clusters_moved, now.streams_repacked - before->streams_repacked,
			     before->file_size,
			     before->file_allocated, now.file_size, now.file_allocated, &now);
	return EXIT_SUCCESS;
}

/* --data-file PATH of the commands that open an image offline: the
 * external data file to use instead of the name the image records */
static const char *opt_data_file;

static int compact_image(const char *image)
{
	struct qcow_open_opts opts;
	struct qcow_image *img = NULL;
	struct qcow_stats st_before, st_after;
	struct progress_display progress;
	struct stat before, after;
	char err[1024] = "", what[PATH_MAX + 32];
	int ret;

	if (stat(image, &before) < 0) {
		print_error("cannot access %s: %s", image, strerror(errno));
		return EXIT_FAILURE;
	}
	qcow_open_opts_default(&opts);
	opts.read_only = false;
	opts.data_file = opt_data_file;
	/* qcow_image_compact does the work in this thread; a background
	 * recycler would only race it for the same clusters. */
	opts.recycler = false;
	opts.compact = false;
	snprintf(what, sizeof(what), "cannot open %s", image);
	engine_call_begin(true);
	ret = qcow_image_open(image, &opts, &img, err, sizeof(err));
	engine_call_end(ret, what, err);
	if (ret < 0) {
		if (ret == -EAGAIN || ret == -EBUSY || ret == -EWOULDBLOCK)
			fprintf(stderr, "qcowctl: if %s is mounted, run 'qcowctl compact MOUNTPOINT'\n", image);
		return EXIT_FAILURE;
	}

	qcow_image_get_stats(img, &st_before);
	progress_init(&progress);
	ret = qcow_image_compact(img, progress_callback, &progress);
	qcow_image_get_stats(img, &st_after);
	/* An engine that counts a failure but returns 0 still failed. */
	if (ret == 0 && (st_after.compactions_failed != st_before.compactions_failed || st_after.failed))
		ret = st_after.last_error < 0 ? st_after.last_error : -EIO;
	progress_finish(&progress, ret == 0);
	if (ret < 0)
		print_error("compacting %s failed: %s", image, strerror(-ret));

	/* Close even after a failed compaction: close writes exact refcounts,
	 * and an image left open would be left dirty. */
	int close_ret = qcow_image_close(img);
	if (close_ret < 0) {
		print_error("closing %s failed: %s", image, strerror(-close_ret));
		return EXIT_FAILURE;
	}
	if (ret < 0)
		return EXIT_FAILURE;

	if (stat(image, &after) < 0) {
		print_error("cannot access %s after compaction: %s", image, strerror(errno));
		return EXIT_FAILURE;
	}
	print_compact_result(st_after.clusters_moved - st_before.clusters_moved,
			     st_after.streams_repacked - st_before.streams_repacked, (uint64_t)before.st_size, (uint64_t)before.st_blocks * 512,
			     (uint64_t)after.st_size, (uint64_t)after.st_blocks * 512, &st_after);
	return EXIT_SUCCESS;
}

static int cmd_compact(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "no-wait", no_argument, NULL, 'n' },
		{ "data-file", required_argument, NULL, 'D' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	const char *target;
	bool no_wait = false;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'n':
			no_wait = true;
			break;
		case 'D':
			opt_data_file = optarg;
			break;
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	ret = single_operand(self, argc, argv, "MOUNTPOINT or IMAGE", &target);
	if (ret)
		return ret;

	/* A live mount answers the status ioctl; an image file does not. */
	ret = mount_read_status(target, &st);
	if (ret == 0 && no_wait) {
		ret = mount_ioctl(target, O_RDWR, QCOWFS_IOC_COMPACT, NULL);
		if (ret < 0) {
			report_compact_request_error(target, ret);
			return EXIT_FAILURE;
		}
		return EXIT_SUCCESS;
	}
	if (ret == 0)
		return compact_mount(target, &st);
	if (no_wait) {
		print_error("--no-wait needs a qcowfs mountpoint; %s is not one", target);
		return EXIT_FAILURE;
	}
	if (errno_means_not_qcowfs(-ret))
		return compact_image(target);
	if (ret == -ENOENT)
		print_error("cannot access %s: %s", target, strerror(ENOENT));
	else
		report_status_error(target, ret);
	return EXIT_FAILURE;
}

/* ---- sparsify ------------------------------------------------------------ */

/* Progress of a sparsify: on a terminal one line redrawn in place, in a
 * pipe or log a line per 10 % (the compaction's bar says "compacting"). */
struct sparsify_display {
	bool tty;
	int shown;   /* percent last shown, -1 before the first */
};

static void sparsify_show(struct sparsify_display *d, uint64_t done, uint64_t total, uint64_t freed)
{
	/* total 0: a run that has not counted the disk yet */
	int percent = total ? (int)(100.0 * (double)done / (double)total) : 0;
	if (percent > 100)
		percent = 100;
	if (d->tty) {
		if (percent == d->shown)
			return;
		printf("\rsparsify: %3d%%, %" PRIu64 " clusters freed", percent, freed);
	} else {
		if (d->shown >= 0 && percent / 10 <= d->shown / 10)
			return;
		printf("sparsify: %d%%, %" PRIu64 " clusters freed\n", percent, freed);
	}
	fflush(stdout);
	d->shown = percent;
}

/* complete: the run reached the end of the disk (100 % shown once) */
static void sparsify_display_end(struct sparsify_display *d, bool complete, uint64_t freed)
{
	if (complete && d->shown < 100) {
		d->shown = -1;
		sparsify_show(d, 1, 1, freed);
	}
	if (d->tty && d->shown >= 0)
		putchar('\n');
	fflush(stdout);
}

/* The summary line, and what was left and why. */
static void sparsify_summary(uint64_t scanned, uint64_t freed, uint64_t bytes, uint64_t shared,
			     uint64_t compressed, uint64_t changed, uint64_t backing)
{
	char size[32];
	format_human_size(bytes, size, sizeof(size));
	printf("scanned %" PRIu64 " allocated cluster%s, freed %" PRIu64 " that read all zeros: %s (%" PRIu64
	       " bytes) given back\n", scanned, scanned == 1 ? "" : "s", freed, size, bytes);
	if (shared || compressed || changed || backing) {
		printf("left allocated:");
		const char *sep = " ";
		if (shared)
			printf("%s%" PRIu64 " shared with a snapshot", sep, shared), sep = ", ";
		if (compressed)
			printf("%s%" PRIu64 " compressed", sep, compressed), sep = ", ";
		if (changed)
			printf("%s%" PRIu64 " written while being checked", sep, changed), sep = ", ";
		if (backing)
			printf("%s%" PRIu64 " whose zeros hide backing data", sep, backing);
		putchar('\n');
	}
	fflush(stdout);
}

static int sparsify_mount(const char *mountpoint, const struct qcow_stats *before)
{
	struct qcowfs_sparsify sp = { .op = QCOWFS_SPARSIFY_START };
	struct sparsify_display d = { .tty = isatty(STDOUT_FILENO), .shown = -1 };
	struct qcow_stats after;

	if (before->read_only) {
		print_error("cannot sparsify %s: the mount is read-only", mountpoint);
		return EXIT_FAILURE;
	}
	int ret = mount_ioctl(mountpoint, O_RDWR, QCOWFS_IOC_SPARSIFY, &sp);
	if (ret < 0) {
		if (ret == -EBUSY)
			print_error("cannot sparsify %s: a sparsify is already running on it", mountpoint);
		else if (ret == -EACCES || ret == -EBADF || ret == -EPERM)
			print_error("cannot sparsify %s: %s (it needs write permission on the view)", mountpoint,
				    strerror(-ret));
		else if (errno_means_not_qcowfs(-ret))
			print_error("cannot sparsify %s: this qcowfs does not know sparsify (older daemon?)", mountpoint);
		else
			print_error("cannot sparsify %s: %s", mountpoint, strerror(-ret));
		return EXIT_FAILURE;
	}
	uint64_t run = sp.run;
	for (;;) {
		sparsify_show(&d, sp.guest_done, sp.guest_clusters, sp.freed);
		if (sp.state != QCOWFS_SPARSIFY_RUNNING || sp.run != run)
			break;
		sleep_ms(STATUS_POLL_MS);
		sp = (struct qcowfs_sparsify){ .op = QCOWFS_SPARSIFY_QUERY };
		ret = mount_ioctl(mountpoint, O_RDONLY, QCOWFS_IOC_SPARSIFY, &sp);
		if (ret < 0) {
			sparsify_display_end(&d, false, 0);
			print_error("lost track of the sparsify on %s: %s", mountpoint, strerror(-ret));
			return EXIT_FAILURE;
		}
	}
	sparsify_display_end(&d, sp.run == run && sp.state == QCOWFS_SPARSIFY_DONE && sp.error == 0, sp.freed);
	if (sp.run != run) {
		print_error("lost track of the sparsify on %s: another one started", mountpoint);
		return EXIT_FAILURE;
	}
	sparsify_summary(sp.scanned, sp.freed, sp.bytes_freed, sp.skipped_shared, sp.skipped_compressed,
			 sp.skipped_changed, sp.skipped_backing);
	if (sp.error < 0) {
		print_error("sparsify of %s failed: %s", mountpoint, strerror(-sp.error));
		return EXIT_FAILURE;
	}
	if (mount_read_status(mountpoint, &after) == 0 && sp.freed)
		printf("the image file is %" PRIu64 " bytes; compaction shortens it in the background "
		       "('qcowctl compact %s' waits for it)\n", after.file_size, mountpoint);
	return EXIT_SUCCESS;
}

static int sparsify_image_progress(const struct qcow_sparsify_result *r, void *opaque)
{
	sparsify_show(opaque, r->guest_done, r->guest_clusters, r->freed);
	return 0;
}

/* Offline: sparsify, then compact (no recycler runs in this process). */
static int sparsify_image(const char *image)
{
	struct qcow_open_opts opts;
	struct qcow_image *img = NULL;
	struct qcow_sparsify_result r;
	struct sparsify_display d = { .tty = isatty(STDOUT_FILENO), .shown = -1 };
	struct stat before, after;
	char err[1024] = "", what[PATH_MAX + 32];

	if (stat(image, &before) < 0) {
		print_error("cannot access %s: %s", image, strerror(errno));
		return EXIT_FAILURE;
	}
	qcow_open_opts_default(&opts);
	opts.recycler = false;
	opts.compact = false;
	opts.data_file = opt_data_file;
	snprintf(what, sizeof(what), "cannot open %s", image);
	engine_call_begin(true);
	int ret = qcow_image_open(image, &opts, &img, err, sizeof(err));
	engine_call_end(ret, what, err);
	if (ret < 0) {
		if (ret == -EAGAIN || ret == -EBUSY || ret == -EWOULDBLOCK)
			fprintf(stderr, "qcowctl: if %s is mounted, run 'qcowctl sparsify MOUNTPOINT'\n", image);
		return EXIT_FAILURE;
	}
	ret = qcow_image_sparsify(img, sparsify_image_progress, &d, &r);
	sparsify_display_end(&d, ret == 0, r.freed);
	sparsify_summary(r.scanned, r.freed, r.bytes_freed, r.skipped_shared, r.skipped_compressed,
			 r.skipped_changed, r.skipped_backing);
	if (ret < 0)
		print_error("sparsify of %s failed: %s", image, strerror(-ret));
	else if (r.freed && (ret = qcow_image_compact(img, NULL, NULL)) < 0)
		print_error("compacting %s after the sparsify failed: %s", image, strerror(-ret));
	/* close even after a failure: it writes exact refcounts */
	int close_ret = qcow_image_close(img);
	if (close_ret < 0) {
		print_error("closing %s failed: %s", image, strerror(-close_ret));
		return EXIT_FAILURE;
	}
	if (ret < 0)
		return EXIT_FAILURE;
	if (stat(image, &after) == 0)
		printf("image file %" PRIu64 " -> %" PRIu64 " bytes\n", (uint64_t)before.st_size,
		       (uint64_t)after.st_size);
	return EXIT_SUCCESS;
}

static int cmd_sparsify(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_stats st;
	const char *target;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		if (opt == 'h') {
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		}
		return bad_option(self, opt, argv);
	}
	ret = single_operand(self, argc, argv, "MOUNTPOINT or IMAGE", &target);
	if (ret)
		return ret;
	/* A live mount answers the status ioctl; an image file does not. */
	ret = mount_read_status(target, &st);
	if (ret == 0)
		return sparsify_mount(target, &st);
	if (errno_means_not_qcowfs(-ret))
		return sparsify_image(target);
	if (ret == -ENOENT)
		print_error("cannot access %s: %s", target, strerror(ENOENT));
	else
		report_status_error(target, ret);
	return EXIT_FAILURE;
}

/* ---- snapshot -------------------------------------------------------------- */

enum snap_action { SNAP_CREATE, SNAP_DELETE, SNAP_APPLY, SNAP_LIST };
static const char *const snap_action_names[] = { "create", "delete", "apply", "list" };

/* What a failed snapshot operation means, for the user. */
static void snapshot_report_error(enum snap_action act, const char *name, const char *target, int ret)
{
	const char *what = snap_action_names[act];
	switch (-ret) {
	case ENOENT:
		print_error("snapshot %s: %s has no snapshot with the id or name '%s'", what, target, name);
		break;
	case EEXIST:
		print_error("snapshot %s: %s already has a snapshot named '%s'", what, target, name);
		break;
	case EBUSY:
		print_error("snapshot %s: a snapshot of %s is mounted read-only by another process; unmount it first",
			    what, target);
		break;
	case EPERM:
		print_error("snapshot apply: %s is mounted: applying '%s' changes the disk under whoever uses it; "
			    "add --force if that is what you want", target, name);
		break;
	case EROFS:
		print_error("snapshot %s: %s is read-only", what, target);
		break;
	case EBADF:
	case EACCES:
		print_error("snapshot %s: no write permission on %s", what, target);
		break;
	case ENOTSUP:
		/* the engine's two refusals: no shared clusters possible, or
		 * (as QEMU) no internal snapshots beside an external data file */
		print_error("snapshot %s: %s cannot have internal snapshots: it has 1-bit refcounts, which cannot share "
			    "clusters, or an external data file, which QEMU allows no internal snapshots with", what, target);
		break;
	case ERANGE:
		print_error("snapshot %s: a cluster of %s would have more references than its refcount width holds "
			    "(qemu-img amend -o refcount_bits=16 widens it)", what, target);
		break;
	default:
		print_error("snapshot %s '%s' on %s failed: %s", what, name ? name : "", target, strerror(-ret));
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
		format_human_size(v[i].vm_state_size, vm, sizeof(vm));
		format_human_size(v[i].disk_size, disk, sizeof(disk));
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
		ret = mount_ioctl(target, O_RDONLY, QCOWFS_IOC_SNAPSHOT_LIST, l);
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
	struct qcow_open_opts opts;
	struct qcow_image *img = NULL;
	char err[1024] = "", what[PATH_MAX + 32];
	qcow_open_opts_default(&opts);
	/* offline: the image lock as a writer (a reader for list); the work
	 * happens in this thread, no recycler */
	opts.read_only = act == SNAP_LIST;
	opts.data_file = opt_data_file;
	opts.recycler = false;
	opts.compact = false;
	snprintf(what, sizeof(what), "cannot open %s", image);
	engine_call_begin(true);
	int ret = qcow_image_open(image, &opts, &img, err, sizeof(err));
	engine_call_end(ret, what, err);
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
	int close_ret = qcow_image_close(img);
	if (close_ret < 0) {
		print_error("closing %s failed: %s", image, strerror(-close_ret));
		return EXIT_FAILURE;
	}
	return ret ? EXIT_FAILURE : EXIT_SUCCESS;
}

static int cmd_snapshot(const struct command *self, int argc, char **argv)
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
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	if (optind >= argc)
		return usage_error(self, "missing the action (create, delete, list or apply)");
	int act = -1;
	for (int i = 0; i < 4; i++)
		if (!strcmp(argv[optind], snap_action_names[i]))
			act = i;
	if (act < 0)
		return usage_error(self, "unknown action '%s' (create, delete, list or apply)", argv[optind]);
	optind++;
	int want = act == SNAP_LIST ? 1 : 2;
	if (argc - optind < want)
		return usage_error(self, "missing %s", act == SNAP_LIST || argc - optind == 1 ? "MOUNTPOINT or IMAGE" : "NAME");
	if (argc - optind > want)
		return usage_error(self, "unexpected argument '%s'", argv[optind + want]);
	if (force && act != SNAP_APPLY)
		return usage_error(self, "--force is only for apply");
	const char *name = act == SNAP_LIST ? NULL : argv[optind];
	const char *target = argv[optind + want - 1];
	if (name && (!*name || strlen(name) > QCOW_SNAPSHOT_NAME_MAX))
		return usage_error(self, "a snapshot name has 1 to %d bytes", QCOW_SNAPSHOT_NAME_MAX);

	/* A live mount answers the status ioctl; an image file does not. */
	struct qcow_stats st;
	int ret = mount_read_status(target, &st);
	if (ret == 0)
		return snapshot_mount((enum snap_action)act, name, force, target);
	if (errno_means_not_qcowfs(-ret))
		return snapshot_image((enum snap_action)act, name, target);
	if (ret == -ENOENT)
		print_error("cannot access %s: %s", target, strerror(ENOENT));
	else
		report_status_error(target, ret);
	return EXIT_FAILURE;
}


/* ---- unmount ------------------------------------------------------------- */

/* Runs "fusermount3 -u MOUNTPOINT"; returns its exit status, 127 when it
 * could not be started, or -errno when fork failed.  quiet: its stderr
 * goes to /dev/null (an attempt that will be retried). */
static int run_fusermount(const char *mountpoint, bool quiet)
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
	int ret = mount_read_status_text(mountpoint, &text);

	if (ret < 0) {
		if (errno_means_not_qcowfs(-ret) || ret == -ENOTCONN)
			report_status_error(mountpoint, ret);
		else
			print_error("cannot query %s: %s", mountpoint, strerror(-ret));
		return ret;
	}
	pid_text = status_value(text, "pid");
	*image = status_value(text, "image");
	*report = status_value(text, "close_report");
	free(text);
	if (!pid_text || !*image || parse_unsigned(pid_text, &value) < 0 || value < 2 || value > INT_MAX) {
		print_error("%s: qcowfs reported no valid pid and image path", mountpoint);
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

		status = run_fusermount(mountpoint, !last);
		if (status == 0)
			return 0;
		if (status == 127 || status < 0)
			break;   /* not installed: retrying will not help */
		if (!last)
			sleep_ms(UNMOUNT_RETRY_MS);
	}
	/* Root can unmount without fusermount3 (not installed, or it refused
	 * for a reason umount2 does not share). */
	if (geteuid() == 0) {
		if (umount2(mountpoint, 0) == 0)
			return 0;
		print_error("cannot unmount %s: %s", mountpoint, strerror(errno));
		return -1;
	}
	if (status == 127)
		print_error("cannot unmount %s: fusermount3 could not be run", mountpoint);
	else if (status < 0)
		print_error("cannot unmount %s: %s", mountpoint, strerror(-status));
	else
		print_error("cannot unmount %s: fusermount3 -u failed", mountpoint);
	return -1;
}

/* The daemon closes the image (flush, exact refcounts, unlock) after the
 * unmount and exits only then; its exit is the sign the image is free. */
static int wait_for_daemon_exit(pid_t pid, const char *image)
{
	uint64_t start = monotonic_ms();
	bool announced = false;

	while (process_running(pid)) {
		uint64_t waited = monotonic_ms() - start;

		if (waited >= UNMOUNT_WAIT_MS) {
			print_error("qcowfs (pid %ld) did not exit within %d s; %s may still be in use",
				    (long)pid, UNMOUNT_WAIT_MS / 1000, image);
			return -1;
		}
		if (!announced && waited >= 2000) {
			fprintf(stderr, "qcowctl: waiting for qcowfs (pid %ld) to close %s...\n",
				(long)pid, image);
			announced = true;
		}
		sleep_ms(100);
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
	uint64_t start = monotonic_ms();
	bool announced = false, eof = false;

	memset(rep, 0, sizeof(*rep));
	while (!eof) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		uint64_t waited = monotonic_ms() - start;

		if (waited >= UNMOUNT_WAIT_MS) {
			print_error("qcowfs (pid %ld) sent no close report within %d s",
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
	if (parse_unsigned(text + 5, &status) < 0 || status > 255)
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
		print_error("qcowfs: %.*s", (int)n, line);
		line += n + (line[n] == '\n');
	}
}

static int cmd_unmount(const struct command *self, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_check_result res;
	struct close_report report = { .received = false };
	const char *mountpoint;
	char *image = NULL, *report_name = NULL;
	char err[1024] = "", what[2 * PATH_MAX + 64];
	pid_t pid = 0;
	int opt, ret, status = EXIT_FAILURE, report_fd = -1;

	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'h':
			print_command_help(self, stdout);
			return EXIT_SUCCESS;
		default:
			return bad_option(self, opt, argv);
		}
	}
	ret = single_operand(self, argc, argv, "MOUNTPOINT", &mountpoint);
	if (ret)
		return ret;

	if (unmount_identify(mountpoint, &pid, &image, &report_name) < 0)
		return EXIT_FAILURE;
	/* Before the unmount: afterwards the daemon is about to go. */
	report_fd = report_name ? close_report_connect(report_name, pid) : -ENOENT;
	if (report_fd < 0 && report_name)
		print_error("warning: no close report from qcowfs at %s: %s; the image will be checked instead",
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
		print_error("unmounted %s, but qcowfs reported a failure (exit status %d):",
			    mountpoint, report.exit_status);
		close_report_print(&report);
		goto out;
	}

	/* Problems found are the news here: show them like check does. */
	engine_log_route(true, stdout);
	memset(&res, 0, sizeof(res));
	snprintf(what, sizeof(what), "unmounted %s, but cannot check %s", mountpoint, image);
	engine_call_begin(false);
	ret = qcow_check(image, &res, err, sizeof(err));
	engine_log_route(false, stderr);
	engine_call_end(ret, what, err);
	if (ret < 0)
		goto out;
	if (res.errors || res.leaks) {
		print_error("unmounted %s, but %s was not closed cleanly: %" PRIu64 " errors, %" PRIu64
			    " leaked clusters", mountpoint, image, res.errors, res.leaks);
		goto out;
	}
	if (report.received)
		printf("unmounted %s; %s closed cleanly\n", mountpoint, image);
	else
		printf("unmounted %s; qcowfs sent no close report, but %s checks clean\n",
		       mountpoint, image);
	status = EXIT_SUCCESS;
out:
	if (report_fd >= 0)
		close(report_fd);
	free(image);
	free(report_name);
	return status;
}

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
	{ "status", cmd_status, "status [--json|--raw] MOUNTPOINT",
	  "show the live statistics of a qcowfs mount",
	  "      --json               print a JSON object\n"
	  "      --raw                print the daemon's key=value lines as they are (for scripts)\n", NULL },
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
	  "Exit status: 0 when qcowfs closed the image cleanly and the check is clean\n"
	  "(or, from a qcowfs without a report, the check alone is clean); 1 otherwise.\n" },
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
		return usage_error(self, "unexpected argument '%s'", argv[2]);
	cmd = command_find(argv[1]);
	if (!cmd)
		return usage_error(self, "unknown command '%s'", argv[1]);
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

	engine_log.stream = stderr;
	qcow_log_set_sink(engine_log_sink, &engine_log);

	for (; first < argc && argv[first][0] == '-'; first++) {
		const char *arg = argv[first];

		if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
			print_global_usage(stdout);
			return EXIT_SUCCESS;
		} else if (strcmp(arg, "--version") == 0 || strcmp(arg, "-V") == 0) {
			print_version();
			return EXIT_SUCCESS;
		} else if (strcmp(arg, "--verbose") == 0 || strcmp(arg, "-v") == 0) {
			engine_log.max_level = QCOW_LOG_DEBUG;
			qcow_log_set_verbosity(QCOW_LOG_DEBUG);
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
