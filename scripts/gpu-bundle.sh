#!/usr/bin/env bash
# Builds what a GPU machine needs for deploy/gpu-check.sh (it has no Rust
# toolchain and no internet): the stripped release binary and the small
# fixtures, in gpu-bundle/ (git-ignored; pass it as `carry`).
#
#   scripts/gpu-bundle.sh        # then, on the GPU machine: bash deploy/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${ZEROSHARD_SHARED:-$(cd .. && pwd)/shared}"
if [ ! -d "$shared/models" ] || [ ! -d "$shared/refs" ]; then
  echo "gpu-bundle: fixtures missing: $shared/models and /refs (set ZEROSHARD_SHARED)" >&2
  exit 1
fi

cargo build --release --bin zeroshard
bin="${CARGO_TARGET_DIR:-target}/release/zeroshard"

rm -rf gpu-bundle
mkdir -p gpu-bundle/models
cp "$bin" gpu-bundle/zeroshard
strip gpu-bundle/zeroshard
cp -r "$shared"/models/stories260K* "$shared/models/fixtures" gpu-bundle/models/
cp -r "$shared/refs" gpu-bundle/refs
git rev-parse --short HEAD > gpu-bundle/commit 2>/dev/null || echo unknown > gpu-bundle/commit

bytes=$(du -sb gpu-bundle | cut -f1)
limit=$((60 << 20))
echo "gpu-bundle: $((bytes >> 20)) MiB ($(cat gpu-bundle/commit))"
if [ "$bytes" -ge "$limit" ]; then
  echo "gpu-bundle: $bytes bytes is over the 60 MiB a device call carries" >&2
  exit 1
fi
