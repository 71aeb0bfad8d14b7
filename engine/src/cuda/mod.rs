//! The CUDA backend: fp16 weights and activations, f32 accumulation; cuBLAS
//! GemmEx for every linear, NVRTC-compiled kernels (`kernels/*.cu`) for the
//! rest, the KV cache on the device, weights staged from host memory.
//!
//! CUDA is loaded at run time: [`probe`] says whether a driver and a device
//! exist, and whether the driver, cuBLAS and NVRTC are versions the backend runs
//! on ([`versions`]), without calling into a missing library or entry point
//! (cudarc panics then), so the same binary runs, and every test passes, on
//! machines without CUDA.
//!
//! ```ignore
//! match cuda::probe() {
//!     CudaProbe::Devices(n) if n > 0 => {
//!         let backend = CudaBackend::new(&CudaOptions::resident(0))?;
//!         let engine = Engine::new(backend, config, weights);
//!     }
//!     CudaProbe::Unavailable(why) => eprintln!("no CUDA: {why}"),
//! }
//! ```
//!
//! - [`device`]: context, compute and copy streams, memory pool, upload arena.
//! - [`kernels`]: sources, NVRTC compilation, launch shapes.
//! - [`versions`]: the driver, cuBLAS and NVRTC found, and what the backend needs.
//! - [`ops`]: elementwise, row and norm ops, the cuBLAS linear.
//! - [`attention`]: the device KV cache and attention.
//! - [`staging`]: resident weights and the staging ring.
//!
//! Every CUDA failure, in an op (a launch, a copy, an allocation) or in set-up
//! and staging, is returned as a fatal [`EngineError::Device`] naming what
//! failed, with the driver, cuBLAS or NVRTC error as its source: after one, the
//! device cannot be trusted again. Nothing here panics on a device error.
mod attention;
mod device;
pub mod kernels;
mod ops;
mod staging;
#[cfg(test)]
mod tests;
pub mod versions;

use std::sync::{Arc, Mutex};

use device::{lock, CudaResultExt};

pub use attention::CudaKvCache;
pub use staging::CudaStaged;

use crate::backend::{AttentionShape, Backend, BatchLayout, Piece};
use crate::error::{EngineError, Result};
use crate::weights::HostWeights;
use device::{Device, DeviceBuf};
use staging::Residency;

/// Whether CUDA can be used here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaProbe {
    /// This many devices.
    Devices(usize),
    /// Why not, in a few words.
    Unavailable(String),
}

/// Checks the driver, cuBLAS and NVRTC ([`versions::check`]), then asks the
/// driver for devices. Never panics.
pub fn probe() -> CudaProbe {
    if let (_, Err(why)) = versions::check() {
        return CudaProbe::Unavailable(why);
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => CudaProbe::Devices(n as usize),
        Ok(_) => CudaProbe::Unavailable("the CUDA driver reports no device".into()),
        Err(e) => CudaProbe::Unavailable(format!("the CUDA driver failed to start ({e:?})")),
    }
}

/// One CUDA device, as `zeroshard cuda info` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `major.minor`, e.g. `9.0`.
    pub capability: String,
    pub memory_bytes: usize,
}

/// Every device the driver reports (the caller has probed).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let n = cudarc::driver::CudaContext::device_count().cuda_op("counting CUDA devices")?;
    (0..n.max(0) as usize)
        .map(|ordinal| {
            let ctx =
                cudarc::driver::CudaContext::new(ordinal).cuda_op(&format!("opening cuda:{ordinal}"))?;
            let (major, minor) = ctx.compute_capability().cuda_op("reading the compute capability")?;
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name().unwrap_or_else(|_| "unknown device".into()),
                capability: format!("{major}.{minor}"),
                memory_bytes: ctx.total_mem().cuda_op("cuDeviceTotalMem")?,
            })
        })
        .collect()
}

/// `(free, total)` bytes of device `ordinal` (the caller has probed).
pub fn device_memory(ordinal: usize) -> Result<(usize, usize)> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).cuda_op(&format!("opening cuda:{ordinal}"))?;
    ctx.mem_get_info().cuda_op(&format!("cuMemGetInfo on cuda:{ordinal}"))
}

/// How the backend places weights.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub ordinal: usize,
    /// Device bytes for resident decoder layers; the rest stream through the ring.
    pub max_live_layer_bytes: u64,
    /// Layers staged ahead of the one computing (the ring holds one more).
    pub prefetch_layers: usize,
    /// Bytes of one ring slot: the largest layer (see [`layer_bytes`]).
    pub slot_bytes: u64,
}

impl CudaOptions {
    /// Every layer resident on device `ordinal`.
    pub fn resident(ordinal: usize) -> Self {
        Self { ordinal, max_live_layer_bytes: u64::MAX, prefetch_layers: 1, slot_bytes: 0 }
    }
}

/// Device bytes of each decoder layer of `config` as the backend lays them out.
pub fn layer_bytes(config: &zeroshard_offload::ModelConfig) -> Vec<u64> {
    let mut per = vec![Vec::new(); config.num_layers];
    for s in crate::model::tensor_specs(config) {
        if let Some(l) = s.layer {
            per[l].push(s.numel());
        }
    }
    per.into_iter().map(|lens| staging::packed_bytes(lens) as u64).collect()
}

/// Activations `[rows, cols]`, f16 on the device.
pub struct CudaTensor {
    buf: DeviceBuf,
    pub rows: usize,
    pub cols: usize,
}

impl CudaTensor {
    fn ptr(&self) -> u64 {
        self.buf.ptr
    }
}

/// A weight on the device: the address of `len` f16 values.
#[derive(Clone, Copy, Debug)]
pub struct CudaWeight {
    ptr: u64,
    len: usize,
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    dev: Arc<Device>,
    residency: Arc<Mutex<Residency>>,
    opts: CudaOptions,
    name: String,
}

impl CudaBackend {
    /// Opens device `opts.ordinal` and compiles the kernels. Refuses a driver,
    /// cuBLAS or NVRTC it cannot run on ([`versions::check`]) in one line.
    pub fn new(opts: &CudaOptions) -> Result<Self> {
        versions::check().1.map_err(EngineError::Setup)?;
        let dev = Device::open(opts.ordinal)?;
        let name =
            format!("cuda:{} ({})", opts.ordinal, dev.ctx.name().unwrap_or_else(|_| "unknown device".into()));
        let residency = Residency::new(
            opts.max_live_layer_bytes,
            opts.prefetch_layers + 1,
            usize::try_from(opts.slot_bytes).expect("slot size fits usize"),
        );
        Ok(Self { dev, residency: Arc::new(Mutex::new(residency)), opts: opts.clone(), name })
    }

    /// The device context (for pinned host allocations).
    pub fn context(&self) -> Arc<cudarc::driver::CudaContext> {
        self.dev.ctx.clone()
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.dev.ctx.mem_get_info().cuda_op("cuMemGetInfo")
    }

    /// Device bytes of layers kept resident so far.
    pub fn resident_layer_bytes(&self) -> u64 {
        lock(&self.residency).resident_layer_bytes()
    }

    /// Activations from host values (tests, benchmarks).
    pub fn tensor_from_host(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.upload_tensor(data, rows, cols)
    }

    /// Measured copy bandwidths in bytes/s: device → device (counting the read and
    /// the write, as a weight-streaming kernel's traffic is counted) and pinned
    /// host → device, each the best of a few 256 MiB copies.
    pub fn copy_bandwidth(&self) -> Result<(f64, f64)> {
        device::copy_bandwidth(&self.dev)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Nothing may still read memory that goes with the backend.
        let _ = self.dev.ctx.bind_to_thread();
        let _ = self.dev.compute.synchronize();
        let _ = self.dev.copy.synchronize();
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Staged = CudaStaged;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn stage(&self, host: &Arc<HostWeights>, piece: Piece, names: &[String]) -> Result<CudaStaged> {
        staging::stage(&self.dev, &self.residency, host, piece, names)
    }

    fn weight<'a>(&self, staged: &'a CudaStaged, name: &str) -> Result<Option<&'a CudaWeight>> {
        staged.get(name)
    }

    fn prefetch_depth(&self) -> usize {
        self.opts.prefetch_layers
    }

    fn new_kv_cache(&self, num_layers: usize, kv_dim: usize, max_tokens: usize) -> CudaKvCache {
        CudaKvCache::new(num_layers, kv_dim, max_tokens)
    }

    fn kv_element_bytes(&self) -> usize {
        2 // f16
    }

    fn kv_len(&self, cache: &CudaKvCache) -> usize {
        cache.len()
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], dim: usize) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.embed(table, ids, dim)
    }

    fn add_position_embeddings(
        &self,
        x: &mut CudaTensor,
        table: &CudaWeight,
        positions: &[usize],
    ) -> Result<()> {
        self.dev.bind()?;
        self.dev.add_positions(x, table, positions)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.rms_norm(x, w, eps)
    }

    fn layer_norm(&self, x: &CudaTensor, w: &CudaWeight, b: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.layer_norm(x, w, b, eps)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        out_dim: usize,
    ) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.linear(x, w, bias, out_dim)
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
        self.dev.bind()?;
        self.dev.rope(x, head_dim, cos, sin)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        caches: &mut [&mut CudaKvCache],
        layer: usize,
        layout: &BatchLayout,
        shape: AttentionShape<'_>,
    ) -> Result<CudaTensor> {
        self.dev.bind()?;
        attention::attention(&self.dev, q, k, v, caches, layer, layout, shape)
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.silu_mul(gate, up)
    }

    fn gelu_tanh(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.gelu_tanh(x)
    }

    fn split_cols(&self, x: &CudaTensor, widths: &[usize]) -> Result<Vec<CudaTensor>> {
        self.dev.bind()?;
        self.dev.split_cols(x, widths)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        self.dev.bind()?;
        self.dev.add_assign(x, y)
    }

    fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        self.dev.bind()?;
        self.dev.select_rows(x, rows)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        self.dev.to_host(x)
    }

    fn on_host(&self, x: &mut CudaTensor, f: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        let mut host = self.dev.to_host(x)?;
        f(&mut host)?;
        *x = self.tensor_from_host(&host, x.rows, x.cols)?;
        Ok(())
    }
}
