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
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;
