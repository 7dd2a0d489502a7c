#!/bin/bash
# t120-kill-compact: kill -9 the daemon while it compacts (issue 3).
# Fill, discard a lot (everything fsynced), start a compaction, kill -9 the
# daemon at several moments of it.  Each time: qemu-img check finds no
# corruption, the data (as qemu-img convert reads it, and through a new
# mount) equals the shadow exactly, and the next rounds go on from there.
# Then the same with a guest writer running during the compaction: every
# fsynced write survives, nothing else changed.
# At the end a full compaction completes, the file is within 10 % of what
# qemu-img convert -O qcow2 makes of it, and qemu-img check is clean.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate dd

IMG=$T/kc.qcow2
MNT=$T/view.raw
SH=$T/shadow.raw
mkimg "$IMG" 512M
truncate -s 512M "$SH"

SLOT=$((64 << 20))
qmount "$IMG" "$MNT" -o compact=off
# slots 0..5 of 64 MiB hold data; each round writes a fresh slot (it
# lands at the end of the file) and discards the oldest, so every
# compaction has about 64 MiB to move down
head -c $((6 * SLOT)) /dev/urandom >"$T/fill"
dd if="$T/fill" of="$MNT" bs=1M conv=notrunc,fsync status=none
dd if="$T/fill" of="$SH" bs=1M conv=notrunc status=none
rm -f "$T/fill"

# fresh_slot N: random data into slot N of the view and the shadow, fsynced
fresh_slot() {
	head -c $SLOT /dev/urandom >"$T/slot"
	dd if="$T/slot" of="$MNT" bs=1M seek=$(($1 * 64)) conv=notrunc,fsync status=none
	dd if="$T/slot" of="$SH" bs=1M seek=$(($1 * 64)) conv=notrunc status=none
	rm -f "$T/slot"
}
# drop_slot N: discard slot N (in 1 MiB pieces, every other one first, so
# the holes are scattered) in the view and the shadow, fsynced
drop_slot() {
	$PYTHON - "$MNT" "$SH" "$1" <<'EOF' || fail "punching holes failed"
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x01 | 0x02      # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
base = int(sys.argv[3]) * 64
order = list(range(0, 64, 2)) + list(range(1, 64, 2))
for path in sys.argv[1:3]:
    fd = os.open(path, os.O_RDWR)
    for i in order:
        if libc.fallocate(fd, PUNCH, (base + i) << 20, 1 << 20) != 0:
            sys.exit("fallocate punch %s at %d MiB: %s" % (path, base + i, os.strerror(ctypes.get_errno())))
    os.fsync(fd)
    os.close(fd)
EOF
}

# The killer watches the status attribute from one process (no fork per
# look) and sends SIGKILL the moment the running compaction reaches the
# wanted progress.
cat >"$T/killer.py" <<'EOF'
import os, signal, sys, time
import qcowfs_ctl
mnt, pid, want = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen = False
end = time.time() + 30
while time.time() < end:
    try:
        kv = qcowfs_ctl.status(mnt)
    except OSError as e:
        print("status unreadable: %s" % e)
        sys.exit(0)
    running = kv.get("compacting", "0").strip() in ("1", "true")
    if running:
        seen = True
        if float(kv.get("compact_progress", "0")) >= want:
            os.kill(pid, signal.SIGKILL)
            print("hit progress=%s moved=%s moves_in_flight=%s copies=%s pending=%s" % (
                kv.get("compact_progress", "?").strip(), kv.get("clusters_moved", "?").strip(),
                kv.get("moves_in_flight", "?").strip(), kv.get("clusters_copies", "?").strip(),
                kv.get("clusters_pending", "?").strip()))
            sys.exit(0)
    elif seen:
        print("miss: the compaction ended first")
        sys.exit(0)
print("miss: no compaction seen")
EOF

# stop_killer PID: once qcowctl compact returned, the compaction is over
# (or the daemon dead): give the watcher a moment to see it, then end it
stop_killer() {
	local i
	for i in 1 2 3 4 5 6 7 8 9 10; do
		kill -0 "$1" 2>/dev/null || break
		sleep 0.1
	done
	kill "$1" 2>/dev/null && echo "miss: compaction over before the watcher saw it" >>"$T/killer.out"
	wait "$1" 2>/dev/null || true
	_forget _PIDS "$1"
}

round=0
hits=0
for want in 0 0.1 0.3 0.5 0.7 0.9; do
	round=$((round + 1))
	fresh_slot $(((5 + round) % 8))
	drop_slot $(((round - 1) % 8))
	pid=${_DAEMON[$MNT]}
	PYTHONPATH=$TESTDIR $PYTHON "$T/killer.py" "$MNT" "$pid" "$want" >"$T/killer.out" 2>&1 &
	kpid=$!
	_PIDS+=("$kpid")
	"$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || true
	stop_killer "$kpid"
	grep -q '^hit' "$T/killer.out" && hits=$((hits + 1))
	qkill "$MNT"
	qcheck_nocorrupt "$IMG"
	raw_of "$IMG" "$T/after.raw"
	same_file "$T/after.raw" "$SH" "round $round (kill at compaction progress $want: $(cat "$T/killer.out")): qemu-img convert vs shadow"
	rm -f "$T/after.raw"
	qmount "$IMG" "$MNT" -o compact=off
	same_file "$MNT" "$SH" "round $round: remounted view vs shadow"
	log "round $round: kill at progress $want: $(cat "$T/killer.out"); image $(($(file_size "$IMG") >> 20)) MiB, data intact"
done
[ $hits -ge 3 ] || fail "only $hits of $round kills landed while compaction was running: the test did not test much"

# ---- the same with a guest writer running during the compaction -----------
# Writes (fsynced now and then) land on clusters being moved; after the
# kill every fsynced sector must be there and nothing else may have moved.
write_crash_tools
hits=0
for want in 0 0.2 0.5 0.8; do
	round=$((round + 1))
	fresh_slot $(((5 + round) % 8))
	drop_slot $(((round - 1) % 8))
	pid=${_DAEMON[$MNT]}
	bg_start $PYTHON "$T/workload.py" "$MNT" "$T/w$round.j" "$round" $((round * 10000000)) 0 $(((512 << 20) / 512))
	wpid=$BG_PID
	sleep 0.2
	PYTHONPATH=$TESTDIR $PYTHON "$T/killer.py" "$MNT" "$pid" "$want" >"$T/killer.out" 2>&1 &
	kpid=$!
	_PIDS+=("$kpid")
	"$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || true
	stop_killer "$kpid"
	grep -q '^hit' "$T/killer.out" && hits=$((hits + 1))
	qkill "$MNT"
	wrc=0
	wait "$wpid" || wrc=$?
	_forget _PIDS "$wpid"
	# the writer must have run until the crash stopped it (an error, or a
	# short write: part of a request got through before the kill)
	tail -n 1 "$T/w$round.j" | grep -qE '^(stopped|short)' ||
		fail "round $round: the writer (exit $wrc) did not run until the crash: $(tail -n 2 "$T/w$round.j")"
	qcheck_nocorrupt "$IMG"
	raw_of "$IMG" "$T/after.raw"
	out=$($PYTHON "$T/verify.py" "$T/after.raw" "$SH" "$T/w$round.j") ||
		fail "round $round (writer + kill at compaction progress $want: $(cat "$T/killer.out")): data lost or garbled:
$out"
	mv "$T/after.raw" "$SH"
	qmount "$IMG" "$MNT" -o compact=off
	same_file "$MNT" "$SH" "round $round: remounted view vs what qemu-img convert read after the crash"
	log "round $round (with a writer): kill at progress $want: $(cat "$T/killer.out"); $out"
done
[ $hits -ge 2 ] || fail "only $hits of 4 kills with a writer landed while compaction was running"

# a compaction that is allowed to finish
timeout 300 "$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(tail -n 5 "$T/compact.log")"
same_file "$MNT" "$SH" "view vs shadow after a full compaction"
qumount "$MNT"
qcheck "$IMG"
qcompare "$IMG" "$SH" "image after the rounds of killed compactions"
now=$(file_size "$IMG")
qemu-img convert -f qcow2 -O qcow2 "$IMG" "$T/ref.qcow2" || fail "qemu-img convert -O qcow2 failed"
ref=$(file_size "$T/ref.qcow2")
log "image file: $((now >> 20)) MiB after a full compaction; qemu-img convert -O qcow2 makes $((ref >> 20)) MiB"
[ "$now" -le $((ref + ref / 10)) ] ||
	fail "after a full compaction the image file is $now bytes, more than 10 % above qemu-img convert's $ref"
log "ok"
