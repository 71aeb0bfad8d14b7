//! The coordinator crate's one error type, and its [`ErrorKind`]: the one
//! classification the gRPC code, the HTTP status and the `outcome` metric
//! label of a failed request are all read from, so the three cannot disagree.
use zeroshard_offload::shards::ShardError;
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
    Shard(#[from] ShardError),
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
    /// The cluster cannot serve until its operator acts (the checkpoint
    /// changed under it: restart): retrying does not help.
    #[error("{0}")]
    Halted(String),
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;

/// Whose fault an error is and what the caller should do: each front answers
/// with the code of the kind ([`ErrorKind::grpc_code`], [`ErrorKind::http_status`])
/// and requests are counted by it ([`ErrorKind::outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot be served as given: change it.
    Invalid,
    /// What the call names does not exist.
    NotFound,
    /// The call does not fit the coordinator's state.
    Precondition,
    /// The caller lacks the credential or the role.
    Denied,
    /// The cluster is full: try later.
    Overloaded,
    /// The cluster cannot serve now: try again (elsewhere).
    Unavailable,
    /// The cluster cannot serve until its operator acts: do not retry.
    Halted,
    /// The coordinator's own failure.
    Internal,
}

impl CoordinatorError {
    /// The error's kind (the one `match` over the variants).
    pub fn kind(&self) -> ErrorKind {
        use CoordinatorError as E;
        match self {
            E::InvalidRequest(_)
            | E::Tokenizer(_)
            | E::Chat(_)
            | E::Offload(OffloadError::InvalidRequest(_))
            | E::Shard(ShardError::InvalidRange { .. } | ShardError::ProbeTooLarge { .. }) => {
                ErrorKind::Invalid
            }
            E::Offload(OffloadError::MissingTensor { .. }) | E::Shard(ShardError::NotHeld { .. }) => {
                ErrorKind::NotFound
            }
            E::Precondition(_) => ErrorKind::Precondition,
            E::Denied(_) => ErrorKind::Denied,
            E::Overloaded(_) => ErrorKind::Overloaded,
            E::Unavailable(_) | E::Unreachable(_) | E::Membership(_) => ErrorKind::Unavailable,
            E::Halted(_) => ErrorKind::Halted,
            E::Offload(_) | E::Plan(_) | E::Shard(_) => ErrorKind::Internal,
        }
    }
}

impl ErrorKind {
    /// The gRPC status code a client gets.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::Invalid => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::Precondition | Self::Halted => tonic::Code::FailedPrecondition,
            Self::Denied => tonic::Code::PermissionDenied,
            Self::Overloaded => tonic::Code::ResourceExhausted,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status and OpenAI error type an HTTP client gets.
    pub fn http_status(self) -> (u16, &'static str) {
        match self {
            Self::Invalid | Self::Precondition => (400, "invalid_request_error"),
            Self::NotFound => (404, "not_found_error"),
            Self::Denied => (403, "permission_error"),
            Self::Overloaded => (429, "rate_limit_error"),
            Self::Unavailable | Self::Halted => (503, "service_unavailable"),
            Self::Internal => (500, "server_error"),
        }
    }

    /// The `outcome` label of `zeroshard_requests_total` for a request that
    /// failed so (besides `ok` and `cancelled`): one per HTTP status class.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Invalid | Self::Precondition | Self::NotFound => "invalid",
            Self::Denied => "denied",
            Self::Overloaded => "rejected",
            Self::Unavailable | Self::Halted => "unavailable",
            Self::Internal => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_outside_the_model_is_invalid_on_every_front() {
        let e = CoordinatorError::from(OffloadError::InvalidRequest("prompt token 9999".into()));
        let k = e.kind();
        assert_eq!(k.grpc_code(), tonic::Code::InvalidArgument);
        assert_eq!(k.http_status().0, 400);
        assert_eq!(k.outcome(), "invalid");
    }

    #[test]
    fn every_http_status_class_has_one_outcome() {
        let all = [
            ErrorKind::Invalid,
            ErrorKind::NotFound,
            ErrorKind::Precondition,
            ErrorKind::Denied,
            ErrorKind::Overloaded,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ];
        for a in all {
            for b in all {
                if a.http_status().0 == b.http_status().0 {
                    assert_eq!(a.outcome(), b.outcome(), "{a:?} and {b:?}");
                }
            }
        }
    }
}
