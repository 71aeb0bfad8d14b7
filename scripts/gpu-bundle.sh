#!/usr/bin/env bash
# Builds what a GPU machine needs for deploy/gpu-check.sh (it has no Rust
# toolchain and no internet), in gpu-bundle/ (git-ignored; pass it as `carry`):
# the stripped release binary, the engine crate's unit-test binary (stripped,
# as engine-tests: the check's `ops` row runs its `cuda::` tests) and the small
# fixtures. Prints the bundle's size; fails over 60 MiB.
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
# The engine crate's unit tests, built but not run; cargo names the executable.
tests="$(cargo test --release -p zeroshard-engine --lib --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "zeroshard_engine":
        print(m["executable"])
')"
[ -x "$tests" ] || { echo "gpu-bundle: no zeroshard-engine test executable from cargo" >&2; exit 1; }

if [ -d gpu-bundle ]; then chmod -R u+w gpu-bundle; fi
rm -rf gpu-bundle
mkdir -p gpu-bundle/models
cp "$bin" gpu-bundle/zeroshard
strip gpu-bundle/zeroshard
cp "$tests" gpu-bundle/engine-tests
strip gpu-bundle/engine-tests
cp -r "$shared"/models/stories260K* "$shared/models/fixtures" gpu-bundle/models/
cp -r "$shared/refs" gpu-bundle/refs
chmod -R u+w gpu-bundle
git describe --always --dirty > gpu-bundle/commit 2>/dev/null || echo unknown > gpu-bundle/commit

bytes=$(du -sb gpu-bundle | cut -f1)
limit=$((60 << 20))
mib() { echo $(($(stat -c %s "$1") >> 20)); }
echo "gpu-bundle: $((bytes >> 20)) MiB of 60 ($bytes bytes; zeroshard $(mib gpu-bundle/zeroshard) MiB," \
  "engine-tests $(mib gpu-bundle/engine-tests) MiB; commit $(cat gpu-bundle/commit))"
if [ "$bytes" -ge "$limit" ]; then
  echo "gpu-bundle: $bytes bytes is over the 60 MiB a device call carries" >&2
  exit 1
fi
