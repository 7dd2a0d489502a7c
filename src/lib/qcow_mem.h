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
#include <stdint.h>

void *qcow_malloc(size_t n);
void *qcow_calloc(size_t count, size_t size);
void *qcow_realloc(void *p, size_t n);
void *qcow_aligned_alloc(size_t alignment, size_t n); /* free with qcow_free */
char *qcow_strdup(const char *s);
void qcow_free(void *p);

/* A growable list of cluster numbers (the erased and released lists). */
struct qcow_u64_list {
	uint64_t *v;
	size_t len, cap;
};
/* Appends x; 0 or -ENOMEM (the list is unchanged then). */
int qcow_u64_list_add(struct qcow_u64_list *l, uint64_t x);
/* Hands the whole list over to *to (which must be empty) and empties l. */
void qcow_u64_list_take(struct qcow_u64_list *l, struct qcow_u64_list *to);
void qcow_u64_list_free(struct qcow_u64_list *l);


#endif
