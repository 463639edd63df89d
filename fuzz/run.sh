#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (60 by default) from the seed corpus of
# docs/protocol.md's examples, and prints one line per target: executions, time, crashes.
# Exits non-zero if a target crashed (the input is kept in fuzz/artifacts/TARGET/).
#   fuzz/run.sh [SECONDS]
# Needs cargo-fuzz (cargo install cargo-fuzz --locked) and a C++ compiler for libFuzzer. On a
# stable toolchain, RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its sanitizer flag.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
export RUSTC_BOOTSTRAP=1
cargo run -q --manifest-path ../Cargo.toml -p fluidlet --example protocol_examples -- --corpus corpus
# The seed corpus is shared by envelope and bodies, each from its own folder.
targets=(envelope bodies config)
cargo fuzz build >/dev/null 2>&1 || { cargo fuzz build; exit 1; }
status=0
for t in "${targets[@]}"; do
    log=$(mktemp)
    if cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        crashed=0
    else
        crashed=1
        status=1
        grep -E "panicked|ERROR|SUMMARY" "$log" | head -5 >&2
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    echo "fuzz $t: ${runs:-?} executions in ${took:-$secs} s, $crashed crash(es)"
    rm -f "$log"
done
exit $status
