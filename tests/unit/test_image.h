/*
 * test_image.h - fresh qcow2 images for the unit tests.
 *
 * create_bytes() makes an image with qcow_create in a temporary file and
 * returns its bytes (malloc'ed), ready for a memory or crash-simulator
 * backend.  Header only, like tap.h.
 */
#ifndef TEST_IMAGE_H
#define TEST_IMAGE_H
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow.h"
#include "tap.h"

static inline uint8_t *create_bytes(uint64_t size, unsigned cluster_bits, unsigned order, unsigned version, size_t *len)
{
	char path[] = "/tmp/qcow-unit-XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0, "mkstemp");
	close(fd);
	unlink(path);   /* qcow_create refuses to overwrite */
	struct qcow_create_opts o;
	qcow_create_opts_default(&o);
	o.size = size;
	o.cluster_bits = cluster_bits;
	o.refcount_order = order;
	o.version = version;
	char err[256];
	REQUIRE(qcow_create(path, &o, err, sizeof(err)) == 0, "qcow_create: %s", err);
	struct stat st;
	REQUIRE(stat(path, &st) == 0, "stat %s", path);
	uint8_t *b = malloc((size_t)st.st_size ? (size_t)st.st_size : 1);
	FILE *f = fopen(path, "rb");
	REQUIRE(b && f, "read %s", path);
	*len = fread(b, 1, (size_t)st.st_size, f);
	fclose(f);
	unlink(path);
	REQUIRE(*len == (size_t)st.st_size, "short read of %s", path);
	return b;
}

#endif
