/*
 * qcow_health.c - the engine's health: errors of background work and the
 * failed state.
 *
 * Owns: img->last_error, img->failed, img->failed_error and the memory of
 * what was logged.  Rules:
 *  - A background operation (erase, compaction, an automatic flush) that
 *    fails calls qcow_note_error.  The error is kept as last_error until a
 *    flush succeeds (qcow_health_flush_ok): a fault that clears leaves no
 *    trace but the log, and the image then closes cleanly.
 *  - Each distinct error (what failed, and how) is logged once until it
 *    clears, so a failing disk does not flood the log.
 *  - qcow_set_failed is for the case where the engine can no longer be
 *    sure that what it holds in memory matches what it would write: from
 *    then on every write, discard, resize and flush returns -EIO, the
 *    state is logged once and shown by the stats, and close reports the
 *    error instead of a clean close.  It never clears while the image is
 *    open.
 *  - err_lock guards these fields; it is the innermost engine lock (taken
 *    with or without img->lock held, never held while taking another).
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <string.h>

void qcow_note_error(struct qcow_image *img, int err, const char *what)
{
	if (err >= 0)
		return;
	pthread_mutex_lock(&img->err_lock);
	bool fresh = img->last_error != err || img->last_error_what != what;
	img->last_error = err;
	img->last_error_what = what;
	pthread_mutex_unlock(&img->err_lock);
	if (fresh)
		qcow_logf(QCOW_LOG_ERROR, "%s: %s failed: %s", img->io->name, what, strerror(-err));
}

void qcow_set_failed(struct qcow_image *img, int err, const char *what)
{
	if (err >= 0)
		err = -EIO;
	pthread_mutex_lock(&img->err_lock);
	bool first = !img->failed;
	if (first) {
		img->failed = true;
		img->failed_error = err;
	}
	pthread_mutex_unlock(&img->err_lock);
	if (first)
		qcow_logf(QCOW_LOG_ERROR, "%s: %s failed (%s) and the engine cannot be sure of the image's state: "
			  "writes are refused from now on; unmount and check the image",
			  img->io->name, what, strerror(-err));
}

int qcow_health_failed(struct qcow_image *img)
{
	pthread_mutex_lock(&img->err_lock);
	int ret = img->failed ? (img->failed_error ? img->failed_error : -EIO) : 0;
	pthread_mutex_unlock(&img->err_lock);
	return ret;
}

void qcow_health_flush_ok(struct qcow_image *img)
{
	pthread_mutex_lock(&img->err_lock);
	bool had = img->last_error != 0;
	img->last_error = 0;
	img->last_error_what = NULL;
	pthread_mutex_unlock(&img->err_lock);
	if (had)
		qcow_logf(QCOW_LOG_INFO, "%s: a flush succeeded again; the earlier error has cleared", img->io->name);
}

void qcow_health_get(struct qcow_image *img, int *last_error, bool *failed)
{
	pthread_mutex_lock(&img->err_lock);
	*last_error = img->failed ? img->failed_error : img->last_error;
	*failed = img->failed;
	pthread_mutex_unlock(&img->err_lock);
}
