#!/usr/bin/env bash
# scripts/fuzz.sh — run pgmux's libFuzzer targets (fuzz/fuzz_targets/) for a
# given number of executions each, and report what they found.
#
# Not run by CI (it needs a nightly toolchain and takes minutes per target).
# Targets: frame (the frame scanner), startup (startup packet and the
# messages parsed with it), scram (SCRAM-SHA-256 both ways), tracker (the
# protocol tracker fed random client and server message sequences, its
# invariants asserted). A crash leaves its input in fuzz/artifacts/<target>/;
# rerun it with `cargo +nightly fuzz run <target> <file>`, fix, and add a
# regression test next to the code.
#
# Usage:
#   bash scripts/fuzz.sh                      # every target, 10,000,000 runs
#   RUNS=1000000 TARGETS="frame tracker" bash scripts/fuzz.sh
#
# Environment variables (defaults in brackets):
#   RUNS       executions per target (libFuzzer -runs)        [10000000]
#   TARGETS    space-separated targets              [frame startup scram tracker]
#   MAX_TIME   seconds per target at most (libFuzzer -max_total_time) [1800]
#   TOOLCHAIN  rustup toolchain with -Z flags (sanitizers)    [nightly]
#   SANITIZER  address | none (none: faster, no ASan)          [address]

set -euo pipefail
RUNS=${RUNS:-10000000}
TARGETS=${TARGETS:-frame startup scram tracker}
MAX_TIME=${MAX_TIME:-1800}
TOOLCHAIN=${TOOLCHAIN:-nightly}
SANITIZER=${SANITIZER:-address}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"

log() { printf '[fuzz %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
    log "toolchain $TOOLCHAIN missing: rustup toolchain install $TOOLCHAIN"
    exit 2
fi
if ! cargo fuzz --help >/dev/null 2>&1; then
    log "installing cargo-fuzz (cargo install cargo-fuzz)"
    cargo install --locked cargo-fuzz
fi

summary=()
status=0
for t in $TARGETS; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log "$t: building and running $RUNS executions (at most ${MAX_TIME}s)"
    out="artifacts/$t/run.log"
    rc=0
    cargo "+$TOOLCHAIN" fuzz run --sanitizer "$SANITIZER" --release "$t" "corpus/$t" -- \
        -runs="$RUNS" -max_total_time="$MAX_TIME" -print_final_stats=1 >"$out" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$out" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\).*/\1/p' "$out" | tail -n1)
    crashes=$(find "artifacts/$t" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
    if ((rc != 0)); then
        status=1
        log "$t: exit $rc; last lines:"
        tail -n 30 "$out" >&2
    fi
    summary+=("$(printf '%-8s executions %12s  (%s/s)  exit %s  crash/oom/timeout inputs %s' \
        "$t" "${execs:-?}" "${rate:-?}" "$rc" "$crashes")")
done
printf '%s\n' "${summary[@]}"
exit "$status"
