#!/usr/bin/env bash
# Fuzzing campaign: builds the targets in fuzz/ with cargo-fuzz (libFuzzer
# and AddressSanitizer, on the nightly toolchain, into a build folder of
# their own) and runs each for FERRY_FUZZ_SECONDS (60 by default) on its
# corpus, fuzz/corpus/TARGET, which keeps the new inputs it finds. Prints
# the executions of each target and their total. A crash stops the run with
# the input in fuzz/artifacts/TARGET/: make it a regression test.
#
#   scripts/fuzz.sh                         # every target, 60 s each (the smoke run)
#   FERRY_FUZZ_SECONDS=900 scripts/fuzz.sh wire_frames manifest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
secs="${FERRY_FUZZ_SECONDS:-60}"
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
fuzz_target_dir="$CARGO_TARGET_DIR/fuzz"
mkdir -p "$fuzz_target_dir/logs"
total=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="$fuzz_target_dir/logs/$t.log"
  echo "fuzz: $t for ${secs}s" >&2
  if ! cargo +nightly fuzz run --fuzz-dir fuzz --target-dir "$fuzz_target_dir" "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED (log: $log; input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
  rate=$(grep -o 'exec/s: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  echo "$t: ${runs:-0} executions (${rate:-?} exec/s), corpus $(ls "fuzz/corpus/$t" | wc -l) inputs"
  total=$((total + ${runs:-0}))
done
echo "total: $total executions, no crash"
