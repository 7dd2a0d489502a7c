#!/bin/bash
# t090-discard: fallocate --punch-hole and --zero-range on the view, at
# cluster-aligned and unaligned ranges (partial clusters at either end,
# inside one cluster, one byte, the last bytes of the disk, holes), and
# blkdiscard (plain and -z) through a loop device: afterwards the range
# reads zeros and its neighbours are intact (checked against a shadow file
# that gets the same treatment); st_blocks of the view and the image's
# allocation drop within seconds after a big discard; after unmount
# qemu-img check is clean and qemu-img compare finds the shadow.  On a
# default image, 4 KiB, 2 MiB and 512 B clusters, and a compat 0.10 image.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need fallocate blkdiscard dd cmp

MNT=$T/view.raw
SH=$T/shadow.raw

# window_same OFF LEN WHAT: view and shadow agree on [OFF - 2 clusters,
# OFF + LEN + 2 clusters) (clipped to the disk), and [OFF, OFF+LEN) is zero.
window_same() {
	local off=$1 len=$2 what=$3 a b size
	size=$(file_size "$SH")
	a=$((off - 2 * CS))
	[ $a -ge 0 ] || a=0
	b=$((off + len + 2 * CS))
	[ $b -le "$size" ] || b=$size
	cmp -n $((b - a)) <(dd if="$MNT" bs=64k skip=$a count=$((b - a)) iflag=skip_bytes,count_bytes status=none) \
		<(dd if="$SH" bs=64k skip=$a count=$((b - a)) iflag=skip_bytes,count_bytes status=none) >"$T/cmp.out" 2>&1 ||
		fail "$what: view differs from the shadow near [$off, +$len): $(cat "$T/cmp.out")"
	cmp -n "$len" <(dd if="$MNT" bs=64k skip="$off" count="$len" iflag=skip_bytes,count_bytes status=none) \
		/dev/zero >"$T/cmp.out" 2>&1 || fail "$what: [$off, +$len) does not read zeros: $(cat "$T/cmp.out")"
}

# op MODE OFF LEN: the same fallocate on the view and on the shadow
op() {
	local mode=$1 off=$2 len=$3 out
	out=$(fallocate "--$mode" -o "$off" -l "$len" "$MNT" 2>&1) ||
		fail "fallocate --$mode -o $off -l $len on the view failed: $out"
	fallocate "--$mode" -o "$off" -l "$len" "$SH"
	window_same "$off" "$len" "fallocate --$mode -o $off -l $len"
}

run() {
	local opts=$1 mopts=${2:-} img b0 i0 ib size dev d
	img=$T/disc.qcow2
	rm -f "$img" "$SH"
	mkimg "$img" 256M "$opts"
	CS=$(qinfo_field "$img" cluster-size)
	size=$((256 << 20))
	if [ -n "$mopts" ]; then
		qmount "$img" "$MNT" -o "$mopts"
	else
		qmount "$img" "$MNT"
	fi
	truncate -s $size "$SH"
	head -c $((64 << 20)) /dev/urandom >"$T/data"
	dd if="$T/data" of="$MNT" bs=1M conv=notrunc,fsync status=none
	dd if="$T/data" of="$SH" bs=1M conv=notrunc status=none
	dd if="$T/data" of="$MNT" bs=1M seek=255 count=1 conv=notrunc,fsync status=none
	dd if="$T/data" of="$SH" bs=1M seek=255 count=1 conv=notrunc status=none

	op punch-hole $((4 * CS)) $((8 * CS))                     # whole clusters
	op punch-hole $((20 * CS + 100)) 1000                     # inside one cluster
	op punch-hole $((30 * CS - 777)) $((3 * CS + 1554))       # partial, whole, partial
	op punch-hole $((33 * CS + 5)) 1                          # one byte
	op zero-range $((50 * CS)) $((2 * CS))
	op zero-range $((60 * CS + 1)) $((2 * CS))
	op zero-range $((70 * CS + 4095)) 2
	op punch-hole $(((64 << 20) - 1000)) $((2 * CS))          # data into unallocated
	op punch-hole $((200 << 20)) $((1 << 20))                 # all unallocated
	op zero-range $((210 << 20)) $((1 << 20))
	op punch-hole $((size - 3000)) 3000                       # the last bytes
	op zero-range $((size - CS - 7)) 7

	# a big discard gives the space back within seconds
	sync "$MNT"
	sleep 1.5 # attribute timeout
	b0=$(file_blocks "$MNT")
	i0=$(file_blocks "$img")
	op punch-hole $((32 << 20)) $((24 << 20))
	wait_until 10 eval '[ $(file_blocks "$img") -le $((i0 - (20 << 20) / 512)) ]' ||
		fail "image allocation went from $((i0 / 2)) KiB to only $(($(file_blocks "$img") / 2)) KiB within 10 s of a 24 MiB discard ($opts)"
	wait_until 10 eval '[ $(file_blocks "$MNT") -le $((b0 - (20 << 20) / 512)) ]' ||
		fail "st_blocks of the view went from $b0 to only $(file_blocks "$MNT") within 10 s of a 24 MiB discard ($opts)"
	d=$(status_field "$MNT" bytes_discarded)
	[ "$d" -ge $((24 << 20)) ] || fail "status bytes_discarded=$d after discarding more than 24 MiB"

	# through a loop device
	loop_attach "$MNT"
	dev=$LOOPDEV
	blkdiscard -o $((8 << 20)) -l $((4 << 20)) "$dev" || fail "blkdiscard -o 8M -l 4M $dev failed"
	fallocate --punch-hole -o $((8 << 20)) -l $((4 << 20)) "$SH"
	blkdiscard -o $((13 << 20 | 4096)) -l $((1 << 20 | 8192)) "$dev" || fail "blkdiscard of a 4 KiB-aligned range failed"
	fallocate --punch-hole -o $((13 << 20 | 4096)) -l $((1 << 20 | 8192)) "$SH"
	blkdiscard -z -o $((16 << 20 | 4096)) -l $((2 << 20)) "$dev" || fail "blkdiscard -z failed"
	fallocate --punch-hole -o $((16 << 20 | 4096)) -l $((2 << 20)) "$SH"
	blkdiscard -o $((63 << 20)) -l $((1 << 20)) "$dev" || fail "blkdiscard -o 63M -l 1M failed"
	fallocate --punch-hole -o $((63 << 20)) -l $((1 << 20)) "$SH"
	loop_detach "$dev"
	window_same $((8 << 20)) $((4 << 20)) "blkdiscard -o 8M -l 4M"
	window_same $((13 << 20 | 4096)) $((1 << 20 | 8192)) "blkdiscard of a 4 KiB-aligned range"
	window_same $((16 << 20 | 4096)) $((2 << 20)) "blkdiscard -z"

	# writes after discards land where they should
	dd if="$T/data" of="$MNT" bs=4096 seek=$((5 * CS / 4096)) count=3 conv=notrunc status=none
	dd if="$T/data" of="$SH" bs=4096 seek=$((5 * CS / 4096)) count=3 conv=notrunc status=none
	same_file "$MNT" "$SH" "view vs shadow after all discards ($opts)"
	qumount "$MNT"
	qcheck "$img"
	qcompare "$img" "$SH" "image after discards ($opts)"

	ib=$(du -k "$img" | cut -f1)
	log "discards on ${opts:-a default image}${mopts:+ (-o $mopts)}: ok (image now $ib KiB allocated)"
	done_cases=$((done_cases + 1))
}

done_cases=0
run ""
run cluster_size=4096
run compat=0.10
run cluster_size=2M
run cluster_size=512
# the engine checks every cluster-map invariant after each change
run cluster_size=65536 runtime_asserts
[ $done_cases = 6 ] || fail "only $done_cases of 6 image kinds ran to the end"
log "ok"
