#!/usr/bin/env bash
# Prints the stripped size of the gateway binary for each target, and the largest
# contributors (crates) to it. Usage: cross/footprint.sh [x86_64 aarch64 armv7]
# Contributors come from cargo-bloat (installed on first use) on an unstripped build for the
# first target that builds; the sizes of the stripped binaries are the ones to ship.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("${@:-x86_64 aarch64 armv7}")
read -r -a targets <<<"${targets[*]}"
printf '| target | stripped bytes | MiB |\n| --- | --- | --- |\n'
for t in "${targets[@]}"; do
    if out=$(cross/gateway-build.sh "$t" 2>/tmp/fluidlet-footprint-$t.log); then
        bytes=$(cut -f2 <<<"$out" | cut -d' ' -f1)
        printf '| %s | %s | %s |\n' "$t" "$bytes" "$(awk -v b="$bytes" 'BEGIN{printf "%.2f", b/1048576}')"
    else
        printf '| %s | build failed (see /tmp/fluidlet-footprint-%s.log) | |\n' "$t" "$t"
    fi
done
command -v cargo-bloat >/dev/null 2>&1 || cargo install --locked cargo-bloat >&2
triple() { case "$1" in x86_64) echo x86_64-unknown-linux-musl ;; aarch64) echo aarch64-unknown-linux-musl ;; *) echo "" ;; esac; }
t=$(triple "${targets[0]}")
[ -n "$t" ] || t=x86_64-unknown-linux-musl
echo
echo "largest contributors ($t, unstripped build; .text section):"
echo '```text'
CARGO_PROFILE_RELEASE_STRIP=false cargo bloat --release -p fluidlet --no-default-features \
    --target "$t" --target-dir target/bloat --crates -n 15 2>/dev/null
echo '```'
