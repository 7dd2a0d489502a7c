/*
 * qcow_lock.c - QEMU-compatible OFD locks on the image file.
 *
 * Owns: the lock bytes.  QEMU marks "I hold permission i" with a shared
 * lock on byte 100+i and "I refuse to share permission i" with one on
 * 200+i (i: 0 consistent read, 1 write, 3 resize).  We behave like a QEMU
 * read-write user (qemu-io): hold 100, 101, 103 and refuse 201, 203; a
 * read-only mount holds 100 and refuses writers (201, 203), like qemu-io -r.
 * A snapshot view (qcowfs -o snapshot=) is a reader that shares writes,
 * like qemu-img -U: it holds 100 only and refuses nothing, so it can sit
 * next to a read-write user.  That user then must not move or free what
 * the reader may read: qcow_lock_other_reader asks the kernel, through
 * the user's own descriptor (F_OFD_GETLK ignores the locks of the asking
 * description), whether anyone else holds byte 100.
 * Rules: take our locks first, then probe the bytes we conflict with
 * through a second open file description (F_OFD_GETLK ignores locks held
 * through the same description), which narrows the race as QEMU does.
 * OFD locks die with the last fd of the description; ours is O_CLOEXEC.
 */
#include "config.h"
#include "qcow_internal.h"
#include "qcow_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int set_read_lock(int fd, off_t byte)
{
	struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
	return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* True if another description holds a lock on byte. */
static bool byte_is_locked(int probe_fd, off_t byte)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
	if (fcntl(probe_fd, F_OFD_GETLK, &fl) < 0)
		return false;
	return fl.l_type != F_UNLCK;
}

int qcow_lock_image(int fd, const char *path, bool read_only, char *err, size_t errlen)
{
	static const int rw_hold[] = { 100, 101, 103, 201, 203 };
	static const int ro_hold[] = { 100, 201, 203 };
	const int *hold = read_only ? ro_hold : rw_hold;
	size_t nhold = read_only ? 3 : 5;

	/* Probe before locking: F_OFD_GETLK from another description would
	 * see our own locks as conflicts.  Like QEMU, a race remains between
	 * probe and lock; QEMU has the same. */
	int probe = open(path, O_RDONLY | O_CLOEXEC);
	if (probe >= 0) {
		/* we hold consistent-read (and write, resize): nobody may refuse
		 * them; we refuse write and resize: nobody may hold them */
		static const struct { int byte; const char *what; } conflicts[] = {
			{ 101, "has it open for writing" },
			{ 103, "may resize it" },
			{ 200, "refuses to share reading" },
			{ 201, "refuses to share writing" },
			{ 203, "refuses to share resizing" },
		};
		for (size_t i = 0; i < sizeof(conflicts) / sizeof(conflicts[0]); i++) {
			int b = conflicts[i].byte;
			if (read_only && (b == 201 || b == 203))
				continue;   /* we do not want to write or resize */
			if (byte_is_locked(probe, b)) {
				qcow_set_error(err, errlen, "image %s is in use: another process %s (QEMU lock byte %d is held); "
					       "stop it before mounting", path, conflicts[i].what, b);
				close(probe);
				return -EAGAIN;
			}
		}
		close(probe);
	}
	for (size_t i = 0; i < nhold; i++) {
		int ret = set_read_lock(fd, hold[i]);
		if (ret == -EINVAL || ret == -ENOLCK || ret == -EOPNOTSUPP)
			return 0;   /* no OFD locks on this file system: QEMU cannot lock either */
		if (ret) {
			qcow_set_error(err, errlen, "cannot take QEMU lock byte %d on the image: %s", hold[i], strerror(-ret));
			return ret;
		}
	}
	return 0;
}

bool qcow_lock_writer_present(const char *path)
{
	int probe = open(path, O_RDONLY | O_CLOEXEC);
	if (probe < 0)
		return false;
	bool held = byte_is_locked(probe, QCOW_LOCK_PERM_BASE + QCOW_PERM_WRITE);
	close(probe);
	return held;
}

int qcow_lock_image_shared(int fd, const char *path, char *err, size_t errlen)
{
	int probe = open(path, O_RDONLY | O_CLOEXEC);
	if (probe >= 0) {
		/* the one permission we hold is consistent read */
		if (byte_is_locked(probe, QCOW_LOCK_SHARED_BASE + QCOW_PERM_CONSISTENT_READ)) {
			qcow_set_error(err, errlen, "image %s is in use: another process refuses to share reading (QEMU lock byte %d is held)",
				       path, QCOW_LOCK_SHARED_BASE + QCOW_PERM_CONSISTENT_READ);
			close(probe);
			return -EAGAIN;
		}
		close(probe);
	}
	int ret = set_read_lock(fd, QCOW_LOCK_PERM_BASE + QCOW_PERM_CONSISTENT_READ);
	if (ret == -EINVAL || ret == -ENOLCK || ret == -EOPNOTSUPP)
		return 0;
	if (ret)
		qcow_set_error(err, errlen, "cannot take QEMU lock byte %d on the image: %s",
			       QCOW_LOCK_PERM_BASE + QCOW_PERM_CONSISTENT_READ, strerror(-ret));
	return ret;
}

bool qcow_lock_other_reader(int fd)
{
	/* through our own description: only other descriptions' locks show */
	return byte_is_locked(fd, QCOW_LOCK_PERM_BASE + QCOW_PERM_CONSISTENT_READ);
}
