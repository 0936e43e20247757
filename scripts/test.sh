#!/usr/bin/env bash
# Builds and runs every test: a Release build, then an AddressSanitizer +
# UndefinedBehaviorSanitizer build of the same suite. Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc)

echo "== release build and tests"
scripts/build.sh build
ctest --test-dir build --output-on-failure -j "$jobs"

echo "== sanitizer build (address, undefined) and tests"
scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMULTIPOLE_SANITIZE=address,undefined \
  -DMULTIPOLE_CUDA=OFF -DMULTIPOLE_BENCH=OFF
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 MULTIPOLE_TEST_SCALE=small \
  ctest --test-dir build-asan --output-on-failure -j "$jobs"
