#!/bin/bash
# t020-interop-read: the QEMU interop matrix.  Images made by qemu-img
# (cluster sizes 512 B .. 2 MiB, compat 0.10 and 1.1, refcount widths,
# preallocation=metadata, lazy_refcounts=on), filled by qemu-io (patterns,
# zero writes with and without unmap, discards, unaligned writes, writes
# crossing L2 tables, the last bytes of the disk): mounted read-only and
# read-write, the view reads byte-identical to qemu-img convert -O raw.
# A ro mount changes no byte of the image; after a rw mount without writes
# qemu-img check is clean and qemu-img compare still finds the same data.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need cmp

MNT=$T/view.raw
n=0
done_cases=0 # (bash abandons a function silently on some expansion errors)

# case_ OPTS SIZE_MIB: one image of the matrix
case_() {
	local opts=$1 mib=$2 img cs l2span size cmds=() raw sum
	n=$((n + 1))
	img=$T/i$n.qcow2
	raw=$T/i$n.raw
	size=$((mib << 20))
	mkimg "$img" "$size" "$opts"
	cs=$(qinfo_field "$img" cluster-size)
	l2span=$((cs / 8 * cs)) # guest bytes one L2 table maps
	# data patterns, unaligned, across clusters
	cmds+=("write -P 0x11 0 $((4 * cs))")
	cmds+=("write -P 0x22 $((cs / 2 + 3)) $((cs + 1001))")
	cmds+=("write -P 0x33 $((10 * cs + 17)) 5")
	cmds+=("write -P 0x44 $((16 * cs)) $((8 * cs))")
	# zero writes: on data (keeps or frees the cluster), unmapping, on a hole
	cmds+=("write -z $((17 * cs)) $((2 * cs))")
	cmds+=("write -z -u $((20 * cs)) $((2 * cs))")
	cmds+=("write -z $((30 * cs)) $((2 * cs))")
	# discards: whole clusters of data, and a partial one (advisory)
	cmds+=("discard $cs $cs")
	cmds+=("discard $((22 * cs + 512)) 1024")
	# a run of small writes, one every 3 clusters
	local i
	for i in 0 1 2 3 4 5 6 7; do
		cmds+=("write -P $((0x50 + i)) $(((40 + 3 * i) * cs + 7 * i)) $((100 + 333 * i))")
	done
	# across an L2 boundary (when the disk is big enough to have one)
	if [ $((l2span + 2 * cs)) -lt "$size" ]; then
		cmds+=("write -P 0x66 $((l2span - cs - 100)) $((2 * cs + 200))")
		cmds+=("write -P 0x67 $((l2span * (size / l2span) - 1000)) 1000")
	fi
	# the very end of the disk, and a cluster in the middle
	cmds+=("write -P 0x77 $((size - 3000)) 3000")
	cmds+=("write -P 0x78 $((size / 2 + 4321)) $((cs + 1))")
	# and overwrite part of earlier data
	cmds+=("write -P 0x79 $((2 * cs + 100)) 200")
	qio "$img" "${cmds[@]}"
	qemu-img check -q "$img" || fail "setup: qemu-img check of $img ($opts) not clean"
	raw_of "$img" "$raw"

	sum=$(sha "$img")
	qmount "$img" "$MNT" -o ro
	same_file "$MNT" "$raw" "image $n ($opts, ${mib}M), ro view vs qemu-img convert"
	qumount "$MNT"
	[ "$(sha "$img")" = "$sum" ] || fail "image $n ($opts): a ro mount changed the image"

	qmount "$img" "$MNT"
	same_file "$MNT" "$raw" "image $n ($opts, ${mib}M), rw view vs qemu-img convert"
	qumount "$MNT"
	qcheck "$img"
	qcompare "$img" "$raw" "image $n ($opts) after a rw mount"
	log "image $n ($opts, ${mib} MiB) reads identical"
	done_cases=$((done_cases + 1))
	rm -f "$raw"
}

case_ cluster_size=512 32
case_ cluster_size=512,compat=0.10 16
case_ cluster_size=512,refcount_bits=64 16
case_ cluster_size=4096 64
case_ cluster_size=4096,compat=0.10 64
case_ cluster_size=4096,refcount_bits=1 64
case_ cluster_size=65536 640
case_ cluster_size=65536,compat=0.10 128
case_ cluster_size=65536,refcount_bits=1 128
case_ cluster_size=65536,refcount_bits=64 128
case_ cluster_size=2M 256
case_ cluster_size=2M,compat=0.10 128
case_ cluster_size=2M,refcount_bits=1 128
case_ preallocation=metadata 128
case_ preallocation=metadata,cluster_size=4096 64
case_ preallocation=metadata,compat=0.10 64
case_ lazy_refcounts=on 128
case_ lazy_refcounts=on,cluster_size=4096,refcount_bits=8 64

# A disk whose size is not a multiple of the cluster size, nor even of
# 4 KiB.

[ $done_cases = $n ] || fail "only $done_cases of $n cases ran to the end"
img=$T/odd.qcow2
mkimg "$img" $(((64 << 20) + 512 * 3))
qio "$img" "write -P 0x5e $(((64 << 20) - 1000)) 2536"
raw_of "$img" "$T/odd.raw"
qmount "$img" "$MNT" -o ro
[ "$(file_size "$MNT")" = $(((64 << 20) + 1536)) ] || fail "odd-size view has size $(file_size "$MNT")"
same_file "$MNT" "$T/odd.raw" "odd-size image"
qumount "$MNT"

log "ok"
