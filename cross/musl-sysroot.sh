#!/usr/bin/env bash
# Collects musl's C headers and runtime for one ARM gateway target into
# /usr/local/lib/fluidlet/ARCH-musl (the paths .cargo/config.toml names), from Debian's
# musl-dev for that architecture. Runs as root (apt-get).
#   cross/musl-sysroot.sh aarch64|armv7
#
# Why: the gateway binaries are static musl builds, and ring (TLS) compiles C code for the
# target. Debian's cross compilers (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf) come
# without target C headers: the glibc ones (libc6-dev-*-cross) are only *recommended*, so they
# are absent under --no-install-recommends, and they would be the wrong libc for a musl binary
# anyway. So ring's C code is compiled against musl's headers (include/), the libc it is
# linked with.
#   aarch64: headers only; rustup's aarch64-unknown-linux-musl std ships musl's crt objects
#            and libc.a (self-contained linking).
#   armv7:   no prebuilt std exists, std is built from source, and the link needs musl's crt
#            objects and libc.a, gcc's crtbegin/crtend, and gcc's libgcc_eh.a under the name
#            libunwind.a, all collected here.
set -euo pipefail
case "${1:-}" in
    aarch64) debarch=arm64; gcc=aarch64-linux-gnu-gcc; pkg=gcc-aarch64-linux-gnu ;;
    armv7) debarch=armhf; gcc=arm-linux-gnueabihf-gcc; pkg=gcc-arm-linux-gnueabihf ;;
    *) echo "usage: $0 aarch64|armv7" >&2; exit 2 ;;
esac
dest=/usr/local/lib/fluidlet/$1-musl
ready() {
    [ -f "$dest/include/stdint.h" ] || return 1
    [ "$1" = aarch64 ] || { [ -f "$dest/libc.a" ] && [ -f "$dest/libunwind.a" ]; }
}
if ready "$1"; then
    echo "$1 musl sysroot already in $dest"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
command -v "$gcc" >/dev/null || apt-get install -y -qq --no-install-recommends "$pkg"
if ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
    dpkg --add-architecture "$debarch"
fi
# A mirror that is mid-sync may fail one index (seen with bookworm-security armhf);
# the download below says clearly if the package is really missing.
apt-get update -qq || echo "warning: apt-get update reported errors; trying the download anyway"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "musl:$debarch" "musl-dev:$debarch")
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
mkdir -p "$dest"
inc=$(dirname "$(find "$work/root" -path '*/include/*' -name stdint.h | grep -v /bits/ | head -n 1)")
rm -rf "$dest/include"
cp -r "$inc" "$dest/include"
if [ "$1" = armv7 ]; then
    lib=$(dirname "$(find "$work/root" -name crt1.o | head -n 1)")
    cp "$lib"/{crt1.o,crti.o,crtn.o,rcrt1.o,Scrt1.o,libc.a} "$dest/"
    gcclib=$(dirname "$("$gcc" -print-libgcc-file-name)")
    cp "$gcclib"/{crtbegin.o,crtend.o,crtbeginS.o,crtendS.o} "$dest/"
    cp "$gcclib/libgcc_eh.a" "$dest/libunwind.a"
fi
echo "$1 musl sysroot ready in $dest"
