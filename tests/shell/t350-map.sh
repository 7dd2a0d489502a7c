#!/bin/bash
# t350-map: qcowctl map (issue 9, "qcowctl map: see the image").
#  - --output=json equals qemu-img map --output=json on the same images:
#    plain, compressed, zero clusters (plain and allocated), internal
#    snapshots, a backing chain of depth 2, extended L2 (subclusters), an
#    external data file and a raw backing file with holes;
#    QEMU 7.2 prints no "compressed" key (8.2 does), so ours is dropped
#    before the comparison.  The human format equals qemu-img's where it
#    prints the same file names.
#  - --picture FILE.svg is well-formed XML with the legend, and its cell
#    count stays within the cap for a 1 MiB and a sparse 10 TiB image;
#    --picture - prints rows of at most 64 cells.
#  - On a live mount the picture is the daemon's map: after a punch and a
#    compaction it differs from the one before, and the file got shorter.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need qemu-img qemu-io fallocate dd script

# same_map IMAGE: our JSON equals qemu-img's
same_map() {
	local img=$1 name
	name=$(basename "$img")
	qemu-img map --output=json "$img" >"$T/$name.qemu.json" 2>>"$T/qemu.log" ||
		fail "qemu-img map $img failed: $(tail -n 3 "$T/qemu.log")"
	"$QCOWCTL" map --output=json "$img" >"$T/$name.ours.json" 2>"$T/$name.err" ||
		fail "qcowctl map --output=json $img failed: $(cat "$T/$name.err")"
	$PYTHON - "$T/$name.qemu.json" "$T/$name.ours.json" <<'EOF' || fail "qcowctl map differs from qemu-img map on $name"
import json, sys
theirs = json.load(open(sys.argv[1]))
ours = json.load(open(sys.argv[2]))
for e in ours:
    assert isinstance(e.pop("compressed"), bool), e
if theirs != ours:
    print("qemu-img:", json.dumps(theirs, indent=0))
    print("qcowctl: ", json.dumps(ours, indent=0))
    sys.exit(1)
EOF
	log "$name: $(wc -l <"$T/$name.qemu.json") extents, as qemu-img map"
}

# same_human IMAGE: the human format too (file names as typed)
same_human() {
	local img=$1 name
	name=$(basename "$img")
	qemu-img map "$img" >"$T/$name.qemu.txt" 2>>"$T/qemu.log" || fail "qemu-img map $img failed"
	"$QCOWCTL" map "$img" >"$T/$name.ours.txt" || fail "qcowctl map $img failed"
	diff -u "$T/$name.qemu.txt" "$T/$name.ours.txt" >&2 || fail "qcowctl map (human) differs from qemu-img map on $name"
}

cd "$T" || fail "cannot enter $T"

# plain: data here and there, one discarded range, a partial last cluster
mkimg plain.qcow2 $((64 << 20))
qio plain.qcow2 'write -P 1 0 192k' 'write -P 2 1M 4k' 'write -P 3 5M 1M' 'discard 5M 128k' \
	'write -P 4 63M 64k' 'write -P 5 300k 64k'
same_map plain.qcow2
same_human plain.qcow2

# compressed: qemu-img convert -c of data with holes
qemu-img create -q -f raw raw.img 8M
qemu-io -f raw -c 'write -P 7 0 1M' -c 'write -P 8 3M 512k' raw.img >/dev/null
qemu-img convert -c -O qcow2 raw.img comp.qcow2
qio comp.qcow2 'write -P 9 6M 64k'
same_map comp.qcow2

# zero clusters: zero-flagged without (plain) and with (alloc) a host cluster
mkimg zero.qcow2 16M
qio zero.qcow2 'write -P 1 0 1M' 'write -z 256k 128k' 'write -z -u 512k 64k' 'write -z 4M 1M'
same_map zero.qcow2
same_human zero.qcow2

# snapshots: shared clusters, then copies after the snapshot
mkimg snap.qcow2 16M
qio snap.qcow2 'write -P 1 0 2M'
qemu-img snapshot -c s1 snap.qcow2
qio snap.qcow2 'write -P 2 512k 64k' 'write -P 3 8M 1M'
qemu-img snapshot -c s2 snap.qcow2
qio snap.qcow2 'discard 1M 256k'
same_map snap.qcow2

# a backing chain of depth 2: data at depth 0, 1 and 2, zeros over data
mkimg base.qcow2 16M
qio base.qcow2 'write -P 1 0 4M' 'write -P 2 12M 1M'
mkimg mid.qcow2 16M "backing_file=base.qcow2,backing_fmt=qcow2"
qio mid.qcow2 'write -P 3 1M 1M' 'write -z 2M 64k'
mkimg top.qcow2 16M "backing_file=mid.qcow2,backing_fmt=qcow2"
qio top.qcow2 'write -P 4 1536k 64k' 'write -P 5 14M 64k' 'discard 3M 64k'
same_map top.qcow2
same_human top.qcow2
same_map mid.qcow2

# extended L2: subclusters of 2 KiB written, zeroed and left unallocated,
# over no backing file and over one
mkimg ext.qcow2 8M "extended_l2=on,cluster_size=64k"
qio ext.qcow2 'write -P 1 0 4k' 'write -P 2 10k 2k' 'write -z 32k 8k' 'write -P 3 1M 192k' \
	'write -z 1088k 16k' 'write -P 4 2M 100k'
same_map ext.qcow2
mkimg extb.qcow2 16M "extended_l2=on,cluster_size=64k,backing_file=base.qcow2,backing_fmt=qcow2"
qio extb.qcow2 'write -P 5 4k 4k' 'write -z 64k 8k' 'write -P 6 12M 6k'
same_map extb.qcow2

# an external data file: offsets in it, its name in the human format
mkimg df.qcow2 8M "data_file=df.data"
qio df.qcow2 'write -P 1 0 1M' 'write -z 2M 64k' 'write -P 2 4M 64k'
same_map df.qcow2
same_human df.qcow2

# a raw backing file: its holes read zeros (depth 1, present), the rest data
qemu-img create -q -f raw rb.raw 8M
qemu-io -f raw -c 'write -P 1 1M 1M' rb.raw >/dev/null
mkimg rb.qcow2 8M "backing_file=rb.raw,backing_fmt=raw"
qio rb.qcow2 'write -P 3 0 64k'
same_map rb.qcow2
same_human rb.qcow2

# mistakes on the command line and a missing target: exit 1 with a reason
for args in "--output=xml plain.qcow2" "--output=json --picture x.svg plain.qcow2" "" "plain.qcow2 extra"; do
	rc=0
	# shellcheck disable=SC2086
	"$QCOWCTL" map $args >usage.out 2>usage.err || rc=$?
	[ $rc = 1 ] || fail "qcowctl map $args exited $rc, not 1"
	grep -q '^qcowctl: map: ' usage.err || fail "qcowctl map $args gave no reason: $(cat usage.err)"
done
rc=0
"$QCOWCTL" map nosuch.qcow2 >/dev/null 2>usage.err || rc=$?
if [ $rc != 1 ] || ! grep -q 'nosuch.qcow2' usage.err; then
	fail "qcowctl map of a missing file: exit $rc, $(cat usage.err)"
fi
[ ! -e x.svg ] || fail "a refused command wrote x.svg"

# ---- pictures ------------------------------------------------------------

# check_svg SVG: well-formed, a legend with every kind, cells within the cap
check_svg() {
	$PYTHON - "$1" <<'EOF' || fail "bad picture $1"
import sys, xml.etree.ElementTree as ET
ns = {"s": "http://www.w3.org/2000/svg"}
root = ET.parse(sys.argv[1]).getroot()
groups = {g.get("class"): g for g in root.findall("s:g", ns)}
cells = groups["cells"].findall("s:rect", ns)
legend = " ".join(t.text for t in groups["legend"].findall("s:text", ns))
for kind in ("header", "L1 table", "L2 tables", "refcount table", "refcount blocks",
             "snapshot tables", "bitmap structures", "data", "compressed data",
             "shared data", "junk", "erased", "available", "moving"):
    assert kind + ":" in legend, "legend lacks " + kind
summary = [t.text for t in root.findall("s:text", ns) if t.get("class") == "summary"][0]
assert "per cell" in summary and "bytes" in summary, summary
assert 1 <= len(cells) <= 4096, len(cells)
print(len(cells), "cells;", summary)
EOF
}

qemu-img create -q -f qcow2 -o cluster_size=4k small.qcow2 1M
qio small.qcow2 'write -P 1 0 1M'
[ "$(file_size small.qcow2)" -ge $((1 << 20)) ] || fail "setup: small.qcow2 is not about 1 MiB"
"$QCOWCTL" map --picture small.svg small.qcow2 || fail "qcowctl map --picture on a 1 MiB image failed"
log "1 MiB image: $(check_svg small.svg)"

mkimg huge.qcow2 10T
qio huge.qcow2 'write -P 1 0 64k' 'write -P 2 9T 64k'
"$QCOWCTL" map --picture huge.svg huge.qcow2 || fail "qcowctl map --picture on a 10 TiB image failed"
log "sparse 10 TiB image: $(check_svg huge.svg)"
# more clusters than cells: several clusters per cell, still within the cap
qemu-img create -q -f qcow2 -o cluster_size=4k many.qcow2 64M
qio many.qcow2 'write -P 1 0 40M'
"$QCOWCTL" map --picture many.svg many.qcow2 || fail "qcowctl map --picture on many.qcow2 failed"
out=$(check_svg many.svg)
grep -Eq ' [2-9] clusters per cell' <<<"$out" || fail "a file of 10000+ clusters is not drawn with several clusters per cell: $out"
log "40 MiB of 4 KiB clusters: $out"
"$QCOWCTL" map --picture snap.svg snap.qcow2 || fail "qcowctl map --picture on snap.qcow2 failed"
check_svg snap.svg >/dev/null
grep -q '<title>cell [0-9]*: shared data</title>' snap.svg || fail "the picture of snap.qcow2 shows no shared data"
"$QCOWCTL" map --picture comp.svg comp.qcow2 || fail "qcowctl map --picture on comp.qcow2 failed"
grep -q ': compressed data</title>' comp.svg || fail "the picture of comp.qcow2 shows no compressed data"

# the terminal form: a summary line, rows of at most 64 cells, a legend;
# no colour codes into a pipe
"$QCOWCTL" map --picture - small.qcow2 >plain.txt || fail "qcowctl map --picture - failed"
grep -q $'\033' plain.txt && fail "--picture - wrote colour codes into a pipe"
rows=$(awk 'NR > 1 && /^$/ { exit } NR > 1' plain.txt)
[ -n "$rows" ] || fail "--picture - printed no grid: $(cat plain.txt)"
widths=$(awk '{ print length($0) }' <<<"$rows" | sort -un | tr '\n' ' ')
[ "$(head -n 1 <<<"$rows" | awk '{ print length($0) }')" = 64 ] ||
	fail "the first row of --picture - is not 64 cells wide (widths: $widths)"
[ "$(awk 'length($0) > 64' <<<"$rows" | wc -l)" = 0 ] || fail "a row of --picture - is wider than 64 cells ($widths)"
grep -q '^  # data ' plain.txt || fail "--picture - has no legend: $(tail -n 5 plain.txt)"
log "--picture -: $(wc -l <<<"$rows") rows, widths $widths"
# on a terminal (script(1) gives it one): colour codes
script -qec "$(printf '%q ' "$QCOWCTL" map --picture - small.qcow2)" /dev/null >tty.txt </dev/null ||
	fail "qcowctl map --picture - on a terminal failed: $(cat tty.txt)"
grep -q $'\033\\[38;5;[0-9]*m#' tty.txt || fail "--picture - on a terminal has no colours: $(head -n 3 tty.txt)"

# ---- the live picture during a compaction ----------------------------------

IMG=$T/live.qcow2
MNT=$T/live.raw
mkimg "$IMG" 256M
qmount "$IMG" "$MNT" -o compact=off
head -c $((24 << 20)) /dev/urandom >"$T/data"
dd if="$T/data" of="$MNT" bs=1M conv=notrunc,fsync status=none || fail "writing 24 MiB into the view failed"
# free the first 16 MiB: the data left sits in the file's tail
fallocate -p -o 0 -l $((16 << 20)) "$MNT" || fail "fallocate -p on the view failed"
"$QCOWCTL" map --picture - "$MNT" >before.txt || fail "qcowctl map --picture - on the mount failed"
"$QCOWCTL" map --picture before.svg "$MNT" || fail "qcowctl map --picture on the mount failed"
check_svg before.svg >/dev/null
size_before=$(file_size "$IMG")
"$QCOWCTL" compact --no-wait "$MNT" >/dev/null || fail "qcowctl compact --no-wait failed"
n=0
while :; do
	"$QCOWCTL" map --picture - "$MNT" >"during.$n.txt" || fail "qcowctl map --picture - during the compaction failed"
	[ "$(status_field "$MNT" compacting)" = 0 ] && [ "$(status_field "$MNT" compactions_done)" -ge 1 ] && break
	n=$((n + 1))
	[ $n -lt 200 ] || fail "the compaction did not end"
	sleep 0.05
done
size_after=$(file_size "$IMG")
# the cells a move is copying into ('m') show only while it runs: logged, not required
moving=$(cat during.*.txt | awk 'NR > 1 && /^[^ ]/' | grep -c m || true)
cmp -s before.txt "during.$n.txt" && fail "the live picture did not change with the compaction"
[ "$size_after" -lt "$size_before" ] || fail "the compaction did not shorten the file ($size_before -> $size_after)"
log "live picture: $((n + 1)) taken while compacting ($moving rows with moving cells), file $size_before -> $size_after bytes"
log "before: $(sed -n 1p before.txt)"
log "after:  $(sed -n 1p "during.$n.txt")"
# the mapping of a live mount (read without locks, as qemu-img map -U)
"$QCOWCTL" map --output=json "$MNT" >live.json || fail "qcowctl map --output=json on the mount failed"
qemu-img map -U --output=json "$IMG" >live.qemu.json || fail "qemu-img map -U on the mounted image failed"
$PYTHON - live.qemu.json live.json <<'EOF' || fail "qcowctl map on the mount differs from qemu-img map -U"
import json, sys
theirs = json.load(open(sys.argv[1]))
ours = json.load(open(sys.argv[2]))
for e in ours:
    e.pop("compressed")
sys.exit(theirs != ours)
EOF
# the human format names the image file the daemon serves
"$QCOWCTL" map "$MNT" >live.txt || fail "qcowctl map on the mount failed"
qemu-img map -U "$(realpath "$IMG")" >live.qemu.txt || fail "qemu-img map -U (human) failed"
diff -u live.qemu.txt live.txt >&2 || fail "qcowctl map (human) on the mount differs from qemu-img map -U"
qumount "$MNT"
qcheck "$IMG"
same_map "$IMG"
log "ok"
