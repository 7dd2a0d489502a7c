#!/bin/bash
# t275-backing: images on backing chains, with QEMU as the oracle.
#
#  1. Depth 1: a qcow2 base in another folder, named relatively; the top is
#     longer than the base (reads past the base's end are zeros).  Depth 3:
#     a raw base, a version 2 qcow2 image over it, a version 3 image whose
#     backing format is probed (no format extension), and the top.  Each
#     level is written by qemu-io.  For each chain: the view reads exactly
#     what `qemu-img convert -O raw` reads from the top; random writes,
#     discards and zero writes through the view are mirrored into a shadow
#     (a discard over backing data must read zeros afterwards); after the
#     unmount qemu-img check is clean, qemu-img compare finds the shadow,
#     and every backing file is byte-identical to before.
#  2. A version 2 top (no zero flag): discards read zeros all the same.
#  3. SEEK_DATA/SEEK_HOLE answer for the whole chain.
#  4. Locks: while a top is mounted read-write, QEMU can read its base and
#     another overlay on the same base mounts too; nobody can write the base.
#  5. Compaction works on the top with the chain in place: space written and
#     discarded in the top goes back; the base is untouched.
#  6. Growing the view over a longer base shows zeros in the new part.
#  7. -o backing=PATH replaces a missing backing file; without it the mount
#     fails naming the path; a loop and a chain deeper than 64 are refused
#     with the chain printed; a vmdk backing file is refused by name.  Each
#     refusal leaves the image bytes unchanged.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need cmp sha256sum

MB=$((1 << 20))
mkdir -p "$T/base" "$T/top"

# run_chain TOP VIEW SEED WHAT BACKING...: the read, mirror and check cycle
# of part 1 on a top image whose chain is BACKING...
run_chain() {
	local top=$1 view=$2 seed=$3 what=$4 b
	shift 4
	declare -A before=()
	for b; do before[$b]=$(sha "$b"); done
	raw_of "$top" "$T/expect.raw"
	touch "$view"
	qmount "$top" "$view"
	same_file "$view" "$T/expect.raw" "$what: view after mount"
	cp "$T/expect.raw" "$T/shadow.raw"
	$PYTHON "$TESTDIR/shadow_ops.py" "$view" "$T/shadow.raw" "$seed" 300 --gran 65536 ||
		fail "$what: the view differs from the shadow (seed $seed)"
	same_file "$view" "$T/shadow.raw" "$what: view after the random operations"
	qumount "$view"
	qcheck "$top"
	qcompare "$top" "$T/shadow.raw" "$what"
	for b; do
		[ "$(sha "$b")" = "${before[$b]}" ] || fail "$what: backing file $b changed"
	done
	log "$what: view = qemu-img convert, 300 random operations mirrored, check clean, backing files unchanged"
}

# ---- 1. depth 1, relative name in another folder ---------------------------
mkimg "$T/base/b1.qcow2" 64M
qio "$T/base/b1.qcow2" "write -P 0xaa 0 8M" "write -P 0xbb 20M 3M" "write -P 0xcc 63M 1M"
(cd "$T/top" && qemu-img create -q -f qcow2 -b ../base/b1.qcow2 -F qcow2 t1.qcow2 96M) ||
	fail "qemu-img create t1"
qio "$T/top/t1.qcow2" "write -P 0x11 4M 64k" "write -P 0x12 1000k 3k" "write -P 0x13 70M 1M" "write -z 21M 64k"
run_chain "$T/top/t1.qcow2" "$T/v1" 11 "depth 1" "$T/base/b1.qcow2"

# ---- 1. depth 3: raw <- v2 qcow2 <- v3 qcow2 (format probed) <- top ------
qemu-img create -q -f raw "$T/base/r0.raw" 48M || fail "create r0"
qemu-io -f raw -c "write -P 0x21 0 4M" -c "write -P 0x22 30M 2M" "$T/base/r0.raw" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-io r0"
(cd "$T/base" && qemu-img create -q -f qcow2 -o compat=0.10 -b r0.raw -F raw m1.qcow2 48M) || fail "create m1"
qio "$T/base/m1.qcow2" "write -P 0x31 2M 3M" "write -P 0x32 40M 512k"
(cd "$T/base" && qemu-img create -q -f qcow2 -b m1.qcow2 -F qcow2 m2.qcow2 56M) || fail "create m2"
qio "$T/base/m2.qcow2" "write -P 0x41 3M 1M" "write -P 0x42 50M 64k"
# hide m2's backing format extension: the format of m1 is then probed
$PYTHON - "$T/base/m2.qcow2" <<'EOF' || fail "patching m2's backing format extension"
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(4096)
pos = struct.unpack(">I", h[100:104])[0]
while pos + 8 <= len(h):
    t, ln = struct.unpack(">II", h[pos:pos + 8])
    if t == 0:
        sys.exit("no backing format extension")
    if t == 0xE2792ACA:
        f.seek(pos)
        f.write(struct.pack(">I", 0x7e7e7e7e))   # an unknown extension: ignored
        break
    pos += 8 + (ln + 7) // 8 * 8
EOF
qemu-img info "$T/base/m2.qcow2" | grep -q "backing file format" && fail "m2 still records a backing format"
(cd "$T/top" && qemu-img create -q -f qcow2 -b ../base/m2.qcow2 -F qcow2 t3.qcow2 64M) || fail "create t3"
qio "$T/top/t3.qcow2" "write -P 0x51 2560k 1M" "write -P 0x52 60M 2M" "write -z 30M 1M"
run_chain "$T/top/t3.qcow2" "$T/v3" 33 "depth 3" "$T/base/m2.qcow2" "$T/base/m1.qcow2" "$T/base/r0.raw"

# ---- 2. a version 2 top: no zero flag -------------------------------------
(cd "$T/top" && qemu-img create -q -f qcow2 -o compat=0.10 -b ../base/b1.qcow2 -F qcow2 t2.qcow2 64M) ||
	fail "create t2"
qio "$T/top/t2.qcow2" "write -P 0x61 6M 2M"
run_chain "$T/top/t2.qcow2" "$T/v2" 22 "version 2 top" "$T/base/b1.qcow2"

# ---- 3. SEEK_DATA / SEEK_HOLE over the chain -------------------------------
(cd "$T/top" && qemu-img create -q -f qcow2 -b ../base/b1.qcow2 -F qcow2 ts.qcow2 96M) || fail "create ts"
qio "$T/top/ts.qcow2" "write -P 0x71 40M 1M"
touch "$T/vs"
qmount "$T/top/ts.qcow2" "$T/vs"
$PYTHON - "$T/vs" <<'EOF' || fail "SEEK_DATA/SEEK_HOLE over the chain"
import os, sys
MB = 1 << 20
fd = os.open(sys.argv[1], os.O_RDONLY)
def seek(off, how):
    try:
        return os.lseek(fd, off, how)
    except OSError as e:
        return -e.errno
want = [
    (0, os.SEEK_DATA, 0, "base data at 0"),
    (0, os.SEEK_HOLE, 8 * MB, "base data ends at 8M"),
    (9 * MB, os.SEEK_DATA, 20 * MB, "next base data at 20M"),
    (23 * MB, os.SEEK_DATA, 40 * MB, "top data at 40M"),
    (41 * MB, os.SEEK_DATA, 63 * MB, "base data at 63M"),
    (63 * MB, os.SEEK_HOLE, 64 * MB, "past the base's end is a hole"),
    (64 * MB, os.SEEK_DATA, -6, "nothing after 64M (ENXIO)"),
]
bad = [f"{w}: lseek({o}) = {seek(o, h)}, expected {e}" for o, h, e, w in want if seek(o, h) != e]
if bad:
    sys.exit("\n".join(bad))
EOF
log "SEEK_DATA/SEEK_HOLE see the base's data and the top's"

# ---- 4. locks: the base is shared for reading, never written ---------------
qemu-img info "$T/base/b1.qcow2" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img info of the base failed while an overlay is mounted"
if qemu-io -f qcow2 -c "write 0 512" "$T/base/b1.qcow2" >>"$T/qemu.log" 2>&1; then
	fail "qemu-io wrote the base while an overlay on it is mounted"
fi
raw_of "$T/top/t1.qcow2" "$T/t1.raw"
touch "$T/v1b"
qmount "$T/top/t1.qcow2" "$T/v1b"
same_file "$T/v1b" "$T/t1.raw" "a second overlay on the same base, mounted at the same time"
qumount "$T/v1b"
qumount "$T/vs"
log "locks: QEMU reads the base, a second overlay mounts, nobody writes the base"

# ---- 5. compaction on the top, chain in place -------------------------------
(cd "$T/top" && qemu-img create -q -f qcow2 -b ../base/b1.qcow2 -F qcow2 tc.qcow2 64M) || fail "create tc"
b1sum=$(sha "$T/base/b1.qcow2")
touch "$T/vc"
qmount "$T/top/tc.qcow2" "$T/vc" -o compact_threshold=1M,compact_quiet_ms=100
dd if=/dev/urandom of="$T/vc" bs=1M count=24 seek=8 conv=notrunc,fsync status=none
dd if=/dev/urandom of="$T/vc" bs=1M count=2 seek=60 conv=notrunc,fsync status=none
grown=$(file_size "$T/top/tc.qcow2")
$PYTHON - "$T/vc" <<'EOF' || fail "discard in tc"
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
fd = os.open(sys.argv[1], os.O_RDWR)
if libc.fallocate(fd, 3, 8 << 20, 24 << 20):
    sys.exit("punch: errno %d" % ctypes.get_errno())
os.fsync(fd)
EOF
"$QCOWCTL" compact "$T/vc" >>"$T/qcowfs.log" 2>&1 || fail "qcowctl compact of tc failed"
shrunk=$(file_size "$T/top/tc.qcow2")
[ "$shrunk" -lt $((grown - 16 * MB)) ] || fail "compaction of tc: file $grown -> $shrunk bytes"
$PYTHON - "$T/vc" <<'EOF' || fail "discarded range over the base does not read zeros"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
if os.pread(fd, 24 << 20, 8 << 20).count(0) != 24 << 20:
    sys.exit("8M..32M is not all zeros after the discard")
EOF
qumount "$T/vc"
qcheck "$T/top/tc.qcow2"
[ "$(sha "$T/base/b1.qcow2")" = "$b1sum" ] || fail "compaction changed the base"
log "compaction over a chain: $grown -> $shrunk bytes, discarded range reads zeros, base unchanged"

# ---- 6. growing over a longer base shows zeros ------------------------------
(cd "$T/top" && qemu-img create -q -f qcow2 -b ../base/b1.qcow2 -F qcow2 tg.qcow2 16M) || fail "create tg"
touch "$T/vg"
qmount "$T/top/tg.qcow2" "$T/vg"
truncate -s 64M "$T/vg" || fail "truncate -s 64M of the view"
$PYTHON - "$T/vg" <<'EOF' || fail "grown part"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
new = os.pread(fd, 48 << 20, 16 << 20)
if new.count(0) != len(new):
    sys.exit("the grown part 16M..64M shows %d non-zero bytes (base data)" % (len(new) - new.count(0)))
if os.pread(fd, 4096, 0) != b"\xaa" * 4096:
    sys.exit("the old part lost the base's data")
EOF
qumount "$T/vg"
qcheck "$T/top/tg.qcow2"
raw_of "$T/top/tg.qcow2" "$T/tg.raw"
cmp -s <(dd if="$T/tg.raw" bs=1M skip=16 status=none) <(head -c $((48 * MB)) /dev/zero) ||
	fail "after growing, QEMU sees base data in the new part"
log "growing over a longer base: the new part reads zeros (view and QEMU)"

# ---- 7. backing=PATH, missing files, loops, depth, formats -----------------
refused() {   # refused IMAGE WORD WHAT [ARGS...]: the mount fails naming WORD, image unchanged
	local img=$1 word=$2 what=$3 sum
	shift 3
	sum=$(sha "$img")
	touch "$T/vr"
	qmount_fails "$img" "$T/vr" "$@"
	grep -q -- "$word" "$QM_ERR" || fail "$what: message lacks '$word': $(cat "$QM_ERR")"
	[ "$(sha "$img")" = "$sum" ] || fail "$what: the image changed"
	log "$what refused: $(head -n 1 "$QM_ERR")"
}
(cd "$T/top" && qemu-img create -q -f qcow2 -b ../base/b1.qcow2 -F qcow2 tm.qcow2 64M) || fail "create tm"
qio "$T/top/tm.qcow2" "write -P 0x81 1M 64k"
raw_of "$T/top/tm.qcow2" "$T/tm.raw"
qemu-img rebase -u -b gone.qcow2 -F qcow2 "$T/top/tm.qcow2" || fail "rebase tm onto a missing file"
refused "$T/top/tm.qcow2" "gone.qcow2" "a missing backing file"
touch "$T/vm"
qmount "$T/top/tm.qcow2" "$T/vm" -o "backing=$T/base/b1.qcow2"
same_file "$T/vm" "$T/tm.raw" "-o backing=PATH"
qumount "$T/vm"
qemu-img info "$T/top/tm.qcow2" | grep -q "backing file: gone.qcow2" ||
	fail "-o backing changed the name the image records"
log "-o backing=PATH: the view shows PATH's data, the image keeps its name"

qemu-img create -q -f qcow2 -u -b lb.qcow2 -F qcow2 "$T/top/la.qcow2" 1M || fail "create la"
qemu-img create -q -f qcow2 -u -b la.qcow2 -F qcow2 "$T/top/lb.qcow2" 1M || fail "create lb"
refused "$T/top/la.qcow2" "loops" "a loop (la -> lb -> la)"
grep -q "la.qcow2 -> .*lb.qcow2 -> .*la.qcow2" "$QM_ERR" || fail "the loop message does not print the chain: $(cat "$QM_ERR")"

qemu-img create -q -f raw "$T/base/d0.raw" 1M || fail "create d0"
prev=../base/d0.raw fmt=raw
for i in $(seq 1 65); do
	(cd "$T/top" && qemu-img create -q -f qcow2 -u -b "$prev" -F $fmt "d$i.qcow2" 1M) || fail "create d$i"
	prev=d$i.qcow2 fmt=qcow2
done
refused "$T/top/d65.qcow2" "deeper than 64" "a chain of 65 images below the top"
touch "$T/vd"
qmount "$T/top/d64.qcow2" "$T/vd" -o ro
qumount "$T/vd"
log "a chain of 64 images below the top mounts"

qemu-img create -q -f vmdk "$T/base/v.vmdk" 1M || fail "create vmdk"
qemu-img create -q -f qcow2 -u -b ../base/v.vmdk -F vmdk "$T/top/tv.qcow2" 1M || fail "create tv"
refused "$T/top/tv.qcow2" "vmdk" "a vmdk backing file"
qemu-img create -q -f qcow2 -u -b nbd://localhost/x -F raw "$T/top/tn.qcow2" 1M || fail "create tn"
refused "$T/top/tn.qcow2" "not a local file" "an NBD backing file"
