#!/bin/bash
# t287-configure-deps: configure finds every library through pkg-config,
# and a missing one stops it with the Debian package to install (issue 8:
# "Link libzstd through pkg-config; configure fails with the Debian package
# name if it is missing"; the same rule holds for the others).
#
# For each library: a pkg-config directory holding the .pc files of all
# the others (copied from this system) but not this one, configure run
# against it (PKG_CONFIG_LIBDIR) in a scratch build folder: it must fail,
# name the pkg-config module and say "apt-get install PACKAGE".  A run with
# all of them must get past the library checks (the control: without it,
# a configure that fails for another reason would pass this test).
. "$(dirname "$0")/lib.sh"
need pkg-config

CONFIGURE=$top_srcdir/configure
[ -x "$CONFIGURE" ] || fail "no $CONFIGURE (run ./autogen.sh)"

# module:Debian package, as configure.ac requires them
deps=(fuse3:libfuse3-dev zlib:zlib1g-dev libzstd:libzstd-dev jemalloc:libjemalloc-dev)

mkdir -p "$T/all"
for d in "${deps[@]}"; do
	m=${d%%:*}
	dir=$(pkg-config --variable=pcfiledir "$m") || fail "setup: pkg-config does not know $m on this system"
	cp "$dir/$m.pc" "$T/all/"
done

# run_configure PCDIR: configure in a fresh folder; output in $T/cfg.out
run_configure() {
	rm -rf "$T/build"
	mkdir "$T/build"
	(cd "$T/build" && PKG_CONFIG_LIBDIR=$1 PKG_CONFIG_PATH= "$CONFIGURE" >"$T/cfg.out" 2>&1)
}

run_configure "$T/all" || fail "configure with every library failed: $(tail -n 5 "$T/cfg.out")"
log "configure with every library: ok"

for d in "${deps[@]}"; do
	m=${d%%:*}
	pkg=${d#*:}
	rm -rf "$T/pc"
	cp -r "$T/all" "$T/pc"
	rm "$T/pc/$m.pc"
	if run_configure "$T/pc"; then
		fail "configure without $m.pc succeeded"
	fi
	grep -q "could not find $m" "$T/cfg.out" ||
		fail "configure without $m does not name it: $(tail -n 5 "$T/cfg.out")"
	grep -q "apt-get install $pkg" "$T/cfg.out" ||
		fail "configure without $m does not say 'apt-get install $pkg': $(tail -n 5 "$T/cfg.out")"
	log "without $m: $(grep -m1 'apt-get install' "$T/cfg.out")"
done
log "ok"
