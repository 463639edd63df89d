#!/usr/bin/env bash
# Makes the local Debian 12 base image that the build images (cross/images/) start FROM, with
# no registry: debootstrap a minimal root file system from Debian's mirror, then import it.
#   cross/base-image.sh [IMAGE]        (default localhost/fluidlet-debian:bookworm)
# Does nothing if the image exists. Runs as root (debootstrap). ENGINE=podman to use podman.
# The mirror is the one apt already uses on this host (MIRROR=... to choose another).
set -euo pipefail
image=${1:-localhost/fluidlet-debian:bookworm}
engine=${ENGINE:-docker}
if "$engine" image inspect "$image" >/dev/null 2>&1; then
    echo "$image already exists"
    exit 0
fi
if [ -z "${MIRROR:-}" ]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        [ -f "$f" ] || continue
        MIRROR=$(sed -n -e 's/^URIs: *\([^ ]*\/debian\)$/\1/p' \
            -e 's/^deb \([^ ]*\/debian\) bookworm .*/\1/p' "$f" | head -n 1)
        [ -n "$MIRROR" ] && break
    done
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install --no-install-recommends debootstrap" >&2
    exit 1
}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
# The image's apt uses the same mirror; no caches or lists in the layer.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$engine" import - "$image" >/dev/null
echo "$image imported from $MIRROR"
