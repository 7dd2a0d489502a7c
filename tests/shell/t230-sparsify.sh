#!/bin/bash
# t230-sparsify: zeroed space is free space, and the view shrinks (issue 7).
# ext4 on a loop device over the view, 300 MiB of random files written
# (and a few small ones kept, with checksums), the big ones deleted, then
# the free space zero-filled (dd of zeros into a file until the file
# system is full, sync, rm), as zerofree or sdelete -z do:
#  1. with -o detect_zeroes=unmap the zeros free the clusters: the image
#     file stays small (within 5 % of qemu-img convert -O qcow2);
#  2. with detect_zeroes=off the file grows back; 'qcowctl sparsify' on
#     the live mount frees the zeroed clusters and compaction brings the
#     file within 5 % of qemu-img convert -O qcow2 of the result;
#  3. offline: the same after one more zero-fill, 'qcowctl sparsify IMAGE';
# kept files intact and e2fsck clean after each, qemu-img check clean
# after each unmount.  fio writes and verifies 4 KiB blocks inside zero
# clusters while sparsify runs in a loop.  Then shrinking through the daemon: truncate -s of
# the view frees what lies past the end, the data below it stays, qemu-img
# info shows the new size; refused while the image has a snapshot; an open
# with O_TRUNC is refused.  And the mount's default is detect_zeroes=unmap.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need mkfs.ext4 e2fsck sha256sum mount umount truncate dd fio

IMG=$T/z.qcow2
MNT=$T/view.raw
DIR=$T/fs
mkimg "$IMG" 384M

head -c $((20 << 20)) /dev/urandom >"$T/chunk"

# fill_and_delete: 300 MiB of random files, deleted again (no discard:
# ext4 is mounted without it and nobody runs fstrim)
fill_and_delete() {
	local i
	for i in 1 2 3 4 5; do # 5 x 60 MiB
		cat "$T/chunk" "$T/chunk" "$T/chunk" >"$DIR/big$i"
		printf '%s' "$i$RANDOM" | dd of="$DIR/big$i" bs=1 seek=7 conv=notrunc status=none
	done
	sync -f "$DIR"
	rm -f "$DIR"/big*
	sync -f "$DIR"
}

# zero_fill: dd of zeros until the file system is full, sync, rm
zero_fill() {
	dd if=/dev/zero of="$DIR/fill" bs=1M status=none 2>/dev/null || true
	sync -f "$DIR"
	rm -f "$DIR/fill"
	sync -f "$DIR"
}

check_fs() {
	(cd "$DIR" && sha256sum --quiet -c "$T/keep.sum") || fail "$1: a kept file changed"
	fs_umount "$DIR"
	e2fsck -fn "$DEV" >"$T/e2fsck.log" 2>&1 || fail "$1: e2fsck -fn not clean: $(tail -n 10 "$T/e2fsck.log")"
}

# converted_size: what qemu-img convert -O qcow2 makes of the image
converted_size() {
	rm -f "$T/ref.qcow2"
	qemu-img convert -f qcow2 -O qcow2 "$IMG" "$T/ref.qcow2" || fail "qemu-img convert -O qcow2 failed"
	file_size "$T/ref.qcow2"
}

# within5 WHAT SIZE REF
within5() {
	log "$1: image file $(($2 >> 10)) KiB, qemu-img convert -O qcow2 $(($3 >> 10)) KiB"
	[ "$2" -le $(($3 + $3 / 20)) ] ||
		fail "$1: the image file is $2 bytes, qemu-img convert -O qcow2 gives $3: more than 5 % larger"
}

# ---- 1. detect_zeroes=unmap -----------------------------------------------
t0=$(date +%s)
qmount "$IMG" "$MNT" -o detect_zeroes=unmap
loop_attach "$MNT"
DEV=$LOOPDEV
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$DEV" >"$T/mkfs.log" 2>&1 ||
	fail "mkfs.ext4 over the view failed: $(cat "$T/mkfs.log")"
fs_mount "$DEV" "$DIR" -o nodiscard
for i in 1 2 3; do
	head -c $((i * 100000 + 123)) /dev/urandom >"$DIR/keep$i"
done
(cd "$DIR" && sha256sum keep*) >"$T/keep.sum"
fill_and_delete
full=$(file_size "$IMG")
[ "$full" -ge $((300 << 20)) ] || fail "setup: the image file is only $((full >> 20)) MiB after 300 MiB of files"
zero_fill
"$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(cat "$T/compact.log")"
live=$(file_size "$IMG")
check_fs "detect_zeroes=unmap"
loop_detach "$DEV"
qumount "$MNT"
qcheck "$IMG"
# What stays is the file system's own metadata (journal, inode tables:
# about 35 MiB with 1 KiB blocks, written by mkfs in pieces smaller than a
# cluster, so no write of them was a whole zero cluster); the 300 MiB of
# deleted data must be gone.  (The 5 % rule is sparsify's, below: it
# finds those clusters too.)
log "detect_zeroes=unmap: image file $((full >> 20)) MiB after 300 MiB written and deleted, $((live >> 20)) MiB after the zero-fill; qemu-img convert -O qcow2: $(($(converted_size) >> 20)) MiB"
[ "$live" -le $((64 << 20)) ] ||
	fail "detect_zeroes=unmap: the image file is $live bytes after the zero-fill over 300 MiB of deleted files (was $full)"
log "phase 1: $(($(date +%s) - t0)) s"

# ---- 2. detect_zeroes=off, then sparsify online ----------------------------
t0=$(date +%s)
qmount "$IMG" "$MNT" -o detect_zeroes=off
loop_attach "$MNT"
DEV=$LOOPDEV
fs_mount "$DEV" "$DIR" -o nodiscard
fill_and_delete
zero_fill
full=$(file_size "$IMG")
[ "$full" -ge $((300 << 20)) ] ||
	fail "detect_zeroes=off: the image file is only $((full >> 20)) MiB after the zero-fill (zeros were not written?)"
"$QCOWCTL" sparsify "$MNT" >"$T/sparsify.log" 2>&1 || fail "qcowctl sparsify $MNT failed: $(cat "$T/sparsify.log")"
log "$(tail -n 3 "$T/sparsify.log" | tr '\n' ' ')"
grep -q '^scanned [0-9]* allocated clusters, freed [1-9][0-9]* that read all zeros' "$T/sparsify.log" ||
	fail "qcowctl sparsify printed no summary with freed clusters: $(cat "$T/sparsify.log")"
grep -q '^sparsify: 100%' "$T/sparsify.log" || fail "qcowctl sparsify showed no progress to 100 %: $(cat "$T/sparsify.log")"
"$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(cat "$T/compact.log")"
live=$(file_size "$IMG")
check_fs "online sparsify"
loop_detach "$DEV"
qumount "$MNT"
qcheck "$IMG"
within5 "zero-filled with detect_zeroes=off ($((full >> 20)) MiB file), qcowctl sparsify online" \
	"$live" "$(converted_size)"
log "phase 2: $(($(date +%s) - t0)) s"

# ---- 3. sparsify offline ---------------------------------------------------
t0=$(date +%s)
qmount "$IMG" "$MNT" -o detect_zeroes=off
loop_attach "$MNT"
DEV=$LOOPDEV
fs_mount "$DEV" "$DIR" -o nodiscard
zero_fill
check_fs "zero-fill before the offline sparsify"
loop_detach "$DEV"
qumount "$MNT"
full=$(file_size "$IMG")
cp --sparse=always "$IMG" "$T/before.qcow2"
"$QCOWCTL" sparsify "$IMG" >"$T/sparsify.log" 2>&1 || fail "qcowctl sparsify $IMG failed: $(cat "$T/sparsify.log")"
log "$(tail -n 2 "$T/sparsify.log" | tr '\n' ' ')"
qcheck "$IMG"
qemu-img compare -f qcow2 -F qcow2 "$T/before.qcow2" "$IMG" >/dev/null ||
	fail "offline sparsify changed the disk's contents"
within5 "zero-filled ($((full >> 20)) MiB file), qcowctl sparsify offline" "$(file_size "$IMG")" "$(converted_size)"
qmount "$IMG" "$MNT" -o ro
loop_attach "$MNT" -r
DEV=$LOOPDEV
fs_mount "$DEV" "$DIR" -o ro
check_fs "offline sparsify"
loop_detach "$DEV"
qumount "$MNT"
log "phase 3: $(($(date +%s) - t0)) s"

# ---- sparsify online while a guest writes into the zero clusters ------------
# fio writes 4 KiB blocks at random into 64 MiB of allocated zero clusters
# (the writes sparsify races: a cluster it read as zeros gets its first
# data) while qcowctl sparsify runs again and again; fio verifies every
# block afterwards.  (Without the engine's write hook this loses blocks.)
t0=$(date +%s)
F=$T/f.qcow2
mkimg "$F" 96M
qmount "$F" "$MNT" -o detect_zeroes=off
: >"$T/sparsify-runs"
for round in 1 2; do
	dd if=/dev/zero of="$MNT" bs=1M count=64 conv=notrunc,fsync status=none
	(cd "$T" && exec fio --name=zeroes --filename="$MNT" --rw=randwrite --bs=4k --size=64M --direct=1 \
		--ioengine=psync --verify=crc32c --verify_fatal=1 --randseed=$round --output="$T/fio.log" 2>"$T/fio.err") &
	fio_pid=$!
	# sparsify only while fio writes (not before its first write)
	sleep 0.3
	while kill -0 "$fio_pid" 2>/dev/null; do
		"$QCOWCTL" sparsify "$MNT" >>"$T/sparsify-loop.log" 2>&1 || echo "sparsify failed" >>"$T/sparsify-loop.err"
		echo x >>"$T/sparsify-runs"
	done
	rc=0
	wait "$fio_pid" || rc=$?
	[ $rc = 0 ] || fail "round $round: fio verify failed while sparsify ran (exit $rc): $(grep -iE 'verify|bad|crc|err' "$T/fio.log" "$T/fio.err" | head -n 5)"
	grep -q 'err= 0' "$T/fio.log" || fail "round $round: fio reports an error: $(grep 'err=' "$T/fio.log")"
done
[ ! -s "$T/sparsify-loop.err" ] || fail "a sparsify failed during fio: $(tail -n 5 "$T/sparsify-loop.log")"
runs=$(wc -l <"$T/sparsify-runs")
[ "$runs" -ge 2 ] || fail "only $runs sparsify runs during fio"
qumount "$MNT"
qcheck "$F"
log "sparsify under fio: $runs sparsify runs over 2 fio rounds, every block verified; $(($(date +%s) - t0)) s"

# ---- shrinking the view -----------------------------------------------------
S=$T/s.qcow2
mkimg "$S" 64M
head -c $((64 << 20)) /dev/urandom >"$T/s.raw"
qmount "$S" "$MNT"
dd if="$T/s.raw" of="$MNT" bs=4M conv=notrunc,fsync status=none
# the mount's default is detect_zeroes=unmap: zeros over data free it
ref=$(status_field "$MNT" clusters_referenced)
dd if=/dev/zero of="$MNT" bs=1M count=4 seek=8 conv=notrunc,fsync status=none
dd if=/dev/zero of="$T/s.raw" bs=1M count=4 seek=8 conv=notrunc status=none
ref2=$(status_field "$MNT" clusters_referenced)
[ $((ref - ref2)) -ge 64 ] ||
	fail "default mount: 4 MiB of zeros written over data freed $((ref - ref2)) clusters, want 64 (detect_zeroes=unmap is the default)"
rc=0
sh -c ': >"$1"' sh "$MNT" 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "an open with O_TRUNC (emptying the disk) succeeded"
[ "$(file_size "$MNT")" = $((64 << 20)) ] || fail "a refused O_TRUNC changed the size to $(file_size "$MNT")"
before=$(file_size "$S")
new=$((20 << 20 | 123 << 9))  # not a whole cluster
truncate -s $new "$MNT" || fail "truncate -s $new of the view failed"
[ "$(file_size "$MNT")" = $new ] || fail "view size $(file_size "$MNT") after truncate -s $new"
truncate -s $new "$T/s.raw"
same_file "$MNT" "$T/s.raw" "the view after the shrink"
"$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(cat "$T/compact.log")"
after=$(file_size "$S")
log "shrink 64 MiB -> $new bytes: image file $before -> $after bytes"
[ "$after" -le $(((24 << 20))) ] || fail "the image file is $after bytes after shrinking the view to 20 MiB"
# grow again: the rest of the last cluster and everything after reads zeros
truncate -s 32M "$MNT" || fail "growing the view again failed"
truncate -s 32M "$T/s.raw"
same_file "$MNT" "$T/s.raw" "the view grown again after the shrink"
qumount "$MNT"
qcheck "$S"
[ "$(qinfo_field "$S" virtual-size)" = $((32 << 20)) ] ||
	fail "qemu-img info shows virtual size $(qinfo_field "$S" virtual-size), want 32 MiB"
qcompare "$S" "$T/s.raw" "image after shrink and grow"
qmount "$S" "$MNT"
truncate -s $new "$MNT" || fail "second shrink failed"
qumount "$MNT"
qcheck "$S"
[ "$(qinfo_field "$S" virtual-size)" = $new ] ||
	fail "qemu-img info shows virtual size $(qinfo_field "$S" virtual-size) after truncate -s $new"
truncate -s $new "$T/s.raw"
qcompare "$S" "$T/s.raw" "image after the shrink"

# with a snapshot: refused, as QEMU
qemu-img snapshot -c snap "$S" || fail "qemu-img snapshot -c failed"
qmount "$S" "$MNT"
rc=0
truncate -s 1M "$MNT" 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "shrinking the view of an image with a snapshot succeeded"
[ "$(file_size "$MNT")" = $new ] || fail "a refused shrink changed the size to $(file_size "$MNT")"
grep -q 'not supported' "$T/out" || fail "the refused shrink said: $(cat "$T/out")"
qumount "$MNT"
qcheck "$S"
log "ok"
