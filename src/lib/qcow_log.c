/*
 * qcow_log.c - the engine's message sink.
 *
 * Owns: where engine messages go (stderr by default, syslog or a test
 * buffer when the caller installs a sink) and the verbosity filter.
 * Rule: the engine never prints directly; it calls qcow_logf.
 */
#include "config.h"
#include "qcow_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static qcow_log_sink log_sink;
static void *log_opaque;
static enum qcow_log_level log_max = QCOW_LOG_INFO;

void qcow_log_set_sink(qcow_log_sink sink, void *opaque)
{
	log_sink = sink;
	log_opaque = opaque;
}

void qcow_log_set_verbosity(enum qcow_log_level max_level) { log_max = max_level; }

void qcow_logf(enum qcow_log_level level, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	if (level > log_max)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (log_sink)
		log_sink(level, msg, log_opaque);
	else
		fprintf(stderr, "qcowfs: %s\n", msg);
}

void qcow_set_error(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

void qcow_assert_failed(const char *what, const char *func)
{
	qcow_logf(QCOW_LOG_ERROR, "internal assertion failed in %s: %s", func, what);
	abort();   /* only reached with runtime_asserts or in a debug build */
}
