#!/bin/bash
# t240-snapshots: internal snapshots (issue 7).
#  1. QEMU interop offline, both directions: qcowctl snapshot create/list/
#     apply/delete and qemu-img snapshot -c/-l/-a/-d on the same image;
#     every snapshot reads byte-exact through qemu-img convert -l and
#     through qcowfs -o snapshot=; qemu-img check clean after each step;
#     the same on a version 2 image.
#  2. Online under fio load: fio (verify=crc32c) writes the view while
#     qcowctl snapshot create runs three times (fio stopped for each, the
#     view's sha256 taken right after); then a delete and a compaction;
#     after the unmount every snapshot left reads by qemu-img convert -l
#     exactly what the view held at its create.
#  2b. Snapshots taken while a writer never pauses: two writers put
#     self-describing 16 KiB records (offset, sequence number, checksum,
#     the same in each of its four 4 KiB blocks) at random places through
#     O_DIRECT, with discards among them, while compaction runs and
#     qcowctl snapshot create runs four times; every snapshot, read by
#     QEMU, holds only whole records at their own offsets or zeros (a
#     snapshot is a point between requests: no torn record), and records
#     no newer than what the writers had issued when the create returned.
#  3. A snapshot mounted read-only (-o snapshot=) next to the read-write
#     mount of the same image: it reads right, the read-write mount's
#     compaction pauses and says why, delete and apply are refused until
#     the snapshot mount ends; apply without --force is refused.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fio sha256sum

IMG=$T/a.qcow2

# view_sha MOUNTPOINT [direct]: sha256 of the raw view (through the
# kernel's page cache, or with O_DIRECT: fio's O_DIRECT writes bypass the
# cache, which may still hold pages read or written before)
view_sha() {
	local flag=
	[ "${2:-}" = direct ] && flag=iflag=direct
	dd if="$1" bs=4M $flag status=none | sha256sum | cut -d' ' -f1
}

# snap_sha IMAGE NAME: sha256 of the snapshot as QEMU reads it
snap_sha() {
	qemu-img convert -U -f qcow2 -O raw -l "snapshot.name=$2" "$1" "$T/snap.raw" >>"$T/qemu.log" 2>&1 ||
		fail "qemu-img convert -l snapshot.name=$2 $1 failed: $(tail -n 3 "$T/qemu.log")"
	sha "$T/snap.raw"
}

# active_sha IMAGE
active_sha() {
	raw_of "$1" "$T/active.raw"
	sha "$T/active.raw"
}

ctl() { "$QCOWCTL" "$@" >>"$T/ctl.log" 2>&1 || fail "qcowctl $* failed: $(tail -n 3 "$T/ctl.log")"; }

# qemu_has IMAGE NAME: qemu-img snapshot -l lists NAME
qemu_has() { qemu-img snapshot -U -l "$1" | awk 'NR > 2 { print $2 }' | grep -qx "$2"; }

# ---- 1. interop offline ------------------------------------------------------
interop() {
	local opts=$1
	rm -f "$IMG"
	mkimg "$IMG" 64M "$opts"
	qio "$IMG" "write -P 0x11 0 8M" "write -P 0x12 40M 1M"
	local sha_one sha_q sha_two
	sha_one=$(active_sha "$IMG")
	ctl snapshot create one "$IMG"
	qcheck "$IMG"
	qio "$IMG" "write -P 0x21 4M 8M" "discard 40M 1M"
	sha_q=$(active_sha "$IMG")
	qemu-img snapshot -c qemu1 "$IMG" >>"$T/qemu.log" 2>&1 || fail "qemu-img snapshot -c"
	qio "$IMG" "write -P 0x31 10M 3M"
	sha_two=$(active_sha "$IMG")
	ctl snapshot create two "$IMG"
	qcheck "$IMG"
	qio "$IMG" "write -P 0x41 0 1M"

	# QEMU sees ours, we see QEMU's
	qemu_has "$IMG" one || fail "qemu-img snapshot -l does not list 'one' ($opts)"
	qemu_has "$IMG" two || fail "qemu-img snapshot -l does not list 'two' ($opts)"
	"$QCOWCTL" snapshot list "$IMG" >"$T/list.txt" 2>>"$T/ctl.log" || fail "qcowctl snapshot list"
	for n in one qemu1 two; do
		grep -q " $n " "$T/list.txt" || fail "qcowctl snapshot list misses $n: $(cat "$T/list.txt")"
	done
	# ids as QEMU numbers them
	[ "$(qemu-img snapshot -U -l "$IMG" | awk '$2 == "two" { print $1 }')" = 3 ] ||
		fail "snapshot 'two' does not have id 3: $(qemu-img snapshot -l "$IMG")"
	[ "$(snap_sha "$IMG" one)" = "$sha_one" ] || fail "qemu-img reads snapshot 'one' wrong ($opts)"
	[ "$(snap_sha "$IMG" qemu1)" = "$sha_q" ] || fail "qemu-img reads its own snapshot wrong after ours ($opts)"
	[ "$(snap_sha "$IMG" two)" = "$sha_two" ] || fail "qemu-img reads snapshot 'two' wrong ($opts)"

	# qcowfs reads QEMU's snapshot and ours
	qmount "$IMG" "$T/snap.view" -o snapshot=qemu1
	[ "$(view_sha "$T/snap.view")" = "$sha_q" ] || fail "qcowfs -o snapshot=qemu1 reads wrong ($opts)"
	qumount "$T/snap.view"
	qmount "$IMG" "$T/snap.view" -o snapshot=1
	[ "$(view_sha "$T/snap.view")" = "$sha_one" ] || fail "qcowfs -o snapshot=1 (by id) reads wrong ($opts)"
	qumount "$T/snap.view"

	# QEMU applies and deletes ours
	qemu-img snapshot -a one "$IMG" >>"$T/qemu.log" 2>&1 || fail "qemu-img snapshot -a one"
	[ "$(active_sha "$IMG")" = "$sha_one" ] || fail "after qemu-img snapshot -a one the disk differs ($opts)"
	qcheck "$IMG"
	qemu-img snapshot -d two "$IMG" >>"$T/qemu.log" 2>&1 || fail "qemu-img snapshot -d two"
	qcheck "$IMG"
	[ "$(snap_sha "$IMG" qemu1)" = "$sha_q" ] || fail "QEMU's delete of ours changed qemu1 ($opts)"

	# we apply and delete QEMU's
	ctl snapshot apply qemu1 "$IMG"
	[ "$(active_sha "$IMG")" = "$sha_q" ] || fail "after qcowctl snapshot apply qemu1 the disk differs ($opts)"
	qcheck "$IMG"
	qio "$IMG" "write -P 0x51 20M 2M"
	local size_before
	size_before=$(file_size "$IMG")
	ctl snapshot delete qemu1 "$IMG"
	qcheck "$IMG"
	qemu_has "$IMG" qemu1 && fail "qemu1 still listed after qcowctl snapshot delete"
	[ "$(snap_sha "$IMG" one)" = "$sha_one" ] || fail "snapshot 'one' changed ($opts)"
	ctl snapshot delete one "$IMG"
	qcheck "$IMG"
	"$QCOWCTL" check "$IMG" >>"$T/ctl.log" 2>&1 || fail "qcowctl check after deleting every snapshot"
	# what only the snapshots held is free now: compaction gives it back
	local active
	active=$(active_sha "$IMG")
	ctl compact "$IMG"
	qcheck "$IMG"
	[ "$(file_size "$IMG")" -lt "$size_before" ] ||
		fail "deleting the snapshots and compacting left the file at $(file_size "$IMG") bytes (was $size_before)"
	[ "$(active_sha "$IMG")" = "$active" ] || fail "compaction after the deletes changed the disk ($opts)"
	log "interop ($opts): ok; the file went from $size_before to $(file_size "$IMG") bytes after the deletes"
}
interop compat=1.1
interop compat=0.10,cluster_size=4096

# ---- 2. online under fio load ------------------------------------------------
rm -f "$IMG"
mkimg "$IMG" 64M
MNT=$T/view.raw
qmount "$IMG" "$MNT" -o compact_threshold=1M,compact_quiet_ms=100
dd if=/dev/urandom of="$MNT" bs=1M count=32 conv=notrunc,fsync status=none
cat >"$T/job.fio" <<EOF
[global]
filename=$MNT
thread
ioengine=psync
direct=1
randrepeat=0
verify=crc32c
verify_fatal=1
do_verify=1
verify_backlog=64

[w]
rw=randwrite
bsrange=4k-64k
size=24m
offset=0
numjobs=2
offset_increment=24m
time_based
runtime=120
EOF
# jobs as threads of one process: SIGSTOP stops all of them
bg_start fio --output="$T/fio.out" "$T/job.fio"
FIO=$BG_PID
declare -A held=()
for n in 1 2 3; do
	sleep 1
	kill -0 "$FIO" 2>/dev/null || break
	kill -STOP "$FIO"
	sleep 0.3   # psync + O_DIRECT: nothing of fio's is in flight once stopped
	ctl snapshot create "live$n" "$MNT"
	held[live$n]=$(view_sha "$MNT" direct)
	[ "$(view_sha "$MNT" direct)" = "${held[live$n]}" ] || fail "the view changes while fio is stopped"
	kill -CONT "$FIO"
done
# fio runs until told to stop (SIGINT: a clean stop, exit status 128)
sleep 1
kill -INT "$FIO"
rc=0
wait "$FIO" || rc=$?
{ [ $rc = 0 ] || [ $rc = 128 ]; } && [ "$(grep -c 'err= 0' "$T/fio.out")" = 2 ] && ! grep -qiE 'verify.*fail|bad magic|crc32c.*wanted' "$T/fio.out" ||
	fail "fio failed (exit $rc) while snapshots were taken: $(grep -iE 'err|verify' "$T/fio.out" | head -n 5)"
[ ${#held[@]} = 3 ] || fail "fio ended before three snapshots were taken"
"$QCOWCTL" snapshot list "$MNT" >"$T/live-list.txt" 2>>"$T/ctl.log" || fail "snapshot list on the mount"
grep -q ' live1 ' "$T/live-list.txt" || fail "snapshot list on the mount misses live1: $(cat "$T/live-list.txt")"
ctl snapshot delete live2 "$MNT"
unset 'held[live2]'
fallocate -p -o 0 -l 32M "$MNT"
dd if=/dev/zero bs=1M count=32 status=none | cmp -s - <(dd if="$MNT" bs=1M count=32 iflag=direct status=none) ||
	fail "the punched range does not read zeros"
final=$(view_sha "$MNT" direct)
ctl compact "$MNT"
[ "$(view_sha "$MNT" direct)" = "$final" ] || fail "compaction changed the view"
qumount "$MNT" qcowctl
qcheck "$IMG"
for s in "${!held[@]}"; do
	[ "$(snap_sha "$IMG" "$s")" = "${held[$s]}" ] || fail "snapshot $s does not read what the view held at its create"
done
[ "$(active_sha "$IMG")" = "$final" ] || fail "the active disk after unmount differs from the view"
qemu_has "$IMG" live2 && fail "live2 still there after its delete"
log "online: ${#held[@]} snapshots read right after fio, delete and compaction"

# ---- 2b. snapshots while the writers never pause -------------------------------
cat >"$T/recwriter.py" <<'PYEOF'
# recwriter.py VIEW REGION_START REGION_LEN SEED STOPFILE SEQFILE: writes
# 16 KiB records (4 blocks of 4 KiB, each: magic, offset, seq, crc32 of
# the block's payload) at random 16 KiB-aligned places of the region with
# O_DIRECT, and now and then punches one record's place; keeps the
# highest sequence number issued in SEQFILE (written after each record)
# until STOPFILE exists.  Sequence numbers carry the writer in bit 40.
import mmap, os, random, struct, sys, zlib, fcntl
view, start, length, seed, stopfile, seqfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
REC, BLK = 16384, 4096
rng = random.Random(seed)
fd = os.open(view, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, REC)
seq = seed << 40
FALLOC_PUNCH = 0x03   # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
while not os.path.exists(stopfile):
    off = start + rng.randrange(length // REC) * REC
    if rng.random() < 0.1:
        if libc.fallocate(fd, FALLOC_PUNCH, off, REC) != 0:
            sys.exit('punch failed: errno %d' % ctypes.get_errno())
        continue
    seq += 1
    for b in range(4):
        payload = rng.randbytes(BLK - 32)
        hdr = struct.pack('<8sQQI4x', b'QCOWREC1', off, seq, zlib.crc32(payload))
        buf[b * BLK:(b + 1) * BLK] = hdr + payload
    if os.pwrite(fd, buf, off) != REC:
        sys.exit('short write')
    with open(seqfile + '.tmp', 'w') as f:
        f.write('%d\n' % seq)
    os.rename(seqfile + '.tmp', seqfile)
PYEOF
cat >"$T/recverify.py" <<'PYEOF'
# recverify.py RAW LIMIT0 LIMIT1: every 16 KiB record of RAW is all zeros
# or four valid blocks of one record written at that offset; writer w's
# records (bit 40 of seq) are no newer than LIMITw.  Prints the records.
import struct, sys, zlib
raw, limits = sys.argv[1], [int(sys.argv[2]), int(sys.argv[3])]
REC, BLK = 16384, 4096
n = 0
with open(raw, 'rb') as f:
    off = 0
    while True:
        rec = f.read(REC)
        if not rec:
            break
        if rec.count(0) != len(rec):
            seqs = set()
            for b in range(4):
                blk = rec[b * BLK:(b + 1) * BLK]
                magic, o, seq, crc = struct.unpack('<8sQQI4x', blk[:32])
                if magic != b'QCOWREC1' or o != off or zlib.crc32(blk[32:]) != crc:
                    sys.exit('offset %d block %d: not a whole record (magic %r, offset %d, crc ok %s)' %
                             (off, b, magic, o, zlib.crc32(blk[32:]) == crc))
                seqs.add(seq)
            if len(seqs) != 1:
                sys.exit('offset %d: a torn record (blocks of sequence numbers %s)' % (off, sorted(seqs)))
            seq = seqs.pop()
            if seq > limits[seq >> 40]:
                sys.exit('offset %d: record %d is newer than the snapshot (writer %d had issued up to %d)' %
                         (off, seq, seq >> 40, limits[seq >> 40]))
            n += 1
        off += REC
print(n)
PYEOF
rm -f "$IMG"
mkimg "$IMG" 64M
qmount "$IMG" "$MNT" -o compact_threshold=1M,compact_quiet_ms=100
rm -f "$T/stop" "$T/seq0" "$T/seq1"
bg_start "$PYTHON" "$T/recwriter.py" "$MNT" 0 $((32 << 20)) 0 "$T/stop" "$T/seq0"
W0=$BG_PID
bg_start "$PYTHON" "$T/recwriter.py" "$MNT" $((32 << 20)) $((32 << 20)) 1 "$T/stop" "$T/seq1"
W1=$BG_PID
wait_until 30 test -s "$T/seq1" || fail "the record writers did not start"
declare -A limit0=() limit1=()
for n in 1 2 3 4; do
	sleep 0.7
	kill -0 "$W0" 2>/dev/null && kill -0 "$W1" 2>/dev/null || fail "a record writer died before snapshot $n"
	ctl snapshot create "busy$n" "$MNT"
	# what the writers had issued when the create returned bounds what
	# the snapshot may hold (a record issued later cannot be in it)
	limit0[busy$n]=$(cat "$T/seq0")
	limit1[busy$n]=$(cat "$T/seq1")
	[ "$n" = 2 ] && ctl compact "$MNT"
done
touch "$T/stop"
wait "$W0" || fail "record writer 0 failed"
wait "$W1" || fail "record writer 1 failed"
_forget _PIDS "$W0"
_forget _PIDS "$W1"
ctl snapshot delete busy3 "$MNT"
ctl compact "$MNT"
qumount "$MNT" qcowctl
qcheck "$IMG"
for s in busy1 busy2 busy4; do
	qemu-img convert -U -f qcow2 -O raw -l "snapshot.name=$s" "$IMG" "$T/snap.raw" >>"$T/qemu.log" 2>&1 ||
		fail "qemu-img convert -l snapshot.name=$s failed"
	# one more record each may be issued between the create's return
	# and the read of the sequence file
	records=$("$PYTHON" "$T/recverify.py" "$T/snap.raw" $((${limit0[$s]} + 1)) $((${limit1[$s]} + 1)) 2>&1) ||
		fail "snapshot $s taken under the writers is not consistent: $records"
	log "busy: snapshot $s holds $records whole records"
done
raw_of "$IMG" "$T/active.raw"
"$PYTHON" "$T/recverify.py" "$T/active.raw" $((1 << 62)) $((1 << 62)) >/dev/null ||
	fail "the active disk holds a torn record"

# ---- 3. a snapshot mounted next to the read-write mount ----------------------
rm -f "$IMG"
mkimg "$IMG" 64M
qmount "$IMG" "$MNT" -o compact_threshold=1M,compact_quiet_ms=100
dd if=/dev/urandom of="$MNT" bs=1M count=32 conv=notrunc,fsync status=none
ctl snapshot create base "$MNT"
base=$(view_sha "$MNT")
dd if=/dev/urandom of="$MNT" bs=1M seek=8 count=16 conv=notrunc,fsync status=none
qmount "$IMG" "$T/snap.view" -o snapshot=base
[ "$(view_sha "$T/snap.view")" = "$base" ] || fail "-o snapshot=base next to the rw mount reads wrong"
[ ! -w "$T/snap.view" ] || [ "$(id -u)" = 0 ] || fail "the snapshot view is writable"
echo x | dd of="$T/snap.view" conv=notrunc status=none 2>/dev/null && fail "a write to the snapshot view worked"
# the rw side: discards and a compaction, which must pause and say why
fallocate -p -o 0 -l 32M "$MNT"
"$QCOWCTL" compact "$MNT" >>"$T/ctl.log" 2>&1 || true
wait_until 10 eval '[ "$(status_field "$MNT" blocker)" = "a snapshot is mounted read-only by another process" ]' ||
	fail "the rw mount's blocker is '$(status_field "$MNT" blocker)', not the snapshot reader"
[ "$(view_sha "$T/snap.view")" = "$base" ] || fail "the snapshot view changed while the rw mount discarded"
"$QCOWCTL" snapshot delete base "$MNT" 2>"$T/del.err" && fail "delete worked while the snapshot is mounted"
grep -q "mounted read-only by another process" "$T/del.err" || fail "delete refused without saying why: $(cat "$T/del.err")"
"$QCOWCTL" snapshot apply base "$MNT" 2>"$T/apply.err" && fail "apply without --force worked on a live mount"
grep -q -- "--force" "$T/apply.err" || fail "apply without --force refused without naming it: $(cat "$T/apply.err")"
qumount "$T/snap.view"
# apply --force: the view shows the snapshot at once (page cache dropped)
cat "$MNT" >/dev/null
ctl snapshot apply --force base "$MNT"
[ "$(view_sha "$MNT")" = "$base" ] || fail "after apply --force the view does not show the snapshot"
ctl snapshot delete base "$MNT"
ctl compact "$MNT"
[ -z "$(status_field "$MNT" blocker)" ] || fail "blocker after the reader left: $(status_field "$MNT" blocker)"
qumount "$MNT" qcowctl
qcheck "$IMG"
[ "$(active_sha "$IMG")" = "$base" ] || fail "the disk after unmount is not the applied snapshot"
# next to QEMU as the writer: a snapshot mount shares writes like qemu-img -U
ctl snapshot create final "$IMG"
final=$(snap_sha "$IMG" final)
bg_start qemu-io -f qcow2 -c 'sleep 20000' "$IMG"
QIO=$BG_PID
# QEMU's writer refuses to share writing: lock byte 201 on the image's inode
ino=$(stat -c %i "$IMG")
wait_until 10 eval 'grep -q ":$ino 201 201\$" /proc/locks' || fail "qemu-io did not take its locks"
qmount "$IMG" "$T/snap.view" -o snapshot=final
[ "$(view_sha "$T/snap.view")" = "$final" ] || fail "-o snapshot=final next to a QEMU writer reads wrong"
kill -0 "$QIO" 2>/dev/null || fail "qemu-io ended before the snapshot mount was read: nothing was proven"
qumount "$T/snap.view"
kill "$QIO"
wait "$QIO" || true
qcheck "$IMG"
log "snapshot mount next to the rw mount: reads right, compaction paused, delete/apply refused; next to QEMU too"
