#!/bin/bash
# t180-compact-sparse: compaction keeps holes holes (issue 6, item 6).
# A 2 GiB preallocation=metadata image (every guest cluster mapped, the
# host clusters holes) with 4 MiB of data at 1.5 GiB: discard the first
# GiB through the view and compact.  The moved clusters were holes and
# must stay holes: the image's host allocation stays small (it was 1.0 GiB
# when copy_file_range wrote the holes out as zero blocks), the file gets
# shorter, the data reads back (qemu-io) and qemu-img check is clean.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate du

IMG=$T/pre.qcow2
MNT=$T/view.raw
mkimg "$IMG" 2G preallocation=metadata
qio "$IMG" 'write -P 0x5a 1536M 4M'
alloc0=$(($(file_blocks "$IMG") * 512))
size0=$(file_size "$IMG")
log "before: file $size0 bytes, allocated $alloc0 bytes"

qmount "$IMG" "$MNT"
fallocate -p -o 0 -l 1G "$MNT" || fail "fallocate -p of the first GiB of the view failed"
timeout 120 "$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(tail -n 3 "$T/compact.log")"
alloc1=$(($(file_blocks "$IMG") * 512))
size1=$(file_size "$IMG")
log "after the compaction: file $size1 bytes, allocated $alloc1 bytes; moved $(status_field "$MNT" clusters_moved) clusters"
qumount "$MNT"
alloc2=$(($(file_blocks "$IMG") * 512))
size2=$(file_size "$IMG")
log "after unmount: file $size2 bytes, allocated $alloc2 bytes"

[ "$size1" -lt $((size0 - (512 << 20))) ] ||
	fail "setup: the compaction did not shorten the file ($size0 -> $size1 bytes): nothing was moved"
limit=$((alloc0 + (16 << 20)))
[ "$alloc1" -le "$limit" ] ||
	fail "compaction filled holes: allocation $alloc0 -> $alloc1 bytes (limit $limit) while mounted"
[ "$alloc2" -le "$limit" ] ||
	fail "compaction filled holes: allocation $alloc0 -> $alloc2 bytes (limit $limit) after unmount"
qcheck "$IMG"
qio "$IMG" 'read -P 0x5a 1536M 4M' 'read -P 0 0 64M' 'read -P 0 1000M 64M' 'read -P 0 1540M 64M'
log "ok"
