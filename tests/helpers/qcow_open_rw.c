/*
 * qcow_open_rw.c - opens an image with the engine and closes it again,
 * for shell tests that ask "does qcowfs accept this image read-write, and
 * what does the open-and-close leave behind?" without a FUSE mount.
 *
 * usage: qcow_open_rw [--ro] IMAGE
 * Opens IMAGE (read-write unless --ro) with no recycler thread, closes it,
 * and prints on stdout the open time in milliseconds and the peak resident
 * memory of the process in KiB.
 * Exit: 0 opened and closed cleanly, 2 the open refused the image (the
 * reason on stderr), 1 the close failed or usage error.
 */
#include "config.h"
#include "qcow.h"

#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
	struct qcow_open_opts o;
	struct qcow_image *img;
	char err[1024] = "";
	int i = 1;

	qcow_open_opts_default(&o);
	o.recycler = false;
	o.compact = false;
	if (i < argc && strcmp(argv[i], "--ro") == 0) {
		o.read_only = true;
		i++;
	}
	if (i + 1 != argc) {
		fprintf(stderr, "usage: qcow_open_rw [--ro] IMAGE\n");
		return 1;
	}
	double t0 = now_ms();
	int ret = qcow_image_open(argv[i], &o, &img, err, sizeof(err));
	double t1 = now_ms();
	if (ret) {
		fprintf(stderr, "refused: %s (%s)\n", err, strerror(-ret));
		return 2;
	}
	ret = qcow_image_close(img);
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	printf("%.1f %ld\n", t1 - t0, ru.ru_maxrss);
	if (ret) {
		fprintf(stderr, "close failed: %s\n", strerror(-ret));
		return 1;
	}
	return 0;
}
