#!/usr/bin/env bash
# The crate graph and the gRPC edges, enforced (run by scripts/test.sh):
# 1. the coordinator links neither the engine (zeroshard-engine), the cluster
#    worker (zeroshard-worker) nor CUDA (cudarc); the engine links neither tokio
#    nor tonic (one process's forward pass);
# 2. generated protobuf types (`zeroshard_proto::v1`, `pb::`), the gRPC transport
#    settings (`zeroshard_proto::transport`) and `tonic::Status` appear only in
#    each crate's edge modules (the types of `zeroshard_security` — `Security`,
#    `Role`, `Address`, certificates — may be used anywhere):
#      offload/src/convert/, membership/src/convert.rs, worker/src/rpc/ (the engine, engine/src, names none),
#      coordinator/src/server/{grpc,control,shards,worker_client}.rs (the services and the
#      worker call), coordinator/src/{client,convert}.rs (the `query` client, the conversions)
#    (the proto and security crates themselves, the binary's tests and examples
#    are clients).
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0

deps=$(cargo tree -p zeroshard-coordinator -e normal,build --prefix none 2>/dev/null | awk '{print $1}' | sort -u)
if [ -z "$deps" ]; then
  echo "check-edges: cargo tree printed nothing for zeroshard-coordinator" >&2
  exit 1
fi
for banned in zeroshard-engine zeroshard-worker cudarc; do
  if grep -qx "$banned" <<<"$deps"; then
    echo "check-edges: zeroshard-coordinator depends on $banned:" >&2
    cargo tree -p zeroshard-coordinator -e normal,build -i "$banned" >&2 || true
    fail=1
  fi
done
for banned in zeroshard-engine zeroshard-worker zeroshard-coordinator cudarc; do
  if cargo tree -p zeroshard-membership -e normal,build --prefix none 2>/dev/null | awk '{print $1}' | grep -qx "$banned"; then
    echo "check-edges: zeroshard-membership depends on $banned" >&2
    fail=1
  fi
done
engine_deps=$(cargo tree -p zeroshard-engine -e normal,build --depth 1 --prefix none 2>/dev/null | awk '{print $1}' | sort -u)
for banned in tokio tonic zeroshard-proto zeroshard-membership; do
  if grep -qx "$banned" <<<"$engine_deps"; then
    echo "check-edges: zeroshard-engine depends directly on $banned (the engine is one process's forward pass)" >&2
    fail=1
  fi
done
if cargo tree -p zeroshard-offload -e normal,build --prefix none 2>/dev/null | awk '{print $1}' | grep -qx cudarc; then
  echo "check-edges: zeroshard-offload depends on cudarc (pinned memory belongs to the engine)" >&2
  fail=1
fi

allowed='^(offload/src/convert/|membership/src/convert\.rs$|worker/src/rpc/|coordinator/src/server/(grpc|control|shards|worker_client)\.rs$|coordinator/src/(client|convert)\.rs$)'
pattern='zeroshard_proto::(v1|transport)|zeroshard_proto as|tonic::Status|\bpb::'
leaks=$(grep -rlE "$pattern" --include='*.rs' offload/src membership/src engine/src worker/src coordinator/src src \
  | grep -Ev "$allowed" || true)
if [ -n "$leaks" ]; then
  echo "check-edges: protobuf types or tonic::Status outside the edge modules:" >&2
  for f in $leaks; do grep -nE "$pattern" "$f" | sed "s|^|  $f:|" >&2; done
  fail=1
fi

[ "$fail" = 0 ] && echo "check-edges: crate graph and gRPC edges as stated in docs/architecture.md"
exit "$fail"
