#!/usr/bin/env python3
"""check_corpus.py - the mutant corpus of t160-check-corpus.sh.

usage: check_corpus.py DIR SEED COUNT QCOWCTL OPEN_RW [JOBS]

Builds a few base images with qemu-img and qemu-io in DIR (plain v3 and
v2, internal snapshots (also v2, also over compressed clusters),
compressed clusters (deflate and zstd), an overlay on a backing file,
extended L2 entries (with a snapshot, with compressed clusters; their
subcluster bitmaps are mutated too), persistent bitmaps with data, refcount widths
1/8/16/64, cluster sizes 512, 4K and 64K; 2M clusters would make every
mutant a 10 MB write, t170 covers them), then makes
COUNT mutants from them with a random generator seeded with SEED.  Each
mutant changes the metadata in one or two ways: header fields, L1 and L2
entries (active and snapshot: reserved bits, flags, pointers to other
clusters), refcount-table entries, refcount-block entries, snapshot table
entries and bitmap directory and table entries.  The last tenth are
hostile bitmap directories (sizes, type, granularity, flags, the
extension's count, size and offset) of three bitmap bases, one with two
enabled bitmaps of different granularities and a disabled one; when the
engine opens such an image read-write, QEMU must list the same bitmaps
after the close.

For every mutant:
  * `qemu-img check` and `qcowctl check` must give the same verdict class:
    clean (exit 0), leaks only (3), corrupt (2) or not checked (1, 63);
  * when QEMU calls it corrupt, the engine must refuse to open it
    read-write (OPEN_RW exits 2);
  * when QEMU calls it clean or leaky and the engine opens it read-write,
    `qemu-img check` must be clean after the close (the open repairs);
  * the engine never fails otherwise (a failed close, a crash, a
    sanitizer report: run it with a sanitizer build and
    ASAN_OPTIONS=exitcode=66).
Prints one line per disagreement and a summary; exits 1 on any.
All on-disk integers are big-endian (qcow2 specification).
"""

import os
import random
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFF_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
REFT_RESERVED = 0x1FF

HEADER_FIELDS = {
    "version": (4, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}


def run(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def must(cmd):
    r = run(cmd)
    if r.returncode != 0:
        sys.exit("setup failed: %s: %s" % (" ".join(cmd), r.stderr.decode(errors="replace")))


class Layout:
    """Where every structure of an image lies (offsets in bytes)."""

    def __init__(self, data):
        self.data = data
        g = lambda name: struct.unpack_from(HEADER_FIELDS[name][1], data, HEADER_FIELDS[name][0])[0]
        self.version = g("version")
        self.cb = g("cluster_bits")
        self.cs = 1 << self.cb
        self.l1_off = g("l1_table_offset")
        self.l1_size = g("l1_size")
        self.rt_off = g("refcount_table_offset")
        self.rt_clusters = g("refcount_table_clusters")
        self.order = g("refcount_order") if self.version >= 3 else 4
        self.nb_snap = g("nb_snapshots")
        self.snap_off = g("snapshots_offset")
        # extended L2 entries (incompatible bit 4): 16 bytes, the pointer
        # then the subcluster bitmap
        self.es = 16 if self.version >= 3 and g("incompatible_features") & 0x10 else 8
        self.size = len(data)
        # L1 tables: (offset, entries, active)
        self.l1s = [(self.l1_off, self.l1_size, True)]
        self.snap_entries = []
        pos = self.snap_off
        for _ in range(self.nb_snap):
            l1o, l1n, idl, nml = struct.unpack_from(">QIHH", data, pos)
            extra = struct.unpack_from(">I", data, pos + 36)[0]
            self.snap_entries.append(pos)
            self.l1s.append((l1o, l1n, False))
            pos += (40 + extra + idl + nml + 7) & ~7
        self.l1_slots = []      # (slot offset, active)
        self.l2_tables = set()
        for off, n, active in self.l1s:
            for i in range(n):
                slot = off + 8 * i
                self.l1_slots.append((slot, active))
                e = self.u64(slot)
                if e & OFF_MASK:
                    self.l2_tables.add(e & OFF_MASK)
        self.l2_slots = []
        self.data_clusters = set()
        self.compressed = []
        for t in sorted(self.l2_tables):
            for j in range(self.cs // self.es):
                slot = t + self.es * j
                e = self.u64(slot)
                self.l2_slots.append(slot)
                if e & COMPRESSED:
                    self.compressed.append(slot)
                elif e & OFF_MASK:
                    self.data_clusters.add(e & OFF_MASK)
        self.rt_slots = [self.rt_off + 8 * i for i in range(self.rt_clusters * self.cs // 8)]
        self.refblocks = [self.u64(s) & ~0x1FF for s in self.rt_slots if self.u64(s)]
        self.used_l2_slots = [s for s in self.l2_slots if self.u64(s)]
        self.used_l1_slots = [s for s in self.l1_slots if self.u64(s[0])]

    def u64(self, off):
        if off + 8 > len(self.data):
            return 0
        return struct.unpack_from(">Q", self.data, off)[0]

    def clusters(self):
        """Interesting cluster offsets to point things at."""
        c = [0, self.l1_off & ~(self.cs - 1), self.rt_off]
        c += sorted(self.l2_tables)[:8] + sorted(self.data_clusters)[:8] + self.refblocks[:4]
        if self.nb_snap:
            c.append(self.snap_off & ~(self.cs - 1))
            c += [o & ~(self.cs - 1) for o, n, a in self.l1s[1:] if n]
        c.append((self.size + self.cs - 1) & ~(self.cs - 1))        # just past EOF
        c.append(((self.size + self.cs - 1) & ~(self.cs - 1)) + 16 * self.cs)
        return c


class Mutant:
    def __init__(self, base, data):
        self.lay = Layout(bytes(data))
        self.d = bytearray(data)
        self.desc = []

    def get64(self, off):
        return struct.unpack_from(">Q", self.d, off)[0]

    def put64(self, off, v):
        struct.pack_into(">Q", self.d, off, v & 0xFFFFFFFFFFFFFFFF)


def pick_target(r, lay):
    t = r.choice(lay.clusters())
    k = r.random()
    if k < 0.1:
        t += r.choice([512, 8, 1]) if lay.cs > 512 else r.choice([8, 1])
    return t


def mut_header(r, m):
    lay = m.lay
    name = r.choice(list(HEADER_FIELDS))
    off, fmt = HEADER_FIELDS[name]
    if lay.version < 3 and off >= 72:
        name, (off, fmt) = "l1_size", HEADER_FIELDS["l1_size"]
    old = struct.unpack_from(fmt, m.d, off)[0]
    bits = 32 if fmt == ">I" else 64
    k = r.randrange(7)
    if name == "incompatible_features":
        # not bits 2, 3 and 4: flipping one changes how every entry reads
        # (a data file that is not there, 16-byte L2 entries, the
        # compression type of header byte 104), which test_header,
        # t290 and t310 check rule by rule; the extended-L2 bases here
        # mutate real subcluster bitmaps instead
        new = old ^ (1 << r.choice([0, 0, 1, 1, 5, 63]))
    elif name in ("compatible_features", "autoclear_features"):
        new = old ^ (1 << r.choice([0, 0, 1, 1, 2, 3, 4, 5, 63]))
    elif k == 0:
        new = 0
    elif k == 1:
        new = old ^ (1 << r.randrange(bits))
    elif k == 2:
        new = old + r.choice([1, -1, 2, -2, 8, lay.cs, -lay.cs])
    elif k == 3 and fmt == ">Q":
        new = pick_target(r, lay)
    elif k == 4:
        new = old * 2
    else:
        new = r.getrandbits(r.choice([4, 8, 16, bits]))
    new &= (1 << bits) - 1
    struct.pack_into(fmt, m.d, off, new)
    m.desc.append("header %s %#x->%#x" % (name, old, new))


def retarget(r, m, slot, old, what, keep_flags):
    t = pick_target(r, m.lay)
    new = (old & keep_flags) | (t & 0x00FFFFFFFFFFFFFF)
    m.put64(slot, new)
    m.desc.append("%s @%#x %#x->%#x" % (what, slot, old, new))


def mut_l1(r, m):
    lay = m.lay
    pool = lay.used_l1_slots if lay.used_l1_slots and r.random() < 0.85 else lay.l1_slots
    if not pool:
        return mut_header(r, m)
    slot, active = r.choice(pool)
    old = m.get64(slot)
    what = "L1" if active else "snapshot L1"
    k = r.randrange(5)
    if k == 0:
        bit = r.choice([b for b in range(64) if L1_RESERVED >> b & 1])
        new = old | (1 << bit)
    elif k == 1:
        new = old ^ COPIED
    elif k == 2:
        return retarget(r, m, slot, old, what, COPIED)
    elif k == 3:
        new = 0
    else:
        new = old ^ (1 << r.randrange(64))
    m.put64(slot, new)
    m.desc.append("%s @%#x %#x->%#x" % (what, slot, old, new))


def mut_l2(r, m):
    lay = m.lay
    if not lay.l2_slots:
        return mut_header(r, m)
    if lay.compressed and r.random() < 0.2:
        slot = r.choice(lay.compressed)
    elif lay.used_l2_slots and r.random() < 0.85:
        slot = r.choice(lay.used_l2_slots)
    else:
        slot = r.choice(lay.l2_slots)
    old = m.get64(slot)
    if lay.es == 16 and r.random() < 0.4:
        # the subcluster bitmap: a random bit, both bits of a subcluster,
        # allocation bits (on an unallocated or compressed entry too)
        bm = m.get64(slot + 8)
        k = r.randrange(4)
        if k == 0:
            new = bm ^ (1 << r.randrange(64))
        elif k == 1:
            s = r.randrange(32)
            new = bm | (1 << s) | (1 << (32 + s))
        elif k == 2:
            new = bm | (1 << r.randrange(32))
        else:
            new = 0
        m.put64(slot + 8, new)
        m.desc.append("L2 bitmap @%#x %#x->%#x" % (slot + 8, bm, new))
        return
    k = r.randrange(8)
    if k == 0:
        bit = r.choice([b for b in range(64) if L2_RESERVED >> b & 1])
        new = old | (1 << bit)
    elif k == 1:
        new = old ^ COPIED
    elif k == 2:
        new = old ^ COMPRESSED
    elif k == 3:
        new = old ^ 1
    elif k == 4:
        return retarget(r, m, slot, old, "L2", COPIED | 1)
    elif k == 5:
        new = 0
    elif k == 6 and old & COMPRESSED:
        x = 62 - (lay.cb - 8)
        new = old ^ (1 << r.randrange(x, 62)) if r.random() < 0.5 else old + r.choice([1, 512, -512, lay.cs])
    else:
        new = old ^ (1 << r.randrange(64))
    m.put64(slot, new)
    m.desc.append("L2 @%#x %#x->%#x" % (slot, old, new))


def mut_reftable(r, m):
    lay = m.lay
    used = [s for s in lay.rt_slots if m.get64(s)]
    k = r.randrange(6)
    if k == 5 or not used:
        slot = lay.rt_slots[-1] if r.random() < 0.5 else r.choice(lay.rt_slots)
    else:
        slot = r.choice(used)
    old = m.get64(slot)
    if k == 0:
        new = old | (1 << r.randrange(9))
    elif k == 1:
        new = 0
    elif k in (2, 5):
        return retarget(r, m, slot, old, "reftable", 0)
    elif k == 3:
        new = old ^ (1 << r.randrange(9, 64))
    else:
        new = r.choice(lay.refblocks + [lay.rt_off]) if lay.refblocks else 0
    m.put64(slot, new)
    m.desc.append("reftable @%#x %#x->%#x" % (slot, old, new))


def rc_get(d, base, order, i):
    bits = 1 << order
    if bits >= 8:
        n = bits // 8
        return int.from_bytes(d[base + i * n:base + i * n + n], "big")
    byte = d[base + i * bits // 8]
    return (byte >> ((i * bits) % 8)) & ((1 << bits) - 1)


def rc_set(d, base, order, i, v):
    bits = 1 << order
    v &= (1 << bits) - 1
    if bits >= 8:
        n = bits // 8
        d[base + i * n:base + i * n + n] = v.to_bytes(n, "big")
        return
    sh = (i * bits) % 8
    p = base + i * bits // 8
    d[p] = (d[p] & ~(((1 << bits) - 1) << sh)) | (v << sh)


def mut_refblock(r, m):
    lay = m.lay
    rbs = [(i, m.get64(s) & ~0x1FF) for i, s in enumerate(lay.rt_slots) if m.get64(s)]
    rbs = [(i, b) for i, b in rbs if b + lay.cs <= len(m.d)]
    if not rbs:
        return mut_header(r, m)
    idx, base = r.choice(rbs)
    per = lay.cs * 8 >> lay.order
    used = [c for c in range(per) if rc_get(m.d, base, lay.order, c)]
    i = r.choice(used) if used and r.random() < 0.8 else r.randrange(per)
    old = rc_get(m.d, base, lay.order, i)
    mx = (1 << (1 << lay.order)) - 1
    new = r.choice([old + 1, old - 1 if old else 1, 0, mx, r.randrange(mx + 1)]) & mx
    rc_set(m.d, base, lay.order, i, new)
    m.desc.append("refcount of cluster %d %d->%d" % (idx * per + i, old, new))


def mut_snapshot(r, m):
    lay = m.lay
    if not lay.snap_entries:
        return mut_l1(r, m)
    pos = r.choice(lay.snap_entries)
    if r.random() < 0.5:
        old = m.get64(pos)
        new = r.choice([0, pick_target(r, lay), old + 512, old ^ (1 << r.randrange(64))])
        m.put64(pos, new)
        m.desc.append("snapshot L1 offset @%#x %#x->%#x" % (pos, old, new))
    else:
        old = struct.unpack_from(">I", m.d, pos + 8)[0]
        new = r.choice([0, old + 1, old * 2, 1 << r.randrange(24)]) & 0xFFFFFFFF
        struct.pack_into(">I", m.d, pos + 8, new)
        m.desc.append("snapshot L1 size @%#x %d->%d" % (pos + 8, old, new))


def bitmap_ext(d):
    """offset of the bitmaps extension's data in the header, or None."""
    version = struct.unpack_from(">I", d, 4)[0]
    cs = 1 << struct.unpack_from(">I", d, 20)[0]
    pos = struct.unpack_from(">I", d, 100)[0] if version >= 3 else 72
    while pos + 8 <= cs:
        t, n = struct.unpack_from(">II", d, pos)
        if t == 0:
            return None
        if t == 0x23852875:
            return pos + 8
        pos += 8 + ((n + 7) & ~7)
    return None


def bitmap_layout(d):
    """(directory offset, [(entry offset, table offset, table size)]) or None."""
    version = struct.unpack_from(">I", d, 4)[0]
    cs = 1 << struct.unpack_from(">I", d, 20)[0]
    pos = struct.unpack_from(">I", d, 100)[0] if version >= 3 else 72
    while pos + 8 <= cs:
        t, n = struct.unpack_from(">II", d, pos)
        if t == 0:
            return None
        if t == 0x23852875:
            nb, _, dsize, doff = struct.unpack_from(">IIQQ", d, pos + 8)
            ents, q = [], doff
            for _ in range(nb):
                toff, tsize, flags, typ, gran, nsz, extra = struct.unpack_from(">QIIBBHI", d, q)
                ents.append((q, toff, tsize))
                q += (24 + extra + nsz + 7) & ~7
            return doff, ents
        pos += 8 + ((n + 7) & ~7)
    return None


def mut_bitmap(r, m):
    bl = bitmap_layout(m.d)
    if not bl:
        return mut_l2(r, m)
    doff, ents = bl
    q, toff, tsize = r.choice(ents)
    k = r.randrange(8)
    if k >= 6:
        return mut_bitmap_dir(r, m, q)
    if k < 4 and tsize:
        slot = toff + 8 * r.randrange(tsize)
        old = m.get64(slot)
        if k == 0:
            new = old | (1 << r.choice([1, 2, 8, 56, 63]))
        elif k == 1:
            new = pick_target(r, m.lay)
        elif k == 2:
            new = old | 1
        else:
            new = 0
        m.put64(slot, new)
        m.desc.append("bitmap table @%#x %#x->%#x" % (slot, old, new))
    elif k == 4:
        old = struct.unpack_from(">I", m.d, q + 12)[0]
        new = old ^ (1 << r.choice([0, 1, 2, 5]))
        struct.pack_into(">I", m.d, q + 12, new)
        m.desc.append("bitmap flags @%#x %#x->%#x" % (q + 12, old, new))
    else:
        old = m.get64(q)
        new = pick_target(r, m.lay)
        m.put64(q, new)
        m.desc.append("bitmap table offset @%#x %#x->%#x" % (q, old, new))


def mut_bitmap_dir(r, m, q):
    """hostile directory fields: an entry's table size, type, granularity,
    name and extra-data sizes, or the extension's count, directory size and
    offset"""
    ext = bitmap_ext(m.d)
    k = r.randrange(8)
    if k == 0:
        fld, fmt, vals = q + 8, ">I", [0, 1, 2, 0xFFFF, 0x8000001, 0xFFFFFFFF]
    elif k == 1:
        fld, fmt, vals = q + 16, ">B", [0, 2, 0xFF]
    elif k == 2:
        fld, fmt, vals = q + 17, ">B", [0, 8, 10, 31, 32, 63, 64, 0xFF]
    elif k == 3:
        fld, fmt, vals = q + 18, ">H", [0, 1, 1024, 0xFFFF]
    elif k == 4:
        fld, fmt, vals = q + 20, ">I", [8, 64, 0x10000, 0xFFFFFFFF]
    elif k == 5:
        fld, fmt, vals = ext, ">I", [0, 2, 3, 65535, 65536, 0xFFFFFFFF]
    elif k == 6:
        fld, fmt, vals = ext + 8, ">Q", [0, 8, 23, 24, 1 << 26, (1 << 26) + 8, 1 << 63]
    else:
        fld, fmt, vals = ext + 16, ">Q", [0, 512, pick_target(r, m.lay), 1 << 62]
    old = struct.unpack_from(fmt, m.d, fld)[0]
    new = r.choice(vals)
    struct.pack_into(fmt, m.d, fld, new)
    m.desc.append("bitmap directory field @%#x %#x->%#x" % (fld, old, new))


def mut_bitmap_dir_any(r, m):
    """one or two hostile directory fields of a random bitmap"""
    bl = bitmap_layout(m.d)
    if not bl:
        return mut_l2(r, m)
    # a table or flag change first: after a directory field moved the
    # directory, its layout would point anywhere (the header too)
    if r.random() < 0.3:
        mut_bitmap(r, m)
    for _ in range(1 if r.random() < 0.7 else 2):
        mut_bitmap_dir(r, m, r.choice(bl[1])[0])


MUTATORS = [(mut_header, 3), (mut_l1, 3), (mut_l2, 5), (mut_reftable, 2), (mut_refblock, 4), (mut_snapshot, 1),
            (mut_bitmap, 1)]


def make_bases(d):
    bases = []

    def base(name, create_opts, size, qio=(), snapshots=(), bitmap=None, post=()):
        p = os.path.join(d, name + ".qcow2")
        must(["qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, p, size])
        if qio:
            args = []
            for c in qio:
                args += ["-c", c]
            must(["qemu-io", "-f", "qcow2"] + args + [p])
        for s in snapshots:
            must(["qemu-img", "snapshot", "-c", s, p])
        if bitmap:
            must(["qemu-img", "bitmap", "--add", p, bitmap])
        if post:
            args = []
            for c in post:
                args += ["-c", c]
            must(["qemu-io", "-f", "qcow2"] + args + [p])
        bases.append(p)
        return p

    base("plain", "cluster_size=65536", "16M",
         ["write -P 1 0 300k", "write -P 2 4M 64k", "write -P 3 9M 100k", "discard 4M 64k", "write -z 12M 64k"])
    base("v2", "compat=0.10", "16M", ["write -P 1 0 200k", "write -P 2 8M 64k"])
    base("snap", "cluster_size=65536", "16M", ["write -P 1 0 256k", "write -P 5 6M 64k"], ["s1"],
         post=["write -P 2 64k 128k", "write -P 3 10M 64k"])
    base("snap2", "cluster_size=65536", "8M", ["write -P 1 0 192k"], ["s1", "s2"], post=["write -P 4 0 64k"])
    raw = os.path.join(d, "src.raw")
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        for i in range(6):
            f.seek(i * (1 << 20) + 4096 * i)
            f.write(bytes([0x41 + i]) * 70000 + os.urandom(3000))
    p = os.path.join(d, "compressed.qcow2")
    must(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, p])
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 7 7M 64k", p])
    bases.append(p)
    base("bitmap", "cluster_size=65536", "16M", ["write -P 1 0 128k"], bitmap="b0",
         post=["write -P 2 2M 64k", "write -P 3 13M 64k"])
    base("rc1", "cluster_size=65536,refcount_bits=1", "16M", ["write -P 1 0 200k", "write -P 2 8M 64k"])
    base("rc64", "cluster_size=65536,refcount_bits=64", "16M", ["write -P 1 0 200k", "write -P 2 8M 64k"], ["s1"],
         post=["write -P 3 0 64k"])
    base("c512", "cluster_size=512", "2M", ["write -P 1 0 150k", "write -P 2 1M 20k", "discard 1M 4k"])
    base("c512snap", "cluster_size=512,refcount_bits=64", "1M", ["write -P 1 0 60k"], ["s1"],
         bitmap="b1", post=["write -P 2 0 4k", "write -P 3 500k 8k"])
    # only for the bitmap-directory tail of the corpus (not in the rotation)
    b3 = base("bitmaps3", "cluster_size=4096", "8M", ["write -P 1 0 300k"], bitmap="gone",
              post=["write -P 2 100k 20k"])
    must(["qemu-img", "bitmap", "--disable", b3, "gone"])
    must(["qemu-img", "bitmap", "--add", "-g", "512", b3, "fine"])
    must(["qemu-img", "bitmap", "--add", "-g", "1M", b3, "coarse"])
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 3 5M 70k", b3])
    base("v2snap", "compat=0.10,cluster_size=4096", "4M", ["write -P 1 0 64k"], ["s1"], post=["write -P 2 0 8k"])
    base("rc8c4k", "cluster_size=4096,refcount_bits=8", "8M", ["write -P 1 0 100k", "write -P 2 6M 12k"], ["s1", "s2"],
         post=["write -P 3 4k 4k"])
    base("xl2", "cluster_size=65536,extended_l2=on", "16M",
         ["write -P 1 0 100k", "write -P 2 4M 6k", "write -z 4M 2k", "discard 9M 64k", "write -z 12M 8k"],
         ["s1"], post=["write -P 3 2k 4k", "write -P 4 10M 12k"])
    p = os.path.join(d, "xl2comp.qcow2")
    must(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=16384", raw, p])
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 9 2M 3k", p])
    bases.append(p)
    p = os.path.join(d, "zstd.qcow2")
    must(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd", raw, p])
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 6 2M 8k", p])
    bases.append(p)
    # an overlay on plain.qcow2 (named relatively: the mutants sit next to it)
    p = os.path.join(d, "overlay.qcow2")
    must(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", p, "20M"])
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 9 64k 128k", "-c", "write -z 4M 64k", "-c", "write -P 8 18M 64k", p])
    bases.append(p)
    p = os.path.join(d, "compsnap.qcow2")
    must(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, p])
    must(["qemu-img", "snapshot", "-c", "s1", p])
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 8 1M 8k", p])
    bases.append(p)
    return bases


def bitmaps_of(p):
    """the bitmaps qemu-img info lists: [(name, granularity, flags)]"""
    r = run(["qemu-img", "info", "-U", "--output=json", p])
    if r.returncode != 0:
        return "unreadable"
    import json
    data = json.loads(r.stdout.decode(errors="replace")).get("format-specific", {}).get("data", {})
    return [(b["name"], b["granularity"], tuple(b["flags"])) for b in data.get("bitmaps", [])]


def verdict(code):
    return {0: "clean", 3: "leaks", 2: "corrupt"}.get(code, "failed")


def main():
    d, seed, count, qcowctl, open_rw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    jobs = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    t0 = time.time()
    bases = make_bases(d)
    datas = {}
    for b in bases:
        with open(b, "rb") as f:
            datas[b] = f.read()
    bad = []
    # the bases themselves must check clean in both
    for b in bases:
        q = run(["qemu-img", "check", "-f", "qcow2", b]).returncode
        c = run([qcowctl, "check", b])
        if q != 0 or c.returncode != 0:
            bad.append("base %s: qemu-img check exit %d, qcowctl check exit %d: %s" %
                       (os.path.basename(b), q, c.returncode, c.stdout.decode(errors="replace")[:400]))
    r = random.Random(seed)
    plans = []
    weights = [w for _, w in MUTATORS]
    rotation = [b for b in bases if not b.endswith("bitmaps3.qcow2")]
    bitmap_bases = [b for b in bases if os.path.basename(b) in ("bitmap.qcow2", "c512snap.qcow2", "bitmaps3.qcow2")]
    tail = count // 10   # the last tenth: hostile bitmap directories
    for i in range(count - tail):
        b = rotation[i % len(rotation)]
        n = 1 if r.random() < 0.8 else 2
        muts = r.choices([f for f, _ in MUTATORS], weights, k=n)
        plans.append((i, b, muts, r.getrandbits(32)))
    rt = random.Random(seed + 1)
    for i in range(count - tail, count):
        plans.append((i, bitmap_bases[i % len(bitmap_bases)], [mut_bitmap_dir_any], rt.getrandbits(32)))
    stats = {}
    open_stats = {"refused-corrupt": 0, "opened-repaired": 0, "refused-unreadable": 0, "refused-accepted": 0}

    def one(plan):
        i, b, muts, s = plan
        rr = random.Random(s)
        m = Mutant(b, datas[b])
        for f in muts:
            try:
                f(rr, m)
            except (struct.error, IndexError, ValueError) as e:
                m.desc.append("(mutation skipped: %s)" % e)
        p = os.path.join(d, "m%05d.qcow2" % i)
        with open(p, "wb") as f:
            f.write(m.d)
        out = []
        q = run(["qemu-img", "check", "-f", "qcow2", p])
        c = run([qcowctl, "check", p])
        vq, vc = verdict(q.returncode), verdict(c.returncode)
        what = "m%05d (%s: %s)" % (i, os.path.basename(b), "; ".join(m.desc))
        if vq != vc:
            out.append("DISAGREE %s: qemu-img %s (exit %d), qcowctl %s (exit %d)\n  qemu: %s\n  qcowctl: %s" % (
                what, vq, q.returncode, vc, c.returncode,
                " | ".join((q.stderr + q.stdout).decode(errors="replace").splitlines()[:4]),
                " | ".join((c.stderr + c.stdout).decode(errors="replace").splitlines()[:4])))
        try:
            has_bitmaps = bitmap_layout(m.d) is not None
        except struct.error:
            has_bitmaps = True   # a directory past the end: QEMU's list says what stays
        bm_before = bitmaps_of(p) if has_bitmaps and vq in ("clean", "leaks") else None
        o = run([open_rw, p])
        ores = "refused" if o.returncode == 2 else "opened" if o.returncode == 0 else "error"
        if ores == "error" or c.returncode not in (0, 1, 2, 3):
            out.append("ENGINE-ERROR %s: qcow_open_rw exit %d, qcowctl check exit %d: %s" % (
                what, o.returncode, c.returncode, (o.stderr + c.stderr).decode(errors="replace")[-600:]))
        dirty = m.lay.version >= 3 and struct.unpack_from(">Q", m.d, 72)[0] & 1
        if vq == "corrupt" and dirty and o.returncode == 0:
            # QEMU's own read-write open repairs a dirty image's refcounts:
            # so may the engine, if the result is clean
            q2 = run(["qemu-img", "check", "-f", "qcow2", p])
            if q2.returncode != 0:
                out.append("NOT-REPAIRED %s: dirty image opened read-write, after the close qemu-img check exits %d: %s" % (
                    what, q2.returncode, " | ".join((q2.stderr + q2.stdout).decode(errors="replace").splitlines()[:4])))
        elif vq == "corrupt":
            if o.returncode != 2:
                out.append("OPENED-CORRUPT %s: the engine opened read-write an image QEMU calls corrupt (exit %d) %s" % (
                    what, o.returncode, o.stderr.decode(errors="replace")[:200]))
        elif vq in ("clean", "leaks") and o.returncode == 0:
            q2 = run(["qemu-img", "check", "-f", "qcow2", p])
            if q2.returncode != 0:
                out.append("NOT-REPAIRED %s: after a read-write open and close qemu-img check exits %d: %s" % (
                    what, q2.returncode, " | ".join((q2.stderr + q2.stdout).decode(errors="replace").splitlines()[:4])))
            if bm_before is not None and bitmaps_of(p) != bm_before:
                # a read-write open keeps the bitmaps as QEMU lists them
                out.append("BITMAPS-CHANGED %s: qemu-img info listed %s before the open and close, %s after" % (
                    what, bm_before, bitmaps_of(p)))
        os.unlink(p)
        info = "%s: %s" % (what, o.stderr.decode(errors="replace").strip()[:300])
        return vq, vc, ores, out, info

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        for vq, vc, ores, out, info in ex.map(one, plans):
            stats[(vq, vc)] = stats.get((vq, vc), 0) + 1
            if vq == "corrupt" and ores == "refused":
                open_stats["refused-corrupt"] += 1
            elif vq in ("clean", "leaks") and ores == "opened":
                open_stats["opened-repaired"] += 1
            elif ores == "refused" and vq == "failed":
                open_stats["refused-unreadable"] += 1
            elif ores == "refused":
                # QEMU accepts it (clean or leaks), the engine does not:
                # allowed (unsupported or suspicious), counted
                open_stats["refused-accepted"] += 1
                if os.environ.get("CORPUS_VERBOSE"):
                    print("refused-accepted %s" % info)
            bad.extend(out)
    for line in bad:
        print(line)
    agree = sum(n for (a, b), n in stats.items() if a == b)
    print("corpus: %d mutants of %d bases, seed %d, %.1f s" % (count, len(bases), seed, time.time() - t0))
    print("verdicts (qemu-img/qcowctl): " + ", ".join("%s/%s %d" % (a, b, n) for (a, b), n in sorted(stats.items())))
    print("agreement: %d of %d" % (agree, count))
    print("read-write opens: %s" % ", ".join("%s %d" % kv for kv in sorted(open_stats.items())))
    print("problems: %d" % len(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
