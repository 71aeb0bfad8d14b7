//! Putting a single-node model on a GPU: what it needs on the device
//! ([`gpu_demand`], pure), how `--gpu-memory` / `--max-live-bytes` split that
//! ([`zeroshard_offload::gpu_budget`]), and the backend that follows
//! ([`place_on_gpu`]): resident layers, the staging ring for the rest, and the
//! host weights moved to pinned memory when some layers are streamed.
//! A cluster worker opens its device with [`open_for_cluster`]: the same sizing,
//! with [`GpuPlacement::cluster_worker`] and no host store to pin (its layers are
//! gathered from peers each step).
//!
//! ```ignore
//! let opts = GpuPlacement { gpu_memory: None, max_live_bytes: None, prefetch_layers: 2, kv_tokens: 4096, max_rows: 512, max_seqs: 8 };
//! let placed = place_on_gpu(0, &config, &mut weights, &opts)?;
//! println!("{}", placed.summary);  // "22/22 layers resident (2101.9 MiB), ..."
//! let engine = Engine::new(placed.backend, config, weights);
//! ```
use crate::pinned::HostAlloc;
use zeroshard_offload::gpu_budget::{size_gpu_memory, GpuBudget, GpuDemand};
use zeroshard_offload::ModelConfig;

use crate::cuda::{self, CudaBackend, CudaOptions};
use crate::error::{EngineError, Result};
use crate::model::tensor_specs;
use crate::weights::HostWeights;

/// The device memory a run may use, and what it will hold.
#[derive(Clone, Debug)]
pub struct GpuPlacement {
    /// Device bytes to use in all (default: 90% of what is free).
    pub gpu_memory: Option<u64>,
    /// Device bytes of resident layers at most (default: what `gpu_memory` leaves).
    pub max_live_bytes: Option<u64>,
    /// Layers copied ahead of the one computing.
    pub prefetch_layers: usize,
    /// Tokens the KV cache must hold, over all sequences.
    pub kv_tokens: usize,
    /// Rows of the largest step (a batch's prefill).
    pub max_rows: usize,
    /// Sequences decoded together.
    pub max_seqs: usize,
}

/// Sequences a cluster worker's device memory is sized for: its batches are
/// not known ahead (the KV cache grows past this on demand, if memory allows).
pub(crate) const CLUSTER_SEQS: usize = 16;
/// Tokens per sequence a cluster worker's KV cache is sized for (at most the
/// model's context).
pub(crate) const CLUSTER_TOKENS_PER_SEQ: usize = 1024;

impl GpuPlacement {
    /// A cluster worker's placement: `max_live_bytes` of resident layers at
    /// most (0: every layer streams through the staging ring), the KV cache and
    /// activations for [`CLUSTER_SEQS`] sequences of [`CLUSTER_TOKENS_PER_SEQ`].
    /// `kv_cache_bytes` (`--kv-cache-bytes`) sizes the cache instead, when given.
    pub fn cluster_worker(
        config: &ModelConfig,
        gpu_memory: Option<u64>,
        max_live_bytes: u64,
        prefetch_layers: usize,
        kv_cache_bytes: Option<u64>,
    ) -> Self {
        let tokens = CLUSTER_TOKENS_PER_SEQ.min(config.max_position_embeddings);
        let per_token = kv_bytes_per_token(config);
        let kv_tokens = kv_cache_bytes.map_or(CLUSTER_SEQS * tokens, |b| (b / per_token.max(1)) as usize);
        Self {
            gpu_memory,
            max_live_bytes: Some(max_live_bytes),
            prefetch_layers,
            kv_tokens,
            max_rows: CLUSTER_SEQS * 32,
            max_seqs: CLUSTER_SEQS,
        }
    }
}

/// A backend placed for a model, and how.
pub struct Placed {
    pub backend: CudaBackend,
    pub budget: GpuBudget,
    /// Bytes copied host → device per step (the streamed layers).
    pub streamed_bytes_per_step: u64,
    /// One line: layers resident and streamed, ring, memory.
    pub summary: String,
}

const MIB: f64 = (1u64 << 20) as f64;

/// The largest head the CUDA attention kernel takes (its `MAX_HEAD_DIM`).
pub(crate) const HEAD_DIM_MAX: usize = 256;

/// Device bytes one token takes in the KV cache, over every layer (f16 keys and values).
pub fn kv_bytes_per_token(config: &ModelConfig) -> u64 {
    (config.num_layers * 2 * config.kv_dim() * 2) as u64
}

/// What `config` needs on the device for `p` (activation workspace estimated
/// from the largest step: ~12 f16 values per hidden unit and row, the logits,
/// and 64 MiB for cuBLAS and the pool's rounding).
pub(crate) fn gpu_demand(config: &ModelConfig, p: &GpuPlacement) -> GpuDemand {
    let outer: usize = tensor_specs(config).iter().filter(|s| s.layer.is_none()).map(|s| s.numel()).sum();
    let kv = p.kv_tokens as u64 * kv_bytes_per_token(config);
    let per_row =
        4 * config.hidden_size + 3 * config.intermediate_size + config.q_dim() + 2 * config.kv_dim();
    let workspace = (p.max_rows * per_row * 2 * 2 + p.max_seqs * config.vocab_size * 2) as u64 + (64 << 20);
    GpuDemand {
        layer_bytes: cuda::layer_bytes(config),
        outer_bytes: (outer * 2) as u64 + 256 * 8,
        kv_bytes: kv,
        workspace_bytes: workspace,
        prefetch_layers: p.prefetch_layers,
    }
}

/// Sizes device memory for `config` on device `ordinal`, opens the backend, and
/// moves `weights` to pinned host memory when some layers will be streamed.
/// Refuses with the numbers when not even one layer fits.
pub(crate) fn place_on_gpu(
    ordinal: usize,
    config: &ModelConfig,
    weights: &mut HostWeights,
    p: &GpuPlacement,
) -> Result<Placed> {
    let (backend, budget, demand, gpu_memory) = open_sized(ordinal, config, p)?;
    let streamed: u64 = demand.layer_bytes[budget.resident_layers..].iter().sum();
    if streamed > 0 {
        weights.move_to(&HostAlloc::pinned(backend.context()));
    }
    let host = if weights.is_pinned() { "pinned" } else { "pageable" };
    Ok(placed(backend, budget, &demand, gpu_memory, host))
}

/// Sizes device memory for a cluster worker computing `config` on device
/// `ordinal` and opens the backend. Its layers arrive gathered from peers each
/// step: the resident ones (`p.max_live_bytes`) are copied once, the others go
/// through the staging ring from pageable memory. Refuses with the numbers when
/// not even one layer fits.
pub fn open_for_cluster(ordinal: usize, config: &ModelConfig, p: &GpuPlacement) -> Result<Placed> {
    let (backend, budget, demand, gpu_memory) = open_sized(ordinal, config, p)?;
    Ok(placed(backend, budget, &demand, gpu_memory, "gathered"))
}

/// The budget for `p` on device `ordinal`, and the backend opened with it.
fn open_sized(
    ordinal: usize,
    config: &ModelConfig,
    p: &GpuPlacement,
) -> Result<(CudaBackend, GpuBudget, GpuDemand, u64)> {
    if config.head_dim > HEAD_DIM_MAX {
        return Err(EngineError::InvalidRequest(format!(
            "head_dim {} is above the CUDA backend's {HEAD_DIM_MAX}; use --device cpu",
            config.head_dim
        )));
    }
    let demand = gpu_demand(config, p);
    let gpu_memory = match p.gpu_memory {
        Some(b) => b,
        None => (cuda::device_memory(ordinal)?.0 as f64 * 0.9) as u64,
    };
    let budget = budget_within(&demand, gpu_memory, p)?;
    let opts = CudaOptions {
        ordinal,
        max_live_layer_bytes: budget.resident_bytes,
        prefetch_layers: p.prefetch_layers,
        slot_bytes: budget.slot_bytes,
    };
    Ok((CudaBackend::new(&opts)?, budget, demand, gpu_memory))
}

/// Splits `gpu_memory` for `demand`, with fewer resident layers than memory
/// allows when `p.max_live_bytes` caps them (the leading ones within the cap).
fn budget_within(demand: &GpuDemand, gpu_memory: u64, p: &GpuPlacement) -> Result<GpuBudget> {
    let mut budget = size_gpu_memory(demand, gpu_memory)?;
    if let Some(cap) = p.max_live_bytes {
        let mut bytes = 0;
        let keep = demand.layer_bytes.iter().take_while(|b| {
            bytes += **b;
            bytes <= cap
        });
        let n = keep.count().min(budget.resident_layers);
        if n < demand.layer_bytes.len() {
            budget.resident_layers = n;
            budget.resident_bytes = demand.layer_bytes[..n].iter().sum();
            budget.staging_slots = p.prefetch_layers + 1;
            if budget.total_bytes() > gpu_memory {
                return Err(EngineError::Setup(format!(
                    "--max-live-bytes {cap} with --prefetch-layers {} needs {:.1} MiB, more than --gpu-memory {:.1} MiB",
                    p.prefetch_layers,
                    budget.total_bytes() as f64 / MIB,
                    gpu_memory as f64 / MIB
                )));
            }
        }
    }
    Ok(budget)
}

/// The placement's one-line summary; `host` says where streamed layers come from.
fn placed(
    backend: CudaBackend,
    budget: GpuBudget,
    demand: &GpuDemand,
    gpu_memory: u64,
    host: &str,
) -> Placed {
    let streamed: u64 = demand.layer_bytes[budget.resident_layers..].iter().sum();
    let summary = format!(
        "{}/{} layers resident ({:.1} MiB), {} streamed through {} staging slots of {:.1} MiB from {host} host memory; \
         KV cache {:.1} MiB, device budget {:.1} MiB",
        budget.resident_layers,
        demand.layer_bytes.len(),
        budget.resident_bytes as f64 / MIB,
        demand.layer_bytes.len() - budget.resident_layers,
        budget.staging_slots,
        budget.slot_bytes as f64 / MIB,
        demand.kv_bytes as f64 / MIB,
        gpu_memory as f64 / MIB,
    );
    Placed { backend, streamed_bytes_per_step: streamed, budget, summary }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroshard_offload::Architecture;

    fn tinyllama() -> ModelConfig {
        ModelConfig::synthetic(Architecture::Llama, 2048, 22, 32, 4, 5632, 32000)
    }

    #[test]
    fn tinyllama_demand_and_a_budget_that_streams() {
        let c = tinyllama();
        let p = GpuPlacement {
            gpu_memory: None,
            max_live_bytes: None,
            prefetch_layers: 2,
            kv_tokens: 32 * 128,
            max_rows: 32 * 32,
            max_seqs: 32,
        };
        let d = gpu_demand(&c, &p);
        // A layer: 2 norms + q, o [2048²] + k, v [256, 2048] + 3 × [5632, 2048], f16.
        let layer = 2 * 4096 + 2 * 2048 * 2048 * 2 + 2 * 256 * 2048 * 2 + 3 * 5632 * 2048 * 2;
        assert_eq!(d.layer_bytes, vec![layer as u64; 22]);
        // Embedding and untied head [32000, 2048] + final norm.
        assert_eq!(d.outer_bytes, (2 * 32000 * 2048 + 2048) * 2 + 2048);
        // KV: 4096 tokens × 22 layers × K and V × 256 × f16.
        assert_eq!(d.kv_bytes, 4096 * 22 * 2 * 256 * 2);
        let all = d.outer_bytes + d.kv_bytes + d.workspace_bytes + 22 * layer as u64;
        assert_eq!(size_gpu_memory(&d, all).expect("fits").resident_layers, 22);
        let b = size_gpu_memory(&d, all / 2).expect("streams");
        assert!(b.resident_layers > 0 && b.resident_layers < 22 && b.staging_slots == 3);
        let err = size_gpu_memory(&d, d.outer_bytes).expect_err("too small").to_string();
        assert!(err.contains("too small to run even one layer"), "{err}");
    }

    #[test]
    fn max_live_bytes_caps_the_resident_layers() {
        let c = tinyllama();
        let p = |cap| GpuPlacement::cluster_worker(&c, None, cap, 2, None);
        let d = gpu_demand(&c, &p(0));
        let layer = d.layer_bytes[0];
        let plenty = 1 << 40;
        let all = budget_within(&d, plenty, &GpuPlacement { max_live_bytes: None, ..p(0) }).expect("fits");
        assert_eq!((all.resident_layers, all.staging_slots), (22, 0));
        let none = budget_within(&d, plenty, &p(0)).expect("streams");
        assert_eq!((none.resident_layers, none.resident_bytes, none.staging_slots), (0, 0, 3));
        let one = budget_within(&d, plenty, &p(layer + layer / 2)).expect("one resident");
        assert_eq!((one.resident_layers, one.resident_bytes), (1, layer));
        assert_eq!(budget_within(&d, plenty, &p(u64::MAX)).expect("all").resident_layers, 22);
        // Memory for the ring and one layer: the cap cannot add a second.
        let fixed = d.outer_bytes + d.kv_bytes + d.workspace_bytes;
        assert_eq!(budget_within(&d, fixed + 4 * layer, &p(2 * layer)).expect("fits").resident_layers, 1);
        // Memory for every layer but no ring: capping at 21 needs 21 + 3 slots.
        let exact = fixed + 22 * layer;
        assert_eq!(budget_within(&d, exact, &p(19 * layer)).expect("fits").resident_layers, 19);
        let err = budget_within(&d, exact, &p(21 * layer)).expect_err("too much").to_string();
        assert!(err.contains("--max-live-bytes") && err.contains("more than --gpu-memory"), "{err}");
    }
}
