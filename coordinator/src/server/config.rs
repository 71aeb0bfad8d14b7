//! How a coordinator runs a cluster ([`ClusterConfig`]) and what clients may
//! ask of it ([`RequestLimits`], and the fixed bounds on stop strings).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use zeroshard_security::{ApiKeys, Security};

/// How the coordinator runs a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub model_dir: PathBuf,
    /// Workers to wait for before the first plan.
    pub workers: usize,
    pub persistence_threshold_bytes: u64,
    /// Tell workers to pull their ranges from this coordinator.
    pub pull: bool,
    /// Every range is held by this many workers (at most the number of workers).
    pub replicas: u32,
    /// A worker silent for this long is lost (embedded membership's lease).
    pub lease_ttl: Duration,
    /// TLS credentials of the coordinator's server and its channels to workers.
    pub security: Security,
    /// Keys a client may present instead of a client certificate.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// What requests may ask, and how long a step may take.
    pub limits: RequestLimits,
    /// On shutdown, how long running requests may take to finish.
    pub drain_timeout: Duration,
    /// What moves between workers: weights (gather) or activations (tensor).
    pub placement: Placement,
    /// The least time a worker gets to install a plan; it gets 1 s more per
    /// `INSTALL_BYTES_PER_S` of ranges it loads (see [`Self::install_deadline`]).
    pub install_timeout: Duration,
    /// The fraction of finished sequences audited on another worker (0: none).
    pub audit_fraction: f64,
}

/// The slowest load rate an install deadline allows for: a worker loading
/// `b` bytes gets `install_timeout + b / INSTALL_BYTES_PER_S` (a slow disk or a
/// slow pull; 70 GB over 8 workers: 30 s + 3 min).
pub(super) const INSTALL_BYTES_PER_S: u64 = 50_000_000;

impl ClusterConfig {
    /// How long a worker that loads `bytes` may take to install a plan.
    pub fn install_deadline(&self, bytes: u64) -> Duration {
        self.install_timeout + Duration::from_secs_f64(bytes as f64 / INSTALL_BYTES_PER_S as f64)
    }
}

/// Which placement the coordinator plans (see `DESIGN.md`, "Placements").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// Every worker gathers each layer's missing ranges from its holders.
    #[default]
    Gather,
    /// `replicas` groups of workers, each computing its tensor-parallel shard
    /// of every layer and exchanging activations. An epoch whose workers the
    /// model cannot split so (a degree its KV heads do not divide, a GPT-2 or
    /// BLOOM model) is planned as gather, and says so.
    Tensor,
    /// Each epoch the one the cost model predicts decodes fastest at the
    /// batch the workers admit, from each worker's calibration and the link
    /// measured between workers (`zeroshard plan` shows the same model).
    Auto,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gather => "gather",
            Self::Tensor => "tensor",
            Self::Auto => "auto",
        }
    }
}

/// Bounds on what clients send, each checked before any work.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Requests waiting for room, at most (`--max-queued-requests`).
    pub max_queued_requests: usize,
    /// Bytes of prompt text, at most (None: `PROMPT_BYTES_PER_POSITION`
    /// per position of the model's context).
    pub max_prompt_bytes: Option<usize>,
    /// The floor of every step deadline (`--step-deadline-ms`).
    pub step_deadline: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_queued_requests: 256, max_prompt_bytes: None, step_deadline: Duration::from_secs(10) }
    }
}

/// Default prompt-size bound: bytes of text per position of the model's
/// context (tokens of real text average 3–5 bytes; 64 leaves room for any).
pub(super) const PROMPT_BYTES_PER_POSITION: usize = 64;
/// Stop strings per request, and bytes per stop string, at most.
pub(super) const MAX_STOP_STRINGS: usize = 16;
pub(super) const MAX_STOP_BYTES: usize = 1024;
