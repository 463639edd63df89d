#!/usr/bin/env bash
# Makes the build images that `cross` uses (cross/Cross.toml), offline from any registry:
# the Debian base (cross/base-image.sh), then cross/images/Containerfile for each target.
#   cross/images.sh [aarch64] [armv7]      (both by default; existing images are kept)
# ENGINE=podman to use podman.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-docker}
cross/base-image.sh
for arch in "${@:-aarch64 armv7}"; do
    for a in $arch; do
        image=localhost/fluidlet-cross:$a
        if "$engine" image inspect "$image" >/dev/null 2>&1; then
            echo "$image already exists"
            continue
        fi
        "$engine" build -q --build-arg ARCH="$a" -t "$image" -f cross/images/Containerfile cross >/dev/null
        echo "$image built"
    done
done
