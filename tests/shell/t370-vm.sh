#!/bin/bash
# t370-vm: a real guest (QEMU, Debian's kernel, a busybox initramfs built
# by vm_guest.sh) on the view, ext4 inside.
#
#  1. The guest fills ext4, deletes, fstrims, writes a checksummed file,
#     syncs and powers off.  While it runs the host polls the image file:
#     it must shrink (the discards reached qcowfs and the recycler gave the
#     space back) within 10 s of the guest's fstrim.  After: qcowctl
#     unmount, qemu-img check clean, a fresh read-only mount of the view
#     through a loop device shows the file with its checksum.
#  2. kill -9 of QEMU while the guest writes chunk files with a sync after
#     each ("SYNCED n"): the image checks (leaks at most) and every chunk up
#     to the last SYNCED reads back right through a fresh mount.
#  3. kill -9 of qcowfs under the running guest: the guest sees I/O
#     errors, QEMU exits (or dies to kill -9) within a timeout, nothing on
#     the host hangs, the image checks (leaks at most), synced chunks are
#     intact.
#
# KVM when /dev/kvm really works (vm_accel), TCG otherwise; with TCG the
# data are smaller.  VM_ACCEL=tcg|kvm forces the choice.
# shellcheck source=tests/shell/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/shell/vm_guest.sh
. "$TESTDIR/vm_guest.sh"
need_qcowfs
need_loop
need qemu-system-x86_64 busybox mkfs.ext4 e2fsck cpio gzip sha256sum
[ -n "$(ls /boot/vmlinuz-* 2>/dev/null)" ] || skip "no kernel in /boot (install linux-image-amd64)"
busybox --list 2>/dev/null | grep -qx fstrim || skip "busybox has no fstrim (install busybox-static)"

accel=$(vm_accel)
VM_ACCEL=$accel
# (a 300 MiB fill takes some 10 s under TCG here; the chunks stay small)
fill_mb=${VM_FILL_MB:-300}
if [ "$accel" = kvm ]; then
	chunk_kb=1024
else
	chunk_kb=256
fi
log "accelerator: $accel; fill ${fill_mb} MiB"
OPTS=compact_threshold=1M,compact_quiet_ms=200

# mkfs_view VIEW: ext4 on the view from the host (the guest has no mkfs);
# inode tables and journal written now, so the guest kernel does no lazy
# init writes of its own in the background.
mkfs_view() {
	mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$1" >>"$T/mkfs.log" 2>&1 ||
		fail "mkfs.ext4 on the view $1 failed: $(tail -n 3 "$T/mkfs.log")"
}

# chunk N: the content of chunk file N written by the crash jobs (the guest
# makes the same bytes with busybox yes/head).
chunk() { yes "chunk $1 of the t370 crash test" | head -c $((chunk_kb * 1024)); }

# The chunk writer of the crash cases: chunk files with a sync after each,
# until a write or sync fails (then it says so and stops).
cat >"$T/chunks.sh" <<EOF
mount -t ext4 /dev/vda /mnt || { echo "RESULT mount=fail"; exit 1; }
echo "RESULT mount=ok"
n=1
while [ \$n -le 400 ]; do
	# dd's fsync reports an I/O error that a bare sync would not
	if ! yes "chunk \$n of the t370 crash test" | head -c $((chunk_kb * 1024)) |
		dd of=/mnt/c\$n bs=65536 conv=fsync 2>/dev/null; then
		echo "RESULT io_error=write \$n"; break
	fi
	sync
	echo "SYNCED \$n"
	n=\$((n + 1))
done
echo "RESULT chunks_done=\$n"
EOF

# last_synced LOG: the highest n of the "SYNCED n" lines (0: none).
last_synced() {
	tr -d '\r' <"$1" | awk '$1 == "SYNCED" && $2 + 0 > m { m = $2 + 0 } END { print m + 0 }'
}

# check_chunks IMAGE UPTO WHAT: fresh mount of the view, a loop device,
# ext4 mounted read-write (it replays its journal: a synced chunk may sit
# only in the journal), chunks 1..UPTO compared, ext4 unmounted and
# e2fsck -fn clean, everything detached, image checked (leaks allowed).
check_chunks() {
	local img=$1 upto=$2 what=$3 n mnt=$T/check.raw dir=$T/checkdir
	qmount "$img" "$mnt" -o "$OPTS"
	loop_attach "$mnt"
	fs_mount "$LOOPDEV" "$dir"
	for ((n = 1; n <= upto; n++)); do
		[ -f "$dir/c$n" ] || fail "$what: chunk $n was synced (SYNCED $n) but $dir/c$n is missing"
		cmp -s <(chunk $n) "$dir/c$n" || fail "$what: chunk $n was synced but reads back different"
	done
	fs_umount "$dir"
	e2fsck -fn "$LOOPDEV" >"$T/e2fsck.log" 2>&1 ||
		fail "$what: e2fsck -fn after journal replay not clean: $(tail -n 8 "$T/e2fsck.log")"
	loop_detach "$LOOPDEV"
	qumount "$mnt" qcowctl
	qcheck_nocorrupt "$img"
}

# ---- 1. fill, delete, fstrim: the image shrinks while the guest runs -----

cat >"$T/fill.sh" <<EOF
mount -t ext4 /dev/vda /mnt || { echo "RESULT mount=fail"; exit 1; }
echo "RESULT mount=ok"
head -c 1048576 /dev/urandom >/tmp/pattern
i=0
while [ \$i -lt $fill_mb ]; do cat /tmp/pattern; i=\$((i + 1)); done >/mnt/fill || echo "RESULT fill=fail"
sync
echo "RESULT filled=\$(du -m /mnt/fill | cut -f1)"
echo "FILLED"
rm /mnt/fill
sync
echo "FSTRIM_START"
fstrim -v /mnt
echo "RESULT fstrim=\$?"
echo "FSTRIM_DONE"
# idle while the host watches the image shrink
sleep 12
head -c 3000000 /dev/urandom >/mnt/keep
echo "RESULT keep_sum=\$(sha256sum /mnt/keep | cut -d' ' -f1)"
sync
umount /mnt
echo "RESULT umount=\$?"
EOF

img=$T/vm.qcow2
mnt=$T/view.raw
mkimg "$img" 1G
qmount "$img" "$mnt" -o "$OPTS"
mkfs_view "$mnt"
vm_build_initramfs "$T/fill.cpio.gz" "$T/fill.sh" 2>>"$T/vm.err" || fail "vm_build_initramfs failed: $(tail -n 3 "$T/vm.err")"
VM_INITRD=$T/fill.cpio.gz
t0=$SECONDS
vm_run "$mnt" "$T/guest-fill.log"
_PIDS+=("$VM_PID")
log "QEMU $VM_PID: accel $VM_ACCEL, aio=$VM_AIO_USED"
peak=0
trim_at=
shrunk_at=
size_at_trim=
limit=150
while kill -0 "$VM_PID" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$VM_PID/stat" 2>/dev/null)" != Z ]; do
	s=$(file_size "$img")
	((s > peak)) && peak=$s
	if [ -z "$trim_at" ] && grep -q FSTRIM_START "$T/guest-fill.log"; then
		trim_at=$SECONDS
		size_at_trim=$s
	fi
	# shrunk: by at least half of what the fill had put in
	if [ -n "$trim_at" ] && [ -z "$shrunk_at" ] && ((s < peak - fill_mb * 1024 * 1024 / 2)); then
		shrunk_at=$SECONDS
		log "image shrank from $peak to $s bytes $((shrunk_at - trim_at)) s after the guest's fstrim"
	fi
	((SECONDS - t0 < limit)) || fail "the guest did not power off within $limit s: $(tail -n 5 "$T/guest-fill.log")"
	sleep 0.2
done
vm_wait 10 || true
log "guest ran $((SECONDS - t0)) s; QEMU exit $VM_RC"
[ "$VM_RC" = 0 ] || fail "QEMU exited $VM_RC: $(tail -n 5 "$T/guest-fill.log")"
[ "$(vm_result "$T/guest-fill.log" mount)" = ok ] || fail "the guest could not mount ext4: $(tail -n 10 "$T/guest-fill.log")"
[ "$(vm_result "$T/guest-fill.log" job_exit)" = 0 ] || fail "the guest job failed: $(tail -n 10 "$T/guest-fill.log")"
[ "$(vm_result "$T/guest-fill.log" fstrim)" = 0 ] || fail "fstrim in the guest failed: $(grep -i trim "$T/guest-fill.log")"
[ "$(vm_result "$T/guest-fill.log" umount)" = 0 ] || fail "umount in the guest failed"
filled=$(vm_result "$T/guest-fill.log" filled)
((filled >= fill_mb)) || fail "the guest filled $filled MiB, not $fill_mb"
[ -n "$trim_at" ] || fail "the guest never reached fstrim: $(tail -n 5 "$T/guest-fill.log")"
((peak >= fill_mb * 1024 * 1024)) || fail "the image peaked at $peak bytes, less than the $fill_mb MiB the guest wrote"
[ -n "$shrunk_at" ] || fail "the image did not shrink while the guest ran: peak $peak, at fstrim $size_at_trim, now $(file_size "$img")"
((shrunk_at - trim_at <= 10)) || fail "the image shrank only $((shrunk_at - trim_at)) s after the guest's fstrim (limit 10 s)"
sum=$(vm_result "$T/guest-fill.log" keep_sum)
[ ${#sum} = 64 ] || fail "no checksum from the guest: $(tail -n 5 "$T/guest-fill.log")"
qumount "$mnt" qcowctl
qcheck "$img"
# a fresh mount of the view, read-only, through a loop device
qmount "$img" "$mnt" -o ro
loop_attach "$mnt" -r
fs_mount "$LOOPDEV" "$T/dir" -o ro,noload
got=$(sha "$T/dir/keep")
[ "$got" = "$sum" ] || fail "the guest's file reads back with sha256 $got, the guest computed $sum"
fs_umount "$T/dir"
loop_detach "$LOOPDEV"
qumount "$mnt"
log "fill/fstrim/checksum: ok (peak $peak bytes)"

# ---- 2. kill -9 of QEMU while the guest writes and syncs -----------------

img=$T/crash-qemu.qcow2
mkimg "$img" 256M
qmount "$img" "$mnt" -o "$OPTS"
mkfs_view "$mnt"
vm_build_initramfs "$T/chunks.cpio.gz" "$T/chunks.sh" 2>>"$T/vm.err" || fail "vm_build_initramfs failed: $(tail -n 3 "$T/vm.err")"
VM_INITRD=$T/chunks.cpio.gz
vm_run "$mnt" "$T/guest-crash-qemu.log"
_PIDS+=("$VM_PID")
wait_until 60 eval '(($(last_synced "$T/guest-crash-qemu.log") >= 4))' ||
	fail "the guest did not sync 4 chunks within 60 s: $(tail -n 5 "$T/guest-crash-qemu.log")"
kill -9 "$VM_PID"
vm_wait 10 || fail "QEMU survived kill -9 for 10 s"
upto=$(last_synced "$T/guest-crash-qemu.log")
log "QEMU killed after SYNCED $upto"
qumount "$mnt" qcowctl
qcheck_nocorrupt "$img"
check_chunks "$img" "$upto" "after kill -9 of QEMU"
log "kill -9 of QEMU: $upto synced chunks intact"

# ---- 3. kill -9 of qcowfs under the running guest -------------------------

img=$T/crash-qcowfs.qcow2
mkimg "$img" 256M
qmount "$img" "$mnt" -o "$OPTS"
mkfs_view "$mnt"
vm_run "$mnt" "$T/guest-crash-qcowfs.log"
_PIDS+=("$VM_PID")
wait_until 60 eval '(($(last_synced "$T/guest-crash-qcowfs.log") >= 4))' ||
	fail "the guest did not sync 4 chunks within 60 s: $(tail -n 5 "$T/guest-crash-qcowfs.log")"
# qkill: kill -9 of the daemon, then a lazy unmount of the dead mount
# (bounded waits: the host must not hang on it)
qkill "$mnt"
t1=$SECONDS
if vm_wait 30; then
	log "QEMU exited $VM_RC $((SECONDS - t1)) s after qcowfs died"
	grep -q 'RESULT io_error=' "$T/guest-crash-qcowfs.log" ||
		fail "QEMU exited but the guest never reported an I/O error: $(tail -n 8 "$T/guest-crash-qcowfs.log")"
else
	# vm_wait killed it with -9: it must be gone now
	wait_gone "$VM_PID" 10 || fail "QEMU did not die to kill -9 after qcowfs died"
	log "QEMU was still running 30 s after qcowfs died; kill -9 ended it"
fi
upto=$(last_synced "$T/guest-crash-qcowfs.log")
log "qcowfs killed after SYNCED $upto; guest: $(vm_result "$T/guest-crash-qcowfs.log" io_error)"
qcheck_nocorrupt "$img"
check_chunks "$img" "$upto" "after kill -9 of qcowfs"
log "kill -9 of qcowfs: $upto synced chunks intact"
log "ok ($accel, $((SECONDS)) s)"
