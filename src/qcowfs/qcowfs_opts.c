/*
 * qcowfs_opts.c - the command line of the qcowfs daemon: argv to struct
 * qcowfs_opts, the help text and the version text.
 *
 * Accepted forms (all equivalent):
 *     qcowfs [-f] [-d] -o ro,cache_size=64M IMAGE MOUNTPOINT
 *     qcowfs IMAGE MOUNTPOINT -o ro -o cache_size=64M     (mount.fuse3, fstab)
 *
 * Rules:
 *  - Each -o word is classified by exactly one table below: a qcowfs
 *    option (engine or daemon setting), a kernel/libfuse option passed
 *    through unchanged, or a generic mount(8)/fstab word that means
 *    nothing here and is dropped.  Anything else is an error that names
 *    the word, so a typo never mounts with a silently ignored setting.
 *  - Later words override earlier ones (rw after ro means rw), as mount(8)
 *    does.
 *  - Nothing here touches files or exits: errors come back as -EINVAL
 *    plus a message, and qcowfs.c decides what to do.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include "qcowfs.h"

#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "unknown"
#endif

/* More threads than this only add contention on the engine's one mutex. */
#define QCOWFS_MAX_THREADS_LIMIT 1024

/* Kernel and libfuse mount options that fuse_session_new() accepts and
 * that make sense for a one-file mount; passed through as given. */
static const char *const passthrough_words[] = {
	"dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
	"sync", "async", "dirsync", "auto_unmount", "default_permissions",
	NULL
};
/* Passed through as well, with their value (SELinux labels, mtab name). */
static const char *const passthrough_prefixes[] = {
	"fsname=", "subtype=", "context=", "fscontext=", "defcontext=",
	"rootcontext=", NULL
};
/* Words mount(8), mount.fuse3 or fstab may hand us that do not concern a
 * FUSE file system (mount-time policy, or atime variants the kernel does
 * not accept for FUSE through libfuse).  Dropped silently. */
static const char *const ignored_words[] = {
	"defaults", "auto", "noauto", "user", "nouser", "users", "owner",
	"group", "_netdev", "nofail", "relatime", "norelatime", "strictatime",
	"nostrictatime", "diratime", "nodiratime", "lazytime", "nolazytime",
	"iversion", "noiversion", "loud", "silent",
	/* libfuse 2 options whose behaviour is always on in libfuse 3 */
	"nonempty", "big_writes",
	NULL
};
static const char *const ignored_prefixes[] = {
	"x-", "comment=", "user=", NULL
};

/* A growable string for the pass-through option list. */
struct strbuf {
	char *text;
	size_t len, cap;
};

static int strbuf_append(struct strbuf *sb, const char *s, size_t n)
{
	if (sb->len + n + 1 > sb->cap) {
		size_t cap = sb->cap ? sb->cap : 64;
		while (cap < sb->len + n + 1)
			cap *= 2;
		char *p = realloc(sb->text, cap);
		if (!p)
			return -ENOMEM;
		sb->text = p;
		sb->cap = cap;
	}
	memcpy(sb->text + sb->len, s, n);
	sb->len += n;
	sb->text[sb->len] = '\0';
	return 0;
}

/* Appends one option to a comma-separated fuse_opt list, escaping the
 * characters fuse_opt treats specially so a path with a comma stays one
 * option. */
static int strbuf_add_option(struct strbuf *sb, const char *word)
{
	int ret = 0;

	if (sb->len)
		ret = strbuf_append(sb, ",", 1);
	for (const char *p = word; !ret && *p; p++) {
		if (*p == ',' || *p == '\\')
			ret = strbuf_append(sb, "\\", 1);
		if (!ret)
			ret = strbuf_append(sb, p, 1);
	}
	return ret;
}

static void set_error(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static bool word_in(const char *word, const char *const *list)
{
	for (; *list; list++)
		if (!strcmp(word, *list))
			return true;
	return false;
}

static bool prefix_in(const char *word, const char *const *list)
{
	for (; *list; list++)
		if (!strncmp(word, *list, strlen(*list)))
			return true;
	return false;
}

/* "123", "64K", "1.5"-free: an integer with an optional binary suffix
 * K/M/G/T (case-insensitive), optionally followed by "B" or "iB". */
static int parse_bytes(const char *text, uint64_t *out)
{
	char *end;
	unsigned shift = 0;

	if (!*text || *text == '-')
		return -EINVAL;
	errno = 0;
	unsigned long long value = strtoull(text, &end, 10);
	if (errno || end == text)
		return -EINVAL;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	}
	if (shift && (!strcmp(end, "iB") || !strcmp(end, "ib")))
		end += 2;
	else if (*end == 'B' || *end == 'b')
		end++;
	if (*end)
		return -EINVAL;
	if (shift && value > (UINT64_MAX >> shift))
		return -ERANGE;
	*out = (uint64_t)value << shift;
	return 0;
}

static int parse_unsigned(const char *text, unsigned max, unsigned *out)
{
	char *end;

	if (!*text || *text == '-')
		return -EINVAL;
	errno = 0;
	unsigned long value = strtoul(text, &end, 10);
	if (errno || *end || end == text)
		return -EINVAL;
	if (value > max)
		return -ERANGE;
	*out = (unsigned)value;
	return 0;
}

static int parse_switch(const char *text, bool *out)
{
	static const char *const on[] = { "on", "yes", "true", "1", NULL };
	static const char *const off[] = { "off", "no", "false", "0", NULL };

	for (const char *const *w = on; *w; w++)
		if (!strcasecmp(text, *w))
			return *out = true, 0;
	for (const char *const *w = off; *w; w++)
		if (!strcasecmp(text, *w))
			return *out = false, 0;
	return -EINVAL;
}

/* uid=/gid= take a number or a name, like chown. */
/* A file option (backing=, data_file=): stored absolute in *field, since
 * the daemon chdirs to / (a relative name is relative to the folder qcowfs
 * was started in). */
static int set_path_option(const char *key, const char *value, char **field, char *err, size_t errlen)
{
	char *abs = NULL;
	if (!*value)
		return -EINVAL;
	if (value[0] == '/') {
		abs = strdup(value);
	} else {
		char cwd[PATH_MAX];
		if (!getcwd(cwd, sizeof(cwd)) || asprintf(&abs, "%s/%s", cwd, value) < 0) {
			set_error(err, errlen, "cannot make %s=%s an absolute path: %s", key, value, strerror(errno));
			return -EINVAL;
		}
	}
	if (!abs)
		return -ENOMEM;
	free(*field);
	*field = abs;
	return 0;
}

static int parse_uid(const char *text, uid_t *out)
{
	unsigned value;

	if (!parse_unsigned(text, UINT_MAX - 1, &value))
		return *out = value, 0;
	struct passwd *pw = getpwnam(text);
	if (!pw)
		return -EINVAL;
	*out = pw->pw_uid;
	return 0;
}

static int parse_gid(const char *text, gid_t *out)
{
	unsigned value;

	if (!parse_unsigned(text, UINT_MAX - 1, &value))
		return *out = value, 0;
	struct group *gr = getgrnam(text);
	if (!gr)
		return -EINVAL;
	*out = gr->gr_gid;
	return 0;
}

/* Handles one word of a -o list.  Returns 0, or -EINVAL/-ENOMEM with a
 * message. */
static int apply_word(struct qcowfs_opts *opts, struct strbuf *kernel,
		      const char *word, char *err, size_t errlen)
{
	const char *eq = strchr(word, '=');
	const char *value = eq ? eq + 1 : NULL;
	size_t keylen = eq ? (size_t)(eq - word) : strlen(word);
	uint64_t bytes;
	int ret = 0;

#define KEY_IS(k) (keylen == strlen(k) && !strncmp(word, k, keylen))
	if (!*word)
		return 0;                         /* "a,,b" or a trailing comma */

	if (!value) {
		if (KEY_IS("ro")) {
			opts->open.read_only = true;
		} else if (KEY_IS("rw")) {
			opts->open.read_only = false;
		} else if (KEY_IS("allow_other")) {
			opts->allow_other = true;
		} else if (KEY_IS("allow_root")) {
			opts->allow_root = true;
		} else if (KEY_IS("runtime_asserts")) {
			opts->open.runtime_asserts = true;
		} else if (KEY_IS("help")) {
			opts->show_help = true;
		} else if (KEY_IS("debug")) {
			opts->debug = opts->foreground = true;
		} else if (word_in(word, passthrough_words)) {
			ret = strbuf_add_option(kernel, word);
		} else if (word_in(word, ignored_words)) {
			/* dropped on purpose, see ignored_words */
		} else if (KEY_IS("compact") || KEY_IS("cache_size") ||
			   KEY_IS("compact_threshold") ||
			   KEY_IS("compact_quiet_ms") || KEY_IS("max_threads") ||
			   KEY_IS("recycler") || KEY_IS("uid") || KEY_IS("gid") ||
			   KEY_IS("detect_zeroes") || KEY_IS("snapshot") ||
			   KEY_IS("backing") || KEY_IS("data_file")) {
			set_error(err, errlen, "option '%s' needs a value (%s=...)",
				  word, word);
			return -EINVAL;
		} else {
			goto unknown;
		}
		return ret;
	}

	if (KEY_IS("cache_size")) {
		ret = parse_bytes(value, &bytes);
		if (!ret && bytes > SIZE_MAX)
			ret = -ERANGE;
		if (!ret)
			opts->open.cache_bytes = (size_t)bytes;
	} else if (KEY_IS("compact")) {
		ret = parse_switch(value, &opts->open.compact);
	} else if (KEY_IS("recycler")) {
		ret = parse_switch(value, &opts->open.recycler);
	} else if (KEY_IS("detect_zeroes")) {
		/* QEMU's words for QEMU's option */
		if (!strcmp(value, "off"))
			opts->open.detect_zeroes = QCOW_DETECT_ZEROES_OFF;
		else if (!strcmp(value, "on"))
			opts->open.detect_zeroes = QCOW_DETECT_ZEROES_ON;
		else if (!strcmp(value, "unmap"))
			opts->open.detect_zeroes = QCOW_DETECT_ZEROES_UNMAP;
		else
			ret = -EINVAL;
		if (ret) {
			set_error(err, errlen, "invalid value for detect_zeroes: '%s' (expected off, on or unmap)", value);
			return -EINVAL;
		}
	} else if (KEY_IS("compact_threshold")) {
		ret = parse_bytes(value, &opts->open.compact_threshold_bytes);
	} else if (KEY_IS("compact_quiet_ms")) {
		ret = parse_unsigned(value, UINT_MAX, &opts->open.compact_quiet_ms);
	} else if (KEY_IS("max_threads")) {
		ret = parse_unsigned(value, QCOWFS_MAX_THREADS_LIMIT, &opts->max_threads);
		if (!ret && opts->max_threads == 0)
			ret = -ERANGE;
	} else if (KEY_IS("snapshot")) {
		/* a snapshot's disk, read-only; the engine takes QEMU's locks
		 * as a reader that shares writes (qemu-img -U), so this works
		 * next to a read-write mount of the same image */
		if (!*value || strlen(value) > QCOW_SNAPSHOT_NAME_MAX) {
			ret = -EINVAL;
		} else {
			free(opts->snapshot);
			opts->snapshot = strdup(value);
			if (!opts->snapshot)
				return -ENOMEM;
			opts->open.snapshot = opts->snapshot;
		}
	} else if (KEY_IS("backing")) {
		ret = set_path_option("backing", value, &opts->backing, err, errlen);
		opts->open.backing = opts->backing;
	} else if (KEY_IS("data_file")) {
		/* the image's external data file for this mount */
		ret = set_path_option("data_file", value, &opts->data_file, err, errlen);
		opts->open.data_file = opts->data_file;
	} else if (KEY_IS("uid")) {
		ret = parse_uid(value, &opts->uid);
		opts->has_uid = !ret;
	} else if (KEY_IS("gid")) {
		ret = parse_gid(value, &opts->gid);
		opts->has_gid = !ret;
	} else if (prefix_in(word, passthrough_prefixes)) {
		if (KEY_IS("fsname"))
			opts->has_fsname = true;
		if (KEY_IS("subtype"))
			opts->has_subtype = true;
		return strbuf_add_option(kernel, word);
	} else if (prefix_in(word, ignored_prefixes)) {
		return 0;
	} else {
		goto unknown;
	}
	if (ret == -ERANGE && KEY_IS("max_threads"))
		set_error(err, errlen, "invalid value for max_threads: '%s' "
			  "(expected 1..%u)", value, QCOWFS_MAX_THREADS_LIMIT);
	else if (ret)
		set_error(err, errlen, "invalid value for %.*s: '%s'",
			  (int)keylen, word, value);
	return ret ? -EINVAL : 0;
#undef KEY_IS

unknown:
	set_error(err, errlen, "unknown option '%s' (see qcowfs --help)", word);
	return -EINVAL;
}

/* Splits one -o argument at unescaped commas ("\," stays a comma, as in
 * fuse_opt) and applies each word. */
static int apply_option_list(struct qcowfs_opts *opts, struct strbuf *kernel,
			     const char *list, char *err, size_t errlen)
{
	char *word = malloc(strlen(list) + 1);
	size_t n = 0;
	int ret = 0;

	if (!word)
		return -ENOMEM;
	for (const char *p = list; ; p++) {
		if (*p == '\\' && p[1]) {
			word[n++] = *++p;
			continue;
		}
		if (*p && *p != ',') {
			word[n++] = *p;
			continue;
		}
		word[n] = '\0';
		ret = apply_word(opts, kernel, word, err, errlen);
		n = 0;
		if (ret || !*p)
			break;
	}
	free(word);
	return ret;
}

int qcowfs_opts_parse(int argc, char **argv, struct qcowfs_opts *opts,
		      char *err, size_t errlen)
{
	struct strbuf kernel = { 0 };
	bool only_paths = false;
	int ret = 0;

	memset(opts, 0, sizeof(*opts));
	qcow_open_opts_default(&opts->open);
	/* a mount gives zeroed space back by default (doc/qcowfs.1); the
	 * engine's own default is off */
	opts->open.detect_zeroes = QCOW_DETECT_ZEROES_UNMAP;

	for (int i = 1; i < argc && !ret; i++) {
		const char *arg = argv[i];

		if (only_paths || arg[0] != '-' || !arg[1]) {
			if (!opts->image) {
				opts->image = arg;
			} else if (!opts->mountpoint) {
				opts->mountpoint = arg;
			} else {
				set_error(err, errlen, "unexpected argument '%s' "
					  "(usage: qcowfs [-o opts] IMAGE MOUNTPOINT)", arg);
				ret = -EINVAL;
			}
		} else if (!strcmp(arg, "--")) {
			only_paths = true;
		} else if (!strcmp(arg, "-o")) {
			if (i + 1 >= argc) {
				set_error(err, errlen, "option '-o' needs an argument");
				ret = -EINVAL;
			} else {
				ret = apply_option_list(opts, &kernel, argv[++i], err, errlen);
			}
		} else if (!strncmp(arg, "-o", 2)) {
			ret = apply_option_list(opts, &kernel, arg + 2, err, errlen);
		} else if (!strcmp(arg, "-f")) {
			opts->foreground = true;
		} else if (!strcmp(arg, "-d")) {
			opts->foreground = opts->debug = true;
		} else if (!strcmp(arg, "-s")) {
			opts->max_threads = 1;
		} else if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
			opts->show_help = true;
		} else if (!strcmp(arg, "-V") || !strcmp(arg, "--version")) {
			opts->show_version = true;
		} else {
			set_error(err, errlen, "unknown option '%s' (see qcowfs --help)", arg);
			ret = -EINVAL;
		}
	}
	if (!ret && !kernel.text)
		ret = strbuf_append(&kernel, "", 0);
	if (ret == -ENOMEM)
		set_error(err, errlen, "out of memory parsing the command line");
	opts->kernel_opts = kernel.text;
	if (ret)
		return -EINVAL;

	if (!opts->show_help && !opts->show_version) {
		if (!opts->image) {
			set_error(err, errlen, "missing IMAGE and MOUNTPOINT "
				  "(usage: qcowfs [-o opts] IMAGE MOUNTPOINT)");
			return -EINVAL;
		}
		if (!opts->mountpoint) {
			set_error(err, errlen, "missing MOUNTPOINT "
				  "(usage: qcowfs [-o opts] IMAGE MOUNTPOINT)");
			return -EINVAL;
		}
		if (opts->snapshot)
			opts->open.read_only = true;   /* a snapshot is never written */
		if (opts->allow_other && opts->allow_root) {
			set_error(err, errlen, "allow_other and allow_root "
				  "cannot be used together");
			return -EINVAL;
		}
	}
	return 0;
}

void qcowfs_opts_free(struct qcowfs_opts *opts)
{
	free(opts->kernel_opts);
	opts->kernel_opts = NULL;
	free(opts->snapshot);
	opts->snapshot = NULL;
	opts->open.snapshot = NULL;
	free(opts->backing);
	opts->backing = NULL;
	opts->open.backing = NULL;
	free(opts->data_file);
	opts->data_file = NULL;
	opts->open.data_file = NULL;
}

void qcowfs_print_usage(FILE *out, const char *progname)
{
	fprintf(out,
"usage: %s [-f] [-d] [-o option[,option...]] IMAGE MOUNTPOINT\n"
"\n"
"Shows the qcow2 disk image IMAGE as the regular file MOUNTPOINT holding\n"
"the raw disk.  A missing MOUNTPOINT is created empty and removed again at\n"
"unmount; one that already is a mount point is refused.  Discards (fstrim\n"
"through a loop device, fallocate --punch-hole, blkdiscard) free clusters\n"
"at once and a background compactor shrinks IMAGE while it stays mounted.\n"
"The command returns once the mount is live; unmount with\n"
"'qcowctl unmount MOUNTPOINT' (it reports how the close went) or\n"
"'fusermount3 -u MOUNTPOINT' (or umount, or SIGTERM to the daemon), which\n"
"flushes everything and closes the image.\n"
"The file starts with IMAGE's owner, group and mode (without write bits\n"
"when read-only); chmod and chown on it last until the unmount and never\n"
"change IMAGE.  The kernel checks them (default_permissions).\n"
"\n"
"  -f                     stay in the foreground, log to stderr\n"
"  -d                     -f plus FUSE request tracing and debug messages\n"
"  -s                     single-threaded (same as -o max_threads=1)\n"
"  -h, --help, -o help    print this help and exit\n"
"  -V, --version          print versions and exit\n"
"\n"
"qcowfs options (-o):\n"
"  ro                     read-only: image opened with shared locks, the\n"
"                         file has no write bits, writes fail (EROFS)\n"
"  rw                     read-write (default)\n"
"  snapshot=NAME          show the internal snapshot NAME (id or name, as\n"
"                         qemu-img looks it up) read-only; works while\n"
"                         another qcowfs or QEMU writes IMAGE (shared read\n"
"                         lock, like qemu-img -U), and pauses that writer's\n"
"                         compaction until this mount ends\n"
"  backing=PATH           read unallocated clusters from PATH instead of\n"
"                         the backing file IMAGE names (format probed);\n"
"                         the rest of the chain below PATH as it records\n"
"  data_file=PATH         the image's external data file, instead of the\n"
"                         name IMAGE records (relative names there resolve\n"
"                         against IMAGE's folder)\n"
"  allow_other            let other users access the file (non-root needs\n"
"                         user_allow_other in /etc/fuse.conf)\n"
"  allow_root             let root access the file as well as its owner\n"
"  uid=USER, gid=GROUP    owner and group of the file (default: IMAGE's)\n"
"  cache_size=BYTES       L2 table cache (default 32M;\n"
"                         suffixes K, M, G, T are powers of 1024)\n"
"  compact=on|off         background compaction that shrinks IMAGE\n"
"                         (default on)\n"
"  compact_threshold=BYTES  free space inside IMAGE that triggers an\n"
"                         automatic compaction (default: 10%% of the\n"
"                         image file, at least 1M and at most 64M)\n"
"  compact_quiet_ms=N     discards must have stopped for N ms before an\n"
"                         automatic compaction starts (default 1000)\n"
"  recycler=on|off        off: neither punch freed clusters nor compact\n"
"                         (default on)\n"
"  detect_zeroes=off|on|unmap  a write of all-zero whole clusters: written\n"
"                         (off), made a zero write keeping the clusters\n"
"                         (on), or freed like a discard (unmap, default)\n"
"  runtime_asserts        check every cluster-state change, lock contract\n"
"                         and, at each compaction step, every cluster-map\n"
"                         invariant (slow; for testing)\n"
"  max_threads=N          at most N FUSE worker threads (1..%u, default\n"
"                         twice the CPUs, 4 to 16)\n"
"  debug                  same as -d\n"
"\n"
"Mount options passed to the kernel:\n"
"  dev, nodev, suid, nosuid, exec, noexec, atime, noatime, sync, async,\n"
"  dirsync, auto_unmount, default_permissions (always on), fsname=NAME\n"
"  (default: IMAGE), subtype=NAME (default: qcowfs), context=, fscontext=,\n"
"  defcontext=, rootcontext=\n"
"Accepted and ignored (fstab and mount(8) words):\n"
"  defaults, auto, noauto, user, nouser, users, owner, group, _netdev,\n"
"  nofail, relatime, norelatime, strictatime, nostrictatime, diratime,\n"
"  nodiratime, lazytime, nolazytime, iversion, noiversion, nonempty,\n"
"  big_writes, x-*, comment=*, user=*\n"
"\n"
"Status and control through ioctls on MOUNTPOINT (qcowfs_ioctl.h):\n"
"  qcowctl status MOUNTPOINT    statistics, errors, pid, IMAGE path (needs a\n"
"                               descriptor open for reading)\n"
"  qcowctl compact MOUNTPOINT   compact now (needs one open for writing;\n"
"                               EBADF through a read-only one)\n"
"  qcowctl unmount MOUNTPOINT   unmount; prints the daemon's close result\n"
"  qcowctl snapshot create|delete|list|apply NAME MOUNTPOINT\n"
"                               internal snapshots of the live image\n"
"\n"
"Shrinking the file (truncate -s) frees what lies past the new end; it is\n"
"refused while IMAGE has internal snapshots.  O_TRUNC would empty the disk\n"
"and is refused: use 'dd conv=notrunc'.\n"
"fstab: IMAGE MOUNTPOINT fuse.qcowfs defaults,compact=on 0 0\n",
		progname, QCOWFS_MAX_THREADS_LIMIT);
}

void qcowfs_print_version(FILE *out)
{
	fprintf(out, "qcowfs %s\n", PACKAGE_VERSION);
	fprintf(out, "libqcow %s\n", qcow_version());
	fprintf(out, "libfuse %s\n", fuse_pkgversion());
	fprintf(out, "allocator %s\n", qcow_allocator_version());
}
