#!/usr/bin/env bash
# NVIDIA's CUDA compiler wheels from PyPI, which run without a GPU or a
# driver: NVRTC 13 and NVRTC 12 (to compile the kernel sources as the CUDA
# backend does at start-up) and ptxas (to assemble the PTX and read each
# kernel's registers, spills and shared memory). Each wheel is installed, with
# its sha256 checked, in its own folder of a cache outside the repository:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/zeroshard/cuda-wheels/<package>-<version>/
#
# and <root>/env says where everything is:
#
#   NVRTC13_LIB=<folder holding libnvrtc.so.13>     NVRTC13_VERSION=<wheel version>
#   NVRTC12_LIB=<folder holding libnvrtc.so.12>     NVRTC12_VERSION=<wheel version>
#   PTXAS=<ptxas executable>                        PTXAS_VERSION=<wheel version>
#
# (one KEY=value a line). Prints the env file's path and nothing else on stdout.
#
#   ENV=$(scripts/cuda-wheels.sh)
#
# Exit status: 0 ready; 3 a wheel could not be downloaded (no network, no
# wheel for this platform, no pip): callers count their tests as skipped;
# 1 anything else (hash mismatch, a wheel without the expected files, ptxas
# that does not run). Once installed, a run reads only the cache (no network).
set -euo pipefail

root="${XDG_CACHE_HOME:-$HOME/.cache}/zeroshard/cuda-wheels"

# Pinned: the newest 13.x and 12.9.x. nvidia-cuda-nvcc 13.x ships ptxas itself
# (nvidia/cu13/bin/ptxas), so the CUDA 12 nvcc wheel is not needed. Two hashes
# each: the manylinux x86_64 and aarch64 wheels.
nvrtc13="nvidia-cuda-nvrtc==13.5.37"
nvrtc13_sha="86b4d68058807988b7d9af5b44917a0601e9c337f35ccd657bfb3c759ff8d8bc 36e4fa2a8ada293f5693d308e531c196ab6f91cf7a0ff479bf96a537d43a6096"
nvrtc12="nvidia-cuda-nvrtc-cu12==12.9.86"
nvrtc12_sha="210cf05005a447e29214e9ce50851e83fc5f4358df8b453155d5e1918094dcb4 096d4de6bda726415dfaf3198d4f5c522b8e70139c97feef5cd2ca6d4cd9cead"
nvcc13="nvidia-cuda-nvcc==13.5.37"
nvcc13_sha="f5c4f7ead5d964fb4af42bbf1e6d3ec3c1e6e9d83b53749f691d387e7fcaa3a7 588eda18eb5076ae859fe272844b526459228af22df0b117f54eec3aa82bc9c8"

want="$nvrtc13 $nvrtc13_sha
$nvrtc12 $nvrtc12_sha
$nvcc13 $nvcc13_sha"

fail() { # fail STATUS MESSAGE
  echo "cuda-wheels.sh: $2" >&2
  exit "$1"
}

mkdir -p "$root" || fail 1 "cannot create $root"
root="$(cd "$root" && pwd)"
env_file="$root/env"
stamp="$root/.zeroshard-wheels"

# Tests may call this concurrently: one installer at a time, and no reader
# while a folder is being replaced.
exec 9>"$root/.lock"
if command -v flock >/dev/null; then
  flock 9
fi

# The value of KEY in the env file.
env_get() { sed -n "s/^$1=//p" "$env_file" 2>/dev/null | head -n 1; }

# Everything present: the pinned list unchanged and the files the env names there.
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
  && [ -f "$(env_get NVRTC13_LIB)/libnvrtc.so.13" ] \
  && [ -f "$(env_get NVRTC12_LIB)/libnvrtc.so.12" ] \
  && [ -x "$(env_get PTXAS)" ]; then
  echo "$env_file"
  exit 0
fi
rm -f "$stamp"

if ! python3 -m pip --version >/dev/null 2>&1; then
  fail 3 "cannot get $nvrtc13: python3 -m pip is not available"
fi

# install REQUIREMENT "SHA256..." -> prints the folder it is installed in.
# A folder that already holds this exact requirement is kept.
install() {
  local req="$1" hashes="$2" dir mark tmp log why h
  dir="$root/${req/==/-}"
  mark="$dir/.zeroshard-wheel"
  if [ "$(cat "$mark" 2>/dev/null)" = "$req $hashes" ]; then
    echo "$dir"
    return
  fi
  echo "== installing $req into $dir" >&2
  rm -rf "$dir" "$dir.tmp"
  tmp="$dir.tmp"
  mkdir -p "$tmp"
  log="$tmp.log"
  {
    printf '%s' "$req"
    for h in $hashes; do printf ' --hash=sha256:%s' "$h"; done
    printf '\n'
  } >"$tmp.req"
  if ! python3 -m pip install --no-deps --only-binary=:all: --require-hashes --target "$tmp" \
    --disable-pip-version-check --no-input --timeout 20 --retries 2 -r "$tmp.req" >"$log" 2>&1; then
    rm -rf "$tmp" "$tmp.req"
    if grep -q "DO NOT MATCH THE HASHES" "$log"; then
      fail 1 "$req: the downloaded wheel does not match its pinned sha256 (pip log: $log)"
    fi
    if grep -qE "NewConnectionError|Failed to establish|Temporary failure in name resolution|Name or service not known|ConnectTimeout|ProxyError|Network is unreachable" "$log"; then
      why="no network (pip could not reach the package index)"
    else
      why="$(grep -E '^ERROR:' "$log" | tail -n 1 | sed 's/^ERROR: *//')"
      why="${why:-pip install failed}"
    fi
    fail 3 "cannot get $req: $why (pip log: $log)"
  fi
  rm -f "$tmp.req" "$log"
  echo "$req $hashes" >"$tmp/.zeroshard-wheel"
  mv "$tmp" "$dir"
  echo "$dir"
}

# find_one FOLDER NAME -> the path of the one file NAME under FOLDER.
find_one() {
  local hit
  hit="$(find "$1" -name "$2" \( -type f -o -type l \) -print -quit)"
  [ -n "$hit" ] || fail 1 "no $2 in $1 (the wheel's layout changed?)"
  echo "$hit"
}

dir13="$(install "$nvrtc13" "$nvrtc13_sha")"
dir12="$(install "$nvrtc12" "$nvrtc12_sha")"
dirnvcc="$(install "$nvcc13" "$nvcc13_sha")"

so13="$(find_one "$dir13" libnvrtc.so.13)"
so12="$(find_one "$dir12" libnvrtc.so.12)"
ptxas="$(find_one "$dirnvcc" ptxas)"
lib13="$(dirname "$so13")"
lib12="$(dirname "$so12")"

# libnvrtc loads libnvrtc-builtins.so.<major>.<minor> from its own folder ($ORIGIN).
ver13="${nvrtc13#*==}"
ver12="${nvrtc12#*==}"
vernvcc="${nvcc13#*==}"
mm13="$(echo "$ver13" | cut -d. -f1-2)"
mm12="$(echo "$ver12" | cut -d. -f1-2)"
[ -f "$lib13/libnvrtc-builtins.so.$mm13" ] || fail 1 "no libnvrtc-builtins.so.$mm13 next to libnvrtc.so.13 in $lib13"
[ -f "$lib12/libnvrtc-builtins.so.$mm12" ] || fail 1 "no libnvrtc-builtins.so.$mm12 next to libnvrtc.so.12 in $lib12"

[ -x "$ptxas" ] || chmod +x "$ptxas"
if ! out="$("$ptxas" --version 2>&1)"; then
  fail 1 "$ptxas --version failed: $(echo "$out" | tail -n 1)"
fi
mmnvcc="$(echo "$vernvcc" | cut -d. -f1-2)"
echo "$out" | grep -q "release $mmnvcc" || fail 1 "$ptxas is not release $mmnvcc: $(echo "$out" | tail -n 1)"

cat >"$env_file.tmp" <<EOF
NVRTC13_LIB=$lib13
NVRTC13_VERSION=$ver13
NVRTC12_LIB=$lib12
NVRTC12_VERSION=$ver12
PTXAS=$ptxas
PTXAS_VERSION=$vernvcc
EOF
mv "$env_file.tmp" "$env_file"
echo "$want" >"$stamp"
echo "$env_file"
