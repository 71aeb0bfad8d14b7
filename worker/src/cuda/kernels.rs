//! The `.cu` kernel sources, compiled at start-up with NVRTC for the device's
//! own architecture, and the launch shapes used with them. The PTX is cached on
//! disk per source and architecture (`$ZEROSHARD_KERNEL_CACHE`, else
//! `~/.cache/zeroshard/kernels`), so later processes skip NVRTC.
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use super::device::CudaResultExt;
use crate::error::Result;

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
    pub(super) fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().cuda_op("reading the compute capability")?;
        // NVRTC takes a 'static name; one leaked string per process and device kind.
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let mut found = std::collections::HashMap::new();
        for (file, src, names) in SOURCES {
            let module = load(ctx, file, src, arch)?;
            for name in *names {
                let f = module.load_function(name).cuda_op(&format!("loading kernel {name} of {file}"))?;
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

/// The module of one source: from the PTX cache when it loads, else compiled
/// (and cached; a cache that cannot be written is only skipped).
fn load(ctx: &Arc<CudaContext>, file: &str, src: &str, arch: &'static str) -> Result<Arc<CudaModule>> {
    let full = format!("{COMMON}\n{src}");
    let cached = cache_path(file, arch, &full);
    if let Some(ptx) = cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        match ctx.load_module(Ptx::from_src(ptx)) {
            Ok(m) => return Ok(m),
            Err(e) => tracing::warn!("cached PTX of {file} did not load ({e:?}); recompiling"),
        }
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        name: Some(file.into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&full, opts)
        .map_err(NvrtcFailure)
        .cuda_op(&format!("NVRTC compiling {file} for {arch}"))?;
    if let Some(p) = &cached {
        let written =
            p.parent().map(std::fs::create_dir_all).transpose().and_then(|_| std::fs::write(p, ptx.to_src()));
        if let Err(e) = written {
            tracing::debug!("not caching {file}'s PTX at {}: {e}", p.display());
        }
    }
    ctx.load_module(ptx).cuda_op(&format!("loading {file} ({arch})"))
}

/// `<cache>/<file>-<arch>-<hash of the source>.ptx`, or `None` with no cache folder.
fn cache_path(file: &str, arch: &str, source: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("ZEROSHARD_KERNEL_CACHE") {
        Some(d) if d.is_empty() => return None,
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/zeroshard/kernels"),
    };
    Some(dir.join(format!("{file}-{arch}-{:016x}.ptx", fnv1a(source.as_bytes()))))
}

/// FNV-1a, 64-bit: stable across builds, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// An NVRTC failure that reads as the head of its compile log (cudarc's
/// `CompileError` prints as its `Debug`, the whole log escaped on one line).
#[derive(Debug)]
struct NvrtcFailure(CompileError);

impl std::fmt::Display for NvrtcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            CompileError::CompileError { log, .. } => {
                let head = log.to_string_lossy().lines().take(8).collect::<Vec<_>>().join(" | ");
                write!(f, "{head}")
            }
            other => write!(f, "{other:?}"),
        }
    }
}

impl std::error::Error for NvrtcFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
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
    fn the_kernel_cache_is_keyed_by_source_and_arch() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        std::env::set_var("ZEROSHARD_KERNEL_CACHE", "/tmp/zs-cache");
        let a = cache_path("norm.cu", "compute_90", "x").expect("a path");
        assert!(a.starts_with("/tmp/zs-cache") && a.to_string_lossy().contains("norm.cu-compute_90-"));
        assert_ne!(a, cache_path("norm.cu", "compute_90", "y").expect("a path"));
        assert_ne!(a, cache_path("norm.cu", "compute_80", "x").expect("a path"));
        std::env::set_var("ZEROSHARD_KERNEL_CACHE", "");
        assert_eq!(cache_path("norm.cu", "compute_90", "x"), None);
        std::env::remove_var("ZEROSHARD_KERNEL_CACHE");
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
