#!/usr/bin/env bash
# Build the cargo-fuzz targets and run each for a bounded time.
#   bash fuzz/run.sh [SECONDS] [TARGET...]
# SECONDS per target (default 20: what CI runs); longer runs, e.g. `bash fuzz/run.sh 3600`,
# are the same command. New inputs go to fuzz/work/TARGET (not committed); the seeds in
# fuzz/corpus/TARGET are read too. A crash stops the run with its input in
# fuzz/artifacts/TARGET/: fix it, then keep the input in fuzz/regressions/TARGET/, which the
# ordinary test suite replays (src/fuzzing.rs).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(csr access_token jwks policy request_head cert_files join_token)
fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# libFuzzer needs the sanitizer flags (-Z), which only a nightly compiler takes. The machine
# has one toolchain, a stable one: RUSTC_BOOTSTRAP lets it take them (its standard library
# ships the sanitizer runtimes).
export RUSTC_BOOTSTRAP=1
# Debug assertions on: an arithmetic overflow is a crash too. No sanitizer by default: the
# targets run safe Rust (unsafe_code is forbidden in the workspace), and without one the build
# is shorter and the runs twice as fast; FUZZ_SANITIZER=address adds AddressSanitizer.
sanitizer=${FUZZ_SANITIZER:-none}
flags=(--debug-assertions --sanitizer "$sanitizer")
cargo fuzz build "${flags[@]}"

mkdir -p work
printf '%-14s %12s %10s %8s\n' target executions "exec/s" corpus | tee work/summary.txt
for t in "${targets[@]}"; do
  mkdir -p "work/$t"
  log="work/$t.log"
  if ! cargo fuzz run "${flags[@]}" "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=16384 -timeout=10 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $t failed: its input is in fuzz/artifacts/$t/ (see above)" >&2
    exit 1
  fi
  execs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$log" | tail -n 1)
  rate=$(awk '/stat::average_exec_per_sec/ { print $NF }' "$log" | tail -n 1)
  size=$(find "work/$t" "corpus/$t" -type f | wc -l)
  printf '%-14s %12s %10s %8s\n' "$t" "$execs" "$rate" "$size" | tee -a work/summary.txt
done
