#!/bin/bash
# t010-create-info: qcowctl create makes images QEMU accepts as clean and
# describes the way we asked (cluster sizes 512 B .. 2 MiB, compat 0.10 and
# 1.1, refcount widths); qcowctl info and check (text and --json) agree with
# qemu-img on images made by qemu-img, including leaky and corrupt ones.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io python3
[ -x "$QCOWCTL" ] || fail "QCOWCTL=$QCOWCTL is not an executable"

# jfield FILE KEY: a (dotted) key of a JSON file, booleans as true/false;
# prints nothing and fails when the key is missing.
jfield() {
	python3 - "$1" "$2" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    if not isinstance(v, dict) or k not in v:
        sys.exit(1)
    v = v[k]
print(str(v).lower() if isinstance(v, bool) else v)
EOF
}

# ---- qcowctl create -------------------------------------------------------
n=0
created() { # CLUSTER COMPAT REFBITS SIZE
	local cs=$1 compat=$2 rb=$3 size=$4 img out
	n=$((n + 1))
	img=$T/c$n-$cs-$compat-$rb.qcow2
	out=$("$QCOWCTL" create -s "$size" -c "$cs" --compat "$compat" --refcount-bits "$rb" "$img" 2>&1) ||
		fail "qcowctl create -s $size -c $cs --compat $compat --refcount-bits $rb failed: $out"
	qcheck "$img"
	qemu-img info --output=json "$img" >"$T/qi.json" || fail "qemu-img info $img failed"
	[ "$(jfield "$T/qi.json" virtual-size)" = "$size" ] ||
		fail "$img: qemu-img sees virtual size $(jfield "$T/qi.json" virtual-size), asked $size"
	[ "$(jfield "$T/qi.json" cluster-size)" = "$cs" ] ||
		fail "$img: qemu-img sees cluster size $(jfield "$T/qi.json" cluster-size), asked $cs"
	[ "$(jfield "$T/qi.json" format-specific.data.compat)" = "$compat" ] ||
		fail "$img: qemu-img sees compat $(jfield "$T/qi.json" format-specific.data.compat), asked $compat"
	[ "$(jfield "$T/qi.json" format-specific.data.refcount-bits)" = "$rb" ] ||
		fail "$img: qemu-img sees refcount bits $(jfield "$T/qi.json" format-specific.data.refcount-bits), asked $rb"
	# QEMU can use it: write across clusters, read back, still clean
	qio "$img" "write -P 0x5c 1000 $((3 * cs))" "read -P 0x5c 1000 $((3 * cs))" \
		"write -P 0x3d $((size - 4096)) 4096" "read -P 0x3d $((size - 4096)) 4096"
	qcheck "$img"
	compare_info "$img"
}

# compare_info IMAGE: qcowctl info (text and --json) agrees with qemu-img.
compare_info() {
	local img=$1 key q c out
	qemu-img info --output=json "$img" >"$T/qi.json" || fail "qemu-img info $img failed"
	"$QCOWCTL" info --json "$img" >"$T/ci.json" 2>"$T/ci.err" ||
		fail "qcowctl info --json $img failed: $(cat "$T/ci.err")"
	python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$T/ci.json" ||
		fail "qcowctl info --json $img: not valid JSON: $(head -c 500 "$T/ci.json")"
	for key in virtual-size cluster-size format-specific.data.compat \
		format-specific.data.refcount-bits format-specific.data.lazy-refcounts \
		format-specific.data.corrupt dirty-flag; do
		q=$(jfield "$T/qi.json" "$key") || continue # qemu-img omits some for v2
		c=$(jfield "$T/ci.json" "$key") || fail "qcowctl info --json $img has no $key (qemu-img: $q)"
		[ "$q" = "$c" ] || fail "$img: $key: qemu-img says $q, qcowctl info --json says $c"
	done
	out=$("$QCOWCTL" info "$img" 2>&1) || fail "qcowctl info $img failed: $out"
	q=$(jfield "$T/qi.json" virtual-size)
	grep -qw -- "$q" <<<"$out" || fail "qcowctl info $img does not show the virtual size $q: $out"
	q=$(jfield "$T/qi.json" cluster-size)
	grep -qw -- "$q" <<<"$out" || fail "qcowctl info $img does not show the cluster size $q: $out"
	q=$(jfield "$T/qi.json" format-specific.data.compat)
	grep -qwF -- "$q" <<<"$out" || fail "qcowctl info $img does not show compat $q: $out"
}

# compare_check IMAGE: qcowctl check (exit code, text, --json) agrees with
# qemu-img check.
compare_check() {
	local img=$1 qrc=0 crc=0 jrc=0 key q c
	qemu-img check --output=json "$img" >"$T/qc.json" 2>/dev/null || qrc=$?
	"$QCOWCTL" check "$img" >"$T/cc.txt" 2>&1 || crc=$?
	"$QCOWCTL" check --json "$img" >"$T/cc.json" 2>"$T/cc.err" || jrc=$?
	[ $crc = $qrc ] || fail "$img: qemu-img check exits $qrc, qcowctl check exits $crc: $(cat "$T/cc.txt")"
	[ $jrc = $qrc ] || fail "$img: qemu-img check exits $qrc, qcowctl check --json exits $jrc"
	python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$T/cc.json" ||
		fail "qcowctl check --json $img: not valid JSON: $(head -c 500 "$T/cc.json")"
	for key in corruptions leaks total-clusters allocated-clusters image-end-offset; do
		q=$(jfield "$T/qc.json" "$key") || q=0 # qemu-img omits zero counts
		c=$(jfield "$T/cc.json" "$key") || c=0
		case $key in
		corruptions)
			# the number of problems is counted differently; both must agree
			# whether there are any
			[ $((q > 0)) = $((c > 0)) ] || fail "$img: corruptions: qemu-img $q, qcowctl $c"
			;;
		*) [ "$q" = "$c" ] || fail "$img: check $key: qemu-img says $q, qcowctl check --json says $c" ;;
		esac
	done
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

# defaults: 64 KiB clusters, compat 1.1, 16-bit refcounts; a size suffix
"$QCOWCTL" create -s 64M "$T/default.qcow2" >/dev/null || fail "qcowctl create -s 64M failed"
qcheck "$T/default.qcow2"
qemu-img info --output=json "$T/default.qcow2" >"$T/qi.json"
[ "$(jfield "$T/qi.json" virtual-size)" = $((64 << 20)) ] || fail "create -s 64M: size $(jfield "$T/qi.json" virtual-size)"
[ "$(jfield "$T/qi.json" cluster-size)" = 65536 ] || fail "default cluster size is $(jfield "$T/qi.json" cluster-size), not 65536"
[ "$(jfield "$T/qi.json" format-specific.data.compat)" = 1.1 ] || fail "default compat is not 1.1"
[ "$(jfield "$T/qi.json" format-specific.data.refcount-bits)" = 16 ] || fail "default refcount bits is not 16"

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
python3 "$MKBAD" leak "$QIMG"
compare_check "$QIMG"
compare_info "$QIMG"
qimg refcount_bits=1 64M 'write -P 0x11 0 1M'
python3 "$MKBAD" leak "$QIMG"
compare_check "$QIMG"
qimg "" 64M 'write -P 0x11 0 1M'
python3 "$MKBAD" refcount-too-low "$QIMG"
compare_check "$QIMG"
qimg compat=0.10 64M 'write -P 0x11 0 1M'
python3 "$MKBAD" refcount-too-low "$QIMG"
compare_check "$QIMG"
qimg "" 64M 'write -P 0x11 0 1M'
python3 "$MKBAD" dirty "$QIMG"
compare_info "$QIMG"
qimg "" 64M 'write -P 0x11 0 1M'
python3 "$MKBAD" corrupt "$QIMG"
compare_info "$QIMG"

# check must not change the image, and a bad image makes it fail clearly
sum=$(sha "$QIMG")
"$QCOWCTL" check "$QIMG" >/dev/null 2>&1 || true
[ "$(sha "$QIMG")" = "$sum" ] || fail "qcowctl check changed the image"
cp "$QIMG" "$T/magic.qcow2"
python3 "$MKBAD" magic "$T/magic.qcow2"
for sub in info check; do
	rc=0
	"$QCOWCTL" $sub "$T/magic.qcow2" >"$T/out" 2>&1 || rc=$?
	[ $rc != 0 ] || fail "qcowctl $sub of a file with a bad magic exited 0"
	[ -s "$T/out" ] || fail "qcowctl $sub of a file with a bad magic: no message"
done

log "ok"
