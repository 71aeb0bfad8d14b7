//! The worker crate's one error type. Variants wrap their source (the engine's
//! error among them); the `Worker` and `Shards` services map them to status
//! codes in one `match` (`rpc::convert::status`).
use std::path::PathBuf;

use zeroshard_engine::EngineError;
use zeroshard_offload::plan::PlanError;
use zeroshard_offload::shards::ShardError;
use zeroshard_offload::OffloadError;

/// A boxed error from a dependency whose type should not leak into this crate's
/// API (a gRPC transport, etcd).
pub(crate) use zeroshard_engine::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The engine failed: a request it cannot run, a weight missing, a device
    /// error (see [`EngineError::is_fatal`]).
    #[error(transparent)]
    Engine(EngineError),
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
        matches!(self, Self::Engine(e) if e.is_fatal())
    }

    pub(crate) fn rpc(peer: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Rpc { peer: peer.into(), source: source.into() }
    }
}

/// The engine's error, unless it carries a worker error a [`WeightSource`]
/// of this crate raised (a gather that failed), which comes back as itself.
///
/// [`WeightSource`]: zeroshard_engine::WeightSource
impl From<EngineError> for WorkerError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Weights(source) => match source.downcast::<WorkerError>() {
                Ok(mine) => *mine,
                Err(other) => Self::Engine(EngineError::Weights(other)),
            },
            e => Self::Engine(e),
        }
    }
}

/// A worker error raised inside a [`WeightSource`](zeroshard_engine::WeightSource),
/// carried through the engine's step.
impl From<WorkerError> for EngineError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Engine(e) => e,
            e => EngineError::Weights(Box::new(e)),
        }
    }
}

pub type Result<T> = std::result::Result<T, WorkerError>;
