//! The `.cu` kernel sources, compiled once per device at start-up with NVRTC
//! for the device's own architecture, and the launch shapes used with them.
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::error::{Result, WorkerError};

/// Shared prelude (f16 conversions, reductions), prepended to every file.
pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");

/// Each kernel file and the `extern "C"` kernels it defines.
pub(crate) const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise.cu",
        include_str!("kernels/elementwise.cu"),
        &["silu_mul", "gelu_tanh", "add_assign", "add_bias"],
    ),
    ("rows.cu", include_str!("kernels/rows.cu"), &["embed", "add_positions", "select_rows", "split_cols"]),
    ("norm.cu", include_str!("kernels/norm.cu"), &["rms_norm", "layer_norm", "rope"]),
    ("attention.cu", include_str!("kernels/attention.cu"), &["kv_append", "attention"]),
];

/// The largest head the attention kernel holds (`ATT_MAX_HEAD_DIM`).
pub(crate) const MAX_HEAD_DIM: usize = 256;
/// Threads per block of the row kernels and attention.
pub(crate) const BLOCK: u32 = 256;
pub(crate) const ATTENTION_BLOCK: u32 = 128;
/// Grid-stride kernels use at most this many blocks.
const MAX_BLOCKS: u64 = 8192;

/// Every kernel, loaded.
pub(crate) struct Kernels {
    pub silu_mul: CudaFunction,
    pub gelu_tanh: CudaFunction,
    pub add_assign: CudaFunction,
    pub add_bias: CudaFunction,
    pub embed: CudaFunction,
    pub add_positions: CudaFunction,
    pub select_rows: CudaFunction,
    pub split_cols: CudaFunction,
    pub rms_norm: CudaFunction,
    pub layer_norm: CudaFunction,
    pub rope: CudaFunction,
    pub kv_append: CudaFunction,
    pub attention: CudaFunction,
}

impl Kernels {
    /// Compiles every source for this device (`compute_XY` of its capability) and
    /// loads its kernels.
    pub fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| WorkerError::Backend(format!("reading the compute capability: {e:?}")))?;
        // NVRTC takes a 'static name; one leaked string per process and device kind.
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let mut found = std::collections::HashMap::new();
        for (file, src, names) in SOURCES {
            let opts = CompileOptions {
                arch: Some(arch),
                options: vec!["--std=c++17".into()],
                name: Some((*file).into()),
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts).map_err(|e| {
                WorkerError::Backend(format!("NVRTC compiling {file} for {arch}: {}", compile_log(&e)))
            })?;
            let module = ctx
                .load_module(ptx)
                .map_err(|e| WorkerError::Backend(format!("loading {file} ({arch}): {e:?}")))?;
            for name in *names {
                let f = module
                    .load_function(name)
                    .map_err(|e| WorkerError::Backend(format!("kernel {name} in {file}: {e:?}")))?;
                found.insert(*name, f);
            }
        }
        let mut take = |n: &str| found.remove(n).expect("every listed kernel was loaded");
        Ok(Self {
            silu_mul: take("silu_mul"),
            gelu_tanh: take("gelu_tanh"),
            add_assign: take("add_assign"),
            add_bias: take("add_bias"),
            embed: take("embed"),
            add_positions: take("add_positions"),
            select_rows: take("select_rows"),
            split_cols: take("split_cols"),
            rms_norm: take("rms_norm"),
            layer_norm: take("layer_norm"),
            rope: take("rope"),
            kv_append: take("kv_append"),
            attention: take("attention"),
        })
    }
}

fn compile_log(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            log.to_string_lossy().lines().take(8).collect::<Vec<_>>().join(" | ")
        }
        other => format!("{other:?}"),
    }
}

/// Grid-stride elementwise launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(BLOCK as u64).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
pub(crate) fn per_row(rows: usize) -> LaunchConfig {
    let rows = u32::try_from(rows.max(1)).expect("rows fit a grid dimension");
    LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Attention: one block per (row, head).
pub(crate) fn attention(rows: usize, heads: usize) -> LaunchConfig {
    let rows = u32::try_from(rows.max(1)).expect("rows fit a grid dimension");
    let heads = u32::try_from(heads).ok().filter(|h| *h <= 65_535).expect("at most 65535 heads");
    LaunchConfig { grid_dim: (rows, heads, 1), block_dim: (ATTENTION_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_extern_c_in_its_file() {
        for (file, src, names) in SOURCES {
            for n in *names {
                let decl = format!("extern \"C\" __global__ void {n}(");
                assert_eq!(src.matches(&decl).count(), 1, "{file}: {decl}");
            }
            // No file uses a header NVRTC would have to find.
            assert!(!src.contains("#include"), "{file}");
        }
        assert!(!COMMON.contains("#include"));
        // The attention kernel's limit is the one the backend checks.
        let (_, att, _) = SOURCES[3];
        assert!(att.contains(&format!("#define ATT_MAX_HEAD_DIM {MAX_HEAD_DIM}")));
    }

    #[test]
    fn block_sizes_suit_the_reductions() {
        // block_sum / block_max: a multiple of 32, at most 1024 (32 warps of scratch).
        for b in [BLOCK, ATTENTION_BLOCK] {
            assert!(b % 32 == 0 && b <= 1024);
        }
    }

    #[test]
    fn launch_shapes() {
        let e = elementwise(1000);
        assert_eq!((e.grid_dim, e.block_dim), ((4, 1, 1), (256, 1, 1)));
        assert_eq!(elementwise(0).grid_dim.0, 1);
        assert_eq!(elementwise(usize::MAX / 4).grid_dim.0, MAX_BLOCKS as u32);
        assert_eq!(per_row(7).grid_dim, (7, 1, 1));
        let a = attention(65_536, 32); // batch 32 × 2048-token prefill: rows on x
        assert_eq!((a.grid_dim, a.block_dim.0), ((65_536, 32, 1), ATTENTION_BLOCK));
    }
}
