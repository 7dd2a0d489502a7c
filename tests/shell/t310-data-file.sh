#!/bin/bash
# t310-data-file: images with an external data file (qemu-img create -o
# data_file=..., with data_file_raw off and on), filled by qemu-io, with
# QEMU as the oracle: the view reads byte-identical to qemu-img convert -O
# raw; random writes, zero-range and punch-hole through the view mirrored
# into a shadow file; after unmount qemu-img check is clean, qemu-img
# compare finds the shadow, and with data_file_raw the data file itself is
# the shadow.  While mounted the data file is locked (qemu-io on it and a
# second qcowfs are refused).  The data file's relative name resolves
# against the image's folder, -o data_file=PATH overrides it; a missing
# data file, data_file_raw without a data file, a compressed cluster with a
# data file and snapshot create are refused with a message, and the
# image's bytes stay unchanged.  qcowctl info and check know the feature.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need qemu-img qemu-io cmp

# QEMU 7.2 opens a relative data file name against its working directory,
# qcowfs against the image's folder: qemu's tools run in the image's folder
QCOWFS=$(realpath "$QCOWFS")
QCOWCTL=$(realpath "$QCOWCTL")
cd "$T"
MNT=$T/view.raw
SIZE=$((8 << 20))

# The seeded mirror: writes (pwrite), zero ranges and punched holes
# (fallocate) on the view and on the shadow alike, reading back as it goes.
cat >"$T/mirror.py" <<'EOF'
import ctypes, os, random, sys

view, shadow, seed, nops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH, ZERO = 0x01 | 0x02, 0x10          # KEEP_SIZE|PUNCH_HOLE, ZERO_RANGE
r = random.Random(seed)
fv = os.open(view, os.O_RDWR)
fs = os.open(shadow, os.O_RDWR)
size = os.fstat(fv).st_size
cs = 65536

def falloc(fd, mode, off, ln, what):
    if libc.fallocate(fd, mode, off, ln) != 0:
        e = ctypes.get_errno()
        sys.exit("seed %d: %s fallocate(%d, %d) failed: %s" % (seed, what, off, ln, os.strerror(e)))

def check(off, ln):
    a, b = os.pread(fv, ln, off), os.pread(fs, ln, off)
    if a != b:
        i = next(i for i in range(len(a)) if a[i] != b[i])
        sys.exit("seed %d: view differs from the shadow at %d" % (seed, off + i))

for op in range(nops):
    x = r.random()
    if x < 0.05:
        os.fsync(fv)
        continue
    if r.random() < 0.5:              # whole clusters and more
        off = r.randrange(size // cs) * cs - r.choice([0, 0, 512, 1000])
        off = max(off, 0)
        ln = min(r.randint(1, 3) * cs + r.choice([0, 0, 4096, 7]), size - off)
    else:
        off = r.randrange(size - 1)
        ln = min(r.randint(1, 9000), size - off)
    if x < 0.65:
        # zeros too: qcowfs's detect_zeroes=unmap turns whole zero
        # clusters into discards (punched in the data file)
        k = r.random()
        data = bytes(ln) if k < 0.15 else bytes([r.randrange(1, 256)]) * ln if k < 0.55 else os.urandom(ln)
        os.pwrite(fv, data, off)
        os.pwrite(fs, data, off)
    elif x < 0.8:
        falloc(fv, ZERO, off, ln, "view zero-range")
        falloc(fs, ZERO, off, ln, "shadow zero-range")
    else:
        falloc(fv, PUNCH, off, ln, "view punch-hole")
        falloc(fs, PUNCH, off, ln, "shadow punch-hole")
    check(max(0, off - 4096), min(ln + 8192, size - max(0, off - 4096)))
os.fsync(fv)
for off in range(0, size, 1 << 20):
    check(off, min(1 << 20, size - off))
EOF

# fill IMAGE: what a guest under QEMU leaves: data, a zeroed range, a
# discarded one, data at host offset 0 (the entry with offset 0 and COPIED)
fill() {
	qio "$1" 'write -P 0x5a 0 100k' 'write -P 0x33 1M 192k' 'write -P 0x77 3M 4k' \
		'write -z 1088k 64k' 'discard 1152k 64k' 'write -P 0x44 8128k 64k'
}

for raw in off on; do
	img=$T/img-$raw.qcow2
	data=data-$raw.raw
	log "data_file_raw=$raw"
	mkimg "$img" $SIZE "data_file=$data,data_file_raw=$raw"
	fill "$img"
	raw_of "$img" "$T/ref.raw"
	cp "$T/ref.raw" "$T/shadow.raw"
	: >"$MNT"

	# the name resolves against the image's folder, wherever qcowfs runs
	cd /
	qmount "$img" "$MNT"
	cd "$T"
	same_file "$MNT" "$T/ref.raw" "view of the qemu-io-filled image (data_file_raw=$raw)"

	# the data file is locked like the image
	if out=$(qemu-io -f raw -c 'read 0 512' "$data" 2>&1); then
		fail "qemu-io opened the data file $data read-write while it is mounted: $out"
	fi
	grep -qi lock <<<"$out" || fail "qemu-io on the mounted data file failed without naming a lock: $out"
	: >"$T/view2.raw"
	qmount_fails "$img" "$T/view2.raw" -o data_file="$T/$data"
	grep -qi lock "$QM_ERR" || fail "a second qcowfs of the image failed without naming a lock: $(cat "$QM_ERR")"

	# snapshots: refused on the live image, as QEMU refuses them
	rc=0
	"$QCOWCTL" snapshot create s1 "$MNT" >"$T/snap.out" 2>&1 || rc=$?
	[ $rc = 1 ] || fail "qcowctl snapshot create on a data-file image exited $rc: $(cat "$T/snap.out")"
	grep -q "external data file" "$T/snap.out" || fail "snapshot create refusal does not name the data file: $(cat "$T/snap.out")"

	# a partial write into the cluster qemu-io zeroed (its old data is
	# still in the data file, under the zero flag) and into the
	# discarded one: the rest of each cluster must read zeros
	for off in $((1088 * 1024 + 1000)) $((1152 * 1024 + 5000)); do
		printf 'partial' | dd of="$MNT" bs=1 seek=$off conv=notrunc status=none
		printf 'partial' | dd of="$T/shadow.raw" bs=1 seek=$off conv=notrunc status=none
	done
	# (compared after an unmount: the page cache still holds the zeros
	# read before)
	qumount "$MNT"
	qcompare "$img" "$T/shadow.raw" "after partial writes into zeroed clusters (data_file_raw=$raw)"
	qmount "$img" "$MNT"
	"$PYTHON" "$T/mirror.py" "$MNT" "$T/shadow.raw" "$((310 + ${#raw}))" 400 ||
		fail "mirror of writes, zero ranges and holes (data_file_raw=$raw) failed"
	same_file "$MNT" "$T/shadow.raw" "view after the mirror (data_file_raw=$raw)"
	# the disk grows and shrinks (a raw data file with it); past a shrink
	# and a grow again, the cut part reads zeros
	truncate -s $((SIZE + (1 << 20))) "$MNT" || fail "growing the view (data_file_raw=$raw) failed"
	truncate -s $((SIZE + (1 << 20))) "$T/shadow.raw"
	printf 'grown' | dd of="$MNT" bs=1 seek=$((SIZE + 70000)) conv=notrunc status=none
	printf 'grown' | dd of="$T/shadow.raw" bs=1 seek=$((SIZE + 70000)) conv=notrunc status=none
	same_file "$MNT" "$T/shadow.raw" "view after growing (data_file_raw=$raw)"
	small=$((SIZE - (1 << 20) + 3 * 4096 + 512))
	truncate -s $small "$MNT" || fail "shrinking the view (data_file_raw=$raw) failed"
	truncate -s $small "$T/shadow.raw"
	truncate -s $SIZE "$MNT" || fail "growing the view again (data_file_raw=$raw) failed"
	truncate -s $SIZE "$T/shadow.raw"
	same_file "$MNT" "$T/shadow.raw" "view after a shrink and a grow (data_file_raw=$raw)"
	# compaction works on the qcow2 file only; the data stays in place
	"$QCOWCTL" compact "$MNT" >"$T/compact.out" 2>&1 || fail "qcowctl compact: $(cat "$T/compact.out")"
	qumount "$MNT"

	qcheck "$img"
	qcompare "$img" "$T/shadow.raw" "after unmount (data_file_raw=$raw)"
	[ "$(qinfo_field "$img" format-specific.data.data-file-raw)" = "$( [ $raw = on ] && echo true || echo false)" ] ||
		fail "data_file_raw=$raw did not survive the mount: $(qemu-img info "$img" | grep -i data)"
	if [ $raw = on ]; then
		same_file "$data" "$T/shadow.raw" "the raw data file after unmount"
	fi
	# the qcow2 file holds metadata only: a handful of clusters
	[ "$(file_size "$img")" -le $((16 * 65536)) ] ||
		fail "the qcow2 file grew to $(file_size "$img") bytes: data went into it"

	# read-only: shared locks on both files, QEMU may read them meanwhile
	qmount "$img" "$MNT" -o ro
	same_file "$MNT" "$T/shadow.raw" "read-only view (data_file_raw=$raw)"
	out=$(qemu-io -r -f raw -c 'read 0 512' "$data" 2>&1) ||
		fail "qemu-io -r on the data file of a read-only mount was refused: $out"
	qumount "$MNT"

	# qcowctl info and check
	"$QCOWCTL" info "$img" >"$T/info.out"
	grep -qx "    data file: $data" "$T/info.out" || fail "qcowctl info: no 'data file: $data': $(cat "$T/info.out")"
	grep -qx "    data file raw: $( [ $raw = on ] && echo true || echo false)" "$T/info.out" ||
		fail "qcowctl info: wrong 'data file raw': $(cat "$T/info.out")"
	"$QCOWCTL" info --json "$img" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
want = (sys.argv[1], sys.argv[2] == "on")
got = (d.get("data-file"), d.get("data-file-raw"))
sys.exit(0 if got == want else "qcowctl info --json: data-file, data-file-raw are %r, want %r" % (got, want))' "$data" $raw ||
		fail "qcowctl info --json data file keys"
	"$QCOWCTL" check "$img" >"$T/check.out" 2>&1 || fail "qcowctl check $img: exit $?: $(cat "$T/check.out")"
	cp "$T/shadow.raw" "$T/shadow-$raw.raw"
done

# -o data_file=PATH: a moved data file, read through the override (from
# another folder, relative to where qcowfs starts)
img=$T/img-off.qcow2
mkdir -p "$T/moved"
mv "$T/data-off.raw" "$T/moved/elsewhere.raw"
before=$(sha "$img")
qmount_fails "$img" "$MNT"
grep -q "$T/data-off.raw" "$QM_ERR" || fail "missing data file: the message does not name $T/data-off.raw: $(cat "$QM_ERR")"
[ "$(sha "$img")" = "$before" ] || fail "a refused mount (missing data file) changed the image"
cd "$T/moved"
qmount "$img" "$MNT" -o data_file=elsewhere.raw
cd "$T"
same_file "$MNT" "$T/shadow-off.raw" "view with -o data_file"
"$PYTHON" "$T/mirror.py" "$MNT" "$T/shadow-off.raw" 3101 100 || fail "mirror through -o data_file failed"
qumount "$MNT"
mv "$T/moved/elsewhere.raw" "$T/data-off.raw"
qcheck "$img"
qcompare "$img" "$T/shadow-off.raw" "after the mount with -o data_file"

# refused: data_file_raw without a data file
plain=$T/plain.qcow2
mkimg "$plain" 1M
printf '\0\0\0\0\0\0\0\2' | dd of="$plain" bs=1 seek=88 conv=notrunc status=none
before=$(sha "$plain")
qmount_fails "$plain" "$MNT"
grep -q "data-file-raw requires a data file" "$QM_ERR" || fail "data_file_raw alone: message: $(cat "$QM_ERR")"
[ "$(sha "$plain")" = "$before" ] || fail "a refused mount (data_file_raw alone) changed the image"

# refused: a compressed cluster in an image with a data file (QEMU never
# writes one; the entry of guest cluster 0 gets the compressed bit)
comp=$T/comp.qcow2
mkimg "$comp" 1M "data_file=comp.raw"
qio "$comp" 'write -P 0x11 0 64k'
"$PYTHON" - "$comp" <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(72)
l1_off = struct.unpack(">Q", h[40:48])[0]
f.seek(l1_off)
l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2)
e = struct.unpack(">Q", f.read(8))[0]
f.seek(l2)
f.write(struct.pack(">Q", (e & ~(1 << 63)) | (1 << 62) | (1 << 20)))
EOF
before=$(sha "$comp")
qmount_fails "$comp" "$MNT"
grep -q "compressed cluster in an image with an external data file" "$QM_ERR" ||
	fail "compressed cluster with a data file: message: $(cat "$QM_ERR")"
[ "$(sha "$comp")" = "$before" ] || fail "a refused mount (compressed cluster) changed the image"

# refused: an image that names itself as its data file (guest writes
# would land on its tables)
self=$T/self.img
mkimg "$self" 1M "data_file=self.raw"
"$PYTHON" - "$self" <<'EOF'
import sys
f = open(sys.argv[1], "r+b")
d = f.read(4096)
i = d.find(b"DATA\0\0\0\x08self.raw")
assert i > 0, "no data file extension"
f.seek(i + 8)
f.write(b"self.img")   # the same length: the image's own name
EOF
before=$(sha "$self")
qmount_fails "$self" "$MNT"
grep -q "is the image itself" "$QM_ERR" || fail "data file = image: message: $(cat "$QM_ERR")"
[ "$(sha "$self")" = "$before" ] || fail "a refused mount (data file = image) changed the image"

# refused offline too: snapshot create (QEMU: Operation not supported)
img=$T/img-on.qcow2
before=$(sha "$img")
rc=0
"$QCOWCTL" snapshot create s1 "$img" >"$T/snap.out" 2>&1 || rc=$?
[ $rc = 1 ] || fail "offline snapshot create on a data-file image exited $rc: $(cat "$T/snap.out")"
grep -q "external data file" "$T/snap.out" || fail "offline snapshot create: message: $(cat "$T/snap.out")"
[ "$(sha "$img")" = "$before" ] || fail "a refused snapshot create changed the image"
qcheck "$img"
[ "$(qemu-img snapshot -l "$img" | wc -l)" = 0 ] || fail "a refused snapshot create left a snapshot"
log "data files: raw off and on, mirror, locks, override and refusals as QEMU"
