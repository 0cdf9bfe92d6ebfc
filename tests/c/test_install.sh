#!/bin/sh
# `cmake --install` into a fresh prefix, then build and run a C program against the installed
# library the way a user would: cc app.c $(pkg-config --cflags --libs diffuse).
#
# Usage: test_install.sh BUILD_DIR TMP_BASE VERSION C_COMPILER
# Exit 0: passed; 1: failed (the reason on stderr); 77: skipped (no pkg-config).
set -eu

build=$1 tmp_base=$2 version=$3 cc=$4

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

command -v pkg-config >/dev/null 2>&1 || { echo "SKIPPED: pkg-config is not installed"; exit 77; }
mkdir -p "$tmp_base"
tmp=$(mktemp -d "$tmp_base/install_XXXXXX")
prefix=$tmp/prefix

cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log" >&2; fail "cmake --install $build --prefix $prefix"; }

# GNUInstallDirs gives lib, lib64 or lib/<multiarch>: find the .pc wherever it went.
pcs=$(find "$prefix" -name diffuse.pc -path '*/pkgconfig/*')
[ -n "$pcs" ] || fail "no diffuse.pc under $prefix"
[ "$(echo "$pcs" | wc -l)" -eq 1 ] || fail "several diffuse.pc under $prefix: $pcs"
PKG_CONFIG_PATH=$(dirname "$pcs")
export PKG_CONFIG_PATH
unset PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR 2>/dev/null || true

[ -x "$prefix/bin/diffuse" ] || fail "$prefix/bin/diffuse is missing"
"$prefix/bin/diffuse" --version >"$tmp/version.txt" 2>&1 || fail "the installed diffuse --version failed"
libdir=$(pkg-config --variable=libdir diffuse)
includedir=$(pkg-config --variable=includedir diffuse)
case $libdir in "$prefix"/*) ;; *) fail "pkg-config libdir $libdir is not under $prefix" ;; esac
[ "$includedir" = "$prefix/include" ] || fail "pkg-config includedir $includedir, expected $prefix/include"
[ -f "$includedir/diffuse.h" ] || fail "$includedir/diffuse.h is missing"
for f in libdiffuse.so "libdiffuse.so.${version%%.*}" "libdiffuse.so.$version"; do
    [ -e "$libdir/$f" ] || fail "$libdir/$f is missing"
done
[ -L "$libdir/libdiffuse.so" ] || fail "$libdir/libdiffuse.so is not a symlink"
got=$(pkg-config --modversion diffuse)
[ "$got" = "$version" ] || fail "pkg-config --modversion: $got, expected $version"

cat >"$tmp/app.c" <<'CEOF'
#include <diffuse.h>
#include <stdio.h>

int main(void) {
    struct diffuse_params p = diffuse_default_params();
    if (p.steps != 20 || p.batch_size != 1) return 1;
    printf("diffuse %s (C API %d)\n", diffuse_version(), DIFFUSE_API_VERSION);
    return 0;
}
CEOF
# shellcheck disable=SC2046  # pkg-config's flags are meant to be split
"$cc" -std=c11 -Wall -Wextra -Werror -o "$tmp/app" "$tmp/app.c" $(pkg-config --cflags --libs diffuse) \
    -Wl,-rpath,"$libdir" || fail "compiling against the installed library failed"
out=$("$tmp/app") || fail "the program exited with $?"
[ "$out" = "diffuse $version (C API 1)" ] || fail "the program printed '$out', expected 'diffuse $version (C API 1)'"
# It must have run the installed library, not the build tree's.
if command -v ldd >/dev/null 2>&1; then
    ldd "$tmp/app" | grep -q "$libdir/libdiffuse.so" || fail "the program did not load $libdir/libdiffuse.so: $(ldd "$tmp/app")"
fi

echo "install test: $prefix has bin/diffuse, ${libdir#"$prefix"/}/libdiffuse.so*, include/diffuse.h, diffuse.pc; app printed: $out"
rm -rf "$tmp"
