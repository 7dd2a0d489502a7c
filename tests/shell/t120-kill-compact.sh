#!/bin/bash
# t120-kill-compact: kill -9 the daemon while it compacts (issue 3).
# Fill, discard a lot (everything fsynced), start a compaction, kill -9 the
# daemon at several moments of it.  Each time: qemu-img check finds no
# corruption, the data (as qemu-img convert reads it, and through a new
# mount) equals the shadow exactly, and the next rounds go on from there.
# At the end a full compaction completes, the file shrank, and qemu-img
# check is clean.
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
full=$(file_size "$IMG")

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
mnt, pid, want = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen = False
end = time.time() + 30
while time.time() < end:
    try:
        kv = dict(l.split("=", 1) for l in os.getxattr(mnt, "user.qcowfs.status").decode().splitlines() if "=" in l)
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

round=0
hits=0
for want in 0 0.1 0.3 0.5 0.7 0.9; do
	round=$((round + 1))
	fresh_slot $(((5 + round) % 8))
	drop_slot $(((round - 1) % 8))
	pid=${_DAEMON[$MNT]}
	$PYTHON "$T/killer.py" "$MNT" "$pid" "$want" >"$T/killer.out" 2>&1 &
	kpid=$!
	_PIDS+=("$kpid")
	"$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || true
	wait "$kpid" || true
	_forget _PIDS "$kpid"
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

# a compaction that is allowed to finish
timeout 300 "$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact failed: $(tail -n 5 "$T/compact.log")"
same_file "$MNT" "$SH" "view vs shadow after a full compaction"
qumount "$MNT"
qcheck "$IMG"
qcompare "$IMG" "$SH" "image after the rounds of killed compactions"
now=$(file_size "$IMG")
log "image file: $((full >> 20)) MiB full, $((now >> 20)) MiB at the end"
[ "$now" -le $((full + full / 10)) ] || fail "the image grew: $full bytes with 6 slots of data, $now after a full compaction with the same amount"
log "ok"
