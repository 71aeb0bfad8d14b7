//! Conversions between the coordinator's domain types and `zeroshard.v1`
//! messages, in one place, and the one `match` from [`CoordinatorError`] to a
//! status code.
use zeroshard_proto::v1 as pb;

use zeroshard_offload::shards::ShardError;
use zeroshard_offload::OffloadError;

use crate::error::CoordinatorError;
use crate::request::{GenerateOutput, GenerateRequest, Prompt, Timings};

impl From<&GenerateRequest> for pb::GenerateRequest {
    fn from(r: &GenerateRequest) -> Self {
        Self {
            prompt: Some(match &r.prompt {
                Prompt::Text(t) => pb::generate_request::Prompt::Text(t.clone()),
                Prompt::Ids(ids) => pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() }),
                Prompt::Chat(messages) => pb::generate_request::Prompt::Chat(pb::ChatMessages {
                    messages: messages
                        .iter()
                        .map(|m| pb::ChatMessage { role: m.role.clone(), content: m.content.clone() })
                        .collect(),
                }),
            }),
            sampling: Some(pb::SamplingParams::from(&r.params)),
            stop: r.stop.clone(),
        }
    }
}

impl From<pb::Timings> for Timings {
    fn from(t: pb::Timings) -> Self {
        Self {
            prefill_ms: t.prefill_ms,
            decode_ms: t.decode_ms,
            prompt_tokens: t.prompt_tokens as usize,
            generated_tokens: t.generated_tokens as usize,
            prefill_tokens_per_s: t.prefill_tokens_per_s,
            decode_tokens_per_s: t.decode_tokens_per_s,
            queue_ms: t.queue_ms,
        }
    }
}

/// The `--json` name of a finish reason.
pub(crate) fn finish_reason_str(r: i32) -> &'static str {
    match pb::FinishReason::try_from(r).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Length => "length",
        pb::FinishReason::Eos => "eos",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Cancelled => "cancelled",
        pb::FinishReason::Unspecified => "unspecified",
    }
}

impl From<pb::GenerateResponse> for GenerateOutput {
    fn from(r: pb::GenerateResponse) -> Self {
        Self {
            prompt_token_ids: r.prompt_token_ids,
            token_ids: r.token_ids,
            text: r.text,
            finish_reason: finish_reason_str(r.finish_reason),
            timings: r.timings.map(Timings::from).unwrap_or_default(),
            prompt_logits: None,
        }
    }
}

/// The status a client (or worker) gets for `e`: its fault, a cluster that
/// cannot serve now, or the coordinator's.
impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError as E;
        match &e {
            E::InvalidRequest(_)
            | E::Tokenizer(_)
            | E::Chat(_)
            | E::Offload(OffloadError::InvalidRequest(_)) => tonic::Status::invalid_argument(e.to_string()),
            E::Shard(ShardError::InvalidRange { .. }) => tonic::Status::invalid_argument(e.to_string()),
            E::Offload(OffloadError::MissingTensor { .. }) | E::Shard(ShardError::NotHeld { .. }) => {
                tonic::Status::not_found(e.to_string())
            }
            E::Precondition(_) => tonic::Status::failed_precondition(e.to_string()),
            E::Denied(_) => tonic::Status::permission_denied(e.to_string()),
            E::Overloaded(_) => tonic::Status::resource_exhausted(e.to_string()),
            E::Unavailable(_) | E::Unreachable(_) | E::Membership(_) => {
                tonic::Status::unavailable(e.to_string())
            }
            E::Offload(_) | E::Plan(_) | E::Shard(_) => tonic::Status::internal(e.to_string()),
        }
    }
}
