#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU, CUDA, PyTorch and
# transformers but no Rust toolchain and no internet. Build the bundle on the
# CPU machine first (scripts/gpu-bundle.sh: the stripped release binary, the
# worker crate's unit-test binary and the small fixtures in gpu-bundle/), carry
# it over, then:
#
#   bash deploy/gpu-check.sh [BUNDLE_DIR]               # default: ./gpu-bundle
#   bash deploy/gpu-check.sh --device cpu [BUNDLE_DIR]  # dry run without a GPU
#
# Rows, most important first, each printed (one table line) and appended to
# LOGS/table.txt the moment it is known, so a run cut short keeps what it
# reached; a row past its limit says "timeout after Ns" and the check goes on:
#
#   row               limit   what
#   (set-up)            15 s  library path from PyTorch's nvidia-* wheels
#   versions            20 s  nvidia-smi; `zeroshard cuda info`; library folders
#   ops                 60 s  engine-tests cuda:: (every CUDA op vs the CPU backend)
#   model:NAME     40+9x14 s  each ref through generate, tokens exact, logits 1%
#   cluster:streamed    30 s  up --workers 2, every layer streamed; query the refs
#   cluster:resident    25 s  the same, every layer resident
#   speed:resident      45 s  bench, TinyLlama-1.1B shape, vs the device-copy bound
#   speed:offloaded     40 s  bench --max-live-bytes 0, vs the pinned-copy bound
#   torch               75 s  transformers / Accelerate on the same shape: ratios
#                    -------
#                      476 s  of the 480 s (8 minutes) budget
#
# The rows together get 480 s less the set-up (and 5 s to spare); with more
# refs than today's ten, the last rows are the ones cut. The table ends with
#   rows: <row ids in printed order>
#   result: pass|FAIL (N rows: P pass, F FAIL, S skipped, T timeout) in Ss
# Exit 0 when no row failed or timed out. Logs: $GPU_CHECK_LOGS, else
# $OUT/gpu-check, else /tmp/gpu-check-logs: table.txt and raw/ (every command's
# output); under $OUT, raw/ is /tmp/gpu-check-raw packed into logs.tar.gz after
# every row instead, because only a few files come back from $OUT.
set -uo pipefail
total=480
start=$(date +%s)
root="$(cd "$(dirname "$0")/.." && pwd)"
device=cuda
bundle_arg=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --device=*) device="${1#--device=}"; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
    *) bundle_arg="$1"; shift ;;
  esac
done
bundle="$(cd "${bundle_arg:-$root/gpu-bundle}" 2>/dev/null && pwd)" \
  || { echo "gpu-check: no bundle at ${bundle_arg:-$root/gpu-bundle} (run scripts/gpu-bundle.sh)" >&2; exit 2; }
if [ -n "${GPU_CHECK_LOGS:-}" ]; then
  logs="$GPU_CHECK_LOGS"
  raw="$logs/raw"
elif [ -n "${OUT:-}" ]; then
  logs="$OUT/gpu-check"
  raw="${TMPDIR:-/tmp}/gpu-check-raw"
else
  logs="${TMPDIR:-/tmp}/gpu-check-logs"
  raw="$logs/raw"
fi
rm -rf "$raw"
mkdir -p "$logs" "$raw"
py="${PYTHON:-python3}"

# cuBLAS and NVRTC come with PyTorch's nvidia-* wheels: put their folders (and
# torch/lib) on the library path; libcuda comes with the driver.
libdirs="$(timeout 15 "$py" - <<'EOF'
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
dirs = set()
for r in roots:
    if not os.path.isdir(r):
        continue
    for lib in glob.glob(os.path.join(r, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
    if os.path.isdir(os.path.join(r, "torch", "lib")):
        dirs.add(os.path.join(r, "torch", "lib"))
print(":".join(sorted(dirs)))
EOF
)"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG="${RUST_LOG:-info}"
export PYTHONUNBUFFERED=1
echo "$LD_LIBRARY_PATH" | tr ':' '\n' > "$raw/ld_library_path.txt"

setup=$(($(date +%s) - start))
budget=$((total - setup - 5))
# check.py keeps to its budget row by row; this only guards against a hang outside a row.
exec timeout -k 5 $((budget + 10)) "$py" -u "$root/deploy/gpu/check.py" --device "$device" --bundle "$bundle" \
  --logs "$logs" --raw "$raw" --budget "$budget" --setup-s "$setup" --libdirs="$libdirs"
