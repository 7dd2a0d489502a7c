/*
 * qcow_mem.c - allocation wrapper: jemalloc when configured, else libc.
 *
 * Owns: the choice of allocator.  Rule: no other file calls malloc/free.
 */
#include "config.h"
#include <errno.h>
#include "qcow_mem.h"
#include "qcow.h"

#include <stdlib.h>
#include <string.h>

#ifdef HAVE_JEMALLOC
/* Debian's jemalloc is built without a symbol prefix: linking it replaces
 * malloc/free for the whole process, so the standard names below are
 * jemalloc's.  The header is needed for mallctl (version string). */
#include <jemalloc/jemalloc.h>
#endif

void *qcow_malloc(size_t n) { return malloc(n ? n : 1); }
void *qcow_calloc(size_t count, size_t size) { return calloc(count ? count : 1, size ? size : 1); }
void *qcow_realloc(void *p, size_t n) { return realloc(p, n ? n : 1); }

void *qcow_aligned_alloc(size_t alignment, size_t n)
{
	void *p = NULL;
	if (posix_memalign(&p, alignment, n ? n : 1) != 0)
		return NULL;
	return p;
}

char *qcow_strdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char *d = qcow_malloc(n);
	if (d)
		memcpy(d, s, n);
	return d;
}

void qcow_free(void *p) { free(p); }


const char *qcow_allocator_version(void)
{
#ifdef HAVE_JEMALLOC
	static char buf[64];
	const char *v = NULL;
	size_t sz = sizeof(v);
	if (mallctl("version", &v, &sz, NULL, 0) == 0 && v) {
		strncpy(buf, "jemalloc ", sizeof(buf) - 1);
		strncat(buf, v, sizeof(buf) - strlen(buf) - 1);
		return buf;
	}
	return "jemalloc";
#else
	return "libc malloc";
#endif
}

const char *qcow_version(void) { return PACKAGE_VERSION; }

int qcow_u64_list_add(struct qcow_u64_list *l, uint64_t x)
{
	if (l->len == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 256;
		uint64_t *v = qcow_realloc(l->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		l->v = v;
		l->cap = cap;
	}
	l->v[l->len++] = x;
	return 0;
}

void qcow_u64_list_take(struct qcow_u64_list *l, struct qcow_u64_list *to)
{
	*to = *l;
	l->v = NULL;
	l->len = l->cap = 0;
}

void qcow_u64_list_free(struct qcow_u64_list *l)
{
	qcow_free(l->v);
	l->v = NULL;
	l->len = l->cap = 0;
}
