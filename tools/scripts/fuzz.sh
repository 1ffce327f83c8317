#!/usr/bin/env bash
# Runs one fuzz target (fuzz/fuzz_targets/TARGET.rs) with libFuzzer for SECONDS seconds and
# prints the executions and coverage reached. Builds what it needs: cargo-fuzz (installed
# with cargo if missing) and the fuzz crate in fuzz/target, with the stable toolchain
# (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags; see fuzz/README.md).
# Usage: tools/scripts/fuzz.sh TARGET SECONDS [libFuzzer options...]
#        tools/scripts/fuzz.sh --list
# The run starts from the committed seeds (fuzz/corpus/TARGET) and keeps what it learns in
# fuzz/work/TARGET (not committed); a crash, hang or OOM is written to fuzz/artifacts/TARGET/
# and the script exits non-zero. FUZZ_NICE (default 19) is the nice level.
set -euo pipefail
cd "$(dirname "$0")/../.."
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^vmsnap-fuzz$')
if [ "${1:-}" = --list ]; then echo "$targets"; exit 0; fi
if [ $# -lt 2 ] || ! grep -qx -- "$1" <<<"$targets" || ! [[ "$2" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 TARGET SECONDS [libFuzzer options...]   (targets: $(echo $targets))" >&2
    exit 2
fi
target=$1 secs=$2
shift 2
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# Safe Rust: no sanitizer (it halves the speed and finds nothing safe code can do); panics,
# overflows (debug assertions on) and the allocation limit below are what fail a run.
build=(--sanitizer none --debug-assertions)
nice -n "${FUZZ_NICE:-19}" cargo fuzz build "${build[@]}" "$target"
work=$PWD/fuzz/work/$target
mkdir -p "$work" "fuzz/artifacts/$target"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# 4 MiB inputs at most; no allocation over 256 MiB (the largest table QEMU accepts, an L1 of
# 32 MiB, fits easily); 10 s per input is a hang.
# The fuzzer's own exit status (non-zero on a crash, hang or OOM), not the filter's: with
# pipefail, `|| true` after the pipeline would replace PIPESTATUS with true's.
set +e
nice -n "${FUZZ_NICE:-19}" cargo fuzz run "${build[@]}" "$target" "$work" "$PWD/fuzz/corpus/$target" -- \
    -max_total_time="$secs" -max_len=4194304 -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -timeout=10 -print_final_stats=1 "$@" 2>&1 | tee "$log" | grep -E '^#[0-9]+.*(INITED|pulse|DONE)|^==|^(SUMMARY|Done)|panicked|artifact'
pipe=("${PIPESTATUS[@]}")
set -e
status=${pipe[0]}
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
echo "fuzz $target: ${execs:-?} executions in ${secs} s (${rate:-?}/s), ${cov:-cov: ?}, ${corp:-corp: ?}, exit ${status}"
exit "$status"
