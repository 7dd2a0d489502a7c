#!/bin/bash
# t070-locking: qcowfs takes QEMU-compatible image locks and respects
# QEMU's.
#  - mounted rw: qemu-img check / info (without -U), qemu-io rw and -r all
#    fail with a lock message; qemu-img info -U works; a second qcowfs
#    mount (rw or ro) of the same image is refused.
#  - qemu-io holds the image rw: qcowfs refuses rw and ro, saying why,
#    and leaves the image untouched.
#  - qemu-io -r holds it: a rw mount is refused; a ro mount works (readers
#    share).
#  - mounted ro: qemu-io rw fails; qemu-img info and check work.
. "$(dirname "$0")/lib.sh"
need_qcowfs

IMG=$T/lock.qcow2
MNT=$T/view.raw
MNT2=$T/view2.raw
LOCKMSG='lock|another process|in use|busy'
mkimg "$IMG" 64M
qio "$IMG" 'write -P 0x42 0 1M'

# must_fail_locked WHAT CMD...: CMD fails within 10 s mentioning a lock
must_fail_locked() {
	local what=$1 rc=0
	shift
	timeout 10 "$@" >"$T/out" 2>&1 || rc=$?
	[ $rc != 0 ] || fail "$what succeeded but should be refused by the lock: $(head -n 3 "$T/out")"
	[ $rc != 124 ] || fail "$what hung instead of failing on the lock"
	grep -qiE "$LOCKMSG" "$T/out" || fail "$what failed without mentioning a lock: $(head -n 3 "$T/out")"
}

# ---- qcowfs rw holds the image -----------------------------------------
qmount "$IMG" "$MNT"
must_fail_locked "qemu-img check while mounted rw" qemu-img check "$IMG"
must_fail_locked "qemu-img info (no -U) while mounted rw" qemu-img info "$IMG"
must_fail_locked "qemu-io rw while mounted rw" qemu-io -f qcow2 -c 'write 0 512' "$IMG"
must_fail_locked "qemu-io -r while mounted rw" qemu-io -r -f qcow2 -c 'read 0 512' "$IMG"
qemu-img info -U "$IMG" >"$T/out" 2>&1 || fail "qemu-img info -U while mounted failed: $(cat "$T/out")"
qmount_fails "$IMG" "$MNT2"
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "second rw mount refused without mentioning a lock: $(cat "$QM_ERR")"
qmount_fails "$IMG" "$MNT2" -o ro
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "ro mount beside a rw mount refused without mentioning a lock: $(cat "$QM_ERR")"
# the view still works after all that
cmp -n 1048576 <(dd if="$MNT" bs=1M count=1 status=none) <(head -c 1048576 /dev/zero | tr '\0' '\102') || fail "view data wrong after the lock probes"
qumount "$MNT"
qcheck "$IMG"
# once unmounted, QEMU may write again
qio "$IMG" 'write -P 0x43 1M 4k'

# ---- qemu-io holds the image rw ------------------------------------------
# start_holder ARGS...: qemu-io ARGS -c 'sleep ...' IMG in the background,
# returns once QEMU holds its locks.
start_holder() {
	bg_start qemu-io "$@" -f qcow2 -c 'sleep 600000' "$IMG"
	HOLDER=$BG_PID
	wait_until 20 holder_locked || fail "qemu-io $* did not take its locks"
}
# QEMU's read lock on byte 100 (consistent read) shows in /proc/locks
holder_locked() {
	local ino
	ino=$(stat -c %i "$IMG")
	grep -E "OFDLCK +ADVISORY +READ +-?[0-9]+ +[0-9a-f]+:[0-9a-f]+:$ino +100 " /proc/locks >/dev/null
}
stop_holder() {
	kill "$HOLDER" 2>/dev/null || true
	wait "$HOLDER" 2>/dev/null || true
	_forget _PIDS "$HOLDER"
}

start_holder
sum=$(sha "$IMG")
qmount_fails "$IMG" "$MNT"
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "rw mount of an image qemu-io writes: no lock message: $(cat "$QM_ERR")"
qmount_fails "$IMG" "$MNT" -o ro
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "ro mount of an image qemu-io writes: no lock message: $(cat "$QM_ERR")"
[ "$(sha "$IMG")" = "$sum" ] || fail "refused mounts changed an image qemu-io holds"
stop_holder

# ---- qemu-io -r holds the image --------------------------------------------
start_holder -r
qmount_fails "$IMG" "$MNT"
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "rw mount of an image qemu-io -r reads: no lock message: $(cat "$QM_ERR")"
[ "$(sha "$IMG")" = "$sum" ] || fail "a refused rw mount changed the image"
qmount "$IMG" "$MNT" -o ro
cmp -n 1048576 <(dd if="$MNT" bs=1M count=1 status=none) <(head -c 1048576 /dev/zero | tr '\0' '\102') || fail "ro view beside qemu-io -r reads wrong data"
qumount "$MNT"
stop_holder
[ "$(sha "$IMG")" = "$sum" ] || fail "a ro mount changed the image"

# ---- qcowfs ro holds the image ---------------------------------------------
qmount "$IMG" "$MNT" -o ro
must_fail_locked "qemu-io rw while mounted ro" qemu-io -f qcow2 -c 'write 0 512' "$IMG"
qemu-img info "$IMG" >"$T/out" 2>&1 || fail "qemu-img info while mounted ro failed: $(cat "$T/out")"
qemu-img check "$IMG" >"$T/out" 2>&1 || fail "qemu-img check while mounted ro failed: $(cat "$T/out")"
# two ro mounts share
qmount "$IMG" "$MNT2" -o ro
same_file "$MNT" "$MNT2" "two ro views of one image"
qumount "$MNT2"
qumount "$MNT"
[ "$(sha "$IMG")" = "$sum" ] || fail "ro mounts changed the image"

# after everything, QEMU has it back
qio "$IMG" 'read -P 0x42 0 1M' 'read -P 0x43 1M 4k'
qcheck "$IMG"
log "ok"
