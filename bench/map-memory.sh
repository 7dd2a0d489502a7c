#!/bin/bash
# bench/map-memory.sh: the memory of qcowfs's cluster map, without and with
# internal snapshots (issue 7, "The cluster map": at most 10 bytes per
# cluster on images without snapshots, and the cost per extra reference,
# measured on an image with 4 snapshots of a fully written 8 GiB disk).
#
# The daemon's status has no field for the map's memory (the engine
# computes it, qcow_map_memory(), but the status does not carry it), so the
# figure is an estimate from the daemon's memory, as bench/compact.sh (d)
# does: VmRSS one second after mounting (and VmHWM, the peak, which
# includes what the opening scan used and gave back), minus the same for a
# sparse image of the same size, over the difference in clusters.  qcowfs
# is mounted with cache_size=512K, the smallest cache (8 tables of 64 KiB),
# and the sparse image has one cluster written in the range of every L2
# table, so the cache is full in every measurement and stays out of the
# differences (against a tiny image the full image's cache alone would add
# 8 bytes per cluster to the figure).
# qcowfs links jemalloc, which keeps memory freed by realloc (the map's
# arrays grow by half again during the opening scan, so the copies they
# leave behind add up to about the final size) resident for seconds, and
# after its decay as MADV_FREE pages that still count in RSS until the
# kernel needs them: the daemons started here get
# MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0 (unless MALLOC_CONF is set),
# so that freed memory leaves RSS at once and RSS is the live memory.
# The daemon reports the map's own count of its memory (map_bytes) in its status;
# it is printed too, with the exact bytes per cluster and per extra reference.
#
# Steps:
#  1. the sparse SIZE disk (one 64 KiB write per 512 MiB): the daemon's
#     base memory, with a full cache;
#  2. a SIZE disk (default 8G) written in full with qemu-io (write -P in
#     256 MiB requests), no snapshot: bytes per cluster with one reference
#     each;
#  3. the same image after SNAPSHOTS (default 4) `qemu-img snapshot -c`,
#     each followed by writes (a 256 MiB range and 64 scattered 64 KiB
#     writes, so data and L2 tables are copied on write): bytes per cluster,
#     and the cost per extra reference, (RSS3 - RSS2 - the new clusters at
#     the cost of step 2) / (references3 - references2), the references
#     counted from the refcount blocks (tests/shell/qcow2_layout.py).
# RSS is page-granular and includes allocator slack: the figures are
# estimates, good to about +-4 KiB / clusters (0.03 byte per cluster for an
# 8 GiB disk).  Prints a markdown table and writes it to OUT/map-memory.md.
set -euo pipefail

usage() {
	cat <<EOF
usage: ${0##*/} [options]
  --size SIZE         virtual size of the fully written disk (default 8G)
  --snapshots N       internal snapshots of step 3 (default 4)
  --wait SECONDS      how long after the mount the RSS is read (default 1)
  --qcowfs PATH       qcowfs binary (default: build dir of this checkout, then PATH)
  --qcowctl PATH      qcowctl binary (same search)
  --out DIR           results directory (default /tmp/qcowfs-mapmem-DATE)
  --workdir DIR       where images are created (default: a new dir in /var/tmp;
                      it needs SIZE plus about 1.2 GiB free)
EOF
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"

ARGS="$*"
SIZE=8G NSNAP=4 WAIT=1 OUT='' WORKDIR='' QCOWFS_OPT='' QCOWCTL_OPT=''
while (($#)); do
	case $1 in
	--size) SIZE=$2; shift ;;
	--snapshots) NSNAP=$2; shift ;;
	--wait) WAIT=$2; shift ;;
	--qcowfs) QCOWFS_OPT=$2; shift ;;
	--qcowctl) QCOWCTL_OPT=$2; shift ;;
	--out) OUT=$2; shift ;;
	--workdir) WORKDIR=$2; shift ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
	shift
done

need_root_fuse
need_tools qemu-img:qemu-utils qemu-io:qemu-utils fusermount3:fuse3 python3:python3
QCOWFS=$(find_prog qcowfs "$QCOWFS_OPT") ||
	die "qcowfs not found: build it (./autogen.sh && ./configure && make) or pass --qcowfs PATH"
QCOWCTL=$(find_prog qcowctl "$QCOWCTL_OPT") ||
	die "qcowctl not found: build it or pass --qcowctl PATH"
log "qcowfs: $QCOWFS, qcowctl: $QCOWCTL"
BYTES=$(parse_size "$SIZE")
((BYTES >= 1 << 30 && BYTES % (256 << 20) == 0)) || die "--size $SIZE: at least 1G, a multiple of 256M"

setup_dirs mapmem
install_cleanup
export MALLOC_CONF=${MALLOC_CONF:-dirty_decay_ms:0,muzzy_decay_ms:0}

RES=$OUT/map-memory.tsv   # step key value
: >"$RES"
record() { printf '%s\t%s\t%s\n' "$@" >>"$RES"; }
LAYOUT_PY=$SRC_ROOT/tests/shell/qcow2_layout.py
VIEW=$WORKDIR/view.raw

# qio_run IMG CMD...: qemu-io with one -c per CMD; dies when one fails.
qio_run() {
	local img=$1 c args=() out
	shift
	for c; do args+=(-c "$c"); done
	out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || die "qemu-io $img: $out"
	! grep -qiE 'failed|error' <<<"$out" || die "qemu-io $img: $(grep -iE 'failed|error' <<<"$out" | head -n 3)"
}

# measure STEP IMG: mounts IMG (cache_size=512K), waits WAIT s, records the
# daemon's VmRSS and VmHWM, the mount time, the status' cluster counts and
# map_bytes (map_memory, for older daemons) if it reports it; unmounts; records the
# references and clusters from the refcount blocks.
measure() {
	local step=$1 img=$2 st key pid v
	engine_mount qcowfs "$img" "$VIEW" cache_size=512K
	pid=$MOUNT_PID
	sleep "$WAIT"
	record "$step" rss_kb "$(proc_kb "$pid" VmRSS)"
	record "$step" hwm_kb "$(proc_kb "$pid" VmHWM)"
	record "$step" mount_s "$MOUNT_SECS"
	st=$(qcowfs_status "$VIEW")
	printf '%s\n' "$st" >"$OUT/$step.status"
	for key in clusters_total clusters_referenced clusters_header map_bytes map_memory; do
		v=$(awk -F= -v k="$key" '$1 == k { print $2 }' <<<"$st")
		[[ -z $v ]] || record "$step" "$key" "$v"
	done
	engine_unmount qcowfs "$VIEW" "$pid"
	python3 "$LAYOUT_PY" "$img" >"$OUT/$step.layout.json"
	python3 - "$OUT/$step.layout.json" "$step" <<'EOF' >>"$RES"
import json, sys
d = json.load(open(sys.argv[1]))
for k in ('file_clusters', 'refcounted', 'references', 'shared', 'snapshots', 'l2_tables', 'l2_shared'):
    print('%s\t%s\t%s' % (sys.argv[2], k, d[k]))
EOF
	if qemu-img check "$img" >"$OUT/$step.check" 2>&1; then
		record "$step" check clean
	else
		record "$step" check "not clean"
	fi
}

T_START=$(now)
log "1. sparse $SIZE disk: one 64 KiB write per L2 table"
qemu-img create -q -f qcow2 "$WORKDIR/sparse.qcow2" "$BYTES"
cmds=()
for ((off = 0; off < BYTES; off += 512 << 20)); do
	cmds+=("write -P 0x11 $off 64k")
done
qio_run "$WORKDIR/sparse.qcow2" "${cmds[@]}"
measure sparse "$WORKDIR/sparse.qcow2"
rm -f "$WORKDIR/sparse.qcow2"

IMG=$WORKDIR/full.qcow2
log "2. $SIZE disk written in full (qemu-io write -P, 256 MiB requests)"
qemu-img create -q -f qcow2 "$IMG" "$BYTES"
cmds=()
for ((off = 0; off < BYTES; off += 256 << 20)); do
	cmds+=("write -P 0x5a $off 256M")
done
t0=$(now)
qio_run "$IMG" "${cmds[@]}"
record full write_s "$(elapsed "$t0" "$(now)")"
measure full "$IMG"

log "3. $NSNAP internal snapshots, writes after each"
for ((i = 1; i <= NSNAP; i++)); do
	qemu-img snapshot -c "s$i" "$IMG"
	# a 256 MiB range (data copied on write) and 64 scattered 64 KiB
	# writes (L2 tables copied on write all over the disk)
	cmds=("write -P $((0x60 + i)) $(((i * 1031 % (BYTES >> 20)) / 256 * 256))M 256M")
	for ((k = 0; k < 64; k++)); do
		cmds+=("write -P $((0x70 + i)) $(((k * (BYTES >> 6) + i * 7 * 65536) / 65536 * 65536)) 64k")
	done
	qio_run "$IMG" "${cmds[@]}"
done
measure snap "$IMG"
T_END=$(now)

QCOWFS_DESC=$QCOWFS
if rev=$(git -C "$(dirname "$QCOWFS")" describe --always --dirty 2>/dev/null); then
	QCOWFS_DESC="$QCOWFS (commit $rev)"
fi
python3 - "$RES" "$SIZE" "$NSNAP" "$QCOWFS_DESC" "$ARGS" "$(elapsed "$T_START" "$T_END")" "$WORKDIR" "$WAIT" <<'EOF' | tee "$OUT/map-memory.md"
import os, sys
res, size, nsnap, qdesc, args, total, workdir, wait = sys.argv[1:9]
r = {}
for line in open(res):
    s, k, v = line.rstrip('\n').split('\t')
    r.setdefault(s, {})[k] = v
def g(s, k):
    try:
        return float(r[s][k])
    except (KeyError, ValueError):
        return None
def f(v, nd=1):
    return 'n/a' if v is None else '%.*f' % (nd, v)
print('## qcowfs map memory (ESTIMATE from daemon RSS %s s after mounting, cache_size=512K)\n' % wait)
print('| image | clusters in the file | references | shared clusters | VmRSS (KiB) | VmHWM (KiB) | RSS over the sparse image (KiB) | bytes per cluster over the sparse image | mount (s) | map_bytes (status) | check |')
print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|')
labels = {'sparse': '%s sparse, one cluster per L2 table' % size, 'full': '%s written in full, no snapshot' % size,
          'snap': '%s written in full, %s snapshots' % (size, nsnap)}
base = g('sparse', 'rss_kb')
per = {}
for s in ('sparse', 'full', 'snap'):
    if s not in r:
        continue
    rss, n = g(s, 'rss_kb'), g(s, 'file_clusters')
    n0 = g('sparse', 'file_clusters')
    diff = rss - base if rss is not None and base is not None else None
    per[s] = diff * 1024 / (n - n0) if diff is not None and n and n0 and s != 'sparse' else None
    mb = r[s].get('map_bytes') or r[s].get('map_memory') or 'not reported'
    print('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
        labels[s], r[s].get('file_clusters'), r[s].get('references'), r[s].get('shared'),
        r[s].get('rss_kb'), r[s].get('hwm_kb'), f(diff, 0), f(per[s], 2),
        f(g(s, 'mount_s'), 3), mb, r[s].get('check')))
print()
try:
    dn = g('snap', 'file_clusters') - g('full', 'file_clusters')
    dref = g('snap', 'references') - g('full', 'references')
    extra = (g('snap', 'rss_kb') - g('full', 'rss_kb')) * 1024 - dn * per['full']
    print('Without snapshots: %.2f bytes per cluster (target: at most 10).' % per['full'])
    print('With %s snapshots: %d more clusters and %d more references than without; '
          'the memory beyond what the new clusters cost at %.2f bytes each is %.0f bytes, '
          '%.2f bytes per extra reference.' % (nsnap, dn, dref, per['full'], extra, extra / dref))
except (KeyError, TypeError, ZeroDivisionError):
    print('Per-reference figure not available.')
# the exact figure: the map's own count of its memory (map_bytes)
have_mb = all(g(s, 'map_bytes') is not None for s in ('full', 'snap'))
if have_mb:
    nf, ns = g('full', 'file_clusters'), g('snap', 'file_clusters')
    mbf, mbs = g('full', 'map_bytes'), g('snap', 'map_bytes')
    dref = g('snap', 'references') - g('full', 'references')
    print('Exact (map_bytes of the status): %.2f bytes per cluster without snapshots; with %s snapshots %.2f per '
          'cluster, %.2f bytes per extra reference beyond what the new clusters cost.'
          % (mbf / nf, nsnap, mbs / ns, (mbs - ns * mbf / nf) / dref))
print('\n- qcowfs: %s' % qdesc)
print('- the table\'s per-cluster figures are RSS differences (page-granular, allocator slack included), '
      'MALLOC_CONF=%s%s' % (os.environ.get('MALLOC_CONF', ''),
                            '; map_bytes is the map\'s own count' if have_mb else '; the status reports no map size'))
print('- disk written in %s s; images in %s' % (r.get('full', {}).get('write_s', 'n/a'), workdir))
print('- command: `bench/map-memory.sh%s`, total %s s, %s' % ((' ' + args) if args else '', total, os.uname().nodename))
EOF
log "results: $OUT/map-memory.md"
