#!/bin/bash
# t110-fio-compact: guest I/O keeps its integrity while compaction runs
# again and again (issue 3).  fio with verify=crc32c through a loop device
# over the view: several jobs of random writes on their own regions, a job
# that trims and rewrites blocks (randtrimwrite), both verified, and a job
# that only trims in another region, while
# compaction is triggered over and over (qcowctl compact in a loop, and a
# low automatic threshold).  No verify error, compaction really moved
# clusters, every qcowctl compact succeeded, qemu-img check clean after
# unmount.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need fio

# storm QEMU_IMG_OPTS: one image kind through the whole storm
storm() {
IMG=$T/fio.qcow2
MNT=$T/view.raw
rm -f "$IMG" "$T/stop" "$T/compact-fail.log" "$T/compact-count"
mkimg "$IMG" 1G "$1"
qmount "$IMG" "$MNT" -o compact_threshold=1M,compact_quiet_ms=100
loop_attach "$MNT"
DEV=$LOOPDEV

# pre-fill the high end (known data, checked at the end) so compaction
# always has clusters to move down
head -c $((256 << 20)) /dev/urandom >"$T/high"
dd if="$T/high" of="$DEV" bs=1M seek=768 oflag=direct status=none

# Jobs on separate regions: verified random writes (4 x 96 MiB), trim-then-
# write with verify (fio's randtrimwrite), and a pure trimmer over data
# written beforehand.
cat >"$T/job.fio" <<EOF
[global]
filename=$DEV
ioengine=psync
direct=1
randrepeat=0

[writer]
rw=randwrite
bsrange=4k-128k
size=96m
numjobs=4
offset=0
offset_increment=96m
verify=crc32c
verify_fatal=1
do_verify=1
verify_backlog=256
loops=4

[trimwriter]
rw=randtrimwrite
bs=64k
offset=384m
size=128m
verify=crc32c
verify_fatal=1
do_verify=1
loops=5

[trimmer]
rw=randtrim
bsrange=64k-1m
offset=512m
size=256m
loops=4
EOF
# the trimmer's region gets data first so its trims free clusters
dd if=/dev/urandom of="$DEV" bs=1M seek=512 count=256 oflag=direct status=none

# compaction again and again
cat >"$T/compact-loop.sh" <<EOF
n=0
while [ ! -e "$T/stop" ]; do
	n=\$((n + 1))
	if ! timeout 120 "$QCOWCTL" compact "$MNT" >>"$T/compact.log" 2>&1; then
		echo "qcowctl compact #\$n failed" >>"$T/compact-fail.log"
	fi
	sleep 0.1
done
echo "\$n" >"$T/compact-count"
EOF
bg_start bash "$T/compact-loop.sh"
cpid=$BG_PID

rc=0
# fio saves verify state files in its working directory: keep them in $T
(cd "$T" && timeout 600 fio --output="$T/fio.log" "$T/job.fio" 2>"$T/fio.err") || rc=$?
touch "$T/stop"
wait "$cpid" || true
_forget _PIDS "$cpid"
grep -iE 'verify|bad|error|crc' "$T/fio.log" | grep -viE 'err= 0|verify_|^ *lat' | head -n 20 >"$T/fio-errors" || true
[ $rc = 0 ] || fail "fio exited $rc: $(cat "$T/fio-errors") $(tail -n 20 "$T/fio.log") $(cat "$T/fio.err")"
if grep -qiE 'signal|assert|verify|bad|error' "$T/fio.err"; then
	fail "fio: $(head -n 20 "$T/fio.err")"
fi
[ "$(grep -c 'err= 0' "$T/fio.log")" = 6 ] || fail "not all 6 fio jobs ended with err= 0: $(grep 'err=' "$T/fio.log")"
grep -q 'err= 0' "$T/fio.log" || fail "fio reports errors: $(cat "$T/fio-errors")"
if grep -E 'err=[ ]*[1-9]' "$T/fio.log" >/dev/null; then
	fail "fio job errors: $(grep -E 'err=[ ]*[1-9]' "$T/fio.log")"
fi
[ ! -s "$T/compact-fail.log" ] || fail "qcowctl compact failed during fio: $(cat "$T/compact-fail.log") $(tail -n 5 "$T/compact.log")"
moved=$(status_field "$MNT" clusters_moved)
done_=$(status_field "$MNT" compactions_done)
log "${1:-default image}: fio done; $(cat "$T/compact-count") qcowctl compact runs; compactions_done=$done_ clusters_moved=$moved"
[ "$done_" -ge 3 ] || fail "only $done_ compactions ran during fio"
[ "$moved" -gt 0 ] || fail "compaction never moved a cluster during fio: the test did not test anything"

# data nobody touched during the storm is intact
cmp <(dd if="$DEV" bs=1M skip=768 iflag=direct status=none) "$T/high" ||
	fail "the pre-filled region [768M, 1G) changed while compaction ran"
loop_detach "$DEV"
qumount "$MNT"
qcheck "$IMG"
}

storm ""
storm cluster_size=4096
log "ok"
