#!/usr/bin/env bash
# Fuzzes the file parsers briefly: builds the libFuzzer targets of fuzz/ with clang into
# build-fuzz (AddressSanitizer + UndefinedBehaviorSanitizer), writes their seed corpora,
# then runs each for FUZZ_SECONDS (default 60). Exits non-zero on any crash, sanitizer
# report, leak, timeout or out-of-memory; the input that did it is kept in
# build-fuzz/artifacts/ and printed.
#   scripts/fuzz.sh [target ...]    targets: safetensors gguf tokenizer_json (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build-fuzz
seconds=${FUZZ_SECONDS:-60}
targets=("$@")
((${#targets[@]})) || targets=(safetensors gguf tokenizer_json)

CXX=${FUZZ_CXX:-clang++} cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_FUZZ=ON \
  -DMULTIPOLE_TESTS=OFF -DMULTIPOLE_BENCH=OFF -DMULTIPOLE_CUDA=OFF >/dev/null
cmake --build "$dir" --target fuzzers -j "$(nproc)"

rm -rf "$dir/seeds"
"$dir/fuzz/fuzz_make_seeds" "$dir/seeds"
mkdir -p "$dir/artifacts"
status=0
for t in "${targets[@]}"; do
  corpus=$dir/corpus/$t
  mkdir -p "$corpus"
  dict=()
  [[ -f fuzz/$t.dict ]] && dict=(-dict="fuzz/$t.dict")
  echo "== fuzzing $t for ${seconds}s"
  log=$dir/fuzz-$t.log
  # New inputs go to the first folder (kept between runs); the seeds are read only.
  if ! "$dir/fuzz/${t}_fuzzer" -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "${dict[@]}" -artifact_prefix="$dir/artifacts/$t-" "$corpus" "$dir/seeds/$t" >"$log" 2>&1; then
    status=1
    echo "error: the $t fuzzer found a failure:"
    grep -E -A30 '^==[0-9]+==ERROR|runtime error|deadly signal|uncaught exception|Test unit written' "$log" | head -60 || true
    echo "(full log: $log; reproduce with $dir/fuzz/${t}_fuzzer $dir/artifacts/$t-<file>)"
  else
    grep -E '^stat::(number_of_executed_units|new_units_added)|^#[0-9]+.*DONE' "$log" || true
  fi
done
exit $status
