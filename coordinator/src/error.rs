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

pub type Result<T> = std::result::Result<T, CoordinatorError>;
