#!/usr/bin/env bash
# zeroshard against llama.cpp on this machine: the same synthetic Llama (random f16
# weights, written by `zeroshard bench --write-checkpoint` and converted to a GGUF f16
# file), the same thread count, rounds interleaved so both see the same machine.
#
#   scripts/bench-peers.sh [SPEC]
#   SPLIT=2 scripts/bench-peers.sh [SPEC]    # the model split over 2 processes (below)
#
# SPEC defaults to llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000.
# Environment: ROUNDS (3), BATCHES (1,8,32; decode batch sizes), PROMPT_LEN (128),
# NEW_TOKENS (32), THREADS (all cores; under SPLIT, of each process: 1), ISA (unset: the
# best this CPU has; `avx2`: both engines held to AVX2 + FMA + F16C, as on a CPU without
# AVX-512: zeroshard through ZEROSHARD_CPU_ISA=avx2, llama.cpp built with GGML_NATIVE off
# and only those extensions), BIN (a zeroshard binary to run instead of the one `cargo
# build --release` makes; copied first, so a rebuild during the run changes nothing),
# SPLIT (unset or 1: each engine one process; N: below).
#
# llama.cpp is built from the source vendored in the PyPI sdist of llama-cpp-python
# (pinned below, checked against its sha256) with GGML_NATIVE (this CPU's instruction
# set), in a cache folder outside the repository, as are the checkpoint and the GGUF.
# The summary gives each figure's range over the rounds, the median of the per-round ratios
# and those ratios in round order. Figures compared:
#   prefill     zeroshard batch-1 prefill of PROMPT_LEN tokens | llama-bench pp<PROMPT_LEN>
#   decode b1   zeroshard batch-1 decode                       | llama-bench tg<NEW_TOKENS>
#   decode bN   zeroshard aggregate decode at batch N          | llama-batched-bench S_TG at N parallel sequences
#
# SPLIT=N (N >= 2): the model split over N processes on this machine, THREADS (1) threads
# each; every round runs, on the same checkpoint and GGUF:
#   zeroshard tensor ×N  `zeroshard bench --workers N --placement tensor --threads THREADS`
#                        (with --workers, --threads is each worker's)
#   llama.cpp RPC ×N     N `ggml-rpc-server -H 127.0.0.1 -p PORT -t THREADS` (free loopback
#                        ports), started for the round and stopped after it, and llama-bench
#                        and llama-batched-bench given `--rpc 127.0.0.1:PORT1,... -ngl 99
#                        -sm layer -ts 1/1/... -t THREADS` (batched-bench also -tb THREADS
#                        and -lv 4, which logs where the model went): the repeating layers in
#                        N contiguous runs, one per server, the output layer and the KV cache
#                        on the servers too; the local process keeps the token-embedding
#                        lookup and otherwise waits. The run stops unless batched-bench's log
#                        says every layer was offloaded, with a model buffer on each server,
#                        and llama-bench's JSON says RPC, all the servers, -ngl 99, -sm layer
#                        (llama-bench logs placement only with -v, which logs every step too).
#   zeroshard single     `zeroshard bench --threads N×THREADS`: one process on as many
#                        cores, for the split ÷ single column.
# This llama.cpp is another build, GGML_RPC on (with target ggml-rpc-server), in its own
# folder (the build folder's name + `-rpc`).
set -euo pipefail
cd "$(dirname "$0")/.."
spec=${1:-llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000}
rounds=${ROUNDS:-3}
batches=${BATCHES:-1,8,32}
prompt_len=${PROMPT_LEN:-128}
new_tokens=${NEW_TOKENS:-32}
split=${SPLIT:-1}
case "$split" in
  '' | *[!0-9]* | 0) echo "bench-peers: SPLIT must be a positive integer, not '$split'" >&2; exit 2 ;;
esac
if [ "$split" -gt 1 ]; then threads=${THREADS:-1}; else threads=${THREADS:-$(nproc)}; fi
isa_cap=${ISA:-}
case "$isa_cap" in
  "") cpu_flags=(-DGGML_NATIVE=ON) ;;
  avx2) cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF) ;;
  *) echo "bench-peers: ISA must be unset or avx2, not '$isa_cap'" >&2; exit 2 ;;
esac

version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$version.tar.gz
cache=${XDG_CACHE_HOME:-$HOME/.cache}/zeroshard/peers
mkdir -p "$cache"
log() { echo "== $*" >&2; }

# 1. The llama.cpp source.
src=$cache/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$src/CMakeLists.txt" ]; then
  log "downloading llama-cpp-python $version (sdist)"
  curl -sSfL -o "$cache/sdist.tar.gz" "$url"
  echo "$sha256  $cache/sdist.tar.gz" | sha256sum -c --quiet -
  tar xzf "$cache/sdist.tar.gz" -C "$cache"
  rm "$cache/sdist.tar.gz"
fi

# 2. cmake and the converter's packages, in a venv.
venv=$cache/venv
want="cmake==3.31.6 numpy==2.3.5 safetensors==0.7.0 pyyaml==6.0.3 tqdm==4.67.1 requests==2.32.5"
if [ "$(cat "$venv/.packages" 2>/dev/null)" != "$want" ]; then
  log "installing $want"
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $want
  echo "$want" >"$venv/.packages"
fi

# 3. llama-bench and llama-batched-bench, built for this CPU (one build per instruction set;
# under SPLIT another, with the RPC backend and its server, in a folder of its own).
isa=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|avx512_fp16|amx_tile|f16c|fma)$' | sort | tr '\n' '-')
[ -n "$isa_cap" ] && isa="cap-$isa_cap"
build=$cache/build-$version-$(echo "$isa" | sha256sum | cut -c1-12)
targets=(llama-bench llama-batched-bench)
what=$isa
if [ "$split" -gt 1 ]; then
  build=$build-rpc
  targets+=(ggml-rpc-server)
  cpu_flags+=(-DGGML_RPC=ON)
  what="$isa, RPC"
fi
if [ -n "$(for t in "${targets[@]}"; do [ -x "$build/bin/$t" ] || echo "$t"; done)" ]; then
  log "building llama.cpp ($what) in $build"
  "$venv/bin/cmake" -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${cpu_flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF >"$build.log" 2>&1 || { tail -20 "$build.log"; exit 1; }
  "$venv/bin/cmake" --build "$build" --target "${targets[@]}" -j "$(nproc)" >>"$build.log" 2>&1 \
    || { tail -20 "$build.log"; exit 1; }
fi

# 4. zeroshard (a copy, which a rebuild during the run leaves alone), the checkpoint and its GGUF.
out=$(mktemp -d)
rpc_pids=()
# Stops the RPC servers of the round, if any.
stop_rpc() {
  local pid
  for pid in "${rpc_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rpc_pids=()
}
trap 'stop_rpc; rm -rf "$out"' EXIT
trap 'exit 130' INT TERM
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p zeroshard
  BIN=target/release/zeroshard
fi
[ -x "$BIN" ] || { echo "bench-peers: BIN=$BIN is not an executable file" >&2; exit 2; }
zs=$out/zeroshard
cp "$BIN" "$zs"
model=$cache/models/$(echo "$spec" | sha256sum | cut -c1-12)
if [ ! -f "$model/model.gguf" ]; then
  rm -rf "$model"
  "$zs" bench --synthetic "$spec" --write-checkpoint "$model/hf" >&2
  "$venv/bin/python" scripts/peers/to_gguf.py "$src" "$model/hf" "$model/model.gguf.tmp"
  mv "$model/model.gguf.tmp" "$model/model.gguf"
fi

# 5. Interleaved rounds.
max_batch=$(echo "$batches" | tr ',' '\n' | sort -n | tail -1)
ctx=$((max_batch * (prompt_len + new_tokens)))
# How each engine runs: zeroshard's bench options, and llama-bench's and
# llama-batched-bench's (the latter also take -tb).
zs_args=()
zs_env=(RAYON_NUM_THREADS="$threads")
peer_args=(-t "$threads")
bb_args=()
ports=()
if [ "$split" -gt 1 ]; then
  zs_args=(--workers "$split" --placement tensor --threads "$threads")
  zs_env=()
  # Free loopback ports for the RPC servers, and the tensor split 1/1/...
  read -r -a ports <<<"$("$venv/bin/python" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$split")"
  endpoints=$(printf '127.0.0.1:%s,' "${ports[@]}")
  endpoints=${endpoints%,}
  tensor_split=$(printf '1/%.0s' "${ports[@]}")
  tensor_split=${tensor_split%/}
  peer_args=(--rpc "$endpoints" -ngl 99 -sm layer -ts "$tensor_split" -t "$threads")
  bb_args=(-lv 4)
fi
# zeroshard bench, to $out/NAME.ROUND.txt (its last line is JSON).
run_zs() {
  local name=$1 round=$2
  shift 2
  env ${isa_cap:+ZEROSHARD_CPU_ISA=$isa_cap} "${zs_env[@]}" "$zs" bench "$@" --model "$model/hf" --batch "$batches" \
    --prompt-len "$prompt_len" --new-tokens "$new_tokens" --json | tee "$out/$name.$round.txt" >&2
}
# Starts the RPC servers of round $1 and waits until each listens.
start_rpc() {
  local i
  for i in "${!ports[@]}"; do
    "$build/bin/ggml-rpc-server" -H 127.0.0.1 -p "${ports[$i]}" -t "$threads" >"$out/rpc.$1.$i.log" 2>&1 &
    rpc_pids+=($!)
  done
  for i in "${!ports[@]}"; do
    for _ in $(seq 100); do
      [ -n "$(ss -Hltn "sport = :${ports[$i]}")" ] && continue 2
      kill -0 "${rpc_pids[$i]}" 2>/dev/null || break
      sleep 0.1
    done
    echo "bench-peers: ggml-rpc-server on port ${ports[$i]} is not listening" >&2
    cat "$out/rpc.$1.$i.log" >&2
    exit 1
  done
}
# Stops unless round $1's llama.cpp runs had the model on the RPC servers: batched-bench's
# log says every layer was offloaded, with a model buffer on each server; llama-bench's
# JSON says RPC, every server, all layers, split by layer.
check_rpc() {
  local bb=$out/bb.$1.log offload port
  offload=$(grep -m1 -E 'offloaded [0-9]+/[0-9]+ layers' "$bb" || true)
  if ! [[ $offload =~ offloaded\ ([0-9]+)/([0-9]+)\ layers ]] || [ "${BASH_REMATCH[1]}" != "${BASH_REMATCH[2]}" ]; then
    echo "bench-peers: not every layer on the RPC servers (${offload:-no offload line}); $bb:" >&2
    grep -E 'load_tensors|RPC' "$bb" >&2 || tail -20 "$bb" >&2
    exit 1
  fi
  for port in "${ports[@]}"; do
    grep -qE "RPC[0-9]*\[127\.0\.0\.1:$port\] model buffer size" "$bb" && continue
    echo "bench-peers: no model buffer on the RPC server at port $port; $bb:" >&2
    grep -E 'load_tensors|RPC' "$bb" >&2 || tail -20 "$bb" >&2
    exit 1
  done
  log "llama-batched-bench ${offload#*load_tensors: }, model buffers:" \
    "$(grep -oE '(CPU_Mapped|RPC[0-9]*\[[^]]*\]) model buffer size = *[0-9.]+ MiB' "$bb" | sed 's/ model buffer size = */ /' | paste -sd ' ')"
  "$venv/bin/python" - "$out/lb.$1.json" "${ports[@]}" <<'EOF'
import json, sys
tests, ports = json.load(open(sys.argv[1])), sys.argv[2:]
for t in tests:
    servers = [s.strip() for s in t["gpu_info"].split(",")]
    if t["backends"] != "RPC" or servers != [f"127.0.0.1:{p}" for p in ports] or t["n_gpu_layers"] != 99 or t["split_mode"] != "layer":
        sys.exit(f"bench-peers: llama-bench did not run on the RPC servers: {({k: t[k] for k in ('backends', 'gpu_info', 'n_gpu_layers', 'split_mode', 'tensor_split')})}")
print(f"== llama-bench: backends {t['backends']}, devices {t['gpu_info']}, -ngl {t['n_gpu_layers']}, -sm {t['split_mode']}, -ts {t['tensor_split']}", file=sys.stderr)
EOF
}
# CPU time the hypervisor gave to others (steal, /proc/stat), in clock ticks: a round with
# much of it says the machine, not the engine, set that round's pace.
steal() { awk '/^cpu /{print $9}' /proc/stat; }
for r in $(seq 1 "$rounds"); do
  s0=$(steal)
  log "round $r/$rounds: zeroshard${zs_args[*]:+ ${zs_args[*]}}"
  run_zs zs "$r" "${zs_args[@]}"
  if [ "$split" -gt 1 ]; then start_rpc "$r"; fi
  log "round $r/$rounds: llama-bench${ports[*]:+ over RPC}"
  "$build/bin/llama-bench" -m "$model/model.gguf" "${peer_args[@]}" -p "$prompt_len" -n "$new_tokens" -r 1 \
    -o json >"$out/lb.$r.json" 2>"$out/lb.$r.log" || { tail -20 "$out/lb.$r.log"; exit 1; }
  log "round $r/$rounds: llama-batched-bench${ports[*]:+ over RPC}"
  "$build/bin/llama-batched-bench" -m "$model/model.gguf" "${peer_args[@]}" -tb "$threads" -c "$ctx" \
    -npp "$prompt_len" -ntg "$new_tokens" -npl "$batches" --output-format jsonl "${bb_args[@]}" \
    >"$out/bb.$r.jsonl" 2>"$out/bb.$r.log" || { tail -20 "$out/bb.$r.log"; exit 1; }
  if [ "$split" -gt 1 ]; then
    stop_rpc
    check_rpc "$r"
    log "round $r/$rounds: zeroshard single process, --threads $((split * threads))"
    run_zs single "$r" --threads "$((split * threads))"
  fi
  echo "$(( ($(steal) - s0) ))" >"$out/steal.$r"
done

"$venv/bin/python" - "$out" "$rounds" "$batches" "$prompt_len" "$new_tokens" "$threads" "$spec" "$version" "${isa_cap:-native}" "$(getconf CLK_TCK)" "$split" <<'EOF'
import json, statistics, sys
out, rounds, batches, pp, tg, threads, spec, version, isa = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
ticks, split = int(sys.argv[10]), int(sys.argv[11])
def zeroshard(name, r):  # batch -> row of zeroshard bench --json
    return {row["batch"]: row for row in json.loads(open(f"{out}/{name}.{r}.txt").read().splitlines()[-1])["rows"]}
rows = {}  # label -> list of (zeroshard, llama.cpp[, zeroshard single process]) per round
for r in range(1, rounds + 1):
    runs = [zeroshard("zs", r)] + ([zeroshard("single", r)] if split > 1 else [])
    lb = json.load(open(f"{out}/lb.{r}.json"))
    lb_pp = next(t["avg_ts"] for t in lb if t["n_prompt"] == pp and t["n_gen"] == 0)
    lb_tg = next(t["avg_ts"] for t in lb if t["n_gen"] == tg and t["n_prompt"] == 0)
    bb = {j["pl"]: j for j in map(json.loads, filter(None, (l.strip() for l in open(f"{out}/bb.{r}.jsonl") if l.startswith("{"))))}
    first = min(batches)
    rows.setdefault(f"prefill tok/s ({pp}-token prompt)", []).append((runs[0][first]["prefill_tokens_per_s"], lb_pp, *(z[first]["prefill_tokens_per_s"] for z in runs[1:])))
    for b in batches:
        peer = lb_tg if b == 1 else bb[b]["speed_tg"]
        rows.setdefault(f"decode tok/s, batch {b}" + (" (aggregate)" if b > 1 else ""), []).append((runs[0][b]["decode_tokens_per_s"], peer, *(z[b]["decode_tokens_per_s"] for z in runs[1:])))
fmt = lambda v: f"{min(v):.1f}–{max(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
if split > 1:
    print(f"\nzeroshard tensor ×{split} vs llama.cpp RPC ×{split} (llama-cpp-python {version} sdist) · {spec} · {split} processes × {threads} thread{'s' if threads != '1' else ''}, single process {split * int(threads)} threads · {rounds} interleaved rounds · {isa}")
    print(f"{'':40} {f'zeroshard tensor ×{split}':>22} {f'llama.cpp RPC ×{split}':>22} {'ratio (median)':>15} {'zeroshard single':>22} {'split÷single (median)':>22}  ratio per round (÷ llama.cpp | ÷ single)")
else:
    print(f"\nzeroshard vs llama.cpp (llama-cpp-python {version} sdist) · {spec} · {threads} threads · {rounds} interleaved rounds · {isa}")
    print(f"{'':40} {'zeroshard':>22} {'llama.cpp':>22} {'ratio (median)':>15}  ratio per round")
for label, runs in rows.items():
    z = [p[0] for p in runs]; l = [p[1] for p in runs]
    ratios = [p[0] / p[1] for p in runs]
    line = f"{label:40} {fmt(z):>22} {fmt(l):>22} {statistics.median(ratios):>15.2f}"
    if split > 1:
        single = [p[2] for p in runs]
        by_single = [p[0] / p[2] for p in runs]
        print(f"{line} {fmt(single):>22} {statistics.median(by_single):>22.2f}  {' '.join(f'{r:.2f}' for r in ratios)} | {' '.join(f'{r:.2f}' for r in by_single)}")
    else:
        print(f"{line}  {' '.join(f'{r:.2f}' for r in ratios)}")
steal = [int(open(f"{out}/steal.{r}").read()) / ticks for r in range(1, rounds + 1)]
width = 40 + 23 * 2 + 16 + (23 * 2 if split > 1 else 0)
print(f"{'steal s per round (' + ('all runs' if split > 1 else 'both engines') + ')':{width}}  {' '.join(f'{s:.1f}' for s in steal)}")
EOF
