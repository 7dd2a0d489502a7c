#!/bin/bash
# t375-vm-locks: a VM on the view, and who else may open what (doc/vm.md,
# "Locks").  Two locks guard a running VM's disk:
#  - QEMU's own OFD locks, which QEMU takes on the file it is given: the
#    view.  qcowfs implements no lock operations, so the FUSE kernel
#    module keeps these locks itself, locally, as on any file: they are
#    seen by every process of this kernel, and they must behave exactly as
#    on a plain file.  Checked side by side: a plain raw file and the view,
#    each held by a paused VM (qemu-system-x86_64 -S: it opens and locks its
#    drive, no guest needed); on both, a second VM and a qemu-io writer are
#    refused, a qemu-io reader is let in, and plain reads (dd) work.
#  - qcowfs's QEMU-compatible locks on the image: while the VM runs on the
#    view, qemu-img check/info, qemu-io, a VM given the image itself and a
#    second qcowfs (rw and ro) are all refused.
# A live qcowctl snapshot create works under the running VM.  After the VM
# quits, its locks on the view are gone (a qemu-io writer gets in), qcowctl
# unmount reports a clean close, qemu-img check is clean and QEMU lists
# the snapshot.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need qemu-system-x86_64 stat

IMG=$T/vm.qcow2
MNT=$T/disk.raw
MNT2=$T/disk2.raw
PLAIN=$T/plain.raw
LOCKMSG='lock|another process|in use|busy'
mkimg "$IMG" 64M
qio "$IMG" 'write -P 0x42 0 1M'
truncate -s 64M "$PLAIN"

# must_fail_locked WHAT CMD...: CMD fails within 15 s mentioning a lock
must_fail_locked() {
	local what=$1 rc=0
	shift
	timeout 15 "$@" >"$T/out" 2>&1 || rc=$?
	[ $rc != 0 ] || fail "$what succeeded but should be refused by a lock: $(head -n 3 "$T/out")"
	[ $rc != 124 ] || fail "$what hung instead of failing on a lock"
	grep -qiE "$LOCKMSG" "$T/out" || fail "$what failed without mentioning a lock: $(head -n 3 "$T/out")"
}

# must_work WHAT CMD...: CMD succeeds within 15 s
must_work() {
	local what=$1 rc=0
	shift
	timeout 15 "$@" >"$T/out" 2>&1 || rc=$?
	[ $rc = 0 ] || fail "$what failed (exit $rc): $(head -n 3 "$T/out")"
}

# lock_id FILE: the device:inode of FILE as /proc/locks writes it
# (hex major:minor, decimal inode).
lock_id() {
	local dev ino
	dev=$(stat -c %d "$1")
	ino=$(stat -c %i "$1")
	printf '%02x:%02x:%d' $(((dev >> 8) & 0xfff)) $(((dev & 0xff) | ((dev >> 12) & 0xfff00))) "$ino"
}

# vm_locked FILE: a VM's locks are on FILE: QEMU's shared lock on byte 100
# (consistent read; 100-101 merged for a writer) shows in /proc/locks.
vm_locked() {
	grep -E "OFDLCK +ADVISORY +READ +-?[0-9]+ +$(lock_id "$1") +100 " /proc/locks >/dev/null
}

# start_vm FILE FORMAT: a paused VM with FILE as its virtio disk, the drive
# options doc/vm.md recommends; returns once it holds its locks.  $VM_PID.
start_vm() {
	local file=$1 fmt=$2
	bg_start qemu-system-x86_64 -S -nodefaults -display none -m 64 \
		-drive "file=$file,format=$fmt,if=virtio,cache=none,aio=native,discard=unmap" \
		>>"$T/vm.log" 2>&1
	VM_PID=$BG_PID
	wait_until 30 vm_locked "$file" || fail "qemu-system-x86_64 on $file did not take its locks within 30 s"
}

stop_vm() {
	kill -TERM "$VM_PID" 2>/dev/null || true
	wait "$VM_PID" 2>/dev/null || true
	_forget _PIDS "$VM_PID"
}

# view_lock_checks FILE: what QEMU's locks on a raw FILE a VM holds let
# through; the same answers for a plain file and for the view.
view_lock_checks() {
	local f=$1
	must_fail_locked "a second VM on $f" \
		qemu-system-x86_64 -S -nodefaults -display none -m 64 -drive "file=$f,format=raw,if=virtio"
	must_fail_locked "qemu-io writing $f" qemu-io -f raw -c 'write 0 4k' "$f"
	# a running VM does not refuse readers (QEMU shares consistent reads)
	must_work "qemu-io -r reading $f" qemu-io -r -f raw -c 'read 0 4k' "$f"
	must_work "qemu-img info $f" qemu-img info "$f"
	# the locks are advisory: programs that do not ask are not stopped
	must_work "dd reading $f" dd if="$f" of=/dev/null bs=64k count=1 status=none
}

# ---- the control: QEMU's locks on a plain file ------------------------------
start_vm "$PLAIN" raw
view_lock_checks "$PLAIN"
stop_vm
must_work "qemu-io writing $PLAIN after its VM quit" qemu-io -f raw -c 'write 0 4k' "$PLAIN"

# ---- a VM on the view ---------------------------------------------------------
qmount "$IMG" "$MNT"
start_vm "$MNT" raw
log "VM $VM_PID holds $MNT: $(grep -cE " $(lock_id "$MNT") " /proc/locks) lock ranges on the view"
# QEMU's lock on the FUSE file works as on the plain file
view_lock_checks "$MNT"

# qcowfs's lock on the image keeps everyone else away from it
must_fail_locked "qemu-img check of the image under a VM" qemu-img check "$IMG"
must_fail_locked "qemu-img info (no -U) of the image under a VM" qemu-img info "$IMG"
must_fail_locked "qemu-io writing the image under a VM" qemu-io -f qcow2 -c 'write 0 4k' "$IMG"
must_fail_locked "qemu-io -r reading the image under a VM" qemu-io -r -f qcow2 -c 'read 0 4k' "$IMG"
must_fail_locked "a second VM given the image itself" \
	qemu-system-x86_64 -S -nodefaults -display none -m 64 -drive "file=$IMG,format=qcow2,if=virtio"
qmount_fails "$IMG" "$MNT2"
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "a second qcowfs under a VM refused without mentioning a lock: $(cat "$QM_ERR")"
qmount_fails "$IMG" "$MNT2" -o ro
grep -qiE "$LOCKMSG" "$QM_ERR" || fail "a ro qcowfs under a VM refused without mentioning a lock: $(cat "$QM_ERR")"

# a live snapshot under the running VM (qcowctl talks to the daemon)
must_work "qcowctl snapshot create under a VM" "$QCOWCTL" snapshot create before-upgrade "$MNT"
"$QCOWCTL" snapshot list "$MNT" >"$T/out" 2>&1 || fail "qcowctl snapshot list failed: $(cat "$T/out")"
grep -q before-upgrade "$T/out" || fail "live snapshot not listed: $(cat "$T/out")"

# the VM quits: its locks on the view go with it
stop_vm
vm_locked "$MNT" && fail "locks on the view remain after the VM quit: $(grep -E " $(lock_id "$MNT") " /proc/locks)"
must_work "qemu-io writing the view after the VM quit" qemu-io -f raw -c 'write -P 0x43 1M 4k' "$MNT"
# and qcowfs still holds the image
must_fail_locked "qemu-io writing the image after the VM quit, still mounted" qemu-io -f qcow2 -c 'write 0 4k' "$IMG"

qumount "$MNT" qcowctl
grep -q 'closed cleanly\|checks clean\|no errors' "$T/qcowfs.log" || fail "qcowctl unmount did not report a clean close: $(tail -n 3 "$T/qcowfs.log")"
qcheck "$IMG"
qemu-img snapshot -l "$IMG" >"$T/out" 2>&1 || fail "qemu-img snapshot -l failed: $(cat "$T/out")"
grep -q before-upgrade "$T/out" || fail "QEMU does not list the live snapshot: $(cat "$T/out")"
qio "$IMG" 'read -P 0x42 0 1M' 'read -P 0x43 1M 4k'
log "ok"
