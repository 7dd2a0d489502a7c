#!/bin/bash
# t050-crash: kill -9 the daemon in the middle of a write workload that
# fsyncs now and then.  Afterwards qemu-img check finds no corruption
# (leaks allowed), every sector whose write was fsynced before the kill
# reads back exactly (through qemu-img convert, and through a new mount),
# no sector holds anything but one of the versions written to it, and the
# next rw mount + unmount leaves the image clean.  Several rounds on the
# same image (each round starts from what the last one left), with
# different kill timings, on 64 KiB and 4 KiB cluster images.  Then crashes
# while the disk grows: every fsynced size and the data at its end survive.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need cmp

MNT=$T/view.raw

write_crash_tools

round=0
# crash_round IMAGE DELAY: one mount, workload, kill -9, checks.
crash_round() {
	local img=$1 delay=$2 size half pids=() p out
	round=$((round + 1))
	size=$(qinfo_field "$img" virtual-size)
	half=$((size / 512 / 2))
	qmount "$img" "$MNT"
	# two writers on the two halves of the disk
	for p in 0 1; do
		bg_start $PYTHON "$T/workload.py" "$MNT" "$T/j$round.$p" $((round * 100 + p)) \
			$(((round * 2 + p) * 10000000)) $((p * half)) $(((p + 1) * half))
		pids+=("$BG_PID")
	done
	# the kill lands DELAY seconds into the writing; on a loaded machine
	# the writers may need longer than DELAY just to start
	wait_until 30 grep -q '^W' "$T/j$round.0"
	sleep "$delay"
	for p in "${pids[@]}"; do
		kill -0 "$p" 2>/dev/null || fail "round $round: the workload ended before the kill: $(tail -n 2 "$T"/j$round.*)"
	done
	qkill "$MNT"
	for p in "${pids[@]}"; do
		wait "$p" || true
		_forget _PIDS "$p"
	done
	grep -q '^W' "$T/j$round.0" || fail "round $round: the workload wrote nothing"
	qcheck_nocorrupt "$img"
	raw_of "$img" "$T/after.raw"
	out=$($PYTHON "$T/verify.py" "$T/after.raw" "$BASELINE" "$T/j$round".*) ||
		fail "round $round (kill after ${delay}s): data lost or garbled after the crash:
$out"
	log "round $round, kill after ${delay}s: $out"
	# the next rw open repairs whatever the crash leaked
	qmount "$img" "$MNT"
	same_file "$MNT" "$T/after.raw" "round $round: view after the crash vs qemu-img convert"
	qumount "$MNT"
	qcheck "$img"
	mv "$T/after.raw" "$T/baseline.raw"
	BASELINE=$T/baseline.raw
}

img=$T/crash64k.qcow2
mkimg "$img" 256M
BASELINE=-
for delay in 0.3 1 2.5 0.2 4; do
	crash_round "$img" "$delay"
done

img=$T/crash4k.qcow2
mkimg "$img" 128M cluster_size=4096
BASELINE=-
for delay in 0.5 2 1.2; do
	crash_round "$img" "$delay"
done

img=$T/crash-v2.qcow2
mkimg "$img" 128M compat=0.10
BASELINE=-
for delay in 1.5 0.7; do
	crash_round "$img" "$delay"
done

[ $round = 10 ] || fail "only $round of 10 rounds ran"

# ---- crash while the disk grows ---------------------------------------------
# One writer grows the view by truncate in steps (512 B clusters: the L1
# table outgrows its clusters and moves again and again), writes a marker
# at the new end and fsyncs; kill -9 at some point.  Every fsynced size and
# marker must survive.
cat >"$T/grow.py" <<'EOF'
import os, struct, sys
view, journal = sys.argv[1], sys.argv[2]
fd = os.open(view, os.O_RDWR)
j = open(journal, "w", buffering=1)
size = os.fstat(fd).st_size
try:
    while True:
        size += 3 << 20
        os.ftruncate(fd, size)
        os.pwrite(fd, struct.pack(">QQ", size, 0x51C0F5) * 32, size - 512)
        os.fsync(fd)
        j.write("%d\n" % size)
except OSError as e:
    j.write("stopped %s\n" % e)
EOF
img=$T/grow.qcow2
mkimg "$img" 8M cluster_size=512
for delay in 0.5 1.5 3; do
	round=$((round + 1))
	qmount "$img" "$MNT"
	bg_start $PYTHON "$T/grow.py" "$MNT" "$T/grow$round.j"
	gpid=$BG_PID
	sleep "$delay"
	kill -0 "$gpid" 2>/dev/null || fail "grow round: the writer ended before the kill: $(tail -n 2 "$T/grow$round.j")"
	qkill "$MNT"
	wait "$gpid" || true
	_forget _PIDS "$gpid"
	qcheck_nocorrupt "$img"
	last=$(grep -E '^[0-9]+$' "$T/grow$round.j" | tail -n 1)
	[ -n "$last" ] || fail "grow round: nothing was fsynced in ${delay}s"
	vs=$(qinfo_field "$img" virtual-size)
	[ "$vs" -ge "$last" ] || fail "grow round: virtual size $vs after the crash, but $last was fsynced"
	raw_of "$img" "$T/grow.raw"
	out=$($PYTHON - "$T/grow.raw" "$T/grow$round.j" <<'EOF'
import struct, sys
raw = open(sys.argv[1], "rb")
bad = 0
n = 0
for line in open(sys.argv[2]):
    if not line.strip().isdigit():
        continue
    size = int(line)
    raw.seek(size - 512)
    if raw.read(512) != struct.pack(">QQ", size, 0x51C0F5) * 32:
        bad += 1
        if bad < 5:
            print("marker of the fsynced size %d is missing" % size)
    n += 1
print("%d fsynced grows checked, %d bad" % (n, bad))
sys.exit(1 if bad else 0)
EOF
) || fail "grow round (kill after ${delay}s): $out"
	qmount "$img" "$MNT"
	same_file "$MNT" "$T/grow.raw" "grow round: view after the crash vs qemu-img convert"
	qumount "$MNT"
	qcheck "$img"
	rm -f "$T/grow.raw"
	log "grow round, kill after ${delay}s: virtual size $((vs >> 20)) MiB; $out"
done
[ $round = 13 ] || fail "only $round of 13 rounds ran"
log "ok"
