#!/usr/bin/env python3
"""mkbad.py - damage a qcow2 image in one precise way, for t040-bad-images.sh.

usage: mkbad.py KIND IMAGE [ARG]     (changes IMAGE in place)
       mkbad.py --list               (the kinds, one a line)
       mkbad.py --field IMAGE NAME   (prints one header field; "ext" for
                                      the extension types and lengths;
                                      "ext:TYPE" for the hex of one
                                      extension record)

IMAGE must be a qcow2 file made by qemu-img (v2 or v3, no backing file);
KIND is one of the functions named bad_* below, without the prefix and with
dashes for underscores.  All on-disk integers are big-endian (qcow2 spec).
"""

import os
import struct
import sys

MAGIC = 0x514649FB

# name -> (offset, struct format) of the qcow2 header fields
FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
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

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63

# Extension types this file adds; unknown to QEMU and to qcowfs.
UNKNOWN_EXT_TYPE = 0x7163F5E1


class Image:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "r+b")
        self.size = os.fstat(self.f.fileno()).st_size

    def get(self, name):
        off, fmt = FIELDS[name]
        self.f.seek(off)
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def set(self, name, value):
        off, fmt = FIELDS[name]
        self.f.seek(off)
        self.f.write(struct.pack(fmt, value))

    def read(self, off, n):
        self.f.seek(off)
        return self.f.read(n)

    def write(self, off, data):
        self.f.seek(off)
        self.f.write(data)

    @property
    def cluster_size(self):
        return 1 << self.get("cluster_bits")

    def ext_start(self):
        return self.get("header_length") if self.get("version") >= 3 else 72

    def extensions(self):
        """[(offset, type, length)] up to and excluding the end marker."""
        out = []
        off = self.ext_start()
        while off + 8 <= self.cluster_size:
            typ, ln = struct.unpack(">II", self.read(off, 8))
            if typ == 0:
                return out, off
            out.append((off, typ, ln))
            off += 8 + ((ln + 7) & ~7)
        raise SystemExit("mkbad: no end of header extensions in %s" % self.path)

    def first_l1_entry(self):
        """index and value of the first used L1 entry"""
        l1 = self.get("l1_table_offset")
        for i in range(self.get("l1_size")):
            (e,) = struct.unpack(">Q", self.read(l1 + 8 * i, 8))
            if e & L1E_OFFSET_MASK:
                return i, e
        raise SystemExit("mkbad: %s has no L2 table (write data first)" % self.path)

    def past_eof(self):
        """a cluster-aligned offset well past the end of the file"""
        cs = self.cluster_size
        return ((self.size + cs - 1) // cs + 64) * cs


# ---- the kinds of damage ---------------------------------------------------


def bad_empty(img):
    img.f.truncate(0)


def bad_truncated_header(img):
    img.f.truncate(40)


def bad_magic(img):
    img.set("magic", 0x514649FA)


def bad_version4(img):
    img.set("version", 4)


def bad_cluster_bits_8(img):
    img.set("cluster_bits", 8)


def bad_cluster_bits_22(img):
    img.set("cluster_bits", 22)


def bad_huge_l1_size(img):
    # 2^28 entries = 2 GiB of L1 table: far past any sane bound and the file
    img.set("l1_size", 1 << 28)


def bad_l1_size_too_small(img):
    # an L1 table that cannot cover the virtual size
    img.set("l1_size", 0)


def bad_header_length_small(img):
    img.set("header_length", 96)


def bad_header_length_big(img):
    img.set("header_length", img.cluster_size + 8)


def bad_refcount_order_7(img):
    img.set("refcount_order", 7)


def bad_l1_past_eof(img):
    img.set("l1_table_offset", img.past_eof())


def bad_l1_in_header(img):
    img.set("l1_table_offset", 0)


def bad_l1_unaligned(img):
    img.set("l1_table_offset", img.get("l1_table_offset") + 8)


def bad_reftable_past_eof(img):
    img.set("refcount_table_offset", img.past_eof())


def bad_reftable_in_header(img):
    img.set("refcount_table_offset", 0)


def bad_reftable_unaligned(img):
    img.set("refcount_table_offset", img.get("refcount_table_offset") + 8)


def bad_reftable_zero_clusters(img):
    img.set("refcount_table_clusters", 0)


def bad_l2_past_eof(img):
    i, e = img.first_l1_entry()
    img.write(img.get("l1_table_offset") + 8 * i,
              struct.pack(">Q", COPIED | img.past_eof()))


def bad_l2_in_header(img):
    # (offset 0 means "unallocated" in an L1 entry, so point the L2 table at
    # the L1 table itself: an overlap with metadata)
    i, e = img.first_l1_entry()
    img.write(img.get("l1_table_offset") + 8 * i,
              struct.pack(">Q", COPIED | img.get("l1_table_offset")))


def bad_unknown_incompat(img):
    img.set("incompatible_features", img.get("incompatible_features") | (1 << 40))


def bad_backing_self(img, path=None):
    """backing file name = the image itself (absolute path), stored at the
    end of the header cluster"""
    name = os.path.abspath(path or img.path).encode()
    cs = img.cluster_size
    _, end = img.extensions()
    off = cs - len(name) - 8
    off &= ~7
    if off < end + 8:
        raise SystemExit("mkbad: no room for a backing file name")
    img.write(off, name)
    img.set("backing_file_offset", off)
    img.set("backing_file_size", len(name))


def _set_backing_name(img, name):
    """stores name as the backing file name at the end of the header cluster"""
    cs = img.cluster_size
    _, end = img.extensions()
    off = (cs - len(name) - 8) & ~7
    if off < end + 8:
        raise SystemExit("mkbad: no room for a backing file name")
    img.write(off, name)
    img.set("backing_file_offset", off)
    img.set("backing_file_size", len(name))


def bad_backing_missing(img):
    """backing file name of a file that does not exist"""
    _set_backing_name(img, b"no-such-base.qcow2")


def bad_backing_protocol(img):
    """backing file name with a protocol (an NBD URL)"""
    _set_backing_name(img, b"nbd://127.0.0.1:1/export")


def bad_backing_format_long(img):
    """a backing name (the image itself) and a backing format extension of
    40 bytes, longer than any format name"""
    bad_unknown_ext_typed(img, 0xE2792ACA, b"q" * 40)
    _set_backing_name(img, os.path.abspath(img.path).encode())


def bad_backing_format_vmdk(img):
    """backing format extension "vmdk" for a backing file that exists"""
    bad_unknown_ext_typed(img, 0xE2792ACA, b"vmdk")
    _set_backing_name(img, os.path.abspath(img.path).encode())


def bad_unknown_ext_typed(img, typ, data):
    """adds a header extension of type typ before the end marker"""
    exts, end = img.extensions()
    rec = struct.pack(">II", typ, len(data)) + data
    rec += b"\0" * ((8 - len(rec) % 8) % 8)
    if end + len(rec) + 8 > img.cluster_size:
        raise SystemExit("mkbad: no room for another header extension")
    img.write(end, rec + b"\0" * 8)


def bad_dirty(img):
    if img.get("version") < 3:
        raise SystemExit("mkbad: dirty needs a v3 image")
    img.set("incompatible_features", img.get("incompatible_features") | 1)


def bad_corrupt(img):
    if img.get("version") < 3:
        raise SystemExit("mkbad: corrupt needs a v3 image")
    img.set("incompatible_features", img.get("incompatible_features") | 2)


def bad_unknown_autoclear(img):
    img.set("autoclear_features", img.get("autoclear_features") | (1 << 33))


def bad_unknown_ext(img):
    """adds an unknown header extension (type UNKNOWN_EXT_TYPE, 29 bytes of
    pattern) before the end marker"""
    exts, end = img.extensions()
    data = bytes((0xA5 ^ i) & 0xFF for i in range(29))
    rec = struct.pack(">II", UNKNOWN_EXT_TYPE, len(data)) + data
    rec += b"\0" * ((8 - len(rec) % 8) % 8)
    if end + len(rec) + 8 > img.cluster_size:
        raise SystemExit("mkbad: no room for another header extension")
    if img.get("backing_file_offset") and img.get("backing_file_offset") < end + len(rec) + 8:
        raise SystemExit("mkbad: a backing file name sits after the extensions")
    img.write(end, rec + b"\0" * 8)


BITMAPS_EXT_TYPE = 0x23852875


def _bitmaps_ext(img):
    """file offset of the bitmaps extension's data (the image must have one)"""
    exts, _ = img.extensions()
    for off, typ, ln in exts:
        if typ == BITMAPS_EXT_TYPE and ln == 24:
            return off + 8
    raise SystemExit("mkbad: %s has no bitmaps extension (qemu-img bitmap --add first)" % img.path)


def bad_bitmap_extra_data(img):
    """the first bitmap directory entry claims 8 bytes of extra data: QEMU
    refuses to open the image ("Bitmap extra data is not supported")"""
    ext = _bitmaps_ext(img)
    (doff,) = struct.unpack(">Q", img.read(ext + 16, 8))
    img.write(doff + 20, struct.pack(">I", 8))


def bad_bitmap_count(img):
    """the bitmaps extension counts one bitmap more than its directory
    holds: QEMU refuses to open the image"""
    ext = _bitmaps_ext(img)
    (nb,) = struct.unpack(">I", img.read(ext, 4))
    img.write(ext, struct.pack(">I", nb + 1))


def bad_bitmap_granularity(img):
    """the first bitmap's granularity is 2^8 bytes, below QEMU's minimum
    of 512: QEMU refuses to open the image"""
    ext = _bitmaps_ext(img)
    (doff,) = struct.unpack(">Q", img.read(ext + 16, 8))
    img.write(doff + 17, bytes([8]))


def _refcount_slot(img, cluster_index):
    """(byte offset in the file, bit shift, width) of a cluster's refcount"""
    bits = 1 << img.get("refcount_order") if img.get("version") >= 3 else 16
    cs = img.cluster_size
    per_block = cs * 8 // bits
    rt = img.get("refcount_table_offset")
    (rb,) = struct.unpack(">Q", img.read(rt + 8 * (cluster_index // per_block), 8))
    rb &= ~0x1FF
    if not rb:
        raise SystemExit("mkbad: no refcount block for cluster %d" % cluster_index)
    i = cluster_index % per_block
    return rb + i * bits // 8, (i * bits) % 8, bits


def _set_refcount(img, cluster_index, value):
    off, shift, bits = _refcount_slot(img, cluster_index)
    if bits >= 8:
        img.write(off, value.to_bytes(bits // 8, "big"))
    else:
        b = img.read(off, 1)[0]
        mask = ((1 << bits) - 1) << shift
        b = (b & ~mask) | ((value << shift) & mask)
        img.write(off, bytes([b]))


def bad_leak(img):
    """one more cluster at the end of the file with refcount 1 and no
    reference: qemu-img check reports 1 leaked cluster (exit 3)"""
    cs = img.cluster_size
    n = (img.size + cs - 1) // cs
    img.f.truncate((n + 1) * cs)
    _set_refcount(img, n, 1)


def bad_refcount_too_low(img):
    """the first data cluster of the first L2 table gets refcount 0: an
    error (corruption) for qemu-img check (exit 2)"""
    i, e = img.first_l1_entry()
    l2 = e & L1E_OFFSET_MASK
    for j in range(img.cluster_size // 8):
        (d,) = struct.unpack(">Q", img.read(l2 + 8 * j, 8))
        if d & L1E_OFFSET_MASK and not d & (1 << 62):
            _set_refcount(img, (d & L1E_OFFSET_MASK) // img.cluster_size, 0)
            return
    raise SystemExit("mkbad: no data cluster in the first L2 table")


# Extended L2 entries (incompatible bit 4): 16-byte L2 entries, the
# pointer then the subcluster bitmap (bits 0-31 allocated, 32-63 zero).
COMPRESSED = 1 << 62


def _xl2_entries(img):
    """(file offset, pointer, bitmap) of every entry of the first L2 table
    of an image with extended L2 entries"""
    if not img.get("incompatible_features") & 0x10:
        raise SystemExit("mkbad: %s has no extended L2 entries" % img.path)
    _, e = img.first_l1_entry()
    l2 = e & L1E_OFFSET_MASK
    cs = img.cluster_size
    for off in range(l2, l2 + cs, 16):
        p, bm = struct.unpack(">QQ", img.read(off, 16))
        yield off, p, bm


def bad_xl2_both_bits(img):
    """an allocated subcluster of the first allocated cluster also gets
    its zero bit"""
    for off, p, bm in _xl2_entries(img):
        if p & L1E_OFFSET_MASK and not p & COMPRESSED and bm & 0xFFFFFFFF:
            k = (bm & -bm).bit_length() - 1
            img.write(off + 8, struct.pack(">Q", bm | (1 << (32 + k))))
            return
    raise SystemExit("mkbad: no allocated subcluster")


def bad_xl2_alloc_unallocated(img):
    """an entry with no host cluster gets allocation bits"""
    for off, p, bm in _xl2_entries(img):
        if not p & (L1E_OFFSET_MASK | COMPRESSED):
            img.write(off + 8, struct.pack(">Q", 0x3))
            return
    raise SystemExit("mkbad: no unallocated entry")


def bad_xl2_compressed_bitmap(img):
    """a compressed cluster's entry gets a non-zero bitmap"""
    for off, p, bm in _xl2_entries(img):
        if p & COMPRESSED:
            img.write(off + 8, struct.pack(">Q", 1))
            return
    raise SystemExit("mkbad: no compressed cluster (make the image with qemu-img convert -c)")


KINDS = {n[4:].replace("_", "-"): f for n, f in sorted(globals().items())
         if n.startswith("bad_")}



def main(argv):
    if len(argv) == 2 and argv[1] == "--list":
        print("\n".join(KINDS))
        return 0
    if len(argv) == 4 and argv[1] == "--field":
        img = Image(argv[2])
        if argv[3] == "ext":
            exts, _ = img.extensions()
            print(" ".join("0x%08x:%d" % (t, ln) for _, t, ln in exts))
        elif argv[3].startswith("ext:"):
            # ext:TYPE -> hex of that extension's whole record (header+data)
            want = int(argv[3][4:], 0)
            exts, _ = img.extensions()
            for off, t, ln in exts:
                if t == want:
                    print(img.read(off, 8 + ln).hex())
                    return 0
            return 1
        else:
            print(img.get(argv[3]))
        return 0
    if len(argv) not in (3, 4) or argv[1] not in KINDS:
        sys.stderr.write(__doc__)
        return 2
    img = Image(argv[2])
    if argv[1] not in ("empty", "truncated-header"):
        if img.get("magic") != MAGIC:
            raise SystemExit("mkbad: %s is not a qcow2 image" % argv[2])
    KINDS[argv[1]](img, *argv[3:])
    img.f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
