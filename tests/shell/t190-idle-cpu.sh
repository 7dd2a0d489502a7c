#!/bin/bash
# t190-idle-cpu: an idle daemon does not spin (issue 6, item 14).  The
# issue's two reproductions, where the free space lay below clusters the
# compactor could not move then; since issue 7 those clusters move (shared
# clusters with all their pointers, compressed streams by repacking), so
# the daemons compact to the minimum first and must then stay idle.
# Mounted side by side with default options:
#  - sn.qcow2: data written at 200M and 100M, the first discarded, then an
#    internal snapshot (qemu-img snapshot -c): everything left is shared;
#  - c.qcow2: qemu-img convert -c of 128 MiB of half-random data, then
#    fallocate -p of its first 40 MiB through the view: compressed clusters
#    above the freed space.
# After 5 s to settle, each daemon's CPU time (utime+stime of
# /proc/PID/stat) over 30 s must stay under 1 % of a CPU (it was 70-80 %,
# with ~200 000 passes a second), and compactions_done must not climb.
# Both images still check clean and keep their data and snapshot.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need fallocate getconf

SN=$T/sn.qcow2
C=$T/c.qcow2
mkimg "$SN" 256M
qio "$SN" 'write -P 1 200M 50M' 'write -P 2 100M 50M' 'discard 200M 50M'
qemu-img snapshot -c s1 "$SN" || fail "qemu-img snapshot -c failed"
$PYTHON - "$T/src.raw" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for _ in range((128 << 20) // 4096):
        f.write(os.urandom(2048) + bytes(2048))
PY
qemu-img convert -c -f raw -O qcow2 "$T/src.raw" "$C" || fail "qemu-img convert -c failed"
rm -f "$T/src.raw"

qmount "$SN" "$T/sn.raw"
PID_SN=$QM_PID
qmount "$C" "$T/c.raw"
PID_C=$QM_PID
fallocate -p -o 0 -l 40M "$T/c.raw" || fail "fallocate -p of the first 40 MiB failed"
sleep 5

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
d0_sn=$(status_field "$T/sn.raw" compactions_done)
d0_c=$(status_field "$T/c.raw" compactions_done)
c0_sn=$(cpu_ticks "$PID_SN")
c0_c=$(cpu_ticks "$PID_C")
t0=$(date +%s%N)
sleep 30
c1_sn=$(cpu_ticks "$PID_SN")
c1_c=$(cpu_ticks "$PID_C")
t1=$(date +%s%N)
d1_sn=$(status_field "$T/sn.raw" compactions_done)
d1_c=$(status_field "$T/c.raw" compactions_done)
wall_ms=$(((t1 - t0) / 1000000))
# CPU in hundredths of a percent of one CPU
pct() { echo $((($1 * 1000 * 10000 / hz) / wall_ms)); }
p_sn=$(pct $((c1_sn - c0_sn)))
p_c=$(pct $((c1_c - c0_c)))
show() { printf '%d.%02d %%' $(($1 / 100)) $(($1 % 100)); }
log "snapshot image: CPU $(show "$p_sn") over ${wall_ms} ms, compactions_done $d0_sn -> $d1_sn; status: $("$QCOWCTL" status --raw "$T/sn.raw" | grep -E 'file_size|compactions' | tr '\n' ' ')"
log "compressed image: CPU $(show "$p_c") over ${wall_ms} ms, compactions_done $d0_c -> $d1_c; status: $("$QCOWCTL" status --raw "$T/c.raw" | grep -E 'file_size|compactions' | tr '\n' ' ')"
[ "$p_sn" -lt 100 ] || fail "the idle daemon of the snapshot image used $(show "$p_sn") of a CPU over 30 s"
[ "$p_c" -lt 100 ] || fail "the idle daemon of the compressed image used $(show "$p_c") of a CPU over 30 s"
[ "$d1_sn" = "$d0_sn" ] || fail "snapshot image: compactions_done climbed from $d0_sn to $d1_sn while idle"
[ "$d1_c" = "$d0_c" ] || fail "compressed image: compactions_done climbed from $d0_c to $d1_c while idle"

qumount "$T/sn.raw"
qumount "$T/c.raw"
qcheck "$SN"
qcheck "$C"
qio "$SN" 'read -P 2 100M 50M' 'read -P 0 200M 50M'
qemu-img snapshot -l "$SN" | grep -q s1 || fail "the snapshot s1 is gone"
log "ok"
