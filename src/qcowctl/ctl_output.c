/*
 * ctl_output.c - qcowctl's output: messages, the engine's log, numbers and
 * the JSON writer.
 *
 * Rules:
 *  - Every message for the user on stderr starts with "qcowctl: "
 *    (ctl_print_error); stdout is flushed first so that the two streams
 *    stay in order on a terminal.
 *  - libqcow's log sink is process-wide and the recycler thread may log at
 *    any moment: struct engine_log is the tool's one piece of global
 *    mutable state, and is only touched under its lock.
 *  - Numbers go out locale-independent (the tool never calls setlocale);
 *    JSON goes to stdout pretty-printed like qemu-img's --output=json, and
 *    text from an image (names, messages) is made safe for a terminal or
 *    for JSON before it is printed.
 */

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"
#include "qcowctl.h"

/* ---- messages ----------------------------------------------------------- */

void ctl_print_error(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);   /* keep stdout and stderr in order on a terminal */
	fputs("qcowctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
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
		/* printed, or folded into the failure message, by ctl_engine_call_end */
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

/* Installs the sink before any engine call: messages go to stderr at
 * info level until a command routes them elsewhere. */
void ctl_engine_log_init(void)
{
	engine_log.stream = stderr;
	qcow_log_set_sink(engine_log_sink, &engine_log);
}

/* --verbose: the engine's debug messages too. */
void ctl_engine_log_verbose(void)
{
	pthread_mutex_lock(&engine_log.lock);
	engine_log.max_level = QCOW_LOG_DEBUG;
	pthread_mutex_unlock(&engine_log.lock);
	qcow_log_set_verbosity(QCOW_LOG_DEBUG);
}

/* bare: print to stdout without a prefix (the problems check finds are its
 * output, like qemu-img check); otherwise "qcowctl: ..." on stderr. */
void ctl_engine_log_route(bool bare, FILE *stream)
{
	pthread_mutex_lock(&engine_log.lock);
	engine_log.bare = bare;
	engine_log.stream = stream;
	pthread_mutex_unlock(&engine_log.lock);
}

/* Around an engine call that fills an err buffer (see struct engine_log).
 * check passes hold_errors = false: the errors it logs are the problems it
 * found, its output. */
void ctl_engine_call_begin(bool hold_errors)
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
void ctl_engine_call_end_reason(int ret, const char *what, const char *err, char *reason, size_t len)
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
			ctl_print_error("%s", last);
		return;
	}
	if (!err || !err[0])
		err = held ? last : "";
	if (err[0] && !(!held && strcmp(err, last) == 0))
		ctl_print_error("%s: %s", what, err);
	else
		ctl_print_error("%s: %s", what, strerror(-ret));
	if (len)
		snprintf(reason, len, "%s: %s", what, err[0] ? err : strerror(-ret));
}

void ctl_engine_call_end(int ret, const char *what, const char *err)
{
	ctl_engine_call_end_reason(ret, what, err, NULL, 0);
}

/* Text from the engine or an image (the blocker, snapshot names) on a
 * terminal: control bytes become '?' so that a hostile image cannot drive
 * the terminal through them. */
void ctl_print_text_safely(const char *text)
{
	for (const unsigned char *p = (const unsigned char *)text; *p; p++)
		putchar(*p < 0x20 || *p == 0x7f ? '?' : *p);
}

/* The same, padded with spaces to width columns (bytes, as printf's %-Ns). */
void ctl_print_padded_safely(const char *text, size_t width)
{
	size_t len = strlen(text);

	ctl_print_text_safely(text);
	if (len < width)
		printf("%*s", (int)(width - len), "");
}

/* ---- numbers ------------------------------------------------------------ */

/* "1 GiB", "196 KiB", "1.5 MiB": three significant digits, never "1e+03". */
void ctl_format_human_size(uint64_t bytes, char *buf, size_t len)
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
void ctl_format_size_and_bytes(uint64_t bytes, char *buf, size_t len)
{
	char human[32];

	ctl_format_human_size(bytes, human, sizeof(human));
	snprintf(buf, len, "%s (%" PRIu64 " bytes)", human, bytes);
}

/*
 * A byte count: decimal digits with an optional binary suffix K, M, G or T
 * (also KiB/KB and lower case).  Whole numbers only: "1.5G" is refused
 * rather than rounded, the user can write 1536M.
 */
int ctl_parse_size(const char *text, uint64_t *out)
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
int ctl_parse_unsigned(const char *text, uint64_t *out)
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

bool ctl_is_power_of_two(uint64_t v)
{
	return v && !(v & (v - 1));
}

unsigned ctl_log2_exact(uint64_t v)
{
	unsigned bits = 0;

	while (v > 1) {
		v >>= 1;
		bits++;
	}
	return bits;
}

/* ---- JSON output ---------------------------------------------------------- */

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
void json_object_begin(struct json_writer *j, const char *key)
{
	json_member_start(j, key);
	fputc('{', j->out);
	j->depth++;
	j->need_comma = false;
}

void json_object_end(struct json_writer *j)
{
	j->depth--;
	fprintf(j->out, "\n%*s}", 4 * j->depth, "");
	j->need_comma = true;
	if (j->depth == 0)
		fputc('\n', j->out);
}

void json_u64(struct json_writer *j, const char *key, uint64_t value)
{
	json_member_start(j, key);
	fprintf(j->out, "%" PRIu64, value);
}

void json_bool(struct json_writer *j, const char *key, bool value)
{
	json_member_start(j, key);
	fputs(value ? "true" : "false", j->out);
}

void json_double(struct json_writer *j, const char *key, double value)
{
	json_member_start(j, key);
	if (isfinite(value))
		fprintf(j->out, "%.6f", value);
	else
		fputs("null", j->out);   /* JSON has no NaN */
}

void json_string(struct json_writer *j, const char *key, const char *value)
{
	json_member_start(j, key);
	json_write_string(j->out, value);
}

void json_array_begin(struct json_writer *j, const char *key)
{
	json_member_start(j, key);
	fputc('[', j->out);
	j->depth++;
	j->need_comma = false;
}

void json_array_end(struct json_writer *j)
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

/* A failure as JSON, so that a script reading stdout gets an answer it
 * can parse instead of nothing: {"filename": ..., "error": {"message":
 * ..., "errno": "EINVAL", "errno-value": 22}} (key "mountpoint" instead of
 * "filename" for status).  The message is on stderr
 * as well, and the exit status stays what it was. */
void json_print_error(const char *key, const char *path, const char *message, int err)
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
