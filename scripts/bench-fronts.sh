#!/usr/bin/env bash
# The HTTP front against gRPC on one local cluster, in one run: starts
# `up --http-listen`, runs `zeroshard bench-fronts` against both of its fronts,
# stops the cluster. Extra arguments go to bench-fronts; UP_FLAGS to `up`
# (UP_FLAGS=--insecure: plaintext gRPC, as the HTTP front is).
#
#   scripts/bench-fronts.sh [MODEL_DIR] [-- bench-fronts flags]
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-${ZEROSHARD_SHARED:-../shared}/models/stories260K}"
shift || true
[ "${1:-}" = "--" ] && shift
cargo build --release --quiet
bin=target/release/zeroshard
out=$(mktemp)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$out"' EXIT
# shellcheck disable=SC2086
"$bin" up --model "$model" --workers 2 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 ${UP_FLAGS:-} >"$out" 2>/dev/null &
pid=$!
for _ in $(seq 1 600); do
  grep -q '^credentials ' "$out" && break
  case " ${UP_FLAGS:-} " in *" --insecure "*) grep -q '^http ' "$out" && break ;; esac
  kill -0 "$pid" 2>/dev/null || { echo "bench-fronts.sh: up exited" >&2; exit 1; }
  sleep 0.1
done
endpoint=$(awk '/^ready /{print $2; exit}' "$out")
http=$(awk '/^http /{print $2; exit}' "$out")
[ -n "$endpoint" ] && [ -n "$http" ] || { echo "bench-fronts.sh: no ready/http line from up" >&2; exit 1; }
echo "cluster: $endpoint, HTTP front $http, model $(basename "$model"), 2 workers"
# The HTTP front's key `up` made, in the client bundle (none with --insecure).
bundle=$(awk '/^credentials /{print $2; exit}' "$out")
key=()
[ -n "$bundle" ] && [ -f "$bundle/api-key" ] && key=(--api-key-file "$bundle/api-key")
"$bin" bench-fronts --endpoint "$endpoint" --http "$http" --model "$(basename "$model")" "${key[@]}" "$@"
