#!/usr/bin/env bash
# Collects what the armv7 musl build needs into /usr/local/lib/fluidlet/armv7-musl (the path
# .cargo/config.toml names): musl's crt objects, libc.a and headers (include/, for the C code of
# ring) from Debian's musl-dev:armhf, gcc's crtbegin/crtend, and gcc's libgcc_eh.a under the
# name libunwind.a. Runs as root (apt-get).
set -euo pipefail
dest=/usr/local/lib/fluidlet/armv7-musl
if [ -f "$dest/libc.a" ] && [ -f "$dest/libunwind.a" ] && [ -f "$dest/include/stdint.h" ]; then
    echo "armv7 musl sysroot already in $dest"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
command -v arm-linux-gnueabihf-gcc >/dev/null || apt-get install -y -qq --no-install-recommends gcc-arm-linux-gnueabihf
dpkg --add-architecture armhf
# A mirror that is mid-sync may fail one index (seen with bookworm-security armhf);
# the download below says clearly if musl:armhf is really missing.
apt-get update -qq || echo "warning: apt-get update reported errors; trying the download anyway"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq musl:armhf musl-dev:armhf)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
mkdir -p "$dest"
lib=$(dirname "$(find "$work/root" -name crt1.o | head -n 1)")
cp "$lib"/{crt1.o,crti.o,crtn.o,rcrt1.o,Scrt1.o,libc.a} "$dest/"
inc=$(dirname "$(find "$work/root" -path '*/include/*' -name stdint.h | grep -v /bits/ | head -n 1)")
rm -rf "$dest/include"
cp -r "$inc" "$dest/include"
gcclib=$(dirname "$(arm-linux-gnueabihf-gcc -print-libgcc-file-name)")
cp "$gcclib"/{crtbegin.o,crtend.o,crtbeginS.o,crtendS.o} "$dest/"
cp "$gcclib/libgcc_eh.a" "$dest/libunwind.a"
echo "armv7 musl sysroot ready in $dest"
