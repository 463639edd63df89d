#!/usr/bin/env bash
# Builds the agent as it was at git revision REV (the previous release, for the skew test
# tests/tests/skew.rs) and prints the path of its binary on stdout.
#
#   tests/old-release.sh REV
#
# The tree at REV is exported with `git archive` into a temporary directory (no worktree is
# registered, nothing is left behind) and built with `cargo build --release -p fluidlet` into
# target/old-release/REV/, which is kept: a commit never changes, so a second run with the same
# revision only prints the path. Without LTO and with parallel codegen: the test needs the old
# behaviour, not the gateway's size, and it builds in a fraction of the time.
#
# Fails loudly (exit 1) when REV is not a commit of this repository, for example in a shallow
# clone: the skew test must never be skipped for want of its old binary.
set -euo pipefail
rev=${1:?usage: tests/old-release.sh REV}
cd "$(dirname "$0")/.."
root=$(pwd)
if ! commit=$(git rev-parse --verify --quiet "$rev^{commit}"); then
    echo "tests/old-release.sh: '$rev' is not a commit of this repository (a shallow clone? fetch the history)" >&2
    exit 1
fi
short=$(git rev-parse --short=7 "$commit")
out="$root/target/old-release/$short"
bin="$out/target/release/fluidlet"
if [ -x "$bin" ] && [ "$(cat "$out/built-from" 2>/dev/null)" = "$commit" ]; then
    echo "$bin"
    exit 0
fi
rm -rf "$out/src"
mkdir -p "$out/src"
git archive "$commit" | tar -x -C "$out/src"
(
    cd "$out/src"
    CARGO_TARGET_DIR="$out/target" \
    CARGO_PROFILE_RELEASE_LTO=off \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        cargo build --release --locked -p fluidlet >&2
)
echo "$commit" > "$out/built-from"
echo "$bin"
