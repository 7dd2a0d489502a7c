#!/bin/bash
# t270-zstd: zstd-compressed images (compression_type 1, issue 8) mount,
# read byte-exact, take writes and discards, and compact.
#  1. qemu-img convert -c -o compression_type=zstd of compressible data:
#     the view reads exactly the source; qcowctl info names zstd.
#  2. Through the view: partial writes into compressed clusters (copied on
#     write from the zstd stream), whole-cluster overwrites and a discard
#     of a third of the disk, then qcowctl compact: the compressed streams
#     left are repacked into the freed space (the status counts them), the
#     file shrinks, and after the unmount qemu-img check is clean and
#     qemu-img compare reads what the view showed.
#  3. A stream QEMU cannot read back is refused the same way QEMU refuses
#     it: a corrupted frame makes the read of that cluster fail with EIO,
#     and every other cluster still reads.
# Fails before issue 8: the mount refused the image ("unsupported
# compression_type 1").
. "$(dirname "$0")/lib.sh"
need_qcowfs
need dd cmp

SRC=$T/src.raw
IMG=$T/z.qcow2
MNT=$T/view.raw

# 24 MiB of text: compresses about 4:1 into streams that mostly cross
# from one host cluster into the next
seq 1 3500000 >"$SRC"
truncate -s 24M "$SRC"
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd "$SRC" "$IMG" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img convert -c -o compression_type=zstd failed: $(tail -n 3 "$T/qemu.log")"
qemu-img info "$IMG" | grep -q 'compression type: zstd' || fail "qemu-img did not make a zstd image"

# ---- 1. reads -------------------------------------------------------------
"$QCOWCTL" info "$IMG" >"$T/info.out" 2>&1 || fail "qcowctl info failed: $(cat "$T/info.out")"
grep -qi 'zstd' "$T/info.out" || fail "qcowctl info does not name zstd: $(cat "$T/info.out")"
qmount "$IMG" "$MNT"
cmp "$MNT" "$SRC" || fail "the view of the zstd image differs from its source"

# ---- 2. writes, discards, compaction --------------------------------------
cp "$SRC" "$T/expect.raw"
# partial writes inside compressed clusters, and a whole-cluster overwrite
for off in 1000 200000 5000000 12345678; do
	dd if=/dev/urandom of="$T/piece" bs=3000 count=1 status=none
	dd if="$T/piece" of="$MNT" bs=1 seek=$off conv=notrunc status=none
	dd if="$T/piece" of="$T/expect.raw" bs=1 seek=$off conv=notrunc status=none
done
dd if=/dev/urandom of="$T/piece" bs=64k count=4 status=none
dd if="$T/piece" of="$MNT" bs=64k seek=100 conv=notrunc,fsync status=none
dd if="$T/piece" of="$T/expect.raw" bs=64k seek=100 conv=notrunc status=none
fallocate -p -o 0 -l $((8 << 20)) "$MNT" || fail "fallocate -p on the view failed"
dd if=/dev/zero of="$T/expect.raw" bs=1M count=8 conv=notrunc status=none
cmp "$MNT" "$T/expect.raw" || fail "the view differs from the expected contents after writes and a discard"
size0=$(stat -c %s "$IMG")
"$QCOWCTL" compact "$MNT" >"$T/compact.out" 2>&1 || fail "qcowctl compact failed: $(cat "$T/compact.out")"
log "compact: $(tr '\n' '|' <"$T/compact.out")"
"$QCOWCTL" status --json "$MNT" >"$T/status.json" 2>&1 || fail "qcowctl status failed"
repacked=$(sed -n 's/.*"streams-repacked": *\([0-9]*\).*/\1/p' "$T/status.json")
[ "${repacked:-0}" -gt 0 ] || fail "compaction repacked no zstd stream: $(cat "$T/status.json")"
cmp "$MNT" "$T/expect.raw" || fail "compaction changed what the view reads"
qumount "$MNT" qcowctl
size1=$(stat -c %s "$IMG")
[ "$size1" -lt "$size0" ] || fail "the zstd image did not shrink ($size0 -> $size1 bytes)"
qcheck "$IMG"
qemu-img compare -q -f raw -F qcow2 "$T/expect.raw" "$IMG" || fail "QEMU reads the compacted image differently"
log "zstd image: $size0 -> $size1 bytes, $repacked streams repacked"

# ---- 3. a corrupted frame -----------------------------------------------------
cp "$IMG" "$T/bad.qcow2"
# the first compressed descriptor of the first L2 table, from the image
# itself (a helper that reads qcow2 without qcowfs)
desc=$("$PYTHON" - "$T/bad.qcow2" <<'EOF'
import struct, sys
f = open(sys.argv[1], 'r+b')
h = f.read(112)
cb = struct.unpack('>I', h[20:24])[0]
l1_off = struct.unpack('>Q', h[40:48])[0]
f.seek(l1_off)
l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2)
x = 62 - (cb - 8)
for i in range(1 << (cb - 3)):
    e = struct.unpack('>Q', f.read(8))[0]
    if e & (1 << 62):
        off = e & ((1 << x) - 1)
        f.seek(off + 8)       # inside the frame, after its header
        f.write(b'\xff' * 16)
        print(i)
        break
EOF
) || fail "could not find a compressed cluster to corrupt"
[ -n "$desc" ] || fail "no compressed cluster in the first L2 table"
qmount "$T/bad.qcow2" "$MNT" -o ro
cs=65536
if dd if="$MNT" of=/dev/null bs=$cs skip="$desc" count=1 iflag=direct status=none 2>"$T/dd.err"; then
	fail "a corrupted zstd frame read without an error"
fi
grep -q 'Input/output error' "$T/dd.err" || fail "the corrupted frame gave another error: $(cat "$T/dd.err")"
dd if="$MNT" of=/dev/null bs=$cs skip=$((desc + 1)) count=64 iflag=direct status=none ||
	fail "the clusters after the corrupted one do not read"
qumount "$MNT"
log "ok"
