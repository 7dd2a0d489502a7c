#!/bin/sh
# autogen.sh - generate configure and Makefile.in from a git checkout.
# Needs autoconf, automake and pkg-config (for pkg.m4).  Then:
#   ./configure && make            (or build elsewhere: mkdir _build && cd _build && ../configure)
set -e
cd "$(dirname "$0")"
for tool in autoreconf aclocal automake pkg-config; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "autogen.sh: $tool not found; on Debian/Ubuntu: apt-get install autoconf automake pkg-config" >&2
		exit 1
	fi
done
mkdir -p m4 build-aux
autoreconf --force --install ${AUTOGEN_VERBOSE:+--verbose} "$@"
echo "autogen.sh: now run ./configure && make"
