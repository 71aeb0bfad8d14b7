//! The `.cu` kernel sources, compiled with NVRTC for the device's own
//! architecture (`sm_XY`, machine code: no PTX for the driver to JIT, so an
//! NVRTC newer than the driver within one CUDA major version works), and the
//! launch shapes used with them. The CUBIN is cached on disk per source,
//! architecture and NVRTC version (`$ZEROSHARD_KERNEL_CACHE`, else
//! `~/.cache/zeroshard/kernels`), so later processes skip NVRTC.
//!
//! [`compile`] is the one NVRTC path: the backend's start-up and
//! `zeroshard cuda kernels` (which compiles every source for many
//! architectures, PTX and CUBIN, and fails on any warning) both go through it.
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::device::CudaResultExt;
use super::versions::Version;
use crate::error::{EngineError, Result};

/// Shared prelude (f16 conversions, reductions), prepended to every file.
pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");

/// Each kernel file and the `extern "C"` kernels it defines.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise.cu",
        include_str!("kernels/elementwise.cu"),
        &["silu_mul", "gelu_tanh", "add_assign", "add_bias"],
    ),
    ("rows.cu", include_str!("kernels/rows.cu"), &["embed", "add_positions", "select_rows", "split_cols"]),
    ("norm.cu", include_str!("kernels/norm.cu"), &["rms_norm", "layer_norm", "rope"]),
    ("attention.cu", include_str!("kernels/attention.cu"), &["kv_append", "attention"]),
];

/// Options every source is compiled with (and the architecture).
const OPTIONS: &[&str] = &["--std=c++17"];

/// The largest head the attention kernel holds (`ATT_MAX_HEAD_DIM`).
pub(crate) const MAX_HEAD_DIM: usize = 256;
/// Threads per block of the row kernels and attention.
pub(crate) const BLOCK: u32 = 256;
pub(crate) const ATTENTION_BLOCK: u32 = 128;
/// Grid-stride kernels use at most this many blocks.
const MAX_BLOCKS: u64 = 8192;

/// Threads per block `kernel` is launched with (no kernel uses dynamic shared memory).
pub fn threads_per_block(kernel: &str) -> u32 {
    if kernel == "attention" {
        ATTENTION_BLOCK
    } else {
        BLOCK
    }
}

/// What NVRTC makes: PTX for a virtual architecture (`compute_XY`), or machine
/// code for a real one (`sm_XY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Ptx,
    Cubin,
}

impl Output {
    /// The architecture NVRTC is given for compute capability `cc`: `compute_90`, `sm_90`.
    pub fn target(self, cc: u32) -> String {
        match self {
            Output::Ptx => format!("compute_{cc}"),
            Output::Cubin => format!("sm_{cc}"),
        }
    }

    /// The file extension of the image.
    pub fn extension(self) -> &'static str {
        match self {
            Output::Ptx => "ptx",
            Output::Cubin => "cubin",
        }
    }
}

/// One source compiled: the image and NVRTC's log (empty when clean).
pub struct Compiled {
    pub image: Vec<u8>,
    pub log: String,
}

/// Compiles kernel file `file` (with the shared prelude, and `extra` appended)
/// for compute capability `cc` (90 for 9.0) into `output`. The error is the head
/// of NVRTC's log, or the NVRTC call that failed.
pub fn compile(
    file: &str,
    src: &str,
    extra: &str,
    cc: u32,
    output: Output,
) -> std::result::Result<Compiled, String> {
    let full =
        CString::new(format!("{COMMON}\n{src}{extra}")).map_err(|_| format!("{file}: NUL in source"))?;
    let name = CString::new(file).map_err(|_| format!("{file}: NUL in name"))?;
    let arch = format!("--gpu-architecture={}", output.target(cc));
    let options: Vec<&str> = OPTIONS.iter().copied().chain([arch.as_str()]).collect();
    let prog = nvrtc::create_program(&full, Some(&name))
        .map_err(|e| format!("{file}: nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `prog` was just created and is destroyed once, below; `full` and
    // `name` outlive it.
    unsafe {
        let compiled = nvrtc::compile_program(prog, &options);
        let log = nvrtc::get_program_log(prog).map(|l| c_chars_to_string(&l)).unwrap_or_default();
        let image = match (compiled, output) {
            (Err(e), _) => Err(format!("{file} ({arch}): {e:?}: {}", log_head(&log))),
            (Ok(()), Output::Ptx) => nvrtc::get_ptx(prog)
                .map(|p| c_chars_to_string(&p).into_bytes())
                .map_err(|e| format!("{file}: nvrtcGetPTX: {e:?}")),
            (Ok(()), Output::Cubin) => cubin(prog).map_err(|e| format!("{file}: nvrtcGetCUBIN: {e:?}")),
        };
        let _ = nvrtc::destroy_program(prog);
        image.map(|image| Compiled { image, log: log.trim().to_string() })
    }
}

/// The CUBIN of a program compiled for a real architecture.
///
/// # Safety
/// `prog` is a live, compiled program.
unsafe fn cubin(prog: nvrtc_sys::nvrtcProgram) -> std::result::Result<Vec<u8>, nvrtc::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per the caller; NVRTC writes the size.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut out = vec![0u8; size];
    // SAFETY: `out` holds the `size` bytes NVRTC writes.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, out.as_mut_ptr().cast()) }.result()?;
    Ok(out)
}

/// NVRTC's C string (with its NUL) as text.
fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The first lines of an NVRTC log, on one line.
fn log_head(log: &str) -> String {
    log.lines().filter(|l| !l.trim().is_empty()).take(8).collect::<Vec<_>>().join(" | ")
}

/// The NVRTC this process loaded: its version and the architectures it
/// compiles for (`90` for `sm_90`).
pub struct Nvrtc {
    pub version: Version,
    pub archs: Vec<u32>,
}

impl Nvrtc {
    /// Checks NVRTC ([`super::versions::nvrtc`], no driver to compare with), then
    /// asks it for its architectures.
    pub fn loaded() -> std::result::Result<Self, String> {
        let version = super::versions::nvrtc(None)?;
        let mut n = 0;
        // SAFETY: an out-parameter only; NVRTC's presence and symbols were checked.
        unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
            .result()
            .map_err(|e| format!("nvrtcGetNumSupportedArchs: {e:?}"))?;
        let mut archs = vec![0; n.max(0) as usize];
        // SAFETY: `archs` holds the `n` ints NVRTC writes.
        unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| format!("nvrtcGetSupportedArchs: {e:?}"))?;
        Ok(Self { version, archs: archs.into_iter().map(|a| a.max(0) as u32).collect() })
    }

    /// Whether this NVRTC compiles for `sm_{cc}`; if not, why, in one line.
    pub fn targets(&self, cc: u32) -> std::result::Result<(), String> {
        if self.archs.contains(&cc) {
            return Ok(());
        }
        Err(format!(
            "NVRTC {} cannot compile for sm_{cc} (it targets sm_{}..sm_{}): put a newer NVRTC on LD_LIBRARY_PATH",
            self.version,
            self.archs.first().unwrap_or(&0),
            self.archs.last().unwrap_or(&0)
        ))
    }
}

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
    /// Compiles every source for this device (`sm_XY` of its capability) and
    /// loads its kernels. An NVRTC that cannot target the device is refused
    /// naming both.
    pub(super) fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().cuda_op("reading the compute capability")?;
        let cc = (major * 10 + minor).max(0) as u32;
        let nvrtc = Nvrtc::loaded().map_err(EngineError::Setup)?;
        nvrtc.targets(cc).map_err(EngineError::Setup)?;
        let mut found = std::collections::HashMap::new();
        for (file, src, names) in SOURCES {
            let module = load(ctx, file, src, cc, nvrtc.version)?;
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

/// The module of one source: from the CUBIN cache when it loads, else compiled
/// (and cached; a cache that cannot be written is only skipped).
fn load(ctx: &Arc<CudaContext>, file: &str, src: &str, cc: u32, nvrtc: Version) -> Result<Arc<CudaModule>> {
    let cached = cache_path(file, &format!("sm_{cc}-nvrtc{nvrtc}"), &format!("{COMMON}\n{src}"));
    if let Some(image) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
        match ctx.load_module(Ptx::from_binary(image)) {
            Ok(m) => return Ok(m),
            Err(e) => tracing::warn!("cached CUBIN of {file} did not load ({e:?}); recompiling"),
        }
    }
    let compiled = compile(file, src, "", cc, Output::Cubin)
        .map_err(|e| EngineError::Setup(format!("NVRTC compiling {e}")))?;
    if !compiled.log.is_empty() {
        tracing::warn!("NVRTC warnings for {file} (sm_{cc}): {}", log_head(&compiled.log));
    }
    if let Some(p) = &cached {
        let written = p
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(p, &compiled.image));
        if let Err(e) = written {
            tracing::debug!("not caching {file}'s CUBIN at {}: {e}", p.display());
        }
    }
    ctx.load_module(Ptx::from_binary(compiled.image)).cuda_op(&format!("loading {file} (sm_{cc})"))
}

/// `<cache>/<file>-<target>-<hash of the source>.cubin`, or `None` with no cache folder.
fn cache_path(file: &str, target: &str, source: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("ZEROSHARD_KERNEL_CACHE") {
        Some(d) if d.is_empty() => return None,
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/zeroshard/kernels"),
    };
    Some(dir.join(format!("{file}-{target}-{:016x}.cubin", fnv1a(source.as_bytes()))))
}

/// FNV-1a, 64-bit: stable across builds, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
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
        let a = cache_path("norm.cu", "sm_90-nvrtc12.9", "x").expect("a path");
        assert!(a.starts_with("/tmp/zs-cache") && a.to_string_lossy().contains("norm.cu-sm_90-nvrtc12.9-"));
        assert_ne!(a, cache_path("norm.cu", "sm_90-nvrtc12.9", "y").expect("a path"));
        assert_ne!(a, cache_path("norm.cu", "sm_80-nvrtc12.9", "x").expect("a path"));
        assert_ne!(a, cache_path("norm.cu", "sm_90-nvrtc13.0", "x").expect("a path"));
        std::env::set_var("ZEROSHARD_KERNEL_CACHE", "");
        assert_eq!(cache_path("norm.cu", "sm_90-nvrtc12.9", "x"), None);
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
