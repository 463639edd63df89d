#!/usr/bin/env bash
# Builds the runtime image (cross/Containerfile) from a gateway binary built before, offline:
#   cross/runtime-image.sh aarch64|armv7|x86_64 [TAG]
#       (default localhost/fluidlet:arm64, :armv7 or :amd64)
# x86_64 takes the binary of `cargo build --release --target x86_64-unknown-linux-musl -p
# fluidlet` (static; the containerised tests run their nodes in it, tests/tests/bridged.rs).
# Prints the image's tag and size. ENGINE=podman to use podman.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-docker}
case "${1:-}" in
    aarch64) target=aarch64-unknown-linux-musl; platform=linux/arm64; tag=arm64 ;;
    armv7) target=armv7-unknown-linux-musleabihf; platform=linux/arm/v7; tag=armv7 ;;
    x86_64) target=x86_64-unknown-linux-musl; platform=linux/amd64; tag=amd64 ;;
    *) echo "usage: $0 aarch64|armv7|x86_64 [TAG]" >&2; exit 2 ;;
esac
image=${2:-localhost/fluidlet:$tag}
bin=target/$target/release/fluidlet
if [ "$1" = x86_64 ]; then
    hint="cargo build --release --target x86_64-unknown-linux-musl -p fluidlet"
else
    hint="cross/gateway-build.sh [--cross] $1"
fi
[ -f "$bin" ] || { echo "missing $bin: run $hint" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
install -m 0755 "$bin" "$ctx/fluidlet"
install -m 0644 packaging/agent.toml "$ctx/agent.toml"
install -d -m 0755 "$ctx/tls"
install -d -m 0755 "$ctx/state"
install -d -m 0700 "$ctx/state/fluidlet"
"$engine" build -q --platform "$platform" -t "$image" -f cross/Containerfile "$ctx" >/dev/null
size=$("$engine" image inspect -f '{{.Size}}' "$image")
printf '%s\t%s bytes (%s)\n' "$image" "$size" "$platform"
