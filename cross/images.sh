#!/usr/bin/env bash
# Makes the build images that `cross` uses (cross/Cross.toml), offline from any registry:
# the Debian base (cross/base-image.sh), then cross/images/Containerfile (one image for both
# ARM targets).   cross/images.sh      (existing images are kept)
# ENGINE=podman to use podman.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-docker}
cross/base-image.sh
image=localhost/fluidlet-cross:bookworm
if "$engine" image inspect "$image" >/dev/null 2>&1; then
    echo "$image already exists"
    exit 0
fi
"$engine" build -q -t "$image" -f cross/images/Containerfile cross >/dev/null
echo "$image built"
