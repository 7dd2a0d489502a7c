#!/usr/bin/env bash
# t005-engine-layers.sh - the engine is layered, with no call cycles.
#
# doc/design.md ("Files and layers") orders the engine's files from the
# leaves (memory, log, bitmaps, map, cache, backends) through the services
# (in-flight registry, allocation, tables, scan) to the flush protocol,
# table relocation, the recycler and the API.  A file may call only files
# earlier in that order (or itself), so no call can go back up and no
# cycle can form.  This test reads the symbols each object file of libqcow
# defines and uses (nm) and fails on any call against the order, and on a
# file missing from the order.
. "$(dirname "$0")/lib.sh"

need nm

# lowest first; the same list as doc/design.md
order=(
	qcow_mem qcow_log qcow_bitmap qcow_refcount qcow_header
	qcow_lock qcow_io_mem qcow_io_file qcow_io_fault
	qcow_map qcow_cache qcow_health qcow_chain
	qcow_inflight qcow_datafile qcow_alloc qcow_compress qcow_tables qcow_scan qcow_repack
	qcow_flush qcow_relocate qcow_snapshot qcow_persistent_bitmap qcow_recycler
	qcow_sparsify qcow_image qcow_imgmap qcow_open qcow_create qcow_check qcow_stats_text
)

objdir=$top_builddir/src/lib
[ -f "$objdir/libqcow.a" ] || fail "no $objdir/libqcow.a: build first"
nm_out=$T/nm.txt
# one line per symbol: OBJECT TYPE NAME, from the archive (members named
# like the sources, whatever prefix automake gives the objects)
nm -A "$objdir/libqcow.a" | sed -E 's|^[^:]*:([^:]*):[0-9a-f ]* ([A-Za-z]) (.*)$|\1 \2 \3|' |
	sed -E 's|^(libqcow_a-)?([a-z_0-9]+)\.o |\2 |' >"$nm_out"

declare -A rank=() owner=()
for i in "${!order[@]}"; do rank[${order[$i]}]=$i; done

bad=0
while read -r obj type sym; do
	case $type in
	[TDBR]) owner[$sym]=$obj ;;
	esac
	[ -n "${rank[$obj]+x}" ] || { echo "libqcow file $obj.c is not in the layer order (t005, doc/design.md)"; bad=1; rank[$obj]=-1; }
done <"$nm_out"

while read -r obj type sym; do
	[ "$type" = U ] || continue
	def=${owner[$sym]:-}
	[ -n "$def" ] && [ "$def" != "$obj" ] || continue
	if [ "${rank[$def]}" -gt "${rank[$obj]}" ]; then
		echo "$obj.c calls $sym of $def.c, a file above it"
		bad=1
	fi
done <"$nm_out"

[ "$bad" = 0 ] || fail "the engine's calls do not follow its layers"
log "$(awk '$2=="U"' "$nm_out" | wc -l) references checked across ${#order[@]} files: no call goes up"
