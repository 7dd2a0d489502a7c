#!/bin/bash
# bench/guestfs.sh: the real use (issue 9): a guest file system (ext4) on a
# loop device over the raw view, served by qcowfs and by QEMU's FUSE export
# (qemu-storage-daemon --export type=fuse) side by side in one run, each with
# a buffered and with a direct-I/O loop device (losetup --direct-io=on).
# For every engine and loop mode, on a fresh qcow2 image:
#   (1) copy a tree of small files in (/usr/share/doc) and sync
#   (2) drop the caches and read it all back cold (tar through a pipe)
#   (3) fio 4 KiB 70/30 random read/write on a file inside ext4, time based
#   (4) delete everything, fstrim, and the time from the start of fstrim
#       until the image file stops changing (qcowfs compacts and truncates;
#       QEMU only punches holes, so its ls -l size is shown as well)
# then e2fsck -fn of the guest file system and qemu-img check of the image.
# Prints the table with the ratios qcowfs/QEMU and writes it to
# $OUT/guestfs.md.  See bench/README.md.
set -euo pipefail

usage() {
	cat <<EOF
usage: ${0##*/} [options]
  --quick             2 GiB images, 256 MiB fio file, 5 s of fio, one run
                      (default 4 GiB, 512 MiB, 30 s, two runs)
  --size SIZE         virtual size of the images
  --tree DIR          the tree of small files to copy (default /usr/share/doc)
  --fio-size SIZE     size of fio's file inside ext4
  --runtime SECONDS   fio runtime per engine and loop mode
  --repeat N          every engine and loop mode N times, the median shown
                      (default 2, 1 with --quick)
  --modes LIST        loop modes, a subset of buffered,direct (default both)
  --timeout SECONDS   longest wait for the image file to stop changing (300)
  --settle SECONDS    the image is final when nothing changed for this long (5)
  --qcowfs PATH       qcowfs binary (default: build dir of this checkout, then PATH)
  --qcowctl PATH      qcowctl binary (same search)
  --qcowfs-opts OPTS  extra -o options for every qcowfs mount
  --out DIR           results directory (default /tmp/qcowfs-guestfs-DATE)
  --workdir DIR       where images are created (default: a new dir in /dev/shm
                      when it has room, else in /var/tmp)
EOF
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"

ARGS="$*"
SIZE=4G FIO_SIZE=512M RUNTIME=30 TREE=/usr/share/doc MODES=buffered,direct
TIMEOUT=300 SETTLE=5 QUICK=0 SIZE_SET=0 FIO_SET=0 RUNTIME_SET=0 REPEAT=2 REPEAT_SET=0
OUT='' WORKDIR='' QCOWFS_OPT='' QCOWCTL_OPT='' QCOWFS_OPTS=''
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--size) SIZE=$2; SIZE_SET=1; shift ;;
	--tree) TREE=$2; shift ;;
	--fio-size) FIO_SIZE=$2; FIO_SET=1; shift ;;
	--runtime) RUNTIME=$2; RUNTIME_SET=1; shift ;;
	--repeat) REPEAT=$2; REPEAT_SET=1; shift ;;
	--modes) MODES=$2; shift ;;
	--timeout) TIMEOUT=$2; shift ;;
	--settle) SETTLE=$2; shift ;;
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
	((SIZE_SET)) || SIZE=2G
	((FIO_SET)) || FIO_SIZE=256M
	((RUNTIME_SET)) || RUNTIME=5
	((REPEAT_SET)) || REPEAT=1
fi
[[ $REPEAT =~ ^[0-9]+$ && $REPEAT -gt 0 ]] || die "bad --repeat: $REPEAT"
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "bad --runtime: $RUNTIME"
[[ -d $TREE ]] || die "--tree $TREE: not a directory"
IFS=, read -r -a MODE_LIST <<<"$MODES"
for m in "${MODE_LIST[@]}"; do
	[[ $m == buffered || $m == direct ]] || die "bad loop mode in --modes: $m"
done
SIZE_B=$(parse_size "$SIZE")
FIO_SIZE_B=$(parse_size "$FIO_SIZE")

need_root_fuse
need_tools qemu-img:qemu-utils qemu-storage-daemon:qemu-system-common fio:fio \
	fusermount3:fuse3 python3:python3 losetup:mount mkfs.ext4:e2fsprogs \
	e2fsck:e2fsprogs fstrim:util-linux tar:tar
QCOWFS=$(find_prog qcowfs "$QCOWFS_OPT") ||
	die "qcowfs not found: build it (./autogen.sh && ./configure && make) or pass --qcowfs PATH"
QCOWCTL=$(find_prog qcowctl "$QCOWCTL_OPT") ||
	die "qcowctl not found: build it or pass --qcowctl PATH"
log "qcowfs: $QCOWFS, qcowctl: $QCOWCTL"

OUT=${OUT:-/tmp/qcowfs-guestfs-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TREE_B=$(du -sb --apparent-size "$TREE" | cut -f1)
TREE_FILES=$(find "$TREE" | wc -l)
if [[ -z $WORKDIR ]]; then
	# In memory when there is room, as run.sh: the image files would sit in
	# the host page cache anyway, and the writeback of a disk-backed file
	# system would land on whichever engine runs next.  Room for one image
	# filled with the tree and fio's file, the staged tree, and slack.
	base=/var/tmp
	avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0)
	((avail * 1024 > 2 * (TREE_B + FIO_SIZE_B) + (2 << 30))) && base=/dev/shm
	WORKDIR=$(mktemp -d "$base/qcowfs-guestfs.XXXXXX")
	CLEAN_FILES+=("$WORKDIR")
else
	mkdir -p "$WORKDIR"; WORKDIR=$(cd "$WORKDIR" && pwd)
fi
install_cleanup

RES=$OUT/guestfs.tsv      # ENGINE-MODE-RUN key value
: >"$RES"
record() { printf '%s\t%s\t%s\n' "$@" >>"$RES"; }

# The tree is staged once in the work directory, so that every engine copies
# from the same place and none pays for reading it from the host disk first.
STAGE=$WORKDIR/tree
log "staging $TREE ($((TREE_B / 1000000)) MB, $TREE_FILES entries) in $WORKDIR"
cp -a "$TREE" "$STAGE"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# poll_final IMG T0 TIMEOUT SETTLE LOG [VIEW]: polls the image file's size
# and allocation every 0.1 s until neither changed for SETTLE seconds (and,
# with VIEW, the qcowfs recycler is idle: no compaction, no junk or erased
# clusters waiting).  Prints the seconds from T0 to the last change of the
# size and to the last change of the allocation, then the final size and
# allocation in bytes.
poll_final() {
	python3 - "$@" <<'EOF'
import os, sys, time
img, t0, timeout, settle, logf = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
view = sys.argv[6] if len(sys.argv) > 6 else None
status = lambda: {}
if view:
    import qcowfs_ctl
    def status():
        try:
            return qcowfs_ctl.status(view)
        except OSError:
            return {}
def busy(st):
    return (st.get('compacting', '0') not in ('0', 'false') or st.get('moves_in_flight', '0') != '0'
            or st.get('clusters_junk', '0') != '0' or st.get('clusters_erased', '0') != '0')
log = open(logf, 'w')
st0 = os.stat(img)
size, alloc = st0.st_size, st0.st_blocks * 512
t_size = t_alloc = stable_since = time.time()
timed_out = False
while True:
    now = time.time()
    s = os.stat(img)
    st = status()
    log.write('%.3f %d %d %s\n' % (now - t0, s.st_size, s.st_blocks * 512, st.get('compacting', '-')))
    if s.st_size != size:
        size, t_size, stable_since = s.st_size, now, now
    if s.st_blocks * 512 != alloc:
        alloc, t_alloc, stable_since = s.st_blocks * 512, now, now
    if busy(st):
        stable_since = now
    if now - stable_since >= settle:
        break
    if now - t0 > timeout:
        timed_out = True
        break
    time.sleep(0.1)
print('%.2f %.2f %d %d %d' % (max(0, t_size - t0), max(0, t_alloc - t0), size, alloc, timed_out))
EOF
}

step_failed() {   # step_failed KEY WHAT
	record "$1" failed "$2"
	log "warning: $1: step failed: $2"
}

# guest_steps KEY DIR: steps (1)-(3) and the deletion in the mounted guest
# file system.  Returns 1 at the first step that fails, after recording
# which one: an engine that corrupts the guest file system makes cp, tar
# or fio fail, and that is a result, not a reason to stop the run.
guest_steps() {
	local key=$1 dir=$2 t0 t1

	# (1) copy the tree in
	drop_caches
	t0=$(now)
	cp -a "$STAGE" "$dir/tree" 2>"$OUT/$key.cp.err" || { step_failed "$key" "(1) cp -a of the tree"; return 1; }
	sync -f "$dir" || { step_failed "$key" "(1) sync"; return 1; }
	t1=$(now)
	record "$key" copy_s "$(elapsed "$t0" "$t1")"

	# (2) read it all back cold.  Through a pipe: GNU tar writing to
	# /dev/null itself skips reading the file contents.
	drop_caches
	t0=$(now)
	if ! tar -C "$dir" -cf - tree 2>"$OUT/$key.tar.err" | cat >/dev/null ||
		[[ -s $OUT/$key.tar.err ]]; then
		step_failed "$key" "(2) tar of the tree"; return 1
	fi
	t1=$(now)
	record "$key" read_s "$(elapsed "$t0" "$t1")"
	if diff -rq --no-dereference "$STAGE" "$dir/tree" >"$OUT/$key.diff" 2>&1; then
		record "$key" intact yes
	else
		record "$key" intact no
		step_failed "$key" "(2) the tree read back differs from the original (diff -r)"
		return 1
	fi

	# (3) fio inside the file system; its file is laid out before the clock
	fio --name=mixed --filename="$dir/fio.dat" --size="$FIO_SIZE_B" \
		--rw=randrw --rwmixread=70 --bs=4k --ioengine=libaio --direct=1 \
		--iodepth=16 --time_based --runtime="$RUNTIME" --randrepeat=1 \
		--output-format=json --output="$OUT/$key.fio.json" >/dev/null 2>&1 ||
		{ step_failed "$key" "(3) fio (see $key.fio.json)"; return 1; }

	# (4) delete everything
	rm -rf "$dir/tree" "$dir/fio.dat" || { step_failed "$key" "(4) rm of the tree"; return 1; }
	sync -f "$dir" || { step_failed "$key" "(4) sync"; return 1; }
}

# run_combo ENGINE MODE RUN: the four steps on a fresh image, then the checks.
run_combo() {
	local e=$1 mode=$2 key=$1-$2-$3 img view dir loop pid t0 t1 dio fsck=clean check=clean
	local secs_size secs_alloc after after_alloc timed_out mounted=0 steps=0
	img=$WORKDIR/$key.qcow2 view=$WORKDIR/$key.raw dir=$WORKDIR/$key.mnt
	log "$e, $mode loop device, run $3/$REPEAT: fresh $SIZE image"
	rm -f "$img"
	qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER_SIZE" "$img" "$SIZE_B"
	engine_mount "$e" "$img" "$view" "$QCOWFS_OPTS"
	pid=$MOUNT_PID
	record "$key" mount_s "$MOUNT_SECS"
	if [[ $mode == direct ]]; then
		loop=$(losetup -f --show --direct-io=on "$view" 2>"$OUT/$key.losetup") ||
			die "losetup --direct-io=on $view failed: $(cat "$OUT/$key.losetup")"
	else
		loop=$(losetup -f --show --direct-io=off "$view")
	fi
	CLEAN_LOOPS+=("$loop")
	dio=$(cat "/sys/block/${loop#/dev/}/loop/dio" 2>/dev/null || echo '?')
	record "$key" dio "$dio"
	if [[ $mode == direct && $dio != 1 ]]; then
		# The kernel kept the loop device buffered: measuring it would
		# repeat the buffered row under the wrong name.
		log "the kernel refused direct I/O on $loop over the $e view: not measured"
		record "$key" refused 1
		losetup -d "$loop"; forget CLEAN_LOOPS "$loop"
		engine_unmount "$e" "$view" "$pid"
		rm -f "$img" "$view"
		return 0
	fi
	mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$loop"
	mkdir -p "$dir"
	if mount -t ext4 "$loop" "$dir" 2>"$OUT/$key.mount.err"; then
		mounted=1
		CLEAN_DIRS+=("$dir")
		guest_steps "$key" "$dir" && steps=1
	else
		record "$key" failed "mount of the new ext4 right after mkfs.ext4 (see $key.mount.err)"
		log "warning: $key: ext4 does not mount right after mkfs"
	fi

	# (4) fstrim and the time until the image file has settled
	if ((steps)); then
		sleep 1
		record "$key" before "$(stat -c %s "$img")"
		record "$key" before_alloc $(($(stat -c '%b * %B' "$img")))
		t0=$(now)
		if fstrim "$dir"; then
			t1=$(now)
			record "$key" fstrim_s "$(elapsed "$t0" "$t1")"
			if [[ $e == qcowfs ]]; then
				read -r secs_size secs_alloc after after_alloc timed_out < <(
					poll_final "$img" "$t0" "$TIMEOUT" "$SETTLE" "$OUT/$key.poll" "$view")
			else
				read -r secs_size secs_alloc after after_alloc timed_out < <(
					poll_final "$img" "$t0" "$TIMEOUT" "$SETTLE" "$OUT/$key.poll")
			fi
			record "$key" secs_size "$secs_size"
			record "$key" secs_alloc "$secs_alloc"
			record "$key" after "$after"
			record "$key" after_alloc "$after_alloc"
			record "$key" timeout "$timed_out"
			record "$key" lsl "$(stat -c %s "$img")"   # the size ls -l shows
		else
			record "$key" failed "(4) fstrim"
		fi
	fi

	if ((mounted)); then umount "$dir"; forget CLEAN_DIRS "$dir"; fi
	e2fsck -fn "$loop" >"$OUT/$key.fsck" 2>&1 || fsck=errors
	record "$key" fsck "$fsck"
	losetup -d "$loop"; forget CLEAN_LOOPS "$loop"
	engine_unmount "$e" "$view" "$pid"
	qemu-img check "$img" >"$OUT/$key.check" 2>&1 || check="not clean"
	record "$key" check "$check"
	[[ $fsck == clean && $check == clean ]] ||
		log "warning: $e/$mode: e2fsck -fn $fsck, qemu-img check $check (see $OUT/$key.*)"
	rm -f "$img" "$view"
}

T_START=$(now)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# Who goes first alternates from one loop mode and run to the next.
n=0
for mode in "${MODE_LIST[@]}"; do
	for ((run = 1; run <= REPEAT; run++)); do
		if ((n++ % 2)); then order=(qemu qcowfs); else order=(qcowfs qemu); fi
		for e in "${order[@]}"; do run_combo "$e" "$mode" "$run"; done
	done
done
T_END=$(now)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

QCOWFS_DESC=$QCOWFS
if rev=$(git -C "$(dirname "$QCOWFS")" describe --always --dirty 2>/dev/null); then
	QCOWFS_DESC="$QCOWFS (commit $rev)"
fi
FS_DESC="$WORKDIR ($(stat -f -c %T "$WORKDIR"))"
python3 - "$RES" "$OUT" "$MODES" "$SIZE" "$FIO_SIZE" "$RUNTIME" "$TREE" "$TREE_B" "$TREE_FILES" \
	"$QCOWFS_DESC" "$(qemu-storage-daemon --version | head -1)" "$FS_DESC" "$ARGS" \
	"$(elapsed "$T_START" "$T_END")" "$(uname -r)" "$REPEAT" \
	"$LOAD_START / $LOAD_END, $(nproc) CPUs" <<'EOF' | tee "$OUT/guestfs.md"
import json, os, statistics, sys
(res, out, modes, size, fio_size, runtime, tree, tree_b, tree_files, qdesc, qemuver,
 fsdesc, args, total, kernel, repeat, load) = sys.argv[1:18]
modes = modes.split(',')
runs = range(1, int(repeat) + 1)
tree_b = float(tree_b)
r = {}
for line in open(res):
    k, key, v = line.rstrip('\n').split('\t')
    r.setdefault(k, {})[key] = v
MiB = 1048576.0

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def fio(key, d):
    try:
        text = open(os.path.join(out, key + '.fio.json')).read()
        return json.loads(text[text.index('{'):])['jobs'][0][d]['iops']
    except (OSError, ValueError, KeyError, IndexError):
        return None

def measured(key):
    # a run whose guest file system came back wrong gives no figures: a
    # wrong engine must not look fast
    x = r.get(key, {})
    return x and not x.get('refused') and not x.get('failed')

# each row: label, function(key) -> value, format, higher_is_better (None: no ratio)
def rate(k):
    return lambda key: (tree_b / 1e6 / num(r[key][k])) if num(r[key].get(k)) else None
def field(k, scale=1.0):
    return lambda key: (num(r[key].get(k)) / scale) if num(r[key].get(k)) is not None else None
def fio_total(key):
    a, b = fio(key, 'read'), fio(key, 'write')
    return a + b if a is not None and b is not None else None
rows = [
    ('(1) copy the tree in + sync (MB/s)', rate('copy_s'), 0, True),
    ('(1) copy, seconds', field('copy_s'), 2, False),
    ('(2) cold read back, tar (MB/s)', rate('read_s'), 0, True),
    ('(2) cold read, seconds', field('read_s'), 2, False),
    ('(3) fio 4 KiB 70/30 randrw, QD16, O_DIRECT in ext4: total IOPS', fio_total, 0, True),
    ('(3) of which read IOPS', lambda k: fio(k, 'read'), 0, True),
    ('(3) of which write IOPS', lambda k: fio(k, 'write'), 0, True),
    ('(4) fstrim itself (s)', field('fstrim_s'), 2, False),
    ('(4) fstrim → final file size (s)', None, 2, False),
    ('(4) fstrim → allocation settled (s)', field('secs_alloc'), 2, False),
    ('(4) image file before fstrim, ls -l (MiB)', field('before', MiB), 1, False),
    ('(4) image file after, ls -l (MiB)', field('lsl', MiB), 1, False),
    ('(4) image allocated after, du (MiB)', field('after_alloc', MiB), 1, False),
]

def secs_size(key):
    x = r.get(key, {})
    if num(x.get('secs_size')) is None:
        return None
    if num(x.get('after')) == num(x.get('before')):
        return 'never'
    return num(x['secs_size'])

def keys(combo):
    return ['%s-%d' % (combo, i) for i in runs if measured('%s-%d' % (combo, i))]

def median(fn, combo):
    vals = [fn(k) for k in keys(combo)]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

print('## qcowfs vs QEMU FUSE export: ext4 on a loop device over the view\n')
head = '| step |'
sep = '|---|'
for m in modes:
    head += ' qcowfs, %s loop | QEMU, %s loop | qcowfs/QEMU |' % (m, m)
    sep += '---:|---:|---:|'
print(head)
print(sep)

def status(combo):
    xs = [(i, r.get('%s-%d' % (combo, i), {})) for i in runs]
    if all(x.get('refused') for _, x in xs):
        return 'refused direct I/O (dio=0): not run'
    fails = ['run %d: %s' % (i, x['failed'].split(' (see')[0]) for i, x in xs if x.get('failed')]
    def agg(k):
        bad = [str(i) for i, x in xs if x and x.get(k) != 'clean']
        return 'clean' if not bad else '**%s** (run %s)' % (
            ', '.join(sorted({x.get(k, '?') for i, x in xs if str(i) in bad})), ', '.join(bad))
    return '%s; fsck %s; check %s' % ('**FAILED** ' + '; '.join(fails) if fails else 'all steps ran',
                                      agg('fsck'), agg('check'))

line = '| guest file system: steps, `e2fsck -fn`, `qemu-img check` |'
for m in modes:
    line += ' %s | %s | |' % (status('qcowfs-' + m), status('qemu-' + m))
print(line)
spread = []
for label, fn, nd, hib in rows:
    line = '| %s |' % label
    for m in modes:
        vals = []
        for e in ('qcowfs', 'qemu'):
            combo = '%s-%s' % (e, m)
            if not keys(combo):
                vals.append(None)
                line += ' %s |' % ('refused direct I/O' if r.get(combo + '-1', {}).get('refused')
                                   else 'failed' if r.get(combo + '-1') else 'n/a')
                continue
            if fn is None:
                ss = [secs_size(k) for k in keys(combo)]
                if ss and all(v == 'never' for v in ss):
                    line += ' never shrinks |'
                else:
                    ns = [v for v in ss if isinstance(v, float)]
                    line += ' %s |' % ('%.2f' % statistics.median(ns) if ns else 'n/a')
                    if any(r['%s' % k].get('timeout') == '1' for k in keys(combo)):
                        line = line[:-2] + ' (timeout) |'
                vals.append(None)
                continue
            v = median(fn, combo)
            vals.append(v)
            line += ' %s |' % ('n/a' if v is None else '%.*f' % (nd, v))
            if len(runs) > 1 and label.startswith(('(1) copy the', '(2) cold read back', '(3) fio')):
                each = [fn(k) for k in keys(combo)]
                spread.append('%s %s/%s: %s' % (label.split(' ')[0], e, m,
                              ' '.join('n/a' if x is None else '%.0f' % x for x in each)))
        a, b = vals
        line += ' %s |' % ('%.2f' % (a / b) if a is not None and b else '-')
    print(line)
checks = []
for m in modes:
    for e in ('qcowfs', 'qemu'):
        for i in runs:
            k = '%s-%s-%d' % (e, m, i)
            x = r.get(k, {})
            if x.get('refused'):
                checks.append('%s: not run, the kernel kept the loop device buffered (dio=0)' % k)
            elif x:
                checks.append('%s: %s, e2fsck -fn %s, tree %s, qemu-img check %s' % (
                    k, 'FAILED at ' + x['failed'] if x.get('failed') else 'all steps ran', x.get('fsck'),
                    {'yes': 'intact', 'no': 'DIFFERENT'}.get(x.get('intact'), 'not read back'), x.get('check')))
print()
print('- checks after each run: ' + '; '.join(checks))
if len(runs) > 1:
    print('- %d runs per engine and loop mode, median shown; the runs of (1) MB/s, (2) MB/s, (3) IOPS: %s' % (len(runs), '; '.join(spread)))
print('- a run where a step failed gives no figures ("failed": every run of that engine and loop mode failed)')
print('- ratio qcowfs/QEMU: for MB/s and IOPS > 1 means qcowfs is faster; for seconds and sizes, lower is better')
print('- tree: %s, %.0f MB in %s entries, staged once in the work directory; ext4 made with '
      '`mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0`; caches dropped before the copy and before the read'
      % (tree, tree_b / 1e6, tree_files))
print('- fio: `--rw=randrw --rwmixread=70 --bs=4k --ioengine=libaio --direct=1 --iodepth=16`, a %s file in ext4, %s s time based' % (fio_size, runtime))
print('- loop devices: `losetup --direct-io=off` (buffered) and `--direct-io=on` (direct), checked in /sys/block/loopN/loop/dio')
print('- fstrim → final size: polled every 0.1 s until size and allocation have not changed for the settle time '
      '(and qcowfs\'s recycler is idle); QEMU only punches holes, so its file keeps its length')
print('- qcowfs: %s' % qdesc)
print('- QEMU: %s, `--blockdev driver=file,cache.direct=off,discard=unmap --blockdev driver=qcow2,discard=unmap --export type=fuse,writable=on`' % qemuver)
print('- images: qcow2, 64 KiB clusters, %s virtual, a fresh one per engine and loop mode, in %s; kernel %s' % (size, fsdesc, kernel))
print('- command: `bench/guestfs.sh%s`, total %s s, %s; load average at the start / end: %s' % (
    (' ' + args) if args else '', total, os.uname().nodename, load))
EOF
log "results: $OUT/guestfs.md"
