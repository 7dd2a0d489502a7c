"""qcowfs_ctl: the control ioctls of a qcowfs mount, for test and benchmark
scripts (the C definitions are in src/qcowfs/qcowfs_ioctl.h; qcowctl uses
the same two).

    status(path)          -> dict of the key=value status lines
    request_compact(path) -> asks for a compaction, returns at once (opens the
                             view for writing: the daemon refuses it otherwise)
"""
import fcntl
import os

_IOC_NONE, _IOC_READ = 0, 2
STATUS_MAX = 4096


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (ord("Q") << 8) | nr


IOC_STATUS = _ioc(_IOC_READ, 1, STATUS_MAX)
IOC_COMPACT = _ioc(_IOC_NONE, 2, 0)


def status_text(path):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = bytearray(STATUS_MAX)
        fcntl.ioctl(fd, IOC_STATUS, buf)
    finally:
        os.close(fd)
    return bytes(buf).split(b"\0", 1)[0].decode()


def status(path):
    return dict(line.split("=", 1) for line in status_text(path).splitlines() if "=" in line)


def request_compact(path):
    # the daemon accepts a compaction only through a descriptor open for writing
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, IOC_COMPACT)
    finally:
        os.close(fd)
