#!/bin/bash
# t040-bad-images: qcowfs refuses damaged images quickly and clearly, and
# never changes them; it opens (and repairs) images that are only dirty,
# takes corrupt images read-only only, clears unknown autoclear bits and
# keeps unknown header extensions byte-exact.
#
# Each damage is made by mkbad.py from an image made by qemu-img and
# filled by qemu-io.  For every bad image, read-write and read-only:
# qcowfs exits non-zero within 10 s, says what is wrong (a keyword naming
# the field), mounts nothing, leaves no daemon, and the image's sha256 is
# unchanged.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need sha256sum stdbuf

B3=$T/base3.qcow2
B2=$T/base2.qcow2
mkimg "$B3" 256M
qio "$B3" 'write -P 0x5a 0 1M' 'write -P 0x6b 100M 64k' 'write -P 0x7c 200M 3000'
mkimg "$B2" 256M compat=0.10
qio "$B2" 'write -P 0x5a 0 1M' 'write -P 0x6b 100M 64k'
raw_of "$B3" "$T/base3.raw"
raw_of "$B2" "$T/base2.raw"

# bad KIND BASE REGEX: the damaged image must be refused, rw and ro.
n=0
bad() {
	local kind=$1 base=$2 re=$3 img sum mode
	n=$((n + 1))
	img=$T/bad$n-$kind.qcow2
	cp "$base" "$img"
	$PYTHON "$MKBAD" "$kind" "$img" || fail "mkbad.py $kind failed"
	sum=$(sha "$img")
	for mode in rw ro; do
		if [ $mode = ro ]; then
			qmount_fails "$img" "$T/bad$n.raw" -o ro
		else
			qmount_fails "$img" "$T/bad$n.raw"
		fi
		grep -qiE "$re" "$QM_ERR" ||
			fail "$kind ($mode): message does not match /$re/: $(cat "$QM_ERR")"
		[ "$(sha "$img")" = "$sum" ] || fail "$kind ($mode): qcowfs changed the refused image"
		[ -z "$(pids_holding "$img")" ] || fail "$kind ($mode): a process still holds the refused image"
	done
	log "refused $kind ($(basename "$base")): $(head -n 1 "$QM_ERR")"
}

bad empty "$B3" 'empty|short|small|truncat|header|magic'
bad truncated-header "$B3" 'short|small|truncat|header'
bad magic "$B3" 'magic|not a qcow2'
bad version4 "$B3" 'version'
bad cluster-bits-8 "$B3" 'cluster'
bad cluster-bits-22 "$B3" 'cluster'
bad huge-l1-size "$B3" 'l1'
bad l1-size-too-small "$B3" 'l1'
bad header-length-small "$B3" 'header.?length'
bad header-length-big "$B3" 'header.?length'
bad refcount-order-7 "$B3" 'refcount'
bad l1-past-eof "$B3" 'l1'
bad l1-in-header "$B3" 'l1'
bad l1-unaligned "$B3" 'l1'
bad reftable-past-eof "$B3" 'refcount.?table|reftable'
bad reftable-in-header "$B3" 'refcount.?table|reftable'
bad reftable-unaligned "$B3" 'refcount.?table|reftable'
bad reftable-zero-clusters "$B3" 'refcount.?table|reftable'
bad l2-past-eof "$B3" 'l2'
bad l2-in-header "$B3" 'l2|overlap'
bad unknown-incompat "$B3" 'incompat|feature'
bad backing-self "$B3" 'backing chain loops'
bad backing-missing "$B3" 'no-such-base'
bad backing-protocol "$B3" 'not a local file'
bad backing-format-long "$B3" 'backing format'
bad backing-format-vmdk "$B3" 'vmdk'
# the same damage on a compat 0.10 (version 2) image
bad magic "$B2" 'magic|not a qcow2'
bad version4 "$B2" 'version'
bad cluster-bits-22 "$B2" 'cluster'
bad huge-l1-size "$B2" 'l1'
bad l1-past-eof "$B2" 'l1'
bad l1-in-header "$B2" 'l1'
bad reftable-past-eof "$B2" 'refcount.?table|reftable'
bad reftable-in-header "$B2" 'refcount.?table|reftable'
bad l2-past-eof "$B2" 'l2'
bad backing-self "$B2" 'backing chain loops'

MNT=$T/view.raw

# ---- dirty bit with nothing wrong: opens, reads right, is cleaned --------
img=$T/dirty.qcow2
cp "$B3" "$img"
$PYTHON "$MKBAD" dirty "$img"
qmount "$img" "$MNT"
same_file "$MNT" "$T/base3.raw" "dirty image: view vs qemu-img convert"
qumount "$MNT"
qcheck "$img"
[ "$(qinfo_field "$img" dirty-flag)" = false ] || fail "dirty bit still set after a rw mount + unmount"
qcompare "$img" "$T/base3.raw" "dirty image after unmount"

# ---- a real lazy-refcounts crash: dirty, refcounts missing ---------------
img=$T/lazy.qcow2
mkimg "$img" 256M lazy_refcounts=on
stdbuf -oL qemu-io -f qcow2 -c 'write -P 0x33 0 3M' -c 'write -P 0x44 200M 1M' -c flush \
	-c 'sleep 600000' "$img" >"$T/lazy-qemu-io.log" 2>&1 &
qpid=$!
_PIDS+=("$qpid")
wait_until 30 grep -q 'wrote 1048576' "$T/lazy-qemu-io.log" || fail "qemu-io did not write"
sleep 0.5
kill -9 "$qpid"
wait "$qpid" 2>/dev/null || true
[ "$(qinfo_field "$img" dirty-flag)" = true ] || fail "setup: lazy image not dirty after killing qemu-io"
rc=0
qemu-img check "$img" >"$T/lazy-check.log" 2>&1 || rc=$?
[ $rc = 2 ] || fail "setup: qemu-img check of the crashed lazy image should find errors (got exit $rc)"
cp "$img" "$T/lazy-ref.qcow2"
qemu-img check -q -r all "$T/lazy-ref.qcow2" >/dev/null 2>&1 || true
raw_of "$T/lazy-ref.qcow2" "$T/lazy.raw"
qmount "$img" "$MNT"
same_file "$MNT" "$T/lazy.raw" "crashed lazy image: view vs repaired copy"
qumount "$MNT"
qcheck "$img"
[ "$(qinfo_field "$img" dirty-flag)" = false ] || fail "lazy image: dirty bit still set after mount + unmount"
qcompare "$img" "$T/lazy.raw" "crashed lazy image after unmount"

# ---- corrupt bit: rw refused, ro works and changes nothing ---------------
img=$T/corrupt.qcow2
cp "$B3" "$img"
$PYTHON "$MKBAD" corrupt "$img"
sum=$(sha "$img")
qmount_fails "$img" "$MNT"
grep -qi corrupt "$QM_ERR" || fail "corrupt image: rw refusal does not say 'corrupt': $(cat "$QM_ERR")"
[ "$(sha "$img")" = "$sum" ] || fail "corrupt image changed by the refused rw mount"
qmount "$img" "$MNT" -o ro
same_file "$MNT" "$T/base3.raw" "corrupt image, ro view vs qemu-img convert"
qumount "$MNT"
[ "$(sha "$img")" = "$sum" ] || fail "corrupt image changed by a ro mount"

# ---- unknown autoclear bit: rw mount clears it ---------------------------
img=$T/autoclear.qcow2
cp "$B3" "$img"
$PYTHON "$MKBAD" unknown-autoclear "$img"
qmount "$img" "$MNT"
same_file "$MNT" "$T/base3.raw" "unknown autoclear bit: view"
qumount "$MNT"
ac=$($PYTHON "$MKBAD" --field "$img" autoclear_features)
[ "$ac" = 0 ] || fail "unknown autoclear bit not cleared by a rw mount (autoclear_features=$ac)"
qcheck "$img"

# ---- unknown header extension survives rw mount + write + unmount -------
for base in "$B3" "$B2"; do
	img=$T/ext-$(basename "$base")
	cp "$base" "$img"
	$PYTHON "$MKBAD" unknown-ext "$img"
	want=$($PYTHON "$MKBAD" --field "$img" ext:0x7163f5e1)
	cp "${base%.qcow2}.raw" "$T/ext-shadow.raw"
	qmount "$img" "$MNT"
	printf 'qcowfs was here' | dd of="$MNT" bs=1 seek=777777 conv=notrunc status=none
	printf 'qcowfs was here' | dd of="$T/ext-shadow.raw" bs=1 seek=777777 conv=notrunc status=none
	truncate -s 300M "$MNT"
	truncate -s 300M "$T/ext-shadow.raw"
	qumount "$MNT"
	got=$($PYTHON "$MKBAD" --field "$img" ext:0x7163f5e1) ||
		fail "unknown header extension lost after a rw mount ($(basename "$base")); extensions now: $($PYTHON "$MKBAD" --field "$img" ext)"
	[ "$got" = "$want" ] || fail "unknown header extension changed: was $want, now $got"
	qcheck "$img"
	qcompare "$img" "$T/ext-shadow.raw" "image with an unknown extension after write + grow"
done

log "ok"
