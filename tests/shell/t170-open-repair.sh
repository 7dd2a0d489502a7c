#!/bin/bash
# t170-open-repair: what a read-write open finds, refuses and repairs
# (issue 6, defects 4, 5 and 11), with qemu-img check as the oracle.
#
#  D4  a refcount-table entry pointing at a cluster that holds compressed
#      guest data (also with the dirty bit set, which makes the open repair
#      refcounts): the read-write open is refused, naming both users of the
#      cluster and the offsets, and changes nothing; a read-only open works
#      and reads every byte.
#  D5  an image as an interrupted `qemu-img snapshot -d` leaves it
#      (refcount 2, COPIED clear: qemu-img check says leaks only): after a
#      read-write open and close qemu-img check is clean.
#  D11 one refcount-table entry at the last index (64 KiB..2 MiB clusters)
#      and a 512-byte-cluster image ending in a 100 GiB hole: the read-write
#      open takes under 1 s and 64 MiB, and `qcowctl check` is as quick.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io sha256sum
OPEN_RW=${QCOW_OPEN_RW:-$top_builddir/tests/helpers/qcow_open_rw}
[ -x "$OPEN_RW" ] || fail "helper $OPEN_RW is missing (make check builds it)"

# edit.py IMAGE OP...: small metadata edits (big-endian, qcow2 spec).
cat >"$T/edit.py" <<'PY'
import struct, sys
p, op = sys.argv[1], sys.argv[2]
f = open(p, "r+b")
def rd(off, fmt):
    f.seek(off); return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
def wr(off, fmt, v):
    f.seek(off); f.write(struct.pack(fmt, v))
cb = rd(20, ">I"); cs = 1 << cb
l1, rt, rtc = rd(40, ">Q"), rd(48, ">Q"), rd(56, ">I")
order = rd(96, ">I")
if op == "compressed-host":          # host cluster of the first compressed entry
    l2 = rd(l1, ">Q") & 0x00FFFFFFFFFFFE00
    for j in range(cs // 8):
        e = rd(l2 + 8 * j, ">Q")
        if e & (1 << 62):
            x = 62 - (cb - 8)
            print((e & ((1 << x) - 1)) & ~(cs - 1)); break
elif op == "data-host":               # host cluster of guest cluster 0
    l2 = rd(l1, ">Q") & 0x00FFFFFFFFFFFE00
    print(rd(l2, ">Q") & 0x00FFFFFFFFFFFE00)
elif op == "reftable-set":           # reftable-set INDEX VALUE
    wr(rt + 8 * int(sys.argv[3]), ">Q", int(sys.argv[4]))
elif op == "dirty":
    wr(72, ">Q", rd(72, ">Q") | 1)
elif op == "drop-snapshots":         # what an interrupted snapshot -d leaves
    wr(60, ">I", 0); wr(64, ">Q", 0)
elif op == "last-index-block":       # append a zero cluster, make it the block at the last reftable index
    f.seek(0, 2); end = (f.tell() + cs - 1) & ~(cs - 1)
    f.truncate(end + cs)
    wr(rt + rtc * cs - 8, ">Q", end)
    # its own refcount (in block 0: the file is small) is 1
    rb0 = rd(rt, ">Q"); c = end >> cb; bits = 1 << order
    assert bits == 16 and c < cs * 8 // bits
    wr(rb0 + 2 * c, ">H", 1)
PY
edit() { $PYTHON "$T/edit.py" "$@"; }

# qcheck_exit IMAGE: qemu-img check's exit status.
qcheck_exit() { local rc=0; qemu-img check "$1" >>"$T/qemu.log" 2>&1 || rc=$?; echo $rc; }

# ---- D4: refcount block over compressed data ----------------------------
qemu-img create -q -f raw "$T/src.raw" 4M
qemu-io -f raw -c 'write -P 0x61 0 1M' -c 'write -P 0x62 2M 512k' "$T/src.raw" >/dev/null
qemu-img convert -c -f raw -O qcow2 "$T/src.raw" "$T/comp.qcow2"
host=$(edit "$T/comp.qcow2" compressed-host)
[ -n "$host" ] || fail "setup: no compressed cluster found"
for variant in plain dirty; do
	img=$T/d4-$variant.qcow2
	cp "$T/comp.qcow2" "$img"
	edit "$img" reftable-set 1 "$host"   # a second refcount block, over the data
	[ $variant = dirty ] && edit "$img" dirty
	[ "$(qcheck_exit "$img")" = 2 ] || fail "setup ($variant): qemu-img check should call it corrupt"
	sum=$(sha "$img")
	rc=0
	"$OPEN_RW" "$img" >/dev/null 2>"$T/d4.err" || rc=$?
	[ $rc = 2 ] || fail "D4 ($variant): read-write open of a refcount block over compressed data was not refused (exit $rc)"
	grep -q "refcount block" "$T/d4.err" && grep -q "compressed cluster" "$T/d4.err" &&
		grep -q "$(printf '0x%x' "$host")" "$T/d4.err" ||
		fail "D4 ($variant): the refusal does not name both users and the offset: $(cat "$T/d4.err")"
	[ "$(sha "$img")" = "$sum" ] || fail "D4 ($variant): the refused open changed the image"
	"$OPEN_RW" --ro "$img" >/dev/null 2>"$T/d4ro.err" || fail "D4 ($variant): read-only open refused: $(cat "$T/d4ro.err")"
	qemu-img compare -q -f qcow2 -F raw "$img" "$T/src.raw" || fail "D4 ($variant): data changed"
	log "D4 $variant: refused read-write: $(head -c 200 "$T/d4.err")"
done

# the same over normal data and over data shared with a snapshot
mkimg "$T/plain.qcow2" 64M
qio "$T/plain.qcow2" 'write -P 0x71 0 256k'
cp "$T/plain.qcow2" "$T/snap.qcow2"
qemu-img snapshot -c s1 "$T/snap.qcow2"
for base in plain snap; do
	img=$T/d4-$base-data.qcow2
	cp "$T/$base.qcow2" "$img"
	host=$(edit "$img" data-host)
	edit "$img" reftable-set 1 "$host"
	[ "$(qcheck_exit "$img")" = 2 ] || fail "setup ($base data): qemu-img check should call it corrupt"
	sum=$(sha "$img")
	rc=0
	"$OPEN_RW" "$img" >/dev/null 2>"$T/d4.err" || rc=$?
	[ $rc = 2 ] || fail "D4 ($base data): read-write open of a refcount block over data was not refused (exit $rc)"
	grep -q "refcount block" "$T/d4.err" && grep -q "data cluster" "$T/d4.err" &&
		grep -q "$(printf '0x%x' "$host")" "$T/d4.err" ||
		fail "D4 ($base data): the refusal does not name both users and the offset: $(cat "$T/d4.err")"
	[ "$(sha "$img")" = "$sum" ] || fail "D4 ($base data): the refused open changed the image"
	"$OPEN_RW" --ro "$img" >/dev/null 2>"$T/d4ro.err" || fail "D4 ($base data): read-only open refused: $(cat "$T/d4ro.err")"
	log "D4 $base data: refused read-write: $(head -c 200 "$T/d4.err")"
done

# ---- D5: interrupted snapshot deletion ------------------------------------
img=$T/d5.qcow2
mkimg "$img" 64M
qio "$img" 'write -P 0x11 0 1M' 'write -P 0x12 32M 128k'
qemu-img snapshot -c s1 "$img"
edit "$img" drop-snapshots
rc=$(qcheck_exit "$img")
[ "$rc" = 3 ] || fail "setup: the image should have leaks only (qemu-img check exit $rc)"
raw_of "$img" "$T/d5.raw"
"$OPEN_RW" "$img" >/dev/null 2>"$T/d5.err" || fail "D5: read-write open failed: $(cat "$T/d5.err")"
out=$(qemu-img check "$img" 2>&1) || fail "D5: after a read-write open and close, qemu-img check is not clean: $(head -n 5 <<<"$out")"
qcompare "$img" "$T/d5.raw" "D5 image after the repair"
log "D5: leaks-only image repaired clean (COPIED set)"

# ---- D11: cost bounded by the file ----------------------------------------
check_fast() {   # check_fast IMAGE WHAT: open rw < 1 s and 64 MiB, qcowctl check < 1 s
	local img=$1 what=$2 out ms kb t0 t1 rc=0
	t0=$(date +%s%N)
	timeout 60 "$QCOWCTL" check "$img" >"$T/d11-check.out" 2>&1 || rc=$?
	t1=$(date +%s%N)
	[ $rc = 0 ] || fail "D11 $what: qcowctl check exit $rc: $(head -n 5 "$T/d11-check.out")"
	[ $(((t1 - t0) / 1000000)) -lt 1000 ] || fail "D11 $what: qcowctl check took $(((t1 - t0) / 1000000)) ms"
	out=$(timeout 120 "$OPEN_RW" "$img" 2>"$T/d11.err") || fail "D11 $what: read-write open failed or took over 120 s: $(cat "$T/d11.err")"
	read -r ms kb <<<"$out"
	log "D11 $what: open ${ms} ms, peak RSS ${kb} KiB, qcowctl check $(((t1 - t0) / 1000000)) ms"
	awk -v ms="$ms" 'BEGIN { exit !(ms < 1000) }' || fail "D11 $what: open took $ms ms (limit 1000)"
	[ "$kb" -lt 65536 ] || fail "D11 $what: open used $kb KiB (limit 65536)"
	[ "$(qcheck_exit "$img")" = 0 ] || fail "D11 $what: qemu-img check not clean after the open"
}
for cs in 64k 256k 2M; do
	img=$T/d11-$cs.qcow2
	mkimg "$img" 64M cluster_size=$cs
	qio "$img" 'write -P 0x21 0 512k'
	edit "$img" last-index-block
	[ "$(qcheck_exit "$img")" = 0 ] || fail "setup: image with a block at the last index should check clean ($cs)"
	check_fast "$img" "refcount block at the last index, $cs clusters"
done
img=$T/d11-hole.qcow2
mkimg "$img" 8G cluster_size=512
qio "$img" 'write -P 0x31 0 128k' 'write -P 0x32 5G 64k'
truncate -s +100G "$img"
raw_size=$(file_size "$img")
check_fast "$img" "512-byte clusters, file ending in a 100 GiB hole"
[ "$(file_size "$img")" -lt $((raw_size - (100 << 30) + (1 << 20))) ] || fail "D11: the free tail was not cut ($(file_size "$img") bytes)"
qio "$img" 'read -P 0x31 0 128k' 'read -P 0x32 5G 64k'
log "ok"
