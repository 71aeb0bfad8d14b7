//! The partition planner: a pure function from (checkpoint metadata, workers,
//! options) to a [`Plan`] with an epoch. No I/O.
//!
//! - **Partitioned** tensors (the large ones) are split into N contiguous element
//!   ranges, one per worker in rank order (the order of `workers`): worker `r`
//!   owns range `r`. Ranges are made of whole digest blocks
//!   ([`BLOCK_BYTES`](crate::digest::BLOCK_BYTES) of host bytes, `BLOCK_BYTES /
//!   elem_bytes` elements; the tensor's last block may be short), so every block
//!   has one holder that can serve it whole and a receiver can verify it against
//!   the checkpoint's digest. A tensor of `b` blocks gives each rank `floor(b / N)`
//!   blocks and `b mod N` ranks one more: the ranks `t, t+1, …` (mod N) for the
//!   tensor's index `t` in name order, so tensors of one block do not all land on
//!   rank 0. Ranges can be empty (fewer blocks than workers).
//! - **Persistent** tensors, whose host size (`numel × elem_bytes`) is under
//!   `persistence_threshold_bytes`, are held whole by every worker.
//! - **Replicas**: with `replicas = R`, range `r` is also held by ranks
//!   `r+1, …, r+R-1` (mod N), so R-1 workers can die without losing a range.
//!   The first holder of a shard is its primary owner.
//!
//! ```ignore
//! let meta = TensorMeta::from_specs(&tensor_specs(&config));
//! let plan = plan(&meta, &[WorkerId(1), WorkerId(2)], &PlanOptions { epoch: 7, ..Default::default() })?;
//! for r in plan.owned_ranges(WorkerId(2)) { load(r.tensor, r.elements) }
//! for piece in plan.owners("model.layers.0.mlp.up_proj.weight", 0..4096)? { fetch(piece.holders[0], piece.elements) }
//! ```
mod partition;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

use crate::digest::BLOCK_BYTES;

pub use partition::{OwnedBytes, OwnedRange, Piece, Placement, Plan, Shard, TensorPlan};

/// Tensors below 64 KiB (norm weights, biases) are replicated by default.
pub const DEFAULT_PERSISTENCE_THRESHOLD_BYTES: u64 = 64 << 10;

/// A worker's identity in a plan (assigned by membership).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// What the planner needs to know of one checkpoint tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<u64>,
    /// The decoder layer it belongs to; `None` for embedding, final norm, head.
    pub layer: Option<u32>,
}

impl TensorMeta {
    pub fn new(name: impl Into<String>, shape: Vec<u64>, layer: Option<u32>) -> Self {
        Self { name: name.into(), shape, layer }
    }

    /// Elements (1 for a scalar, whose shape is empty).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// What a worker is told when a plan is installed: the plan, which worker it
/// is, and where its peers serve their shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub plan: Plan,
    pub worker: WorkerId,
    /// The gRPC address of every worker of the plan, in rank order.
    pub peers: Vec<(WorkerId, String)>,
    /// Load owned ranges from this Shards endpoint instead of the checkpoint.
    pub pull_from: Option<String>,
    /// The checkpoint's digest of every block of every tensor of the plan.
    pub digests: std::sync::Arc<crate::digest::BlockDigests>,
    /// The coordinator's `Shards` endpoint, which reads the checkpoint: where a
    /// block no holder served intact is fetched from.
    pub coordinator_shards: Option<String>,
}

/// The knobs of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// The plan's epoch (the coordinator increments it on every re-plan).
    pub epoch: u64,
    /// Tensors whose host size is below this are replicated on every worker.
    pub persistence_threshold_bytes: u64,
    /// Workers holding each partitioned range (1 = no redundancy), 1..=N.
    pub replicas: u32,
    /// Bytes per element in the host store (2: f16).
    pub elem_bytes: u32,
    /// The tensor placement: workers in groups of this many (consecutive in
    /// rank order, `replicas` groups), each computing its tensor-parallel shard
    /// of every layer (see `zeroshard_engine::tensor`). 0: the gather placement.
    pub tensor_degree: u32,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            epoch: 0,
            persistence_threshold_bytes: DEFAULT_PERSISTENCE_THRESHOLD_BYTES,
            replicas: 1,
            elem_bytes: 2,
            tensor_degree: 0,
        }
    }
}

/// Why a plan cannot be made (or a received one is not valid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a plan needs at least one worker")]
    NoWorkers,
    #[error("{0} is listed twice")]
    DuplicateWorker(WorkerId),
    #[error("tensor `{0}` is listed twice")]
    DuplicateTensor(String),
    #[error("replicas must be between 1 and the number of workers ({workers}), got {replicas}")]
    InvalidReplicas { replicas: u32, workers: usize },
    #[error("elem_bytes must be positive")]
    InvalidElemBytes,
    #[error("tensor `{name}` of shape {shape:?} is too large")]
    TooLarge { name: String, shape: Vec<u64> },
    #[error("unknown tensor `{0}`")]
    UnknownTensor(String),
    #[error("{0} is not in the plan")]
    UnknownWorker(WorkerId),
    #[error("tensor `{name}` has {numel} elements; range {start}..{end} is outside it")]
    OutOfRange { name: String, numel: u64, start: u64, end: u64 },
    /// A message received over the wire lacks a required field.
    #[error("invalid plan message: `{0}` is missing")]
    MissingField(&'static str),
    /// A plan received from elsewhere breaks an invariant.
    #[error("invalid plan: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, PlanError>;

/// Partitions `meta` across `workers` (in rank order). Deterministic: the same
/// tensors in any order, with the same workers and options, give the same plan.
pub fn plan(meta: &[TensorMeta], workers: &[WorkerId], options: &PlanOptions) -> Result<Plan> {
    check_workers(workers)?;
    let n_workers = workers.len();
    if options.replicas == 0 || options.replicas as usize > n_workers {
        return Err(PlanError::InvalidReplicas { replicas: options.replicas, workers: n_workers });
    }
    check_groups(options, n_workers)?;
    if options.elem_bytes == 0 {
        return Err(PlanError::InvalidElemBytes);
    }
    let mut sorted: Vec<&TensorMeta> = meta.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = sorted.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(PlanError::DuplicateTensor(w[0].name.clone()));
    }
    let tensors = sorted
        .into_iter()
        .enumerate()
        .map(|(i, t)| place(t, i as u64, workers, options))
        .collect::<Result<Vec<_>>>()?;
    Ok(Plan::from_parts_unchecked(options, workers.to_vec(), tensors))
}

/// Under the tensor placement, `replicas` groups of `tensor_degree` workers
/// must be exactly the workers.
fn check_groups(options: &PlanOptions, workers: usize) -> Result<()> {
    let d = options.tensor_degree as usize;
    if d != 0 && d * options.replicas as usize != workers {
        return Err(PlanError::Invalid(format!(
            "{} tensor-parallel groups of {d} workers are not the plan's {workers} workers",
            options.replicas
        )));
    }
    Ok(())
}

/// Errors for an empty or repeating worker list.
fn check_workers(workers: &[WorkerId]) -> Result<()> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let mut seen = HashSet::with_capacity(workers.len());
    match workers.iter().find(|w| !seen.insert(**w)) {
        Some(w) => Err(PlanError::DuplicateWorker(*w)),
        None => Ok(()),
    }
}

/// The placement and shards of tensor number `index` (in name order).
fn place(t: &TensorMeta, index: u64, workers: &[WorkerId], options: &PlanOptions) -> Result<TensorPlan> {
    let too_large = || PlanError::TooLarge { name: t.name.clone(), shape: t.shape.clone() };
    let numel = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(too_large)?;
    let bytes = numel.checked_mul(u64::from(options.elem_bytes)).ok_or_else(too_large)?;
    let n = workers.len() as u64;
    let (placement, shards) = if bytes < options.persistence_threshold_bytes {
        (Placement::Persistent, vec![Shard { elements: 0..numel, holders: workers.to_vec() }])
    } else {
        let per_block = (BLOCK_BYTES as u64 / u64::from(options.elem_bytes)).max(1);
        let blocks = numel.div_ceil(per_block);
        let (base, extra) = (blocks / n, blocks % n);
        let mut start_block = 0;
        let shards = (0..n)
            .map(|r| {
                // Ranks index, index+1, … (mod N) take one block more.
                let count = base + u64::from((r + n - index % n) % n < extra);
                let start = (start_block * per_block).min(numel);
                start_block += count;
                let end = (start_block * per_block).min(numel);
                let holders =
                    (0..u64::from(options.replicas)).map(|k| workers[((r + k) % n) as usize]).collect();
                Shard { elements: start..end, holders }
            })
            .collect();
        (Placement::Partitioned, shards)
    };
    Ok(TensorPlan { meta: t.clone(), placement, shards })
}
