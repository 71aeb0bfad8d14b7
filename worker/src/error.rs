//! The worker crate's one error type. Variants wrap their source; the `Worker`
//! and `Shards` services map them to status codes in one `match`
//! (`rpc::convert::status`).
use std::path::PathBuf;

use zeroshard_offload::plan::PlanError;
use zeroshard_offload::shards::ShardError;
use zeroshard_offload::OffloadError;

/// A boxed error from a dependency whose type should not leak into this crate's
/// API (a gRPC transport, etcd).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Offload(#[from] OffloadError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Serving or receiving shard ranges failed (a range not held, a chunk that
    /// failed its checksum, a transfer cut short).
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A request the engine cannot run as given (prompt, ids, lengths, a plan
    /// for another worker or an epoch not prepared).
    #[error("{0}")]
    InvalidRequest(String),
    /// This worker's copy of the checkpoint is not the coordinator's: a block
    /// it loaded fails the digest the plan carries.
    #[error("{path}: {source} (this worker's copy of the checkpoint differs from the coordinator's)")]
    CorruptCopy {
        path: std::path::PathBuf,
        #[source]
        source: zeroshard_offload::digest::DigestError,
    },
    /// The worker has no room for the sequence now (its KV-cache budget or
    /// its cap on sequences): the caller may try again later or elsewhere.
    #[error("{0}")]
    Overloaded(String),
    /// The worker is draining (SIGTERM): it hands its sequences back, to be
    /// continued elsewhere from the tokens already sent.
    #[error("{0}")]
    Draining(String),
    /// A gather abandoned because its epoch was replaced while it waited on a
    /// holder that left: the step fails at once, the worker is fine.
    #[error("gather abandoned: {0}")]
    Abandoned(String),
    /// A plan epoch this worker does not hold, or has not prepared.
    #[error("{0}")]
    Epoch(String),
    /// A weight the model needs is absent from the provided set.
    #[error("weight `{0}` is missing")]
    MissingWeight(String),
    /// A backend operation failed. `fatal`: the device cannot be trusted again
    /// (any CUDA error: a sticky context error, lost device, out of memory
    /// mid-step); otherwise only this step failed.
    #[error("{op}: {source}")]
    Device {
        op: String,
        fatal: bool,
        #[source]
        source: BoxError,
    },
    /// The device cannot be set up as asked (a CUDA library not on the path,
    /// a memory budget that does not fit); the message names what and the numbers.
    #[error("device setup: {0}")]
    Setup(String),
    /// Gathering a layer's ranges from its holders failed, after fail-over and
    /// retries: each holder's last error, in the order tried.
    #[error("gather: {0}")]
    Gather(String),
    /// A call to another member (a peer's `Shards`, the coordinator's `Control`).
    #[error("{peer}: {source}")]
    Rpc {
        peer: String,
        #[source]
        source: BoxError,
    },
    /// The membership store (etcd) failed or holds bad data.
    #[error("membership at {endpoint}: {source}")]
    Membership {
        endpoint: String,
        #[source]
        source: BoxError,
    },
    /// A file or socket of this process.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A task or thread of this worker ended unexpectedly.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: BoxError,
    },
}

impl WorkerError {
    /// True when the device cannot be trusted again: the worker must leave the
    /// cluster rather than step again.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Device { fatal: true, .. })
    }

    pub(crate) fn rpc(peer: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Rpc { peer: peer.into(), source: source.into() }
    }
}

pub type Result<T> = std::result::Result<T, WorkerError>;
