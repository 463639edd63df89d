#!/usr/bin/env bash
# Builds the images of the containerised domain test (tests/tests/bridged.rs), offline from any
# registry, and prints the environment that test reads:
#   cross/test-images.sh      ->  FLUIDLET_BROKER_IMAGE=localhost/fluidlet-mosquitto:bookworm
#                                 FLUIDLET_NODE_IMAGE=localhost/fluidlet:amd64
# - the Debian base (cross/base-image.sh; kept if it exists);
# - the domain broker (broker-config/image/Containerfile: Debian's mosquitto and the
#   retained-storage plugin), rebuilt every time (the plugin's source may have changed);
# - the x86_64 node: `cargo build --release --target x86_64-unknown-linux-musl -p fluidlet`
#   (needs musl-tools and the rustup target), then cross/runtime-image.sh x86_64.
# Runs as root (debootstrap, the engine). ENGINE=podman to use podman.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-docker}
broker=localhost/fluidlet-mosquitto:bookworm
node=localhost/fluidlet:amd64
cross/base-image.sh >&2
"$engine" build -q -t "$broker" -f broker-config/image/Containerfile broker-config >/dev/null
echo "$broker built" >&2
cargo build --release --target x86_64-unknown-linux-musl -p fluidlet >&2
cross/runtime-image.sh x86_64 "$node" >&2
echo "FLUIDLET_BROKER_IMAGE=$broker"
echo "FLUIDLET_NODE_IMAGE=$node"
