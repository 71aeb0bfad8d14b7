#!/usr/bin/env bash
# Fuzzes every target for SECONDS_PER_TARGET seconds (default 60) with
# cargo-fuzz / libFuzzer, coverage-guided, starting from the committed seed
# corpus (fuzz/corpus/<target>/; new inputs go to fuzz/work/<target>/).
#
#   scripts/fuzz.sh          # 60 s per target
#   scripts/fuzz.sh 600      # 10 min per target
#
# Each input runs under a 10 s timeout (a hang is reported as one) and the
# process under a 2 GiB RSS/malloc limit (an OOM is reported as one). libFuzzer
# runs in fork mode so that a finding does not end the run: every crash, hang
# and OOM of the budget lands in fuzz/artifacts/<target>/<run>/. Prints, per
# target: executions, crashes, hangs, OOMs. Exits 1 if anything was found.
#
# Needs the nightly toolchain and cargo-fuzz (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
export ZEROSHARD_SHARED="${ZEROSHARD_SHARED:-$(cd .. && pwd)/shared}"
if [ ! -d "$ZEROSHARD_SHARED/models/stories260K" ]; then
  echo "fuzz.sh: fixtures missing: $ZEROSHARD_SHARED/models (set ZEROSHARD_SHARED)" >&2
  exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz
fi

targets=(safetensors config request detokenizer)
# No sanitizer: the code under fuzz is safe Rust; release optimisations with
# debug assertions and overflow checks (cargo-fuzz's default) stay on.
(cd fuzz && cargo +nightly fuzz build -s none)
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
run_id=$(date +%Y%m%d-%H%M%S)
found=0
printf '%-12s %12s %8s %6s %6s\n' target executions crashes hangs ooms
for t in "${targets[@]}"; do
  work="fuzz/work/$t"
  art="fuzz/artifacts/$t/$run_id"
  mkdir -p "$work" "$art"
  log="$art/fuzz.log"
  "$bin_dir/$t" "$work" "fuzz/corpus/$t" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1 || true
  # Fork mode prints "#<execs>: cov: … oom/timeout/crash: a/b/c …" per job.
  execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  crashes=$(find "$art" -name 'crash-*' | wc -l)
  hangs=$(find "$art" -name 'timeout-*' | wc -l)
  ooms=$(find "$art" -name 'oom-*' | wc -l)
  printf '%-12s %12s %8s %6s %6s\n' "$t" "${execs:-?}" "$crashes" "$hangs" "$ooms"
  if [ $((crashes + hangs + ooms)) -gt 0 ]; then
    found=1
    find "$art" -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' | sed 's/^/    /'
  fi
done
if [ "$found" = 1 ]; then
  echo "fuzz.sh: findings above (logs in fuzz/artifacts/<target>/$run_id/fuzz.log);" \
    "reproduce one with: fuzz/target/x86_64-unknown-linux-gnu/release/<target> <file>" >&2
  exit 1
fi
