#!/usr/bin/env bash
# zeroshard against llama.cpp on this machine: the same synthetic Llama (random f16
# weights, written by `zeroshard bench --write-checkpoint` and converted to a GGUF f16
# file), the same thread count, rounds interleaved so both see the same machine.
#
#   scripts/bench-peers.sh [SPEC]
#
# SPEC defaults to llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000.
# Environment: ROUNDS (3), BATCHES (1,8,32; decode batch sizes), PROMPT_LEN (128),
# NEW_TOKENS (32), THREADS (all cores), ISA (unset: the best this CPU has; `avx2`: both
# engines held to AVX2 + FMA + F16C, as on a CPU without AVX-512: zeroshard through
# ZEROSHARD_CPU_ISA=avx2, llama.cpp built with GGML_NATIVE off and only those extensions).
#
# llama.cpp is built from the source vendored in the PyPI sdist of llama-cpp-python
# (pinned below, checked against its sha256) with GGML_NATIVE (this CPU's instruction
# set), in a cache folder outside the repository, as are the checkpoint and the GGUF.
# The summary gives each figure's range over the rounds, the median of the per-round ratios
# and those ratios in round order. Figures compared:
#   prefill     zeroshard batch-1 prefill of PROMPT_LEN tokens | llama-bench pp<PROMPT_LEN>
#   decode b1   zeroshard batch-1 decode                       | llama-bench tg<NEW_TOKENS>
#   decode bN   zeroshard aggregate decode at batch N          | llama-batched-bench S_TG at N parallel sequences
set -euo pipefail
cd "$(dirname "$0")/.."
spec=${1:-llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000}
rounds=${ROUNDS:-3}
batches=${BATCHES:-1,8,32}
prompt_len=${PROMPT_LEN:-128}
new_tokens=${NEW_TOKENS:-32}
threads=${THREADS:-$(nproc)}
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

# 3. llama-bench and llama-batched-bench, built for this CPU (one build per instruction set).
isa=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|avx512_fp16|amx_tile|f16c|fma)$' | sort | tr '\n' '-')
[ -n "$isa_cap" ] && isa="cap-$isa_cap"
build=$cache/build-$version-$(echo "$isa" | sha256sum | cut -c1-12)
if [ ! -x "$build/bin/llama-bench" ] || [ ! -x "$build/bin/llama-batched-bench" ]; then
  log "building llama.cpp ($isa) in $build"
  "$venv/bin/cmake" -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${cpu_flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF >"$build.log" 2>&1 || { tail -20 "$build.log"; exit 1; }
  "$venv/bin/cmake" --build "$build" --target llama-bench llama-batched-bench -j "$(nproc)" >>"$build.log" 2>&1 \
    || { tail -20 "$build.log"; exit 1; }
fi

# 4. zeroshard, the checkpoint and its GGUF.
cargo build --release -q -p zeroshard
zs=target/release/zeroshard
model=$cache/models/$(echo "$spec" | sha256sum | cut -c1-12)
if [ ! -f "$model/model.gguf" ]; then
  rm -rf "$model"
  "$zs" bench --synthetic "$spec" --write-checkpoint "$model/hf" >&2
  "$venv/bin/python" scripts/peers/to_gguf.py "$src" "$model/hf" "$model/model.gguf.tmp"
  mv "$model/model.gguf.tmp" "$model/model.gguf"
fi

# 5. Interleaved rounds.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
max_batch=$(echo "$batches" | tr ',' '\n' | sort -n | tail -1)
ctx=$((max_batch * (prompt_len + new_tokens)))
# CPU time the hypervisor gave to others (steal, /proc/stat), in clock ticks: a round with
# much of it says the machine, not the engine, set that round's pace.
steal() { awk '/^cpu /{print $9}' /proc/stat; }
for r in $(seq 1 "$rounds"); do
  s0=$(steal)
  log "round $r/$rounds: zeroshard"
  env ${isa_cap:+ZEROSHARD_CPU_ISA=$isa_cap} RAYON_NUM_THREADS=$threads "$zs" bench --model "$model/hf" --batch "$batches" \
    --prompt-len "$prompt_len" --new-tokens "$new_tokens" --json | tee "$out/zs.$r.txt" >&2
  log "round $r/$rounds: llama-bench"
  "$build/bin/llama-bench" -m "$model/model.gguf" -t "$threads" -p "$prompt_len" -n "$new_tokens" -r 1 \
    -o json >"$out/lb.$r.json" 2>"$out/lb.$r.log" || { tail -20 "$out/lb.$r.log"; exit 1; }
  log "round $r/$rounds: llama-batched-bench"
  "$build/bin/llama-batched-bench" -m "$model/model.gguf" -t "$threads" -tb "$threads" -c "$ctx" \
    -npp "$prompt_len" -ntg "$new_tokens" -npl "$batches" --output-format jsonl \
    >"$out/bb.$r.jsonl" 2>"$out/bb.$r.log" || { tail -20 "$out/bb.$r.log"; exit 1; }
  echo "$(( ($(steal) - s0) ))" >"$out/steal.$r"
done

"$venv/bin/python" - "$out" "$rounds" "$batches" "$prompt_len" "$new_tokens" "$threads" "$spec" "$version" "${isa_cap:-native}" "$(getconf CLK_TCK)" <<'EOF'
import json, statistics, sys
out, rounds, batches, pp, tg, threads, spec, version, isa = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
ticks = int(sys.argv[10])
rows = {}  # label -> list of (zeroshard, llama.cpp) per round
for r in range(1, rounds + 1):
    zs_lines = open(f"{out}/zs.{r}.txt").read().splitlines()
    zs = json.loads(zs_lines[-1])
    by_batch = {row["batch"]: row for row in zs["rows"]}
    lb = json.load(open(f"{out}/lb.{r}.json"))
    lb_pp = next(t["avg_ts"] for t in lb if t["n_prompt"] == pp and t["n_gen"] == 0)
    lb_tg = next(t["avg_ts"] for t in lb if t["n_gen"] == tg and t["n_prompt"] == 0)
    bb = {j["pl"]: j for j in map(json.loads, filter(None, (l.strip() for l in open(f"{out}/bb.{r}.jsonl") if l.startswith("{"))))}
    first = min(batches)
    rows.setdefault(f"prefill tok/s ({pp}-token prompt)", []).append((by_batch[first]["prefill_tokens_per_s"], lb_pp))
    for b in batches:
        zs_tg = by_batch[b]["decode_tokens_per_s"]
        peer = lb_tg if b == 1 else bb[b]["speed_tg"]
        rows.setdefault(f"decode tok/s, batch {b}" + (" (aggregate)" if b > 1 else ""), []).append((zs_tg, peer))
print(f"\nzeroshard vs llama.cpp (llama-cpp-python {version} sdist) · {spec} · {threads} threads · {rounds} interleaved rounds · {isa}")
print(f"{'':40} {'zeroshard':>22} {'llama.cpp':>22} {'ratio (median)':>15}  ratio per round")
for label, pairs in rows.items():
    z = [p[0] for p in pairs]; l = [p[1] for p in pairs]
    ratios = [a / b for a, b in pairs]
    fmt = lambda v: f"{min(v):.1f}–{max(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
    print(f"{label:40} {fmt(z):>22} {fmt(l):>22} {statistics.median(ratios):>15.2f}  {' '.join(f'{r:.2f}' for r in ratios)}")
steal = [int(open(f"{out}/steal.{r}").read()) / ticks for r in range(1, rounds + 1)]
print(f"{'steal s per round (both engines)':40} {'':>22} {'':>22} {'':>15}  {' '.join(f'{s:.1f}' for s in steal)}")
EOF
