#!/usr/bin/env bash
# Installs the Debian 12 packages the build and the tests need. Safe to re-run.
set -euo pipefail
packages=(g++ cmake ninja-build ccache pkg-config libfmt-dev libcli11-dev nlohmann-json3-dev
          libgtest-dev libgmock-dev libbenchmark-dev libpcre2-dev libutf8proc-dev python3-venv
          gnuplot-nox
          clang libclang-rt-14-dev)  # clang + libFuzzer for scripts/fuzz.sh
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
