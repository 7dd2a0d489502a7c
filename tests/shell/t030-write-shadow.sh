#!/bin/bash
# t030-write-shadow: random unaligned writes through the view, mirrored into
# a plain shadow file, with truncate-grows and fsyncs in between, on several
# kinds of image: the view always reads like the shadow; after unmount
# qemu-img check is clean (no errors, no leaks) and qemu-img compare finds
# the image identical to the shadow.  Then writes past the end of the L1
# table's coverage after growing the view with truncate -s (L1 growth and
# relocation), at 512 B, 4 KiB and 64 KiB clusters; and two writers racing
# a third process that grows the disk step by step.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need cmp truncate

MNT=$T/view.raw

# The generator: seeded, so a failure can be replayed with the same seed.
cat >"$T/randwrite.py" <<'EOF'
import os, random, sys

view, shadow, seed, nops, maxlen, cs = sys.argv[1:7]
seed, nops, maxlen, cs = int(seed), int(nops), int(maxlen), int(cs)
grow = len(sys.argv) > 7 and sys.argv[7] == "grow"
r = random.Random(seed)
fv = os.open(view, os.O_RDWR)
fs = os.open(shadow, os.O_RDWR)
size = os.fstat(fv).st_size
if size != os.fstat(fs).st_size:
    sys.exit("view has %d bytes, shadow %d" % (size, os.fstat(fs).st_size))
written = []

def check(off, ln):
    a = os.pread(fv, ln, off)
    b = os.pread(fs, ln, off)
    if a != b:
        i = next(i for i in range(len(a)) if i >= len(b) or a[i] != b[i])
        sys.exit("seed %d: view differs from shadow at %d (read of %d at %d): view %r shadow %r"
                 % (seed, off + i, ln, off, a[i:i + 8], b[i:i + 8]))

for op in range(nops):
    x = r.random()
    if grow and x < 0.03:
        new = size + r.randrange(1, max(2, size // 8))
        new = (new + 511) // 512 * 512
        os.ftruncate(fv, new)
        os.ftruncate(fs, new)
        size = new
        if os.fstat(fv).st_size != new:
            sys.exit("truncate to %d: view has %d bytes" % (new, os.fstat(fv).st_size))
        check(size - 4096, 4096)
        continue
    if x < 0.08:
        os.fsync(fv)
        continue
    y = r.random()
    if y < 0.35:                      # small, anywhere
        off, ln = r.randrange(size), r.randint(1, 700)
    elif y < 0.6:                     # around a cluster boundary
        off = r.randrange(1, size // cs + 1) * cs - r.randint(1, 600)
        ln = r.randint(2, 1300)
    elif y < 0.7:                     # the last bytes of the disk
        ln = r.randint(1, min(size, 3 * cs))
        off = size - ln
    else:                             # big, unaligned
        off, ln = r.randrange(size), r.randint(cs // 2, maxlen)
    off = max(0, min(off, size - 1))
    ln = max(1, min(ln, size - off))
    data = r.randbytes(ln)
    for fd, what in ((fv, "view"), (fs, "shadow")):
        n = os.pwrite(fd, data, off)
        if n != ln:
            sys.exit("short write to %s: %d of %d at %d" % (what, n, ln, off))
    written.append((off, ln))
    if op % 25 == 0:
        o, l = r.choice(written)
        check(o, l)
os.fsync(fv)
for o, l in written[-50:]:
    check(o, l)
os.close(fv)
os.close(fs)
EOF

n=0
done_cases=0 # (bash abandons a function silently on some expansion errors)
# run_kind OPTS SIZE NOPS MAXLEN [prefill] [MOUNT_OPTS]: one image kind
run_kind() {
	local opts=$1 size nops=$3 maxlen=$4 prefill=${5:-} mopts=${6:-} img shadow cs seed
	size=$(numfmt --from=iec "$2")
	n=$((n + 1))
	img=$T/w$n.qcow2
	shadow=$T/w$n.shadow
	mkimg "$img" "$size" "$opts"
	cs=$(qinfo_field "$img" cluster-size)
	if [ -n "$prefill" ]; then
		qio "$img" "write -P 0xa1 0 $((3 * cs + 77))" "write -P 0xb2 $((size / 3)) $((5 * cs))" \
			"write -z $((size / 3 + cs)) $cs" "write -P 0xc3 $((size - 5 * cs - 9)) $((4 * cs))"
	fi
	raw_of "$img" "$shadow"
	seed=$((1000 + n))
	if [ -n "$mopts" ]; then
		qmount "$img" "$MNT" -o "$mopts"
	else
		qmount "$img" "$MNT"
	fi
	$PYTHON "$T/randwrite.py" "$MNT" "$shadow" "$seed" "$nops" "$maxlen" "$cs" grow ||
		fail "random writes on image $n ($opts) failed (seed $seed)"
	same_file "$MNT" "$shadow" "image $n ($opts): view vs shadow while mounted"
	qumount "$MNT"
	qcheck "$img"
	qcompare "$img" "$shadow" "image $n ($opts, seed $seed) vs shadow after unmount"
	# and once more through a fresh mount
	qmount "$img" "$MNT" -o ro
	same_file "$MNT" "$shadow" "image $n ($opts): remounted view vs shadow"
	qumount "$MNT"
	log "image $n ($opts${mopts:+, -o $mopts}): $nops random ops, identical to the shadow"
	done_cases=$((done_cases + 1))
	rm -f "$shadow"
}

run_kind "" 64M 600 $((1 << 20))
run_kind "" 64M 400 $((256 << 10)) prefill
run_kind cluster_size=4096 32M 500 $((64 << 10)) prefill
run_kind cluster_size=512 8M 400 8192
run_kind cluster_size=512,compat=0.10 4M 300 4096 prefill
run_kind compat=0.10 64M 400 $((512 << 10)) prefill
run_kind cluster_size=2M 128M 300 $((3 << 20))
run_kind refcount_bits=1 64M 400 $((256 << 10))
run_kind refcount_bits=64,cluster_size=4096 16M 400 $((32 << 10))
run_kind lazy_refcounts=on 64M 400 $((256 << 10)) prefill
run_kind preallocation=metadata 32M 400 $((256 << 10)) prefill
# the engine checks every cluster-map invariant after each change
run_kind cluster_size=4096 16M 300 $((64 << 10)) prefill runtime_asserts
run_kind "" 64M 200 $((1 << 20)) "" runtime_asserts

# ---- writes past the L1 table's coverage after truncate -s --------------
# grow_case OPTS SIZE NEWSIZE: grow the view, write near the new end and in
# the middle of the new space, check.
grow_case() {
	local opts=$1 size=$2 new=$3 img shadow off
	n=$((n + 1))
	img=$T/g$n.qcow2
	shadow=$T/g$n.shadow
	mkimg "$img" "$size" "$opts"
	qio "$img" "write -P 0x1f 0 100k" "write -P 0x2f $(($(numfmt --from=iec "$size") - 4096)) 4096"
	raw_of "$img" "$shadow"
	qmount "$img" "$MNT"
	truncate -s "$new" "$MNT" || fail "truncate -s $new of the view failed"
	truncate -s "$new" "$shadow"
	[ "$(file_size "$MNT")" = "$(file_size "$shadow")" ] ||
		fail "after truncate -s $new the view has $(file_size "$MNT") bytes"
	for off in $(($(file_size "$shadow") - 5777)) $(($(file_size "$shadow") / 2 + 12345)) \
		$(($(numfmt --from=iec "$size") + 1000)) 50000; do
		head -c 5000 /dev/urandom >"$T/chunk"
		dd if="$T/chunk" of="$MNT" bs=5000 seek="$off" oflag=seek_bytes conv=notrunc,fsync status=none ||
			fail "write at $off after growing to $new failed"
		dd if="$T/chunk" of="$shadow" bs=5000 seek="$off" oflag=seek_bytes conv=notrunc status=none
		cmp -n 5000 -i "$off" "$MNT" "$shadow" ||
			fail "read back at $off after growing to $new differs"
	done
	qumount "$MNT"
	qcheck "$img"
	[ "$(qinfo_field "$img" virtual-size)" = "$(file_size "$shadow")" ] ||
		fail "image grown to $new has virtual size $(qinfo_field "$img" virtual-size)"
	qcompare "$img" "$shadow" "image grown from $size to $new ($opts)"
	log "grew $opts from $size to $new and wrote past the old L1 coverage"
	done_cases=$((done_cases + 1))
	rm -f "$shadow"
}
# 512 B clusters: one L2 maps 32 KiB, one L1 cluster 2 MiB
grow_case cluster_size=512 64M 256M
grow_case cluster_size=512,compat=0.10 16M 100M
# 4 KiB clusters: one L1 cluster covers 1 GiB
grow_case cluster_size=4096 64M 3G
# 64 KiB clusters: one L1 cluster covers 4 TiB
grow_case "" 64M 6T
grow_case "" 1G 1100M

[ $done_cases = $n ] || fail "only $done_cases of $n cases ran to the end"

# ---- writers racing a growing disk ---------------------------------------------
# Two writers fill their own halves of the first 32 MiB (new L2 tables, so
# new L1 entries) while a third process grows the disk 1 MiB at a time and
# writes at each new end: with 512 B clusters the L1 table is relocated
# again and again under the writers' feet.  Nothing may be lost.
cat >"$T/race.py" <<'EOF'
import os, random, sys
view, shadow, role = sys.argv[1], sys.argv[2], sys.argv[3]
fv, fs = os.open(view, os.O_RDWR), os.open(shadow, os.O_RDWR)
if role == "grow":
    size = os.fstat(fv).st_size
    for i in range(100):
        size += 1 << 20
        os.ftruncate(fv, size)
        os.ftruncate(fs, size)
        mark = ("end of %d " % size).encode() * 10
        os.pwrite(fv, mark, size - len(mark))
        os.pwrite(fs, mark, size - len(mark))
        if i % 10 == 0:
            os.fsync(fv)
else:
    base = int(role) * (16 << 20)
    r = random.Random(int(role) + 77)
    for i in range(3000):
        off = base + r.randrange(16 << 20)
        data = r.randbytes(r.randint(1, 3000))
        data = data[:base + (16 << 20) - off]
        os.pwrite(fv, data, off)
        os.pwrite(fs, data, off)
os.fsync(fv)
EOF
img=$T/race.qcow2
shadow=$T/race.shadow
mkimg "$img" 32M cluster_size=512
truncate -s 32M "$shadow"
qmount "$img" "$MNT"
pids=()
for role in 0 1 grow; do
	bg_start $PYTHON "$T/race.py" "$MNT" "$shadow" "$role"
	pids+=("$BG_PID")
done
for p in "${pids[@]}"; do
	wait "$p" || fail "a racing writer failed"
	_forget _PIDS "$p"
done
[ "$(file_size "$MNT")" = $((132 << 20)) ] || fail "after the race the view has $(file_size "$MNT") bytes, not 132 MiB"
same_file "$MNT" "$shadow" "writers racing a growing disk: view vs shadow"
qumount "$MNT"
qcheck "$img"
qcompare "$img" "$shadow" "writers racing a growing disk, after unmount"
log "two writers racing 100 grows of a 512 B-cluster disk: identical to the shadow"
log "ok"
