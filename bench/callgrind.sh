#!/usr/bin/env bash
# Instructions per reservation, counted by valgrind's callgrind (repeatable on a noisy
# machine: counts, not seconds). Prints figures; asserts nothing.
#
#   bench/callgrind.sh [REV]
#
# tables: `bench/examples/tables_probe.rs reserve N` (the provider's tables alone, groups of
# 16 reservations, one flush + fdatasync per group) run for N1 and N2 reservations; the
# figure is the marginal cost, (I(N2) - I(N1)) / (N2 - N1), so that opening the database
# and start-up do not count. With REV (a commit, e.g. 04a7442) the same is measured for the
# probe as it was at REV, built in a temporary worktree, for a before/after in one run.
# N1, N2: 1000 and 3000 unless set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
n1=${N1:-1000}
n2=${N2:-3000}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Builds the probe of the tree at $1 into $2/target and prints its path.
build() {
    CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_PROFILE_RELEASE_STRIP=false \
        cargo build --quiet --release -p fluidlet-bench --example tables_probe \
        --manifest-path "$1/Cargo.toml" --target-dir "$2" >&2
    echo "$2/release/examples/tables_probe"
}

# Instructions callgrind collected running `$1 reserve $2`, per thread: prints the main
# thread's count and all threads' together. sled's flushes run partly on its own threads,
# and valgrind runs one thread at a time, so their counts move from run to run (a thread
# that waits spins until valgrind switches); the main thread's, which does every decision
# and every write, is the repeatable figure.
count() {
    rm -f "$out"/cg*
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/cg" \
        "$1" reserve "$2" >/dev/null 2>&1
    local main all
    main=$(sed -n 's/^summary: //p' "$out/cg-01")
    all=$(cat "$out"/cg-* | sed -n 's/^summary: //p' | awk '{s += $1} END {print s}')
    echo "$main $all"
}

measure() {
    local probe=$1 label=$2 m1 a1 m2 a2
    read -r m1 a1 <<<"$(count "$probe" "$n1")"
    read -r m2 a2 <<<"$(count "$probe" "$n2")"
    printf '| %s | %s | %s | %s | %s |\n' "$label" "$m1" "$m2" \
        "$(( (m2 - m1) / (n2 - n1) ))" "$(( (a2 - a1) / (n2 - n1) ))"
}

printf '| tables probe | main thread, %s reservations | %s reservations | per reservation, main thread (marginal) | per reservation, all threads (marginal) |\n| --- | --- | --- | --- | --- |\n' "$n1" "$n2"
measure "$(build . target/callgrind)" "this tree"
if [ -n "${1:-}" ]; then
    wt="$out/rev"
    git worktree add --quiet --detach "$wt" "$1"
    trap 'git worktree remove --force "$wt" >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
    measure "$(build "$wt" target/callgrind-rev)" "$1"
fi
