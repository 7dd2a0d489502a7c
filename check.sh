#!/usr/bin/env bash
# check.sh - the project's test command (what .ci/run calls).
#
# Installs what the build and the tests need (Debian/Ubuntu, as root),
# loads the loop and fuse modules, builds from scratch in a build
# directory, runs "make check", shows the logs of the tests that did not
# pass, and prints as its very last line
#
#     N passed, M failed            (or: N passed, M failed, K skipped)
#
# with N = PASS + XFAIL and M = FAIL + ERROR + XPASS from automake's test
# harness.  Exits non-zero when anything failed; with CI=true a skipped test
# is a failure too (CI must install what a test needs, never skip it).
#
# Arguments go to "make check", e.g.
#     ./check.sh TESTS='tests/shell/t090-discard.sh' TEST_TIMEOUT=300
# Environment:
#     CHECK_JOBS=N          parallel jobs for the build and the tests (default 2)
#     CHECK_BUILDDIR=DIR    build directory, removed first (default _build)
#     CHECK_CONFIGURE=ARGS  extra configure arguments (--enable-sanitizers ...)
#     CHECK_NO_INSTALL=1    never run apt-get
#     CI=true               skipped tests count as failures

set -uo pipefail

srcdir=$(cd "$(dirname "$0")" && pwd)
cd "$srcdir" || exit 1
jobs=${CHECK_JOBS:-2}
builddir=${CHECK_BUILDDIR:-_build}
case $builddir in /*) ;; *) builddir=$srcdir/$builddir ;; esac
# Cron, CI and sudo environments often lack the sbin directories, where
# modprobe, losetup, mkfs.ext4 and mount.fuse3 live.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { printf 'check.sh: %s\n' "$*"; }

# The closing line for a run that never got to the tests.
give_up() {
	say "$1"
	echo "0 passed, 1 failed"
	exit 1
}

# ---- what the build and the tests need -----------------------------------

packages=(
	build-essential autoconf automake libtool pkg-config
	libfuse3-dev fuse3 libjemalloc-dev zlib1g-dev libzstd-dev
	qemu-utils qemu-system-common    # qemu-img, qemu-io, qemu-storage-daemon
	fio e2fsprogs util-linux python3 kmod
	xfsprogs gdisk                   # t340-attach: mkfs.xfs, sgdisk
	bsdutils                         # script(1): a terminal for t350 and t360
	qemu-system-x86 linux-image-amd64 busybox-static cpio   # t370-vm: a real guest
)

install_packages() {
	local missing=() p sudo=
	if [ "${CHECK_NO_INSTALL:-}" = 1 ]; then
		return
	fi
	if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
		say "not a Debian/Ubuntu system: install the equivalent of ${packages[*]} yourself"
		return
	fi
	for p in "${packages[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' ||
			missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return
	if [ "$(id -u)" -ne 0 ]; then
		if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
			sudo="sudo -n"
		else
			say "missing packages (not root, no sudo): ${missing[*]}"
			return
		fi
	fi
	say "installing ${missing[*]}"
	local aptlog
	aptlog=$(mktemp "${TMPDIR:-/tmp}/check-apt.XXXXXX")
	if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
	       $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends "${missing[@]}"; } >"$aptlog" 2>&1; then
		tail -n 30 "$aptlog"
		say "apt-get failed; going on with what is installed"
	fi
	rm -f "$aptlog"
}

load_modules() {
	local m
	for m in loop fuse; do
		modprobe "$m" >/dev/null 2>&1 || true
	done
	[ -c /dev/fuse ] || say "warning: /dev/fuse is missing: the FUSE tests cannot run"
	[ -e /dev/loop-control ] || say "warning: /dev/loop-control is missing: the loop device tests cannot run"
}

# A shell test that exists but is not listed in SHELL_TESTS would silently
# never run.
warn_unlisted_tests() {
	local t
	for t in tests/shell/t[0-9]*.sh; do
		[ -e "$t" ] || continue
		grep -qF "$t" Makefile.am || say "warning: $t is not in SHELL_TESTS (Makefile.am): it does not run"
	done
}

# ---- build -----------------------------------------------------------------

start=$SECONDS
install_packages
load_modules
warn_unlisted_tests

# A tree configured in place refuses a separate build directory.
if [ -f config.status ]; then
	say "the source tree was configured in place; running make distclean there first"
	make distclean >/dev/null 2>&1 || rm -f config.status
fi

./autogen.sh || give_up "autogen.sh failed"
rm -rf "$builddir"
if ! mkdir -p "$builddir" || ! cd "$builddir"; then
	give_up "cannot create $builddir"
fi
# shellcheck disable=SC2086  # CHECK_CONFIGURE is a list of words
if ! "$srcdir/configure" ${CHECK_CONFIGURE:-}; then
	give_up "configure failed (see $builddir/config.log)"
fi
make -j"$jobs" || give_up "the build failed"

# ---- tests -----------------------------------------------------------------

make -j"$jobs" check "$@"
check_rc=$?

if [ ! -f test-suite.log ]; then
	give_up "make check stopped before running the tests (exit $check_rc): a test program did not build?"
fi

count() {   # count KIND: the number automake's harness wrote for KIND
	sed -n "s/^# $1: *\([0-9][0-9]*\)\$/\1/p" test-suite.log | head -n 1
}
pass=$(count PASS) xfail=$(count XFAIL) skip=$(count SKIP)
fail=$(count FAIL) xpass=$(count XPASS) error=$(count ERROR)
total=$(count TOTAL)
passed=$(( ${pass:-0} + ${xfail:-0} ))
failed=$(( ${fail:-0} + ${error:-0} + ${xpass:-0} ))
skipped=${skip:-0}

# Show what did not pass: the whole log of each failure (its end, if
# huge), the reason of each skip.
for trs in $(find tests -name '*.trs' | sort); do
	result=$(sed -n 's/^:test-result: *//p' "$trs" | head -n 1)
	log=${trs%.trs}.log
	case $result in
	FAIL|ERROR|XPASS)
		echo
		echo "======== $result: ${log%.log} ========"
		if [ "$(wc -l <"$log")" -gt 500 ]; then
			echo "[... $(wc -l <"$log") lines, showing the last 500; full log: $builddir/$log]"
		fi
		tail -n 500 "$log"
		;;
	SKIP)
		echo "SKIP: ${log%.log}: $(grep -v '^SKIP ' "$log" | tail -n 1)"
		;;
	esac
done

status=0
if [ "$failed" -gt 0 ]; then
	status=1
elif [ "$check_rc" -ne 0 ]; then
	say "make check failed (exit $check_rc) although no test failed"
	failed=1
	status=1
elif [ "${total:-0}" -eq 0 ]; then
	say "no test ran"
	failed=1
	status=1
fi
if [ "$skipped" -gt 0 ] && [ "${CI:-}" = true ]; then
	say "CI=true: the $skipped skipped test(s) count as failures"
	status=1
fi
say "finished in $(( SECONDS - start )) s; logs in $builddir/test-suite.log"

if [ "$skipped" -gt 0 ]; then
	echo "$passed passed, $failed failed, $skipped skipped"
else
	echo "$passed passed, $failed failed"
fi
exit $status
