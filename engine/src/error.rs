//! The engine's one error type. Variants wrap their source; the cluster worker
//! wraps it in its own error (`zeroshard_worker::WorkerError::Engine`) and maps
//! both to status codes in one `match` at its service edge.
use std::path::PathBuf;

use zeroshard_offload::OffloadError;

/// A boxed error from a dependency whose type should not leak into this crate's
/// API (a CUDA library, a weight source's own error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Offload(#[from] OffloadError),
    /// A request the engine cannot run as given (prompt, ids, lengths).
    #[error("{0}")]
    InvalidRequest(String),
    /// A weight the model needs is absent from the provided set.
    #[error("weight `{0}` is missing")]
    MissingWeight(String),
    /// A [`WeightSource`](crate::source::WeightSource) could not deliver a
    /// piece (a cluster worker's gather from its peers failed): the source's
    /// own error, which its owner takes back out (`downcast`).
    #[error(transparent)]
    Weights(BoxError),
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
    /// A tensor-parallel group's exchange failed (a member left, or went
    /// silent): this step cannot complete until the group is formed again.
    #[error("tensor-parallel group: {0}")]
    Group(String),
    /// The device cannot be set up as asked (a CUDA library not on the path,
    /// a memory budget that does not fit); the message names what and the numbers.
    #[error("device setup: {0}")]
    Setup(String),
    /// A file of this process.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// True when the device cannot be trusted again: a worker must leave the
    /// cluster rather than step again.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Device { fatal: true, .. })
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
