#!/bin/bash
# t100-fstrim-shrink: the point of qcowfs, end to end (issue 3).
# A 2 GiB image, ext4 on a loop device over the view, about 800 MB of files
# written, all but one deleted, fstrim: within 60 s the image FILE (its
# apparent size, stat -c %s) is within 10 % of what qemu-img convert -O
# qcow2 makes of the same image, with default mount options (automatic
# compaction).  e2fsck is clean, the kept file intact, qemu-img check clean
# after unmount.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need mkfs.ext4 e2fsck fstrim sha256sum mount umount

IMG=$T/big.qcow2
MNT=$T/view.raw
DIR=$T/fs
mkimg "$IMG" 2G
qmount "$IMG" "$MNT"
loop_attach "$MNT"
DEV=$LOOPDEV
# no lazy init: a background inode-table writer would blur the sizes
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" >"$T/mkfs.log" 2>&1 ||
	fail "mkfs.ext4 over the view failed: $(cat "$T/mkfs.log")"
fs_mount "$DEV" "$DIR"

head -c $((32 << 20)) /dev/urandom >"$T/chunk"
for i in 1 2 3 4 5 6 7 8; do # 8 x 96 MiB = 768 MiB
	cat "$T/chunk" "$T/chunk" "$T/chunk" >"$DIR/junk$i"
done
head -c $((40 << 20)) /dev/urandom >"$DIR/keep"
(cd "$DIR" && sha256sum keep) >"$T/keep.sum"
sync -f "$DIR/keep"
df -k "$DIR" >"$T/df.log"
log "written: $(du -sm "$DIR" | cut -f1) MiB in the file system; image file $(($(file_size "$IMG") >> 20)) MiB"
full=$(file_size "$IMG")
[ "$full" -ge $((700 << 20)) ] || fail "setup: image only $((full >> 20)) MiB after writing 800 MB"

rm -f "$DIR"/junk*
sync -f "$DIR"
fstrim -v "$DIR" >"$T/fstrim.log" 2>&1 || fail "fstrim failed: $(cat "$T/fstrim.log")"
log "$(cat "$T/fstrim.log")"
t0=$(date +%s)

# poll the live size: it must come down and settle
best=$full
for i in $(seq 1 60); do
	sleep 1
	s=$(file_size "$IMG")
	[ "$s" -lt "$best" ] && best=$s
	echo "$i s: $s" >>"$T/sizes.log"
	# settled well below the full size: stop early
	if [ "$s" -lt $((200 << 20)) ] && [ "$s" = "$(cat "$T/last" 2>/dev/null)" ] &&
		case $(status_field "$MNT" compacting) in 0 | false) true ;; *) false ;; esac; then
		break
	fi
	echo "$s" >"$T/last"
done
live=$(file_size "$IMG")
elapsed=$(($(date +%s) - t0))
log "image file: $((full >> 20)) MiB before fstrim, $((live >> 20)) MiB after ${elapsed} s; allocation $(($(file_blocks "$IMG") / 2048)) MiB"
log "status: $("$QCOWCTL" status --raw "$MNT" | tr '\n' ' ')"

fs_umount "$DIR"
e2fsck -fn "$DEV" >"$T/e2fsck.log" 2>&1 || fail "e2fsck -fn not clean after fstrim: $(tail -n 10 "$T/e2fsck.log")"
fs_mount "$DEV" "$DIR"
(cd "$DIR" && sha256sum --quiet -c "$T/keep.sum") || fail "the kept file changed"
fs_umount "$DIR"
loop_detach "$DEV"
qumount "$MNT"
qcheck "$IMG"

qemu-img convert -f qcow2 -O qcow2 "$IMG" "$T/ref.qcow2" || fail "qemu-img convert -O qcow2 failed"
ref=$(file_size "$T/ref.qcow2")
log "qemu-img convert -O qcow2 of the same image: $((ref >> 20)) MiB"
[ "$live" -le $((ref + ref / 10)) ] ||
	fail "60 s after fstrim the image file is $((live >> 20)) MiB ($live bytes); qemu-img convert -O qcow2 gives $((ref >> 20)) MiB ($ref bytes): more than 10 % larger (sizes: $(tr '\n' ' ' <"$T/sizes.log"))"
# and the data is the same as QEMU sees it
qemu-img compare -f qcow2 -F qcow2 "$IMG" "$T/ref.qcow2" >/dev/null || fail "qemu-img compare with the converted copy differs"
log "ok"
