#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for a bounded time with coverage guidance, on the stable
# toolchain (no cargo-fuzz or nightly needed): the same SanitizerCoverage instrumentation
# cargo-fuzz adds, without AddressSanitizer (which needs nightly). Safe Rust's bounds checks,
# overflow checks and debug assertions turn memory and logic errors into crashes that libFuzzer
# reports.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     # default 60 s, every target
#
# The corpus of each target grows in fuzz/corpus/TARGET (kept between runs, not committed);
# a crashing input is saved in fuzz/artifacts/TARGET/ and the script exits non-zero.
# The test command (tools/test-all.sh) only builds the targets; run this one nightly or before
# a release and keep its summary (executions, coverage, crashes) with the results.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^standby-fuzz$')
fi

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# With an explicit --target, RUSTFLAGS reach only the fuzz targets and their dependencies, not
# build scripts and proc macros (which would not link without libFuzzer's runtime).
host=$(rustc -vV | sed -n 's/^host: //p')
echo "== building ${targets[*]} with coverage instrumentation"
cargo build --release --locked --quiet --manifest-path fuzz/Cargo.toml --target-dir fuzz/target --target "$host"

status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    echo "== fuzzing $t for ${secs}s (log: $log)"
    if fuzz/target/"$host"/release/"$t" "fuzz/corpus/$t" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see $log and fuzz/artifacts/$t/)"
        status=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    summary+=("$(printf '%-20s %-8s executions %-12s coverage %-6s corpus %s' "$t" "$result" "${execs:-?}" "${cov:-?}" "$corpus")")
done
echo
printf '%s\n' "${summary[@]}"
exit $status
