#!/bin/bash
# t130-permissions: who may do what with the view (issue 6, item 13).
#  - the view starts with the image file's owner, group and mode (a 0600
#    image mounted with allow_other is not readable by other users; a
#    read-only mount drops the write bits);
#  - chmod and chown on the view work for the mount's lifetime and the
#    kernel enforces them; only the owner or root may chmod, only root may
#    chown; the image file keeps its own mode and owner;
#  - the control ioctls check the descriptor: compaction needs one opened
#    for writing (EBADF otherwise, also for root), the status one opened for
#    reading; qcowctl status works for a reader, qcowctl compact does not.
# Fails on the code before issue 6: the view was always 0644 (0444 ro),
# chmod returned 0 and changed nothing, and a read-only descriptor could
# start compactions.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_root
need setpriv stat chmod chown dd

# The other user: nobody, with no supplementary groups.
OTHER_UID=$(id -u nobody)
OTHER_GID=$(getent group nogroup | cut -d: -f3) || OTHER_GID=$OTHER_UID
as_other() { setpriv --reuid="$OTHER_UID" --regid="$OTHER_GID" --clear-groups -- "$@"; }
# The other user must be able to reach the view at all.
chmod 0755 "$T"

IMG=$T/p.qcow2
MNT=$T/view.raw
mkimg "$IMG" 16M
qio "$IMG" 'write -P 0x5a 0 1M'
chown 0:0 "$IMG"
chmod 0600 "$IMG"
img_stat() { stat -c '%a %u %g' "$IMG"; }
view_stat() { stat -c '%a %u %g' "$MNT"; }
[ "$(img_stat)" = "600 0 0" ] || fail "setup: image is $(img_stat)"

# ioctl_via [other] MODE CMD: the status or compact ioctl through a
# descriptor opened O_RDONLY / O_WRONLY / O_RDWR (ro, wo, rw), as root or as
# the other user; prints "ok" or the errno name.
ioctl_via() {
	local run=()
	if [ "$1" = other ]; then
		run=(setpriv --reuid="$OTHER_UID" --regid="$OTHER_GID" --clear-groups --)
		shift
	fi
	PYTHONPATH=$TESTDIR PYTHONDONTWRITEBYTECODE=1 "${run[@]}" $PYTHON - "$MNT" "$1" "$2" <<'EOF'
import errno, fcntl, os, sys, qcowfs_ctl
path, mode, cmd = sys.argv[1:4]
flags = {"ro": os.O_RDONLY, "wo": os.O_WRONLY, "rw": os.O_RDWR}[mode]
try:
    fd = os.open(path, flags | os.O_NONBLOCK)
except OSError as e:
    print("open:" + errno.errorcode[e.errno])
    sys.exit(0)
try:
    if cmd == "status":
        buf = bytearray(qcowfs_ctl.STATUS_MAX)
        fcntl.ioctl(fd, qcowfs_ctl.IOC_STATUS, buf)
        if b"virtual_size=" not in bytes(buf):
            sys.exit("status text without virtual_size")
    else:
        fcntl.ioctl(fd, qcowfs_ctl.IOC_COMPACT)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
finally:
    os.close(fd)
EOF
}

# ---- the view starts as the image file ----------------------------------
qmount "$IMG" "$MNT" -o allow_other
[ "$(view_stat)" = "600 0 0" ] || fail "a 0600 root:root image shows as $(view_stat), expected 600 0 0"
rc=0
as_other dd if="$MNT" of=/dev/null bs=64k count=1 status=none 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "another user read the view of a 0600 image (allow_other)"
grep -q 'Permission denied' "$T/out" || fail "reading as another user: expected EACCES, got: $(cat "$T/out")"
rc=0
as_other "$QCOWCTL" status "$MNT" >"$T/out" 2>&1 || rc=$?
[ $rc != 0 ] || fail "another user read the status (image path, pid) of a view it may not read"

# only the owner or root may chmod; only root may chown
rc=0
as_other chmod 0644 "$MNT" 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "another user could chmod the view"
grep -q 'Operation not permitted' "$T/out" || fail "chmod by another user: expected EPERM, got: $(cat "$T/out")"
rc=0
as_other chown "$OTHER_UID" "$MNT" 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "another user could chown the view to itself"
[ "$(view_stat)" = "600 0 0" ] || fail "refused chmod/chown changed the view to $(view_stat)"

# chmod 644 by root: it takes effect and the kernel lets the other user read
chmod 0644 "$MNT" || fail "chmod 0644 of the view failed"
[ "$(view_stat)" = "644 0 0" ] || fail "after chmod 0644 the view shows $(view_stat)"
as_other dd if="$MNT" bs=1M count=1 status=none 2>"$T/out" >"$T/other.raw" ||
	fail "the other user cannot read after chmod 0644: $(cat "$T/out")"
cmp -s "$T/other.raw" <(head -c 1M /dev/zero | tr '\0' 'Z') ||
	fail "what the other user read is not the image's data"
rc=0
as_other dd if=/dev/zero of="$MNT" bs=512 count=1 conv=notrunc status=none 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "the other user could write a 0644 view it does not own"

# the ioctls check the descriptor's access mode
[ "$(ioctl_via ro status)" = ok ] || fail "status through an O_RDONLY descriptor: $(ioctl_via ro status)"
[ "$(ioctl_via other ro status)" = ok ] ||
	fail "the other user cannot read the status through O_RDONLY: $(ioctl_via other ro status)"
[ "$(ioctl_via ro compact)" = EBADF ] || fail "compact through an O_RDONLY descriptor (root): $(ioctl_via ro compact), expected EBADF"
[ "$(ioctl_via other ro compact)" = EBADF ] ||
	fail "compact through the other user's O_RDONLY descriptor: $(ioctl_via other ro compact), expected EBADF"
[ "$(ioctl_via wo status)" = EBADF ] || fail "status through an O_WRONLY descriptor: $(ioctl_via wo status), expected EBADF"
[ "$(ioctl_via rw compact)" = ok ] || fail "compact through an O_RDWR descriptor (root): $(ioctl_via rw compact)"
as_other "$QCOWCTL" status "$MNT" >"$T/out" 2>&1 || fail "qcowctl status as a reader failed: $(cat "$T/out")"
rc=0
as_other "$QCOWCTL" compact "$MNT" >"$T/out" 2>&1 || rc=$?
[ $rc != 0 ] || fail "qcowctl compact by a user without write access succeeded"
grep -q 'write permission' "$T/out" || fail "qcowctl compact without write access: unclear message: $(cat "$T/out")"
"$QCOWCTL" compact "$MNT" >"$T/out" 2>&1 || fail "qcowctl compact by root failed: $(cat "$T/out")"

# chmod back: the other user is locked out again
chmod 0600 "$MNT" || fail "chmod 0600 of the view failed"
[ "$(view_stat)" = "600 0 0" ] || fail "after chmod 0600 the view shows $(view_stat)"
rc=0
as_other dd if="$MNT" of=/dev/null bs=64k count=1 status=none 2>/dev/null || rc=$?
[ $rc != 0 ] || fail "the other user still reads after chmod 0600"

# chown by root hands the view over: the new owner reads and may chmod
chown "$OTHER_UID:$OTHER_GID" "$MNT" || fail "chown of the view by root failed"
[ "$(view_stat)" = "600 $OTHER_UID $OTHER_GID" ] || fail "after chown the view shows $(view_stat)"
as_other dd if="$MNT" of=/dev/null bs=64k count=1 status=none 2>"$T/out" ||
	fail "the new owner cannot read the view: $(cat "$T/out")"
as_other chmod 0640 "$MNT" 2>"$T/out" || fail "the owner cannot chmod the view: $(cat "$T/out")"
[ "$(view_stat)" = "640 $OTHER_UID $OTHER_GID" ] || fail "chmod by the owner: the view shows $(view_stat)"
rc=0
as_other chown 0 "$MNT" 2>/dev/null || rc=$?
[ $rc != 0 ] || fail "a non-root owner could give the view away (chown)"
chown 0:0 "$MNT" && chmod 0600 "$MNT" || fail "chown/chmod back by root failed"

# none of it touched the image file
[ "$(img_stat)" = "600 0 0" ] || fail "chmod/chown of the view changed the image file to $(img_stat)"
qumount "$MNT" qcowctl
[ "$(img_stat)" = "600 0 0" ] || fail "after unmount the image file is $(img_stat), expected 600 0 0"
qcheck "$IMG"

# ---- a group-readable image, and a read-only mount ----------------------
chown "0:$OTHER_GID" "$IMG"
chmod 0664 "$IMG"
qmount "$IMG" "$MNT" -o ro,allow_other
[ "$(view_stat)" = "444 0 $OTHER_GID" ] || fail "a 0664 image mounted ro shows as $(view_stat), expected 444 0 $OTHER_GID"
rc=0
chmod 0666 "$MNT" 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "chmod on a read-only mount succeeded"
as_other dd if="$MNT" of=/dev/null bs=64k count=1 status=none 2>"$T/out" ||
	fail "the other user cannot read a 0444 ro view: $(cat "$T/out")"
qumount "$MNT"
[ "$(img_stat)" = "664 0 $OTHER_GID" ] || fail "the ro mount changed the image file to $(img_stat)"

# uid=/gid= still choose the owner shown
qmount "$IMG" "$MNT" -o "uid=$OTHER_UID,gid=0"
[ "$(view_stat)" = "664 $OTHER_UID 0" ] || fail "uid=/gid= mount shows $(view_stat), expected 664 $OTHER_UID 0"
qumount "$MNT"
qcheck "$IMG"
log "ok"
