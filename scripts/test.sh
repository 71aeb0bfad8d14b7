#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only the Rust toolchain:
# installs what is missing, checks formatting and lints, then runs every test
# (release mode: the model math would crawl in debug).
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

# A real one-node Slurm for the fleet-launch test (tests/slurm.rs starts and
# stops its daemons itself).
echo "== Slurm packages"
scripts/local-slurm.sh install

if [ "$quick" = 0 ]; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --release --workspace --all-targets -- -D warnings
fi

echo "== crate graph and gRPC edges"
scripts/check-edges.sh

echo "== Kubernetes manifests (kustomize render + schema validation)"
scripts/check-k8s.sh

echo "== Python clients for the HTTP front (venv outside the repository)"
ZEROSHARD_PYTHON="$(scripts/py-venv.sh)"
export ZEROSHARD_PYTHON

echo "== cargo test (release)"
cargo test --release --workspace 2>&1 | tee target/test.log
# One closing line that counts every test binary together.
# Only cargo's own "test result:" lines count (log lines such as "worker 1 failed" must not).
results=$(grep -E '^test result:' target/test.log || true)
passed=$(echo "$results" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(echo "$results" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
ignored=$(echo "$results" | grep -Eo '[0-9]+ ignored' | awk '{s+=$1} END {print s+0}')
echo "total: $passed passed, $failed failed, $ignored skipped"
