#!/bin/bash
# t015-info-like-qemu: qcowctl info shows what qemu-img info shows for the
# same image (issue 8, "qcowctl info as qemu-img users expect"): the text
# line for line, the JSON key for key (the whole object, nesting and
# values), for --backing-chain too; only qcowctl's own additions ("qcowfs
# details:" in the text, the "qcowfs" object in JSON) are left out of the
# comparison.
#
# Images (all made by qemu-img and qemu-io, some with qcowctl snapshot):
# compat 0.10 and 1.1, lazy refcounts, 1-bit and 64-bit refcounts, 512 B
# and 2 MiB clusters, zstd, extended L2, several internal snapshots (made
# by qemu-img and by qcowctl), encrypted with LUKS (AES-XTS-plain64, and
# Twofish-CBC-ESSIV with SHA-1) and AES, marked corrupt
# and dirty, and backing chains: a relative name, an absolute name, no
# backing format recorded (probed), a raw base, three levels; each named
# from its own folder and through a path, since QEMU resolves and shows
# backing names relative to the image's folder.  Then a --json failure:
# the JSON error object.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io python3
[ -x "$QCOWCTL" ] || fail "QCOWCTL=$QCOWCTL is not an executable"

# mkluks IMAGE SIZE [OPTS]: a LUKS-encrypted image from qemu-img (secret
# "sec0").  Retried: QEMU calibrates its PBKDF by thread CPU time and gives
# up with "Unable to get accurate CPU usage" when a fast hash measures 0 ms,
# which happens now and then on a busy or fast machine.
mkluks() {
	local img=$1 size=$2 opts=${3:+,$3} try
	for try in 1 2 3 4 5 6; do
		rm -f "$img"
		qemu-img create -q -f qcow2 --object secret,id=sec0,data=qcowfs-test \
			-o "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10$opts" \
			"$img" "$size" >"$T/mkluks.log" 2>&1 && return 0
		cat "$T/mkluks.log" >>"$T/qemu.log"
		grep -q 'Unable to get accurate CPU usage' "$T/mkluks.log" || break
	done
	fail "qemu-img create of a LUKS image ($opts) failed: $(tail -n 3 "$T/mkluks.log")"
}

# same IMAGE [--backing-chain]: text and JSON agree with qemu-img info.
# Run from the image's folder with the name given as NAME (relative) or
# as a path, so that both ways of naming an image are compared.
n=0
same() {
	local name=$1 out
	shift
	n=$((n + 1))
	qemu-img info "$@" "$name" >"$T/q.txt" 2>"$T/q.err" || fail "qemu-img info $* $name failed: $(cat "$T/q.err")"
	qemu-img info --output=json "$@" "$name" >"$T/q.json" 2>"$T/q.err" || fail "qemu-img info --output=json $* $name failed"
	"$QCOWCTL" info "$@" "$name" >"$T/c.txt" 2>"$T/c.err" || fail "qcowctl info $* $name failed: $(cat "$T/c.err")"
	"$QCOWCTL" info --json "$@" "$name" >"$T/c.json" 2>"$T/c.err" || fail "qcowctl info --json $* $name failed: $(cat "$T/c.err")"
	out=$($PYTHON - "$T/q.txt" "$T/c.txt" "$T/q.json" "$T/c.json" 2>&1 <<'EOF'
import json, sys

def text(path, ours):
    lines, skip = [], False
    for line in open(path).read().splitlines():
        if ours and line == "qcowfs details:":
            skip = True
            continue
        if skip:
            if line.startswith("    "):
                continue
            skip = False
        lines.append(line)
    return lines

def clean(v, ours):
    if isinstance(v, list):
        return [clean(x, ours) for x in v]
    if not isinstance(v, dict):
        return v
    v = dict(v)
    if ours:
        v.pop("qcowfs", None)
    return {k: clean(x, ours) for k, x in v.items()}

q, c = text(sys.argv[1], False), text(sys.argv[2], True)
if q != c:
    import difflib
    sys.exit("text differs (- qemu-img, + qcowctl):\n" + "\n".join(difflib.unified_diff(q, c, lineterm="", n=1)))
try:
    qj, cj = clean(json.load(open(sys.argv[3])), False), clean(json.load(open(sys.argv[4])), True)
except ValueError as e:
    sys.exit("qcowctl info --json is not JSON: %s" % e)
if qj != cj:
    a = json.dumps(qj, indent=1, sort_keys=True).splitlines()
    b = json.dumps(cj, indent=1, sort_keys=True).splitlines()
    import difflib
    sys.exit("JSON differs (- qemu-img, + qcowctl):\n" + "\n".join(difflib.unified_diff(a, b, lineterm="", n=1)))
EOF
) || fail "qcowctl info $* $name (in $(pwd)): $out"
	log "same as qemu-img: info $* $name"
}

mkdir -p "$T/d/sub"
cd "$T/d"

# ---- formats and features --------------------------------------------------------
W=('write -P 0x11 0 1M' 'write -P 0x22 5M 12345' 'write -z 8M 1M')
for opts in compat=1.1 compat=0.10 lazy_refcounts=on refcount_bits=1 refcount_bits=64 \
	cluster_size=512 cluster_size=2M compression_type=zstd extended_l2=on; do
	img=f-${opts//[=,]/-}.qcow2
	mkimg "$img" 64M "$opts"
	qio "$img" "${W[@]}"
	same "$img"
done
same "$T/d/f-compat-1.1.qcow2"
# bigger: sizes in GiB, a disk size in MiB
mkimg big.qcow2 20G
qio big.qcow2 'write -P 0x33 0 5M' 'write -P 0x44 19G 3M'
same big.qcow2

# ---- snapshots --------------------------------------------------------------------
mkimg snap.qcow2 64M
qio snap.qcow2 'write -P 0x11 0 1M'
qemu-img snapshot -c first snap.qcow2
qio snap.qcow2 'write -P 0x22 0 2M'
qemu-img snapshot -c 'second one' snap.qcow2
"$QCOWCTL" snapshot create by-qcowctl snap.qcow2 >/dev/null 2>"$T/snap.err" ||
	fail "qcowctl snapshot create failed: $(cat "$T/snap.err")"
qemu-img snapshot -c "a-name-longer-than-the-tag-column-of-the-table" snap.qcow2
qemu-img snapshot -d first snap.qcow2
same snap.qcow2
[ "$($PYTHON -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["snapshots"]))' "$T/c.json")" = 3 ] ||
	fail "qcowctl info --json does not list the 3 snapshots as an array: $(cat "$T/c.json")"

# ---- encryption, corrupt and dirty flags ---------------------------------------------
mkluks luks.qcow2 64M
same luks.qcow2
mkluks luks-essiv.qcow2 64M \
	encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1
same luks-essiv.qcow2
if qemu-img create -q -f qcow2 --object secret,id=sec0,data=t015 -o encryption=on,encrypt.key-secret=sec0 \
	aes.qcow2 64M >>"$T/qemu.log" 2>&1; then
	same aes.qcow2
else
	log "this qemu-img no longer creates AES images: not compared"
fi
cp f-compat-1.1.qcow2 corrupt.qcow2
$PYTHON "$MKBAD" corrupt corrupt.qcow2
same corrupt.qcow2
cp f-compat-1.1.qcow2 dirty.qcow2
$PYTHON "$MKBAD" dirty dirty.qcow2
same dirty.qcow2

# ---- backing chains ---------------------------------------------------------------------
truncate -s 32M base.raw
printf 'base data' | dd of=base.raw bs=1 seek=4096 conv=notrunc status=none
mkimg sub/mid.qcow2 64M "backing_file=../base.raw,backing_fmt=raw"
qio sub/mid.qcow2 'write -P 0x55 1M 1M'
mkimg top.qcow2 64M "backing_file=sub/mid.qcow2,backing_fmt=qcow2"
qio top.qcow2 'write -P 0x66 2M 64k'
mkimg abs.qcow2 64M "backing_file=$T/d/sub/mid.qcow2,backing_fmt=qcow2"
# no backing format recorded (older QEMUs made such images; this one
# refuses to, so the extension is taken out): qemu-img probes it
mkimg sub/base2.qcow2 64M
mkimg sub/probed.qcow2 64M "backing_file=base2.qcow2,backing_fmt=qcow2"
$PYTHON - sub/probed.qcow2 <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(65536)
    off = struct.unpack(">I", h[100:104])[0]
    while True:
        t, n = struct.unpack(">II", h[off:off + 8])
        if t == 0:
            sys.exit("no backing format extension")
        if t == 0xE2792ACA:
            # an extension type nobody knows, which QEMU skips
            f.seek(off)
            f.write(struct.pack(">I", 0x7163F5E2))
            break
        off += 8 + ((n + 7) & ~7)
EOF
[ "$(qinfo_field sub/probed.qcow2 backing-filename-format 2>/dev/null || true)" != qcow2 ] ||
	fail "setup: the backing format extension is still there"
for img in top.qcow2 abs.qcow2 sub/probed.qcow2 sub/mid.qcow2; do
	same "$img"
	same "$img" --backing-chain
done
same "$T/d/top.qcow2" --backing-chain
(cd sub && same ../top.qcow2 --backing-chain)
[ "$($PYTHON -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$T/c.json")" = 3 ] ||
	fail "qcowctl info --backing-chain --json of a 3-level chain is not an array of 3: $(cat "$T/c.json")"

# ---- a failure with --json: a JSON error object, and the exit status --------------------
for args in "info --json" "info --json --backing-chain" "check --json"; do
	rc=0
	# shellcheck disable=SC2086
	"$QCOWCTL" $args nosuch.qcow2 >"$T/err.json" 2>"$T/err.txt" || rc=$?
	[ $rc = 1 ] || fail "qcowctl $args of a missing file exited $rc, want 1"
	grep -q 'nosuch.qcow2' "$T/err.txt" || fail "qcowctl $args of a missing file: no message on stderr"
	$PYTHON - "$T/err.json" <<'EOF' || fail "qcowctl $args of a missing file: $(cat "$T/err.json")"
import json, sys
v = json.load(open(sys.argv[1]))
e = v["error"]
assert v["filename"] == "nosuch.qcow2" and e["errno"] == "ENOENT" and e["errno-value"] == 2, v
assert "nosuch.qcow2" in e["message"] and "No such file" in e["message"], v
EOF
done
cp f-compat-1.1.qcow2 magic.qcow2
$PYTHON "$MKBAD" magic magic.qcow2
rc=0
"$QCOWCTL" info --json magic.qcow2 >"$T/err.json" 2>/dev/null || rc=$?
[ $rc = 1 ] || fail "qcowctl info --json of a bad magic exited $rc"
grep -q '"errno": "EINVAL"' "$T/err.json" || fail "qcowctl info --json of a bad magic: $(cat "$T/err.json")"
# ---- hostile bytes: info never crashes, and --json always prints JSON ---------------
# Random bytes changed in the header, the header extensions (backing
# format, crypto header extension), the snapshot table and the LUKS header
# of images made above: exit 0 or 1, never a signal, and with --json one
# JSON object either way.
out=$($PYTHON - "$QCOWCTL" snap.qcow2 luks.qcow2 top.qcow2 2>&1 <<'EOF'
import json, random, struct, subprocess, sys
ctl, images = sys.argv[1], sys.argv[2:]
r = random.Random(15)
bad = []
for img in images:
    src = open(img, "rb").read()
    hl = struct.unpack(">I", src[100:104])[0]
    spots = [(0, 112), (hl, 1024), (struct.unpack(">Q", src[64:72])[0], 256)]
    off = hl
    while True:                      # the LUKS header, where there is one
        t, n = struct.unpack(">II", src[off:off + 8])
        if t == 0:
            break
        if t == 0x0537BE77:
            spots.append((struct.unpack(">Q", src[off + 8:off + 16])[0], 600))
        off += 8 + ((n + 7) & ~7)
    for it in range(60):
        b = bytearray(src)
        for _ in range(r.randint(1, 8)):
            lo, n = r.choice(spots)
            if lo + n <= len(b):
                b[lo + r.randrange(n)] = r.randrange(256)
        open("hostile.qcow2", "wb").write(b)
        for args in (["info"], ["info", "--json"], ["info", "--json", "--backing-chain"]):
            p = subprocess.run([ctl] + args + ["hostile.qcow2"], capture_output=True, timeout=60)
            if p.returncode not in (0, 1):
                bad.append("%s %s round %d: exit %d: %s" % (img, " ".join(args), it, p.returncode, p.stderr[-300:]))
            elif "--json" in args:
                try:
                    json.loads(p.stdout)
                except ValueError:
                    bad.append("%s %s round %d: not JSON: %r" % (img, " ".join(args), it, p.stdout[:300]))
if bad:
    sys.exit("\n".join(bad[:10]))
EOF
) || fail "qcowctl info on damaged images: $out"

log "ok ($n comparisons)"
