#!/bin/bash
# t360-status-ui: what qcowctl shows of a live mount and how it treats a
# mount a user trips over (issue 9).
#  1. status --prometheus: the Prometheus text exposition format, checked
#     by prom_check.py (HELP/TYPE lines, names, label escaping, one sample
#     per line; its own self-test first, so the checker can fail), with
#     qcowfs_* names, counters in _total, and an image label that carries
#     a path with a double quote, a backslash and a space, escaped.
#  2. status --watch under timeout -s INT: at least two refreshes, exit 0
#     (in a file plain blocks; on a terminal redrawn in place, the cursor
#     restored);
#     while a compaction runs a progress line (moved / planned, rate,
#     estimated end); when the mount goes away, exit 0 with a line saying so.
#  3. unmount after kill -9 of the daemon: qcowctl unmount detaches the dead
#     mount itself, checks the image and exits 0.
#  4. compact / sparsify / snapshot of a mounted image file: the message
#     names the mountpoint, not the engine's "stop it before mounting"; of
#     an image mounted read-only, that it must be unmounted first.
# Fails before issue 9: --watch and --prometheus did not exist, unmount of
# a dead mount told the user to run fusermount3, compact said only "in use".
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate dd script

PROM=$TESTDIR/prom_check.py
$PYTHON "$PROM" --self-test >"$T/prom-self.log" 2>&1 ||
	fail "prom_check.py self-test failed: $(cat "$T/prom-self.log")"

# ---- 1. --prometheus ------------------------------------------------------
# a path with the three characters a label value must escape or keep
DIR=$T/'odd "dir\ x'
mkdir -p "$DIR"
IMG=$DIR/p.qcow2
MNT=$T/p.raw
mkimg "$IMG" 64M
qmount "$IMG" "$MNT"
dd if=/dev/urandom of="$MNT" bs=1M count=4 conv=notrunc,fsync status=none
"$QCOWCTL" status --prometheus "$MNT" >"$T/metrics.prom" 2>"$T/prom.err" ||
	fail "status --prometheus exited non-zero: $(cat "$T/prom.err")"
$PYTHON "$PROM" "$T/metrics.prom" --prefix qcowfs_ --label "image=$IMG" --counters-total >"$T/prom.log" 2>&1 ||
	fail "status --prometheus output is not valid: $(cat "$T/prom.log")"
grep -qF 'odd \"dir\\ x' "$T/metrics.prom" ||
	fail "the image label is not escaped as the format wants: $(grep -m1 image= "$T/metrics.prom")"
for m in qcowfs_file_size_bytes qcowfs_clusters_moved_total qcowfs_compacting; do
	grep -q "^# TYPE $m " "$T/metrics.prom" || fail "status --prometheus has no family $m"
done
size=$(stat -c %s "$IMG")
grep -qx "qcowfs_file_size_bytes{image=\".*\"} $size" "$T/metrics.prom" ||
	fail "qcowfs_file_size_bytes is not the image file's size $size: $(grep '^qcowfs_file_size' "$T/metrics.prom")"
log "prometheus: $(cat "$T/prom.log")"

# ---- 2. --watch ------------------------------------------------------------
rc=0
timeout --preserve-status -s INT 3 "$QCOWCTL" status --watch --interval 0.5 "$MNT" >"$T/watch.out" 2>&1 || rc=$?
[ $rc = 0 ] || fail "status --watch stopped by SIGINT exited $rc: $(tail -n 5 "$T/watch.out")"
n=$(grep -c '^state: ' "$T/watch.out" || true)
[ "$n" -ge 2 ] || fail "status --watch showed $n refreshes in 3 s at 0.5 s: $(cat "$T/watch.out")"
grep -q $'\e\[' "$T/watch.out" && fail "status --watch wrote terminal escapes into a file"
# on a terminal (script gives it one): redrawn in place, the cursor back at the end
rc=0
script -qec "timeout --preserve-status -s INT 2 '$QCOWCTL' status --watch --interval 0.5 '$MNT'" \
	"$T/tty.out" >/dev/null 2>&1 || rc=$?
[ $rc = 0 ] || fail "status --watch on a terminal, stopped by SIGINT, exited $rc: $(tail -c 300 "$T/tty.out")"
n=$(grep -c $'\e\[H\e\[2J' "$T/tty.out" || true)
[ "$n" -ge 2 ] || fail "status --watch on a terminal did not redraw in place ($n redraws)"
grep -q $'\e\[?25h' "$T/tty.out" || fail "status --watch did not restore the cursor after SIGINT"
rc=0
"$QCOWCTL" status --watch --interval 0 "$MNT" >"$T/usage.out" 2>&1 || rc=$?
[ $rc = 1 ] || fail "--interval 0 was not refused as a usage error (exit $rc)"

# the mount goes away under a watcher: it says so and exits 0
# shellcheck disable=SC2016
bg_start sh -c '"$1" status --watch --interval 0.2 "$2" >"$3" 2>&1; echo "exit=$?" >>"$3"' sh \
	"$QCOWCTL" "$MNT" "$T/gone.out"
wait_until 10 grep -qs '^state: ' "$T/gone.out" || fail "status --watch showed nothing: $(cat "$T/gone.out")"
qumount "$MNT"
wait_until 10 grep -qs '^exit=' "$T/gone.out" || fail "status --watch did not end when the mount went away"
grep -q '^exit=0$' "$T/gone.out" || fail "status --watch exited non-zero when the mount went away: $(tail -n 3 "$T/gone.out")"
grep -q 'no longer mounted' "$T/gone.out" || fail "status --watch did not say the mount went away: $(tail -n 3 "$T/gone.out")"

# a compaction under a watcher: the progress line
CIMG=$T/c.qcow2
CMNT=$T/c.raw
mkimg "$CIMG" 1G
qmount "$CIMG" "$CMNT" -o compact=off
dd if=/dev/urandom of="$CMNT" bs=1M count=512 conv=notrunc,fsync status=none
fallocate -p -o 0 -l 256M "$CMNT"
# shellcheck disable=SC2016
bg_start sh -c 'exec timeout --preserve-status -s INT 60 "$1" status --watch --interval 0.1 "$2" >"$3" 2>&1' sh \
	"$QCOWCTL" "$CMNT" "$T/cwatch.out"
WATCH=$BG_PID
wait_until 10 grep -qs '^state: ' "$T/cwatch.out" || fail "status --watch showed nothing: $(cat "$T/cwatch.out")"
"$QCOWCTL" compact "$CMNT" >"$T/compact.out" 2>&1 || fail "qcowctl compact failed: $(cat "$T/compact.out")"
sleep 0.5
kill -INT "$WATCH"
rc=0
wait "$WATCH" || rc=$?
_forget _PIDS "$WATCH"
[ $rc = 0 ] || fail "status --watch ended by SIGINT exited $rc"
grep -E '^progress: .*moved .*(MB/s|since watching)' "$T/cwatch.out" >"$T/progress.lines" ||
	fail "status --watch showed no progress line during the compaction: $(grep -E '^(compaction|progress)' "$T/cwatch.out" | sort | uniq -c)"
grep -qE 'planned ~[0-9]+ clusters, [0-9.]+ MB/s, about [0-9]+ s left' "$T/progress.lines" ||
	log "no sample late enough for an estimate (a fast compaction): $(head -n 2 "$T/progress.lines")"
log "watch: $(tail -n 1 "$T/progress.lines")"
grep -q '^compaction: *idle' "$T/cwatch.out" || fail "status --watch never showed the compaction ended"

# ---- 4. a mounted image file ------------------------------------------------
for cmd in "compact" "sparsify" "snapshot create s1"; do
	rc=0
	# shellcheck disable=SC2086
	"$QCOWCTL" $cmd "$CIMG" >"$T/mounted.out" 2>&1 || rc=$?
	[ $rc = 1 ] || fail "qcowctl $cmd on a mounted image exited $rc: $(cat "$T/mounted.out")"
	grep -qF "is mounted at $CMNT (qcowfs pid ${_DAEMON[$CMNT]})" "$T/mounted.out" ||
		fail "qcowctl $cmd on a mounted image does not name the mount: $(cat "$T/mounted.out")"
	grep -q 'before mounting' "$T/mounted.out" &&
		fail "qcowctl $cmd on a mounted image talks about mounting: $(cat "$T/mounted.out")"
done
"$QCOWCTL" snapshot list "$CIMG" >"$T/list.out" 2>&1 ||
	fail "qcowctl snapshot list on a mounted image failed: $(cat "$T/list.out")"
# a read-only mount cannot compact: it must go first
qmount "$IMG" "$MNT" -o ro
rc=0
"$QCOWCTL" compact "$IMG" >"$T/mounted.out" 2>&1 || rc=$?
[ $rc = 1 ] || fail "qcowctl compact on a read-only mounted image exited $rc: $(cat "$T/mounted.out")"
grep -qF "is mounted read-only at $MNT" "$T/mounted.out" ||
	fail "qcowctl compact on a read-only mounted image does not say so: $(cat "$T/mounted.out")"
qumount "$MNT"

# ---- 3. unmount after kill -9 of the daemon --------------------------------
pid=${_DAEMON[$CMNT]}
kill -9 "$pid"
wait_gone "$pid" 30 || fail "daemon $pid survived kill -9"
rc=0
"$QCOWCTL" status "$CMNT" >"$T/dead.out" 2>&1 || rc=$?
[ $rc = 1 ] || fail "status of a dead mount exited $rc"
grep -q "qcowctl unmount" "$T/dead.out" || fail "status of a dead mount does not point to qcowctl unmount: $(cat "$T/dead.out")"
rc=0
timeout 60 "$QCOWCTL" unmount "$CMNT" >"$T/unmount.out" 2>&1 || rc=$?
[ $rc = 0 ] || fail "qcowctl unmount of a dead mount exited $rc: $(cat "$T/unmount.out")"
is_mounted "$CMNT" && fail "qcowctl unmount of a dead mount left $CMNT mounted"
_forget _MOUNTS "$CMNT"
grep -qE "unmounted .*had died.*$CIMG (checks clean|has no errors)" "$T/unmount.out" ||
	fail "qcowctl unmount of a dead mount did not report the check: $(cat "$T/unmount.out")"
qcheck_nocorrupt "$CIMG"
log "dead mount: $(tr '\n' '|' <"$T/unmount.out")"
log "ok"
