#!/usr/bin/env bash
# One process against 2 workers under each placement, on one shape, rounds
# interleaved, and what `zeroshard plan` predicted for the same: prints one
# table of prefill and decode tok/s (batch 1 and 8) and the ratios to one process.
#
#   scripts/bench-placements.sh                 # ROUNDS=2, the 270M Llama shape
#   ROUNDS=3 BIN=target/release/zeroshard scripts/bench-placements.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release/zeroshard}"
ROUNDS="${ROUNDS:-2}"
SHAPE="${SHAPE:-llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000}"
ARGS=(--synthetic "$SHAPE" --batch 1,8 --prompt-len 128 --new-tokens 32 --json)
[ -x "$BIN" ] || { echo "bench-placements: $BIN not built (cargo build --release)" >&2; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq "$ROUNDS"); do
  echo "round $r: one process (2 threads)" >&2
  "$BIN" bench --threads 2 "${ARGS[@]}" 2>/dev/null | tail -1 | sed "s/^/single $r /" >>"$out"
  for p in tensor gather; do
    echo "round $r: 2 workers, $p" >&2
    "$BIN" bench --workers 2 --placement "$p" "${ARGS[@]}" 2>/dev/null | tail -1 | sed "s/^/$p $r /" >>"$out"
  done
done
echo "plan (colocated, loopback 16 Gb/s, 30 µs: what MeasureLink times over a group socket here)" >&2
"$BIN" plan --synthetic "$SHAPE" --workers 2 --colocated --link-gbps 16 --link-latency-us 30 --batch 1,8 --json \
  | sed "s/^/plan 0 /" >>"$out"
python3 - "$out" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    kind, rnd, body = line.split(" ", 2)
    v = json.loads(body)
    if kind == "plan":
        for p in v["placements"]:
            d = {r["batch"]: r["tokens_per_s"] for r in p["decode_tokens_per_s"]}
            rows.setdefault(f"plan {p['placement']}", []).append((p["prefill_tokens_per_s"], d[1], d[8]))
        continue
    r = {x["batch"]: x for x in v["rows"]}
    rows.setdefault(kind, []).append((r[1]["prefill_tokens_per_s"], r[1]["decode_tokens_per_s"], r[8]["decode_tokens_per_s"]))
mean = lambda xs: sum(xs) / len(xs)
single = [mean([x[i] for x in rows["single"]]) for i in range(3)]
print(f"{'':<14}{'prefill b1':>12}{'decode b1':>12}{'decode b8':>12}   ÷ one process (prefill · b1 · b8)")
for k, v in rows.items():
    m = [mean([x[i] for x in v]) for i in range(3)]
    each = "  ".join("/".join(f"{x[i]:.1f}" for x in v) for i in range(3))
    print(f"{k:<14}{m[0]:>12.1f}{m[1]:>12.1f}{m[2]:>12.1f}   {m[0]/single[0]:.2f} · {m[1]/single[1]:.2f} · {m[2]/single[2]:.2f}   (rounds: {each})")
PY
