#!/bin/bash
# t200-tail-truncate: free space at the end of the file is given back while
# mounted (issue 6, item 15).  200 MiB written into a fresh 4 GiB image
# through the view, then all of it punched (fallocate -p): within 2 s the
# image file is truncated to its metadata (it stayed 212 MB until unmount
# because the automatic trigger counted only free space below the last
# used cluster), without a compaction pass (a free tail needs none).
# qemu-img check is clean after unmount.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate dd

IMG=$T/tail.qcow2
MNT=$T/view.raw
mkimg "$IMG" 4G
qmount "$IMG" "$MNT"
head -c $((200 << 20)) /dev/urandom >"$T/data"
dd if="$T/data" of="$MNT" bs=4M conv=notrunc,fsync status=none || fail "writing 200 MiB into the view failed"
full=$(file_size "$IMG")
[ "$full" -ge $((200 << 20)) ] || fail "setup: the image is only $full bytes after writing 200 MiB"
fallocate -p -o 0 -l $((200 << 20)) "$MNT" || fail "fallocate -p of the 200 MiB failed"
t0=$(date +%s%N)
size=$full
while :; do
	size=$(file_size "$IMG")
	ms=$((($(date +%s%N) - t0) / 1000000))
	[ "$size" -lt $((1 << 20)) ] && break
	[ $ms -gt 10000 ] && break
	sleep 0.05
done
done_n=$(status_field "$MNT" compactions_done)
log "image file $full bytes before the punch, $size bytes ${ms} ms after; $done_n compaction passes"
[ "$size" -lt $((1 << 20)) ] || fail "the free tail was not given back: the image is still $size bytes ${ms} ms after the punch (status: $("$QCOWCTL" status --raw "$MNT" | tr '\n' ' '))"
[ $ms -le 2000 ] || fail "the free tail was given back only after $ms ms (wanted within 2 s)"
[ "$done_n" = 0 ] || fail "truncating a free tail ran $done_n compaction passes (none needed)"
# the view still reads zeros there and takes writes again
dd if="$T/data" of="$MNT" bs=4M count=2 conv=notrunc,fsync status=none || fail "writing after the truncation failed"
cmp -n $((8 << 20)) "$T/data" "$MNT" || fail "data written after the truncation reads back wrong"
qumount "$MNT"
qcheck "$IMG"
qio "$IMG" 'read -P 0 8M 192M'
log "ok"
