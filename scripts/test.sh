#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only the Rust toolchain:
# installs what is missing, checks formatting and lints, then runs every test
# in the `ci` profile: release code generation without link-time optimisation
# (the model math would crawl in debug; thin LTO of each test binary was most
# of the build). Figures come from `cargo build --release`, never from here.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --quick    # skip fmt and clippy
set -euo pipefail
cd "$(dirname "$0")/.."

export ZEROSHARD_SHARED="${ZEROSHARD_SHARED:-$(cd .. && pwd)/shared}"
if [ ! -d "$ZEROSHARD_SHARED/models" ] || [ ! -d "$ZEROSHARD_SHARED/refs" ]; then
  echo "test.sh: fixtures missing: $ZEROSHARD_SHARED/models and /refs (set ZEROSHARD_SHARED)" >&2
  exit 1
fi

if ! command -v cargo >/dev/null; then
  echo "test.sh: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi

quick=0
[ "${1:-}" = "--quick" ] && quick=1

# etcd for the membership tests (each test starts its own members on free
# loopback ports; the package's own service is not used).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
if ! command -v etcd >/dev/null && [ ! -x /usr/bin/etcd ]; then
  echo "== installing etcd-server"
  export DEBIAN_FRONTEND=noninteractive
  if ! { as_root apt-get install -y etcd-server >/dev/null 2>&1 \
      || { as_root apt-get update >/dev/null && as_root apt-get install -y etcd-server >/dev/null; }; }; then
    echo "test.sh: etcd not found and installing etcd-server failed (needs root or passwordless sudo," \
      "and apt); install etcd-server, or an etcd binary on PATH, and run again" >&2
    exit 1
  fi
  # Where an init system started the packaged service, stop it: nothing here needs it.
  as_root service etcd stop >/dev/null 2>&1 || true
fi

# A real one-node Slurm for the fleet-launch test (tests/integration/slurm.rs starts and
# stops its daemons itself).
echo "== Slurm packages"
scripts/local-slurm.sh install

if [ "$quick" = 0 ]; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --profile ci --workspace --all-targets --features zeroshard/fault-injection -- -D warnings
fi

echo "== crate graph and gRPC edges"
scripts/check-edges.sh

echo "== Kubernetes manifests (kustomize render + schema validation)"
scripts/check-k8s.sh

echo "== Python clients for the HTTP front (venv outside the repository)"
ZEROSHARD_PYTHON="$(scripts/py-venv.sh)"
export ZEROSHARD_PYTHON

# NVRTC 12.x and 13.x and ptxas, from PyPI's wheels, for tests/integration/kernels.rs's
# nvrtc_* tests; where the wheels cannot be had those tests are skipped and
# counted as skipped.
echo "== NVRTC and ptxas wheels"
skip=()
nvrtc_skipped=0
if ! wheels_err=$(scripts/cuda-wheels.sh 2>&1 >/dev/null); then
  nvrtc_skipped=$(grep -c '^fn nvrtc_' tests/integration/kernels.rs)
  echo "skipping $nvrtc_skipped nvrtc_* tests: $(echo "$wheels_err" | tail -1)"
  skip=(--skip nvrtc_)
fi

# The worker's fault-injection hooks are built in for the tests only (the
# integration tests drive failures through them); the binary checked at
# the end is built without them.
echo "== cargo test (ci profile, with fault injection)"
cargo test --profile ci --workspace --features zeroshard/fault-injection -- "${skip[@]}" 2>&1 | tee target/test.log
# One closing line that counts every test binary together.
# Only cargo's own "test result:" lines count (log lines such as "worker 1 failed" must not).
results=$(grep -E '^test result:' target/test.log || true)
passed=$(echo "$results" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(echo "$results" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
ignored=$(echo "$results" | grep -Eo '[0-9]+ ignored' | awk '{s+=$1} END {print s+0}')
ignored=$((ignored + nvrtc_skipped))

# The GPU check's harness, dry-run on the CPU (deploy/gpu-check.sh --device cpu):
# every row in its order, over a bundle of links to what was just built.
echo "== GPU check dry run"
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
engine_tests=$(cargo test --profile ci -p zeroshard-engine --lib --no-run --message-format=json 2>/dev/null \
  | grep '"executable":"' | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
ln -s "$(pwd)/target/ci/zeroshard" "$bundle/zeroshard"
[ -n "$engine_tests" ] && ln -s "$engine_tests" "$bundle/engine-tests"
ln -s "$ZEROSHARD_SHARED/models" "$bundle/models"
ln -s "$ZEROSHARD_SHARED/refs" "$bundle/refs"
dry_rc=0
GPU_CHECK_LOGS="$bundle/logs" bash deploy/gpu-check.sh --device cpu "$bundle" >target/gpu-check-dry.log 2>&1 || dry_rc=$?
cat target/gpu-check-dry.log
order='^rows: versions,ops(,model:[^,]+)+,cluster:streamed,cluster:resident,speed:resident,speed:offloaded,torch$'
if [ "$dry_rc" = 0 ] && grep -Eq "$order" target/gpu-check-dry.log && grep -q '^result: pass' target/gpu-check-dry.log; then
  passed=$((passed + 1))
  echo "gpu-check dry run: rows in order, passed"
else
  failed=$((failed + 1))
  echo "gpu-check dry run FAILED (exit $dry_rc, or rows out of order): see target/gpu-check-dry.log"
fi
# The binary a user builds carries no test hooks: rebuilt without the feature
# (same code as `--release`, in this script's profile: only the worker crate
# and the binary are rebuilt, no second LTO link), it names none of the fault
# flags or their variables.
echo "== binary without test hooks"
cargo build --profile ci -p zeroshard
hooks=$(grep -aci zeroshard_fault target/ci/zeroshard || true)
if [ "$hooks" = 0 ]; then
  passed=$((passed + 1))
  echo "release binary: no fault-injection hooks"
else
  failed=$((failed + 1))
  echo "release binary FAILED: $hooks lines name ZEROSHARD_FAULT (built with fault-injection?)"
fi
echo "total: $passed passed, $failed failed, $ignored skipped"
[ "$failed" = 0 ]
