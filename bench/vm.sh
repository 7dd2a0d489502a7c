#!/bin/bash
# bench/vm.sh: a virtual machine on the view (issue 10, "Benchmark").  The
# same Linux guest and the same workload on two disks, side by side in one
# run:
#   view:   qcowfs IMG VIEW, then -drive file=VIEW,format=raw,if=virtio,
#           discard=unmap,cache=none
#   native: QEMU's own qcow2 driver, -drive file=IMG,format=qcow2,if=virtio,
#           discard=unmap,cache=none
# Both start from a byte-identical qcow2 image holding an empty ext4 (made on
# the host).  Inside the guest (busybox initramfs from tests/shell/vm_guest.sh,
# plus the host's fio and the libraries it links, copied in with ldd):
#   fill   fio 1 MiB sequential write of FILL bytes into a file, O_DIRECT,
#          QD4, end_fsync: its MB/s and the time the host sees between the
#          guest's start and end markers on the serial console
#   seqread, randread (4 KiB QD32), randwrite (4 KiB QD32): fio time based on
#          that file, O_DIRECT
#   delete the file, sync, fstrim; then the guest keeps running HOLD seconds
#          while the host polls the image file (ls -l size and du), so the
#          size "some seconds after fstrim, VM still running" is measured.
# After poweroff: qemu-img check of the image.  Prints the table with the
# ratios view/native and writes it to $OUT/vm.md.  See bench/README.md.
# Not part of make check: it measures, it does not pass or fail.
set -euo pipefail

usage() {
	cat <<EOF
usage: ${0##*/} [options]
  --quick             2 GiB images, 256 MiB fill, 4 s per fio workload, one run
                      (default 4 GiB, 1 GiB, 15 s, two runs)
  --size SIZE         virtual size of the images
  --fill SIZE         bytes written by the fill (and the file the reads use)
  --runtime SECONDS   fio runtime per workload inside the guest
  --repeat N          every disk setup N times, the median shown
  --hold SECONDS      the guest keeps running this long after fstrim (default 10)
  --vm-timeout SECS   a guest still running after this long is killed (900)
  --accel kvm|tcg     force the accelerator (default: vm_guest.sh picks kvm
                      when /dev/kvm works, else tcg)
  --qcowfs PATH       qcowfs binary (default: build dir of this checkout, then PATH)
  --qcowctl PATH      qcowctl binary (same search)
  --qcowfs-opts OPTS  extra -o options for every qcowfs mount
  --out DIR           results directory (default /tmp/qcowfs-vm-DATE)
  --workdir DIR       where images are created (default: a new dir in /var/tmp:
                      cache=none needs O_DIRECT, which tmpfs refuses)
EOF
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"

ARGS="$*"
SIZE=4G FILL=1G RUNTIME=15 REPEAT=2 HOLD=10 ACCEL='' VM_TIMEOUT=900
QUICK=0 SIZE_SET=0 FILL_SET=0 RUNTIME_SET=0 REPEAT_SET=0
OUT='' WORKDIR='' QCOWFS_OPT='' QCOWCTL_OPT='' QCOWFS_OPTS=''
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--size) SIZE=$2; SIZE_SET=1; shift ;;
	--fill) FILL=$2; FILL_SET=1; shift ;;
	--runtime) RUNTIME=$2; RUNTIME_SET=1; shift ;;
	--repeat) REPEAT=$2; REPEAT_SET=1; shift ;;
	--hold) HOLD=$2; shift ;;
	--vm-timeout) VM_TIMEOUT=$2; shift ;;
	--accel) ACCEL=$2; shift ;;
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
	((FILL_SET)) || FILL=256M
	((RUNTIME_SET)) || RUNTIME=4
	((REPEAT_SET)) || REPEAT=1
fi
[[ $REPEAT =~ ^[0-9]+$ && $REPEAT -gt 0 ]] || die "bad --repeat: $REPEAT"
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "bad --runtime: $RUNTIME"
[[ $HOLD =~ ^[0-9]+$ && $HOLD -gt 0 ]] || die "bad --hold: $HOLD"
[[ $VM_TIMEOUT =~ ^[0-9]+$ && $VM_TIMEOUT -gt 0 ]] || die "bad --vm-timeout: $VM_TIMEOUT"
[[ -z $ACCEL || $ACCEL == kvm || $ACCEL == tcg ]] || die "bad --accel: $ACCEL (kvm or tcg)"
SIZE_B=$(parse_size "$SIZE")
FILL_B=$(parse_size "$FILL")
((FILL_B >= 1048576 && FILL_B * 10 <= SIZE_B * 8)) ||
	die "--fill $FILL must be at least 1 MiB and at most 80 % of --size $SIZE (ext4 needs room)"

need_root_fuse
need_tools qemu-img:qemu-utils qemu-system-x86_64:qemu-system-x86 fio:fio \
	busybox:busybox-static fusermount3:fuse3 python3:python3 mkfs.ext4:e2fsprogs \
	cpio:cpio ldd:libc-bin
QCOWFS=$(find_prog qcowfs "$QCOWFS_OPT") ||
	die "qcowfs not found: build it (./autogen.sh && ./configure && make) or pass --qcowfs PATH"
QCOWCTL=$(find_prog qcowctl "$QCOWCTL_OPT") ||
	die "qcowctl not found: build it or pass --qcowctl PATH"
log "qcowfs: $QCOWFS, qcowctl: $QCOWCTL"

# The guest: kernel, initramfs, accelerator and the qemu command line come
# from the test suite's helpers, so the benchmark boots what the test boots.
VM_GUEST=$SRC_ROOT/tests/shell/vm_guest.sh
[[ -f $VM_GUEST ]] || die "$VM_GUEST missing (the guest helpers of the VM test)"
# shellcheck source-path=SCRIPTDIR/.. source=tests/shell/vm_guest.sh
source "$VM_GUEST"

setup_dirs vm
install_cleanup
# vmb_kill_guests: kills a QEMU a run left behind (an error in the middle of
# a run; ^C reaches QEMU itself).  Only the pids vm_watch wrote, and only if
# that process is still qemu-system-x86_64.
vmb_kill_guests() {
	local f pid
	for f in "$WORKDIR"/*.qemu-pid; do
		[[ -f $f ]] || continue
		pid=$(cat "$f")
		if pid_alive "$pid" && [[ $(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n 1) == *qemu-system-x86_64 ]]; then
			kill -KILL "$pid" 2>/dev/null || true
			wait_pid_exit "$pid" 10 || true
		fi
		rm -f "$f"
	done
}
# first the guests (they hold the views open), then lib.sh's cleanup with
# the script's exit status (set +e first: the (exit rc) that hands it
# on would otherwise end the trap under set -e)
trap 'rc=$?; vmb_kill_guests; set +e; (exit $rc); cleanup' EXIT

RES=$OUT/vm.tsv      # SETUP-RUN key value
: >"$RES"
record() { printf '%s\t%s\t%s\n' "$@" >>"$RES"; }

# ---- the guest's job --------------------------------------------------------
#
# write_job FILE: the guest's benchmark job (busybox sh).  Every step prints
# a "VMB <word>" marker line on the console; the host timestamps the lines as
# they arrive, so the fill time and the fstrim moment are host clock times.
# fio's JSON goes to a file in the initramfs and is printed between markers
# afterwards, so kernel messages cannot cut into it.
write_job() {
	cat >"$1" <<EOF
#!/bin/sh
# bench/vm.sh guest job: fill, read, random I/O, delete, fstrim, hold.
export LD_LIBRARY_PATH=/vmb/lib
FIO=/vmb/fio
mkdir -p /mnt /tmp
if ! mount -t ext4 /dev/vda /mnt; then echo "VMB failed mount"; exit 1; fi
runfio() {   # runfio NAME fio-args...: one workload, its JSON between markers
	name=\$1; shift
	echo "VMB start \$name"
	if \$FIO --name="\$name" --filename=/mnt/data --ioengine=libaio --direct=1 \\
		--output-format=json --output=/tmp/\$name.json "\$@" >/tmp/\$name.err 2>&1; then
		echo "VMB done \$name"
	else
		echo "VMB failed \$name"; cat /tmp/\$name.err
	fi
	echo "VMB json-begin \$name"; cat /tmp/\$name.json; echo; echo "VMB json-end \$name"
}
runfio fill --rw=write --bs=1M --iodepth=4 --size=$FILL_B --end_fsync=1
runfio seqread --rw=read --bs=1M --iodepth=4 --size=$FILL_B --time_based --runtime=$RUNTIME
runfio randread --rw=randread --bs=4k --iodepth=32 --size=$FILL_B --time_based --runtime=$RUNTIME --randrepeat=1
runfio randwrite --rw=randwrite --bs=4k --iodepth=32 --size=$FILL_B --time_based --runtime=$RUNTIME --randrepeat=1
rm -f /mnt/data
sync
echo "VMB start fstrim"
if fstrim -v /mnt; then echo "VMB done fstrim"; else echo "VMB failed fstrim"; fi
# the VM keeps running while the host watches the image file
sleep $((HOLD + 2))
umount /mnt
echo "VMB done job"
EOF
	chmod +x "$1"
}

# fio_payload DIR: the host's fio and every library it links (ldd), laid out
# as /vmb/fio and /vmb/lib/ plus the dynamic loader at its absolute path.
# Debian's fio is dynamic and links ~80 MB of libraries (ceph, gluster...);
# the guest gets them in its initramfs, uncompressed.
fio_payload() {
	local dir=$1 lib loader
	mkdir -p "$dir/vmb/lib"
	cp -L "$(command -v fio)" "$dir/vmb/fio"
	while read -r lib; do
		cp -L "$lib" "$dir/vmb/lib/"
	done < <(ldd "$(command -v fio)" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
	loader=$(ldd "$(command -v fio)" | awk '$1 ~ /^\/.*ld-linux/ { print $1 }')
	[[ -n $loader ]] || die "cannot find fio's dynamic loader in ldd $(command -v fio)"
	mkdir -p "$dir$(dirname "$loader")"
	cp -L "$loader" "$dir$loader"
}

# vmb_guest_setup JOB PAYLOAD DIR: the initramfs (vm_build_initramfs with
# JOB, then PAYLOAD appended as a second cpio archive: the kernel unpacks
# concatenated archives in order), the accelerator, and the QEMU command line
# without its -drive in VMB_QEMU.  vm_run of vm_guest.sh always attaches a raw
# disk, and the native setup needs format=qcow2, so the command is built here
# from the same parts (kernel, initramfs, accelerator, console) as vm_run's.
vmb_guest_setup() {
	local job=$1 payload=$2 dir=$3 cpu=max
	mkdir -p "$dir"
	VM_INITRD=$dir/initrd
	vm_build_initramfs "$VM_INITRD" "$job" || die "vm_build_initramfs failed"
	(cd "$payload" && find . | cpio -o -H newc --quiet | gzip -1) >>"$VM_INITRD" ||
		die "cannot append the fio payload to the initramfs"
	VMB_KERNEL=$(vm_kernel) || die "no kernel: apt-get install -y linux-image-amd64"
	# shellcheck disable=SC2034  # read by vm_accel of vm_guest.sh
	if [[ -n $ACCEL ]]; then VM_ACCEL=$ACCEL; fi
	VMB_ACCEL=$(vm_accel)
	[[ $VMB_ACCEL == kvm ]] && cpu=host
	# 1 GiB: the initramfs holds fio's ~80 MB of libraries in RAM
	VMB_QEMU=(qemu-system-x86_64 -accel "$VMB_ACCEL" -cpu "$cpu" -m "${VM_MEM:-1024}" -smp 1
		-nographic -no-reboot -nodefaults -serial stdio -monitor none
		-kernel "$VMB_KERNEL" -initrd "$VM_INITRD"
		-append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init")
}

# ---- the runs ---------------------------------------------------------------

# vm_watch IMAGE HOLD CONSOLE_LOG OUTDIR KEY TIMEOUT -- QEMU ARGS...: starts QEMU, timestamps
# every console line, and from the guest's "VMB done fstrim" polls the image
# file every 0.2 s for HOLD seconds while the VM runs.  Prints key value
# lines: fill_s (host time between the fill markers), fstrim_s, size and
# allocation at fstrim end and HOLD s later, the seconds after fstrim of the
# last size change, whether QEMU was still running at the last poll, the
# exit status, the fio JSON documents (name json-file).
vm_watch() {
	python3 - "$@" <<'EOF'
import os, subprocess, sys, time, json, threading
img, hold, logf, outdir, key = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
limit = float(sys.argv[6])
assert sys.argv[7] == '--'
cmd = sys.argv[8:]
t_start = time.time()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
# for the script's cleanup: a QEMU left running by an error is killed on exit
open(os.path.join(os.path.dirname(img), key + '.qemu-pid'), 'w').write('%d\n' % p.pid)
# a hung guest (a nested KVM that never boots, a wedged disk) must not hang
# the benchmark: after the limit QEMU is killed and the run counts as failed
killer = threading.Timer(limit, p.kill)
killer.daemon = True
killer.start()
log = open(logf, 'w')
marks, res, json_name, json_lines = {}, {}, None, []
poll = {}

def watch(t0):
    # the image file while the VM still runs, from the end of fstrim
    st = os.stat(img)
    size0, first = st.st_size, st
    last_change, size, alloc = 0.0, st.st_size, st.st_blocks * 512
    while time.time() - t0 < hold:
        time.sleep(0.2)
        st = os.stat(img)
        if st.st_size != size:
            size, last_change = st.st_size, time.time() - t0
        alloc = st.st_blocks * 512
    poll.update(at_fstrim=first.st_size, at_fstrim_alloc=first.st_blocks * 512,
                held=size, held_alloc=alloc, size_settled_s='%.2f' % last_change,
                running=int(p.poll() is None))

watcher = None
for raw in p.stdout:
    now = time.time()
    line = raw.decode(errors='replace').rstrip('\r\n')
    log.write('%.3f %s\n' % (now - t_start, line))
    log.flush()
    if json_name is not None:
        if line.startswith('VMB json-end'):
            open(os.path.join(outdir, '%s.%s.json' % (key, json_name)), 'w').write('\n'.join(json_lines))
            json_name = None
        else:
            json_lines.append(line)
        continue
    i = line.find('VMB ')
    if i < 0:
        continue
    w = line[i:].split()
    if len(w) < 2:
        continue
    if w[1] == 'json-begin' and len(w) > 2:
        json_name, json_lines = w[2], []
    elif len(w) > 2:
        marks['%s %s' % (w[1], w[2])] = now
        if w[1] == 'failed':
            res.setdefault('failed', []).append(w[2])
        if w[1:3] == ['done', 'fstrim']:
            watcher = threading.Thread(target=watch, args=(now,))
            watcher.start()
rc = p.wait()
killer.cancel()
if rc == -9:
    res.setdefault('failed', []).append('timeout')
if 'done job' not in marks:
    res.setdefault('failed', []).append('job-not-finished')
if watcher:
    watcher.join()
def span(a, b):
    return '%.3f' % (marks[b] - marks[a]) if a in marks and b in marks else ''
print('fill_s', span('start fill', 'done fill'))
print('fstrim_s', span('start fstrim', 'done fstrim'))
print('boot_s', '%.3f' % (marks['start fill'] - t_start) if 'start fill' in marks else '')
for k, v in poll.items():
    print(k, v)
print('job_done', int('done job' in marks))
print('qemu_rc', rc)
if res.get('failed'):
    print('failed', ','.join(res['failed']))
EOF
}

BASE=$WORKDIR/base.qcow2
make_base() {
	# One qcow2 image with an empty ext4, made through qcowfs's view (the
	# same bytes for both setups: each run starts from a copy).
	local view=$WORKDIR/base.raw pid
	qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER_SIZE" "$BASE" "$SIZE_B"
	engine_mount qcowfs "$BASE" "$view" "$QCOWFS_OPTS"
	pid=$MOUNT_PID
	mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$view"
	engine_unmount qcowfs "$view" "$pid"
	rm -f "$view"
	qemu-img check -q "$BASE" || die "the base image does not check clean"
	# One aio mode for both setups, so that they differ only by the disk
	# path: io_uring when QEMU can use it with O_DIRECT on both the view
	# and the image file, else threads.
	if [[ -z ${VM_AIO:-} ]]; then
		engine_mount qcowfs "$BASE" "$view" "$QCOWFS_OPTS"
		pid=$MOUNT_PID
		VM_AIO=$(vm_aio "$view")
		engine_unmount qcowfs "$view" "$pid"
		rm -f "$view"
		[[ $(vm_aio "$BASE") == io_uring ]] || VM_AIO=threads
	fi
	log "aio=$VM_AIO for both setups"
}

# run_setup SETUP RUN: a fresh copy of the base image, the guest on it.
run_setup() {
	local s=$1 key=$1-$2 img view pid='' drive aio k v check=clean
	img=$WORKDIR/$key.qcow2 view=$WORKDIR/$key.raw
	log "$s, run $2/$REPEAT: boot the guest ($VMB_ACCEL)"
	cp --sparse=always "$BASE" "$img"
	record "$key" before "$(stat -c %s "$img")"
	if [[ $s == view ]]; then
		engine_mount qcowfs "$img" "$view" "$QCOWFS_OPTS"
		pid=$MOUNT_PID
		aio=$VM_AIO
		drive="file=$view,format=raw,if=virtio,discard=unmap,cache=none,aio=$aio"
	else
		aio=$VM_AIO
		drive="file=$img,format=qcow2,if=virtio,discard=unmap,cache=none,aio=$aio"
	fi
	record "$key" aio "$aio"
	# In the background and waited for: bash runs a SIGTERM trap at once
	# during `wait`, but only after a foreground command (or a read from
	# it) ends, which would leave the guest running.
	vm_watch "$img" "$HOLD" "$OUT/$key.console" "$OUT" "$key" "$VM_TIMEOUT" -- \
		"${VMB_QEMU[@]}" -drive "$drive" >"$OUT/$key.vm" &
	wait "$!" || die "$key: the guest's watcher failed (see $OUT/$key.console)"
	while read -r k v; do
		record "$key" "$k" "$v"
	done <"$OUT/$key.vm"
	rm -f "$WORKDIR/$key.qemu-pid"
	record "$key" after_exit "$(stat -c %s "$img")"
	if [[ $s == view ]]; then
		engine_unmount qcowfs "$view" "$pid"
		rm -f "$view"
	fi
	qemu-img check "$img" >"$OUT/$key.check" 2>&1 || check="not clean"
	record "$key" check "$check"
	record "$key" final "$(stat -c %s "$img")"
	[[ $check == clean ]] || log "warning: $key: qemu-img check $check (see $OUT/$key.check)"
	rm -f "$img"
}

T_START=$(now)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
JOB=$WORKDIR/job.sh
write_job "$JOB"
fio_payload "$WORKDIR/payload"
vmb_guest_setup "$JOB" "$WORKDIR/payload" "$WORKDIR/guest"
log "guest: kernel $VMB_KERNEL, accelerator $VMB_ACCEL"
make_base
n=0
for ((run = 1; run <= REPEAT; run++)); do
	# who goes first alternates
	if ((n++ % 2)); then order=(native view); else order=(view native); fi
	for s in "${order[@]}"; do run_setup "$s" "$run"; done
done
T_END=$(now)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

QCOWFS_DESC=$QCOWFS
if rev=$(git -C "$(dirname "$QCOWFS")" describe --always --dirty 2>/dev/null); then
	QCOWFS_DESC="$QCOWFS (commit $rev)"
fi
python3 - "$RES" "$OUT" "$SIZE" "$FILL" "$RUNTIME" "$HOLD" "$REPEAT" "$VMB_ACCEL" \
	"$VMB_KERNEL" "$QCOWFS_DESC" "$(qemu-system-x86_64 --version | head -1)" \
	"$WORKDIR ($(stat -f -c %T "$WORKDIR"))" "$ARGS" "$(elapsed "$T_START" "$T_END")" \
	"$LOAD_START / $LOAD_END, $(nproc) CPUs" <<'EOF' | tee "$OUT/vm.md"
import json, os, statistics, sys
(res, out, size, fill, runtime, hold, repeat, accel, kernel, qdesc, qemuver, wdesc,
 args, total, load) = sys.argv[1:16]
runs = range(1, int(repeat) + 1)
r = {}
for line in open(res):
    k, key, v = (line.rstrip('\n').split('\t') + [''])[:3]
    r.setdefault(k, {})[key] = v
MiB = 1048576.0

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def fio(key, name, d, what):
    try:
        text = open(os.path.join(out, '%s.%s.json' % (key, name))).read()
        j = json.loads(text[text.index('{'):])['jobs'][0][d]
        return j['iops'] if what == 'iops' else j['bw_bytes'] / 1e6
    except (OSError, ValueError, KeyError, IndexError):
        return None

def field(k, scale=1.0):
    return lambda key: num(r[key].get(k)) / scale if num(r[key].get(k)) is not None else None

def ok(key):
    x = r.get(key, {})
    return bool(x) and not x.get('failed')

def settled(key):
    # 'never' when the file kept its length through the hold
    x = r[key]
    if num(x.get('held')) is not None and num(x.get('held')) == num(x.get('at_fstrim')):
        return 'never'
    return num(x.get('size_settled_s'))

rows = [
    ('1 MiB sequential write = the fill, QD4, O_DIRECT (MB/s)', lambda k: fio(k, 'fill', 'write', 'bw'), 0, True),
    ('time to fill %s + fsync, host clock (s)' % fill, field('fill_s'), 2, False),
    ('1 MiB sequential read, QD4 (MB/s)', lambda k: fio(k, 'seqread', 'read', 'bw'), 0, True),
    ('4 KiB random read, QD32 (IOPS)', lambda k: fio(k, 'randread', 'read', 'iops'), 0, True),
    ('4 KiB random write, QD32 (IOPS)', lambda k: fio(k, 'randwrite', 'write', 'iops'), 0, True),
    ('fstrim in the guest (s)', field('fstrim_s'), 2, False),
    ('image file before the guest ran, ls -l (MiB)', field('before', MiB), 1, False),
    ('image file at the end of fstrim, ls -l (MiB)', field('at_fstrim', MiB), 1, False),
    ('image file %s s after fstrim, VM running, ls -l (MiB)' % hold, field('held', MiB), 1, False),
    ('image allocated %s s after fstrim, du (MiB)' % hold, field('held_alloc', MiB), 1, False),
    ('fstrim end → last change of ls -l size (s)', settled, 2, False),
    ('image file after poweroff and close, ls -l (MiB)', field('final', MiB), 1, False),
    ('guest boot to first workload (s)', field('boot_s'), 2, False),
]

def keys(s):
    return ['%s-%d' % (s, i) for i in runs if ok('%s-%d' % (s, i))]

def med(fn, s):
    vals = [fn(k) for k in keys(s)]
    if vals and all(v == 'never' for v in vals):
        return 'never'
    vals = [v for v in vals if v is not None and v != 'never']
    return statistics.median(vals) if vals else None

def fmt(v, nd):
    return 'n/a' if v is None else 'never shrinks' if v == 'never' else '%.*f' % (nd, v)

print('## A guest on the qcowfs view vs QEMU\'s qcow2 driver (%s)\n' % accel)
print('| in the guest | view: qcowfs + `format=raw` | native: `format=qcow2` | ratio view/native |')
print('|---|---:|---:|---:|')
def status(s):
    xs = [(i, r.get('%s-%d' % (s, i), {})) for i in runs]
    bad = ['run %d: failed %s' % (i, x['failed']) for i, x in xs if x.get('failed')]
    bad += ['run %d: qemu-img check %s' % (i, x.get('check')) for i, x in xs if x.get('check') != 'clean']
    bad += ['run %d: VM exited before the hold ended' % i for i, x in xs
            if x.get('running') not in (None, '1')]
    return '; '.join(bad) if bad else 'all steps ran, check clean'
print('| steps, `qemu-img check` after | %s | %s | |' % (status('view'), status('native')))
spread = []
for label, fn, nd, hib in rows:
    vals = []
    line = '| %s |' % label
    for s in ('view', 'native'):
        v = med(fn, s)
        vals.append(v)
        line += ' %s |' % fmt(v, nd)
        if len(runs) > 1:
            spread.append('%s/%s: %s' % (label.split(' (')[0], s, ' '.join(
                fmt(x, nd) for x in (fn(k) for k in keys(s)))))
    a, b = vals
    num_ab = isinstance(a, float) and isinstance(b, float)
    line += ' %s |' % ('%.2f' % (a / b) if num_ab and b else '-')
    print(line)
print()
if len(runs) > 1:
    print('- %d runs per setup, median shown; the runs: %s' % (len(runs), '; '.join(spread)))
print('- ratio view/native: for MB/s and IOPS > 1 means the view is faster; for seconds and sizes lower is better')
print('- view: `qcowfs IMG VIEW`, `-drive file=VIEW,format=raw,if=virtio,discard=unmap,cache=none`; '
      'native: `-drive file=IMG,format=qcow2,if=virtio,discard=unmap,cache=none`')
print('- guest: %s, accelerator %s, busybox initramfs with the host\'s fio; ext4 (made on the host, '
      '`mkfs.ext4 -E nodiscard`) on /dev/vda; fio `--ioengine=libaio --direct=1` on a %s file, '
      '%s s per time-based workload; the fill is `--rw=write --bs=1M --iodepth=4 --end_fsync=1`' % (kernel, accel, fill, runtime))
print('- after the fill and the three workloads the guest deletes the file, syncs, runs `fstrim`, and keeps running '
      '%s s while the host polls the image file every 0.2 s' % hold)
aios = sorted({x.get('aio') for x in r.values() if x.get('aio')})
print('- %s; `aio=%s` on both drives (io_uring when QEMU can use it with O_DIRECT on the view and on the image file, else threads)'
      % (qemuver, '/'.join(aios) or '?'))
print('- qcowfs: %s' % qdesc)
print('- images: qcow2, 64 KiB clusters, %s virtual, a fresh copy of one base image per run, in %s' % (size, wdesc))
print('- command: `bench/vm.sh%s`, total %s s, %s; load average at the start / end: %s' % (
    (' ' + args) if args else '', total, os.uname().nodename, load))
EOF
log "results: $OUT/vm.md"
