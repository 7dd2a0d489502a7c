# shellcheck shell=bash
# lib.sh - common helpers of the qcowfs shell tests (tests/shell/t*.sh).
#
# Every test starts with:   . "$(dirname "$0")/lib.sh"
#
# Sourcing it gives the test:
#  - strict mode (set -eEu -o pipefail); an ERR trap names the failing line;
#  - $T, a private temporary directory (mktemp -d under $TMPDIR or /tmp), so
#    two tests, or two copies of one test, can run side by side;
#  - one EXIT trap that tears down, even on failure and in this order, what
#    the test registered: file system mounts, loop devices, qcowfs mounts
#    (and their daemons), background processes; then prints the logs of $T
#    when the test failed and removes $T (KEEP_TMP=1 keeps it);
#  - helpers for mounting and unmounting the view (they wait), requiring
#    tools (skip with 77, but fail when CI=true: CI must never skip),
#    qemu-img check, file comparison, polling.
#
# Exit codes follow automake: 0 pass, 1 fail, 77 skip.
#
# Environment: QCOWFS and QCOWCTL (absolute paths of the programs under
# test; default: the in-tree build), top_srcdir, top_builddir, CI, TMPDIR,
# KEEP_TMP, VERBOSE (set -x).

set -eEu -o pipefail

TESTDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
TEST_NAME=$(basename "$0" .sh)
: "${top_srcdir:=$TESTDIR/../..}"
: "${top_builddir:=$top_srcdir}"
QCOWFS=${QCOWFS:-$top_builddir/src/qcowfs/qcowfs}
QCOWCTL=${QCOWCTL:-$top_builddir/src/qcowctl/qcowctl}
MKBAD="$TESTDIR/mkbad.py"
# Glob matching the daemon's /proc/PID/comm (tests of the tests may point
# QCOWFS at a stand-in and change it).
DAEMON_COMM=${DAEMON_COMM:-*qcowfs*}
export LC_ALL=C
# A wrapper such as a pyenv shim costs ~0.1 s a call; the system python
# does the same job.
if [ -x /usr/bin/python3 ]; then
	PYTHON=/usr/bin/python3
else
	PYTHON=python3
fi

# ---- messages and outcomes ------------------------------------------------

log() { printf '[%s %s] %s\n' "$(date +%T)" "$TEST_NAME" "$*" >&2; }

fail() {
	printf 'FAIL: %s: %s\n' "$TEST_NAME" "$*" >&2
	_FAILED=1
	exit 1
}

skip() {
	if [ "${CI:-}" = true ]; then
		fail "would skip ($*), but CI=true: nothing may be skipped in CI"
	fi
	printf 'SKIP: %s: %s\n' "$TEST_NAME" "$*" >&2
	exit 77
}

_on_err() {
	printf 'FAIL: %s: line %s: command failed (exit %s): %s\n' \
		"$TEST_NAME" "$1" "$2" "$3" >&2
	_FAILED=1
}
trap '_on_err "$LINENO" "$?" "$BASH_COMMAND"' ERR

[ -n "${VERBOSE:-}" ] && set -x

# ---- private temp dir and teardown ----------------------------------------

T=$(mktemp -d "${TMPDIR:-/tmp}/qcowfs-$TEST_NAME.XXXXXX")
T=$(cd "$T" && pwd -P)
_FAILED=0
_FSMOUNTS=()      # directories where we mounted a file system (ext4 ...)
_LOOPS=()         # loop devices we attached
_MOUNTS=()        # qcowfs mountpoints
declare -A _DAEMON=()   # qcowfs mountpoint -> daemon pid
declare -A _IMAGE=()    # qcowfs mountpoint -> image path
_PIDS=()          # background processes we started

# Removes one word from the array named $1.
_forget() {
	local -n _arr=$1
	local out=() x
	for x in "${_arr[@]}"; do [ "$x" = "$2" ] || out+=("$x"); done
	_arr=("${out[@]}")
}

_cleanup() {
	local rc=$? i m p
	set +eE
	trap - ERR
	[ $_FAILED = 1 ] && [ $rc = 0 ] && rc=1
	for ((i = ${#_FSMOUNTS[@]} - 1; i >= 0; i--)); do
		m=${_FSMOUNTS[i]}
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
	done
	for ((i = ${#_LOOPS[@]} - 1; i >= 0; i--)); do
		losetup -d "${_LOOPS[i]}" 2>/dev/null
		_wait_loop_free "${_LOOPS[i]}"
	done
	for ((i = ${#_MOUNTS[@]} - 1; i >= 0; i--)); do
		m=${_MOUNTS[i]}
		p=${_DAEMON[$m]:-}
		if is_mounted "$m"; then
			fusermount3 -u "$m" 2>/dev/null
			[ -n "$p" ] && wait_gone "$p" 20
			is_mounted "$m" && fusermount3 -u -z "$m" 2>/dev/null
		fi
		if [ -n "$p" ] && ! is_gone "$p"; then
			wait_gone "$p" 10 || kill -9 "$p" 2>/dev/null
		fi
	done
	for p in "${_PIDS[@]}"; do
		kill -9 "$p" 2>/dev/null
	done
	for p in "${_PIDS[@]}"; do
		wait "$p" 2>/dev/null
	done
	if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
		_dump_logs
	fi
	if [ -n "${KEEP_TMP:-}" ]; then
		echo "kept $T" >&2
	else
		# A mount we could not remove keeps its file: do not hang on it.
		rm -rf "$T" 2>/dev/null
	fi
	exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

_dump_logs() {
	local f
	for f in "$T"/*.log "$T"/*.err; do
		[ -s "$f" ] || continue
		echo "----- $(basename "$f") (last 40 lines) -----" >&2
		tail -n 40 "$f" >&2
	done
}

# ---- requirements ---------------------------------------------------------

# need TOOL...: each must be on PATH (skip, or fail under CI=true).
need() {
	local t
	for t; do
		command -v "$t" >/dev/null 2>&1 || skip "missing tool: $t"
	done
}

need_root() { [ "$(id -u)" = 0 ] || skip "needs root"; }

# need_qcowfs: the programs under test must exist (never a skip: a missing
# build is a failure), and FUSE must work here.
need_qcowfs() {
	[ -x "$QCOWFS" ] || fail "QCOWFS=$QCOWFS is not an executable"
	[ -x "$QCOWCTL" ] || fail "QCOWCTL=$QCOWCTL is not an executable"
	[ -c /dev/fuse ] || skip "no /dev/fuse"
	need fusermount3 qemu-img qemu-io python3 timeout
}

need_loop() {
	need_root
	need losetup
	if [ ! -e /dev/loop-control ]; then
		modprobe loop 2>/dev/null || true
	fi
	[ -e /dev/loop-control ] || skip "no loop device support (/dev/loop-control)"
}

# ---- processes ------------------------------------------------------------

# is_gone PID: true when the process no longer exists or is a zombie (our
# PID 1 may not reap the daemons it inherits).
is_gone() {
	local st
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
	[ -z "$st" ] || [ "$st" = Z ] || [ "$st" = X ]
}

# wait_gone PID SECONDS
wait_gone() {
	local pid=$1 n=$(($2 * 10))
	while ((n-- > 0)); do
		is_gone "$pid" && return 0
		sleep 0.1
	done
	is_gone "$pid"
}

# bg_start CMD...: start CMD in the background, registered for cleanup;
# its pid is in $BG_PID.
bg_start() {
	"$@" &
	BG_PID=$!
	_PIDS+=("$BG_PID")
}

# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds.
wait_until() {
	local n=$(($1 * 5))
	shift
	while ((n-- > 0)); do
		"$@" && return 0
		sleep 0.2
	done
	"$@"
}

# pids_holding FILE: pids of the processes that have FILE open.
pids_holding() {
	local f
	f=$(readlink -f "$1")
	find /proc/[0-9]*/fd -maxdepth 1 -lname "$f" 2>/dev/null |
		awk -F/ -v self=$$ '$3 != self { print $3 }' | sort -un
}

# daemon_pid IMAGE MOUNTPOINT: the qcowfs daemon serving this mount: the pid
# in the status of the view (qcowfs_ctl.py), else the process named like
# qcowfs whose command line names MOUNTPOINT, else one that holds IMAGE
# open and serves no other mount of ours.
daemon_pid() {
	local p comm known
	p=$(PYTHONPATH=$TESTDIR $PYTHON -c 'import sys, qcowfs_ctl; print(int(qcowfs_ctl.status(sys.argv[1])["pid"]))' "$2" 2>/dev/null) &&
		[ -n "$p" ] && [ -d "/proc/$p" ] && { echo "$p"; return 0; }
	for p in $(grep -lzxF -- "$2" /proc/[0-9]*/cmdline 2>/dev/null); do
		p=${p#/proc/}
		p=${p%/cmdline}
		comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
		# shellcheck disable=SC2254
		case $comm in $DAEMON_COMM) echo "$p"; return 0 ;; esac
	done
	known=" ${_DAEMON[*]} "
	for p in $(pids_holding "$1"); do
		[[ $known == *" $p "* ]] && continue
		comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
		# shellcheck disable=SC2254
		case $comm in $DAEMON_COMM) echo "$p"; return 0 ;; esac
	done
	return 1
}

# ---- mounts ---------------------------------------------------------------

# is_mounted PATH: PATH is a mount point (from /proc/self/mountinfo; never
# stats PATH, so a dead or hung FUSE daemon cannot block us).
is_mounted() {
	awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# fuse_type PATH: file system type of the mount at PATH (fuse.qcowfs ...).
fuse_type() {
	awk -v m="$1" '$5 == m { for (i = 6; i <= NF; i++) if ($i == "-") { print $(i + 1); exit } }' \
		/proc/self/mountinfo
}

# qmount IMAGE MOUNTPOINT [ARGS...]: mounts with $QCOWFS (ARGS such as
# -o ro), fails the test unless qcowfs exits 0 with the mount live and the
# daemon found.  Sets QM_PID to the daemon pid.  stderr goes to
# $T/qcowfs.log.
qmount() {
	local img=$1 mnt=$2 rc=0
	shift 2
	_MOUNTS+=("$mnt")
	_IMAGE[$mnt]=$img
	echo "== $QCOWFS $img $mnt $*" >>"$T/qcowfs.log"
	timeout 60 "$QCOWFS" "$img" "$mnt" "$@" >>"$T/qcowfs.log" 2>&1 || rc=$?
	[ $rc = 0 ] || fail "qcowfs $img $mnt $* exited $rc: $(tail -n 5 "$T/qcowfs.log")"
	is_mounted "$mnt" || fail "qcowfs $img $mnt $* exited 0 but $mnt is not a mount point"
	QM_PID=$(daemon_pid "$img" "$mnt") || fail "qcowfs mounted $mnt but no daemon process holds $img"
	_DAEMON[$mnt]=$QM_PID
}

# qmount_fails IMAGE MOUNTPOINT [ARGS...]: qcowfs must exit non-zero
# within 10 s and leave nothing mounted; its stderr is in $QM_ERR (a file).
qmount_fails() {
	local img=$1 mnt=$2 rc=0
	shift 2
	QM_ERR=$T/qm-fail.err
	_MOUNTS+=("$mnt")
	timeout 10 "$QCOWFS" "$img" "$mnt" "$@" >"$QM_ERR" 2>&1 || rc=$?
	cat "$QM_ERR" >>"$T/qcowfs.log"
	[ $rc = 124 ] && fail "qcowfs $img $mnt $* did not exit within 10 s"
	[ $rc != 0 ] || fail "qcowfs $img $mnt $* exited 0 but should have failed"
	if is_mounted "$mnt"; then
		fail "qcowfs $img $mnt $* exited $rc but left $mnt mounted"
	fi
	[ -s "$QM_ERR" ] || fail "qcowfs $img $mnt $* exited $rc without a message on stderr"
	_forget _MOUNTS "$mnt"
	return 0
}

# qumount MOUNTPOINT [fusermount|qcowctl|sigterm]: unmounts and waits until
# the daemon has exited (it has then closed the image).
qumount() {
	local mnt=$1 how=${2:-fusermount} pid n rc=0
	pid=${_DAEMON[$mnt]:-}
	case $how in
	fusermount)
		# (retried: a loop device or reader may let go a moment late)
		rc=1
		for n in 1 2 3 4 5 6 7 8 9 10; do
			if fusermount3 -u "$mnt" 2>"$T/fusermount.err"; then
				rc=0
				break
			fi
			sleep 0.5
		done
		[ $rc = 0 ] || fail "fusermount3 -u $mnt failed 10 times: $(cat "$T/fusermount.err")"
		;;
	qcowctl)
		timeout 120 "$QCOWCTL" unmount "$mnt" >>"$T/qcowfs.log" 2>&1 || rc=$?
		[ $rc = 0 ] || fail "qcowctl unmount $mnt exited $rc: $(tail -n 5 "$T/qcowfs.log")"
		;;
	sigterm)
		[ -n "$pid" ] || fail "no daemon pid for $mnt"
		kill -TERM "$pid"
		;;
	*) fail "qumount: unknown method $how" ;;
	esac
	if [ -n "$pid" ]; then
		wait_gone "$pid" 120 || fail "qcowfs daemon $pid still running 120 s after unmount ($how) of $mnt"
	fi
	wait_until 10 eval '! is_mounted "$mnt"' || fail "$mnt still mounted after unmount ($how)"
	_forget _MOUNTS "$mnt"
	return 0
}

# qkill MOUNTPOINT: kill -9 the daemon (a crash), then lazily detach the
# dead mount.
qkill() {
	local mnt=$1 pid
	pid=${_DAEMON[$mnt]:-}
	[ -n "$pid" ] || fail "no daemon pid for $mnt"
	kill -9 "$pid" 2>/dev/null || true
	wait_gone "$pid" 30 || fail "daemon $pid survived kill -9"
	fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
	wait_until 10 eval '! is_mounted "$mnt"' || fail "$mnt still mounted after kill -9 and lazy unmount"
	_forget _MOUNTS "$mnt"
	return 0
}

# loop_attach FILE [losetup args...]: attaches a new loop device, sets
# LOOPDEV to it and registers it for cleanup (call it directly, not in
# $(...), or the registration is lost).  Retries: parallel tests race for
# the first free device.
loop_attach() {
	local f=$1 dev n
	shift
	for n in 1 2 3 4 5 6 7 8 9 10; do
		if dev=$(losetup -f --show "$@" "$f" 2>>"$T/losetup.log"); then
			_LOOPS+=("$dev")
			LOOPDEV=$dev
			return 0
		fi
		sleep 0.3
	done
	fail "losetup -f --show $* $f failed: $(tail -n 3 "$T/losetup.log")"
}

_wait_loop_free() {
	local b
	b=/sys/block/$(basename "$1")/loop/backing_file
	wait_until 20 test ! -e "$b" 2>/dev/null
}

# loop_detach DEV: detaches and waits until the kernel let go of the file.
loop_detach() {
	losetup -d "$1" || fail "losetup -d $1 failed"
	_wait_loop_free "$1" || fail "loop device $1 still attached 20 s after losetup -d"
	_forget _LOOPS "$1"
	return 0
}

# fs_mount DEV DIR [mount args...] / fs_umount DIR
fs_mount() {
	local dev=$1 dir=$2
	shift 2
	mkdir -p "$dir"
	mount "$@" "$dev" "$dir" || fail "mount $* $dev $dir failed"
	_FSMOUNTS+=("$dir")
}
fs_umount() {
	umount "$1" || fail "umount $1 failed"
	_forget _FSMOUNTS "$1"
	return 0
}

# ---- images and checks ----------------------------------------------------

# mkimg IMAGE SIZE [OPTS]: qemu-img create -f qcow2 [-o OPTS] IMAGE SIZE.
mkimg() {
	local img=$1 size=$2 opts=${3:-}
	if [ -n "$opts" ]; then
		qemu-img create -q -f qcow2 -o "$opts" "$img" "$size" >>"$T/qemu.log" 2>&1 ||
			fail "qemu-img create -o $opts $img $size failed: $(tail -n 3 "$T/qemu.log")"
	else
		qemu-img create -q -f qcow2 "$img" "$size" >>"$T/qemu.log" 2>&1 ||
			fail "qemu-img create $img $size failed: $(tail -n 3 "$T/qemu.log")"
	fi
}

# qio IMAGE CMD...: runs each CMD with qemu-io (one -c each); fails the
# test if qemu-io fails or reports a failed command.
qio() {
	local img=$1 c args=() out rc=0
	shift
	for c; do args+=(-c "$c"); done
	out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || rc=$?
	echo "$out" >>"$T/qemu.log"
	if [ $rc != 0 ] || grep -qiE 'failed|error|Pattern verification' <<<"$out"; then
		fail "qemu-io $img $*: exit $rc: $(grep -iE 'failed|error|pattern' <<<"$out" | head -n 3)"
	fi
}

# qcheck IMAGE: qemu-img check must exit 0 saying "No errors were found",
# with no leaked clusters.
qcheck() {
	local out rc=0
	out=$(qemu-img check "$1" 2>&1) || rc=$?
	echo "== qemu-img check $1 (exit $rc)" >>"$T/qemu.log"
	echo "$out" >>"$T/qemu.log"
	if [ $rc != 0 ] || ! grep -q '^No errors were found' <<<"$out" ||
		grep -qi 'leaked' <<<"$out"; then
		fail "qemu-img check $1 not clean (exit $rc): $(head -n 8 <<<"$out")"
	fi
	return 0
}

# qcheck_nocorrupt IMAGE: qemu-img check exit 0 or 3 (leaks allowed).
qcheck_nocorrupt() {
	local out rc=0
	out=$(qemu-img check "$1" 2>&1) || rc=$?
	echo "== qemu-img check $1 (exit $rc)" >>"$T/qemu.log"
	echo "$out" >>"$T/qemu.log"
	case $rc in
	0 | 3) return 0 ;;
	*) fail "qemu-img check $1 found corruption or could not run (exit $rc): $(head -n 8 <<<"$out")" ;;
	esac
}

# qinfo_field IMAGE KEY: a field of qemu-img info --output=json (-U), e.g.
# virtual-size, cluster-size, format-specific.data.compat.
qinfo_field() {
	qemu-img info -U --output=json "$1" | $PYTHON -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[k]
print(str(v).lower() if isinstance(v, bool) else v)' "$2"
}

# raw_of IMAGE OUT: qemu-img convert -O raw (-U: may run while mounted).
raw_of() {
	qemu-img convert -U -f qcow2 -O raw "$1" "$2" >>"$T/qemu.log" 2>&1 ||
		fail "qemu-img convert -O raw $1 failed: $(tail -n 3 "$T/qemu.log")"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# same_file A B WHAT: A and B have the same bytes (and size).  Reads go
# through dd with big blocks: cmp sizes its reads by st_blksize, which
# a FUSE file may report as 512.
same_file() {
	local out sa sb
	sa=$(stat -c %s "$1")
	sb=$(stat -c %s "$2")
	[ "$sa" = "$sb" ] || fail "$3: sizes differ: $1 is $sa bytes, $2 is $sb bytes"
	out=$(cmp <(dd if="$1" bs=4M status=none) <(dd if="$2" bs=4M status=none) 2>&1) ||
		fail "$3: $1 and $2 differ: $out"
	return 0
}

# qcompare IMAGE SHADOW WHAT: qemu-img compare finds the same bytes, and
# the virtual size equals the shadow's size.  (Not -s: strict mode also
# compares allocation, and a zeroed range may be a hole on one side only.)
qcompare() {
	local out rc=0 vs
	vs=$(qinfo_field "$1" virtual-size)
	[ "$vs" = "$(stat -c %s "$2")" ] ||
		fail "$3: virtual size of $1 is $vs, shadow $2 has $(stat -c %s "$2") bytes"
	out=$(qemu-img compare -U -f qcow2 -F raw "$1" "$2" 2>&1) || rc=$?
	echo "$out" >>"$T/qemu.log"
	[ $rc = 0 ] || fail "$3: qemu-img compare $1 $2 (exit $rc): $out"
}

# status_field MOUNTPOINT KEY: one key=value of the view's status (the
# QCOWFS_IOC_STATUS ioctl, through qcowfs_ctl.py).
status_field() {
	PYTHONPATH=$TESTDIR $PYTHON - "$1" "$2" <<'EOF'
import sys, qcowfs_ctl
text = qcowfs_ctl.status_text(sys.argv[1])
for line in text.splitlines():
    k, _, v = line.partition("=")
    if k.strip() == sys.argv[2]:
        print(v.strip())
        sys.exit(0)
sys.exit("no key %s in the status:\n%s" % (sys.argv[2], text))
EOF
}

# write_crash_tools: puts two python programs into $T for crash tests.
#   $T/workload.py VIEW JOURNAL SEED GEN LO HI: random sector-aligned writes
#     into sectors [LO, HI) of VIEW, fsync now and then, until an I/O error;
#     journal lines "W sector count gen" before each write, "S" after each
#     completed fsync.  Every 512-byte sector written carries (sector
#     number, generation) 32 times, so a reader knows exactly which write
#     each sector came from.  Generations start after GEN.
#   $T/verify.py RAW BASELINE|- JOURNAL...: checks RAW (the disk after the
#     crash) sector by sector: a sector whose last write was fsynced shows
#     exactly that write; one with later writes shows the durable version
#     or one of the later ones; untouched sectors equal BASELINE (a raw
#     file, or - for zeros).  Exit 1 with details on any other content.
write_crash_tools() {
cat >"$T/workload.py" <<'EOF'
import os, random, struct, sys
view, journal, seed, gen, lo, hi = sys.argv[1:7]
seed, gen, lo, hi = int(seed), int(gen), int(lo), int(hi)
r = random.Random(seed)
fd = os.open(view, os.O_RDWR)
j = open(journal, "w", buffering=1)
todo = r.randint(3, 40)
try:
    while True:
        gen += 1
        n = r.choice((1, 1, 3, 8, 8, 64, 128, 300, 512))
        s = r.randrange(lo, hi - n)
        if r.random() < 0.5:
            s -= s % 128              # 64 KiB aligned now and then
        data = b"".join(struct.pack(">QQ", x, gen) * 32 for x in range(s, s + n))
        j.write("W %d %d %d\n" % (s, n, gen))
        if os.pwrite(fd, data, s * 512) != len(data):
            j.write("short\n")
            break
        todo -= 1
        if todo == 0:
            os.fsync(fd)
            j.write("S\n")
            todo = r.randint(3, 40)
except OSError as e:
    j.write("stopped %s\n" % e)
EOF

cat >"$T/verify.py" <<'EOF'
import struct, sys
# verify.py RAW BASELINE|- JOURNAL...
raw, baseline, journals = sys.argv[1], sys.argv[2], sys.argv[3:]
committed = {}   # sector -> gen durable by the last fsync (0: the baseline)
allowed = {}     # sector -> set of gens it may show
nw = ns = 0
for jn in journals:
    pending = []                  # (sector, n, gen) since the last S
    for line in open(jn):
        w = line.split()
        if not w:
            continue
        if w[0] == "W":
            pending.append((int(w[1]), int(w[2]), int(w[3])))
            nw += 1
        elif w[0] == "S":
            ns += 1
            for s, n, g in pending:
                for x in range(s, s + n):
                    committed[x] = g
                    allowed[x] = {g}
            pending = []
    for s, n, g in pending:       # not known durable: may or may not be there
        for x in range(s, s + n):
            allowed.setdefault(x, {committed.get(x, 0)}).add(g)
zero = bytes(512)
bad = 0
rf = open(raw, "rb")
bf = open(baseline, "rb") if baseline != "-" else None
sector = 0
CH = 1 << 20
while True:
    a = rf.read(CH)
    if not a:
        break
    b = bf.read(len(a)) if bf else bytes(len(a))
    for i in range(0, len(a), 512):
        x = sector + i // 512
        got = a[i:i + 512]
        if x not in allowed:
            if got != b[i:i + 512]:
                bad += 1
                if bad <= 10:
                    print("sector %d: never written this round, but changed" % x)
            continue
        if got == b[i:i + 512]:
            g = 0
        else:
            s2, g = struct.unpack(">QQ", got[:16])
            if s2 != x or got != got[:16] * 32:
                g = -1
        if g not in allowed[x]:
            bad += 1
            if bad <= 10:
                what = "the baseline" if g == 0 else "garbage" if g < 0 else "generation %d" % g
                print("sector %d: shows %s, allowed %s (durable: %s)"
                      % (x, what, sorted(allowed[x]), committed.get(x, "baseline")))
    sector += len(a) // 512
print("%d writes, %d fsyncs, %d sectors durable, %d sectors checked, %d bad"
      % (nw, ns, len(committed), len(allowed), bad))
sys.exit(1 if bad else 0)
EOF
}

file_size() { stat -c %s "$1"; }
file_blocks() { stat -c %b "$1"; }
