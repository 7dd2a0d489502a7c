#!/usr/bin/env bash
# quickstart.sh [IMAGE [MOUNTPOINT]] - from a fresh checkout to a mounted image.
#
# Installs the build dependencies that are missing (Debian/Ubuntu), builds
# qcowfs in _build/ unless that was done already, creates IMAGE (default
# demo.qcow2, 8 GiB, qcow2 v3) if it does not exist, mounts it with qcowfs
# so that MOUNTPOINT (default demo.raw) shows the raw disk, and prints what
# to try next.  Relative paths are taken from the current directory.
#
# Environment: QUICKSTART_BUILDDIR (default: _build next to this script).

set -euo pipefail

srcdir=$(cd "$(dirname "$0")" && pwd)
builddir=${QUICKSTART_BUILDDIR:-$srcdir/_build}
image=${1:-demo.qcow2}
mnt=${2:-demo.raw}
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { printf 'quickstart: %s\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

case ${1:-} in
-h|--help)
	sed -n '2,9s/^# \{0,1\}//p' "$0"
	exit 0
	;;
esac

# ---- build dependencies ----------------------------------------------------

packages=(build-essential autoconf automake pkg-config
	  libfuse3-dev fuse3 libjemalloc-dev zlib1g-dev libzstd-dev)
if command -v dpkg-query >/dev/null 2>&1; then
	missing=()
	for p in "${packages[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' ||
			missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		sudo=
		if [ "$(id -u)" -ne 0 ]; then
			command -v sudo >/dev/null 2>&1 ||
				die "please install as root: apt-get install ${missing[*]}"
			sudo=sudo
		fi
		say "installing ${missing[*]}"
		$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
		$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends "${missing[@]}"
	fi
fi

# ---- build -----------------------------------------------------------------

qcowfs=$builddir/src/qcowfs/qcowfs
qcowctl=$builddir/src/qcowctl/qcowctl
if [ ! -x "$qcowfs" ] || [ ! -x "$qcowctl" ]; then
	say "building in $builddir"
	if [ ! -x "$srcdir/configure" ]; then
		"$srcdir/autogen.sh"
	fi
	mkdir -p "$builddir"
	(
		cd "$builddir"
		[ -f Makefile ] || "$srcdir/configure"
		make -j"$(nproc 2>/dev/null || echo 2)"
	)
fi

# ---- image and mount ---------------------------------------------------------

if [ -d "$mnt" ]; then
	die "$mnt is a directory: the mountpoint of qcowfs is a regular file (e.g. demo.raw)"
fi
if [ -e "$image" ]; then
	say "using the existing image $image"
else
	say "creating $image (8 GiB)"
	"$qcowctl" create -s 8G "$image"
fi

abs() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
mnt_abs=$(abs "$mnt")
if [ -e "$mnt" ] && findmnt -n "$mnt_abs" >/dev/null 2>&1; then
	say "$mnt is already mounted"
else
	# qcowfs creates MOUNTPOINT if needed (and removes it again on failure).
	"$qcowfs" "$image" "$mnt" || die "qcowfs could not mount $image on $mnt (see above)"
	say "mounted $image on $mnt"
fi

cat <<EOF

$mnt now reads and writes as the raw disk inside $image.
Next steps (as root):

  # the raw view as a block device: a loop device with direct I/O and
  # discards passed through (attach reuses the mount above; it prints the
  # device, then its partitions one per line)
  dev=\$($qcowctl attach $image | head -n 1)
  mkfs.ext4 \$dev
  mkdir -p /mnt/demo
  mount \$dev /mnt/demo

  # fill, delete, trim: the image file shrinks while mounted
  cp -a /usr/share/doc /mnt/demo/ && sync
  ls -l $image; $qcowctl status $mnt
  rm -rf /mnt/demo/doc && sync && fstrim -v /mnt/demo   # sync: ext4 frees blocks at its next commit
  sleep 3; ls -l $image; $qcowctl status $mnt   # compaction needs a second or two

  # done: unmount the file system, then detach: loop device off, qcowfs
  # unmounted after a clean close, the image checked; QEMU's tool agrees
  umount /mnt/demo
  $qcowctl detach $image
  qemu-img check $image
EOF
