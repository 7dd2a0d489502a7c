#!/usr/bin/env python3
"""shadow_ops.py - random guest operations on a mounted view, mirrored into a
plain shadow file, for the interop tests.

usage: shadow_ops.py VIEW SHADOW SEED NOPS [--gran BYTES] [--maxlen BYTES]
                     [--no-discard] [--no-zero]

Each operation is chosen from the seed (a failure replays with the same
seed): a write of random bytes (small and anywhere, across a GRAN boundary,
GRAN-aligned, or big), a discard (fallocate PUNCH_HOLE|KEEP_SIZE) or a zero
write (fallocate ZERO_RANGE) - on the shadow both become zeros - or an
fsync.  Every 20 operations a range already touched is read back from both
and compared; at the end every touched range is.  Exits non-zero with the
first difference (offset, both bytes).
"""
import ctypes
import ctypes.util
import os
import random
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, off, ln):
    if libc.fallocate(fd, mode, off, ln) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "fallocate(mode 0x%x, %d, %d): %s" % (mode, off, ln, os.strerror(e)))


def main():
    args = sys.argv[1:]
    opts = {"--gran": 65536, "--maxlen": 1 << 20}
    flags = set()
    pos = []
    i = 0
    while i < len(args):
        if args[i] in opts:
            opts[args[i]] = int(args[i + 1])
            i += 2
        elif args[i].startswith("--"):
            flags.add(args[i])
            i += 1
        else:
            pos.append(args[i])
            i += 1
    view, shadow, seed, nops = pos[0], pos[1], int(pos[2]), int(pos[3])
    gran, maxlen = opts["--gran"], opts["--maxlen"]
    r = random.Random(seed)
    fv = os.open(view, os.O_RDWR)
    fs = os.open(shadow, os.O_RDWR)
    size = os.fstat(fv).st_size
    if size != os.fstat(fs).st_size:
        sys.exit("view has %d bytes, shadow %d" % (size, os.fstat(fs).st_size))
    touched = []

    def check(off, ln):
        a = os.pread(fv, ln, off)
        b = os.pread(fs, ln, off)
        if a != b:
            k = next(k for k in range(min(len(a), len(b))) if a[k] != b[k]) if len(a) == len(b) else 0
            sys.exit("seed %d: view differs from shadow at %d (range %d+%d): view %r shadow %r"
                     % (seed, off + k, off, ln, a[k:k + 8], b[k:k + 8]))

    for op in range(nops):
        x = r.random()
        if x < 0.05:
            os.fsync(fv)
            continue
        y = r.random()
        if y < 0.3:
            off, ln = r.randrange(size), r.randint(1, 4096)
        elif y < 0.55:
            off = r.randrange(1, size // gran + 1) * gran - r.randint(1, gran // 2)
            ln = r.randint(2, gran)
        elif y < 0.8:
            off = r.randrange(size // gran) * gran
            ln = gran * r.randint(1, 4)
        else:
            off, ln = r.randrange(size), r.randint(gran // 2, maxlen)
        off = max(0, min(off, size - 1))
        ln = max(1, min(ln, size - off))
        kind = r.random()
        if kind < 0.2 and "--no-discard" not in flags:
            fallocate(fv, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
            os.pwrite(fs, bytes(ln), off)
        elif kind < 0.3 and "--no-zero" not in flags:
            fallocate(fv, FALLOC_FL_ZERO_RANGE, off, ln)
            os.pwrite(fs, bytes(ln), off)
        else:
            data = r.randbytes(ln)
            for fd, what in ((fv, "view"), (fs, "shadow")):
                n = os.pwrite(fd, data, off)
                if n != ln:
                    sys.exit("short write to %s: %d of %d at %d" % (what, n, ln, off))
        touched.append((off, ln))
        if op % 20 == 0:
            check(*r.choice(touched))
    os.fsync(fv)
    for o, ln in touched:
        check(o, ln)
    os.close(fv)
    os.close(fs)


if __name__ == "__main__":
    main()
