/*
 * qcow_lock.h - QEMU-compatible image locking (research/qemu.md section 3).
 */
#ifndef QCOW_LOCK_H
#define QCOW_LOCK_H
#include <stdbool.h>
#include <stddef.h>

/* Probes for conflicting QEMU users through a separate open of path, then
 * takes OFD read locks on fd: bytes 100, 101, 103, 201, 203 for read-write
 * (what qemu-io holds), 100, 201, 203 for read-only.  Returns 0, or
 * -EAGAIN with a message naming the lock byte and the likely culprit. */
int qcow_lock_image(int fd, const char *path, bool read_only, char *err, size_t errlen);

/* True if some process holds QEMU's write permission (lock byte 101). */
bool qcow_lock_writer_present(const char *path);

/* A reader that shares writes (qemu-img -U, a snapshot view): probes byte
 * 200 (someone refuses to share reading), then holds byte 100 only. */
int qcow_lock_image_shared(int fd, const char *path, char *err, size_t errlen);

/* True if a process other than the holder of fd (a description with our
 * own locks) holds QEMU's consistent-read lock, byte 100. */
bool qcow_lock_other_reader(int fd);

#endif
