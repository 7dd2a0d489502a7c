#!/bin/bash
# t280-refused: the kinds of image qcowfs still refuses (issue 8, "Still
# refused") are refused by every entry point with a message naming the
# feature and where the header records it, and never changed.
#
# Kinds: encryption with LUKS (crypt_method 2) and with QEMU's legacy AES
# (crypt_method 1), both made by qemu-img; unknown incompatible feature
# bits (bit 5, the first one the spec leaves free, bit 40, bit 63, and one
# the image names in its own feature name table), patched into a header
# qemu-img made; the corrupt bit (refused read-write, allowed with -o ro).
#
# For each: qcowfs read-write and -o ro, qcowctl info, info --json,
# check, check --json, status (on the image and on the refused
# mountpoint), compact, sparsify and snapshot list on the image: the exit
# status, the message (a regex naming the feature and "offset N"), the
# image's sha256 before and after, and no process left holding it.
# qemu-img is the oracle where it has an opinion: info shows what it
# shows (encryption format, corrupt flag), check exits as it exits.
. "$(dirname "$0")/lib.sh"
need_qcowfs
need sha256sum

MNT=$T/view.raw
: >"$MNT"   # the mountpoint: a regular file, as for any mount
SECRET=(--object secret,id=sec0,data=qcowfs-test)

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

# ---- the images -------------------------------------------------------------
# LUKS: a short PBKDF time keeps the creation fast; the header is a real
# LUKS1 header all the same.
mkluks "$T/luks.qcow2" 64M
qemu-io --object secret,id=sec0,data=qcowfs-test \
	--image-opts "driver=qcow2,file.filename=$T/luks.qcow2,encrypt.key-secret=sec0" \
	-c 'write -P 0x5a 0 1M' >>"$T/qemu.log" 2>&1 || fail "qemu-io could not write the LUKS image"
# The legacy AES method: QEMU still creates it (-o encryption=on), only
# refuses to use it for guests.
if ! qemu-img create -q -f qcow2 "${SECRET[@]}" -o encryption=on,encrypt.key-secret=sec0 \
	"$T/aes.qcow2" 64M >>"$T/qemu.log" 2>&1; then
	# a QEMU without it: the same header with crypt_method 1
	mkimg "$T/aes.qcow2" 64M
	$PYTHON - "$T/aes.qcow2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(32)
    f.write(struct.pack(">I", 1))
EOF
fi
[ "$(qinfo_field "$T/aes.qcow2" format-specific.data.encrypt.format)" = aes ] ||
	fail "setup: $T/aes.qcow2 is not an AES-encrypted image for qemu-img"
[ "$(qinfo_field "$T/luks.qcow2" format-specific.data.encrypt.format)" = luks ] ||
	fail "setup: $T/luks.qcow2 is not a LUKS-encrypted image for qemu-img"

mkimg "$T/plain.qcow2" 64M
qio "$T/plain.qcow2" 'write -P 0x11 0 1M' 'write -P 0x22 40M 64k'
raw_of "$T/plain.qcow2" "$T/plain.raw"

# setbit IMAGE BIT: sets one incompatible feature bit (header offset 72)
setbit() {
	$PYTHON - "$1" "$2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(72)
    v = struct.unpack(">Q", f.read(8))[0] | (1 << int(sys.argv[2]))
    f.seek(72)
    f.write(struct.pack(">Q", v))
EOF
}
# name_feature IMAGE BIT NAME: adds a feature name table extension naming
# incompatible bit BIT (as QEMU names the bits it knows) before the end of
# the header extensions
name_feature() {
	$PYTHON - "$@" <<'EOF'
import struct, sys
path, bit, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
with open(path, "r+b") as f:
    h = f.read(112)
    cs = 1 << struct.unpack(">I", h[20:24])[0]
    off = struct.unpack(">I", h[100:104])[0]
    f.seek(0)
    c0 = f.read(cs)
    while True:
        t, n = struct.unpack(">II", c0[off:off + 8])
        if t == 0:
            break
        off += 8 + ((n + 7) & ~7)
    entry = struct.pack(">BB46s", 0, bit, name)
    rec = struct.pack(">II", 0x6803F857, len(entry)) + entry + bytes(8)
    assert off + len(rec) <= cs
    f.seek(off)
    f.write(rec)
EOF
}

for b in 5 40 63; do
	cp "$T/plain.qcow2" "$T/bit$b.qcow2"
	setbit "$T/bit$b.qcow2" $b
done
cp "$T/plain.qcow2" "$T/named.qcow2"
setbit "$T/named.qcow2" 9
name_feature "$T/named.qcow2" 9 "frobnication"
cp "$T/plain.qcow2" "$T/corrupt.qcow2"
$PYTHON "$MKBAD" corrupt "$T/corrupt.qcow2"

# ---- the checks ---------------------------------------------------------------

# unchanged IMAGE SUM WHAT
unchanged() {
	[ "$(sha "$1")" = "$2" ] || fail "$3 changed $(basename "$1")"
	[ -z "$(pids_holding "$1")" ] || fail "$3: a process still holds $(basename "$1")"
}

# ctl_fails WANT_RC REGEX IMAGE ARGS...: qcowctl ARGS exits WANT_RC with a
# message matching REGEX on stderr, and IMAGE is unchanged.
ctl_fails() {
	local want=$1 re=$2 img=$3 rc=0 sum
	shift 3
	sum=$(sha "$img")
	timeout 60 "$QCOWCTL" "$@" >"$T/ctl.out" 2>"$T/ctl.err" || rc=$?
	[ $rc = "$want" ] || fail "qcowctl $* exited $rc, want $want: $(cat "$T/ctl.err" "$T/ctl.out" | head -n 5)"
	grep -qiE "$re" "$T/ctl.err" || fail "qcowctl $*: message does not match /$re/: $(cat "$T/ctl.err")"
	unchanged "$img" "$sum" "qcowctl $*"
}

# json_error FILE ERRNO REGEX: FILE holds qcowctl's JSON error object
json_error() {
	local out
	out=$($PYTHON - "$@" 2>&1 <<'EOF'
import json, re, sys
path, errno_name, regex = sys.argv[1:4]
try:
    v = json.load(open(path))
except ValueError as e:
    sys.exit("not a JSON object (%s): %r" % (e, open(path).read()[:300]))
e = v.get("error")
if not isinstance(e, dict) or e.get("errno") != errno_name or not re.search(regex, e.get("message", ""), re.I):
    sys.exit("JSON error object %r: want errno %s and a message matching /%s/" % (v, errno_name, regex))
EOF
) || fail "$out"
}

# refused KIND IMAGE REGEX ERRNO INFO_OK: everything refuses IMAGE (INFO_OK=1:
# info shows it, as qemu-img info does).
refused() {
	local kind=$1 img=$2 re=$3 err=$4 info_ok=$5 sum mode qrc crc
	sum=$(sha "$img")
	for mode in rw ro; do
		if [ $mode = ro ]; then
			qmount_fails "$img" "$MNT" -o ro
		else
			qmount_fails "$img" "$MNT"
		fi
		grep -qiE "$re" "$QM_ERR" || fail "$kind ($mode mount): message does not match /$re/: $(cat "$QM_ERR")"
		unchanged "$img" "$sum" "the refused $mode mount of $kind"
		# nothing is mounted: status says so, on the mountpoint and the image
		ctl_fails 1 'not a qcowfs mount' "$img" status "$MNT"
	done
	ctl_fails 1 'not a qcowfs mount' "$img" status "$img"
	ctl_fails 1 "$re" "$img" compact "$img"
	ctl_fails 1 "$re" "$img" sparsify "$img"
	ctl_fails 1 "$re" "$img" snapshot list "$img"
	# check: qemu-img check cannot check these either (exit 1)
	qrc=0
	qemu-img check "$img" >>"$T/qemu.log" 2>&1 || qrc=$?
	ctl_fails $qrc "$re" "$img" check "$img"
	ctl_fails $qrc "$re" "$img" check --json "$img"
	json_error "$T/ctl.out" "$err" "$re"
	if [ "$info_ok" = 1 ]; then
		crc=0
		"$QCOWCTL" info "$img" >"$T/info.txt" 2>&1 || crc=$?
		[ $crc = 0 ] || fail "qcowctl info of $kind exited $crc: $(cat "$T/info.txt")"
	else
		ctl_fails 1 "$re" "$img" info "$img"
		ctl_fails 1 "$re" "$img" info --json "$img"
		json_error "$T/ctl.out" "$err" "$re"
		qemu-img info "$img" >/dev/null 2>&1 && fail "setup: qemu-img info accepts $kind, qcowctl info should too"
	fi
	unchanged "$img" "$sum" "the commands on $kind"
	log "refused $kind: $(head -n 1 "$QM_ERR")"
}

refused LUKS "$T/luks.qcow2" 'encrypted images \(LUKS\) are not supported.*offset 32' ENOTSUP 1
grep -q '^encrypted: yes' "$T/info.txt" || fail "qcowctl info of the LUKS image does not say 'encrypted: yes': $(cat "$T/info.txt")"
refused AES "$T/aes.qcow2" 'encrypted images \(AES\) are not supported.*offset 32' ENOTSUP 1
for b in 5 40 63; do
	refused "incompatible bit $b" "$T/bit$b.qcow2" "incompatible feature bit $b \\(unknown\\).*offset 72" ENOTSUP 0
done
refused "named incompatible bit 9" "$T/named.qcow2" 'incompatible feature bit 9 \(frobnication\).*offset 72' ENOTSUP 0

# info of the encrypted images: what qemu-img info shows
for img in "$T/luks.qcow2" "$T/aes.qcow2"; do
	qemu-img info --output=json "$img" >"$T/qi.json"
	"$QCOWCTL" info --json "$img" >"$T/ci.json" || fail "qcowctl info --json $img failed"
	$PYTHON - "$T/qi.json" "$T/ci.json" <<'EOF' || fail "qcowctl info --json $(basename "$img") disagrees with qemu-img"
import json, sys
q, c = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
bad = []
for path in (("encrypted",), ("format-specific", "data", "encrypt", "format"),
             ("virtual-size",), ("format-specific", "data", "corrupt")):
    a, b = q, c
    for k in path:
        a = a.get(k) if isinstance(a, dict) else None
        b = b.get(k) if isinstance(b, dict) else None
    if a != b:
        bad.append("%s: qemu-img %r, qcowctl %r" % (".".join(path), a, b))
if bad:
    sys.exit("; ".join(bad))
EOF
done

# ---- the corrupt bit: read-write refused, read-only allowed ----------------------
img=$T/corrupt.qcow2
sum=$(sha "$img")
qmount_fails "$img" "$MNT"
grep -qiE 'corrupt.*offset 72' "$QM_ERR" || fail "corrupt image (rw): message does not name the corrupt bit: $(cat "$QM_ERR")"
unchanged "$img" "$sum" "the refused rw mount of the corrupt image"
ctl_fails 1 'corrupt.*offset 72' "$img" compact "$img"
ctl_fails 1 'corrupt.*offset 72' "$img" sparsify "$img"
qmount "$img" "$MNT" -o ro
same_file "$MNT" "$T/plain.raw" "corrupt image, read-only view"
"$QCOWCTL" status "$MNT" >"$T/status.out" 2>&1 || fail "qcowctl status of the read-only mount failed: $(cat "$T/status.out")"
qumount "$MNT"
unchanged "$img" "$sum" "the read-only mount of the corrupt image"
# info and check work on it, as with qemu-img
"$QCOWCTL" info --json "$img" >"$T/ci.json" || fail "qcowctl info --json of the corrupt image failed"
[ "$($PYTHON -c 'import json,sys; print(json.load(open(sys.argv[1]))["format-specific"]["data"]["corrupt"])' "$T/ci.json")" = True ] ||
	fail "qcowctl info --json does not show corrupt: true: $(cat "$T/ci.json")"
qrc=0
qemu-img check "$img" >>"$T/qemu.log" 2>&1 || qrc=$?
crc=0
"$QCOWCTL" check "$img" >"$T/check.out" 2>&1 || crc=$?
[ $crc = $qrc ] || fail "check of the corrupt-marked image: qemu-img exits $qrc, qcowctl $crc: $(cat "$T/check.out")"
unchanged "$img" "$sum" "info and check of the corrupt image"

log "ok"
