/*
 * qcow_mem.h - the one allocation wrapper of libqcow.
 *
 * Every allocation of the engine goes through these functions so that a
 * build can switch between jemalloc (production: low fragmentation for the
 * many cluster-sized buffers) and libc malloc (--without-jemalloc, for ASan
 * and Valgrind).  They return NULL on failure; callers turn that into
 * -ENOMEM.  Nothing here aborts.
 */
#ifndef QCOW_MEM_H
#define QCOW_MEM_H
#include <stddef.h>

void *qcow_malloc(size_t n);
void *qcow_calloc(size_t count, size_t size);
void *qcow_realloc(void *p, size_t n);
void *qcow_aligned_alloc(size_t alignment, size_t n); /* free with qcow_free */
char *qcow_strdup(const char *s);
void qcow_free(void *p);

/* Frees *(void **)p; for __attribute__((cleanup(qcow_freep))). */
void qcow_freep(void *p);
#define QCOW_AUTOFREE __attribute__((cleanup(qcow_freep)))

#endif
