#!/usr/bin/env python3
"""Type-checks the CUDA kernels without a CUDA install: each kernels/*.cu file,
prefixed with common.cuh exactly as the backend feeds NVRTC, is parsed by
libclang's CUDA front end (device side, sm_90) under a small shim that declares
what NVRTC provides built in (__global__, threadIdx, __shfl_xor_sync, expf, ...).

    pip install libclang && python3 scripts/check-kernels.py

Exits 1 on any error or warning; prints one line per kernel file otherwise.
It checks syntax, types and inline-asm constraints, not code generation.
"""
import pathlib
import sys

try:
    import clang.cindex as ci
except ImportError:
    print("check-kernels: skipped (pip install libclang to run it)")
    sys.exit(0)

SHIM = r"""
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
struct __zs_uint3 { unsigned int x, y, z; };
extern const __device__ __zs_uint3 threadIdx, blockIdx, blockDim, gridDim;
__device__ void __syncthreads();
__device__ float __shfl_xor_sync(unsigned int mask, float v, int lane_mask, int width = 32);
__device__ float expf(float);
__device__ float tanhf(float);
__device__ float rsqrtf(float);
__device__ float fmaxf(float, float);
__device__ int min(int, int);
"""

root = pathlib.Path(__file__).resolve().parent.parent / "worker/src/cuda/kernels"
common = (root / "common.cuh").read_text()
args = ["-x", "cuda", "--cuda-device-only", "--cuda-gpu-arch=sm_90", "-nocudainc", "-nocudalib",
        "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-cuda-version"]
index = ci.Index.create()
bad = 0
for cu in sorted(root.glob("*.cu")):
    src = SHIM + common + "\n" + cu.read_text()
    tu = index.parse(str(cu), args=args, unsaved_files=[(str(cu), src)])
    diags = [d for d in tu.diagnostics if d.severity >= ci.Diagnostic.Warning]
    kernels = [c.spelling for c in tu.cursor.get_children()
               if c.kind == ci.CursorKind.FUNCTION_DECL and c.location.file and c.location.file.name == str(cu)
               and c.is_definition() and "global" in [t.spelling for t in c.get_tokens()][:8]]
    for d in diags:
        print(f"{cu.name}: {d}")
    bad += len(diags)
    print(f"{cu.name}: {'ok' if not diags else 'FAILED'}")
sys.exit(1 if bad else 0)
