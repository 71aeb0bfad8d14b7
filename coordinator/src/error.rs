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
    Chat(#[from] crate::chat::ChatError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A shard range a caller asked for that does not exist.
    #[error(transparent)]
    Shard(#[from] zeroshard_offload::shards::ShardError),
    /// The request cannot be served as given.
    #[error("{0}")]
    InvalidRequest(String),
    /// The cluster is full: no room now and the queue is at its bound.
    #[error("{0}")]
    Overloaded(String),
    /// The cluster cannot serve now (not ready, no worker, worker failed).
    #[error("{0}")]
    Unavailable(String),
    /// Nothing answers at the address: the connection was refused or the
    /// host name does not resolve.
    #[error("{0}")]
    Unreachable(String),
    /// The call does not fit this coordinator's state (a stale epoch, the
    /// wrong kind of membership).
    #[error("{0}")]
    Precondition(String),
    /// The caller lacks the credential or the role for the call.
    #[error("{0}")]
    Denied(String),
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;
