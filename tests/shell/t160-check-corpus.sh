#!/bin/bash
# t160-check-corpus: `qcowctl check` gives the verdict class of `qemu-img
# check` (clean / leaks only / corrupt / not checked) on a mutant corpus,
# the engine refuses to open read-write every image QEMU calls corrupt, and
# an image QEMU accepts comes out of a read-write open and close clean.
#
# check_corpus.py builds the bases with qemu-img and qemu-io (plain v3 and
# v2, internal snapshots, compressed, a persistent bitmap with data,
# refcount widths 1/8/16/64, cluster sizes 512, 4K and 64K) and makes
# CORPUS_COUNT (default 2000) mutants of their metadata from a fixed seed
# (CORPUS_SEED, default 130); see its docstring.  Runs with two workers.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io
OPEN_RW=${QCOW_OPEN_RW:-$top_builddir/tests/helpers/qcow_open_rw}
[ -x "$OPEN_RW" ] || fail "helper $OPEN_RW is missing (make check builds it)"

seed=${CORPUS_SEED:-130}
count=${CORPUS_COUNT:-2000}
start=$(date +%s)
rc=0
$PYTHON "$TESTDIR/check_corpus.py" "$T" "$seed" "$count" "$QCOWCTL" "$OPEN_RW" 2 >"$T/corpus.out" 2>&1 || rc=$?
secs=$(($(date +%s) - start))
tail -n 5 "$T/corpus.out" >&2
if [ $rc != 0 ]; then
	head -n 60 "$T/corpus.out" >&2
	fail "the mutant corpus found disagreements (seed $seed, $count mutants)"
fi
grep -q "^agreement: $count of $count\$" "$T/corpus.out" || fail "agreement line missing: $(tail -n 5 "$T/corpus.out")"
log "ok: $count mutants agree with qemu-img check in $secs s"
