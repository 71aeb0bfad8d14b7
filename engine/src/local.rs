//! A whole model in this process, on the CPU or a GPU: what `generate` and
//! `bench` drive (the cluster's workers gather instead: `zeroshard_worker::node`).
//!
//! - [`Device`]: `--device auto|cpu|cuda[:N]`, resolved by probing for CUDA
//!   before anything calls into it ([`Device::resolve`]).
//! - [`place`]: the engine for a model's weights on that device ([`AnyEngine`]),
//!   sized on a GPU for a [`Workload`] within [`GpuOptions`].
//!
//! ```ignore
//! let (config, weights) = load_weights(Path::new("models/stories260K"))?;
//! let placed = place(config, weights, Device::Auto, &GpuOptions::default(), work)?;
//! ```
use std::path::Path;

use zeroshard_offload::{Checkpoint, ModelConfig};

use crate::cpu::CpuBackend;
use crate::cuda::{self, CudaBackend, CudaProbe};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::placement::{place_on_gpu, GpuPlacement};
use crate::weights::HostWeights;
use crate::Backend;

/// Where the engine computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA when present, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device \"{s}\" (expected auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl Device {
    /// The CUDA device to use (`None`: the CPU). `auto` takes device 0 when the
    /// driver and a device are there; `cuda[:N]` without them is an error naming why.
    pub fn resolve(self) -> Result<Option<usize>> {
        match (self, cuda::probe()) {
            (Self::Cpu, _) | (Self::Auto, CudaProbe::Unavailable(_)) => Ok(None),
            (Self::Auto, CudaProbe::Devices(_)) => Ok(Some(0)),
            (Self::Cuda(n), CudaProbe::Devices(count)) if n < count => Ok(Some(n)),
            (Self::Cuda(n), CudaProbe::Devices(count)) => Err(EngineError::InvalidRequest(format!(
                "--device cuda:{n}: this machine has {count} CUDA device(s), cuda:0..cuda:{}",
                count - 1
            ))),
            (Self::Cuda(n), CudaProbe::Unavailable(why)) => Err(EngineError::InvalidRequest(format!(
                "--device cuda:{n}: CUDA is not available here: {why}; use --device cpu or auto"
            ))),
        }
    }
}

/// GPU placement settings (`--gpu-memory`, `--max-live-bytes`, `--prefetch-layers`).
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Device bytes to use in all (default: 90% of what is free).
    pub gpu_memory: Option<u64>,
    /// Device bytes of resident layers at most (default: all that fit).
    pub max_live_bytes: Option<u64>,
    /// Layers copied ahead of the one computing.
    pub prefetch_layers: usize,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self { gpu_memory: None, max_live_bytes: None, prefetch_layers: 2 }
    }
}

/// What a run will ask of the KV cache and activations (sizes the device memory).
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Sequences decoded together.
    pub seqs: usize,
    /// Tokens per sequence, prompt and generated.
    pub tokens_per_seq: usize,
    /// Rows of the largest step (all prompts prefilled together).
    pub max_rows: usize,
}

/// The engine on the device it was placed on.
pub enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Engine<CudaBackend>),
}

/// Runs `$body` with `$e` bound to the engine, whatever its backend.
#[macro_export]
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            $crate::local::AnyEngine::Cpu($e) => $body,
            $crate::local::AnyEngine::Cuda($e) => $body,
        }
    };
}

impl AnyEngine {
    pub fn config(&self) -> &ModelConfig {
        with_engine!(self, e => e.config())
    }

    pub fn backend_name(&self) -> String {
        with_engine!(self, e => e.backend().name())
    }

    /// Host bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        with_engine!(self, e => e.weights().bytes())
    }
}

/// Where a model was placed: the engine, and for a GPU how (one line) and the
/// bytes streamed host → device per step.
pub struct Placed {
    pub engine: AnyEngine,
    pub gpu_summary: Option<String>,
    pub streamed_bytes_per_step: u64,
}

/// Builds the engine for `weights` on `device`, sizing device memory for `work`.
pub fn place(
    config: ModelConfig,
    mut weights: HostWeights,
    device: Device,
    gpu: &GpuOptions,
    work: Workload,
) -> Result<Placed> {
    let Some(ordinal) = device.resolve()? else {
        let engine = AnyEngine::Cpu(Engine::new(CpuBackend::new(), config, weights));
        return Ok(Placed { engine, gpu_summary: None, streamed_bytes_per_step: 0 });
    };
    let p = GpuPlacement {
        gpu_memory: gpu.gpu_memory,
        max_live_bytes: gpu.max_live_bytes,
        prefetch_layers: gpu.prefetch_layers,
        kv_tokens: work.seqs * work.tokens_per_seq.min(config.max_position_embeddings),
        max_rows: work.max_rows,
        max_seqs: work.seqs,
    };
    let placed = place_on_gpu(ordinal, &config, &mut weights, &p)?;
    tracing::info!("cuda:{ordinal}: {}", placed.summary);
    Ok(Placed {
        gpu_summary: Some(placed.summary),
        streamed_bytes_per_step: placed.streamed_bytes_per_step,
        engine: AnyEngine::Cuda(Engine::new(placed.backend, config, weights)),
    })
}

/// Config and weights of a model folder.
pub fn load_weights(dir: &Path) -> Result<(ModelConfig, HostWeights)> {
    let config = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let weights = HostWeights::load(&ckpt, &config)?;
    Ok((config, weights))
}
