//! The coordinator crate's one error type.
use zeroshard_offload::OffloadError;

use crate::plan::PlanError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Offload(#[from] OffloadError),
    #[error(transparent)]
    Membership(#[from] zeroshard_membership::MembershipError),
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
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError as E;
        match &e {
            E::InvalidRequest(_) | E::Tokenizer(_) | E::Offload(OffloadError::InvalidRequest(_)) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            E::Unavailable(_) | E::Membership(_) => tonic::Status::unavailable(e.to_string()),
            E::Offload(_) | E::Plan(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;
