#!/bin/bash
# t250-compressed-shrink: a compressed cloud-style image gives its space back
# (issue 7, "Tests", first bullet).
#
# The image is made the way cloud images are: ext4 made on a raw file and
# loop-mounted directly (no qcowfs), ~180 MB of files written (text-like
# base64 data that zlib compresses to ~3/4, highly compressible log-like
# text, and random data that QEMU stores uncompressed), then
# `qemu-img convert -c -O qcow2`.  Three files are kept, with their sha256
# recorded at creation: one of each kind.
#
# Through qcowfs (default options: automatic compaction), ext4 on a loop
# device over the view: every other file deleted, fstrim, the recycler left
# to settle (as t100: the size polled until it stays put and nothing is
# compacting, erasing or waiting for a flush), then `qcowctl compact`
# (which waits for its pass) so that the figure is the minimum the engine
# reaches, not a pass still to come.  After unmount:
#  - `qemu-img check` clean (no errors, no leaks);
#  - the image file is at most 5 % larger than `qemu-img convert -O qcow2`
#    of the result, or one 64 KiB cluster larger, whichever is more.  The
#    5 % is the issue's bound (here about 0.5 MiB of a ~10.6 MiB
#    reference).  The one-cluster floor only matters for a reference under
#    1.25 MiB, where 5 % is less than a cluster: one cluster of difference
#    in where the two programs put their tables (L1, refcount blocks) is
#    layout, not space a compaction left behind.  (qcowfs may well end
#    SMALLER than the reference: kept compressed data stays compressed,
#    while `convert -O qcow2` writes it uncompressed.)  Margins measured on
#    the current engine: the clusters in use after the deletes are 9.1 MiB
#    (min_file_size), the bound ~11.1 MiB.  Of those, about 19 clusters
#    read all zeros (19 on the same steps without -c: ext4 block bitmaps
#    of emptied groups, rewritten as 4 KiB blocks): convert drops them,
#    compaction keeps them (the issue's "zeroed space" part, not this
#    test's).  The same steps without
#    `-c` compact completely and still end 11 % above convert for that
#    reason alone, so it is the compressed kept data (~3 MiB smaller) that
#    leaves the margin: an engine that stored moved compressed data
#    uncompressed would most likely fail here (about 12 MiB).
#  - the data equals the converted copy (qemu-img compare), and the kept
#    files are intact when the image is mounted again (read-only) and e2fsck
#    finds the file system clean.
# Fails before issue 7: compressed clusters are pinned where convert -c put
# them, all over the file, so it cannot shrink below the last of them (the
# failure message shows the file, the reference and what held the file).
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need mkfs.ext4 e2fsck fstrim sha256sum base64 mount umount

LAYOUT="$PYTHON $TESTDIR/qcow2_layout.py"
# layout_field IMAGE KEY: one field of qcow2_layout.py's JSON
layout_field() {
	$LAYOUT "$1" | $PYTHON -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$2"
}

RAW=$T/cloud.raw
IMG=$T/cloud.qcow2
MNT=$T/view.raw
DIR=$T/fs
SRC=$T/src
mkdir -p "$SRC"

# ---- the cloud image: ext4 on a raw file, filled, convert -c ---------------
truncate -s 320M "$RAW"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$RAW" >"$T/mkfs.log" 2>&1 ||
	fail "mkfs.ext4 on a raw file failed: $(cat "$T/mkfs.log")"
loop_attach "$RAW"
fs_mount "$LOOPDEV" "$DIR"

# text FILE MIB: base64 of random bytes (zlib: ~75 %); logs FILE MIB: log-like
# lines (zlib: a few %); random FILE MIB: incompressible (QEMU writes those
# clusters uncompressed)
text() { head -c $(($2 * 786432)) /dev/urandom | base64 -w 76 >"$1"; }
logs() { seq -f "%08g kernel: eth0 link up, 1000 Mbps full duplex, flow control rx/tx" 1 $(($2 * 14500)) >"$1"; }
random() { head -c $(($2 << 20)) /dev/urandom >"$1"; }
n=0
for kind in text text logs text random text text logs text random text text; do
	n=$((n + 1))
	$kind "$DIR/f$n" 13
	# a kept file of each kind after files 3, 6 and 9: spread over the
	# file system, so the kept data ends up at several places in the file
	case $n in
	3) text "$DIR/keep-text" 4 ;;
	6) logs "$DIR/keep-logs" 2 ;;
	9) random "$DIR/keep-random" 3 ;;
	esac
done
for x in 1 2 3; do text "$DIR/small$x" 1; done
(cd "$DIR" && sha256sum keep-*) >"$T/keep.sum"
log "written: $(du -sm "$DIR" | cut -f1) MiB in the file system"
fs_umount "$DIR"
loop_detach "$LOOPDEV"

qemu-img convert -c -f raw -O qcow2 "$RAW" "$IMG" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img convert -c failed: $(tail -n 3 "$T/qemu.log")"
rm -f "$RAW"
before=$(file_size "$IMG")
$LAYOUT "$IMG" >"$T/layout-before.json"
comp=$(layout_field "$IMG" compressed)
log "convert -c: $((before >> 20)) MiB, layout $(cat "$T/layout-before.json")"
# the test is about compressed clusters: make sure there are plenty
[ "$comp" -ge 1500 ] || fail "setup: only $comp compressed clusters in the converted image"

# ---- mount, delete, fstrim, settle ------------------------------------------
qmount "$IMG" "$MNT"
loop_attach "$MNT"
DEV=$LOOPDEV
fs_mount "$DEV" "$DIR"
(cd "$DIR" && find . -type f ! -name 'keep-*' -delete)
sync -f "$DIR"
fstrim -v "$DIR" >"$T/fstrim.log" 2>&1 || fail "fstrim failed: $(cat "$T/fstrim.log")"
log "$(cat "$T/fstrim.log")"
t0=$(date +%s)

# settled: same size twice in a row, nothing compacting, nothing to erase
prev=-1
for i in $(seq 1 40); do
	sleep 0.5
	s=$(file_size "$IMG")
	echo "$i $s" >>"$T/sizes.log"
	if [ "$s" = "$prev" ] &&
		case $(status_field "$MNT" compacting) in 0 | false) true ;; *) false ;; esac &&
		[ "$(status_field "$MNT" clusters_junk)" = 0 ] &&
		[ "$(status_field "$MNT" clusters_erased)" = 0 ]; then
		break
	fi
	prev=$s
done
auto=$(file_size "$IMG")
log "automatic compaction settled at $((auto >> 20)) MiB after $(($(date +%s) - t0)) s"
timeout 60 "$QCOWCTL" compact "$MNT" >"$T/compact.out" 2>&1 ||
	fail "qcowctl compact failed: $(cat "$T/compact.out")"
log "qcowctl compact: $(tr '\n' ' ' <"$T/compact.out")"
"$QCOWCTL" status --raw "$MNT" >"$T/status.log" 2>&1 || true

fs_umount "$DIR"
e2fsck -fn "$DEV" >"$T/e2fsck.log" 2>&1 || fail "e2fsck -fn not clean after fstrim and compaction: $(tail -n 10 "$T/e2fsck.log")"
loop_detach "$DEV"
qumount "$MNT"
qcheck "$IMG"
final=$(file_size "$IMG")
$LAYOUT "$IMG" >"$T/layout-after.json"

# ---- the verdict ------------------------------------------------------------
qemu-img convert -f qcow2 -O qcow2 "$IMG" "$T/ref.qcow2" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img convert -O qcow2 of the result failed: $(tail -n 3 "$T/qemu.log")"
ref=$(file_size "$T/ref.qcow2")
slack=$((ref / 20))
[ "$slack" -ge 65536 ] || slack=65536
log "image file: $((before >> 20)) MiB converted, $((auto >> 20)) MiB settled, $((final >> 20)) MiB after qcowctl compact ($final bytes); convert -O qcow2 of the result: $((ref >> 20)) MiB ($ref bytes); allowed up to $(((ref + slack) >> 20)) MiB"
log "layout after: $(cat "$T/layout-after.json")"
qemu-img compare -f qcow2 -F qcow2 "$IMG" "$T/ref.qcow2" >>"$T/qemu.log" 2>&1 ||
	fail "qemu-img compare with the converted copy differs"

# ---- the kept files, through a fresh read-only mount ------------------------
qmount "$IMG" "$MNT" -o ro
loop_attach "$MNT" -r
fs_mount "$LOOPDEV" "$DIR" -o ro,noload
(cd "$DIR" && sha256sum --quiet -c "$T/keep.sum") >"$T/keep.log" 2>&1 ||
	fail "kept files changed: $(cat "$T/keep.log")"
left=$(cd "$DIR" && find . -type f | wc -l)
[ "$left" = 3 ] || fail "expected the 3 kept files, found $left files"
fs_umount "$DIR"
loop_detach "$LOOPDEV"
qumount "$MNT"
qcheck "$IMG"

# the size last, so that a failure here says the data parts passed
[ "$final" -le $((ref + slack)) ] ||
	fail "the image file is $final bytes ($((final >> 20)) MiB; $((auto >> 20)) MiB before qcowctl compact), qemu-img convert -O qcow2 of the result $ref bytes ($((ref >> 20)) MiB): more than 5 % larger; it was $((before >> 20)) MiB before. qcowctl compact said: $(tr '\n' ' ' <"$T/compact.out") Layout: $(cat "$T/layout-after.json")"
log "ok"
