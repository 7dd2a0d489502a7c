#!/bin/bash
# t010-create-info: qcowctl create makes images QEMU accepts as clean and
# describes the way we asked (cluster sizes 512 B .. 2 MiB, compat 0.10 and
# 1.1, refcount widths); qcowctl info and check (text and --json) agree with
# qemu-img on images made by qemu-img, including leaky and corrupt ones.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io python3
[ -x "$QCOWCTL" ] || fail "QCOWCTL=$QCOWCTL is not an executable"

# jcmp WANT GOT WHAT KEY...: each (dotted) KEY present in the JSON file
# WANT must be present with the same value in the JSON file GOT.
jcmp() {
	local out
	out=$($PYTHON - "$@" <<'EOF'
import json, sys
want, got, what = sys.argv[1:4]
try:
    a, b = json.load(open(want)), json.load(open(got))
except ValueError as e:
    sys.exit("%s: not valid JSON (%s): %s" % (what, e, open(got).read()[:400]))
def get(v, k):
    for p in k.split("."):
        if not isinstance(v, dict) or p not in v:
            raise KeyError(k)
        v = v[p]
    return v
bad = []
for k in sys.argv[4:]:
    try:
        x = get(a, k)
    except KeyError:
        continue
    try:
        y = get(b, k)
    except KeyError:
        bad.append("no %s (want %r)" % (k, x))
        continue
    if x != y:
        bad.append("%s is %r, want %r" % (k, y, x))
if bad:
    sys.exit("%s: %s" % (what, "; ".join(bad)))
EOF
) || fail "$out"
}

# ---- qcowctl create -------------------------------------------------------
n=0
done_cases=0 # (bash abandons a function silently on some expansion errors)
created() { # CLUSTER COMPAT REFBITS SIZE
	local cs=$1 compat=$2 rb=$3 size=$4 img out
	n=$((n + 1))
	img=$T/c$n-$cs-$compat-$rb.qcow2
	out=$("$QCOWCTL" create -s "$size" -c "$cs" --compat "$compat" --refcount-bits "$rb" "$img" 2>&1) ||
		fail "qcowctl create -s $size -c $cs --compat $compat --refcount-bits $rb failed: $out"
	qcheck "$img"
	qemu-img info --output=json "$img" >"$T/qi.json" || fail "qemu-img info $img failed"
	printf '{"virtual-size": %s, "cluster-size": %s, "format-specific": {"data": {"compat": "%s", "refcount-bits": %s}}}\n' \
		"$size" "$cs" "$compat" "$rb" >"$T/want.json"
	jcmp "$T/want.json" "$T/qi.json" "qemu-img info of an image from qcowctl create -s $size -c $cs --compat $compat --refcount-bits $rb" \
		virtual-size cluster-size format-specific.data.compat format-specific.data.refcount-bits
	# QEMU can use it: write across clusters, read back, still clean
	qio "$img" "write -P 0x5c 1000 $((3 * cs))" "read -P 0x5c 1000 $((3 * cs))" \
		"write -P 0x3d $((size - 4096)) 4096" "read -P 0x3d $((size - 4096)) 4096"
	qcheck "$img"
	compare_info "$img"
	log "created $(basename "$img")"
	done_cases=$((done_cases + 1))
}

# compare_info IMAGE: qcowctl info (text and --json) agrees with qemu-img.
compare_info() {
	local img=$1 out
	qemu-img info --output=json "$img" >"$T/qi.json" || fail "qemu-img info $img failed"
	"$QCOWCTL" info --json "$img" >"$T/ci.json" 2>"$T/ci.err" ||
		fail "qcowctl info --json $img failed: $(cat "$T/ci.err")"
	# (keys qemu-img omits, e.g. for v2 images, are not compared)
	jcmp "$T/qi.json" "$T/ci.json" "qcowctl info --json $img vs qemu-img info" \
		virtual-size cluster-size format-specific.data.compat \
		format-specific.data.refcount-bits format-specific.data.lazy-refcounts \
		format-specific.data.corrupt dirty-flag backing-filename
	out=$("$QCOWCTL" info "$img" 2>&1) || fail "qcowctl info $img failed: $out"
	$PYTHON - "$T/qi.json" "$out" <<'EOF' || fail "qcowctl info $img: $out"
import json, re, sys
q = json.load(open(sys.argv[1]))
text = sys.argv[2]
for what, v in (("virtual size", q["virtual-size"]), ("cluster size", q["cluster-size"]),
                ("compat", q["format-specific"]["data"]["compat"])):
    if not re.search(r"(^|[^0-9.])%s([^0-9.]|$)" % re.escape(str(v)), text, re.M):
        sys.exit("the text does not show the %s %s" % (what, v))
EOF
}

# compare_check IMAGE: qcowctl check (exit code, text, --json) agrees with
# qemu-img check.
compare_check() {
	local img=$1 qrc=0 crc=0 jrc=0 out
	qemu-img check --output=json "$img" >"$T/qc.json" 2>/dev/null || qrc=$?
	"$QCOWCTL" check "$img" >"$T/cc.txt" 2>&1 || crc=$?
	"$QCOWCTL" check --json "$img" >"$T/cc.json" 2>"$T/cc.err" || jrc=$?
	[ $crc = $qrc ] || fail "$img: qemu-img check exits $qrc, qcowctl check exits $crc: $(cat "$T/cc.txt")"
	[ $jrc = $qrc ] || fail "$img: qemu-img check exits $qrc, qcowctl check --json exits $jrc"
	out=$($PYTHON - "$T/qc.json" "$T/cc.json" "$qrc" <<'EOF'
import json, sys
try:
    q, c = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
except ValueError as e:
    sys.exit("qcowctl check --json: not valid JSON (%s): %s" % (e, open(sys.argv[2]).read()[:400]))
bad = []
for k in ("corruptions", "leaks", "total-clusters", "allocated-clusters", "image-end-offset"):
    x, y = q.get(k, 0), c.get(k, 0)          # qemu-img omits zero counts
    if k == "corruptions":
        # counted differently; both must agree whether there are any
        x, y = x > 0, y > 0
    if x != y:
        bad.append("%s: qemu-img %r, qcowctl %r" % (k, q.get(k, 0), c.get(k, 0)))
if bad:
    sys.exit("check --json disagrees: " + "; ".join(bad))
EOF
) || fail "$img: $out"
	case $qrc in
	0) grep -q 'No errors were found' "$T/cc.txt" || fail "qcowctl check $img (clean) does not say so: $(cat "$T/cc.txt")" ;;
	3) grep -qi 'leak' "$T/cc.txt" || fail "qcowctl check $img (leaks) does not mention leaks: $(cat "$T/cc.txt")" ;;
	2) grep -qiE 'error|corrupt' "$T/cc.txt" || fail "qcowctl check $img (corrupt) does not say so: $(cat "$T/cc.txt")" ;;
	esac
	log "check agrees on $(basename "$img") (exit $qrc)"
}

for cs in 512 4096 65536 2097152; do
	created "$cs" 1.1 16 $((256 << 20))
	created "$cs" 0.10 16 $((256 << 20))
done
for rb in 1 2 4 8 16 32 64; do
	created 65536 1.1 "$rb" $((1 << 30))
done
created 512 1.1 1 $((64 << 20))
created 2097152 1.1 64 $((8 << 30))
created 4096 1.1 64 $((3 << 30))
created 65536 1.1 16 $(((1 << 40) + 512)) # 1 TiB + 512: L1 of several clusters
[ $done_cases = $n ] || fail "only $done_cases of $n creations ran to the end"

# defaults: 64 KiB clusters, compat 1.1, 16-bit refcounts; a size suffix
"$QCOWCTL" create -s 64M "$T/default.qcow2" >/dev/null || fail "qcowctl create -s 64M failed"
qcheck "$T/default.qcow2"
qemu-img info --output=json "$T/default.qcow2" >"$T/qi.json"
echo '{"virtual-size": 67108864, "cluster-size": 65536, "format-specific": {"data": {"compat": "1.1", "refcount-bits": 16}}}' >"$T/want.json"
jcmp "$T/want.json" "$T/qi.json" "qcowctl create -s 64M (defaults)" \
	virtual-size cluster-size format-specific.data.compat format-specific.data.refcount-bits

# refusals: an existing file is not overwritten; impossible parameters
sum=$(sha "$T/default.qcow2")
if "$QCOWCTL" create -s 1M "$T/default.qcow2" >/dev/null 2>"$T/err"; then
	fail "qcowctl create over an existing image succeeded"
fi
[ -s "$T/err" ] || fail "qcowctl create over an existing image: no message"
[ "$(sha "$T/default.qcow2")" = "$sum" ] || fail "qcowctl create changed an existing file"
for args in "-c 256" "-c 4194304" "-c 1000" "--compat 0.9" "--refcount-bits 128" \
	"--refcount-bits 3" "--compat 0.10 --refcount-bits 1"; do
	# shellcheck disable=SC2086
	if "$QCOWCTL" create -s 64M $args "$T/refused.qcow2" >/dev/null 2>"$T/err"; then
		fail "qcowctl create $args succeeded"
	fi
	[ -s "$T/err" ] || fail "qcowctl create $args: no message"
	[ ! -e "$T/refused.qcow2" ] || fail "qcowctl create $args failed but left a file"
done

# ---- qcowctl info / check on images made by qemu-img --------------------
m=0
qimg() { # OPTS SIZE [qemu-io commands...]
	local opts=$1 size=$2 img
	shift 2
	m=$((m + 1))
	img=$T/q$m.qcow2
	mkimg "$img" "$size" "$opts"
	[ $# = 0 ] || qio "$img" "$@"
	compare_info "$img"
	compare_check "$img"
	QIMG=$img
	done_cases=$((done_cases + 1))
}
W=('write -P 0x11 0 1M' 'write -P 0x22 5M 12345' 'write -z 8M 1M' 'discard 0 64k')
qimg cluster_size=512 64M "${W[@]}"
qimg cluster_size=4096 64M "${W[@]}"
qimg cluster_size=65536 256M "${W[@]}"
qimg cluster_size=2M 256M "${W[@]}"
qimg compat=0.10 256M 'write -P 0x11 0 1M' 'write -P 0x22 5M 12345' 'discard 0 64k'
qimg compat=0.10,cluster_size=512 64M 'write -P 0x11 0 100k'
qimg refcount_bits=1 256M "${W[@]}"
qimg refcount_bits=64 256M "${W[@]}"
qimg refcount_bits=1,cluster_size=512 32M "${W[@]}"
qimg preallocation=metadata 256M 'write -P 0x11 0 1M'
qimg preallocation=metadata,cluster_size=4096 64M
qimg lazy_refcounts=on 256M "${W[@]}"
qimg "" 4G 'write -P 0x11 3G 1M'
qimg "" 64M 'write -P 0x11 0 1M'
$PYTHON "$MKBAD" leak "$QIMG"
compare_check "$QIMG"
compare_info "$QIMG"
qimg refcount_bits=1 64M 'write -P 0x11 0 1M'
$PYTHON "$MKBAD" leak "$QIMG"
compare_check "$QIMG"
qimg "" 64M 'write -P 0x11 0 1M'
$PYTHON "$MKBAD" refcount-too-low "$QIMG"
compare_check "$QIMG"
qimg compat=0.10 64M 'write -P 0x11 0 1M'
$PYTHON "$MKBAD" refcount-too-low "$QIMG"
compare_check "$QIMG"
qimg "" 64M 'write -P 0x11 0 1M'
$PYTHON "$MKBAD" dirty "$QIMG"
compare_info "$QIMG"
qimg "" 64M 'write -P 0x11 0 1M'
$PYTHON "$MKBAD" corrupt "$QIMG"
compare_info "$QIMG"

[ $done_cases = $((n + m)) ] || fail "only $done_cases of $((n + m)) cases ran to the end"

# check must not change the image, and a bad image makes it fail clearly
sum=$(sha "$QIMG")
"$QCOWCTL" check "$QIMG" >/dev/null 2>&1 || true
[ "$(sha "$QIMG")" = "$sum" ] || fail "qcowctl check changed the image"
cp "$QIMG" "$T/magic.qcow2"
$PYTHON "$MKBAD" magic "$T/magic.qcow2"
for sub in info check; do
	rc=0
	"$QCOWCTL" $sub "$T/magic.qcow2" >"$T/out" 2>&1 || rc=$?
	[ $rc != 0 ] || fail "qcowctl $sub of a file with a bad magic exited 0"
	[ -s "$T/out" ] || fail "qcowctl $sub of a file with a bad magic: no message"
done

log "ok"
