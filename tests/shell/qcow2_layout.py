#!/usr/bin/env python3
"""qcow2_layout.py - what a qcow2 file holds, cluster by cluster, read-only.

usage: qcow2_layout.py IMAGE            (prints one JSON object)

An oracle for the compaction tests (t250, t260) and bench/compact.sh that
does not go through qcowfs: it reads the header, the refcount table and
blocks, the active L1/L2 tables and every snapshot's L1/L2 tables, and
prints

  cluster_size, file_size, file_clusters   (the file rounded up to clusters)
  refcounted        clusters below the end of the file with refcount > 0
  free_below_end    clusters below the end of the file with refcount 0
  free_first        the file offsets of the first 8 of those (hex)
  last_used         file offset of the last cluster with refcount > 0
  references        the sum of all refcounts below the end of the file
  shared            clusters with refcount > 1
  shared_above_free clusters with refcount > 1 above the lowest free cluster
                    (what a compaction must move that is shared)
  snapshots         number of internal snapshots
  l2_tables         distinct L2 tables (active and snapshots)
  l2_shared         L2 tables that more than one L1 (or a snapshot) points to
  compressed        compressed descriptors in the active L2 tables
  compressed_all    distinct compressed descriptors, snapshots included
  compressed_hosts  host clusters touched by compressed data
  compressed_crossing     compressed descriptors whose data crosses a
                          host-cluster boundary (active and snapshots)
  compressed_shared_hosts host clusters touched by several compressed
                          descriptors
  data_clusters     distinct host clusters of normal (not compressed) data

The refcounts say which clusters are in use only when the image is clean
(`qemu-img check` finds no leaks and no errors): the tests check that
first, and then "free_below_end == 0" means no free cluster lies below the
end of the file.  Nothing here writes to IMAGE, and it never trusts an
offset: a pointer outside the file is skipped, so a damaged image gives
odd counts, not a crash.  All on-disk integers are big-endian.
"""

import json
import os
import struct
import sys

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62


def main(path):
    f = open(path, "rb")
    size = os.fstat(f.fileno()).st_size

    def rd(off, n):
        f.seek(off)
        return f.read(n)

    hdr = rd(0, 104)
    magic, version = struct.unpack(">II", hdr[0:8])
    if magic != 0x514649FB:
        sys.exit("%s: not a qcow2 file (magic 0x%08x at offset 0)" % (path, magic))
    cluster_bits = struct.unpack(">I", hdr[20:24])[0]
    l1_size, l1_off = struct.unpack(">IQ", hdr[36:48])
    rt_off, rt_clusters = struct.unpack(">QI", hdr[48:60])
    nb_snap, snap_off = struct.unpack(">IQ", hdr[60:72])
    refcount_order = struct.unpack(">I", hdr[96:100])[0] if version >= 3 else 4
    cs = 1 << cluster_bits
    bits = 1 << refcount_order
    per_block = cs * 8 // bits
    nclusters = (size + cs - 1) // cs

    # refcounts of every cluster of the file
    refcounts = [0] * nclusters
    rt = rd(rt_off, rt_clusters * cs)
    for i in range(len(rt) // 8):
        blk = struct.unpack(">Q", rt[i * 8:i * 8 + 8])[0] & ~0x1FF
        if not blk or blk >= size:
            continue
        data = rd(blk, cs)
        base = i * per_block
        if base >= nclusters:
            break
        n = min(per_block, nclusters - base)
        if bits >= 8:
            w = bits // 8
            for j in range(n):
                refcounts[base + j] = int.from_bytes(data[j * w:j * w + w], "big")
        else:
            for j in range(n):
                bit = j * bits
                byte = data[bit // 8]
                refcounts[base + j] = (byte >> (bit % 8)) & ((1 << bits) - 1)

    # L1 tables: the active one and the snapshots'
    l1s = [(l1_off, l1_size)]
    off = snap_off
    for _ in range(nb_snap):
        e = rd(off, 40)
        if len(e) < 40:
            break
        s_l1_off, s_l1_size, id_len, name_len = struct.unpack(">QIHH", e[0:16])
        extra = struct.unpack(">I", e[36:40])[0]
        l1s.append((s_l1_off, s_l1_size))
        off += 40 + extra + id_len + name_len
        off = (off + 7) & ~7

    l2_users = {}
    compressed_active = 0
    compressed_all = set()
    comp_hosts = set()
    comp_users = {}      # host cluster -> distinct descriptors touching it
    crossing = set()
    data = set()
    for k, (lo, ls) in enumerate(l1s):
        l1 = rd(lo, ls * 8)
        for i in range(len(l1) // 8):
            l2 = struct.unpack(">Q", l1[i * 8:i * 8 + 8])[0] & OFFSET_MASK
            if l2 and l2 < size:
                l2_users[l2] = l2_users.get(l2, 0) + 1
        if k == 0:
            active_l2 = set(l2_users)
    for l2 in l2_users:
        t = rd(l2, cs)
        for j in range(len(t) // 8):
            e = struct.unpack(">Q", t[j * 8:j * 8 + 8])[0]
            if e & COMPRESSED:
                # descriptor: host offset in the low (62 - (cluster_bits - 8))
                # bits, then the count of additional 512-byte sectors
                x = 62 - (cluster_bits - 8)
                host = e & ((1 << x) - 1)
                sectors = ((e >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
                end = (host & ~511) + sectors * 512
                compressed_all.add(e & ~COMPRESSED)
                if l2 in active_l2:
                    compressed_active += 1
                for c in range(host // cs, (end - 1) // cs + 1):
                    comp_hosts.add(c)
                    comp_users.setdefault(c, set()).add(e & ~COMPRESSED)
                if host // cs != (end - 1) // cs:
                    crossing.add(e & ~COMPRESSED)
            else:
                h = e & OFFSET_MASK
                if h:
                    data.add(h // cs)

    used = [i for i, r in enumerate(refcounts) if r]
    free = [i for i, r in enumerate(refcounts) if not r]
    out = {
        "cluster_size": cs,
        "file_size": size,
        "file_clusters": nclusters,
        "refcounted": len(used),
        "free_below_end": len(free),
        "free_first": ["0x%x" % (c * cs) for c in free[:8]],
        "last_used": used[-1] * cs if used else 0,
        "references": sum(refcounts),
        "shared": sum(1 for r in refcounts if r > 1),
        "shared_above_free": sum(1 for r in refcounts[free[0]:] if r > 1) if free else 0,
        "snapshots": nb_snap,
        "l2_tables": len(l2_users),
        "l2_shared": sum(1 for n in l2_users.values() if n > 1),
        "compressed": compressed_active,
        "compressed_all": len(compressed_all),
        "compressed_hosts": len(comp_hosts),
        "compressed_crossing": len(crossing),
        "compressed_shared_hosts": sum(1 for u in comp_users.values() if len(u) > 1),
        "data_clusters": len(data),
    }
    json.dump(out, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
