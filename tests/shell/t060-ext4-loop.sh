#!/bin/bash
# t060-ext4-loop: a file system on a loop device over the view.  mkfs.ext4,
# mount, write files (several MB each, with checksums), umount, e2fsck -fn
# clean, mount again, checksums match; detach, unmount, qemu-img check
# clean, and the image converted by QEMU holds the same clean file system.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need_loop
need mkfs.ext4 e2fsck sha256sum mount umount

for kind in "" cluster_size=4096; do
	img=$T/fs.qcow2
	mnt=$T/view.raw
	dir=$T/dir
	rm -f "$img"
	mkimg "$img" 1G "$kind"
	qmount "$img" "$mnt"
	loop_attach "$mnt"
	dev=$LOOPDEV
	mkfs.ext4 -q -F "$dev" >>"$T/mkfs.log" 2>&1 || fail "mkfs.ext4 on $dev (over the view) failed: $(tail -n 3 "$T/mkfs.log")"
	fs_mount "$dev" "$dir"
	mkdir -p "$dir/sub/deeper"
	for i in 1 2 3 4 5 6; do
		head -c $((i * 3 << 20)) /dev/urandom >"$dir/file$i"
	done
	head -c 777777 /dev/urandom >"$dir/sub/deeper/odd"
	for i in $(seq 1 200); do echo "small file $i" >"$dir/sub/s$i"; done
	cp "$dir/file2" "$dir/sub/copy2"
	(cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/sums"
	rm "$dir/file3" # some freed blocks too
	sed -i '/\.\/file3$/d' "$T/sums"
	sync
	fs_umount "$dir"
	e2fsck -fn "$dev" >"$T/e2fsck.log" 2>&1 || fail "e2fsck -fn $dev (over the view) not clean: $(tail -n 10 "$T/e2fsck.log")"
	fs_mount "$dev" "$dir"
	(cd "$dir" && sha256sum --quiet -c "$T/sums") >"$T/sumcheck.log" 2>&1 ||
		fail "checksums differ after remount: $(head -n 5 "$T/sumcheck.log")"
	fs_umount "$dir"
	loop_detach "$dev"
	qumount "$mnt"
	qcheck "$img"
	# the image as QEMU reads it
	raw_of "$img" "$T/fs.raw"
	e2fsck -fn "$T/fs.raw" >"$T/e2fsck2.log" 2>&1 ||
		fail "e2fsck -fn of qemu-img convert's raw output not clean: $(tail -n 10 "$T/e2fsck2.log")"
	# and through a second mount of the view, read-only, the same bytes
	qmount "$img" "$mnt" -o ro
	same_file "$mnt" "$T/fs.raw" "ext4 image ($kind) remounted ro vs qemu-img convert"
	loop_attach "$mnt" -r
	dev=$LOOPDEV
	fs_mount "$dev" "$dir" -o ro,noload
	(cd "$dir" && sha256sum --quiet -c "$T/sums") >"$T/sumcheck.log" 2>&1 ||
		fail "checksums differ through a ro mount: $(head -n 5 "$T/sumcheck.log")"
	fs_umount "$dir"
	loop_detach "$dev"
	qumount "$mnt"
	rm -f "$T/fs.raw"
	log "ext4 over the view of a ${kind:-default} image: clean and intact"
done
log "ok"
