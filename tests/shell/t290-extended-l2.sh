#!/bin/bash
# t290-extended-l2: images with extended L2 entries (extended_l2=on, 32
# subclusters per cluster) at 64 KiB and 2 MiB clusters, QEMU as the
# oracle:
#  - filled by qemu-io at subcluster offsets (data, zero writes,
#    discards): the view reads byte-identical to qemu-img convert -O raw;
#  - random subcluster-sized (and smaller) writes, punch-holes and
#    zero-ranges through the view, mirrored into a shadow file: the view
#    reads like the shadow; after unmount qemu-img check is clean and
#    qemu-img compare finds the image identical to the shadow;
#  - a 64 KiB cluster discarded 4 KiB at a time through the view (as
#    fstrim of a file system with 4 KiB blocks would) gives its host
#    cluster back: qemu-img map shows no host offset there any more and
#    the check finds no leak.
# The first two also run as overlays on a qcow2 base (unallocated
# subclusters show the base, discards set zero bits, the base unchanged).
. "$(dirname "$0")/lib.sh"
need_qcowfs
need cmp base64 fallocate

MNT=$T/view.raw

# The generator: seeded, so a failure can be replayed with the same seed.
cat >"$T/xl2ops.py" <<'EOF'
import ctypes, os, random, sys

view, shadow, seed, nops, cs = sys.argv[1:6]
seed, nops, cs = int(seed), int(nops), int(cs)
sc = cs // 32
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH, KEEP, ZERO = 0x02, 0x01, 0x10
r = random.Random(seed)
fv = os.open(view, os.O_RDWR)
fs = os.open(shadow, os.O_RDWR)
size = os.fstat(fv).st_size

def falloc(fd, mode, off, ln):
    if libc.fallocate(fd, mode, off, ln) != 0:
        e = ctypes.get_errno()
        sys.exit("seed %d: fallocate mode %#x %d+%d: %s" % (seed, mode, off, ln, os.strerror(e)))

def check(off, ln):
    a = os.pread(fv, ln, off)
    b = os.pread(fs, ln, off)
    if a != b:
        i = next(i for i in range(len(a)) if i >= len(b) or a[i] != b[i])
        sys.exit("seed %d: view differs from shadow at %d (read of %d at %d): view %r shadow %r"
                 % (seed, off + i, ln, off, a[i:i + 8], b[i:i + 8]))

for op in range(nops):
    y = r.random()
    if y < 0.6:                       # whole subclusters, or 512-byte sectors inside them
        nsc = r.randint(1, 40)
        off = r.randrange(size // sc) * sc
        if r.random() < 0.4:
            off += r.randrange(sc // 512) * 512
            ln = r.randint(1, 2 * sc // 512) * 512
        else:
            ln = nsc * sc
    else:                             # anything
        off, ln = r.randrange(size), r.randint(1, 3 * sc)
    ln = min(ln, size - off)
    x = r.random()
    if x < 0.5:
        data = bytes([r.randrange(1, 256)]) * ln
        os.pwrite(fv, data, off)
        os.pwrite(fs, data, off)
    elif x < 0.8:
        falloc(fv, PUNCH | KEEP, off, ln)
        falloc(fs, PUNCH | KEEP, off, ln)
    else:
        falloc(fv, ZERO, off, ln)
        falloc(fs, PUNCH | KEEP, off, ln)
    check(max(0, off - sc), min(size, off + ln + sc) - max(0, off - sc))
    if op % 50 == 49:
        os.fsync(fv)
os.close(fv)
os.close(fs)
EOF

# run CLUSTER_SIZE SIZE SEED NOPS [backing]
# backing: the image is an overlay on a qcow2 base made by qemu-img (data
# at offsets that do not line up with the overlay's subclusters); the
# base must be byte-identical afterwards.
run() {
	local cs=$1 size=$2 seed=$3 nops=$4 with=${5:-} sc img base="" bsum=""
	sc=$((cs / 32))
	img=$T/x$cs$with.qcow2
	if [ -n "$with" ]; then
		base=$T/base$cs.qcow2
		mkimg "$base" "$size"
		qio "$base" "write -P 0x91 0 $((size / 2 + 1536))" "write -P 0x92 $((size - 3 * cs - 512)) $((2 * cs))"
		bsum=$(sha "$base")
		qemu-img create -q -f qcow2 -b "$base" -F qcow2 -o "extended_l2=on,cluster_size=$cs" "$img" >>"$T/qemu.log" 2>&1 ||
			fail "qemu-img create an overlay with extended L2 entries ($cs)"
	else
		mkimg "$img" "$size" "extended_l2=on,cluster_size=$cs"
	fi
	[ "$(qinfo_field "$img" format-specific.data.extended-l2)" = true ] ||
		fail "qemu-img made $img without extended L2 entries"
	# qemu-io at subcluster offsets: data, zero writes, discards, a
	# partial subcluster, a write over a whole cluster
	qio "$img" "write -P 0x11 $sc $((3 * sc))" "write -z $((8 * sc)) $((2 * sc))" \
		"write -P 0x22 $((cs + 5 * sc + 512)) 1024" "write -P 0x33 $((3 * cs)) $cs" \
		"discard $((3 * cs + 4 * sc)) $((4 * sc))" "write -z $((3 * cs + 20 * sc)) $sc" \
		"write -P 0x44 $((7 * cs - sc)) $((2 * sc))" "write -P 0x55 $((size - sc)) $sc"
	raw_of "$img" "$T/qemu.raw"
	qmount "$img" "$MNT"
	same_file "$MNT" "$T/qemu.raw" "view of the qemu-io image ($cs)"
	cp "$T/qemu.raw" "$T/shadow.raw"
	$PYTHON "$T/xl2ops.py" "$MNT" "$T/shadow.raw" "$seed" "$nops" "$cs" || fail "random subcluster operations ($cs$with)"
	same_file "$MNT" "$T/shadow.raw" "view after random operations ($cs)"
	# compaction moves L2 tables (16-byte entries) and data clusters
	timeout 120 "$QCOWCTL" compact "$MNT" >"$T/compact.out" 2>&1 ||
		fail "qcowctl compact ($cs): $(cat "$T/compact.out")"
	same_file "$MNT" "$T/shadow.raw" "view after compaction ($cs)"
	qumount "$MNT"
	"$QCOWCTL" check "$img" >"$T/cc.txt" 2>&1 || fail "qcowctl check ($cs$with): $(cat "$T/cc.txt")"
	[ -z "$base" ] || [ "$(sha "$base")" = "$bsum" ] || fail "the backing file changed ($cs)"
	qcheck "$img"
	qcompare "$img" "$T/shadow.raw" "image after random operations ($cs)"
	# and a second mount reads it back the same
	qmount "$img" "$MNT" -o ro
	same_file "$MNT" "$T/shadow.raw" "view after a remount ($cs)"
	qumount "$MNT"
	log "extended L2 at $cs-byte clusters${with:+ over a backing file}: ok"
}

run 65536 $((16 << 20)) 290 600
run $((2 << 20)) $((64 << 20)) 291 300
run 65536 $((16 << 20)) 294 600 backing
run $((2 << 20)) $((64 << 20)) 295 300 backing

# an internal snapshot (shared L2 tables and data clusters: copy-on-write
# of 16-byte entries, COPIED cleared and set) and a compressed image
# (compressed entries have no bitmap; a write makes a whole normal
# cluster)
img=$T/snap.qcow2
mkimg "$img" 8M "extended_l2=on,cluster_size=65536"
qio "$img" "write -P 0x61 0 1M" "write -z 64k 8k" "discard 128k 4k"
qemu-img snapshot -c s1 "$img" >>"$T/qemu.log" 2>&1 || fail "qemu-img snapshot -c s1"
qemu-img convert -f qcow2 -O raw -l snapshot.name=s1 "$img" "$T/s1.raw" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img convert -l s1"
raw_of "$img" "$T/shadow.raw"
qmount "$img" "$MNT"
$PYTHON "$T/xl2ops.py" "$MNT" "$T/shadow.raw" 292 300 65536 || fail "random operations over a snapshot"
qumount "$MNT"
qcheck "$img"
qcompare "$img" "$T/shadow.raw" "image with a snapshot after random operations"
qemu-img convert -f qcow2 -O raw -l snapshot.name=s1 "$img" "$T/s1b.raw" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img convert -l s1 after the mount"
same_file "$T/s1b.raw" "$T/s1.raw" "snapshot s1 after writes to the active layer"
log "extended L2 with an internal snapshot: ok"

head -c $((2 << 20)) /dev/urandom | base64 -w 0 | head -c $((4 << 20)) >"$T/text.raw"
truncate -s 8M "$T/text.raw"
img=$T/comp.qcow2
qemu-img convert -q -f raw -O qcow2 -c -o extended_l2=on,cluster_size=65536 "$T/text.raw" "$img" ||
	fail "qemu-img convert -c -o extended_l2=on"
qmount "$img" "$MNT"
same_file "$MNT" "$T/text.raw" "view of a compressed extended-L2 image"
cp "$T/text.raw" "$T/shadow.raw"
$PYTHON "$T/xl2ops.py" "$MNT" "$T/shadow.raw" 293 300 65536 || fail "random operations on compressed clusters"
qumount "$MNT"
qcheck "$img"
qcompare "$img" "$T/shadow.raw" "compressed image after random operations"
log "extended L2 with compressed clusters: ok"

# hostile subcluster bitmaps (mkbad.py): a read-write mount is refused
# naming the entry's offset, a read-only one never crashes, and the image
# is unchanged
mkimg "$T/h.qcow2" 4M "extended_l2=on,cluster_size=65536"
qio "$T/h.qcow2" "write -P 0x71 0 8k" "write -P 0x72 128k 64k"
for kind in xl2-both-bits xl2-alloc-unallocated xl2-compressed-bitmap; do
	img=$T/$kind.qcow2
	if [ $kind = xl2-compressed-bitmap ]; then
		cp "$T/comp.qcow2" "$img"
	else
		cp "$T/h.qcow2" "$img"
	fi
	$PYTHON "$MKBAD" $kind "$img" || fail "mkbad.py $kind"
	sum=$(sha "$img")
	qmount_fails "$img" "$T/h.raw"
	grep -qE 'L2 entry at offset 0x[0-9a-f]+ .*(both allocated and zero|no host offset|compressed cluster has a non-zero subcluster bitmap)' "$QM_ERR" ||
		fail "$kind: message does not name the entry and the problem: $(cat "$QM_ERR")"
	rc=0
	timeout 30 "$QCOWFS" "$img" "$T/h.raw" -o ro >>"$T/qcowfs.log" 2>&1 || rc=$?
	if [ $rc = 0 ] && is_mounted "$T/h.raw"; then
		_MOUNTS+=("$T/h.raw")
		_DAEMON[$T/h.raw]=$(daemon_pid "$img" "$T/h.raw")
		dd if="$T/h.raw" of=/dev/null bs=64k status=none 2>/dev/null || true   # EIO in the bad cluster
		qumount "$T/h.raw"
	fi
	[ "$(sha "$img")" = "$sum" ] || fail "$kind: qcowfs changed the image"
	log "refused $kind: $(head -n 1 "$QM_ERR")"
done

# sub-cluster reclaim: one 64 KiB cluster written, then discarded 4 KiB at
# a time through the view, without and with a backing file (then the
# discarded blocks get zero bits, and the entry ends all-zero with no host
# cluster)
reclaim() {
	local with=$1 img=$T/reclaim$1.qcow2 i
	if [ -n "$with" ]; then
		mkimg "$T/rbase.qcow2" 16M
		qio "$T/rbase.qcow2" "write -P 0x93 0 1M"
		qemu-img create -q -f qcow2 -b "$T/rbase.qcow2" -F qcow2 -o extended_l2=on,cluster_size=65536 "$img" \
			>>"$T/qemu.log" 2>&1 || fail "qemu-img create the reclaim overlay"
	else
		mkimg "$img" 16M "extended_l2=on,cluster_size=65536"
	fi
	qmount "$img" "$MNT"
	dd if=/dev/urandom of="$T/c.bin" bs=64k count=1 status=none
	dd if="$T/c.bin" of="$MNT" bs=64k seek=5 count=1 conv=notrunc,fsync status=none
	qumount "$MNT"
	qemu-img map --output=json "$img" >"$T/map1.json"
	grep -q '"start": 327680, "length": 65536, "depth": 0, .*"data": true, "offset"' "$T/map1.json" ||
		fail "the written cluster has no host cluster${with:+ (backing)}: $(cat "$T/map1.json")"
	qmount "$img" "$MNT"
	for i in $(seq 0 15); do
		fallocate --punch-hole --keep-size -o $((5 * 65536 + i * 4096)) -l 4096 "$MNT" ||
			fail "punch-hole of 4 KiB block $i failed"
		if [ "$i" -lt 15 ]; then
			# still there: the rest of the cluster reads back
			dd if="$MNT" bs=4096 skip=$((5 * 16 + i + 1)) count=$((15 - i)) status=none | cmp -s - \
				<(dd if="$T/c.bin" bs=4096 skip=$((i + 1)) status=none) ||
				fail "the rest of the cluster changed after discarding block $i${with:+ (backing)}"
		fi
	done
	sync "$MNT"
	cmp -s <(dd if="$MNT" bs=64k skip=5 count=1 status=none) <(head -c 65536 /dev/zero) ||
		fail "the discarded cluster does not read zeros${with:+ (backing)}"
	qumount "$MNT"
	qcheck "$img"
	qemu-img map --output=json "$img" >"$T/map2.json"
	if grep '"depth": 0, .*"offset"' "$T/map2.json" >/dev/null; then
		fail "a host cluster is still mapped after all 16 blocks were discarded${with:+ (backing)}: $(cat "$T/map2.json")"
	fi
	# (over a backing file the zero bits keep the base's data hidden)
	$PYTHON -c '
import json, sys
for m in json.load(open(sys.argv[1])):
    if m["start"] <= 327680 < m["start"] + m["length"]:
        sys.exit(0 if m["depth"] == 0 and m["zero"] and not m["data"] else 1)
sys.exit(1)' "$T/map2.json" ||
		fail "the discarded cluster is not zero in qemu-img map${with:+ (backing)}: $(cat "$T/map2.json")"
	log "a cluster discarded 4 KiB at a time released its host cluster${with:+ (over a backing file)}"
}
reclaim ""
reclaim backing
log "ok"
