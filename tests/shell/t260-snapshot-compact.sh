#!/bin/bash
# t260-snapshot-compact: an image with internal snapshots compacts all the
# way down and every snapshot survives byte for byte (issue 7, "Tests",
# second bullet).
#
# Each scenario builds its image with qemu-img and qemu-io only: writes,
# `qemu-img snapshot -c`, more writes (some over the snapshot's data, so the
# old clusters stay with the snapshot only and L2 tables are copied on
# write), and so on.  One trick puts active-only data low in the file with
# snapshot-shared clusters above it: a scratch range is written and
# discarded by QEMU between two snapshots, which leaves a hole in the middle
# of the file, and the writes after the last snapshot fill that hole (QEMU
# allocates the lowest free cluster).  The sha256 of every snapshot
# (`qemu-img convert -l snapshot.name=sN -O raw`) and of the active disk
# are recorded.
#
# Premise, checked on a copy of the image before qcowfs ever sees it: QEMU
# itself discards the same ranges on the copy, and qcow2_layout.py must then
# find free clusters with snapshot-shared clusters above them.  So the
# image cannot get to its minimum size without moving shared clusters, and
# a failure of the final rule is about exactly that.
#
# Through qcowfs (default options): big parts of the active layer are
# discarded with fallocate -p on the view (whole clusters: active-only data
# in the hole, data shared with the snapshots, inside L2 tables shared with
# them), the recycler is left to settle and `qcowctl compact` waits for a
# last pass.  Pass when:
#  - the view reads the expected contents (the active disk before, with the
#    discarded ranges zero), and so does `qemu-img convert` after unmount;
#  - every snapshot reads byte-identical to before;
#  - `qemu-img check` is clean (no errors, no leaks);
#  - no free cluster lies below the end of the file.  The rule: with a clean
#    check every cluster's refcount equals its references, so the clusters
#    in use are exactly those with refcount > 0; qcow2_layout.py reads the
#    refcount blocks of the file (not through qcowfs) and counts, over every
#    cluster from offset 0 to the end of the file, those with refcount 0
#    ("free_below_end").  It must be 0: the file ends right after its last
#    cluster in use and holds no hole a compaction could have filled.
#
# Scenarios:
#  two-snap   64 KiB clusters, 64 MiB disk, snapshots s1 and s2;
#  four-snap  8 KiB clusters (an L2 table maps 8 MiB), 64 MiB disk with 8 L2
#             tables; 4 snapshots with writes between that touch only some
#             of them, so several L2 tables are shared by all the snapshots
#             and the active layer (refcount 5), and the discards go
#             through shared L2 tables (copied on write first).
# Fails before issue 7: clusters shared with a snapshot are pinned, so the
# holes below them stay (free_below_end > 0; qcowctl compact names "shared
# with a snapshot").
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate sha256sum

LAYOUT="$PYTHON $TESTDIR/qcow2_layout.py"
# layout_field JSONFILE KEY
layout_field() {
	$PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}
MNT=$T/view.raw
SIZE_FAILURES=()

# snap_sha IMAGE NAME: sha256 of the snapshot's disk (NAME "" = active).
# (-t unsafe: the raw copy is read once and deleted, it needs no fsync,
# which on a busy disk took most of the test's time)
snap_sha() {
	local out=$T/snap.raw snap=()
	rm -f "$out"
	[ -z "$2" ] || snap=(-l "snapshot.name=$2")
	qemu-img convert -U -t unsafe -f qcow2 "${snap[@]}" -O raw "$1" "$out" >>"$T/qemu.log" 2>&1 ||
		fail "qemu-img convert ${snap[*]} -O raw of $1 failed: $(tail -n 3 "$T/qemu.log")"
	sha "$out"
	rm -f "$out"
}

# zeroed_sha RAW OFF:LEN...: sha256 of RAW with the ranges zeroed (a copy)
zeroed_sha() {
	local raw=$1
	shift
	$PYTHON - "$raw" "$@" <<'EOF'
import hashlib, sys
raw, ranges = sys.argv[1], [tuple(int(x) for x in r.split(":")) for r in sys.argv[2:]]
data = bytearray(open(raw, "rb").read())
for off, ln in ranges:
    data[off:off + ln] = bytes(ln)
print(hashlib.sha256(data).hexdigest())
EOF
}

# settle MNT: as t100: the file size polled until it stays put with nothing
# compacting, erasing or waiting for a flush (at most 20 s), then one
# qcowctl compact, which waits for its pass.
settle() {
	local prev=-1 i s
	for i in $(seq 1 40); do
		sleep 0.5
		s=$(file_size "$IMG")
		if [ "$s" = "$prev" ] &&
			case $(status_field "$1" compacting) in 0 | false) true ;; *) false ;; esac &&
			[ "$(status_field "$1" clusters_junk)" = 0 ] &&
			[ "$(status_field "$1" clusters_erased)" = 0 ]; then
			break
		fi
		prev=$s
	done
	AUTO=$(file_size "$IMG")
	timeout 60 "$QCOWCTL" compact "$1" >"$T/compact.out" 2>&1 ||
		fail "$NAME: qcowctl compact failed: $(cat "$T/compact.out")"
}

# scenario NAME SNAPSHOTS CREATE_OPTS SIZE DISCARDS -- PHASE0 -- PHASE1 ...
# Each PHASE is a list of qemu-io commands; a snapshot sN is taken after
# phase N-1 (so SNAPSHOTS+1 phases).  DISCARDS: "OFF:LEN ..." in MiB.
scenario() {
	NAME=$1
	local nsnap=$2 opts=$3 size=$4 discards=$5 i phase=0 cmds=() d off len
	local ranges=() args=() want_active got r
	shift 5
	IMG=$T/$NAME.qcow2
	rm -f "$IMG"
	mkimg "$IMG" "$size" "$opts"
	[ "$1" = -- ] || fail "scenario $NAME: expected -- before phase 0"
	shift
	while :; do
		if [ $# = 0 ] || [ "$1" = -- ]; then
			[ ${#cmds[@]} = 0 ] || qio "$IMG" "${cmds[@]}"
			cmds=()
			[ $# = 0 ] && break
			shift
			phase=$((phase + 1))
			qemu-img snapshot -c "s$phase" "$IMG" >>"$T/qemu.log" 2>&1 ||
				fail "qemu-img snapshot -c s$phase failed: $(tail -n 3 "$T/qemu.log")"
			continue
		fi
		cmds+=("$1")
		shift
	done
	[ "$phase" = "$nsnap" ] || fail "scenario $NAME: $phase snapshots made, $nsnap expected"
	qcheck "$IMG"

	# the record: every snapshot, the active disk, and what the active
	# disk must read after the discards
	for ((i = 1; i <= nsnap; i++)); do
		snap_sha "$IMG" "s$i" >"$T/$NAME.s$i.sha"
	done
	qemu-img convert -U -t unsafe -f qcow2 -O raw "$IMG" "$T/active.raw" >>"$T/qemu.log" 2>&1 ||
		fail "qemu-img convert -O raw of $IMG failed: $(tail -n 3 "$T/qemu.log")"
	for d in $discards; do
		off=$((${d%%:*} << 20)) len=$((${d#*:} << 20))
		ranges+=("$off:$len")
		args+=("discard $off $len")
	done
	want_active=$(zeroed_sha "$T/active.raw" "${ranges[@]}")
	rm -f "$T/active.raw"

	# the premise, on a copy discarded by QEMU
	cp "$IMG" "$T/premise.qcow2"
	qio "$T/premise.qcow2" "${args[@]}"
	$LAYOUT "$T/premise.qcow2" >"$T/$NAME.premise.json"
	log "$NAME: before: $($LAYOUT "$IMG")"
	log "$NAME: premise (QEMU discarded a copy): $(cat "$T/$NAME.premise.json")"
	if [ "$(layout_field "$T/$NAME.premise.json" free_below_end)" = 0 ] ||
		[ "$(layout_field "$T/$NAME.premise.json" shared_above_free)" = 0 ]; then
		fail "$NAME: setup: after QEMU's discards no shared cluster lies above a free one: $(cat "$T/$NAME.premise.json")"
	fi
	[ "$(snap_sha "$T/premise.qcow2" "")" = "$want_active" ] ||
		fail "$NAME: setup: QEMU's discards on the copy do not give the expected active disk"
	rm -f "$T/premise.qcow2"
	if [ "$nsnap" -ge 4 ]; then
		$LAYOUT "$IMG" >"$T/$NAME.before.json"
		[ "$(layout_field "$T/$NAME.before.json" l2_shared)" -ge 3 ] ||
			fail "$NAME: setup: fewer than 3 L2 tables shared with snapshots: $(cat "$T/$NAME.before.json")"
	fi

	# ---- qcowfs: discard, settle, compact --------------------------------
	local before
	before=$(file_size "$IMG")
	qmount "$IMG" "$MNT"
	for r in "${ranges[@]}"; do
		fallocate -p -o "${r%%:*}" -l "${r#*:}" "$MNT" || fail "$NAME: fallocate -p $r on the view failed"
	done
	settle "$MNT"
	log "$NAME: qcowctl compact: $(tr '\n' ' ' <"$T/compact.out")"
	"$QCOWCTL" status --raw "$MNT" >"$T/$NAME.status.log" 2>&1 || true
	got=$(dd if="$MNT" bs=4M status=none | sha256sum | cut -d' ' -f1)
	[ "$got" = "$want_active" ] || fail "$NAME: the view does not read the active disk with the discarded ranges zero"
	qumount "$MNT"

	# ---- the verdict ---------------------------------------------------------
	qcheck "$IMG"
	for ((i = 1; i <= nsnap; i++)); do
		[ "$(snap_sha "$IMG" "s$i")" = "$(cat "$T/$NAME.s$i.sha")" ] ||
			fail "$NAME: snapshot s$i does not read as before"
	done
	[ "$(snap_sha "$IMG" "")" = "$want_active" ] ||
		fail "$NAME: qemu-img reads the active disk differently from what the view showed"
	$LAYOUT "$IMG" >"$T/$NAME.after.json"
	log "$NAME: image file $((before >> 10)) KiB before, $((AUTO >> 10)) KiB settled, $(($(file_size "$IMG") >> 10)) KiB after qcowctl compact; after: $(cat "$T/$NAME.after.json")"
	# (a size failure is collected, so that every scenario runs)
	[ "$(layout_field "$T/$NAME.after.json" free_below_end)" = 0 ] ||
		SIZE_FAILURES+=("$NAME: $(layout_field "$T/$NAME.after.json" free_below_end) free clusters lie below the end of the file after compaction (first: $(layout_field "$T/$NAME.after.json" free_first); $(layout_field "$T/$NAME.after.json" shared_above_free) shared clusters above the first); file $(file_size "$IMG") bytes. qcowctl compact said: $(tr '\n' ' ' <"$T/compact.out")")
	log "$NAME: done"
}

# two-snap: holes in the middle of the file from the scratch range
# (56M..64M), written first in phase 1 and discarded at its end, below
# phase 1's other writes (shared with s2); phase 2's writes fill them.
# Discards: phase 2's 0..2M (active-only, in the hole) with 2M..4M (s1, s2
# and active), the shared 8M..16M (s2 and active) and 32M..48M (s1, s2
# and active), 56M..64M (phase 2's, in the hole).
scenario two-snap 2 "" 64M "0:4 8:8 32:16 56:8" \
	-- 'write -P 0x11 0 24M' 'write -P 0x12 32M 16M' \
	-- 'write -P 0x0f 56M 8M' 'write -P 0x21 8M 8M' 'write -P 0x22 50M 6M' 'discard 56M 8M' \
	-- 'write -P 0x31 0 2M' 'write -P 0x32 58M 4M' 'write -P 0x33 25M 4k' 'write -P 0x34 37M 12k'

# four-snap: 8 KiB clusters, so an L2 table maps 8 MiB: the 64 MiB disk has
# 8 of them, all made in phase 0.  Later phases touch tables 6 (48M, the
# scratch, written first in phase 1 and discarded at its end), 0, 1, 2 and
# 3 (copies on write); tables 4, 5 and 7 stay shared by s1..s4 and the
# active layer (refcount 5).  Phase 4 fills the scratch's hole.  Discards
# go into table 3 (phase 4's active-only data, in the hole), 4 and 7
# (shared tables: copied on write by the discard) and 0 (partly shared).
scenario four-snap 4 cluster_size=8192 64M "24:2 32:1 56:1 0:1" \
	-- 'write -P 0x40 0 1536k' 'write -P 0x41 8M 1536k' 'write -P 0x42 16M 1536k' 'write -P 0x43 24M 1536k' \
	   'write -P 0x44 32M 1536k' 'write -P 0x45 40M 1536k' 'write -P 0x46 48M 1536k' 'write -P 0x47 56M 1536k' \
	-- 'write -P 0x0f 49M 1536k' 'write -P 0x51 0 512k' 'discard 49M 1536k' \
	-- 'write -P 0x52 8M 512k' \
	-- 'write -P 0x53 16M 256k' 'write -P 0x54 512k 16k' \
	-- 'write -P 0x61 24M 1536k' 'write -P 0x62 1M 8k'

if [ ${#SIZE_FAILURES[@]} != 0 ]; then
	fail "$(printf '%s\n' "${SIZE_FAILURES[@]}")"
fi
log "ok"
