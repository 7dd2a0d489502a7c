# shellcheck shell=bash disable=SC2034
# vm_guest.sh - boot a small Linux guest under QEMU over a disk file (the
# qcowfs view), for the VM test (t370-vm.sh) and the VM benchmark.
#
# Source it; it only defines functions (no side effects, no strict mode of
# its own: the caller's set -e applies).  Everything comes from Debian
# packages: linux-image-amd64 (kernel and modules), busybox-static (the
# whole guest userland), qemu-system-x86.
#
#   vm_kernel                  path of the newest /boot/vmlinuz-*
#   vm_kver                    its version (the /lib/modules directory)
#   vm_build_initramfs OUT JOBSCRIPT
#                              a gzip'd cpio: busybox, the modules for
#                              virtio-pci, virtio-blk and ext4 (with
#                              crc32c, which ext4 asks the crypto API for)
#                              and their dependencies in load order (from
#                              modules.dep), and an /init that mounts
#                              proc/sys/dev, insmods them, runs JOBSCRIPT
#                              (as /job.sh, with /dev/vda the disk) and
#                              powers off.  /init prints "RESULT boot=ok"
#                              before the job and "RESULT job_exit=N" after.
#   vm_accel                   kvm when /dev/kvm really boots a kernel
#                              (tried once, 20 s timeout: a nested /dev/kvm
#                              can exist and still hang), else tcg.  Cached
#                              in VM_ACCEL.
#   vm_aio DISK                io_uring when QEMU's block layer can use it
#                              on DISK with O_DIRECT, else threads.
#   vm_run DISK LOG [QEMU ARGS...]
#                              starts QEMU in the background (VM_PID), the
#                              guest console (ttyS0) going to LOG; the disk
#                              is a virtio-blk with discard=unmap and
#                              cache=none, aio from VM_AIO or vm_aio (the
#                              choice is left in VM_AIO_USED).  Needs VM_INITRD (the cpio from
#                              vm_build_initramfs).
#   vm_wait SECONDS            waits for QEMU to exit (status in VM_RC, 124
#                              if it was still running: then it is killed)
#   vm_result LOG KEY          the value of the last "RESULT KEY=value"
#                              line of LOG
#
# The guest reports on its console with lines "RESULT key=value" (and any
# other markers its job prints) that the host greps.  Guest memory: 512 MiB
# (VM_MEM to change).

# vm_kernel: the newest installed kernel image.
vm_kernel() {
	local k
	k=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
	[ -n "$k" ] || { echo "vm_kernel: no /boot/vmlinuz-* (install linux-image-amd64)" >&2; return 1; }
	echo "$k"
}

vm_kver() {
	local k
	k=$(vm_kernel) || return 1
	echo "${k#/boot/vmlinuz-}"
}

# _vm_mod_order KVER NAME...: module paths (relative to /lib/modules/KVER)
# in an order where each comes after everything it depends on.
_vm_mod_order() {
	local kver=$1
	shift
	awk -v want="$*" '
	BEGIN { n = split(want, w, " ") }
	{
		key = $1; sub(":$", "", key)
		deps[key] = ""
		for (i = 2; i <= NF; i++) deps[key] = deps[key] " " $i
		b = key; sub(".*/", "", b); sub("\\.ko.*$", "", b)
		gsub("-", "_", b)
		path[b] = key
	}
	function visit(p,    d, k, i) {
		if (p in done) return
		done[p] = 1
		k = split(deps[p], d, " ")
		for (i = 1; i <= k; i++) visit(d[i])
		print p
	}
	END {
		for (i = 1; i <= n; i++) {
			m = w[i]; gsub("-", "_", m)
			if (m in path) visit(path[m])
			else if (w[i] !~ /\?$/) { print "missing module " w[i] > "/dev/stderr"; bad = 1 }
		}
		exit bad
	}' "/lib/modules/$kver/modules.dep"
}

# vm_build_initramfs OUT JOBSCRIPT
vm_build_initramfs() {
	local out=$1 job=$2 kver root bb m mods
	kver=$(vm_kver) || return 1
	bb=$(command -v busybox) || { echo "vm_build_initramfs: no busybox (install busybox-static)" >&2; return 1; }
	# A dynamically linked busybox would need its libraries in the guest.
	if ldd "$bb" >/dev/null 2>&1; then
		echo "vm_build_initramfs: $bb is dynamically linked (install busybox-static)" >&2
		return 1
	fi
	[ -r "$job" ] || { echo "vm_build_initramfs: no job script $job" >&2; return 1; }
	root=$(mktemp -d "${TMPDIR:-/tmp}/vm-initramfs.XXXXXX") || return 1
	mkdir -p "$root"/{bin,sbin,proc,sys,dev,mnt,tmp,lib/modules} || return 1
	cp "$bb" "$root/bin/busybox" || return 1
	# crc32c_generic is what ext4's metadata checksums ask the crypto API
	# for; nothing in modules.dep names it, and the guest has no modprobe.
	mods=$(_vm_mod_order "$kver" virtio_pci virtio_blk crc32c_generic ext4) || { rm -rf "$root"; return 1; }
	: >"$root/modules.order"
	for m in $mods; do
		case $m in
		*.ko.xz) xz -dc "/lib/modules/$kver/$m" >"$root/lib/modules/$(basename "$m" .xz)" ;;
		*.ko.zst) zstd -qdc "/lib/modules/$kver/$m" >"$root/lib/modules/$(basename "$m" .zst)" ;;
		*.ko.gz) gzip -dc "/lib/modules/$kver/$m" >"$root/lib/modules/$(basename "$m" .gz)" ;;
		*) cp "/lib/modules/$kver/$m" "$root/lib/modules/" ;;
		esac || { rm -rf "$root"; return 1; }
		m=$(basename "$m")
		echo "${m%.ko*}.ko" >>"$root/modules.order"
	done
	cp "$job" "$root/job.sh" || return 1
	cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
	insmod /lib/modules/$m || echo "RESULT insmod_failed=$m"
done
# the disk appears asynchronously after virtio_blk probes
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "RESULT boot=ok"
sh /job.sh
echo "RESULT job_exit=$?"
sync
poweroff -f
EOF
	chmod +x "$root/init" "$root/job.sh"
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
	local rc=$?
	rm -rf "$root"
	return $rc
}

# vm_accel: kvm or tcg (cached in VM_ACCEL for this shell).
vm_accel() {
	if [ -n "${VM_ACCEL:-}" ]; then
		echo "$VM_ACCEL"
		return 0
	fi
	local k log
	VM_ACCEL=tcg
	if [ -r /dev/kvm ] && [ -w /dev/kvm ] && k=$(vm_kernel 2>/dev/null); then
		log=$(mktemp "${TMPDIR:-/tmp}/vm-kvmprobe.XXXXXX")
		# No initramfs, no disk: the kernel boots and panics for want of
		# a root file system, which (panic=-1, -no-reboot) ends QEMU.
		# Seeing the panic proves a whole boot ran under KVM.
		{ timeout -k 2 20 qemu-system-x86_64 -accel kvm -cpu host -m 256 \
			-nodefaults -display none -no-reboot -serial "file:$log" \
			-kernel "$k" -append "console=ttyS0 panic=-1 loglevel=4" \
			</dev/null >/dev/null 2>&1; } 2>/dev/null
		grep -qE 'Kernel panic|VFS: Unable to mount root' "$log" 2>/dev/null && VM_ACCEL=kvm
		rm -f "$log"
	fi
	echo "$VM_ACCEL"
}

# vm_aio DISK: io_uring if it works on DISK with O_DIRECT, else threads.
vm_aio() {
	if timeout 10 qemu-io -f raw -n -i io_uring -c 'read 0 4096' "$1" >/dev/null 2>&1; then
		echo io_uring
	else
		echo threads
	fi
}

# vm_run DISK LOG [extra qemu args...]: sets VM_PID.
vm_run() {
	local disk=$1 log=$2 accel cpu aio
	shift 2
	if [ -z "${VM_INITRD:-}" ] || [ ! -r "$VM_INITRD" ]; then
		echo "vm_run: VM_INITRD is not set to an initramfs (vm_build_initramfs)" >&2
		return 1
	fi
	accel=$(vm_accel)
	VM_ACCEL=$accel
	cpu=max
	[ "$accel" = kvm ] && cpu=host
	aio=${VM_AIO:-$(vm_aio "$disk")}
	VM_AIO_USED=$aio
	: >"$log" || return 1
	qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m "${VM_MEM:-512}" -smp 1 \
		-nographic -no-reboot -nodefaults -serial stdio -monitor none \
		-kernel "$(vm_kernel)" -initrd "$VM_INITRD" \
		-append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init" \
		-drive "file=$disk,format=raw,if=virtio,discard=unmap,cache=none,aio=$aio" \
		"$@" </dev/null >"$log" 2>&1 &
	VM_PID=$!
}

# vm_wait SECONDS: waits for VM_PID to exit; VM_RC is its status, or 124
# when it did not exit in time (it is then killed with -9).
vm_wait() {
	local n=$(($1 * 10))
	while ((n-- > 0)); do
		if ! kill -0 "$VM_PID" 2>/dev/null ||
			[ "$(awk '{print $3}' "/proc/$VM_PID/stat" 2>/dev/null)" = Z ]; then
			VM_RC=0
			wait "$VM_PID" 2>/dev/null || VM_RC=$?
			return 0
		fi
		sleep 0.1
	done
	kill -9 "$VM_PID" 2>/dev/null
	wait "$VM_PID" 2>/dev/null
	VM_RC=124
	return 1
}

# vm_result LOG KEY: value of the last "RESULT KEY=..." line (CRs removed).
vm_result() {
	tr -d '\r' <"$1" | sed -n "s/^.*RESULT $2=//p" | tail -n 1
}
