/*
 * qcow_datafile.c - the external data file (incompatible feature bit 2,
 * header extension 0x44415441, autoclear bit 1 data_file_raw).
 *
 * Owns: finding, opening and locking the data file (img->data_io), its
 * sync in the flush, and the release of guest clusters' data in it
 * (punching the range a discard or zero write unmapped).
 * Rules (doc/design.md, "The external data file"):
 *  - Guest data lives in the data file; every table stays in the qcow2
 *    file.  As QEMU does, a data cluster's host offset IS its guest offset
 *    (with data_file_raw that is what keeps the data file a valid raw
 *    image; QEMU 7.2 allocates that way without it too), and data clusters
 *    have no refcounts: the cluster map covers the qcow2 file only, so
 *    compaction and truncation never touch the data file.
 *  - The name resolves against the folder of the image that names it;
 *    -o data_file=PATH replaces it for one open.  The data file is opened
 *    read-write or read-only with the image and gets the same
 *    QEMU-compatible locks.
 *  - A punch may destroy data only nobody can reach any more: the entries
 *    are unmapped first (under img->lock), the guest clusters stay claimed
 *    so no write refills them meanwhile, and the punch waits for every
 *    request that resolved before the unmap (a grace period).
 *  - Without a data file img->data_io is img->io, and nothing here runs.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int qcow_datafile_open(struct qcow_image *img, char *err, size_t errlen)
{
	const struct qcow_header *h = &img->hdr;
	const struct qcow_open_opts *o = &img->opts;
	bool has = h->incompatible_features & QCOW_INCOMPAT_DATA_FILE;
	int ret = 0;
	img->data_io = img->io;
	if (!has) {
		if (o->data_file || o->data_io) {
			/* QEMU: "'data-file' can only be set for images with an
			 * external data file" */
			qcow_set_error(err, errlen, "-o data_file=%s: the image has no external data file "
				       "(bit 0x4 of the incompatible features at header offset 72 is clear)",
				       o->data_file ? o->data_file : "(backend)");
			return -EINVAL;
		}
		return 0;
	}
	if (h->nb_snapshots) {
		/* QEMU never makes them (it refuses snapshot creation on such
		 * an image); a snapshot would have to keep data this file's
		 * in-place overwrites destroy */
		qcow_set_error(err, errlen, "the image has an external data file and %u internal snapshots (header offset 60): "
			       "internal snapshots are not supported with an external data file", h->nb_snapshots);
		return -ENOTSUP;
	}
	if (h->incompatible_features & QCOW_INCOMPAT_EXTL2) {
		/* both work on their own; together the write path would need the
		 * subclusters' placement in the data file, which is not built */
		qcow_set_error(err, errlen, "the image has an external data file and extended L2 entries (0x4 and 0x10 of the "
			       "incompatible features at header offset 72): the two together are not supported yet");
		return -ENOTSUP;
	}
	if (h->backing_file_offset && (h->autoclear_features & QCOW_AUTOCLEAR_DATA_FILE_RAW)) {
		qcow_set_error(err, errlen, "the image has a backing file and data_file_raw (0x2 of the autoclear features at "
			       "header offset 88): a raw data file cannot show a backing file, so QEMU never makes such an image");
		return -EINVAL;
	}
	img->data_raw = h->autoclear_features & QCOW_AUTOCLEAR_DATA_FILE_RAW;
	if (o->data_io) {   /* unit tests: a backend the caller made */
		img->data_io = o->data_io;
		img->data_owned = false;
		return 0;
	}
	if (!img->io->ops->lock && !o->data_file) {
		/* a memory backend (unit tests, the fuzz driver): its name is
		 * no folder, and a file an untrusted image names is not opened
		 * from there */
		qcow_set_error(err, errlen, "the image has an external data file (\"%s\", header extension at offset %" PRIu64
			       ") but its backend is not a file: pass the data file's backend", h->data_file, h->data_file_ext);
		return -EINVAL;
	}
	if (!o->data_file && !h->data_file[0]) {
		qcow_set_error(err, errlen, "the image has an external data file (bit 0x4 of the incompatible features at header "
			       "offset 72) but no data file name extension: give it with -o data_file=PATH");
		return -EINVAL;
	}
	char path[4096];
	ret = qcow_chain_resolve(o->data_file ? "" : img->io->name, o->data_file ? o->data_file : h->data_file, path,
				 sizeof(path), err, errlen);
	if (ret)
		return ret;
	img->data_path = qcow_malloc(strlen(path) + 1);
	if (!img->data_path)
		return -ENOMEM;
	strcpy(img->data_path, path);
	struct qcow_io *io = NULL;
	struct stat a, b;
	if (img->io->name && stat(img->io->name, &a) == 0 && stat(img->data_path, &b) == 0 && a.st_dev == b.st_dev &&
	    a.st_ino == b.st_ino) {
		/* guest writes would land on the tables */
		qcow_set_error(err, errlen, "the external data file \"%s\" (header extension at offset %" PRIu64 ") is the image "
			       "itself", img->data_path, h->data_file_ext);
		ret = -EINVAL;
		goto out;
	}
	ret = qcow_io_file_open(img->data_path, img->read_only, &io);
	if (ret) {
		if (o->data_file)
			qcow_set_error(err, errlen, "cannot open the external data file \"%s\" (-o data_file): %s",
				       img->data_path, strerror(-ret));
		else
			qcow_set_error(err, errlen, "cannot open the external data file \"%s\" (named \"%s\" in the header "
				       "extension at offset %" PRIu64 "): %s", img->data_path, h->data_file, h->data_file_ext,
				       strerror(-ret));
		goto out;
	}
	if (!o->no_locking && io->ops->lock) {
		char why[256];
		ret = io->ops->lock(io, img->read_only, why, sizeof(why));
		if (ret) {
			qcow_set_error(err, errlen, "external data file \"%s\": %s", img->data_path, why);
			goto out;
		}
	}
	img->data_io = io;
	img->data_owned = true;
	io = NULL;
out:
	if (io)
		qcow_io_close(io);
	if (ret) {
		qcow_free(img->data_path);
		img->data_path = NULL;
		img->data_io = img->io;
	}
	return ret;
}

void qcow_datafile_close(struct qcow_image *img)
{
	if (img->data_owned)
		qcow_io_close(img->data_io);
	img->data_io = NULL;
	img->data_owned = false;
	qcow_free(img->data_path);
	img->data_path = NULL;
}

int qcow_datafile_sync(struct qcow_image *img)
{
	if (!qcow_datafile_present(img) || img->data_io == img->io)
		return 0;
	int ret = img->data_io->ops->flush(img->data_io);
	if (ret)
		qcow_set_failed(img, ret, "sync of the external data file");
	return ret;
}

/* Zeros [off, off+len) of the data file, freeing its space where the
 * file system can punch. */
static int zero_range(struct qcow_image *img, uint64_t off, uint64_t len)
{
	int ret = img->data_io->ops->punch(img->data_io, off, len);
	if (ret == -EOPNOTSUPP || ret == -ENOTSUP)
		ret = qcow_io_write_zeros(img->data_io, off, len);
	return ret;
}

int qcow_datafile_claim(struct qcow_image *img, uint64_t gc, uint64_t count, uint64_t *wait_gc)
{
	qcow_assert_locked(img);
	for (uint64_t g = gc; g < gc + count; g++)
		if (qcow_claims_held(img, g)) {
			*wait_gc = g;     /* the caller waits (qcow_claims_wait) and calls again */
			return -EAGAIN;
		}
	for (uint64_t g = gc; g < gc + count; g++) {
		int ret = qcow_claims_add(img, g);
		if (ret) {
			while (g-- > gc)
				qcow_claims_drop(img, g);
			return ret;
		}
	}
	return 0;
}

int qcow_datafile_release(struct qcow_image *img, uint64_t gc, uint64_t count, uint64_t ticket)
{
	/* the requests that resolved through the old entries are done with
	 * them before their data goes */
	qcow_inflight_wait_before(img, ticket);
	uint64_t off = gc << img->cluster_bits, len = count << img->cluster_bits;
	int ret = zero_range(img, off, len);
	if (ret)
		qcow_note_error(img, ret, "punching the external data file");
	qcow_lock(img);
	for (uint64_t g = gc; g < gc + count; g++)
		qcow_claims_drop(img, g);
	if (ret == 0)
		img->data_dirty = true;
	qcow_unlock(img);
	/* a failed punch loses nothing: the entries already read zeros; with
	 * data_file_raw the data file then shows stale bytes where the image
	 * shows zeros, which the caller reports */
	return ret;
}

int qcow_datafile_resize(struct qcow_image *img, uint64_t new_size)
{
	if (!img->data_raw || img->data_io == img->io)
		return 0;
	/* a raw image is exactly as long as the disk it shows (as qemu-img
	 * creates it): a grown part reads zeros, as the grown disk does; a
	 * cut part was punched and unmapped by the shrink */
	int64_t sz = img->data_io->ops->size(img->data_io);
	if (sz < 0)
		return (int)sz;
	if ((uint64_t)sz == new_size)
		return 0;
	int ret = img->data_io->ops->truncate(img->data_io, new_size);
	if (ret == 0) {
		qcow_lock(img);
		img->data_dirty = true;   /* the new length is made durable by the flush */
		qcow_unlock(img);
	}
	return ret;
}
