#!/bin/bash
# bench/compact.sh: the figures of online compaction (issues 3 and 7).
#
#  (a) time from fstrim to the image file at its compacted size, for a 2 GiB
#      and an 8 GiB image (ext4 on a loop device over the view), with the
#      size that "qemu-img convert -O qcow2" would give
#  (b) compaction throughput (bytes moved / time) next to a plain cp of the
#      same number of bytes on the same disk
#  (c) 4 KiB random-read latency p50/p99, idle and while a compaction runs
#      (target: p99 during <= 2x idle)
#  (d) map memory per cluster (an estimate from daemon RSS)
#  (e) a compressed cloud-style image (ext4 made on a raw file, convert -c),
#      most files deleted through qcowfs, fstrim: time to the final size,
#      final size vs qemu-img convert -O qcow2 and vs the clusters in use,
#      4 KiB random-read p99 while the space is reclaimed vs idle
#  (f) the same figures for an image with two internal snapshots whose
#      active layer is partly discarded (fallocate -p on the view)
#
# Prints a table and writes it to $OUT/compact.md.  See bench/README.md.
set -euo pipefail

usage() {
	cat <<EOF
usage: ${0##*/} [options]
  --quick             (a) 2 GiB only, (b)/(c) on 1 GiB, (d) on 16 GiB
  --sizes LIST        image sizes for (a), with fill percent (default 2G:40,8G:80)
  --frag-size SIZE    image for (b) and (c) (default 4G)
  --map-size SIZE     virtual size of the preallocated image for (d) (default 64G)
  --cloud-size SIZE   file system of (e) (default 2G, about half filled; 320M with --quick)
  --snap-size SIZE    virtual size of the snapshot image of (f) (default 2G; 256M with --quick)
  --only LIST         subset of a,b,c,d,e,f (default all)
  --timeout SECONDS   longest wait for the file to stop shrinking in (a) (300)
  --settle SECONDS    (a) is over when nothing changed for this long (5);
                      raise it above compact_quiet_ms if that is set higher
  --no-qemu-ref       skip (a) through QEMU's FUSE export (the reference row)
  --qcowfs PATH       qcowfs binary (default: build dir of this checkout, then PATH)
  --qcowctl PATH      qcowctl binary (same search)
  --qcowfs-opts OPTS  extra -o options for every qcowfs mount
  --out DIR           results directory (default /tmp/qcowfs-compact-DATE)
  --workdir DIR       where images are created (default: a new dir in /var/tmp)
EOF
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"

ARGS="$*"
SIZES=2G:40,8G:80 FRAG_SIZE=4G MAP_SIZE=64G ONLY=a,b,c,d,e,f TIMEOUT=300 SETTLE=5
CLOUD_SIZE=2G SNAP_SIZE=2G CLOUD_SET=0 SNAP_SET=0
QUICK=0 OUT='' WORKDIR='' QCOWFS_OPT='' QCOWCTL_OPT='' QCOWFS_OPTS=''
SIZES_SET=0 FRAG_SET=0 MAP_SET=0 QEMU_REF=1
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--sizes) SIZES=$2; SIZES_SET=1; shift ;;
	--frag-size) FRAG_SIZE=$2; FRAG_SET=1; shift ;;
	--map-size) MAP_SIZE=$2; MAP_SET=1; shift ;;
	--cloud-size) CLOUD_SIZE=$2; CLOUD_SET=1; shift ;;
	--snap-size) SNAP_SIZE=$2; SNAP_SET=1; shift ;;
	--only) ONLY=$2; shift ;;
	--timeout) TIMEOUT=$2; shift ;;
	--settle) SETTLE=$2; shift ;;
	--no-qemu-ref) QEMU_REF=0 ;;
	--qcowfs) QCOWFS_OPT=$2; shift ;;
	--qcowctl) QCOWCTL_OPT=$2; shift ;;
	--qcowfs-opts) QCOWFS_OPTS=$2; shift ;;
	--out) OUT=$2; shift ;;
	--workdir) WORKDIR=$2; shift ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
	shift
done
if ((QUICK)); then
	((SIZES_SET)) || SIZES=2G:40
	((FRAG_SET)) || FRAG_SIZE=1G
	((MAP_SET)) || MAP_SIZE=16G
	((CLOUD_SET)) || CLOUD_SIZE=320M
	((SNAP_SET)) || SNAP_SIZE=256M
fi
IDLE_S=$((QUICK ? 3 : 8))   # seconds of idle latency sampling in (c), (e), (f)
selected() { [[ ",$ONLY," == *",$1,"* ]]; }

need_root_fuse
need_tools qemu-img:qemu-utils qemu-storage-daemon:qemu-system-common fio:fio \
	fusermount3:fuse3 python3:python3 losetup:mount mkfs.ext4:e2fsprogs \
	e2fsck:e2fsprogs fstrim:util-linux base64:coreutils fallocate:util-linux
QCOWFS=$(find_prog qcowfs "$QCOWFS_OPT") ||
	die "qcowfs not found: build it (./autogen.sh && ./configure && make) or pass --qcowfs PATH"
QCOWCTL=$(find_prog qcowctl "$QCOWCTL_OPT") ||
	die "qcowctl not found: build it or pass --qcowctl PATH"
log "qcowfs: $QCOWFS, qcowctl: $QCOWCTL"

setup_dirs compact
install_cleanup

RES=$OUT/compact.tsv      # section key value
: >"$RES"
record() { printf '%s\t%s\t%s\n' "$@" >>"$RES"; }

new_image() {   # new_image PATH SIZE_BYTES [qemu-img -o extra]
	rm -f "$1"
	qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER_SIZE${3:+,$3}" "$1" "$2"
}
file_size() { stat -c %s "$1"; }
status_get() {   # status_get VIEW KEY
	qcowfs_status "$1" | awk -F= -v k="$2" '$1 == k { print $2 }'
}
mount_qcowfs() {   # mount_qcowfs IMG VIEW [extra -o opts]
	local o=$QCOWFS_OPTS
	[[ -n ${3:-} ]] && o=${o:+$o,}$3
	engine_mount qcowfs "$1" "$2" "$o"
}

# A 64 MiB file of random bytes: the content of every file in (a), so kept
# files can be compared afterwards.
SRC=$WORKDIR/random-64M
head -c $((64 << 20)) /dev/urandom >"$SRC"

# ---- (a) time from fstrim to the compacted file ---------------------------------

# poll_shrink VIEW IMG T0 TIMEOUT OUTFILE: polls the file size and the status
# every 0.1 s until the recycler is idle (no compaction, no junk or erased
# clusters waiting) and the size has not changed for SETTLE seconds.
# Prints "seconds_to_final_size final_size polls"; the time is that of the
# last change of the size, from T0 (the start of fstrim).
poll_shrink() {
	python3 - "$@" <<'EOF'
import os, sys, time
view, img, t0, timeout, logf = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
settle = float(sys.argv[6])
import qcowfs_ctl
def status():
    try:
        return qcowfs_ctl.status(view)
    except OSError:
        return {}
log = open(logf, 'w')
last = os.stat(img).st_size
t_last = time.time()
stable_since = time.time()
while True:
    now = time.time()
    size = os.stat(img).st_size
    st = status()
    busy = (st.get('compacting', '0') not in ('0', 'false') or st.get('moves_in_flight', '0') != '0'
            or st.get('clusters_junk', '0') != '0' or st.get('clusters_erased', '0') != '0')
    log.write('%.3f %d %s %s %s\n' % (now - t0, size, st.get('compacting'),
              st.get('compact_progress'), st.get('clusters_junk')))
    if size != last:
        last, t_last, stable_since = size, now, now
    if busy:
        stable_since = now
    if now - stable_since >= settle:
        break
    if now - t0 > timeout:
        log.write('timeout\n')
        break
    time.sleep(0.1)
print('%.2f %d' % (t_last - t0, last))
EOF
}

fig_a() {   # fig_a ENGINE SIZE FILL_PERCENT
	local engine=$1 size=$2 fill=$3 bytes img view loop dir nfiles keep i t0 t1 before after secs
	local conv kept_ok=yes fsck=clean check=clean key
	bytes=$(parse_size "$size")
	key=a-$size; [[ $engine == qemu ]] && key=q-$size
	img=$WORKDIR/$key.qcow2 view=$WORKDIR/$key.raw dir=$WORKDIR/$key.mnt
	log "(a) $size image on $engine: ext4 over the view, fill ${fill}%, delete most, fstrim"
	new_image "$img" "$bytes"
	if [[ $engine == qemu ]]; then
		engine_mount qemu "$img" "$view"
	else
		mount_qcowfs "$img" "$view"
	fi
	local pid=$MOUNT_PID
	loop=$(losetup -f --show "$view")
	CLEAN_LOOPS+=("$loop")
	# Everything initialised now, so no lazy init writes during the timing.
	mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$loop"
	mkdir -p "$dir"
	mount -t ext4 "$loop" "$dir"
	CLEAN_DIRS+=("$dir")
	nfiles=$((bytes * fill / 100 / (64 << 20)))
	t0=$(now)
	for ((i = 0; i < nfiles; i++)); do cp "$SRC" "$dir/f$i"; done
	sync -f "$dir"
	t1=$(now)
	record "$key" fill_mb $((nfiles * 64 * 1048576 / 1000000))
	record "$key" fill_s "$(elapsed "$t0" "$t1")"
	# Keep one file in eight, spread over the file system.
	keep=0
	for ((i = 0; i < nfiles; i++)); do
		if ((i % 8 == 3)); then keep=$((keep + 1)); else rm -f "$dir/f$i"; fi
	done
	sync -f "$dir"
	sleep 1
	before=$(file_size "$img")
	record "$key" kept_mb $((keep * 64 * 1048576 / 1000000))
	record "$key" before "$before"
	[[ $engine == qemu ]] || qcowfs_status "$view" >"$OUT/$key.status-before"
	t0=$(now)
	fstrim "$dir"
	t1=$(now)
	record "$key" fstrim_s "$(elapsed "$t0" "$t1")"
	if [[ $engine == qemu ]]; then
		# QEMU only punches holes: the file keeps its length.  Wait a
		# moment for the record and take the size as it is.
		sleep 2
		sync "$img"
		after=$(file_size "$img")
	else
		read -r secs after < <(poll_shrink "$view" "$img" "$t0" "$TIMEOUT" "$OUT/$key.poll" "$SETTLE")
		record "$key" secs "$secs"
		qcowfs_status "$view" >"$OUT/$key.status-after"
		grep -q timeout "$OUT/$key.poll" && record "$key" timeout 1
	fi
	record "$key" after "$after"
	record "$key" after_alloc $(($(stat -c '%b * %B' "$img")))
	for ((i = 3; i < nfiles; i += 8)); do cmp -s "$SRC" "$dir/f$i" || kept_ok=no; done
	record "$key" kept_ok "$kept_ok"
	umount "$dir"
	e2fsck -fn "$loop" >"$OUT/$key.fsck" 2>&1 || fsck=errors
	record "$key" fsck "$fsck"
	losetup -d "$loop"
	forget CLEAN_LOOPS "$loop"
	engine_unmount "$engine" "$view" "$pid"
	qemu-img check "$img" >"$OUT/$key.check" 2>&1 || check="not clean"
	record "$key" check "$check"
	conv=$WORKDIR/$key.convert.qcow2
	qemu-img convert -O qcow2 -o "cluster_size=$CLUSTER_SIZE" "$img" "$conv"
	record "$key" convert "$(file_size "$conv")"
	rm -f "$conv" "$img" "$view"
}

# ---- (b)/(c) a fragmented image -------------------------------------------------

# fragment VIEW: write the whole view sequentially, then punch every other
# MiB out of it: half the clusters are free, spread over the whole file, so
# compaction moves the upper half's data down into the holes.
fragment() {
	local view=$1
	fio --name=fill --filename="$view" --rw=write --bs=1M --iodepth=8 \
		--ioengine=libaio --direct=1 --end_fsync=1 --output-format=json \
		--output="$OUT/fill.json" >/dev/null
	python3 - "$view" <<'EOF'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x02 | 0x01          # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.lseek(fd, 0, os.SEEK_END)
mib = 1 << 20
for off in range(0, size, 2 * mib):
    if libc.fallocate(fd, PUNCH, off, mib) != 0:
        e = ctypes.get_errno()
        sys.exit('fallocate(PUNCH_HOLE) at %d: %s' % (off, os.strerror(e)))
os.fsync(fd)
os.close(fd)
EOF
	# let the recycler erase the freed clusters, so the timing below is
	# about moves only
	local t=300
	while ((t-- > 0)); do
		[[ $(status_get "$view" clusters_junk) == 0 && $(status_get "$view" clusters_erased) == 0 ]] && break
		sleep 0.1
	done
}

# compact_now VIEW: asks the daemon for a compaction through the
# QCOWFS_IOC_COMPACT ioctl (what "qcowctl compact" does) and polls the status
# every 5 ms until it is over: finer than qcowctl's 200 ms progress polling,
# which would round a sub-second compaction up.  Prints the Unix times in ms
# of the request and of the end.
compact_now() {
	python3 - "$1" <<'EOF'
import os, sys, time
view = sys.argv[1]
import qcowfs_ctl
def status():
    return qcowfs_ctl.status(view)
def busy(st):
    return st.get('compacting', '0') not in ('0', 'false')
done0 = int(status().get('compactions_done', 0))
t0 = time.time()
qcowfs_ctl.request_compact(view)
seen = False
while True:
    st = status()
    if busy(st):
        seen = True
    elif int(st.get('compactions_done', 0)) > done0:
        break
    elif not seen and time.time() - t0 > 5:
        break      # never started: nothing to do
    time.sleep(0.005)
print('%d %d' % (t0 * 1000, time.time() * 1000))
EOF
}

# Automatic compaction off (a threshold nobody reaches), so it runs only when
# asked for.
NO_AUTO=compact_threshold=$((1 << 50))

fig_b() {
	local bytes img view pid m0 m1 t0 t1 moved src dst
	bytes=$(parse_size "$FRAG_SIZE")
	img=$WORKDIR/b.qcow2 view=$WORKDIR/b.raw
	log "(b) compaction throughput: $FRAG_SIZE image, every other MiB punched"
	new_image "$img" "$bytes"
	mount_qcowfs "$img" "$view" "$NO_AUTO"
	pid=$MOUNT_PID
	fragment "$view"
	record b before "$(file_size "$img")"
	m0=$(status_get "$view" clusters_moved)
	qcowfs_status "$view" >"$OUT/b.status-before"
	sync
	read -r t0 t1 < <(compact_now "$view")
	qcowfs_status "$view" >"$OUT/b.status-after"
	m1=$(status_get "$view" clusters_moved)
	moved=$(((m1 - m0) * CLUSTER_SIZE))
	record b secs "$(((t1 - t0) / 1000)).$(printf %03d $(((t1 - t0) % 1000)))"
	record b moved "$moved"
	record b after "$(file_size "$img")"
	engine_unmount qcowfs "$view" "$pid"
	if qemu-img check "$img" >"$OUT/b.check" 2>&1; then record b check clean; else record b check "not clean"; fi
	# The same number of bytes copied by cp on the same file system: the
	# source is in the page cache, like the image data compaction reads.
	if ((moved > 0)); then
		src=$WORKDIR/cp-src dst=$WORKDIR/cp-dst
		head -c "$moved" "$img" >"$src"
		sync
		t0=$(now)
		cp "$src" "$dst"
		sync "$dst"
		t1=$(now)
		record b cp_secs "$(elapsed "$t0" "$t1")"
		rm -f "$src" "$dst"
	fi
	rm -f "$img" "$view"
}

# lat_split SECTION LOG C0 C1: from fio's completion-latency log (Unix times
# in ms), p50/p99/IOPS over the window [C0, C1] ("during") and over the idle
# time before and after it (skipping the first 0.5 s, and 0.2 s after C1),
# recorded under SECTION.
lat_split() {
	python3 - "$@" <<'EOF' >>"$RES"
import sys
sec, path, c0, c1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
idle_v, during_v, before_v, after_v = [], [], [], []
first = None
last = 0
for line in open(path):
    f = line.split(',')
    t, ns = int(f[0]), int(f[1])
    if first is None:
        first = t
    last = max(last, t)
    if first + 500 <= t < c0:         # skip the first 0.5 s (warm-up)
        before_v.append(ns)
    elif c0 <= t <= c1:
        during_v.append(ns)
    elif t > c1 + 200:                # let the end of the compaction settle
        after_v.append(ns)
idle_v = before_v + after_v
idle_s = max(0.001, (c0 - first - 500 + max(0, last - c1 - 200)) / 1000.0)
def pct(v, p):
    if not v:
        return ''
    v = sorted(v)
    return '%.1f' % (v[min(len(v) - 1, int(len(v) * p / 100))] / 1000.0)
secs = {'idle': idle_s, 'during': max(0.001, (c1 - c0) / 1000.0),
        'before': max(0.001, (c0 - first - 500) / 1000.0),
        'after': max(0.001, (last - c1 - 200) / 1000.0)}
for name, v in (('idle', idle_v), ('during', during_v), ('before', before_v), ('after', after_v)):
    print('%s\t%s_n\t%d' % (sec, name, len(v)))
    print('%s\t%s_p50\t%s' % (sec, name, pct(v, 50)))
    print('%s\t%s_p99\t%s' % (sec, name, pct(v, 99)))
    print('%s\t%s_iops\t%s' % (sec, name, '%.0f' % (len(v) / secs[name]) if v else ''))
EOF
}

# (c): one fio run of 4 KiB random reads at queue depth 1 logs every I/O with
# its Unix time; IDLE_S seconds idle, then a compaction, then IDLE_S seconds
# idle again.  Percentiles are computed per window from that log; the idle
# figure takes both idle windows, so that a change of the machine's load
# during the run (other work on a shared host) does not land on one side.
fig_c() {
	local bytes img view pid fiopid t0 t1
	bytes=$(parse_size "$FRAG_SIZE")
	img=$WORKDIR/c.qcow2 view=$WORKDIR/c.raw
	log "(c) random-read latency idle and during compaction ($FRAG_SIZE image)"
	new_image "$img" "$bytes"
	mount_qcowfs "$img" "$view" "$NO_AUTO"
	pid=$MOUNT_PID
	fragment "$view"
	sync
	rm -f "$OUT"/c-lat_*.log
	fio --name=c --filename="$view" --rw=randread --bs=4k --iodepth=1 \
		--ioengine=libaio --direct=1 --time_based --runtime=3600 \
		--write_lat_log="$OUT/c-lat" --log_avg_msec=0 --log_unix_epoch=1 \
		--output-format=json --output="$OUT/c-fio.json" >/dev/null 2>&1 &
	fiopid=$!
	CLEAN_PIDS+=("$fiopid")
	sleep "$IDLE_S"
	read -r t0 t1 < <(compact_now "$view")
	record c moved $(($(status_get "$view" clusters_moved) * CLUSTER_SIZE))
	sleep "$IDLE_S"
	kill -INT "$fiopid"
	wait "$fiopid" || true
	record c compact_ms $((t1 - t0))
	lat_split c "$OUT/c-lat_clat.1.log" "$t0" "$t1"
	engine_unmount qcowfs "$view" "$pid"
	if qemu-img check "$img" >"$OUT/c.check" 2>&1; then record c check clean; else record c check "not clean"; fi
	rm -f "$OUT/c-lat_lat.1.log" "$OUT/c-lat_slat.1.log"
	gzip -f "$OUT"/c-lat_clat.1.log
	rm -f "$img" "$view"
}

# ---- (d) map memory per cluster ---------------------------------------------------

# RSS of the daemon right after mounting a tiny image and a big image whose
# metadata is fully allocated (every L2 table present, every cluster
# referenced); the difference over the difference in clusters estimates the
# memory the map needs per cluster.  cache_size=1M keeps the L2/refcount
# cache, which the open scan may fill, out of the difference.
fig_d() {
	local big=$WORKDIR/d-big.qcow2 tiny=$WORKDIR/d-tiny.qcow2 view=$WORKDIR/d.raw img e
	log "(d) map memory: RSS with a $MAP_SIZE preallocation=metadata image vs a 64 MiB one"
	new_image "$tiny" $((64 << 20))
	new_image "$big" "$(parse_size "$MAP_SIZE")" preallocation=metadata
	for img in tiny big; do
		for e in qcowfs qemu; do
			if [[ $e == qcowfs ]]; then
				# jemalloc's decay at 0: see bench/map-memory.sh
				MALLOC_CONF=${MALLOC_CONF:-dirty_decay_ms:0,muzzy_decay_ms:0} \
					mount_qcowfs "$WORKDIR/d-$img.qcow2" "$view" cache_size=1M
			else
				engine_mount qemu "$WORKDIR/d-$img.qcow2" "$view"
			fi
			sleep 1
			record d "${e}_${img}_rss_kb" "$(proc_kb "$MOUNT_PID" VmRSS)"
			record d "${e}_${img}_mount_s" "$MOUNT_SECS"
			[[ $e == qcowfs ]] && record d "${img}_clusters" "$(status_get "$view" clusters_total)"
			engine_unmount "$e" "$view" "$MOUNT_PID"
		done
	done
	rm -f "$big" "$tiny" "$view"
}

# ---- (e)/(f) compressed and snapshot images ---------------------------------------

LAYOUT_PY=$SRC_ROOT/tests/shell/qcow2_layout.py
# layout IMG KEY...: fields of qcow2_layout.py's JSON (the refcounts on disk,
# read without qcowfs), one per line
layout() {
	python3 "$LAYOUT_PY" "$1" | python3 -c 'import json, sys; d = json.load(sys.stdin); [print(d[k]) for k in sys.argv[1:]]' "${@:2}"
}

# qio_run IMG CMD...: qemu-io with one -c per CMD; dies when a command fails.
qio_run() {
	local img=$1 c args=() out
	shift
	for c; do args+=(-c "$c"); done
	out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || die "qemu-io $img $*: $out"
	! grep -qiE 'failed|error' <<<"$out" || die "qemu-io $img $*: $out"
}

# discard_view VIEW OFF:LEN...: fallocate -p on the view, range by range.
discard_view() {
	local view=$1 r
	shift
	for r; do fallocate -p -o "${r%%:*}" -l "${r#*:}" "$view"; done
}

# reclaim_run KEY VIEW IMG CMD...: one fio job reads 4 KiB blocks at random
# from VIEW (QD1, O_DIRECT, every latency logged with its Unix time) all
# along: IDLE_S seconds idle, then CMD (the trigger: fstrim, discards) and
# poll_shrink until the file has stopped shrinking and the recycler is idle,
# then IDLE_S seconds idle again.  Records under KEY: trigger_s (CMD
# itself), secs (trigger start to the last size change of the file), after,
# and the latency split with "during" = trigger start .. last size change.
reclaim_run() {
	local key=$1 view=$2 img=$3 fiopid t0 secs after c0 c1
	shift 3
	rm -f "$OUT/$key-lat"_*.log
	fio --name="$key" --filename="$view" --rw=randread --bs=4k --iodepth=1 \
		--ioengine=libaio --direct=1 --time_based --runtime=3600 \
		--write_lat_log="$OUT/$key-lat" --log_avg_msec=0 --log_unix_epoch=1 \
		--output-format=json --output="$OUT/$key-fio.json" >/dev/null 2>&1 &
	fiopid=$!
	CLEAN_PIDS+=("$fiopid")
	sleep "$IDLE_S"
	t0=$(now)
	"$@"
	record "$key" trigger_s "$(elapsed "$t0" "$(now)")"
	read -r secs after < <(poll_shrink "$view" "$img" "$t0" "$TIMEOUT" "$OUT/$key.poll" "$SETTLE")
	grep -q timeout "$OUT/$key.poll" && record "$key" timeout 1
	record "$key" secs "$secs"
	record "$key" after "$after"
	sleep "$IDLE_S"
	kill -INT "$fiopid"
	wait "$fiopid" || true
	forget CLEAN_PIDS "$fiopid"
	read -r c0 c1 < <(python3 -c 'import sys; t0 = float(sys.argv[1]); print(int(t0 * 1000), int((t0 + float(sys.argv[2])) * 1000))' "$t0" "$secs")
	lat_split "$key" "$OUT/$key-lat_clat.1.log" "$c0" "$c1"
	rm -f "$OUT/$key-lat_lat.1.log" "$OUT/$key-lat_slat.1.log"
	gzip -f "$OUT/$key-lat_clat.1.log"
}

# after_unmount KEY IMG: qemu-img check, the layout of the file (clusters in
# use, free clusters below its end) and what qemu-img convert -O qcow2 makes
# of it.
after_unmount() {
	local key=$1 img=$2 check=clean conv n cs free
	qemu-img check "$img" >"$OUT/$key.check" 2>&1 || check="not clean"
	record "$key" check "$check"
	read -r n cs free <<<"$(layout "$img" refcounted cluster_size free_below_end | tr '\n' ' ')"
	record "$key" in_use $((n * cs))
	record "$key" free_below_end "$free"
	conv=$WORKDIR/$key.convert.qcow2
	qemu-img convert -O qcow2 -o "cluster_size=$cs" "$img" "$conv"
	record "$key" convert "$(file_size "$conv")"
	rm -f "$conv"
}

# Data of the cloud image, three kinds as in tests/shell/t250: base64 of
# random bytes (text-like: zlib keeps ~3/4), log-like lines (a few %),
# random bytes (QEMU stores those clusters uncompressed).
gen_text() { head -c $(($2 * 786432)) /dev/urandom | base64 -w 76 >"$1"; }
gen_logs() { seq -f "%08g kernel: eth0 link up, 1000 Mbps full duplex, flow control rx/tx" 1 $(($2 * 14500)) >"$1"; }
gen_random() { head -c $(($2 << 20)) /dev/urandom >"$1"; }

# (e): ext4 made on a raw file (no qcowfs), filled to about 45 % in rounds
# of 12 files of 13 MiB and 3 kept files (one of each kind, sha256
# recorded), converted with qemu-img convert -c; then through qcowfs
# (default options) every file but the kept ones deleted, and fstrim.
fig_e() {
	local fs_bytes raw img view dir loop rounds r n kind pid t0 kept_ok=yes fsck=clean
	fs_bytes=$(parse_size "$CLOUD_SIZE")
	raw=$WORKDIR/e.raw img=$WORKDIR/e.qcow2 view=$WORKDIR/e.view dir=$WORKDIR/e.mnt
	log "(e) compressed cloud image: ext4 of $CLOUD_SIZE on a raw file, filled, qemu-img convert -c"
	rm -f "$raw"
	truncate -s "$fs_bytes" "$raw"
	mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$raw"
	loop=$(losetup -f --show "$raw")
	CLEAN_LOOPS+=("$loop")
	mkdir -p "$dir"
	mount -t ext4 "$loop" "$dir"
	CLEAN_DIRS+=("$dir")
	rounds=$((fs_bytes * 45 / 100 / (173 << 20)))
	((rounds > 0)) || rounds=1
	for ((r = 0; r < rounds; r++)); do
		n=0
		for kind in text text logs text random text text logs text random text text; do
			n=$((n + 1))
			"gen_$kind" "$dir/f$r-$n" 13
			case $n in
			3) gen_text "$dir/keep-text-$r" 4 ;;
			6) gen_logs "$dir/keep-logs-$r" 2 ;;
			9) gen_random "$dir/keep-random-$r" 3 ;;
			esac
		done
	done
	(cd "$dir" && sha256sum keep-*) >"$WORKDIR/e.keep.sum"
	record e fill_mb "$(du -sm "$dir" | cut -f1)"
	umount "$dir"
	forget CLEAN_DIRS "$dir"
	losetup -d "$loop"
	forget CLEAN_LOOPS "$loop"
	t0=$(now)
	qemu-img convert -c -f raw -O qcow2 -o "cluster_size=$CLUSTER_SIZE" "$raw" "$img"
	record e convert_c_s "$(elapsed "$t0" "$(now)")"
	rm -f "$raw"
	record e converted "$(file_size "$img")"
	record e compressed "$(layout "$img" compressed)"

	mount_qcowfs "$img" "$view"
	pid=$MOUNT_PID
	loop=$(losetup -f --show "$view")
	CLEAN_LOOPS+=("$loop")
	mount -t ext4 "$loop" "$dir"
	CLEAN_DIRS+=("$dir")
	(cd "$dir" && find . -type f ! -name 'keep-*' -delete)
	sync -f "$dir"
	sleep 1
	record e before "$(file_size "$img")"
	qcowfs_status "$view" >"$OUT/e.status-before"
	reclaim_run e "$view" "$img" fstrim "$dir"
	qcowfs_status "$view" >"$OUT/e.status-after"
	(cd "$dir" && sha256sum --quiet -c "$WORKDIR/e.keep.sum") >"$OUT/e.keep" 2>&1 || kept_ok=no
	record e kept_ok "$kept_ok"
	umount "$dir"
	forget CLEAN_DIRS "$dir"
	e2fsck -fn "$loop" >"$OUT/e.fsck" 2>&1 || fsck=errors
	record e fsck "$fsck"
	losetup -d "$loop"
	forget CLEAN_LOOPS "$loop"
	engine_unmount qcowfs "$view" "$pid"
	after_unmount e "$img"
	rm -f "$img" "$view"
}

# snap_sums IMG N: sha256 of snapshots s1..sN, one line each
snap_sums() {
	local img=$1 i tmp=$WORKDIR/snap.raw
	for ((i = 1; i <= $2; i++)); do
		rm -f "$tmp"
		qemu-img convert -U -f qcow2 -l "snapshot.name=s$i" -O raw "$img" "$tmp"
		sha256sum <"$tmp" | cut -d' ' -f1
	done
	rm -f "$tmp"
}

# (f): tests/shell/t260's two-snapshot scenario scaled to SNAP_SIZE (one
# unit U = SNAP_SIZE / 256): data written, s1, a scratch range written
# first and discarded last by QEMU (a hole below the phase's other writes),
# s2, writes that fill the hole; then through qcowfs (default options) four
# ranges of the active layer discarded: active-only data in the hole, data
# shared with s2, data shared with s1 and s2.  Compaction can reach the
# minimum only by moving clusters shared with the snapshots.
fig_f() {
	local bytes u img view pid snaps_ok=yes
	bytes=$(parse_size "$SNAP_SIZE")
	u=$((bytes / 256))
	((u % CLUSTER_SIZE == 0)) || die "--snap-size $SNAP_SIZE: must be a multiple of 256 clusters"
	img=$WORKDIR/f.qcow2 view=$WORKDIR/f.view
	log "(f) snapshot image: $SNAP_SIZE, 2 internal snapshots, active layer partly discarded"
	new_image "$img" "$bytes"
	qio_run "$img" "write -P 0x11 0 $((96 * u))" "write -P 0x12 $((128 * u)) $((64 * u))"
	qemu-img snapshot -c s1 "$img"
	qio_run "$img" "write -P 0x0f $((224 * u)) $((32 * u))" "write -P 0x21 $((32 * u)) $((32 * u))" \
		"write -P 0x22 $((200 * u)) $((24 * u))" "discard $((224 * u)) $((32 * u))"
	qemu-img snapshot -c s2 "$img"
	qio_run "$img" "write -P 0x31 0 $((8 * u))" "write -P 0x32 $((232 * u)) $((16 * u))" \
		"write -P 0x33 $((100 * u)) 4k" "write -P 0x34 $((150 * u)) 12k"
	snap_sums "$img" 2 >"$WORKDIR/f.sums"
	record f shared "$(layout "$img" shared)"

	mount_qcowfs "$img" "$view"
	pid=$MOUNT_PID
	record f before "$(file_size "$img")"
	qcowfs_status "$view" >"$OUT/f.status-before"
	reclaim_run f "$view" "$img" discard_view "$view" "0:$((16 * u))" "$((32 * u)):$((32 * u))" \
		"$((128 * u)):$((64 * u))" "$((224 * u)):$((32 * u))"
	qcowfs_status "$view" >"$OUT/f.status-after"
	engine_unmount qcowfs "$view" "$pid"
	after_unmount f "$img"
	snap_sums "$img" 2 | cmp -s - "$WORKDIR/f.sums" || snaps_ok=no
	record f snaps_ok "$snaps_ok"
	rm -f "$img" "$view"
}

T_START=$(now)
if selected a; then
	IFS=, read -r -a specs <<<"$SIZES"
	for spec in "${specs[@]}"; do
		fig_a qcowfs "${spec%%:*}" "${spec#*:}"
	done
	# The same steps through QEMU's FUSE export, for the smallest size
	# only: what a user gets without qcowfs.
	((QEMU_REF)) && fig_a qemu "${specs[0]%%:*}" "${specs[0]#*:}"
fi
selected b && fig_b
selected c && fig_c
selected d && fig_d
selected e && fig_e
selected f && fig_f
T_END=$(now)

QCOWFS_DESC=$QCOWFS
if rev=$(git -C "$(dirname "$QCOWFS")" describe --always --dirty 2>/dev/null); then
	QCOWFS_DESC="$QCOWFS (commit $rev)"
fi
FS_DESC="$WORKDIR ($(findmnt -n -o FSTYPE,SOURCE --target "$WORKDIR" 2>/dev/null | tr -s ' ' || stat -f -c %T "$WORKDIR"))"
python3 - "$RES" "$SIZES" "$FRAG_SIZE" "$MAP_SIZE" "$QCOWFS_DESC" "$ARGS" \
	"$(elapsed "$T_START" "$T_END")" "$IDLE_S" "$FS_DESC" <<'EOF' | tee "$OUT/compact.md"
import os, sys
res, sizes, frag, mapsize, qdesc, args, total, idle_s, fsdesc = sys.argv[1:10]
r = {}
for line in open(res):
    s, k, v = line.rstrip('\n').split('\t')
    r.setdefault(s, {})[k] = v
MiB = 1048576.0
def f(v, nd=1):
    try:
        return '%.*f' % (nd, float(v))
    except (TypeError, ValueError):
        return 'n/a'
def mib(v):
    return f(float(v) / MiB, 1) if v not in (None, '') else 'n/a'

print('## qcowfs online compaction\n')
rows = [s for s in r if s.startswith('a-')] + [s for s in r if s.startswith('q-')]
if rows:
    print('### (a) time from fstrim to the compacted image file\n')
    print('| image | written, kept (MB) | file before fstrim (MiB) | after (MiB) | allocated after (MiB) | fstrim→final size (s) | fstrim itself (s) | `qemu-img convert` (MiB) | after / convert | fsck, kept files, check |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---|')
    for s in rows:
        a = r[s]
        conv = a.get('convert')
        ratio = f(float(a['after']) / float(conv), 2) if conv and a.get('after') else 'n/a'
        if s.startswith('q-'):
            label = '%s, QEMU FUSE export (reference)' % s[2:]
            secs = 'never shrinks'
        else:
            label = '%s, qcowfs' % s[2:]
            secs = f(a.get('secs'), 2) + (' (timeout)' if a.get('timeout') else '')
        print('| %s | %s, %s | %s | %s | %s | %s | %s | %s | %s | %s, %s, %s |' % (
            label, a.get('fill_mb'), a.get('kept_mb'), mib(a.get('before')), mib(a.get('after')),
            mib(a.get('after_alloc')), secs, f(a.get('fstrim_s'), 2), mib(conv), ratio,
            a.get('fsck'), 'intact' if a.get('kept_ok') == 'yes' else 'CHANGED', a.get('check')))
    print('\nFill rate through ext4/loop/view: ' + ', '.join(
        '%s %s MB/s' % (s[2:] + (' QEMU' if s.startswith('q-') else ''),
                        f(float(r[s]['fill_mb']) / float(r[s]['fill_s']), 0)) for s in rows if r[s].get('fill_s')))
    print()
b = r.get('b')
if b:
    print('### (b) compaction throughput\n')
    moved = float(b.get('moved', 0))
    secs = float(b.get('secs', 0) or 0)
    thr = moved / 1e6 / secs if secs else None
    cps = float(b['cp_secs']) if b.get('cp_secs') else None
    cpthr = moved / 1e6 / cps if cps else None
    print('| %s image, every other MiB punched | bytes moved (MiB) | time (s) | MB/s |' % frag)
    print('|---|---:|---:|---:|')
    print('| compaction on request (file %s → %s MiB; check %s) | %s | %s | %s |' % (
        mib(b.get('before')), mib(b.get('after')), b.get('check'), mib(moved), f(secs, 2), f(thr, 0)))
    print('| `cp` of the same number of bytes + sync, same disk | %s | %s | %s |' % (
        mib(moved), f(cps, 2), f(cpthr, 0)))
    if thr and cpthr:
        print('\nCompaction runs at %.2fx the speed of cp.' % (thr / cpthr))
    print()
c = r.get('c')
if c:
    print('### (c) 4 KiB random-read latency, QD1, O_DIRECT (µs)\n')
    print('| | samples | IOPS | p50 | p99 |')
    print('|---|---:|---:|---:|---:|')
    labels = {'idle': '**idle** (%s s before + %s s after)' % (idle_s, idle_s),
              'during': '**during compaction** (%s ms, %s MiB moved)' % (c.get('compact_ms'), mib(c.get('moved'))),
              'before': 'idle before only', 'after': 'idle after only'}
    for name in ('idle', 'during', 'before', 'after'):
        print('| %s | %s | %s | %s | %s |' % (labels[name],
            c.get(name + '_n'), c.get(name + '_iops'), c.get(name + '_p50'), c.get(name + '_p99')))
    try:
        q = float(c['during_p99']) / float(c['idle_p99'])
        print('\np99 during / idle = %.2f (target <= 2: %s). Image check after: %s.' % (
            q, 'met' if q <= 2 else 'NOT met', c.get('check')))
    except (KeyError, ValueError, ZeroDivisionError):
        print('\np99 ratio not available (compaction too short to sample?)')
    print()
d = r.get('d')
if d:
    print('### (d) map memory per cluster (ESTIMATE from daemon RSS)\n')
    print('| | tiny image (64 MiB) RSS (MiB) | %s preallocation=metadata RSS (MiB) | difference (MiB) | mount time of the big one (s) |' % mapsize)
    print('|---|---:|---:|---:|---:|')
    for e, label in (('qcowfs', 'qcowfs (cache_size=1M)'), ('qemu', 'qemu-storage-daemon (no map; reference)')):
        t, bg = d.get(e + '_tiny_rss_kb'), d.get(e + '_big_rss_kb')
        diff = (float(bg) - float(t)) / 1024 if t and bg else None
        print('| %s | %s | %s | %s | %s |' % (label, f(float(t) / 1024) if t else 'n/a',
              f(float(bg) / 1024) if bg else 'n/a', f(diff), f(d.get(e + '_big_mount_s'), 3)))
    try:
        dc = float(d['big_clusters']) - float(d['tiny_clusters'])
        per = (float(d['qcowfs_big_rss_kb']) - float(d['qcowfs_tiny_rss_kb'])) * 1024 / dc
        print('\nEstimate: %.1f bytes of daemon memory per physical cluster (%d more clusters in the big image; '
              'RSS is page-granular and includes allocator slack; target <= 9 bytes of map per cluster).' % (per, dc))
    except (KeyError, ValueError, ZeroDivisionError):
        print('\nEstimate not available (clusters_total missing from the status).')
    print()
ef = [k for k in ('e', 'f') if r.get(k)]
if ef:
    print('### (e)/(f) compressed cloud image and snapshot image\n')
    print('| image | file before the trigger (MiB) | after (MiB) | in use after (MiB) | free clusters below the end | trigger→final size (s) | `qemu-img convert -O qcow2` (MiB) | after / convert | read p99 idle (µs) | p99 during (µs) | during / idle | reads during | checks |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|')
    for k in ef:
        x = r[k]
        if k == 'e':
            label = 'compressed cloud image, fstrim (%s MiB of files, %s compressed clusters; convert -c made %s MiB)' % (
                x.get('fill_mb'), x.get('compressed'), mib(x.get('converted')))
            checks = 'fsck %s, kept files %s, check %s' % (x.get('fsck'), 'intact' if x.get('kept_ok') == 'yes' else 'CHANGED', x.get('check'))
        else:
            label = '2 snapshots, active layer discarded (%s shared clusters)' % x.get('shared')
            checks = 'snapshots %s, check %s' % ('identical' if x.get('snaps_ok') == 'yes' else 'CHANGED', x.get('check'))
        try:
            ratio = f(float(x['after']) / float(x['convert']), 2)
        except (KeyError, ValueError, ZeroDivisionError):
            ratio = 'n/a'
        try:
            q = f(float(x['during_p99']) / float(x['idle_p99']), 2)
        except (KeyError, ValueError, ZeroDivisionError):
            q = 'n/a'
        secs = f(x.get('secs'), 2) + (' (timeout)' if x.get('timeout') else '')
        if x.get('after') and x.get('after') == x.get('before'):
            secs = 'never shrinks'
        print('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            label, mib(x.get('before')), mib(x.get('after')), mib(x.get('in_use')), x.get('free_below_end'),
            secs, mib(x.get('convert')), ratio, x.get('idle_p99'), x.get('during_p99'), q, x.get('during_n'), checks))
    print()
    if r.get('e'):
        print('(e) `qemu-img convert -c` of the file system took %s s. ' % f(r['e'].get('convert_c_s'), 1), end='')
    if r.get('f'):
        print('(f) `qemu-img convert` drops internal snapshots, so for (f) the reference is "in use after" '
              '(clusters with a refcount, from the refcount blocks after unmount), not the convert column.', end='')
    print('\n"During" is from the start of the trigger (fstrim, discards) to the last change of the file size; '
          'the trigger itself took %s s.\n' % ', '.join('%s: %s' % (k, f(r[k].get('trigger_s'), 2)) for k in ef))
print('- qcowfs: %s' % qdesc)
print('- images: qcow2, 64 KiB clusters, in %s' % fsdesc)
print('- command: `bench/compact.sh%s`, total %s s, %s' % ((' ' + args) if args else '', total, os.uname().nodename))
EOF
log "results: $OUT/compact.md"
