#!/usr/bin/env bash
# Run the cargo-fuzz targets in fuzz/ (fuzz/README.md says what each one
# drives).
#
#   scripts/fuzz.sh --ci             every target for CI_SECONDS (20 s) each,
#                                    one after another (2 min 20 s in all);
#                                    fails on any crash, leak or timeout
#   scripts/fuzz.sh [--hours N]      every target for N hours (default 1) each
#   scripts/fuzz.sh --target NAME    only NAME (with either mode)
#
# The checked-in seeds (fuzz/corpus/NAME) are read but never written: each
# run works on a copy in a temporary directory (kept, and its path printed,
# after a long run, so interesting inputs can be minimised into the seeds).
# A crash leaves its input in fuzz/artifacts/NAME/; replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a NAME fuzz/artifacts/NAME/crash-...`.
#
# The machine has the stable toolchain only: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass the nightly flags it needs (-Zsanitizer=address).
# scripts/install-test-deps.sh installs cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(blk_chain net_tx net_rx inflight_begin control_line presetup_config session_stream)
CI_SECONDS=${CI_SECONDS:-20}
mode=long
hours=1
only=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --ci) mode=ci ;;
    --hours)
        hours=${2:?--hours needs a number}
        shift
        ;;
    --target)
        only=${2:?--target needs a name}
        shift
        ;;
    *)
        echo "usage: $0 [--ci | --hours N] [--target NAME]" >&2
        exit 2
        ;;
    esac
    shift
done
if [[ -n "$only" ]]; then
    TARGETS=("$only")
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing (scripts/install-test-deps.sh installs it)" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1
if [[ $mode == ci ]]; then
    seconds=$CI_SECONDS
else
    seconds=$(awk -v h="$hours" 'BEGIN { printf "%d", h * 3600 }')
fi

# Release code with debug assertions: an arithmetic overflow is a crash.
FLAGS=(-O -a)
echo "fuzz: building ${only:-every target}"
if ! build_log=$(cargo fuzz build "${FLAGS[@]}" ${only:+"$only"} 2>&1); then
    echo "$build_log" >&2
    exit 1
fi

passed=0
failed=0
for target in "${TARGETS[@]}"; do
    work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-$target.XXXXXX")
    mkdir -p "fuzz/artifacts/$target"
    log="$work.log"
    echo "fuzz: $target for ${seconds} s (corpus copy in $work)"
    # -timeout: one input may take at most 10 s (a hang is a bug);
    # -rss_limit_mb: a bounded memory use.
    if cargo fuzz run "${FLAGS[@]}" "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1; then
        passed=$((passed + 1))
        stats=$(grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec|^stat::peak_rss_mb' "$log" |
            sed 's/^stat:://' | tr '\n' ' ')
        cov=$(grep -E '^#[0-9]+.*(DONE|pulse)' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
        echo "fuzz: $target ok: $stats$cov"
        if [[ $mode == ci ]]; then
            rm -rf "$work" "$log"
        fi
    else
        failed=$((failed + 1))
        echo "fuzz: $target FAILED; the last lines of $log:" >&2
        tail -n 40 "$log" >&2
        ls -1 "fuzz/artifacts/$target" >&2 || true
    fi
done
echo "fuzz: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
