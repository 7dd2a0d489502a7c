#!/bin/bash
# t376-vm-options: what doc/vm.md says about QEMU's drive options on the
# view, checked with qemu-io (the same block layer as a VM's drive):
#  - flushes: with cache=none and cache=writeback a guest flush becomes an
#    fsync of the view (FSYNC requests counted in the daemon's -d trace:
#    write, flush, write, quit gives 2, the flush and the close); with
#    cache=unsafe none arrives at all;
#  - discard=unmap (qemu-io -d unmap) frees the image's clusters
#    (bytes_discarded in the status rises); the default discard=ignore
#    (-d ignore) does not;
#  - cache=none bypasses the view's page cache (fincore: no new cached
#    pages), cache=writeback fills it;
#  - aio=threads, native and io_uring with cache=none all write and read
#    back; aio=native without cache=none is refused by QEMU;
#  - direct I/O needs no alignment (512-byte and odd-sized O_DIRECT
#    writes at unaligned offsets), and st_blksize is 4096.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fincore stat

IMG=$T/vm.qcow2
MNT=$T/disk.raw
TRACE=$T/trace.err
mkimg "$IMG" 128M

# qcowfs -d stays in the foreground and traces every FUSE request.
_MOUNTS+=("$MNT")
bg_start "$QCOWFS" -d "$IMG" "$MNT" 2>"$TRACE"
_DAEMON["$MNT"]=$BG_PID
wait_until 20 is_mounted "$MNT" || fail "qcowfs -d did not mount $MNT: $(tail -n 5 "$TRACE")"

fsyncs() { grep -c 'opcode: FSYNC' "$TRACE" || true; }

must_qio() {
	local out rc=0
	out=$(timeout 30 qemu-io -f raw "$@" 2>&1) || rc=$?
	if [ $rc != 0 ] || grep -qiE 'failed|error|Pattern verification' <<<"$out"; then
		fail "qemu-io $*: exit $rc: $(head -n 3 <<<"$out")"
	fi
}

# ---- flushes ----------------------------------------------------------------
for mode in none writeback unsafe; do
	n0=$(fsyncs)
	must_qio -t "$mode" -c 'write -P 0x11 0 64k' -c flush -c 'write -P 0x12 64k 64k' "$MNT"
	n=$(($(fsyncs) - n0))
	case $mode in
	unsafe) want=0 ;;
	*) want=2 ;;
	esac
	[ "$n" = "$want" ] || fail "cache=$mode: $n fsyncs reached qcowfs for write, flush, write, close; expected $want"
	log "cache=$mode: $n fsyncs"
done

# ---- discards -----------------------------------------------------------------
must_qio -c 'write -P 0x22 1M 1M' "$MNT"
d0=$(status_field "$MNT" bytes_discarded)
must_qio -d ignore -c 'discard 1M 1M' "$MNT"
d1=$(status_field "$MNT" bytes_discarded)
[ "$d1" = "$d0" ] || fail "discard=ignore: bytes_discarded went from $d0 to $d1"
must_qio -c 'read -P 0x22 1M 1M' "$MNT"
must_qio -d unmap -c 'discard 1M 1M' "$MNT"
d2=$(status_field "$MNT" bytes_discarded)
[ $((d2 - d1)) -ge 1048576 ] || fail "discard=unmap: bytes_discarded went from $d1 to $d2, expected +1 MiB"
must_qio -c 'read -P 0 1M 1M' "$MNT"

# ---- cache=none and the view's page cache -----------------------------------------
cached() { fincore -n -b -o RES "$MNT" | tr -d ' '; }
c0=$(cached)
must_qio -t none -c 'read 64M 16M' "$MNT"
c1=$(cached)
[ "$c1" -le "$c0" ] || fail "cache=none: the view's cached bytes went from $c0 to $c1"
must_qio -t writeback -c 'read 96M 16M' "$MNT"
c2=$(cached)
[ $((c2 - c1)) -ge $((8 * 1048576)) ] || fail "cache=writeback: the view's cached bytes went only from $c1 to $c2"

# ---- aio ----------------------------------------------------------------------------
for aio in threads native io_uring; do
	must_qio -t none -i "$aio" -c 'write -P 0x33 2M 1M' -c 'read -P 0x33 2M 1M' "$MNT"
done
rc=0
timeout 15 qemu-system-x86_64 -S -nodefaults -display none -m 64 \
	-drive "file=$MNT,format=raw,if=virtio,aio=native" >"$T/out" 2>&1 || rc=$?
if [ $rc = 0 ] || [ $rc = 124 ]; then
	fail "aio=native without cache=none was not refused (exit $rc)"
fi
grep -q 'cache.direct' "$T/out" || fail "aio=native without cache=none refused for another reason: $(head -n 2 "$T/out")"

# ---- block size and alignment -----------------------------------------------------------
[ "$(stat -c %o "$MNT")" = 4096 ] || fail "st_blksize of the view is $(stat -c %o "$MNT"), not 4096"
must_qio -t none -c 'write -P 0x44 512 512' -c 'write -P 0x45 1000 100' "$MNT"
must_qio -c 'read -P 0x44 512 488' -c 'read -P 0x45 1000 100' "$MNT"

qumount "$MNT"
qcheck "$IMG"
log "ok"
