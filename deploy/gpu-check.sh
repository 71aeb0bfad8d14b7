#!/usr/bin/env bash
# The GPU check of issue 6, in one call on a machine with an NVIDIA GPU, CUDA,
# PyTorch and transformers but no Rust toolchain and no internet. Build the
# bundle on the CPU machine first (scripts/gpu-bundle.sh: the stripped release
# binary + small fixtures in gpu-bundle/), carry it over, then:
#
#   bash deploy/gpu-check.sh [BUNDLE_DIR]        # default: ./gpu-bundle
#
# Prints one table (parity of generate and of a 2-worker CUDA cluster, speed
# resident and offloaded, PyTorch ratios) and leaves every log under
# $OUT/gpu-check (or ./gpu-check-logs without $OUT).
# Budget: at most 9.5 minutes (smoke 90 s, PyTorch 200 s, zeroshard 280 s);
# about 3 expected on an H100.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bundle="$(cd "${1:-$root/gpu-bundle}" && pwd)" || { echo "gpu-check: no bundle (run scripts/gpu-bundle.sh)" >&2; exit 2; }
logs="${OUT:+$OUT/gpu-check}"
logs="${logs:-$root/gpu-check-logs}"
mkdir -p "$logs"
py="${PYTHON:-python3}"
start=$(date +%s)
note() { echo "[gpu-check $(($(date +%s) - start))s] $*" | tee -a "$logs/steps.log" >&2; }

# cuBLAS and NVRTC come with PyTorch's nvidia-* wheels: put their folders (and
# torch/lib) on the library path; libcuda comes with the driver.
libdirs="$("$py" - <<'EOF'
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
export ZEROSHARD_KERNEL_CACHE="$logs/kernel-cache"
export RUST_LOG="${RUST_LOG:-info}"
echo "$LD_LIBRARY_PATH" | tr ':' '\n' > "$logs/ld_library_path.txt"
ls -1 $(echo "$libdirs" | tr ':' ' ') 2>/dev/null | grep -E 'cublas|nvrtc|cudart' | sort -u > "$logs/cuda-libs.txt"
note "bundle $bundle ($(cat "$bundle/commit" 2>/dev/null || echo '?')); logs $logs"
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
head -15 "$logs/nvidia-smi.txt" >&2

# A first CUDA run on its own: if the backend cannot start, say so at once.
note "smoke: stories260K on cuda"
timeout 90 "$bundle/zeroshard" generate --model "$bundle/models/stories260K" --prompt "Once upon a time" \
  --max-new-tokens 16 --device cuda > "$logs/smoke.out" 2> "$logs/smoke.err"
note "smoke exit $?: $(tr '\n' ' ' < "$logs/smoke.out" | cut -c1-100) $(tail -1 "$logs/smoke.err")"

note "PyTorch baselines (transformers fp16 on GPU, Accelerate CPU offload)"
timeout 200 "$py" "$root/deploy/gpu/torch_bench.py" --out "$logs/torch.json" > "$logs/torch.out" 2> "$logs/torch.err"
note "torch_bench exit $?"

note "zeroshard parity and speed"
timeout 280 "$py" "$root/deploy/gpu/check.py" --bundle "$bundle" --logs "$logs" --torch "$logs/torch.json"
rc=$?
note "done in $(($(date +%s) - start))s, exit $rc (table: $logs/table.txt)"
exit $rc
