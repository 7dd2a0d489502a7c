# shellcheck shell=bash
# bench/lib.sh: helpers shared by bench/run.sh and bench/compact.sh.
#
# Sourced, not run.  Owns: finding the programs under test, mounting and
# unmounting an image with any engine (qcowfs, QEMU's FUSE export through
# qemu-storage-daemon, or the FUSE ceiling: bench/passthrough over a raw
# file), reading a daemon's memory, and the cleanup
# trap that undoes everything a benchmark set up (ext4 mounts, loop devices,
# FUSE mounts, daemons), in that order, even after an error or ^C.
#
# Every daemon and loop device is registered when it is created and only
# those are touched by the cleanup: nothing is killed by name.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_ROOT=$(cd "$BENCH_DIR/.." && pwd)
# the Python side of the qcowfs control ioctls (status, compact)
export PYTHONPATH="$SRC_ROOT/tests/shell${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck disable=SC2034  # used by the scripts that source this file
CLUSTER_SIZE=65536

# ---- messages ---------------------------------------------------------------

log()  { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# ---- tools ------------------------------------------------------------------

# need_tools CMD:PACKAGE ... : dies with the apt-get line for what is missing.
need_tools() {
	local missing=() pkgs=() item cmd pkg
	for item in "$@"; do
		cmd=${item%%:*}; pkg=${item#*:}
		if ! command -v "$cmd" >/dev/null 2>&1; then
			missing+=("$cmd")
			[[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
		fi
	done
	if ((${#missing[@]})); then
		die "missing ${missing[*]}; install with: apt-get install -y ${pkgs[*]}"
	fi
}

need_root_fuse() {
	[[ $(id -u) == 0 ]] || die "run as root (loop devices, FUSE allow_other, drop of caches)"
	[[ -c /dev/fuse ]] || die "/dev/fuse missing (modprobe fuse)"
}

# find_prog NAME OPTION_VALUE: prints the path of qcowfs or qcowctl.  Order:
# the --NAME option, this checkout's build dirs (_build/ from a VPATH build,
# then an in-tree build), then PATH.  The checkout comes before PATH so a
# stale installed copy does not shadow the build being measured.
find_prog() {
	local name=$1 opt=${2:-} p
	if [[ -n $opt ]]; then
		[[ -x $opt ]] || die "--$name $opt: not an executable"
		printf '%s\n' "$(cd "$(dirname "$opt")" && pwd)/$(basename "$opt")"
		return
	fi
	for p in "$SRC_ROOT/_build/src/$name/$name" "$SRC_ROOT/src/$name/$name"; do
		if [[ -x $p && -f $p ]]; then printf '%s\n' "$p"; return; fi
	done
	if p=$(command -v "$name"); then printf '%s\n' "$p"; return; fi
	return 1
}

# find_passthrough OPTION_VALUE: prints the path of the FUSE-ceiling
# program (bench/passthrough.c, built by make but not installed): the
# --passthrough option, else this checkout's build dirs.
find_passthrough() {
	local p
	for p in ${1:+"$1"} "$SRC_ROOT/_build/bench/passthrough" "$SRC_ROOT/bench/passthrough"; do
		if [[ -x $p && -f $p ]]; then
			printf '%s\n' "$(cd "$(dirname "$p")" && pwd)/$(basename "$p")"
			return
		fi
		[[ -z ${1:-} ]] || die "--passthrough $1: not an executable"
	done
	return 1
}

# parse_size 2G|512M|4096 -> bytes
parse_size() {
	local s=$1 n unit
	[[ $s =~ ^([0-9]+)([KkMmGgTt]?)(i?[Bb])?$ ]] || die "bad size: $s"
	n=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[2]^^}
	case $unit in
	K) n=$((n << 10)) ;; M) n=$((n << 20)) ;; G) n=$((n << 30)) ;; T) n=$((n << 40)) ;;
	esac
	echo "$n"
}

now() { date +%s.%N; }
elapsed() { python3 -c 'import sys; print("%.3f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$2"; }

# ---- cleanup ----------------------------------------------------------------

CLEAN_DIRS=()     # ext4 mount points (umount)
CLEAN_LOOPS=()    # loop devices (losetup -d)
CLEAN_VIEWS=()    # FUSE mount points (fusermount3 -u)
CLEAN_PIDS=()     # daemons we started (SIGTERM, then SIGKILL)
CLEAN_FILES=()    # work directories to remove

# forget ARRAY VALUE: drops VALUE from a cleanup list once it is undone, so
# that a loop device or pid reused by somebody else is never touched.
forget() {
	local -n arr=$1
	local i
	for i in "${!arr[@]}"; do [[ ${arr[$i]} == "$2" ]] && unset 'arr[$i]'; done
	return 0
}

pid_alive() { [[ -n ${1:-} && -d /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# wait_pid_exit PID SECONDS: 0 when the process is gone.
wait_pid_exit() {
	local pid=$1 t=$(( $2 * 10 ))
	while pid_alive "$pid"; do
		((t-- > 0)) || return 1
		sleep 0.1
	done
}

is_mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/self/mounts; }

cleanup() {
	local rc=$? x
	set +e
	trap - EXIT INT TERM
	for x in "${CLEAN_DIRS[@]}"; do is_mounted "$x" && umount "$x" 2>/dev/null; done
	for x in "${CLEAN_LOOPS[@]}"; do losetup -d "$x" 2>/dev/null; done
	for x in "${CLEAN_VIEWS[@]}"; do is_mounted "$x" && fusermount3 -u "$x" 2>/dev/null; done
	for x in "${CLEAN_PIDS[@]}"; do pid_alive "$x" && kill -TERM "$x" 2>/dev/null; done
	for x in "${CLEAN_PIDS[@]}"; do
		wait_pid_exit "$x" 20 || { log "daemon $x did not exit, killing"; kill -KILL "$x" 2>/dev/null; }
	done
	for x in "${CLEAN_VIEWS[@]}"; do is_mounted "$x" && fusermount3 -uz "$x" 2>/dev/null; done
	for x in "${CLEAN_FILES[@]}"; do [[ -n $x && -d $x ]] && rm -rf -- "$x"; done
	exit "$rc"
}
install_cleanup() { trap cleanup EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; }

# setup_dirs NAME: the results directory OUT (default
# /tmp/qcowfs-NAME-DATE) and the work directory WORKDIR (default a new
# /var/tmp/qcowfs-NAME.XXXXXX, removed at exit), both made and absolute.
setup_dirs() {
	local name=$1
	OUT=${OUT:-/tmp/qcowfs-$name-$(date +%Y%m%d-%H%M%S)}
	mkdir -p "$OUT"
	OUT=$(cd "$OUT" && pwd)
	if [[ -z $WORKDIR ]]; then
		WORKDIR=$(mktemp -d "/var/tmp/qcowfs-$name.XXXXXX")
		CLEAN_FILES+=("$WORKDIR")
	else
		mkdir -p "$WORKDIR"; WORKDIR=$(cd "$WORKDIR" && pwd)
	fi
}

# ---- engines ----------------------------------------------------------------
#
# engine_mount ENGINE IMAGE VIEW [QCOWFS_OPTS]: mounts IMAGE at VIEW (absolute
# paths) and waits until VIEW is usable.  Sets MOUNT_PID and MOUNT_SECS
# (seconds from the start of the command until a read of VIEW succeeds).
# ENGINE is "qcowfs", "qemu" or "ceiling" (IMAGE is then a raw file, served
# by $PASSTHROUGH with the arguments in PASSTHROUGH_ARGS, e.g. -t 4).
# With BENCH_STANDIN=1 the qcowfs engine is
# played by qemu-storage-daemon too: only for testing these scripts before
# qcowfs exists; results are then labelled as such.

QCOWFS=${QCOWFS:-}
QCOWCTL=${QCOWCTL:-}
PASSTHROUGH=${PASSTHROUGH:-}
PASSTHROUGH_ARGS=()
BENCH_STANDIN=${BENCH_STANDIN:-0}
MOUNT_PID=''
# shellcheck disable=SC2034  # results of engine_mount, read by the callers
MOUNT_SECS=''

qsd_start() {
	local img=$1 view=$2 pidf
	pidf=$(mktemp -u "${view}.qsd-pid.XXXXXX")
	# discard=unmap on both nodes: without it QEMU silently ignores every
	# discard (research/qemu.md 4.2).  cache.direct=off: host page cache,
	# as qcowfs uses.  --daemonize returns once the export is set up.
	qemu-storage-daemon --daemonize --pidfile "$pidf" \
		--blockdev "node-name=file0,driver=file,filename=$img,cache.direct=off,discard=unmap" \
		--blockdev node-name=fmt0,driver=qcow2,file=file0,discard=unmap \
		--export "type=fuse,id=exp0,node-name=fmt0,mountpoint=$view,writable=on" \
		>/dev/null || die "qemu-storage-daemon failed for $img"
	MOUNT_PID=$(cat "$pidf")
	rm -f "$pidf"
	CLEAN_PIDS+=("$MOUNT_PID")
}

# find_daemon_pid PROGRAM VIEW: pid of the detached daemon serving VIEW:
# the pid in its status (QCOWFS_IOC_STATUS), else the process whose exact argument list has
# PROGRAM as argv[0] and VIEW as an argument (never a pattern match).
find_daemon_pid() {
	python3 - "$1" "$2" <<'EOF'
import os, sys
prog, view = os.path.basename(sys.argv[1]), sys.argv[2]
try:    # qcowfs tells its pid in its status
    import qcowfs_ctl
    print(int(qcowfs_ctl.status(view)['pid']))
    sys.exit(0)
except (ImportError, OSError, ValueError, KeyError):
    pass
for p in os.listdir('/proc'):
    if not p.isdigit() or int(p) == os.getpid():
        continue
    try:
        args = open('/proc/%s/cmdline' % p, 'rb').read().split(b'\0')
    except OSError:
        continue
    args = [a.decode(errors='replace') for a in args if a]
    if args and os.path.basename(args[0]) == prog and view in args[1:]:
        print(p)
        break
EOF
}

wait_view_usable() {
	local view=$1 t=600
	until is_mounted "$view" && head -c 4096 "$view" >/dev/null 2>&1; do
		((t-- > 0)) || die "$view did not become usable within 60 s"
		sleep 0.1
	done
}

engine_mount() {
	local engine=$1 img=$2 view=$3 opts=${4:-} t0 t1
	MOUNT_PID=
	[[ -e $view ]] || : >"$view"
	CLEAN_VIEWS+=("$view")
	t0=$(now)
	if [[ $engine == ceiling ]]; then
		"$PASSTHROUGH" "${PASSTHROUGH_ARGS[@]}" "$img" "$view" ||
			die "$PASSTHROUGH ${PASSTHROUGH_ARGS[*]} $img $view failed"
	elif [[ $engine == qemu || $BENCH_STANDIN == 1 ]]; then
		qsd_start "$img" "$view"
	else
		if [[ -n $opts ]]; then
			"$QCOWFS" "$img" "$view" -o "$opts" || die "qcowfs $img $view -o $opts failed"
		else
			"$QCOWFS" "$img" "$view" || die "qcowfs $img $view failed"
		fi
	fi
	wait_view_usable "$view"
	t1=$(now)
	# shellcheck disable=SC2034  # read by the callers
	MOUNT_SECS=$(elapsed "$t0" "$t1")
	if [[ $engine == ceiling ]]; then
		MOUNT_PID=$(find_daemon_pid "$PASSTHROUGH" "$view")
		[[ -n $MOUNT_PID ]] || log "warning: cannot find the passthrough process serving $view"
		[[ -z $MOUNT_PID ]] || CLEAN_PIDS+=("$MOUNT_PID")
	elif [[ -z $MOUNT_PID ]]; then
		MOUNT_PID=$(find_daemon_pid "$QCOWFS" "$view")
		[[ -n $MOUNT_PID ]] || log "warning: cannot find the qcowfs process serving $view"
		[[ -z $MOUNT_PID ]] || CLEAN_PIDS+=("$MOUNT_PID")
	fi
}

# engine_unmount ENGINE VIEW PID: clean unmount; returns when the daemon has
# exited (the image is closed).
engine_unmount() {
	local engine=$1 view=$2 pid=$3
	if [[ $engine == ceiling ]]; then
		# the passthrough exits once its mount is gone
		fusermount3 -u "$view" || log "warning: fusermount3 -u $view failed"
	elif [[ $engine == qemu || $BENCH_STANDIN == 1 ]]; then
		# qemu-storage-daemon stays up after a FUSE unmount; SIGTERM
		# makes it unmount, flush and close.
		kill -TERM "$pid" 2>/dev/null || true
	elif [[ -n $QCOWCTL ]]; then
		"$QCOWCTL" unmount "$view" >/dev/null || log "warning: qcowctl unmount $view failed"
	else
		fusermount3 -u "$view" || log "warning: fusermount3 -u $view failed"
	fi
	if [[ -n $pid ]] && ! wait_pid_exit "$pid" 120; then
		log "warning: daemon $pid still running 120 s after unmount; killing"
		kill -KILL "$pid" 2>/dev/null || true
		wait_pid_exit "$pid" 10 || true
	fi
	[[ -z $pid ]] || forget CLEAN_PIDS "$pid"
	if is_mounted "$view"; then fusermount3 -u "$view" 2>/dev/null || true; fi
}

# proc_kb PID FIELD: VmHWM / VmRSS in KiB (empty if unknown)
proc_kb() {
	[[ -n ${1:-} ]] || return 0
	awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

# qcowfs_status VIEW: the key=value lines of the daemon's status
qcowfs_status() {
	python3 -c 'import sys, qcowfs_ctl; sys.stdout.write(qcowfs_ctl.status_text(sys.argv[1]))' "$1"
}
