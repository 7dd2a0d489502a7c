/*
 * qcow_stats_text.c - the text form of struct qcow_stats.
 *
 * Owns qcow_stats_format and qcow_stats_parse, the two ends of the status
 * channel between the qcowfs daemon (which answers the QCOWFS_IOC_STATUS
 * ioctl with this text) and qcowctl (which parses it back).
 *
 * The format is one "key=value\n" line per field of struct qcow_stats, in
 * declaration order, the key being the field name:
 *   - uint64_t fields in decimal,
 *   - int fields (a negative errno) in signed decimal,
 *   - bool fields as 0 or 1,
 *   - double fields with "%.6f", always with '.' as the decimal point,
 *   - text fields (char arrays: blocker) escaped so that any byte survives
 *     and a value never spans lines: a backslash is written as two
 *     backslashes, every byte below 0x20 and 0x7f as a backslash, 'x' and
 *     two lower-case hex digits; all other bytes (UTF-8 included) as they
 *     are.  A value longer than the field after unescaping is cut to fit
 *     (the field stays NUL-terminated): a newer daemon may allow more.
 *
 * Rules:
 *  - The daemon and qcowctl may be different builds, so parse ignores keys
 *    it does not know and leaves fields it does not find at zero; a known
 *    key with a malformed value is an error, never a silent zero.
 *  - parse fills *st only on success, so a caller never sees half a status.
 *  - Every field of struct qcow_stats must appear in stats_fields[] below;
 *    adding a field to the struct without adding it here silently drops it
 *    from the channel (the round-trip unit test catches that).
 *  - Depends on qcow.h and libc only: no engine state, no allocation.
 */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"

enum stats_field_kind { STATS_U64, STATS_INT, STATS_BOOL, STATS_DOUBLE, STATS_TEXT };

struct stats_field {
	const char *name;
	size_t offset;
	size_t size;            /* bytes of the field (the array, for text) */
	enum stats_field_kind kind;
};

#define STATS_FIELD(field, kind) \
	{ #field, offsetof(struct qcow_stats, field), sizeof(((struct qcow_stats *)0)->field), kind }

static const struct stats_field stats_fields[] = {
	STATS_FIELD(virtual_size, STATS_U64),
	STATS_FIELD(cluster_size, STATS_U64),
	STATS_FIELD(file_size, STATS_U64),
	STATS_FIELD(file_allocated, STATS_U64),
	STATS_FIELD(clusters_total, STATS_U64),
	STATS_FIELD(clusters_header, STATS_U64),
	STATS_FIELD(clusters_referenced, STATS_U64),
	STATS_FIELD(clusters_junk, STATS_U64),
	STATS_FIELD(clusters_erased, STATS_U64),
	STATS_FIELD(clusters_available, STATS_U64),
	STATS_FIELD(clusters_copies, STATS_U64),
	STATS_FIELD(clusters_roots, STATS_U64),
	STATS_FIELD(clusters_pending, STATS_U64),
	STATS_FIELD(clusters_shared, STATS_U64),
	STATS_FIELD(map_bytes, STATS_U64),
	STATS_FIELD(moves_in_flight, STATS_U64),
	STATS_FIELD(bytes_reclaimed, STATS_U64),
	STATS_FIELD(bytes_discarded, STATS_U64),
	STATS_FIELD(bytes_discard_requested, STATS_U64),
	STATS_FIELD(compactions_done, STATS_U64),
	STATS_FIELD(clusters_moved, STATS_U64),
	STATS_FIELD(streams_repacked, STATS_U64),
	STATS_FIELD(compacting, STATS_BOOL),
	STATS_FIELD(compact_progress, STATS_DOUBLE),
	STATS_FIELD(punch_supported, STATS_BOOL),
	STATS_FIELD(read_only, STATS_BOOL),
	STATS_FIELD(last_error, STATS_INT),
	STATS_FIELD(failed, STATS_BOOL),
	STATS_FIELD(compactions_failed, STATS_U64),
	STATS_FIELD(min_file_size, STATS_U64),
	STATS_FIELD(blocker, STATS_TEXT),
};

#define STATS_FIELD_COUNT (sizeof(stats_fields) / sizeof(stats_fields[0]))

/*
 * printf("%f") and strtod follow LC_NUMERIC, so a daemon or tool that ever
 * called setlocale(LC_ALL, "") under, say, de_DE would write "0,500000"
 * and the other side would misread it.  The text is a wire format, so both
 * directions run under the "C" locale for the calling thread only
 * (uselocale is per-thread, unlike setlocale).  If the C locale object
 * cannot be created (out of memory), the current locale is used: that is
 * still right in every program that never changed LC_NUMERIC.
 */
struct c_numeric_scope {
	locale_t c_locale;
	locale_t saved;
};

static void c_numeric_enter(struct c_numeric_scope *scope)
{
	scope->c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
	scope->saved = scope->c_locale ? uselocale(scope->c_locale) : (locale_t)0;
}

static void c_numeric_leave(struct c_numeric_scope *scope)
{
	if (scope->c_locale) {
		uselocale(scope->saved);
		freelocale(scope->c_locale);
	}
}

/* Bytes a text field's value takes escaped (see the file top). */
static bool text_byte_plain(unsigned char c)
{
	return c >= 0x20 && c != 0x7f && c != '\\';
}

/* Writes the escaped text of the NUL-terminated-within-size field like
 * snprintf: at most room bytes including a NUL, returns the full length. */
static int format_text(char *dst, size_t room, const char *name, const char *text, size_t size)
{
	static const char hex[] = "0123456789abcdef";
	size_t len = strnlen(text, size), used;
	int n = snprintf(dst, room, "%s=", name);

	if (n < 0)
		return n;
	used = (size_t)n;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)text[i];
		char esc[4];
		size_t elen;

		if (text_byte_plain(c)) {
			esc[0] = (char)c;
			elen = 1;
		} else if (c == '\\') {
			esc[0] = esc[1] = '\\';
			elen = 2;
		} else {
			esc[0] = '\\';
			esc[1] = 'x';
			esc[2] = hex[c >> 4];
			esc[3] = hex[c & 15];
			elen = 4;
		}
		if (used + elen < room)
			memcpy(dst + used, esc, elen);
		used += elen;
	}
	if (used + 1 < room) {
		dst[used] = '\n';
		dst[used + 1] = '\0';
	} else if (room > 0) {
		dst[room - 1] = '\0';
	}
	used++;
	return used > (size_t)INT_MAX ? -1 : (int)used;
}

int qcow_stats_format(const struct qcow_stats *st, char *buf, size_t len)
{
	const char *base = (const char *)st;
	struct c_numeric_scope scope;
	size_t used = 0;      /* bytes the complete text needs so far, without the NUL */
	bool fits = len > 0;  /* buf may be NULL when len is 0 */

	c_numeric_enter(&scope);
	for (size_t i = 0; i < STATS_FIELD_COUNT; i++) {
		const struct stats_field *f = &stats_fields[i];
		const void *value = base + f->offset;
		/* Past the end of buf, keep counting with a zero-size snprintf
		 * so the loop stays simple; the result is -ERANGE anyway. */
		char *dst = fits ? buf + used : NULL;
		size_t room = fits ? len - used : 0;
		int n;

		switch (f->kind) {
		case STATS_U64: {
			uint64_t v;
			memcpy(&v, value, sizeof(v));
			n = snprintf(dst, room, "%s=%llu\n", f->name, (unsigned long long)v);
			break;
		}
		case STATS_INT: {
			int v;
			memcpy(&v, value, sizeof(v));
			n = snprintf(dst, room, "%s=%d\n", f->name, v);
			break;
		}
		case STATS_BOOL: {
			bool v;
			memcpy(&v, value, sizeof(v));
			n = snprintf(dst, room, "%s=%d\n", f->name, v ? 1 : 0);
			break;
		}
		case STATS_DOUBLE: {
			double v;
			memcpy(&v, value, sizeof(v));
			n = snprintf(dst, room, "%s=%.6f\n", f->name, v);
			break;
		}
		case STATS_TEXT:
			n = format_text(dst, room, f->name, value, f->size);
			break;
		default:
			n = -1;
			break;
		}
		if (n < 0) {
			c_numeric_leave(&scope);
			return -EINVAL;
		}
		used += (size_t)n;
		if (used >= len)
			fits = false;
	}
	c_numeric_leave(&scope);

	if (!fits) {
		if (len > 0)
			buf[0] = '\0';
		return -ERANGE;
	}
	return (int)used;
}

static const struct stats_field *stats_field_find(const char *key, size_t key_len)
{
	for (size_t i = 0; i < STATS_FIELD_COUNT; i++) {
		const char *name = stats_fields[i].name;
		if (strlen(name) == key_len && memcmp(name, key, key_len) == 0)
			return &stats_fields[i];
	}
	return NULL;
}

/* Decimal digits only: strtoull alone would accept "-1", " 7" and "0x10". */
static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!isdigit((unsigned char)s[0]))
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return -EINVAL;
	*out = v;
	return 0;
}

/* An optional '-' and decimal digits, within int. */
static int parse_int(const char *s, int *out)
{
	char *end;
	long v;

	if (!isdigit((unsigned char)(s[0] == '-' ? s[1] : s[0])))
		return -EINVAL;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < INT_MIN || v > INT_MAX)
		return -EINVAL;
	*out = (int)v;
	return 0;
}

static int parse_bool(const char *s, bool *out)
{
	if (strcmp(s, "0") == 0)
		*out = false;
	else if (strcmp(s, "1") == 0)
		*out = true;
	else
		return -EINVAL;
	return 0;
}

/* Whatever "%.6f" can write, "nan" and "inf" included: a daemon bug that
 * produces a NaN progress should show up as "nan" in qcowctl status, not
 * make the whole status unreadable. */
static int parse_double(const char *s, double *out)
{
	struct c_numeric_scope scope;
	char *end;
	double v;

	if (s[0] == '\0' || isspace((unsigned char)s[0]))
		return -EINVAL;
	c_numeric_enter(&scope);
	v = strtod(s, &end);
	c_numeric_leave(&scope);
	if (*end != '\0')
		return -EINVAL;
	*out = v;
	return 0;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Unescapes the len bytes at s into the size-byte field dst (see the file
 * top).  A bad escape, or a raw byte that must have been escaped, is an
 * error; a value too long for the field is cut. */
static int parse_text(const char *s, size_t len, char *dst, size_t size)
{
	size_t out = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '\\') {
			if (i + 1 < len && s[i + 1] == '\\') {
				i++;
			} else if (i + 3 < len && s[i + 1] == 'x' && hex_digit(s[i + 2]) >= 0 &&
				   hex_digit(s[i + 3]) >= 0) {
				c = (unsigned char)(hex_digit(s[i + 2]) << 4 | hex_digit(s[i + 3]));
				i += 3;
				if (c == 0)
					return -EINVAL;   /* a C string holds no NUL */
			} else {
				return -EINVAL;
			}
		} else if (!text_byte_plain(c)) {
			return -EINVAL;
		}
		if (out + 1 < size)
			dst[out++] = (char)c;
	}
	if (size > 0)
		dst[out] = '\0';
	return 0;
}

/* Parses one value (len bytes at value, not NUL-terminated) into the field
 * of *st. */
static int stats_field_set(const struct stats_field *f, const char *value, size_t value_len,
			   struct qcow_stats *st)
{
	char *dst = (char *)st + f->offset;
	char copy[400];  /* "%.6f" of DBL_MAX is 316 characters */
	int ret;

	if (f->kind == STATS_TEXT)
		return parse_text(value, value_len, dst, f->size);
	/* Longer than any valid number of any kind. */
	if (value_len >= sizeof(copy))
		return -EINVAL;
	memcpy(copy, value, value_len);
	copy[value_len] = '\0';

	switch (f->kind) {
	case STATS_U64: {
		uint64_t v;
		ret = parse_u64(copy, &v);
		if (ret == 0)
			memcpy(dst, &v, sizeof(v));
		return ret;
	}
	case STATS_INT: {
		int v;
		ret = parse_int(copy, &v);
		if (ret == 0)
			memcpy(dst, &v, sizeof(v));
		return ret;
	}
	case STATS_BOOL: {
		bool v;
		ret = parse_bool(copy, &v);
		if (ret == 0)
			memcpy(dst, &v, sizeof(v));
		return ret;
	}
	case STATS_DOUBLE: {
		double v;
		ret = parse_double(copy, &v);
		if (ret == 0)
			memcpy(dst, &v, sizeof(v));
		return ret;
	}
	case STATS_TEXT:
		break;
	}
	return -EINVAL;
}

int qcow_stats_parse(const char *text, struct qcow_stats *st)
{
	struct qcow_stats parsed;
	const char *line = text;

	if (!text || !st)
		return -EINVAL;
	memset(&parsed, 0, sizeof(parsed));

	while (*line) {
		const char *eol = strchr(line, '\n');
		size_t line_len = eol ? (size_t)(eol - line) : strlen(line);
		const char *next = eol ? eol + 1 : line + line_len;
		const char *eq;
		const struct stats_field *f;

		/* Tolerate CRLF and blank lines: they carry no field. */
		if (line_len > 0 && line[line_len - 1] == '\r')
			line_len--;
		if (line_len == 0) {
			line = next;
			continue;
		}

		eq = memchr(line, '=', line_len);
		if (!eq || eq == line)
			return -EINVAL;
		f = stats_field_find(line, (size_t)(eq - line));
		if (f && stats_field_set(f, eq + 1, line_len - (size_t)(eq + 1 - line), &parsed) < 0)
			return -EINVAL;
		line = next;
	}

	*st = parsed;
	return 0;
}
