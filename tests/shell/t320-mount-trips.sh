#!/bin/bash
# t320-mount-trips: what a user trips over when mounting (issue 9).
#  - a mountpoint that already is a mount point is refused before the image
#    is opened, naming what is mounted there: a live qcowfs mount, a file
#    bind-mounted from a tmpfs, a dead qcowfs mount; exit status 1, nothing
#    stacked, the mount below still works, the image untouched;
#  - the mountpoint file qcowfs created is removed again after each kind of
#    clean unmount (fusermount3 -u, umount, SIGTERM, qcowctl unmount); a
#    file that existed is left with its inode, mode and owner;
#  - an image file the user may read but not write: the message suggests
#    -o ro;
#  - /dev/fuse that cannot be opened: the message says what to check (the
#    module, the device's permissions, user_allow_other for allow_other);
#  - qcowfs --help documents no extended attributes (there are none).
# Fails on the code before issue 9: qcowfs stacked a second mount on a live
# one, left the file it created behind, and printed a bare "Permission
# denied".
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_root
need setpriv unshare mknod stat mount umount sha256sum

OTHER_UID=$(id -u nobody)
OTHER_GID=$(getent group nogroup | cut -d: -f3) || OTHER_GID=$OTHER_UID
as_other() { setpriv --reuid="$OTHER_UID" --regid="$OTHER_GID" --clear-groups -- "$@"; }

A=$T/a.qcow2
B=$T/b.qcow2
mkimg "$A" 16M
qio "$A" 'write -P 0x41 0 64k'
mkimg "$B" 16M
SUM_B=$(sha "$B")

# mounts_at PATH: how many mounts sit on PATH.
mounts_at() {
	awk -v m="$1" '$5 == m { n++ } END { print n + 0 }' /proc/self/mountinfo
}

# refused IMAGE MOUNTPOINT WHAT RE...: qcowfs IMAGE MOUNTPOINT must exit 1
# with a message matching every RE, and leave the one mount there alone.
refused() {
	local img=$1 mnt=$2 what=$3 rc=0 re
	shift 3
	timeout 10 "$QCOWFS" "$img" "$mnt" >"$T/out" 2>&1 || rc=$?
	cat "$T/out" >>"$T/qcowfs.log"
	[ $rc != 124 ] || fail "$what: qcowfs hung"
	[ $rc = 1 ] || fail "$what: qcowfs exited $rc, expected 1: $(cat "$T/out")"
	for re; do
		grep -qE -- "$re" "$T/out" || fail "$what: message does not match /$re/: $(cat "$T/out")"
	done
	[ "$(mounts_at "$mnt")" = 1 ] || fail "$what: $(mounts_at "$mnt") mounts on $mnt, expected the one that was there"
}

# ---- a live qcowfs mount is refused ------------------------------------
M=$T/a.raw
qmount "$A" "$M"
refused "$B" "$M" "mount over a live qcowfs mount" \
	"already a mount point" "fuse\.qcowfs" "from $A"
[ "$(sha "$B")" = "$SUM_B" ] || fail "the refused mount changed $B"
[ -z "$(pids_holding "$B")" ] || fail "a process holds $B after the refused mount"
[ "$(dd if="$M" bs=64k count=1 status=none | tr -d A | wc -c)" = 0 ] ||
	fail "the live mount does not read its data after the refused mount"
# refused before the image is opened: a file that is no image at all gets
# the mountpoint's message, not the image's
head -c 1M /dev/zero >"$T/junk.qcow2"
refused "$T/junk.qcow2" "$M" "junk image over a live mount" "already a mount point"
grep -qiE 'magic|not a qcow2|header' "$T/out" && fail "the image was opened before the mountpoint was checked: $(cat "$T/out")"
qumount "$M" qcowctl

# ---- a file bind-mounted from a tmpfs is refused -------------------------
mkdir "$T/tm"
mount -t tmpfs -o size=1M tmpfs "$T/tm" || fail "cannot mount a tmpfs"
_FSMOUNTS+=("$T/tm")
echo tmpfs-data >"$T/tm/file"
X=$T/x.raw
: >"$X"
mount --bind "$T/tm/file" "$X" || fail "cannot bind-mount a tmpfs file on $X"
_FSMOUNTS+=("$X")
refused "$B" "$X" "mount over a tmpfs-mounted file" "already a mount point" "tmpfs"
[ "$(cat "$X")" = tmpfs-data ] || fail "the tmpfs file under $X is not what it was"
umount "$X" || fail "cannot unmount the bind mount"
_forget _FSMOUNTS "$X"
[ -f "$X" ] && [ ! -s "$X" ] || fail "the file under the bind mount changed"
[ "$(sha "$B")" = "$SUM_B" ] || fail "the refused mounts changed $B"

# ---- a dead mount is named ---------------------------------------------------
D=$T/dead.raw
qmount "$A" "$D"
kill -9 "$QM_PID"
wait_gone "$QM_PID" 30 || fail "daemon survived kill -9"
_forget _MOUNTS "$D"
_FSMOUNTS+=("$D")   # cleanup: umount -l
rc=0
timeout 10 "$QCOWFS" "$B" "$D" >"$T/out" 2>&1 || rc=$?
[ $rc = 1 ] || fail "mount over a dead mount: qcowfs exited $rc: $(cat "$T/out")"
grep -q "fuse.qcowfs from $A" "$T/out" || fail "mount over a dead mount: what is mounted is not named: $(cat "$T/out")"
grep -q "fusermount3 -u" "$T/out" || fail "mount over a dead mount: no hint to unmount it: $(cat "$T/out")"
[ "$(mounts_at "$D")" = 1 ] || fail "a mount was stacked on the dead one"
fusermount3 -u "$D" 2>/dev/null || umount -l "$D"
_forget _FSMOUNTS "$D"
qcheck_nocorrupt "$A"

# ---- the created mountpoint goes at unmount, every clean way -------------
for how in fusermount qcowctl sigterm umount; do
	C=$T/created-$how.raw
	[ ! -e "$C" ] || fail "setup: $C exists"
	qmount "$A" "$C"
	case $how in
	umount)
		umount "$C" || fail "umount of the view failed"
		wait_gone "$QM_PID" 60 || fail "daemon still running 60 s after umount"
		_forget _MOUNTS "$C"
		;;
	*) qumount "$C" "$how" ;;
	esac
	[ ! -e "$C" ] || fail "the mountpoint file qcowfs created is still there after unmount ($how)"
	log "created mountpoint removed after $how"
done
qcheck "$A"

# ---- an existing mountpoint file stays as it was ---------------------------
E=$T/existing.raw
: >"$E"
chown "$OTHER_UID:$OTHER_GID" "$E"
chmod 0640 "$E"
before=$(stat -c '%i %a %u %g %s' "$E")
for how in fusermount sigterm; do
	qmount "$A" "$E"
	qumount "$E" "$how"
	[ -e "$E" ] || fail "the existing mountpoint file was removed at unmount ($how)"
	[ "$(stat -c '%i %a %u %g %s' "$E")" = "$before" ] ||
		fail "the existing mountpoint file changed ($how): $(stat -c '%i %a %u %g %s' "$E"), was $before"
done

# ---- a read-only image file: the hint is -o ro -------------------------------
chmod 0755 "$T"
R=$T/ro.qcow2
cp "$A" "$R"
chmod 0444 "$R"
mkdir -m 0777 "$T/other"
rc=0
as_other timeout 10 "$QCOWFS" "$R" "$T/other/ro.raw" >"$T/out" 2>&1 || rc=$?
[ $rc = 1 ] || fail "read-only image as another user: qcowfs exited $rc: $(cat "$T/out")"
grep -q "cannot open image" "$T/out" || fail "read-only image: unexpected message: $(cat "$T/out")"
grep -q "Permission denied" "$T/out" || fail "read-only image: the error is not named: $(cat "$T/out")"
grep -q -- "-o ro" "$T/out" || fail "read-only image: no hint to mount with -o ro: $(cat "$T/out")"
[ ! -e "$T/other/ro.raw" ] || fail "read-only image: the failed mount left the mountpoint file it created"
# the same with -o ro gets past the image (and no hint)
rc=0
as_other timeout 10 "$QCOWFS" -o ro "$R" "$T/other/ro.raw" >"$T/out" 2>&1 || rc=$?
if grep -q "cannot open image" "$T/out"; then
	fail "-o ro of a read-only image still cannot open it: $(cat "$T/out")"
fi
is_mounted "$T/other/ro.raw" && { _MOUNTS+=("$T/other/ro.raw"); qumount "$T/other/ro.raw"; }

# ---- /dev/fuse that cannot be opened: what to check -------------------------
# In a private mount namespace, a FUSE device node only root may open
# stands in for /dev/fuse; another user then cannot open it.
cp "$B" "$T/other/b.qcow2"
chown "$OTHER_UID:$OTHER_GID" "$T/other/b.qcow2"
mknod -m 0600 "$T/fuse-dev" c 10 229
for opts in rw allow_other; do
	rc=0
	unshare -m -- sh -c '
		mount --make-rprivate / && mount --bind "$1" /dev/fuse || exit 99
		shift
		exec setpriv --reuid="$1" --regid="$2" --clear-groups -- "$3" -o "$4" "$5" "$6"' \
		sh "$T/fuse-dev" "$OTHER_UID" "$OTHER_GID" "$QCOWFS" "$opts" \
		"$T/other/b.qcow2" "$T/other/dev.raw" >"$T/out" 2>&1 || rc=$?
	cat "$T/out" >>"$T/qcowfs.log"
	[ $rc != 99 ] || fail "setup: cannot put a private /dev/fuse in a mount namespace: $(cat "$T/out")"
	[ $rc = 1 ] || fail "unusable /dev/fuse (-o $opts): qcowfs exited $rc: $(cat "$T/out")"
	for re in '/dev/fuse' 'Permission denied' 'fuse module' 'permissions'; do
		grep -q -- "$re" "$T/out" || fail "unusable /dev/fuse (-o $opts): the message lacks '$re': $(cat "$T/out")"
	done
	if [ $opts = allow_other ]; then
		grep -q 'user_allow_other' "$T/out" ||
			fail "unusable /dev/fuse with allow_other: no word of user_allow_other: $(cat "$T/out")"
	fi
	[ ! -e "$T/other/dev.raw" ] || fail "the failed mount left the mountpoint file it created"
done

# ---- --help documents no extended attributes ------------------------------
"$QCOWFS" --help >"$T/out" 2>&1 || fail "qcowfs --help exited non-zero"
if grep -qiE 'getfattr|setfattr|xattr|extended attribute|user\.qcowfs' "$T/out"; then
	fail "qcowfs --help documents extended attributes, which do not exist: $(grep -iE 'fattr|xattr|attribute|user\.qcowfs' "$T/out")"
fi
grep -q 'qcowctl status' "$T/out" || fail "qcowfs --help does not point to qcowctl status for the status"
log "ok"
