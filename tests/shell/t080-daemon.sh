#!/bin/bash
# t080-daemon: the qcowfs command and the view's file semantics.
#  - exit codes and messages: no arguments, missing image, mountpoint that
#    is a directory, unknown -o option, --version, -o help;
#  - qcowfs exits 0 only once the view is usable, on the very next line;
#  - SIGTERM, SIGINT, fusermount3 -u, qcowctl unmount and umount each end
#    in a clean close (daemon gone, qemu-img check clean, data kept);
#    in the foreground (-f) the daemon exits 0;
#  - mount -t fuse (mount.fuse3), showing as type fuse.qcowfs;
#  - write/read back, truncate grows (qemu-img info agrees; shrinking is
#    refused), st_blocks follows the image's allocation, SEEK_DATA and
#    SEEK_HOLE, fallocate mode 0 succeeds, collapse/insert range fail with
#    EOPNOTSUPP, a ro mount fails writes with EROFS;
#  - the status ioctl (QCOWFS_IOC_STATUS) and qcowctl status;
#  - a full host file system: ENOSPC to the writer, the daemon keeps
#    serving, and once there is room again everything ends clean.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate truncate stat dd cmp mount umount mount.fuse3

IMG=$T/d.qcow2
MNT=$T/view.raw
mkimg "$IMG" 64M
qio "$IMG" 'write -P 0x61 1M 64k' 'write -P 0x62 10M 2M' 'write -P 0x63 67043328 64k'
raw_of "$IMG" "$T/d.raw"
SUM=$(sha "$IMG")

# runs CMD, expecting failure within 10 s and a message matching RE
expect_fail() {
	local what=$1 re=$2 rc=0
	shift 2
	timeout 10 "$@" >"$T/out" 2>&1 || rc=$?
	[ $rc != 124 ] || fail "$what: hung"
	[ $rc != 0 ] || fail "$what: exited 0 but should fail: $(head -n 3 "$T/out")"
	[ -z "$re" ] || grep -qiE "$re" "$T/out" || fail "$what: message does not match /$re/: $(head -n 5 "$T/out")"
}

# ---- command line ----------------------------------------------------------
expect_fail "qcowfs without arguments" 'usage|image|mountpoint' "$QCOWFS"
expect_fail "qcowfs with a missing image" 'no such file|does not exist|not found|cannot open' \
	"$QCOWFS" "$T/missing.qcow2" "$MNT"
is_mounted "$MNT" && fail "qcowfs with a missing image left a mount"
mkdir "$T/adir"
expect_fail "qcowfs with a directory as mountpoint" 'directory|regular file|not a file' \
	"$QCOWFS" "$IMG" "$T/adir"
is_mounted "$T/adir" && fail "qcowfs mounted over a directory"
expect_fail "qcowfs -o no_such_option" 'no_such_option' "$QCOWFS" "$IMG" "$MNT" -o no_such_option
is_mounted "$MNT" && fail "qcowfs with an unknown option left a mount"
expect_fail "qcowfs -o cache_size=banana" 'cache_size' "$QCOWFS" "$IMG" "$MNT" -o cache_size=banana
is_mounted "$MNT" && fail "qcowfs with a bad option value left a mount"
[ "$(sha "$IMG")" = "$SUM" ] || fail "failed qcowfs invocations changed the image"
[ -z "$(pids_holding "$IMG")" ] || fail "a process still holds the image after the refused mounts"

"$QCOWFS" --version >"$T/out" 2>&1 || fail "qcowfs --version exited non-zero: $(cat "$T/out")"
grep -qE '[0-9]+\.[0-9]+' "$T/out" || fail "qcowfs --version shows no version number: $(cat "$T/out")"
grep -qi 'fuse' "$T/out" || fail "qcowfs --version does not name the libfuse version: $(cat "$T/out")"
"$QCOWFS" -o help >"$T/out" 2>&1 || fail "qcowfs -o help exited non-zero: $(head -n 5 "$T/out")"
for o in ro allow_other cache_size compact compact_threshold compact_quiet_ms runtime_asserts; do
	grep -qw -- "$o" "$T/out" || fail "qcowfs -o help does not mention the option $o"
done
is_mounted "$MNT" && fail "qcowfs -o help mounted something"

# ---- usable on the next line ---------------------------------------------
for i in 1 2 3 4 5; do
	rm -f "$MNT"
	qmount "$IMG" "$MNT"
	[ "$(file_size "$MNT")" = $((64 << 20)) ] || fail "view size is $(file_size "$MNT") right after mount ($i)"
	cmp -n 65536 -i 0:1048576 <(dd if="$MNT" bs=64k count=1 skip=16 status=none) "$T/d.raw" ||
		fail "view not readable right after qcowfs exited ($i)"
	qumount "$MNT"
done
# (qcowfs created it each time: the unmount takes it away again, t320)
[ ! -e "$MNT" ] || fail "the mountpoint file qcowfs created is still there after unmount"

# ---- clean close, every way ------------------------------------------------
n=0
for how in fusermount qcowctl sigterm sigint umount; do
	n=$((n + 1))
	qmount "$IMG" "$MNT"
	printf 'close %s' "$how" | dd of="$MNT" bs=1 seek=$((20 << 20 | n * 4096)) conv=notrunc status=none
	case $how in
	sigint)
		kill -INT "$QM_PID"
		wait_gone "$QM_PID" 60 || fail "daemon still running 60 s after SIGINT"
		wait_until 10 eval '! is_mounted "$MNT"' || fail "still mounted after SIGINT"
		_forget _MOUNTS "$MNT"
		;;
	umount)
		umount "$MNT" || fail "umount of the view failed"
		wait_gone "$QM_PID" 60 || fail "daemon still running 60 s after umount"
		_forget _MOUNTS "$MNT"
		;;
	*) qumount "$MNT" "$how" ;;
	esac
	qcheck "$IMG"
	[ "$(qinfo_field "$IMG" dirty-flag)" = false ] || fail "dirty flag set after a clean close ($how)"
	raw_of "$IMG" "$T/now.raw"
	got=$(dd if="$T/now.raw" bs=1 skip=$((20 << 20 | n * 4096)) count=$((6 + ${#how})) status=none)
	[ "$got" = "close $how" ] || fail "data written before the close ($how) is not in the image: '$got'"
	log "clean close by $how"
done
# replay those writes into the reference copy
raw_of "$IMG" "$T/d.raw"

# foreground: the process itself exits 0 after unmount
bg_start "$QCOWFS" -f "$IMG" "$MNT"
fpid=$BG_PID
_MOUNTS+=("$MNT")
_DAEMON[$MNT]=$fpid
wait_until 30 is_mounted "$MNT" || fail "qcowfs -f did not mount within 30 s"
same_file "$MNT" "$T/d.raw" "view of qcowfs -f"
fusermount3 -u "$MNT"
rc=0
timeout 60 tail --pid="$fpid" -f /dev/null || true
wait "$fpid" || rc=$?
_forget _PIDS "$fpid"
_forget _MOUNTS "$MNT"
[ $rc = 0 ] || fail "qcowfs -f exited $rc after fusermount3 -u"
qcheck "$IMG"

# mount(8) through mount.fuse3.  (mount -t fuse.qcowfs looks for qcowfs
# only in /sbin:/bin:/usr/sbin:/usr/bin, whatever PATH says, so a test of
# the build tree names the program: -t fuse PROGRAM#IMAGE.)
mount -t fuse "$QCOWFS#$IMG" "$MNT" >"$T/out" 2>&1 ||
	fail "mount -t fuse '$QCOWFS#$IMG' failed: $(cat "$T/out")"
_MOUNTS+=("$MNT")
is_mounted "$MNT" || fail "mount -t fuse.qcowfs returned 0 but nothing is mounted"
_DAEMON[$MNT]=$(daemon_pid "$IMG" "$MNT") || fail "no daemon after mount -t fuse.qcowfs"
[ "$(fuse_type "$MNT")" = fuse.qcowfs ] || fail "mount type is $(fuse_type "$MNT"), not fuse.qcowfs"
same_file "$MNT" "$T/d.raw" "view mounted with mount -t fuse.qcowfs"
qumount "$MNT"
qcheck "$IMG"

# ---- file semantics --------------------------------------------------------
qmount "$IMG" "$MNT"
# write / read back, unaligned
head -c 100000 /dev/urandom >"$T/chunk"
dd if="$T/chunk" of="$MNT" bs=100000 seek=3333333 oflag=seek_bytes conv=notrunc status=none
dd if="$T/chunk" of="$T/d.raw" bs=100000 seek=3333333 oflag=seek_bytes conv=notrunc status=none
cmp -n 100000 <(dd if="$MNT" bs=100000 skip=3333333 iflag=skip_bytes count=1 status=none) "$T/chunk" ||
	fail "read back of an unaligned write differs"

# st_blocks follows the image file's allocation
sync "$MNT"
b0=$(file_blocks "$MNT")
head -c $((16 << 20)) /dev/urandom >"$T/big"
dd if="$T/big" of="$MNT" bs=1M seek=30 conv=notrunc,fsync status=none
dd if="$T/big" of="$T/d.raw" bs=1M seek=30 conv=notrunc status=none
wait_until 10 eval '[ $(file_blocks "$MNT") -ge $((b0 + (16 << 20) / 512)) ]' ||
	fail "st_blocks of the view went from $b0 to $(file_blocks "$MNT") after 16 MiB of new data"
sleep 1.5 # attribute timeout
vb=$(file_blocks "$MNT")
ib=$(file_blocks "$IMG")
[ $((vb - ib)) -le $((ib / 20)) ] && [ $((ib - vb)) -le $((ib / 20)) ] ||
	fail "st_blocks of the view ($vb) is not the image's allocation ($ib)"

# SEEK_DATA / SEEK_HOLE on the data qemu-io wrote (64 KiB clusters):
# [1M, 1M+64K), [10M, 12M), [64M-64K, 64M); the clusters of 3333333+100000
# and [20M, 20M+64K) and [30M, 46M) written above
$PYTHON - "$MNT" <<'EOF' || fail "SEEK_DATA/SEEK_HOLE answers are wrong"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
M, K = 1 << 20, 1 << 10
def seek(off, whence):
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return -e.errno
D, H = os.SEEK_DATA, os.SEEK_HOLE
cases = [
    (0, D, M), (M, H, M + 64 * K), (M + 100, D, M + 100), (M + 64 * K, D, 3333333 // (64 * K) * (64 * K)),
    (0, H, 0), (10 * M, H, 12 * M), (12 * M - 1, H, 12 * M),
    (64 * M - 64 * K, H, 64 * M), (64 * M - 1, D, 64 * M - 1),
    (64 * M, D, -errno.ENXIO), (64 * M, H, -errno.ENXIO),
]
bad = 0
for off, whence, want in cases:
    got = seek(off, whence)
    if got != want:
        print("lseek(%d, %s) = %d, expected %d" % (off, "SEEK_DATA" if whence == D else "SEEK_HOLE", got, want))
        bad += 1
# data starts somewhere in [12M, 30M] and there is data at 30M..46M
got = seek(12 * M, D)
if not 12 * M <= got <= 30 * M:
    print("lseek(12M, SEEK_DATA) = %d, expected data by 30M" % got)
    bad += 1
sys.exit(1 if bad else 0)
EOF

# fallocate: mode 0 inside the size succeeds and keeps the data
fallocate -o 1M -l 2M "$MNT" 2>"$T/out" || fail "fallocate mode 0 inside the file failed: $(cat "$T/out")"
for op in --collapse-range --insert-range; do
	rc=0
	fallocate $op -o 0 -l 65536 "$MNT" >"$T/out" 2>&1 || rc=$?
	[ $rc != 0 ] || fail "fallocate $op succeeded"
	grep -q 'Operation not supported' "$T/out" ||
		fail "fallocate $op: expected EOPNOTSUPP (\"Operation not supported\"), got: $(cat "$T/out")"
done
# (ENOSYS would have disabled fallocate for the whole connection)
fallocate -o 2M -l 4096 "$MNT" 2>"$T/out" || fail "fallocate mode 0 fails after the refused modes: $(cat "$T/out")"
same_file "$MNT" "$T/d.raw" "view after fallocate calls"

# status ioctl
PYTHONPATH=$TESTDIR $PYTHON - "$MNT" "$IMG" <<'EOF' || fail "the status is wrong"
import os, sys, qcowfs_ctl
text = qcowfs_ctl.status_text(sys.argv[1])
kv = dict(l.split("=", 1) for l in text.splitlines() if "=" in l)
need = ("virtual_size cluster_size file_size file_allocated clusters_total clusters_header "
        "clusters_referenced clusters_junk clusters_erased clusters_available clusters_copies "
        "clusters_roots clusters_pending moves_in_flight bytes_reclaimed bytes_discarded "
        "compactions_done clusters_moved compacting compact_progress punch_supported read_only").split()
missing = [k for k in need if k not in kv]
if missing:
    sys.exit("the status lacks %s:\n%s" % (missing, text))
if int(kv["virtual_size"]) != os.stat(sys.argv[1]).st_size:
    sys.exit("status virtual_size %s, view size %d" % (kv["virtual_size"], os.stat(sys.argv[1]).st_size))
if int(kv["cluster_size"]) != 65536:
    sys.exit("status cluster_size %s" % kv["cluster_size"])
fs = os.stat(sys.argv[2]).st_size
if abs(int(kv["file_size"]) - fs) > 16 << 20:
    sys.exit("status file_size %s, image file has %d bytes" % (kv["file_size"], fs))
EOF
"$QCOWCTL" status "$MNT" >"$T/out" 2>&1 || fail "qcowctl status failed: $(cat "$T/out")"
"$QCOWCTL" status --json "$MNT" >"$T/status.json" 2>"$T/out" || fail "qcowctl status --json failed: $(cat "$T/out")"
$PYTHON -c 'import json, sys; json.load(open(sys.argv[1]))' "$T/status.json" ||
	fail "qcowctl status --json is not JSON: $(head -c 300 "$T/status.json")"
grep -q 67108864 "$T/status.json" || fail "qcowctl status --json does not show the virtual size"

# truncate: grow works; an open with O_TRUNC (it would empty the disk) is
# refused (shrinking by truncate(1) is t230's)
truncate -s 100M "$MNT" || fail "truncate -s 100M of the view failed"
truncate -s 100M "$T/d.raw"
[ "$(file_size "$MNT")" = $((100 << 20)) ] || fail "view size $(file_size "$MNT") after truncate -s 100M"
printf 'end' | dd of="$MNT" bs=1 seek=$(((100 << 20) - 3)) conv=notrunc status=none
printf 'end' | dd of="$T/d.raw" bs=1 seek=$(((100 << 20) - 3)) conv=notrunc status=none
rc=0
sh -c ': >"$1"' sh "$MNT" 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "an open with O_TRUNC (emptying the disk) succeeded"
[ "$(file_size "$MNT")" = $((100 << 20)) ] || fail "a refused O_TRUNC changed the size to $(file_size "$MNT")"
same_file "$MNT" "$T/d.raw" "view after writes, fallocate and truncate"
qumount "$MNT"
qcheck "$IMG"
[ "$(qinfo_field "$IMG" virtual-size)" = $((100 << 20)) ] ||
	fail "qemu-img info shows virtual size $(qinfo_field "$IMG" virtual-size) after growing the view to 100M"
qcompare "$IMG" "$T/d.raw" "image after the file-semantics checks"

# ---- read-only mount -------------------------------------------------------
SUM=$(sha "$IMG")
qmount "$IMG" "$MNT" -o ro
same_file "$MNT" "$T/d.raw" "ro view"
expect_fail "write to a ro view" 'Read-only file system' dd if=/dev/zero of="$MNT" bs=512 count=1 conv=notrunc
expect_fail "truncate of a ro view" 'Read-only file system' truncate -s 200M "$MNT"
expect_fail "fallocate on a ro view" 'Read-only file system|Bad file descriptor' fallocate -o 0 -l 4096 "$MNT"
PYTHONPATH=$TESTDIR $PYTHON - "$MNT" <<'EOF' || fail "ro view: the status does not say read_only=1"
import sys, qcowfs_ctl
kv = qcowfs_ctl.status(sys.argv[1])
sys.exit(0 if kv.get("read_only", "").strip() in ("1", "true") else 1)
EOF
qumount "$MNT"
[ "$(sha "$IMG")" = "$SUM" ] || fail "a ro mount changed the image"

# ---- host file system full: ENOSPC reaches the writer, the daemon lives ----
SMALL=$T/small
mkdir -p "$SMALL"
mount -t tmpfs -o size=40M tmpfs "$SMALL" || fail "cannot mount a small tmpfs"
_FSMOUNTS+=("$SMALL")
mkimg "$SMALL/full.qcow2" 1G
head -c $((6 << 20)) /dev/zero >"$SMALL/filler"
qmount "$SMALL/full.qcow2" "$MNT"
rc=0
dd if=/dev/urandom of="$MNT" bs=1M count=64 conv=notrunc,fsync status=none 2>"$T/out" || rc=$?
[ $rc != 0 ] || fail "writing 64 MiB into an image on a 40 MiB file system succeeded"
grep -q 'No space left on device' "$T/out" || fail "a full host file system gave: $(cat "$T/out") (expected ENOSPC)"
is_mounted "$MNT" || fail "the mount is gone after ENOSPC"
dd if="$MNT" of=/dev/null bs=1M count=64 status=none || fail "reads fail after ENOSPC"
rm -f "$SMALL/filler"
printf 'after ENOSPC' | dd of="$MNT" bs=1 seek=$((900 << 20)) conv=notrunc,fsync status=none ||
	fail "a write with room again fails after ENOSPC"
dd if="$MNT" bs=1M status=none | cmp - <(dd if="$MNT" bs=1M status=none) || fail "the view reads inconsistently after ENOSPC"
cp --sparse=always "$MNT" "$T/full-view.raw"
qumount "$MNT"
qcheck "$SMALL/full.qcow2"
qcompare "$SMALL/full.qcow2" "$T/full-view.raw" "image vs view after ENOSPC"
rm -f "$T/full-view.raw"
umount "$SMALL"
_forget _FSMOUNTS "$SMALL"
log "ok"
