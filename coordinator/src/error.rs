//! The coordinator crate's one error type.
use zeroshard_offload::OffloadError;
use zeroshard_worker::WorkerError;

use crate::plan::PlanError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Offload(#[from] OffloadError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The request cannot be served as given.
    #[error("{0}")]
    InvalidRequest(String),
    /// The cluster cannot serve now (not ready, no worker, worker failed).
    #[error("{0}")]
    Unavailable(String),
    /// The membership store (etcd) cannot be reached or holds bad data.
    #[error("membership: {0}")]
    Membership(String),
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError as E;
        match &e {
            E::InvalidRequest(_) | E::Tokenizer(_) => tonic::Status::invalid_argument(e.to_string()),
            E::Worker(WorkerError::InvalidRequest(_)) => tonic::Status::invalid_argument(e.to_string()),
            E::Unavailable(_) | E::Membership(_) | E::Worker(WorkerError::Gather(_)) => {
                tonic::Status::unavailable(e.to_string())
            }
            E::Offload(_) | E::Worker(_) | E::Plan(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;
