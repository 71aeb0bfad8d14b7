//! The worker crate's one error type.
use zeroshard_offload::OffloadError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Offload(#[from] OffloadError),
    /// A request the engine cannot run as given (prompt, ids, lengths).
    #[error("{0}")]
    InvalidRequest(String),
    /// A weight the model needs is absent from the provided set.
    #[error("weight `{0}` is missing")]
    MissingWeight(String),
    #[error("backend: {0}")]
    Backend(String),
    /// A backend operation failed. `fatal`: the device cannot be trusted again (any CUDA error: a sticky context error, lost device, out of memory mid-step); otherwise only this step failed.
    #[error("{op}: {source}")]
    Device {
        op: String,
        fatal: bool,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Gathering a layer's ranges from peers failed.
    #[error("gather: {0}")]
    Gather(String),
    /// Loading this worker's owned ranges failed.
    #[error("loading owned ranges: {0}")]
    Load(String),
    /// Registering with the cluster (coordinator or etcd) failed.
    #[error("membership: {0}")]
    Membership(String),
}

impl WorkerError {
    /// Whether the device that produced this error must not be used again (only
    /// [`WorkerError::Device`] with `fatal`); any other error failed one request or step.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Device { fatal: true, .. })
    }
}

pub type Result<T> = std::result::Result<T, WorkerError>;
