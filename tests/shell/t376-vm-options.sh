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
#  - a daemon crash: a qemu-io holding the view gets ENOTCONN at once;
#    qcowctl unmount takes the dead mount down (holder still there) and
#    checks the image; after a new mount the old descriptor stays dead,
#    and what was flushed before the kill reads back.
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

# ---- a daemon crash under a holder of the view -------------------------------------
# qemu-io keeps the view open (commands through a fifo), as a VM does.
mkfifo "$T/cmds"
# shellcheck disable=SC2016 # positional parameters of the inner sh
bg_start sh -c 'exec qemu-io -f raw -t none "$1" <"$2" >"$3" 2>&1' sh "$MNT" "$T/cmds" "$T/holder.out"
HOLDER=$BG_PID
exec 7>"$T/cmds"
# qemu-io reads a pipe through stdio: lines that arrive together wait for
# the next input, so each command goes alone, once the last one is done.
echo 'write -P 0x55 4M 64k' >&7
wait_until 20 grep -q 'wrote 65536/65536 bytes at offset 4194304' "$T/holder.out" ||
	fail "the holder's write did not complete: $(cat "$T/holder.out")"
n0=$(fsyncs)
echo 'flush' >&7
# shellcheck disable=SC2016 # expanded by eval, at each try
wait_until 20 eval '[ "$(fsyncs)" -gt "$n0" ]' || fail "the holder's flush did not reach qcowfs"
# commands run in order and flush prints nothing: the read's output says
# the flush has returned
echo 'read 0 512' >&7
wait_until 20 grep -q 'read 512/512 bytes at offset 0' "$T/holder.out" ||
	fail "the holder's flush did not return: $(cat "$T/holder.out")"
kill -9 "${_DAEMON[$MNT]}"
wait_gone "${_DAEMON[$MNT]}" 10 || fail "qcowfs did not die of SIGKILL"
echo 'write -P 0x66 4M 64k' >&7
wait_until 20 grep -q 'Transport endpoint is not connected' "$T/holder.out" ||
	fail "a write after the daemon's death did not fail with ENOTCONN: $(cat "$T/holder.out")"
# qcowctl unmount takes down the dead mount though the holder still has it open
timeout 60 "$QCOWCTL" unmount "$MNT" >"$T/out" 2>&1 || fail "qcowctl unmount of the dead mount failed: $(cat "$T/out")"
grep -q 'daemon had died' "$T/out" || fail "qcowctl unmount did not report the dead daemon: $(cat "$T/out")"
is_mounted "$MNT" && fail "$MNT still mounted after qcowctl unmount of the dead mount"
_forget _MOUNTS "$MNT"
# after a new mount, the holder's old descriptor stays dead
qmount "$IMG" "$MNT"
n0=$(grep -c 'Transport endpoint is not connected' "$T/holder.out")
echo 'read 4M 4k' >&7
# shellcheck disable=SC2016 # expanded by eval, at each try
wait_until 20 eval '[ "$(grep -c "Transport endpoint is not connected" "$T/holder.out")" -gt "$n0" ]' ||
	fail "the old descriptor did not fail after the remount: $(tail -n 3 "$T/holder.out")"
exec 7>&-
wait "$HOLDER" 2>/dev/null || true
_forget _PIDS "$HOLDER"
# what was flushed before the death is there
must_qio -c 'read -P 0x55 4M 64k' "$MNT"
qumount "$MNT" qcowctl
qcheck "$IMG"
log "ok"
