#!/bin/bash
# t210-disk-full-compact: the host disk fills up while the recycler wants
# to compact (issue 6, item 9, the engine's side).  An image on a 64 MiB
# tmpfs, 40 MiB written through the view, the first 30 MiB punched, the
# file system filled up: every compaction pass fails with ENOSPC (the
# moves copy into punched clusters).  Over 10 s the daemon (qcowfs -f,
# stderr to a log) must back off: compactions_done stays 0 (it counted the
# failures: 8 081 in 10 s), at most 2 log lines about the compaction, under
# 2 % of a CPU.  When the filler is removed, the next automatic pass works
# within 20 s, the file shrinks, and the daemon then exits 0 after
# fusermount3 -u with no "failed" in its log after the recovery;
# qemu-img check is clean and the data intact.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_root
need getconf tail

SMALL=$T/small
mkdir -p "$SMALL"
mount -t tmpfs -o size=64M tmpfs "$SMALL" || fail "cannot mount a small tmpfs"
_FSMOUNTS+=("$SMALL")
IMG=$SMALL/full.qcow2
MNT=$T/view.raw
LOG=$T/daemon.log
mkimg "$IMG" 256M
touch "$MNT"
bg_start "$QCOWFS" -f "$IMG" "$MNT" -o compact_quiet_ms=2000 >>"$T/qcowfs.log" 2>&1
DPID=$BG_PID
_MOUNTS+=("$MNT")
_DAEMON[$MNT]=$DPID
wait_until 30 is_mounted "$MNT" || fail "qcowfs -f did not mount within 30 s"
head -c $((40 << 20)) /dev/urandom >"$T/data"
dd if="$T/data" of="$MNT" bs=1M conv=notrunc,fsync status=none || fail "writing 40 MiB into the view failed"
fallocate -p -o 0 -l $((30 << 20)) "$MNT" || fail "fallocate -p failed"
# wait until the eraser gave the space back, then fill the file system
wait_until 10 eval '[ $(($(file_blocks "$IMG") / 2048)) -lt 20 ]' ||
	fail "the punched clusters were not given back: $(($(file_blocks "$IMG") / 2048)) MiB allocated"
dd if=/dev/zero of="$SMALL/filler" bs=64k status=none 2>/dev/null || true
size_full=$(file_size "$IMG")
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
c0=$(cpu_ticks "$DPID")
t0=$(date +%s%N)
sleep 12
c1=$(cpu_ticks "$DPID")
wall_ms=$((($(date +%s%N) - t0) / 1000000))
done_n=$(status_field "$MNT" compactions_done)
moved=$(status_field "$MNT" clusters_moved)
lines=$(grep -c 'compaction failed' "$T/qcowfs.log" 2>/dev/null || true)
pct=$((((c1 - c0) * 1000 * 10000 / $(getconf CLK_TCK)) / wall_ms))
log "disk full for 12 s: compactions_done $done_n, clusters moved $moved, $lines log lines about the compaction, CPU $((pct / 100)).$((pct % 100 / 10)) %"
[ "$done_n" = 0 ] || fail "compactions_done is $done_n while every pass fails on a full disk"
[ "$lines" -ge 1 ] || fail "setup: no compaction failed (log: $(tail -n 5 "$T/qcowfs.log"))"
[ "$lines" -le 2 ] || fail "$lines log lines about failed compactions in 12 s"
[ "$pct" -lt 200 ] || fail "the daemon used $((pct / 100)) % of a CPU while backing off"

rm -f "$SMALL/filler"
mark=$(wc -l <"$T/qcowfs.log")
wait_until 40 eval '[ "$(status_field "$MNT" compactions_done)" -ge 1 ]' ||
	fail "no compaction pass worked within 40 s after the disk got room"
size_after=$(file_size "$IMG")
log "room again: compactions_done $(status_field "$MNT" compactions_done), file $size_full -> $size_after bytes"
[ "$size_after" -lt $((size_full - (20 << 20))) ] || fail "the file did not shrink: $size_full -> $size_after bytes"
cmp -n $((10 << 20)) <(tail -c $((10 << 20)) "$T/data") <(dd if="$MNT" bs=1M skip=30 count=10 status=none) ||
	fail "the data moved by the compaction reads back wrong"
fusermount3 -u "$MNT"
rc=0
timeout 60 tail --pid="$DPID" -f /dev/null || true
wait "$DPID" || rc=$?
_forget _PIDS "$DPID"
_forget _MOUNTS "$MNT"
tail -n +$((mark + 1)) "$T/qcowfs.log" >"$T/after.log"
[ $rc = 0 ] || fail "qcowfs -f exited $rc after the fault cleared: $(tail -n 5 "$T/after.log")"
! grep -i 'failed' "$T/after.log" || fail "the daemon reported a failure after the fault cleared"
qcheck "$IMG"
log "ok"
