#!/bin/bash
# t285-compressed-interop: zlib and zstd images as `qemu-img convert -c`
# lays them out read byte-exact through the view, and writes, discards and
# compaction keep QEMU's view of them consistent (issue 8, "Compression:
# zlib and zstd").
#
# The source is 32 MiB + 63 KiB (a partial last cluster) of 64 KiB blocks
# of mixed compressibility, chosen at random with a fixed seed: random
# bytes (QEMU stores those uncompressed), base64 text (streams of ~48 KiB,
# which cross host-cluster boundaries), log-like lines (streams of a few
# KiB, several in one host cluster), zeros (not stored), and blocks half
# text, half zeros.  For each compression type:
#  1. qemu-img convert -c; the layout (tests/shell/qcow2_layout.py) must
#     really have streams crossing a host-cluster boundary and host
#     clusters shared by several streams, else the test proves nothing.
#  2. Mounted (compaction off, so that no cluster moves under the checks):
#     the view equals the source.  Then, mirrored into a shadow file:
#     partial writes into compressed clusters (crossing ones and sharing
#     ones), whole-cluster overwrites, a write across two compressed
#     clusters, a partial discard inside a compressed cluster, whole
#     discards of compressed clusters whose host clusters other streams
#     still use, and a discarded run of clusters.  The view equals the
#     shadow.
#  3. Unmounted: qemu-img check clean (no leak, no error: exactly the host
#     clusters nothing else uses were freed), qemu-img compare with the
#     shadow identical, qemu-img map shows every written cluster as a
#     normal cluster (an offset: not compressed) and every discarded one as
#     reading zeros with nothing allocated; from the refcounts, every host
#     cluster that only discarded streams used is free (or cut off the
#     file) and every one a remaining stream uses is still counted.
#  4. Mounted again with compaction: qcowctl compact, the view still
#     equals the shadow; after the unmount qemu-img check clean, compare
#     identical, and the file no larger than before.
# What t250 (zlib: a whole cloud image, its size after compaction) and
# t270 (zstd: reads, writes, compaction, a corrupted frame) do not cover
# is the layout verified, the oracles per cluster and the discard of
# streams sharing host clusters; this test does not repeat theirs.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need cmp

MNT=$T/view.raw
: >"$MNT"
LAYOUT="$PYTHON $TESTDIR/qcow2_layout.py"

# ---- the helper: the image's compressed clusters, the operations, the verdict
cat >"$T/comp.py" <<'EOF'
"""comp.py - for t285.
  comp.py source OUT SEED             writes the mixed source
  comp.py map IMAGE                   JSON: guest cluster -> kind and host range
  comp.py ops MAP VIEW SHADOW SEED    does the writes and discards, prints them (JSON)
  comp.py verify MAP OPS IMAGE QMAP   checks the image after the unmount
"""
import base64, ctypes, json, os, random, struct, sys

CS = 65536


def source(out, seed):
    r = random.Random(seed)
    size = 32 * CS * 16 + 63 * 1024
    with open(out, "wb") as f:
        left = size
        while left:
            n = min(CS, left)
            kind = r.choice(("random", "text", "text", "logs", "logs", "zero", "half"))
            if kind == "random":
                b = r.randbytes(n)
            elif kind == "text":
                b = base64.b64encode(r.randbytes(n))[:n]
            elif kind == "logs":
                i = r.randrange(10**6)
                b = b"".join(b"%08d kernel: eth%d link up, 1000 Mbps\n" % (x, x % 3)
                             for x in range(i, i + 2000))[:n]
            elif kind == "zero":
                b = bytes(n)
            else:
                b = base64.b64encode(r.randbytes(n // 2))[:n // 2]
                b += bytes(n - len(b))
            f.write(b)
            left -= n


def read_map(path):
    f = open(path, "rb")
    size = os.fstat(f.fileno()).st_size

    def rd(off, n):
        f.seek(off)
        return f.read(n)

    h = rd(0, 112)
    cb = struct.unpack(">I", h[20:24])[0]
    cs = 1 << cb
    vsize = struct.unpack(">Q", h[24:32])[0]
    l1_size, l1_off = struct.unpack(">IQ", h[36:48])
    rt_off, rt_cl = struct.unpack(">QI", h[48:60])
    order = struct.unpack(">I", h[96:100])[0]
    x = 62 - (cb - 8)
    out = {}
    per = cs // 8
    for i in range(l1_size):
        l2 = struct.unpack(">Q", rd(l1_off + 8 * i, 8))[0] & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        t = rd(l2, cs)
        for j in range(per):
            g = i * per + j
            if g * cs >= vsize:
                break
            e = struct.unpack(">Q", t[8 * j:8 * j + 8])[0]
            if e & (1 << 62):
                host = e & ((1 << x) - 1)
                sectors = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
                end = (host & ~511) + sectors * 512
                out[g] = {"kind": "compressed", "lo": host, "hi": end,
                          "hosts": list(range(host // cs, (end - 1) // cs + 1))}
            elif e & 0x00FFFFFFFFFFFE00:
                out[g] = {"kind": "normal", "lo": e & 0x00FFFFFFFFFFFE00, "hosts": [(e & 0x00FFFFFFFFFFFE00) // cs]}
            elif e & 1:
                out[g] = {"kind": "zero"}
    # refcounts of the file's clusters
    bits = 1 << order
    per_block = cs * 8 // bits
    nclusters = (size + cs - 1) // cs
    rc = [0] * nclusters
    rt = rd(rt_off, rt_cl * cs)
    for i in range(len(rt) // 8):
        blk = struct.unpack(">Q", rt[8 * i:8 * i + 8])[0] & ~0x1FF
        if not blk or blk >= size:
            continue
        data = rd(blk, cs)
        for j in range(per_block):
            c = i * per_block + j
            if c >= nclusters:
                break
            if bits >= 8:
                w = bits // 8
                rc[c] = int.from_bytes(data[j * w:j * w + w], "big")
            else:
                rc[c] = (data[j * bits // 8] >> (j * bits % 8)) & ((1 << bits) - 1)
    return {"cs": cs, "vsize": vsize, "clusters": {str(k): v for k, v in out.items()}, "refcounts": rc}


def comp_users(m):
    """host cluster -> guest clusters whose compressed stream touches it"""
    users = {}
    for g, v in m["clusters"].items():
        if v["kind"] == "compressed":
            for hc in v["hosts"]:
                users.setdefault(hc, set()).add(int(g))
    return users


def punch(fd, off, n):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    if libc.fallocate(fd, 3, off, n) != 0:   # PUNCH_HOLE | KEEP_SIZE
        e = ctypes.get_errno()
        raise OSError(e, "fallocate(PUNCH_HOLE) %d+%d: %s" % (off, n, os.strerror(e)))


def ops(mapfile, view, shadow, seed):
    m = json.load(open(mapfile))
    r = random.Random(seed)
    cs = m["cs"]
    comp = sorted(int(g) for g, v in m["clusters"].items() if v["kind"] == "compressed")
    users = comp_users(m)
    crossing = [g for g in comp if len(m["clusters"][str(g)]["hosts"]) > 1]
    sharing = [g for g in comp if any(len(users[h]) > 1 for h in m["clusters"][str(g)]["hosts"])]
    touched = set()
    done = {"write_partial": [], "write_whole": [], "discard_partial": [], "discard_whole": []}
    vf = os.open(view, os.O_RDWR)
    sf = os.open(shadow, os.O_RDWR)

    def pick(pool, n):
        pool = [g for g in pool if g not in touched and g + 1 not in touched and g - 1 not in touched]
        got = r.sample(pool, min(n, len(pool)))
        touched.update(got)
        return got

    def write(off, data):
        os.pwrite(vf, data, off)
        os.pwrite(sf, data, off)

    for g in pick(crossing, 4) + pick(sharing, 4):
        o = r.randrange(0, cs - 4000)
        write(g * cs + o, r.randbytes(4000))
        done["write_partial"].append(g)
    for g in pick(comp, 2):
        write(g * cs, r.randbytes(cs))
        done["write_whole"].append(g)
    # across the end of one compressed cluster into the next one
    for g in comp:
        if g + 1 in comp and not touched & {g - 1, g, g + 1, g + 2}:
            write(g * cs + cs - 1000, r.randbytes(2000))
            touched.update((g, g + 1))
            done["write_partial"] += [g, g + 1]
            break
    for g in pick(comp, 2):
        o = r.randrange(0, cs - 8192) & ~511
        punch(vf, g * cs + o, 4096)
        os.pwrite(sf, bytes(4096), g * cs + o)
        done["discard_partial"].append(g)
    os.fsync(vf)
    # whole clusters whose host clusters another stream, left alone, uses
    cands = [g for g in sharing
             if any(u not in touched and u != g for h in m["clusters"][str(g)]["hosts"] for u in users[h])]
    for g in pick(cands, 6):
        punch(vf, g * cs, cs)
        os.pwrite(sf, bytes(cs), g * cs)
        done["discard_whole"].append(g)
    # a run of 8 clusters with compressed ones in it
    for g in comp:
        run = range(g, g + 8)
        if (g + 8) * cs <= m["vsize"] and not touched & set(range(g - 1, g + 9)):
            punch(vf, g * cs, 8 * cs)
            os.pwrite(sf, bytes(8 * cs), g * cs)
            done["discard_whole"] += [x for x in run if str(x) in m["clusters"]]
            touched.update(run)
            break
    os.fsync(vf)
    os.close(vf)
    os.close(sf)
    json.dump(done, sys.stdout)


def verify(mapfile, opsfile, image, qmapfile):
    before = json.load(open(mapfile))
    done = json.load(open(opsfile))
    after = read_map(image)
    cs = before["cs"]
    qmap = json.load(open(qmapfile))
    bad = []

    def qemu_at(g):
        for e in qmap:
            if e["start"] <= g * cs < e["start"] + e["length"]:
                return e
        return None

    for g in done["write_partial"] + done["write_whole"] + done["discard_partial"]:
        e = qemu_at(g)
        if not e or not e.get("data") or "offset" not in e:
            bad.append("cluster %d was written but qemu-img map shows %r (a compressed cluster has no offset)" % (g, e))
        a = after["clusters"].get(str(g))
        if not a or a["kind"] != "normal":
            bad.append("cluster %d was written but its L2 entry is %r" % (g, a))
    for g in done["discard_whole"]:
        e = qemu_at(g)
        if not e or e.get("data") or not e.get("zero"):
            bad.append("cluster %d was discarded but qemu-img map shows %r" % (g, e))
    # host clusters of the discarded streams: free unless something still uses them
    ub = comp_users(before)
    ua = comp_users(after)
    gone = set(done["discard_whole"]) | set(done["write_whole"]) | set(done["write_partial"]) | set(done["discard_partial"])
    freed = kept = 0
    rc = after["refcounts"]
    for g in done["discard_whole"]:
        v = before["clusters"].get(str(g))
        if not v or v["kind"] != "compressed":
            continue
        for h in v["hosts"]:
            others = ub[h] - gone
            count = rc[h] if h < len(rc) else 0
            if others:
                kept += 1
                if count < 1 or h not in ua:
                    bad.append("host cluster 0x%x still holds data of clusters %s but has refcount %d" % (h * cs, sorted(others), count))
            elif count == 0 or any(x.get("kind") == "normal" and h in x.get("hosts", [])
                                   for x in after["clusters"].values()):
                freed += 1      # free, or reused by a new normal cluster
            else:
                bad.append("host cluster 0x%x only held discarded streams but still has refcount %d" % (h * cs, count))
    if not kept:
        bad.append("no discarded stream shared a host cluster with a kept one: the test proves nothing")
    if bad:
        sys.exit("\n".join(bad[:20]))
    print("%d written, %d discarded; of their host clusters %d kept for other streams, %d freed"
          % (len(done["write_partial"]) + len(done["write_whole"]) + len(done["discard_partial"]),
             len(done["discard_whole"]), kept, freed))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "source":
        source(sys.argv[2], int(sys.argv[3]))
    elif cmd == "map":
        json.dump(read_map(sys.argv[2]), sys.stdout)
    elif cmd == "ops":
        ops(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif cmd == "verify":
        verify(*sys.argv[2:6])
EOF
COMP="$PYTHON $T/comp.py"

$COMP source "$T/src.raw" 285

for type in zlib zstd; do
	IMG=$T/$type.qcow2
	SHADOW=$T/$type.shadow
	qemu-img convert -q -c -f raw -O qcow2 -o compression_type=$type "$T/src.raw" "$IMG" >>"$T/qemu.log" 2>&1 ||
		fail "qemu-img convert -c -o compression_type=$type failed: $(tail -n 3 "$T/qemu.log")"
	[ "$(qinfo_field "$IMG" format-specific.data.compression-type)" = $type ] ||
		fail "setup: qemu-img did not make a $type image"
	# ---- 1. the layout has what the test is about
	$LAYOUT "$IMG" >"$T/layout.json"
	read -r ncomp crossing shared <<<"$($PYTHON -c '
import json, sys
v = json.load(open(sys.argv[1]))
print(v["compressed"], v["compressed_crossing"], v["compressed_shared_hosts"])' "$T/layout.json")"
	log "$type: $ncomp compressed clusters, $crossing crossing a host-cluster boundary, $shared host clusters shared by several streams"
	[ "$ncomp" -ge 100 ] && [ "$crossing" -ge 10 ] && [ "$shared" -ge 10 ] ||
		fail "setup: the $type image lacks the layout under test: $(cat "$T/layout.json")"
	$COMP map "$IMG" >"$T/$type.map.json"

	# ---- 2. reads, writes, discards
	cp "$T/src.raw" "$SHADOW"
	qmount "$IMG" "$MNT" -o compact=off
	same_file "$MNT" "$T/src.raw" "$type: the view of the converted image vs its source"
	$COMP ops "$T/$type.map.json" "$MNT" "$SHADOW" 285 >"$T/$type.ops.json" ||
		fail "$type: the writes and discards through the view failed"
	same_file "$MNT" "$SHADOW" "$type: the view after writes and discards vs the shadow"
	qumount "$MNT"

	# ---- 3. what QEMU sees
	qcheck "$IMG"
	qcompare "$IMG" "$SHADOW" "$type: after writes and discards"
	qemu-img map --output=json "$IMG" >"$T/$type.qmap.json" 2>>"$T/qemu.log" || fail "qemu-img map $IMG failed"
	out=$($COMP verify "$T/$type.map.json" "$T/$type.ops.json" "$IMG" "$T/$type.qmap.json" 2>&1) ||
		fail "$type: $out"
	log "$type: $out"

	# ---- 4. compaction
	size0=$(file_size "$IMG")
	qmount "$IMG" "$MNT"
	timeout 120 "$QCOWCTL" compact "$MNT" >"$T/compact.out" 2>&1 ||
		fail "$type: qcowctl compact failed: $(cat "$T/compact.out")"
	same_file "$MNT" "$SHADOW" "$type: the view after compaction vs the shadow"
	qumount "$MNT" qcowctl
	size1=$(file_size "$IMG")
	qcheck "$IMG"
	qcompare "$IMG" "$SHADOW" "$type: after compaction"
	[ "$size1" -le "$size0" ] || fail "$type: compaction grew the file ($size0 -> $size1 bytes)"
	log "$type: compacted $size0 -> $size1 bytes: $(tr '\n' ' ' <"$T/compact.out")"
done
log "ok"
