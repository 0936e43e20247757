#!/usr/bin/env bash
# Builds and runs every test: a Release build, then an AddressSanitizer +
# UndefinedBehaviorSanitizer build of the same suite. Fetches the real models the golden
# tests need first (scripts/fetch-models.sh, sha256-checked). Exits non-zero if any test
# fails, or if any test other than the CUDA ones (which need a GPU) was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc)
logs=$(mktemp -d)

echo "== real models for the golden tests"
scripts/fetch-models.sh smollm2-135m qwen2.5-coder-0.5b

echo "== test virtual environment (jinja2, the reference renderer of the chat-template tests)"
[[ -x .venv-test/bin/python ]] || python3 -m venv .venv-test
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check jinja2==3.1.6 MarkupSafe==3.0.3
export MULTIPOLE_TEST_PYTHON=$PWD/.venv-test/bin/python

# Runs ctest on a build folder; fails on a failed test or a skip that is not a CUDA test (a suite
# named Cuda*, also after a parameterised test's instantiation prefix: "Prefix/CudaSuite.Test/Case").
run_suite() {
  local dir=$1 exclude=$2 log=$logs/$(basename "$1").log
  shift 2
  env "$@" ctest --test-dir "$dir" --output-on-failure -j "$jobs" ${exclude:+-E "$exclude"} 2>&1 | tee "$log"
  local skipped
  skipped=$(grep -E '^\s+[0-9]+ - .*\(Skipped\)$' "$log" | grep -v -E ' - ([A-Za-z0-9_]+/)?Cuda' || true)
  if [[ -n $skipped ]]; then
    echo "error: tests were skipped that must run here:"
    echo "$skipped"
    return 1
  fi
}

echo "== release build and tests"
scripts/build.sh build
run_suite build '' MULTIPOLE_TEST_SCALE=full

echo "== sanitizer build (address, undefined) and tests"
scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMULTIPOLE_SANITIZE=address,undefined \
  -DMULTIPOLE_CUDA=OFF -DMULTIPOLE_BENCH=OFF
# The no-allocation checks interpose malloc, which the sanitizers own: they run in Release only.
run_suite build-asan 'DoesNotAllocate' ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 MULTIPOLE_TEST_SCALE=small

echo "== fuzzing the file parsers (safetensors, GGUF, tokenizer.json; libFuzzer with clang)"
scripts/fuzz.sh
