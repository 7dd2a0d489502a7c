#!/bin/bash
# t330-counters: the status counters tell the truth (issue 9).
#  1. mkfs.ext4 (which discards the whole device) on a loop device over a
#     fresh view, mount, one fstrim: bytes_discarded (allocated host
#     clusters freed) never exceeds the bytes the image file had before
#     the fstrim, while bytes_discard_requested shows the much larger
#     requested figure (at least the whole disk, from mkfs).
#  2. Write data, delete most of it, fstrim, compact: bytes_reclaimed grew
#     by what the image file's host allocation (stat: st_blocks * 512) lost
#     between before the fstrim and after the compaction settled, within
#     two clusters, and by no more than the file's largest apparent size
#     (st_size); bytes_discarded grew by about the 320 MiB deleted, and
#     by no more than that largest size.
# Fails before issue 9: the discard counter reported the requested bytes
# (gigabytes on a near-empty disk), and reclaimed counted a punched cluster
# again when truncation cut it off, plus the never-written headroom.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need mkfs.ext4 fstrim mount umount

CS=65536
IMG=$T/c.qcow2
MNT=$T/view.raw
DIR=$T/fs
mkimg "$IMG" 1G
qmount "$IMG" "$MNT"
loop_attach "$MNT"
DEV=$LOOPDEV

# settled: no compaction running, nothing left to erase, and the counters
# and the image's allocation unchanged over a second
settled_state() {
	echo "$(status_field "$MNT" compacting) $(status_field "$MNT" clusters_junk)" \
		"$(status_field "$MNT" clusters_erased) $(status_field "$MNT" bytes_reclaimed)" \
		"$(file_blocks "$IMG") $(file_size "$IMG")"
}
settle() {
	local a b
	for _ in $(seq 1 60); do
		a=$(settled_state)
		sleep 1
		b=$(settled_state)
		case $b in "0 0 0 "*) [ "$a" = "$b" ] && return 0 ;; esac
	done
	fail "the daemon did not settle within 120 s: $b"
}

# ---- 1. mkfs and one fstrim --------------------------------------------------
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" >"$T/mkfs.log" 2>&1 ||
	fail "mkfs.ext4 over the view failed: $(cat "$T/mkfs.log")"
fs_mount "$DEV" "$DIR"
sync -f "$DIR"
before=$(file_size "$IMG")
fstrim "$DIR" >"$T/fstrim.log" 2>&1 || fail "fstrim failed: $(cat "$T/fstrim.log")"
sync "$MNT"
d=$(status_field "$MNT" bytes_discarded)
req=$(status_field "$MNT" bytes_discard_requested)
log "after mkfs and fstrim: discarded $d, requested $req, image file $before bytes before the fstrim"
[ -n "$d" ] && [ -n "$req" ] || fail "the status lacks bytes_discarded or bytes_discard_requested"
[ "$d" -le "$before" ] ||
	fail "bytes_discarded=$d after mkfs and one fstrim, more than the image file ever held ($before bytes)"
[ "$req" -ge $((1 << 30)) ] ||
	fail "bytes_discard_requested=$req: mkfs.ext4 discarded the whole 1 GiB disk"

# ---- 2. data, delete, fstrim, compaction: reclaimed against stat -------------
head -c $((32 << 20)) /dev/urandom >"$T/chunk"
for i in 1 2 3 4 5; do
	cat "$T/chunk" "$T/chunk" >"$DIR/junk$i"   # 5 x 64 MiB
done
cp "$T/chunk" "$DIR/keep"
sync -f "$DIR"
sync "$MNT"
settle
rm -f "$DIR"/junk*
sync -f "$DIR"
largest=$(file_size "$IMG")
a0=$(($(file_blocks "$IMG") * 512))
r0=$(status_field "$MNT" bytes_reclaimed)
d0=$(status_field "$MNT" bytes_discarded)
[ "$a0" -ge $((300 << 20)) ] || fail "setup: the image file holds only $((a0 >> 20)) MiB after writing 352 MiB"
fstrim "$DIR" >"$T/fstrim.log" 2>&1 || fail "fstrim failed: $(cat "$T/fstrim.log")"
sync "$MNT"
timeout 120 "$QCOWCTL" compact "$MNT" >"$T/compact.out" 2>&1 ||
	fail "qcowctl compact failed: $(cat "$T/compact.out")"
settle
a1=$(($(file_blocks "$IMG") * 512))
r1=$(status_field "$MNT" bytes_reclaimed)
d1=$(status_field "$MNT" bytes_discarded)
got=$((r1 - r0))
lost=$((a0 - a1))
log "allocation $a0 -> $a1 (lost $lost), bytes_reclaimed $r0 -> $r1 (+$got), largest apparent size $largest"
[ "$lost" -ge $((250 << 20)) ] || fail "setup: compaction gave back only $((lost >> 20)) MiB of 320 MiB deleted"
diff=$((got > lost ? got - lost : lost - got))
[ "$diff" -le $((2 * CS)) ] ||
	fail "bytes_reclaimed grew by $got bytes, the image's allocation (st_blocks) fell by $lost bytes"
[ "$r1" -le "$largest" ] ||
	fail "bytes_reclaimed=$r1, more than the image file ever was ($largest bytes)"
# the fstrim freed the deleted files' clusters: counted, and no more
log "bytes_discarded $d0 -> $d1"
[ $((d1 - d0)) -ge $((300 << 20)) ] ||
	fail "bytes_discarded grew by only $((d1 - d0)) bytes when fstrim freed 320 MiB of deleted files"
[ "$d1" -le "$largest" ] || fail "bytes_discarded=$d1, more than the image file ever was ($largest bytes)"

fs_umount "$DIR"
loop_detach "$DEV"
qumount "$MNT"
qcheck "$IMG"
exit 0
