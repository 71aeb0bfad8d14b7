//! The worker process of a cluster: serves its owned ranges to peers
//! (`Shards`), takes its plan and sequences from the coordinator (`Worker`),
//! and runs the continuous-batching loop over layers it gathers.
//!
//! ```ignore
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! node::run(NodeConfig { coordinator: "http://127.0.0.1:7000".into(), ..Default::default() }, listener, shutdown).await?;
//! ```
mod batcher;
mod gather;
mod service;
mod store;
mod weights;

use std::path::PathBuf;

use tonic::transport::Channel;

pub use batcher::finish_to_pb;
pub use gather::GatherStats;
pub use service::run;

use crate::error::{Result, WorkerError};

/// How a worker runs.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    /// The coordinator's gRPC address, `http://host:port`.
    pub coordinator: String,
    /// The checkpoint folder, if it differs from the coordinator's path.
    pub model_dir: Option<PathBuf>,
    /// Receive owned ranges from the coordinator instead of reading the checkpoint.
    pub pull: bool,
    /// Layers gathered ahead of the one computing.
    pub prefetch_layers: usize,
    /// Gathered layers kept resident within this many bytes (0 = re-gather every step).
    pub max_live_bytes: u64,
    /// Test hook: corrupt one chunk of every Nth fetch this worker serves (0 = never).
    pub corrupt_every: u64,
    /// Test hook: fail every plan installation.
    pub fail_load: bool,
}

/// A channel to `uri`, connected now, with the bulk-transfer HTTP/2 settings.
pub async fn connect(uri: &str) -> Result<Channel> {
    zeroshard_proto::transport::endpoint(uri)
        .map_err(|e| WorkerError::Gather(format!("{uri}: {e}")))?
        .connect()
        .await
        .map_err(|e| WorkerError::Gather(format!("connecting to {uri}: {e}")))
}

/// A channel to `uri` that connects on first use.
pub fn connect_lazy(uri: &str) -> Result<Channel> {
    Ok(zeroshard_proto::transport::endpoint(uri)
        .map_err(|e| WorkerError::Gather(format!("{uri}: {e}")))?
        .connect_lazy())
}
