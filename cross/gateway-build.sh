#!/usr/bin/env bash
# Builds the static gateway binary (no demo, no embedded broker) for one target and prints
# its path and size:  cross/gateway-build.sh [--cross] aarch64|armv7|x86_64 [PACKAGE]
# PACKAGE is `fluidlet` by default; `fluidlet-size-floor` builds the dependency-stack floor
# (cross/size-floor) with the same flags, for the benchmark's size ratio.
# Needs the host tools listed at the top of .cargo/config.toml; with --cross (ARM targets),
# a container engine and `cross` instead: the build runs in the project's own build image
# (cross/Cross.toml, images made by cross/images.sh when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# The ARM gateway builds compile std from source with the release profile (fat LTO across
# std, opt-level z) and std's `optimize_for_size` feature (smaller sort and formatting code;
# panic messages are kept): 2,562,768 -> 2,298,152 bytes on aarch64. build-std is an unstable
# cargo flag; RUSTC_BOOTSTRAP lets the stable toolchain use it for this one build.
# FLUIDLET_PREBUILT_STD=1 builds aarch64 with rustup's prebuilt std instead.
# Every gateway build also leaves out unwind tables (`-C force-unwind-tables=no`): the
# release profile aborts on panic, so nothing ever unwinds, and the tables (.eh_frame and
# its index) were 389 kB of the 2,495,552-byte aarch64 binary. A panic still prints its
# message and location; only a RUST_BACKTRACE backtrace is lost. Given to cargo as a
# `--config` value so it joins the target's rustflags from .cargo/config.toml, for these
# builds only: the test builds (panic = unwind) need the tables.
# ring's C code needs musl's headers for the target (see .cargo/config.toml).
need_sysroot() {
    [ -f "/usr/local/lib/fluidlet/$1-musl/$2" ] || {
        echo "missing $1 musl sysroot: run cross/musl-sysroot.sh $1 (as root)" >&2
        exit 1
    }
}
cargo=(cargo)
if [ "${1:-}" = --cross ]; then
    shift
    case "${1:-}" in aarch64|armv7) ;; *) echo "--cross builds aarch64 or armv7" >&2; exit 2 ;; esac
    command -v cross >/dev/null || { echo "cross is missing: cargo install --locked cross --version 0.2.5" >&2; exit 1; }
    cross/images.sh >&2
    export CROSS_CONFIG=cross/Cross.toml
    # cross 0.2.5 looks for the toolchain in `rustup toolchain list` and does not recognise
    # rustup 1.28's "(active, default)" mark (cross-rs/cross#1678), so it runs `rustup
    # toolchain add stable`, which updates stable to the newest release mid-build. Naming the
    # toolchain by its path leaves the list's line as "(default)", which it does recognise:
    # cross then builds with the toolchain the host build uses, unchanged.
    RUSTUP_TOOLCHAIN=$(rustc --print sysroot)
    export RUSTUP_TOOLCHAIN
    # Both builds compile std from source, so the toolchain needs rust-src and no target's
    # prebuilt std; without this, cross runs `rustup target add` for armv7 (whose std is
    # not needed, and is not on every rustup mirror: CI failed on "component download
    # failed for rust-std-armv7-unknown-linux-musleabihf"). The toolchain is ours to keep.
    export CROSS_CUSTOM_TOOLCHAIN=1
    rustup component list --installed 2>/dev/null | grep -q '^rust-src' || {
        echo "rust-src is missing: rustup component add rust-src" >&2
        exit 1
    }
    # cargo in the image may download crates (build-std resolves std's own dependencies):
    # it trusts the host's certificate authorities, which include any TLS proxy's CA.
    [ -d /etc/ssl/certs ] && export CROSS_CONTAINER_OPTS="${CROSS_CONTAINER_OPTS:-} -v /etc/ssl/certs:/etc/ssl/certs:ro"
    cargo=(cross)
    need_sysroot() { :; }   # the image has it
fi
small_std=(-Z build-std=std,panic_abort -Z build-std-features=optimize_for_size)
package=${2:-fluidlet}
case "${1:-}" in
    x86_64) target=x86_64-unknown-linux-musl; extra=() ;;
    aarch64)
        target=aarch64-unknown-linux-musl
        need_sysroot aarch64 include/stdint.h
        if [ -n "${FLUIDLET_PREBUILT_STD:-}" ]; then extra=(); else
            export RUSTC_BOOTSTRAP=1
            extra=("${small_std[@]}")
        fi
        ;;
    armv7)
        target=armv7-unknown-linux-musleabihf
        # No prebuilt std for this target on the mirror: std is always built from source.
        need_sysroot armv7 libc.a
        export RUSTC_BOOTSTRAP=1
        extra=("${small_std[@]}")
        ;;
    *) echo "usage: $0 [--cross] x86_64|aarch64|armv7 [PACKAGE]" >&2; exit 2 ;;
esac
no_unwind="target.$target.rustflags=[\"-C\", \"force-unwind-tables=no\"]"
"${cargo[@]}" build --release -p "$package" --no-default-features --target "$target" \
    --config "$no_unwind" "${extra[@]}" >&2
bin="${CARGO_TARGET_DIR:-target}/$target/release/$package"
printf '%s\t%s bytes\n' "$bin" "$(stat -c %s "$bin")"
