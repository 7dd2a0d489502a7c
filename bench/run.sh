#!/bin/bash
# bench/run.sh: fio through qcowfs's raw view and through QEMU's FUSE export
# (qemu-storage-daemon --export type=fuse) side by side, in one run, on
# fresh qcow2 images of the same kind, and through the FUSE ceiling: a raw
# file of the same size served by bench/passthrough (qcowfs's FUSE settings,
# no engine).  Prints workload | qcowfs | QEMU | ceiling | ratios, marking
# rows where qcowfs is more than 15 % below the ceiling, plus daemon peak
# RSS and time to mount; writes the table to $OUT/results.md and fio's raw
# JSON to $OUT/.  See bench/README.md.
set -euo pipefail

usage() {
	cat <<EOF
usage: ${0##*/} [options]
  --quick            3 s per workload, 1 GiB images, one run each
                     (default 10 s, 2 GiB, two runs each)
  --size SIZE        virtual size of the workload images (e.g. 2G)
  --runtime SECONDS  fio runtime per workload
  --mount-size SIZE  virtual size of the image used for time to mount (8G)
  --qcowfs PATH      qcowfs binary (default: build dir of this checkout, then PATH)
  --qcowctl PATH     qcowctl binary (same search; optional, used to unmount)
  --qcowfs-opts OPTS extra -o options for qcowfs (max_threads=N is passed
                     on to the passthrough as well)
  --passthrough PATH the FUSE-ceiling program (default: bench/passthrough
                     in this checkout's build dir; make builds it)
  --out DIR          results directory (default /tmp/qcowfs-bench-DATE)
  --workdir DIR      where images are created (default: a new dir in /dev/shm
                     when it has room, else in /var/tmp)
  --repeat N         run every workload N times per engine, report the median
                     (default 2, 1 with --quick)
  --only LIST        comma-separated subset of workloads:
                     seqwrite,seqread,randread,randwrite,randwrite-unalloc,
                     randread-overlay,randwrite-overlay
  --standin          play qcowfs with qemu-storage-daemon too (tests this
                     script before qcowfs exists; numbers are then QEMU vs QEMU)
EOF
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"

ARGS="$*"
SIZE=2G SIZE_SET=0 RUNTIME=10 RUNTIME_SET=0 MOUNT_SIZE=8G QUICK=0
REPEAT=2 REPEAT_SET=0 OUT='' WORKDIR='' QCOWFS_OPT='' QCOWCTL_OPT='' QCOWFS_OPTS='' ONLY=''
PASSTHROUGH_OPT=''
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--size) SIZE=$2; SIZE_SET=1; shift ;;
	--runtime) RUNTIME=$2; RUNTIME_SET=1; shift ;;
	--mount-size) MOUNT_SIZE=$2; shift ;;
	--qcowfs) QCOWFS_OPT=$2; shift ;;
	--qcowctl) QCOWCTL_OPT=$2; shift ;;
	--qcowfs-opts) QCOWFS_OPTS=$2; shift ;;
	--passthrough) PASSTHROUGH_OPT=$2; shift ;;
	--out) OUT=$2; shift ;;
	--workdir) WORKDIR=$2; shift ;;
	--only) ONLY=$2; shift ;;
	--repeat) REPEAT=$2; REPEAT_SET=1; shift ;;
	--standin) BENCH_STANDIN=1 ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
	shift
done
if ((QUICK)); then
	((SIZE_SET)) || SIZE=1G
	((RUNTIME_SET)) || RUNTIME=3
	((REPEAT_SET)) || REPEAT=1
fi
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "bad --runtime: $RUNTIME"
[[ $REPEAT =~ ^[0-9]+$ && $REPEAT -gt 0 ]] || die "bad --repeat: $REPEAT"
SIZE_B=$(parse_size "$SIZE")
MOUNT_SIZE_B=$(parse_size "$MOUNT_SIZE")

need_root_fuse
need_tools qemu-img:qemu-utils qemu-storage-daemon:qemu-system-common fio:fio \
	fusermount3:fuse3 python3:python3
if ((BENCH_STANDIN)); then
	QCOWFS=standin
	log "STAND-IN MODE: the qcowfs column is qemu-storage-daemon as well"
else
	QCOWFS=$(find_prog qcowfs "$QCOWFS_OPT") ||
		die "qcowfs not found: build it (./autogen.sh && ./configure && make) or pass --qcowfs PATH"
	QCOWCTL=$(find_prog qcowctl "$QCOWCTL_OPT") || QCOWCTL=
	log "qcowfs: $QCOWFS${QCOWCTL:+, qcowctl: $QCOWCTL}"
fi
PASSTHROUGH=$(find_passthrough "$PASSTHROUGH_OPT") ||
	die "bench/passthrough not found: make builds it with qcowfs, or pass --passthrough PATH"
# The ceiling runs as many FUSE threads as qcowfs: its default (the same
# formula in both programs) or the max_threads given to qcowfs.
if [[ ,$QCOWFS_OPTS, =~ ,max_threads=([0-9]+), ]]; then
	PASSTHROUGH_ARGS=(-t "${BASH_REMATCH[1]}")
fi
log "FUSE ceiling: $PASSTHROUGH ${PASSTHROUGH_ARGS[*]}"

OUT=${OUT:-/tmp/qcowfs-bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ -z $WORKDIR ]]; then
	# Images in memory by default: the workloads fit in the host page cache
	# anyway, and on a disk-backed file system the writeback of one
	# workload's dirty pages (and the deletion of its image) would slow
	# down the next one and the whole run.
	base=/var/tmp
	avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0)
	# the qcow2 template, its raw copy, one workload image at a time
	((avail * 1024 > 4 * SIZE_B + (2 << 30))) && base=/dev/shm
	WORKDIR=$(mktemp -d "$base/qcowfs-bench.XXXXXX")
	CLEAN_FILES+=("$WORKDIR")
else
	mkdir -p "$WORKDIR"; WORKDIR=$(cd "$WORKDIR" && pwd)
fi
install_cleanup

SUMMARY=$OUT/summary.tsv      # workload engine key value
: >"$SUMMARY"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$SUMMARY"; }

new_image() {   # new_image PATH SIZE_BYTES [qemu-img -o extra]
	rm -f "$1"
	qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER_SIZE${3:+,$3}" "$1" "$2"
}

new_raw() {     # new_raw PATH SIZE_BYTES: the ceiling's fresh image, sparse
	rm -f "$1"
	truncate -s "$2" "$1"
}

# the ceiling serves raw files, the engines qcow2 images
declare -A IMAGE_EXT=([qcowfs]=qcow2 [qemu]=qcow2 [ceiling]=img)

# ---- direct I/O: use it only when both FUSE mounts accept O_DIRECT ---------

probe_direct() {   # probe_direct ENGINE -> 0 if O_DIRECT read+write work
	local e=$1 img=$WORKDIR/probe-$1.${IMAGE_EXT[$1]} view=$WORKDIR/probe-$1.raw ok=0 pid
	if [[ $e == ceiling ]]; then new_raw "$img" $((64 << 20)); else new_image "$img" $((64 << 20)); fi
	engine_mount "$e" "$img" "$view" "$QCOWFS_OPTS"
	pid=$MOUNT_PID
	dd if=/dev/zero of="$view" bs=4096 count=16 oflag=direct conv=notrunc status=none 2>/dev/null &&
		dd if="$view" of=/dev/null bs=4096 count=16 iflag=direct status=none 2>/dev/null || ok=1
	engine_unmount "$e" "$view" "$pid"
	rm -f "$img" "$view"
	return $ok
}
DIRECT=1
for e in qcowfs qemu ceiling; do
	if ! probe_direct "$e"; then
		log "O_DIRECT does not work over the $e view: all engines run buffered with end_fsync=1"
		DIRECT=0
	fi
done
if ((DIRECT)); then
	IO_MODE="ioengine=libaio, direct=1 (O_DIRECT through all three FUSE mounts)"
	FIO_IO=(--ioengine=libaio --direct=1)
else
	IO_MODE="ioengine=libaio, buffered (direct=0) with end_fsync=1 and invalidate=1"
	FIO_IO=(--ioengine=libaio --direct=0 --end_fsync=1 --invalidate=1)
fi
log "fio mode: $IO_MODE"

# ---- prefilled template: written once, copied for every read workload -------

TEMPLATE=$WORKDIR/template.qcow2
TEMPLATE_RAW=$WORKDIR/template.img    # the same data as a raw file, for the ceiling
make_template() {
	local view=$WORKDIR/template.raw pid
	log "pre-filling a $SIZE template image (sequential 1 MiB writes through QEMU)"
	new_image "$TEMPLATE" "$SIZE_B"
	BENCH_STANDIN=0 engine_mount qemu "$TEMPLATE" "$view"
	pid=$MOUNT_PID
	fio --name=prefill --filename="$view" --rw=write --bs=1M --iodepth=8 \
		--ioengine=libaio --direct=1 --size="$SIZE_B" --end_fsync=1 \
		--output-format=json --output="$OUT/prefill.json" >/dev/null
	BENCH_STANDIN=0 engine_unmount qemu "$view" "$pid"
	rm -f "$view"
	qemu-img check -q "$TEMPLATE" || die "template image fails qemu-img check"
	qemu-img convert -f qcow2 -O raw "$TEMPLATE" "$TEMPLATE_RAW" ||
		die "qemu-img convert of the template to raw failed"
}

# ---- workloads ----------------------------------------------------------------
# name | image (fresh|filled|overlay) | fio arguments | metric (bw|iops) of (read|write)
# overlay: an empty qcow2 image on the filled template as its backing file
# (the ceiling: the template's raw copy); reads fall through to the base,
# 4 KiB writes copy the rest of their cluster up from it.
WORKLOADS=(
	"seqwrite|fresh|--rw=write --bs=1M --iodepth=4|bw|write"
	"seqread|filled|--rw=read --bs=1M --iodepth=4 --time_based|bw|read"
	"randread|filled|--rw=randread --bs=4k --iodepth=32 --time_based|iops|read"
	"randwrite|filled|--rw=randwrite --bs=4k --iodepth=32 --time_based|iops|write"
	"randwrite-unalloc|fresh|--rw=randwrite --bs=4k --iodepth=32 --time_based|iops|write"
	"randread-overlay|overlay|--rw=randread --bs=4k --iodepth=32 --time_based|iops|read"
	"randwrite-overlay|overlay|--rw=randwrite --bs=4k --iodepth=32 --time_based|iops|write"
)
declare -A WL_LABEL=(
	[seqwrite]="1 MiB sequential write, QD4, fresh image (MB/s)"
	[seqread]="1 MiB sequential read, QD4, allocated (MB/s)"
	[randread]="4 KiB random read, QD32, allocated (IOPS)"
	[randwrite]="4 KiB random write, QD32, allocated (IOPS)"
	[randwrite-unalloc]="4 KiB random write, QD32, fresh image (IOPS)"
	[randread-overlay]="4 KiB random read, QD32, empty overlay on a filled base (IOPS)"
	[randwrite-overlay]="4 KiB random write, QD32, empty overlay on a filled base (IOPS)"
)

selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

run_one() {   # run_one WORKLOAD ENGINE IMAGEKIND FIOARGS REP
	local wl=$1 e=$2 kind=$3 fioargs=$4 r=$5 view=$WORKDIR/$1-$2.raw pid hwm
	local img=$WORKDIR/$1-$2.${IMAGE_EXT[$2]} json=$OUT/$wl-$e-$r.json
	if [[ $kind == filled ]]; then
		if [[ $e == ceiling ]]; then cp --sparse=always "$TEMPLATE_RAW" "$img"
		else cp --sparse=always "$TEMPLATE" "$img"; fi
		sync "$img"
	elif [[ $kind == overlay && $e == ceiling ]]; then
		cp --sparse=always "$TEMPLATE_RAW" "$img"
		sync "$img"
	elif [[ $kind == overlay ]]; then
		rm -f "$img"
		qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER_SIZE" -b "$TEMPLATE" -F qcow2 "$img" "$SIZE_B"
	elif [[ $e == ceiling ]]; then
		new_raw "$img" "$SIZE_B"
	else
		new_image "$img" "$SIZE_B"
	fi
	engine_mount "$e" "$img" "$view" "$QCOWFS_OPTS"
	pid=$MOUNT_PID
	record "$wl" "$e" "mount_s_$r" "$MOUNT_SECS"
	# shellcheck disable=SC2086
	fio --name="$wl" --filename="$view" $fioargs "${FIO_IO[@]}" \
		--size="$SIZE_B" --runtime="$RUNTIME" \
		--output-format=json --output="$json" >/dev/null ||
		die "fio $wl on $e failed (see $json)"
	hwm=$(proc_kb "$pid" VmHWM)
	record "$wl" "$e" "hwm_kb_$r" "${hwm:-}"
	engine_unmount "$e" "$view" "$pid"
	# (the ceiling's raw file has no metadata to check)
	if [[ $e != ceiling ]] && [[ $kind == fresh || $wl == randwrite || $wl == randwrite-overlay ]]; then
		if qemu-img check -q "$img" >"$OUT/$wl-$e-$r.check" 2>&1; then
			record "$wl" "$e" "check_$r" ok
		else
			record "$wl" "$e" "check_$r" FAILED
			log "warning: qemu-img check of $wl/$e image failed: $OUT/$wl-$e-$r.check"
		fi
	fi
	rm -f "$img" "$view"
}

T_START=$(now)
need_template=0
for w in "${WORKLOADS[@]}"; do
	IFS='|' read -r wl kind _ _ _ <<<"$w"
	selected "$wl" && [[ $kind == filled || $kind == overlay ]] && need_template=1
done
((need_template)) && make_template

# The engines take turns at going first (the order rotates), so none
# always runs right after the template copy or after the same other one.
n=0
for w in "${WORKLOADS[@]}"; do
	IFS='|' read -r wl kind fioargs _ _ <<<"$w"
	selected "$wl" || continue
	for ((r = 1; r <= REPEAT; r++)); do
		case $((n++ % 3)) in
		0) order=(qcowfs qemu ceiling) ;;
		1) order=(qemu ceiling qcowfs) ;;
		2) order=(ceiling qcowfs qemu) ;;
		esac
		for e in "${order[@]}"; do
			log "$wl on $e (${RUNTIME} s, run $r/$REPEAT)"
			run_one "$wl" "$e" "$kind" "$fioargs" "$r"
		done
	done
done

# ---- time to mount: an image with every L2 table allocated --------------------

MOUNT_IMG=$WORKDIR/mount.qcow2
log "time to mount: $MOUNT_SIZE image with preallocation=metadata, 3 mounts per engine"
new_image "$MOUNT_IMG" "$MOUNT_SIZE_B" preallocation=metadata
for e in qcowfs qemu; do
	for i in 1 2 3; do
		engine_mount "$e" "$MOUNT_IMG" "$WORKDIR/mount.raw" "$QCOWFS_OPTS"
		pid=$MOUNT_PID
		record mount "$e" "mount_s_$i" "$MOUNT_SECS"
		record mount "$e" "rss_kb_$i" "$(proc_kb "$pid" VmRSS)"
		engine_unmount "$e" "$WORKDIR/mount.raw" "$pid"
	done
done
rm -f "$MOUNT_IMG"
T_END=$(now)

# ---- report ---------------------------------------------------------------------

QCOWFS_DESC=$QCOWFS
if ((BENCH_STANDIN)); then
	QCOWFS_DESC="STAND-IN: qemu-storage-daemon (not qcowfs)"
elif rev=$(git -C "$(dirname "$QCOWFS")" describe --always --dirty 2>/dev/null); then
	QCOWFS_DESC="$QCOWFS (commit $rev)"
fi
FS_DESC="$WORKDIR ($(stat -f -c %T "$WORKDIR"))"
WL_ENV=()
for w in "${WORKLOADS[@]}"; do
	IFS='|' read -r wl _ _ metric dir <<<"$w"
	selected "$wl" && WL_ENV+=("$wl|$metric|$dir|${WL_LABEL[$wl]}")
done

python3 - "$OUT" "$SUMMARY" "$SIZE" "$RUNTIME" "$MOUNT_SIZE" "$IO_MODE" "$QCOWFS_DESC" \
	"$(qemu-storage-daemon --version | head -1)" "$(elapsed "$T_START" "$T_END")" "$REPEAT" "$FS_DESC" \
	"$ARGS" "$PASSTHROUGH ${PASSTHROUGH_ARGS[*]}" "${WL_ENV[@]}" <<'EOF' | tee "$OUT/results.md"
import json, os, statistics, sys
out, summary, size, runtime, msize, iomode, qdesc, qemuver, total, repeat, fsdesc, args, ptdesc = sys.argv[1:14]
repeat = int(repeat)
workloads = [w.split('|', 3) for w in sys.argv[14:]]
ENGINES = ('qcowfs', 'qemu', 'ceiling')
# the project's standard: qcowfs within 15 % of the ceiling on every fio row
CEILING_MIN = 0.85
rec = {}
for line in open(summary):
    wl, e, k, v = line.rstrip('\n').split('\t')
    rec[(wl, e, k)] = v

def fio_one(wl, engine, metric, direction, r):
    path = os.path.join(out, '%s-%s-%d.json' % (wl, engine, r))
    try:
        text = open(path).read()
        job = json.loads(text[text.index('{'):])['jobs'][0][direction]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if metric == 'bw':
        return job['bw_bytes'] / 1e6          # MB/s (10^6 bytes)
    return job['iops']

spread = []
def fio_value(wl, engine, metric, direction):
    vals = [fio_one(wl, engine, metric, direction, r) for r in range(1, repeat + 1)]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    if len(vals) > 1:
        spread.append('%s/%s: %s' % (wl, engine, ' '.join('%.0f' % v for v in vals)))
    return statistics.median(vals)

def ratio(a, b):
    return '%.2f' % (a / b) if a is not None and b else 'n/a'

def fmt(v, nd=0):
    return 'n/a' if v is None else ('%.*f' % (nd, v))

print('## qcowfs vs QEMU FUSE export (qemu-storage-daemon) and the FUSE ceiling\n')
print('| workload | qcowfs | QEMU | FUSE ceiling | ratio qcowfs/QEMU | ratio qcowfs/ceiling |')
print('|---|---:|---:|---:|---:|---:|')
below = []
for wl, metric, direction, label in workloads:
    a, b, c = (fio_value(wl, e, metric, direction) for e in ENGINES)
    rc = ratio(a, c)
    if a is not None and c and a / c < CEILING_MIN:
        below.append(wl)
        rc = '**%s** (< %.2f)' % (rc, CEILING_MIN)
    print('| %s | %s | %s | %s | %s | %s |' % (label, fmt(a), fmt(b), fmt(c), ratio(a, b), rc))

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

hwm = {}
for e in ENGINES:
    vals = [num(rec.get((wl, e, 'hwm_kb_%d' % r))) for wl, *_ in workloads for r in range(1, repeat + 1)]
    vals = [v for v in vals if v is not None]
    hwm[e] = max(vals) / 1024 if vals else None
print('| daemon peak RSS, max VmHWM over the workloads (MiB, lower is better) | %s | %s | %s | %s | %s |'
      % (fmt(hwm['qcowfs'], 1), fmt(hwm['qemu'], 1), fmt(hwm['ceiling'], 1),
         ratio(hwm['qcowfs'], hwm['qemu']), ratio(hwm['qcowfs'], hwm['ceiling'])))
mt = {}
for e in ('qcowfs', 'qemu'):
    vals = [num(rec.get(('mount', e, 'mount_s_%d' % i))) for i in (1, 2, 3)]
    vals = [v for v in vals if v is not None]
    mt[e] = statistics.median(vals) if vals else None
print('| time to mount, %s image, preallocation=metadata, median of 3 (s, lower is better) | %s | %s | - | %s | - |'
      % (msize, fmt(mt['qcowfs'], 3), fmt(mt['qemu'], 3), ratio(mt['qcowfs'], mt['qemu'])))
md = {}
for e in ('qcowfs', 'qemu'):
    md[e] = num(rec.get(('seqread', e, 'mount_s_1')))
if md['qcowfs'] is not None:
    print('| time to mount, %s image with data (s, lower is better) | %s | %s | - | %s | - |'
          % (size, fmt(md['qcowfs'], 3), fmt(md['qemu'], 3), ratio(md['qcowfs'], md['qemu'])))
rss = {}
for e in ('qcowfs', 'qemu'):
    v = num(rec.get(('mount', e, 'rss_kb_1')))
    rss[e] = v / 1024 if v is not None else None
print('| daemon RSS right after mounting the %s image (MiB) | %s | %s | - | %s | - |'
      % (msize, fmt(rss['qcowfs'], 1), fmt(rss['qemu'], 1), ratio(rss['qcowfs'], rss['qemu'])))

bad = sorted({(wl, e) for (wl, e, k), v in rec.items() if k.startswith('check') and v != 'ok'})
print()
print('- qcowfs: %s' % qdesc)
print('- QEMU: %s, `--blockdev driver=file,cache.direct=off,discard=unmap --blockdev driver=qcow2,discard=unmap --export type=fuse,writable=on`' % qemuver)
print('- FUSE ceiling: `%s RAW VIEW`, a null low-level passthrough (bench/passthrough.c) with qcowfs\'s FUSE settings '
      'and no engine, over a raw file of the same size: sparse for the fresh-image rows, '
      'else a copy of the template converted with `qemu-img convert -O raw`' % ptdesc.strip())
print('- images: qcow2, 64 KiB clusters, %s virtual, a fresh one per engine per workload; '
      'read and allocated-write workloads use copies of one template pre-filled by sequential 1 MiB writes; in %s' % (size, fsdesc))
print('- fio: %s, %s s per workload (sequential write: one pass over the image, capped at that time), same random seed for all engines' % (iomode, runtime))
if repeat > 1:
    print('- %d runs per workload and engine, median shown; all runs: %s' % (repeat, '; '.join(spread)))
print('- MB/s = 10^6 bytes/s; ratio > 1 means qcowfs is faster (for RSS and mount time, larger)')
print('- qcowfs/ceiling below %.2f (qcowfs more than 15 %% below what FUSE allows) on: %s'
      % (CEILING_MIN, ', '.join(below) if below else 'no row'))
print('- qemu-img check after every write workload: %s' %
      ('all clean' if not bad else 'FAILED for ' + ', '.join('%s/%s' % x for x in bad)))
print('- command: `bench/run.sh%s`, total %s s, %s' % ((' ' + args) if args else '', total, os.uname().nodename))
EOF
log "results: $OUT/results.md (raw fio JSON in $OUT/)"
