#!/bin/bash
# t340-attach: qcowctl attach / detach, the image as a block device with
# partitions (issue 9).  A blank image attached (mounted at IMAGE.raw,
# direct I/O, discards on), a GPT with two partitions written on the
# device; detach, reattach --json: both partitions listed with device
# nodes; ext4 on one, xfs on the other, filled; detach refused while they
# are mounted, naming the partition; delete, fstrim both, compact: the image
# file shrinks; detach (the mountpoint file attach made is gone), qemu-img
# check clean; reattach --read-only: the kept files' checksums match and
# writes are refused; with a bare tmpfs as /dev attach makes the device
# nodes and detach removes them; a detach that stopped half way finishes;
# --buffered over an existing mountpoint file, which detach leaves.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need sgdisk partx mkfs.ext4 mkfs.xfs fstrim sha256sum mount umount

IMG=$T/disk.qcow2
MNT=$IMG.raw

# attach_img ARGS...: qcowctl attach --json ARGS; sets DEV, P1, P2 (empty
# when missing), NPARTS, VIEW; registers the loop device and the mount for
# the teardown.
attach_img() {
	local rc=0 out
	out=$("$QCOWCTL" attach --json "$@" 2>"$T/attach.err") || rc=$?
	cat "$T/attach.err" >>"$T/attach.log"
	[ $rc = 0 ] || fail "qcowctl attach --json $* exited $rc: $(cat "$T/attach.err")"
	echo "$out" >"$T/attach.json"
	# one line each: device, mountpoint, image, the number of partitions, the partitions
	$PYTHON -c '
import json, sys
v = json.load(open(sys.argv[1]))
assert set(v) >= {"device", "partitions", "mountpoint", "image"}, v
print(v["device"]); print(v["mountpoint"]); print(v["image"]); print(len(v["partitions"]))
for p in v["partitions"]:
    print(p)' "$T/attach.json" >"$T/attach.lines" ||
		fail "qcowctl attach --json $* printed no valid JSON object: $out"
	mapfile -t L <"$T/attach.lines"
	DEV=${L[0]} VIEW=${L[1]} NPARTS=${L[3]} P1=${L[4]:-} P2=${L[5]:-}
	[ "${L[2]}" = "$IMG" ] || fail "attach --json: image is ${L[2]}, expected $IMG"
	_LOOPS+=("$DEV")
	if [ -z "${_DAEMON[$VIEW]:-}" ]; then
		_MOUNTS+=("$VIEW")
		_DAEMON[$VIEW]=$(daemon_pid "$IMG" "$VIEW") || fail "attach: no qcowfs daemon serves $VIEW"
	fi
	[ -b "$DEV" ] || fail "attach: $DEV is not a block device"
	[ "$(cat "/sys/block/$(basename "$DEV")/loop/backing_file")" = "$VIEW" ] ||
		fail "attach: $DEV does not read from $VIEW"
	[ "$(cat "/sys/block/$(basename "$DEV")/loop/partscan")" = 1 ] ||
		fail "attach: $DEV has no partition scanning"
	return 0
}

# detach_img TARGET: qcowctl detach TARGET must succeed and leave neither
# the loop device nor the mount.
detach_img() {
	local rc=0 pid=${_DAEMON[$VIEW]}
	timeout 120 "$QCOWCTL" detach "$1" >"$T/detach.out" 2>"$T/detach.err" || rc=$?
	cat "$T/detach.out" "$T/detach.err" >>"$T/attach.log"
	[ $rc = 0 ] || fail "qcowctl detach $1 exited $rc: $(cat "$T/detach.err")"
	grep -qx "detached $DEV" "$T/detach.out" || fail "detach $1 did not say 'detached $DEV': $(cat "$T/detach.out")"
	grep -q "closed cleanly" "$T/detach.out" || fail "detach $1 did not report a clean close: $(cat "$T/detach.out")"
	# (the number may already serve another test's loop device: make
	# check runs tests in parallel, so only a device over our view counts)
	[ "$(cat "/sys/block/$(basename "$DEV")/loop/backing_file" 2>/dev/null)" != "$VIEW" ] ||
		fail "$DEV still attached after detach $1"
	! is_mounted "$VIEW" || fail "$VIEW still mounted after detach $1"
	is_gone "$pid" || fail "qcowfs ($pid) still runs after detach $1"
	_forget _LOOPS "$DEV"
	_forget _MOUNTS "$VIEW"
	unset "_DAEMON[$VIEW]"
	return 0
}

loop_attr() { cat "/sys/block/$(basename "$DEV")/$1"; }

mkimg "$IMG" 1G

# -- a blank image: the device alone, direct I/O, discards through ----------
attach_img "$IMG"
[ "$VIEW" = "$MNT" ] || fail "default mountpoint is $VIEW, expected $MNT"
[ "$NPARTS" = 0 ] || fail "a blank image shows $NPARTS partitions"
if [ "$(loop_attr loop/dio)" != 1 ] && ! grep -q "direct I/O" "$T/attach.err"; then
	fail "attach: $DEV does not use direct I/O, and attach gave no warning about it"
fi
[ "$(loop_attr queue/discard_max_bytes)" -gt 0 ] || fail "attach: $DEV passes no discards"
# the text form: the device alone
"$QCOWCTL" attach "$IMG" >"$T/text.out" 2>>"$T/attach.log" || fail "attach of an attached image failed"
[ "$(cat "$T/text.out")" = "$DEV" ] || fail "attach (text) printed '$(cat "$T/text.out")', expected $DEV"

sgdisk -n1:0:+400M -t1:8300 -n2:0:0 -t2:8300 "$DEV" >"$T/sgdisk.log" 2>&1 ||
	fail "sgdisk on $DEV failed: $(cat "$T/sgdisk.log")"
detach_img "$DEV"
[ ! -e "$MNT" ] || fail "detach left $MNT, which attach created"
qcheck "$IMG"

# -- reattach: the partitions, with nodes -----------------------------------
attach_img "$IMG"
[ "$NPARTS" = 2 ] || fail "attach after sgdisk shows $NPARTS partitions, expected 2: $(cat "$T/attach.json")"
[ -b "$P1" ] && [ -b "$P2" ] || fail "attach: no block device nodes $P1 $P2"
"$QCOWCTL" attach "$IMG" >"$T/text.out" 2>>"$T/attach.log" || fail "attach of an attached image failed"
printf '%s\n' "$DEV" "$P1" "$P2" | cmp -s - "$T/text.out" ||
	fail "attach (text) printed '$(cat "$T/text.out")', expected $DEV $P1 $P2 one per line"

mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$P1" >"$T/mkfs.log" 2>&1 ||
	fail "mkfs.ext4 $P1 failed: $(cat "$T/mkfs.log")"
mkfs.xfs -q -f "$P2" >>"$T/mkfs.log" 2>&1 || fail "mkfs.xfs $P2 failed: $(tail -n 3 "$T/mkfs.log")"
fs_mount "$P1" "$T/ext4"
fs_mount "$P2" "$T/xfs"
head -c $((32 << 20)) /dev/urandom >"$T/chunk"
for d in ext4 xfs; do
	for i in 1 2 3 4 5 6 7 8; do
		cat "$T/chunk" >"$T/$d/junk$i"
	done
	head -c $((5 << 20)) /dev/urandom >"$T/$d/keep"
	mkdir "$T/$d/sub"
	for i in $(seq 1 50); do echo "small $d $i" >"$T/$d/sub/s$i"; done
done
(cd "$T" && find ext4 xfs -type f ! -name 'junk*' -print0 | sort -z | xargs -0 sha256sum) >"$T/sums"
sync
full=$(file_size "$IMG")
log "filled: image file $((full >> 20)) MiB"
[ "$full" -gt $((500 << 20)) ] || fail "setup: image file only $((full >> 20)) MiB after writing 512 MiB"

# -- detach refused while a partition is mounted ----------------------------
rc=0
"$QCOWCTL" detach "$IMG" >"$T/refused.out" 2>"$T/refused.err" || rc=$?
[ $rc != 0 ] || fail "detach succeeded with $P1 and $P2 mounted"
grep -qE "($P1|$P2) is mounted on $T/(ext4|xfs)" "$T/refused.err" ||
	fail "detach refused without naming the mounted partition: $(cat "$T/refused.err")"
[ -e "/sys/block/$(basename "$DEV")/loop/backing_file" ] && is_mounted "$MNT" ||
	fail "a refused detach still took the device or the mount away"
fs_umount "$T/ext4"
rc=0
"$QCOWCTL" detach "$P2" >"$T/refused.out" 2>"$T/refused.err" || rc=$?
[ $rc != 0 ] && grep -q "$P2 is mounted on $T/xfs" "$T/refused.err" ||
	fail "detach $P2 with $P2 mounted: exit $rc, $(cat "$T/refused.err")"
fs_mount "$P1" "$T/ext4"

# -- delete, fstrim, compact: the file shrinks ------------------------------
rm -f "$T"/ext4/junk* "$T"/xfs/junk*
sync
for d in ext4 xfs; do
	fstrim -v "$T/$d" >>"$T/fstrim.log" 2>&1 || fail "fstrim $T/$d failed: $(tail -n 2 "$T/fstrim.log")"
done
timeout 120 "$QCOWCTL" compact "$MNT" >"$T/compact.log" 2>&1 || fail "qcowctl compact $MNT failed: $(tail -n 3 "$T/compact.log")"
small=$(file_size "$IMG")
log "after delete, fstrim and compact: $((full >> 20)) MiB -> $((small >> 20)) MiB"
[ "$small" -lt $((full - (400 << 20))) ] ||
	fail "the image file did not shrink by the 512 MiB deleted: $((full >> 20)) MiB -> $((small >> 20)) MiB"
fs_umount "$T/ext4"
fs_umount "$T/xfs"
detach_img "$IMG"
[ ! -e "$MNT" ] || fail "detach left $MNT, which attach created"
[ -z "$(ls /run/qcowfs/attach/ 2>/dev/null | grep -x "$(basename "$DEV")")" ] ||
	fail "detach left its state file /run/qcowfs/attach/$(basename "$DEV")"
qcheck "$IMG"

# -- reattach read-only: contents intact, writes refused ---------------------
attach_img --read-only "$IMG"
[ "$NPARTS" = 2 ] || fail "read-only attach shows $NPARTS partitions"
[ "$(loop_attr ro)" = 1 ] || fail "attach --read-only: $DEV is not read-only"
fs_mount "$P1" "$T/ext4" -o ro,noload
fs_mount "$P2" "$T/xfs" -o ro,norecovery
(cd "$T" && sha256sum --quiet -c "$T/sums") >"$T/sumcheck.log" 2>&1 ||
	fail "checksums differ after reattach: $(head -n 5 "$T/sumcheck.log")"
if dd if=/dev/zero of="$P1" bs=4096 count=1 oflag=direct status=none 2>>"$T/attach.log"; then
	fail "a write to $P1 of a read-only attach succeeded"
fi
if dd if=/dev/zero of="$MNT" bs=4096 count=1 conv=notrunc status=none 2>>"$T/attach.log"; then
	fail "a write to the view $MNT of a read-only attach succeeded"
fi
fs_umount "$T/ext4"
fs_umount "$T/xfs"
detach_img "$MNT"
qcheck "$IMG"

# -- no devtmpfs or udev (a container's /dev): attach makes the nodes, ---------
# detach removes them.  A private mount namespace with a bare tmpfs on /dev.
need unshare
mkdir "$T/devnodes"
cp -a /dev/null /dev/zero /dev/fuse /dev/loop-control "$T/devnodes/"
cat >"$T/nodev.sh" <<EOF
mount -t tmpfs -o mode=755 tmpfs /dev || exit 9
cp -a "$T"/devnodes/* /dev/ || exit 9
"$QCOWCTL" attach --json "$IMG" >"$T/nodev.json" 2>"$T/nodev.err" || exit 10
ls /dev >"$T/nodev.during"
"$QCOWCTL" detach "$IMG" >"$T/nodev.out" 2>>"$T/nodev.err" || exit 11
ls /dev >"$T/nodev.after"
EOF
rc=0
timeout 120 unshare -m bash "$T/nodev.sh" || rc=$?
cat "$T/nodev.err" >>"$T/attach.log"
[ $rc = 0 ] || fail "attach/detach with a bare /dev failed (step $rc): $(cat "$T/nodev.err")"
nodev=$($PYTHON -c 'import json, sys; v = json.load(open(sys.argv[1])); print(" ".join([v["device"]] + v["partitions"]))' "$T/nodev.json")
[ "$(wc -w <<<"$nodev")" = 3 ] || fail "attach with a bare /dev listed '$nodev', expected a device and 2 partitions"
for n in $nodev; do
	grep -qx "$(basename "$n")" "$T/nodev.during" || fail "attach with a bare /dev made no node $n: $(tr '\n' ' ' <"$T/nodev.during")"
	! grep -qx "$(basename "$n")" "$T/nodev.after" || fail "detach left the node $n that attach made"
done
[ ! -e "$MNT" ] || fail "detach (bare /dev) left $MNT"
qcheck "$IMG"

# -- a detach that stopped half way (the loop device already gone) finishes --
attach_img "$IMG"
losetup -d "$DEV"
_wait_loop_free "$DEV"
_forget _LOOPS "$DEV"
timeout 120 "$QCOWCTL" detach "$IMG" >"$T/detach.out" 2>"$T/detach.err" ||
	fail "detach $IMG after losetup -d failed: $(cat "$T/detach.err")"
! is_mounted "$MNT" && [ ! -e "$MNT" ] || fail "detach after losetup -d left $MNT mounted or in place"
_forget _MOUNTS "$MNT"
# and an image that is neither mounted nor attached is refused
rc=0
"$QCOWCTL" detach "$IMG" >/dev/null 2>"$T/detach.err" || rc=$?
[ $rc != 0 ] || fail "detach of an image that is neither mounted nor attached succeeded"

# -- --buffered, at a mountpoint file that existed: detach leaves it --------
: >"$T/mine.raw"
attach_img --buffered "$IMG" "$T/mine.raw"
[ "$VIEW" = "$T/mine.raw" ] || fail "attach IMAGE MOUNTPOINT mounted at $VIEW"
[ "$(loop_attr loop/dio)" = 0 ] || fail "attach --buffered: $DEV uses direct I/O"
detach_img "$DEV"
[ -f "$T/mine.raw" ] || fail "detach removed $T/mine.raw, which attach did not create"
qcheck "$IMG"
log "ok"
