/*
 * qcow_chain.c - backing chains: which file an image's backing name means,
 * its format, and the whole chain below an image.
 *
 * Owns: name resolution, format probing and the chain walk
 * (qcow_chain_list), which qcow_open.c uses before it opens a chain and
 * `qcowctl info --backing-chain` prints.  Rules, as QEMU's:
 *  - A relative backing name resolves against the folder of the image that
 *    names it (not the current folder); an absolute one is used as it is.
 *    Names with a protocol ("nbd:", "json:", "http://") are refused: only
 *    local files are supported.
 *  - The backing format extension is honoured; without it the format is
 *    probed: a qcow2 header is qcow2, a few other formats' magics are
 *    refused by name, anything else is raw.  Only qcow2 and raw backing
 *    files are supported.
 *  - A chain that comes back to a file already in it (same device and
 *    inode), or is deeper than QCOW_CHAIN_MAX_DEPTH images below the top,
 *    is refused with the chain printed.
 *  - Only headers are read here: nothing is locked or written.
 * Layering: a service over the header parser and the file backend; calls
 * nothing above them.
 */
#include "config.h"
#include "qcow_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* A name with a protocol prefix ("nbd:...", "json:{...}", "http://..."):
 * letters, digits, '+', '-', '.' before a ':' and no '/' before it.
 * QEMU's path_has_protocol. */
static bool has_protocol(const char *name)
{
	const char *p = name;
	while (*p && *p != ':' && *p != '/')
		p++;
	return *p == ':' && p != name;
}

int qcow_chain_resolve(const char *image_path, const char *name, char *out, size_t outlen, char *err, size_t errlen)
{
	if (has_protocol(name)) {
		qcow_set_error(err, errlen, "\"%s\" (named by %s) is not a local file (protocol prefix): only local files are supported",
			       name, image_path[0] ? image_path : "an option");
		return -ENOTSUP;
	}
	int n;
	const char *slash = strrchr(image_path, '/');
	if (name[0] == '/' || !slash)
		n = snprintf(out, outlen, "%s", name);
	else
		n = snprintf(out, outlen, "%.*s/%s", (int)(slash - image_path), image_path, name);
	if (n < 0 || (size_t)n >= outlen) {
		qcow_set_error(err, errlen, "the path of \"%s\" (named by %s) is too long", name, image_path[0] ? image_path : "an option");
		return -ENAMETOOLONG;
	}
	return 0;
}

int qcow_chain_probe(const char *path, const char *recorded, char format[8], char *err, size_t errlen)
{
	if (recorded && recorded[0]) {
		if (strcmp(recorded, "qcow2") && strcmp(recorded, "raw")) {
			qcow_set_error(err, errlen, "backing file %s has format \"%s\" (backing format header extension): "
				       "only qcow2 and raw backing files are supported", path, recorded);
			return -ENOTSUP;
		}
		snprintf(format, 8, "%s", recorded);
		return 0;
	}
	struct qcow_io *io;
	int ret = qcow_io_file_open(path, true, &io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot open backing file %s: %s", path, strerror(-ret));
		return ret;
	}
	uint8_t head[8] = { 0 };
	int64_t size = io->ops->size(io);
	if (size >= (int64_t)sizeof(head))
		ret = io->ops->pread(io, head, sizeof(head), 0);
	qcow_io_close(io);
	if (ret) {
		qcow_set_error(err, errlen, "cannot read backing file %s: %s", path, strerror(-ret));
		return ret;
	}
	static const struct { const char *magic; size_t len; const char *name; } others[] = {
		{ "KDMV", 4, "vmdk" }, { "# Disk Descriptor", 8, "vmdk" }, { "conectix", 8, "vpc" },
		{ "QED\0", 4, "qed" }, { "LUKS\xba\xbe", 6, "luks" }, { "cxhd", 4, "vhdx" },
	};
	uint32_t magic = qcow_get_be32(head);
	if (magic == QCOW_MAGIC) {
		uint32_t version = qcow_get_be32(head + 4);
		if (version < 2) {
			qcow_set_error(err, errlen, "backing file %s is a qcow version %u image: only qcow2 and raw backing files are supported",
				       path, version);
			return -ENOTSUP;
		}
		snprintf(format, 8, "qcow2");
		return 0;
	}
	for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++)
		if (memcmp(head, others[i].magic, others[i].len) == 0) {
			qcow_set_error(err, errlen, "backing file %s looks like a %s image: only qcow2 and raw backing files are supported",
				       path, others[i].name);
			return -ENOTSUP;
		}
	snprintf(format, 8, "raw");
	return 0;
}

/* The chain so far, for messages: "a -> b -> c". */
static void chain_text(const struct qcow_chain_entry *v, size_t n, const char *last, char *out, size_t outlen)
{
	size_t used = 0;
	out[0] = 0;
	for (size_t i = 0; i <= n; i++) {
		const char *p = i < n ? v[i].path : last;
		if (!p)
			break;
		int w = snprintf(out + used, outlen - used, "%s%s", i ? " -> " : "", p);
		if (w < 0 || (size_t)w >= outlen - used)
			break;
		used += (size_t)w;
	}
}

int qcow_chain_list(const char *path, const char *backing_override, struct qcow_chain_entry **out, size_t *nout,
		    char *err, size_t errlen)
{
	struct qcow_chain_entry *v = NULL;
	struct stat *ids = NULL;
	size_t n = 0;
	int ret = 0;
	char text[2048];
	*out = NULL;
	*nout = 0;
	v = calloc(QCOW_CHAIN_MAX_DEPTH + 2, sizeof(*v));
	ids = calloc(QCOW_CHAIN_MAX_DEPTH + 2, sizeof(*ids));
	if (!v || !ids) {
		ret = -ENOMEM;
		goto out;
	}
	snprintf(v[0].path, sizeof(v[0].path), "%s", path);
	snprintf(v[0].format, sizeof(v[0].format), "qcow2");
	for (n = 0;; n++) {
		struct qcow_chain_entry *e = &v[n];
		if (stat(e->path, &ids[n]) < 0) {
			ret = -errno;
			if (n == 0)
				qcow_set_error(err, errlen, "cannot open %s: %s", e->path, strerror(errno));
			else
				qcow_set_error(err, errlen, "cannot open backing file %s (named \"%s\" by %s): %s",
					       e->path, e->name, v[n - 1].path, strerror(errno));
			goto out;
		}
		for (size_t i = 0; i < n; i++)
			if (ids[i].st_dev == ids[n].st_dev && ids[i].st_ino == ids[n].st_ino) {
				chain_text(v, n + 1, NULL, text, sizeof(text));
				qcow_set_error(err, errlen, "the backing chain loops: %s", text);
				ret = -ELOOP;
				goto out;
			}
		if (strcmp(e->format, "qcow2"))
			break;   /* raw: the end of the chain */
		struct qcow_io *io;
		struct qcow_header h;
		ret = qcow_io_file_open(e->path, true, &io);
		if (ret) {
			qcow_set_error(err, errlen, "cannot open %s: %s", e->path, strerror(-ret));
			goto out;
		}
		char herr[256] = "";
		ret = qcow_header_read_info(io, &h, herr, sizeof(herr));
		qcow_io_close(io);
		if (ret) {
			if (n)
				qcow_set_error(err, errlen, "backing file %s: %s", e->path, herr);
			else   /* the caller names the image */
				qcow_set_error(err, errlen, "%s", herr);
			goto out;
		}
		char name[sizeof(h.backing_file)], fmt[sizeof(h.backing_format)];
		snprintf(name, sizeof(name), "%s", h.backing_file);
		snprintf(fmt, sizeof(fmt), "%s", h.backing_format);
		qcow_header_free(&h);
		bool overridden = n == 0 && backing_override && backing_override[0];
		if (overridden) {
			snprintf(name, sizeof(name), "%s", backing_override);
			fmt[0] = 0;   /* another file: its format is probed */
		}
		if (!name[0])
			break;
		if (n == QCOW_CHAIN_MAX_DEPTH) {
			chain_text(v, n + 1, name, text, sizeof(text));
			qcow_set_error(err, errlen, "the backing chain is deeper than %u images: %s", QCOW_CHAIN_MAX_DEPTH, text);
			ret = -ELOOP;
			goto out;
		}
		struct qcow_chain_entry *next = &v[n + 1];
		snprintf(next->name, sizeof(next->name), "%s", name);
		if (overridden)
			ret = snprintf(next->path, sizeof(next->path), "%s", name) >= (int)sizeof(next->path) ? -ENAMETOOLONG : 0;
		else
			ret = qcow_chain_resolve(e->path, name, next->path, sizeof(next->path), err, errlen);
		if (ret)
			goto out;
		ret = qcow_chain_probe(next->path, fmt, next->format, err, errlen);
		if (ret)
			goto out;
	}
	*out = v;
	*nout = n + 1;
	v = NULL;
	ret = 0;
out:
	free(v);
	free(ids);
	return ret;
}
