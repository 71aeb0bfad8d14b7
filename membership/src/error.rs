//! The membership crate's one error type.
use zeroshard_offload::plan::PlanError;

/// A membership store that cannot be used, or holds data that does not parse.
/// Messages name the endpoints and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The settings cannot work (no endpoint, a bad cluster name).
    #[error("{0}")]
    Invalid(String),
    #[error("etcd unreachable at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    /// A request that failed after the retries of one call.
    #[error("etcd {endpoints}: {what}: {source}")]
    Request {
        endpoints: String,
        what: String,
        #[source]
        source: crate::etcd::Failure,
    },
    /// A key whose value is not what this version writes.
    #[error("{key} in {endpoints}: {reason}")]
    BadValue { key: String, endpoints: String, reason: String },
    /// The coordinator's `Control` service (embedded membership) refused or
    /// could not be reached.
    #[error("coordinator {endpoint}: {source}")]
    Coordinator {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

pub type Result<T> = std::result::Result<T, MembershipError>;
