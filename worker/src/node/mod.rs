//! The worker process of a cluster: serves its owned ranges to peers
//! (`Shards`), takes its plan and sequences from the coordinator (`Worker`),
//! and runs the continuous-batching loop over layers it gathers, on the CPU or
//! a CUDA device ([`NodeConfig::on_device`]; the caller has resolved `--device`).
//!
//! ```ignore
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let registrar = Arc::new(ControlRegistrar::new("http://127.0.0.1:7000"));
//! node::run(NodeConfig::default(), registrar, listener, shutdown).await?;
//! ```
mod batcher;
mod faults;
pub(crate) mod gather;
pub(crate) mod group;
mod state;
mod store;
mod weights;

use std::path::PathBuf;

use std::time::Duration;
use zeroshard_security::Security;

use zeroshard_offload::ModelConfig;

pub(crate) use batcher::{Command, SeqEvent};
pub use faults::Faults;
pub use state::available_memory;
pub(crate) use state::Node;
pub use zeroshard_membership::{Announce, Registrar};

pub use crate::rpc::control::ControlRegistrar;
pub use crate::rpc::service::run;
use zeroshard_engine::cpu::CpuBackend;

/// The model a plan names: its folder as the coordinator sees it, and its config.
pub struct PlannedModel {
    pub dir: PathBuf,
    pub config: ModelConfig,
}

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `cpu` or `cuda:N`, as announced to the cluster (see [`NodeConfig::on_device`]).
    pub device: String,
    /// The CUDA device the batching loop computes on (`None`: the CPU).
    pub cuda: Option<usize>,
    /// On a GPU: device bytes to use in all (default: 90% of what is free);
    /// starting refuses, with the numbers, when one layer does not fit.
    pub gpu_memory: Option<u64>,
    /// The checkpoint folder, if it differs from the coordinator's path.
    pub model_dir: Option<PathBuf>,
    /// Receive owned ranges from the coordinator instead of reading the checkpoint.
    pub pull: bool,
    /// Layers gathered ahead of the one computing.
    pub prefetch_layers: usize,
    /// Bytes gathered ahead beyond the first prefetched layer (keeps a large
    /// head from stacking on two layers in memory).
    pub prefetch_bytes: u64,
    /// Gathered layers kept resident within this many bytes (0 = re-gather every
    /// step); on a GPU, the device bytes of resident layers.
    pub max_live_bytes: u64,
    /// Test hooks (none without the `fault-injection` feature).
    pub faults: Faults,
    /// KV-cache bytes the sequences admitted here may reserve together (None:
    /// on the CPU, half the memory available when the first plan arrives,
    /// less the bytes that plan gives this worker; on a GPU, what the device
    /// placement reserves for the cache).
    pub kv_cache_bytes: Option<u64>,
    /// Sequences run at once at most.
    pub max_active_sequences: usize,
    /// A peer that sends nothing for this long during a fetch has failed (the
    /// fetch goes to another holder, or is retried).
    pub fetch_timeout: Duration,
    /// TLS credentials for its servers and the channels it opens (plaintext by default).
    pub security: Security,
    /// The host (or host:port) peers and the coordinator dial this worker at
    /// (default: the bound address).
    pub advertise: Option<String>,
    /// Where to serve plaintext `grpc.health.v1` (SERVING from registration
    /// until the drain begins).
    pub health_listen: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            cuda: None,
            gpu_memory: None,
            model_dir: None,
            pull: false,
            prefetch_layers: 2,
            prefetch_bytes: 24 << 20,
            max_live_bytes: 0,
            faults: Faults::default(),
            kv_cache_bytes: None,
            max_active_sequences: 64,
            fetch_timeout: Duration::from_secs(2),
            security: Security::default(),
            advertise: None,
            health_listen: None,
        }
    }
}

impl NodeConfig {
    /// Computes on CUDA device `ordinal`, or the CPU for `None`, and announces it.
    pub fn on_device(mut self, cuda: Option<usize>) -> Self {
        self.device = cuda.map_or_else(|| "cpu".into(), |n| format!("cuda:{n}"));
        self.cuda = cuda;
        self
    }

    /// The CPU backend the batching loop computes with.
    pub(crate) fn cpu_backend(&self) -> CpuBackend {
        self.faults.step_fault().map_or_else(CpuBackend::new, CpuBackend::with_fault)
    }
}
