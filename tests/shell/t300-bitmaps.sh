#!/bin/bash
# t300-bitmaps: persistent dirty bitmaps (issue 8), QEMU as the oracle.
# An image with two enabled bitmaps of different granularities (4 KiB and
# 1 MiB, both with bits QEMU set) and one disabled bitmap with bits:
#  - a read-write mount marks the enabled ones in use (qemu-img info -U),
#    not the disabled one;
#  - writes (aligned and not), a punched hole and a zeroed range through
#    the view; after the unmount qemu-img info lists the three bitmaps,
#    none in use, qemu-img check is clean, and QEMU's own view of each
#    bitmap (qemu-nbd's qemu:dirty-bitmap meta context, read with qemu-img
#    map) has exactly the granules QEMU set before plus those of the
#    ranges written (also after qemu-img convert --bitmaps); the disabled
#    bitmap reads as before;
#  - qcowctl compact on a mount whose bitmap structures sit above freed
#    space moves them down (the highest bitmap cluster drops while still
#    mounted), and QEMU reads the same bitmaps afterwards;
#  - kill -9 of the daemon leaves the enabled bitmaps in use and the image
#    otherwise clean, and a later mount leaves in-use bitmaps alone;
#  - a view with a disabled bitmap cannot grow; one with only enabled
#    bitmaps grows, and QEMU reads the bitmap at the new size with the
#    granules written in the new part;
#  - -o ro changes no byte of the image;
#  - hostile bitmap directories (mkbad.py: extra data, a wrong count, a
#    granularity below 512) are refused rw and ro with a message naming
#    the bitmap and an offset, the image unchanged, and qcowctl check
#    cannot check them, as qemu-img check cannot.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need qemu-nbd fallocate dd

IMG=$T/bm.qcow2
MNT=$T/view.raw
SOCK=$T/nbd.sock
G4K=4096
G1M=1048576

# dirty_granules IMAGE BITMAP GRAN: the dirty granule indices QEMU sees,
# one per line.  qemu-nbd exports the bitmap as a meta context; qemu-img
# map through x-dirty-bitmap shows dirty extents as "data": false.
dirty_granules() {
	local img=$1 name=$2 g=$3 pid out
	rm -f "$SOCK"
	qemu-nbd -r -t -k "$SOCK" -f qcow2 -B "$name" "$img" 2>>"$T/qemu.log" &
	pid=$!
	wait_until 10 test -S "$SOCK" || fail "qemu-nbd did not export $img with bitmap $name"
	out=$(qemu-img map --output=json --image-opts \
		"driver=nbd,server.type=unix,server.path=$SOCK,x-dirty-bitmap=qemu:dirty-bitmap:$name" 2>&1) ||
		{
			kill "$pid" 2>/dev/null
			fail "qemu-img map of bitmap $name failed: $out"
		}
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	$PYTHON -c '
import json, sys
g = int(sys.argv[1])
for e in json.loads(sys.stdin.read()):
    if not e["data"]:
        for k in range(e["start"] // g, (e["start"] + e["length"] + g - 1) // g):
            print(k)' "$g" <<<"$out"
}

# expect_granules GRAN OFF:LEN...: the granules the ranges touch.
expect_granules() {
	local g=$1
	shift
	$PYTHON -c '
import sys
g = int(sys.argv[1]); s = set()
for r in sys.argv[2:]:
    off, ln = map(int, r.split(":"))
    s.update(range(off // g, (off + ln - 1) // g + 1))
for k in sorted(s):
    print(k)' "$g" "$@"
}

# bitmap_flags IMAGE: "name:flag,flag name:..." from qemu-img info -U.
bitmap_flags() {
	qemu-img info -U --output=json "$1" | $PYTHON -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
print(" ".join("%s:%s:%d" % (b["name"], ",".join(b["flags"]), b["granularity"]) for b in d.get("bitmaps", [])))'
}

# bitmap_top IMAGE: the highest cluster offset any bitmap structure
# (directory, table, data) uses, read from the file.
bitmap_top() {
	$PYTHON - "$1" <<'EOF'
import struct, sys
f = open(sys.argv[1], "rb")
h = f.read(4096)
cb = struct.unpack(">I", h[20:24])[0]; cs = 1 << cb
hl = struct.unpack(">I", h[100:104])[0]
pos, top = hl, 0
while pos + 8 <= len(h):
    t, ln = struct.unpack(">II", h[pos:pos + 8])
    if t == 0:
        break
    if t == 0x23852875:
        nb, _, dsz, doff = struct.unpack(">IIQQ", h[pos + 8:pos + 32])
        top = max(top, doff + dsz - 1)
        f.seek(doff); d = f.read(dsz); p = 0
        for i in range(nb):
            toff, tsz, fl, ty, gb, nl, ex = struct.unpack(">QIIBBHI", d[p:p + 24])
            top = max(top, toff + tsz * 8 - 1)
            f.seek(toff); tb = f.read(tsz * 8)
            for k in range(tsz):
                e = struct.unpack(">Q", tb[k * 8:k * 8 + 8])[0] & 0x00fffffffffffe00
                if e:
                    top = max(top, e)
            p += (24 + ex + nl + 7) & ~7
    pos += 8 + ((ln + 7) & ~7)
print(top // cs * cs)
EOF
}

same_lines() {
	local what=$1 a=$2 b=$3
	diff <(echo "$a") <(echo "$b") >"$T/diff.out" ||
		fail "$what: QEMU's dirty granules differ from the expected ones: $(head -n 20 "$T/diff.out")"
}

# ---- the image -------------------------------------------------------------
mkimg "$IMG" 64M
qio "$IMG" "write -P 0x11 0 8M" "write -P 0x22 56M 4M"
qemu-img bitmap --add "$IMG" dis >>"$T/qemu.log" 2>&1 || fail "qemu-img bitmap --add dis failed"
qio "$IMG" "write -P 0x33 2M 100k"
qemu-img bitmap --disable "$IMG" dis >>"$T/qemu.log" 2>&1 || fail "qemu-img bitmap --disable failed"
qemu-img bitmap --add -g $G4K "$IMG" fine >>"$T/qemu.log" 2>&1 || fail "qemu-img bitmap --add fine failed"
qemu-img bitmap --add -g $G1M "$IMG" coarse >>"$T/qemu.log" 2>&1 || fail "qemu-img bitmap --add coarse failed"
# bits QEMU sets while the bitmaps are enabled: they must survive qcowfs
qio "$IMG" "write -P 0x44 $((48 << 20)) 65536"
PRE="$((48 << 20)):65536"
dis_before=$(dirty_granules "$IMG" dis $G4K)
[ -n "$dis_before" ] || fail "the disabled bitmap has no bits to keep"
[ "$(bitmap_flags "$IMG")" = "dis::65536 fine:auto:4096 coarse:auto:1048576" ] ||
	fail "unexpected bitmaps from QEMU: $(bitmap_flags "$IMG")"

# qcowctl check and info see them as QEMU does
"$QCOWCTL" check "$IMG" >"$T/check.out" 2>&1 || fail "qcowctl check of the bitmap image: $(cat "$T/check.out")"
"$QCOWCTL" info --json "$IMG" >"$T/info.json" || fail "qcowctl info --json failed"
got=$($PYTHON -c '
import json, sys
d = json.load(open(sys.argv[1]))["format-specific"]["data"]
print(" ".join("%s:%s:%d" % (b["name"], ",".join(b["flags"]), b["granularity"]) for b in d["bitmaps"]))' "$T/info.json")
[ "$got" = "$(bitmap_flags "$IMG")" ] || fail "qcowctl info --json lists $got, qemu-img info $(bitmap_flags "$IMG")"
"$QCOWCTL" info "$IMG" | grep -q "name: coarse" || fail "qcowctl info does not list bitmap coarse"

# ---- hostile bitmap directories: refused as QEMU refuses them ---------------
for kind in bitmap-extra-data bitmap-count bitmap-granularity; do
	bad=$T/bad-$kind.qcow2
	cp "$IMG" "$bad"
	$PYTHON "$MKBAD" "$kind" "$bad" || fail "mkbad.py $kind failed"
	sum=$(sha "$bad")
	rc=0
	qemu-img check "$bad" >>"$T/qemu.log" 2>&1 || rc=$?
	[ $rc = 1 ] || fail "$kind: qemu-img check should not be able to open it (exit $rc)"
	rc=0
	"$QCOWCTL" check "$bad" >"$T/check.out" 2>&1 || rc=$?
	[ $rc = 1 ] || fail "$kind: qcowctl check exit $rc, qemu-img check 1: $(cat "$T/check.out")"
	for mode in rw ro; do
		if [ $mode = ro ]; then
			qmount_fails "$bad" "$T/bad.raw" -o ro
		else
			qmount_fails "$bad" "$T/bad.raw"
		fi
		grep -qi 'bitmap' "$QM_ERR" || fail "$kind ($mode): the refusal does not name the bitmap: $(cat "$QM_ERR")"
		grep -qE '0x[0-9a-f]+|offset [0-9]+' "$QM_ERR" || fail "$kind ($mode): the refusal names no offset: $(cat "$QM_ERR")"
		[ "$(sha "$bad")" = "$sum" ] || fail "$kind ($mode): qcowfs changed the refused image"
	done
	log "refused $kind: $(head -n 1 "$QM_ERR")"
done

# ---- -o ro changes nothing -------------------------------------------------
before=$(sha "$IMG")
qmount "$IMG" "$MNT" -o ro
dd if="$MNT" of=/dev/null bs=1M status=none
[ "$(bitmap_flags "$IMG")" = "dis::65536 fine:auto:4096 coarse:auto:1048576" ] ||
	fail "a read-only mount changed the bitmaps: $(bitmap_flags "$IMG")"
qumount "$MNT"
[ "$(sha "$IMG")" = "$before" ] || fail "a read-only mount changed the image bytes"

# ---- writes through a read-write mount -------------------------------------
qmount "$IMG" "$MNT"
[ "$(bitmap_flags "$IMG")" = "dis::65536 fine:in-use,auto:4096 coarse:in-use,auto:1048576" ] ||
	fail "while mounted read-write the enabled bitmaps should be in use: $(bitmap_flags "$IMG")"
RANGES=()
w() {   # w OFF LEN: random data through the view
	head -c "$2" /dev/urandom | dd of="$MNT" bs=64k seek="$1" oflag=seek_bytes conv=notrunc status=none
	RANGES+=("$1:$2")
}
w $((1 << 20)) 4096                       # one fine granule, aligned
w $((5 << 20 | 512)) 3000                 # unaligned, inside a granule
w $((12 << 20 | 4000)) 200000             # crosses granules and clusters
w $(((33 << 20) - 4096)) 8192             # crosses a 1 MiB boundary
w $(((64 << 20) - 512)) 512               # the last sector
fallocate --punch-hole -o $((20 << 20)) -l $((3 << 20)) "$MNT"
RANGES+=("$((20 << 20)):$((3 << 20))")
fallocate --zero-range -o $((40 << 20 | 100)) -l 5000 "$MNT"
RANGES+=("$((40 << 20 | 100)):5000")
sync "$MNT"
cp --sparse=always "$MNT" "$T/shadow.raw"
qumount "$MNT"

[ "$(bitmap_flags "$IMG")" = "dis::65536 fine:auto:4096 coarse:auto:1048576" ] ||
	fail "after the unmount no bitmap may be in use: $(bitmap_flags "$IMG")"
qcheck "$IMG"
qcompare "$IMG" "$T/shadow.raw" "after the writes"
same_lines "bitmap fine" "$(dirty_granules "$IMG" fine $G4K)" "$(expect_granules $G4K "$PRE" "${RANGES[@]}")"
same_lines "bitmap coarse" "$(dirty_granules "$IMG" coarse $G1M)" "$(expect_granules $G1M "$PRE" "${RANGES[@]}")"
same_lines "disabled bitmap dis" "$(dirty_granules "$IMG" dis $G4K)" "$dis_before"
# qemu-img convert --bitmaps copies them (it refuses bitmaps in use)
qemu-img convert -f qcow2 -O qcow2 --bitmaps "$IMG" "$T/conv.qcow2" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img convert --bitmaps failed: $(tail -n 3 "$T/qemu.log")"
same_lines "bitmap fine, converted" "$(dirty_granules "$T/conv.qcow2" fine $G4K)" "$(expect_granules $G4K "$PRE" "${RANGES[@]}")"
rm -f "$T/conv.qcow2"
log "QEMU sees exactly the granules written through the view"

# ---- compaction moves bitmap clusters --------------------------------------
# fill, unmount (the store puts the bitmaps above the data), then free
# the data below them and compact while mounted
qmount "$IMG" "$MNT"
head -c $((16 << 20)) /dev/urandom | dd of="$MNT" bs=1M seek=24 conv=notrunc,fsync status=none
RANGES+=("$((24 << 20)):$((16 << 20))")
qumount "$MNT"
qcheck "$IMG"
qmount "$IMG" "$MNT"
fallocate --punch-hole -o 0 -l $((40 << 20)) "$MNT"
RANGES+=("0:$((40 << 20))")
sync "$MNT"
top_before=$(bitmap_top "$IMG")
"$QCOWCTL" compact "$MNT" >>"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(tail -n 5 "$T/compact.log")"
top_after=$(bitmap_top "$IMG")
[ "$top_after" -lt "$top_before" ] ||
	fail "compaction did not move the bitmap structures down (highest at $top_before, then $top_after)"
log "compaction moved the highest bitmap cluster from $top_before to $top_after"
cp --sparse=always "$MNT" "$T/shadow.raw"
qumount "$MNT"
qcheck "$IMG"
qcompare "$IMG" "$T/shadow.raw" "after the compaction"
same_lines "bitmap fine after compaction" "$(dirty_granules "$IMG" fine $G4K)" "$(expect_granules $G4K "$PRE" "${RANGES[@]}")"
same_lines "bitmap coarse after compaction" "$(dirty_granules "$IMG" coarse $G1M)" "$(expect_granules $G1M "$PRE" "${RANGES[@]}")"
same_lines "disabled bitmap dis after compaction" "$(dirty_granules "$IMG" dis $G4K)" "$dis_before"

# ---- resizing: enabled bitmaps follow, a disabled one refuses ---------------
qmount "$IMG" "$MNT"
if truncate -s 128M "$MNT" 2>"$T/truncate.err"; then
	fail "the view grew although the image has a disabled bitmap"
fi
qumount "$MNT"
RZ=$T/resize.qcow2
mkimg "$RZ" 64M
qemu-img bitmap --add -g $G4K "$RZ" fine >>"$T/qemu.log" 2>&1 || fail "qemu-img bitmap --add (resize image) failed"
qmount "$RZ" "$MNT"
truncate -s 96M "$MNT" || fail "growing the view of an image with enabled bitmaps failed"
head -c 8192 /dev/urandom | dd of="$MNT" bs=4096 seek=$(((80 << 20) / 4096)) conv=notrunc,fsync status=none
qumount "$MNT"
qcheck "$RZ"
[ "$(qinfo_field "$RZ" virtual-size)" = $((96 << 20)) ] || fail "the view did not grow to 96 MiB"
same_lines "bitmap after a grow" "$(dirty_granules "$RZ" fine $G4K)" "$(expect_granules $G4K "$((80 << 20)):8192")"
log "a grown disk keeps its bitmap, sized for it"

# ---- a crash leaves the bitmaps in use ---------------------------------------
qmount "$IMG" "$MNT"
head -c $((1 << 20)) /dev/urandom | dd of="$MNT" bs=64k seek=100 conv=notrunc,fsync status=none
qkill "$MNT"
[ "$(bitmap_flags "$IMG")" = "dis::65536 fine:in-use,auto:4096 coarse:in-use,auto:1048576" ] ||
	fail "after kill -9 the enabled bitmaps must stay in use: $(bitmap_flags "$IMG")"
qcheck "$IMG"
# a mount leaves inconsistent bitmaps as they are, as QEMU does
qmount "$IMG" "$MNT"
head -c 4096 /dev/urandom | dd of="$MNT" bs=4096 seek=7 conv=notrunc,fsync status=none
qumount "$MNT"
[ "$(bitmap_flags "$IMG")" = "dis::65536 fine:in-use,auto:4096 coarse:in-use,auto:1048576" ] ||
	fail "a mount changed in-use bitmaps: $(bitmap_flags "$IMG")"
qcheck "$IMG"
same_lines "disabled bitmap dis after the crash" "$(dirty_granules "$IMG" dis $G4K)" "$dis_before"
log "ok"
