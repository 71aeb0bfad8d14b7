//! Conversions between the coordinator's domain types and `zeroshard.v1`
//! messages, in one place: requests and answers of `Inference` (both
//! directions: the server and the `query` client), the cluster's status, a
//! worker's `Stats`, and errors to and from statuses (the code comes from
//! [`CoordinatorError::kind`]).
use zeroshard_offload::convert::generation_params;
use zeroshard_proto::v1 as pb;

use crate::chat::ChatMessage;
use crate::error::CoordinatorError;
use crate::request::{Chunk, FinishReason, GenerateOutput, GenerateRequest, Prompt, Timings};
use crate::status::{ClusterStatus, WorkerStats, WorkerStatus};

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

/// A client's request as the `Inference` service receives it; unset
/// sampling fields take the CLI's defaults. Validated later, against the model.
impl TryFrom<pb::GenerateRequest> for GenerateRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::GenerateRequest) -> Result<Self, CoordinatorError> {
        let prompt = match r.prompt {
            None => {
                return Err(CoordinatorError::InvalidRequest(
                    "the request has no prompt (text, token_ids or chat)".into(),
                ))
            }
            Some(pb::generate_request::Prompt::Text(t)) => Prompt::Text(t),
            Some(pb::generate_request::Prompt::TokenIds(ids)) => Prompt::Ids(ids.ids),
            Some(pb::generate_request::Prompt::Chat(chat)) => Prompt::Chat(
                chat.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect(),
            ),
        };
        Ok(Self::new(prompt, generation_params(r.sampling), r.stop))
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

impl From<Timings> for pb::Timings {
    fn from(t: Timings) -> Self {
        Self {
            prefill_ms: t.prefill_ms,
            decode_ms: t.decode_ms,
            prompt_tokens: t.prompt_tokens as u32,
            generated_tokens: t.generated_tokens as u32,
            prefill_tokens_per_s: t.prefill_tokens_per_s,
            decode_tokens_per_s: t.decode_tokens_per_s,
            queue_ms: t.queue_ms,
        }
    }
}

/// A finish reason off the wire; `None` for unspecified (the sequence goes on).
pub(crate) fn finish_reason(r: i32) -> Option<FinishReason> {
    match pb::FinishReason::try_from(r).ok()? {
        pb::FinishReason::Length => Some(FinishReason::Length),
        pb::FinishReason::Eos => Some(FinishReason::Eos),
        pb::FinishReason::Stop => Some(FinishReason::Stop),
        pb::FinishReason::Cancelled | pb::FinishReason::Unspecified => None,
    }
}

/// The `--json` name of a finish reason.
fn finish_reason_str(r: i32) -> &'static str {
    match pb::FinishReason::try_from(r).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Length => "length",
        pb::FinishReason::Eos => "eos",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Cancelled => "cancelled",
        pb::FinishReason::Unspecified => "unspecified",
    }
}

impl From<Chunk> for pb::GenerateChunk {
    fn from(c: Chunk) -> Self {
        let (finish_reason, timings) = match c.end {
            Some(end) => (pb::FinishReason::from(end.finish) as i32, Some(pb::Timings::from(end.timings))),
            None => (0, None),
        };
        Self {
            token_ids: c.token_ids,
            text: c.text,
            prompt_token_ids: c.prompt_token_ids,
            finish_reason,
            timings,
        }
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

impl From<pb::WorkerStats> for WorkerStats {
    fn from(s: pb::WorkerStats) -> Self {
        Self {
            id: s.id,
            epoch: s.epoch,
            owned_partitioned_bytes: s.owned_partitioned_bytes,
            owned_persistent_bytes: s.owned_persistent_bytes,
            resident_bytes: s.resident_bytes,
            active_sequences: s.active_sequences,
            gathered_bytes_total: s.gathered_bytes_total,
            gather_bytes_per_s: s.gather_bytes_per_s,
            steps_total: s.steps_total,
            rejected_chunks_total: s.rejected_chunks_total,
            step_nanos_total: s.step_nanos_total,
            gather_wait_nanos_total: s.gather_wait_nanos_total,
            gather_busy_nanos_total: s.gather_busy_nanos_total,
            loads_total: s.loads_total,
            loaded_bytes_total: s.loaded_bytes_total,
            failovers_total: s.failovers_total,
            loading_bytes: s.loading_bytes,
            rejected_blocks_by_holder: s.rejected_blocks_by_holder,
            kv_cache_bytes: s.kv_cache_bytes,
            kv_reserved_bytes: s.kv_reserved_bytes,
            kv_bytes_per_token: s.kv_bytes_per_token,
            max_active_sequences: s.max_active_sequences,
            group_sent_bytes_total: s.group_sent_bytes_total,
            group_received_bytes_total: s.group_received_bytes_total,
            calibrated_gflops: s.calibrated_gflops,
            calibrated_read_gbs: s.calibrated_read_gbs,
            host_id: s.host_id,
        }
    }
}

/// The worker and cluster status messages, field for field, both ways.
macro_rules! same_fields {
    ($from:ty => $to:ty { $($f:ident),* $(,)? }) => {
        impl From<$from> for $to {
            fn from(s: $from) -> Self {
                Self { $($f: s.$f.into()),* }
            }
        }
    };
}

same_fields!(WorkerStatus => pb::WorkerStatus { id, address, owned_partitioned_bytes, owned_persistent_bytes,
    resident_bytes, active_sequences, gather_bytes_per_s, ready, rejected_chunks_total, steps_total, loads_total,
    failovers_total, rejected_blocks_total, kv_cache_bytes, kv_reserved_bytes, max_active_sequences,
    audits_failed_total });
same_fields!(pb::WorkerStatus => WorkerStatus { id, address, owned_partitioned_bytes, owned_persistent_bytes,
    resident_bytes, active_sequences, gather_bytes_per_s, ready, rejected_chunks_total, steps_total, loads_total,
    failovers_total, rejected_blocks_total, kv_cache_bytes, kv_reserved_bytes, max_active_sequences,
    audits_failed_total });

impl From<ClusterStatus> for pb::ClusterStatusResponse {
    fn from(s: ClusterStatus) -> Self {
        Self {
            epoch: s.epoch,
            ready: s.ready,
            model: s.model,
            workers: s.workers.into_iter().map(pb::WorkerStatus::from).collect(),
            replicas: s.replicas,
            workers_lost_total: s.workers_lost_total,
            sequences_resumed_total: s.sequences_resumed_total,
            queued_requests: s.queued_requests,
            max_queued_requests: s.max_queued_requests,
            requests_admitted_total: s.requests_admitted_total,
            requests_rejected_total: s.requests_rejected_total,
            queue_ms_total: s.queue_ms_total,
            queue_ms_max: s.queue_ms_max,
            step_deadlines_missed_total: s.step_deadlines_missed_total,
            sequences_moved_total: s.sequences_moved_total,
            install_deadlines_missed_total: s.install_deadlines_missed_total,
            audits_passed_total: s.audits_passed_total,
            audits_failed_total: s.audits_failed_total,
            audits_skipped_total: s.audits_skipped_total,
            audit_bans_total: s.audit_bans_total,
            placement: s.placement,
            tensor_degree: s.tensor_degree,
            placement_reason: s.placement_reason,
            not_ready_reason: s.not_ready_reason,
        }
    }
}

impl From<pb::ClusterStatusResponse> for ClusterStatus {
    fn from(s: pb::ClusterStatusResponse) -> Self {
        Self {
            epoch: s.epoch,
            ready: s.ready,
            model: s.model,
            workers: s.workers.into_iter().map(WorkerStatus::from).collect(),
            replicas: s.replicas,
            workers_lost_total: s.workers_lost_total,
            sequences_resumed_total: s.sequences_resumed_total,
            queued_requests: s.queued_requests,
            max_queued_requests: s.max_queued_requests,
            requests_admitted_total: s.requests_admitted_total,
            requests_rejected_total: s.requests_rejected_total,
            queue_ms_total: s.queue_ms_total,
            queue_ms_max: s.queue_ms_max,
            step_deadlines_missed_total: s.step_deadlines_missed_total,
            sequences_moved_total: s.sequences_moved_total,
            install_deadlines_missed_total: s.install_deadlines_missed_total,
            audits_passed_total: s.audits_passed_total,
            audits_failed_total: s.audits_failed_total,
            audits_skipped_total: s.audits_skipped_total,
            audit_bans_total: s.audit_bans_total,
            placement: s.placement,
            tensor_degree: s.tensor_degree,
            placement_reason: s.placement_reason,
            not_ready_reason: s.not_ready_reason,
        }
    }
}

/// The status a client (or worker) gets for `e`: the code of its kind.
impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        tonic::Status::new(e.kind().grpc_code(), e.to_string())
    }
}

/// A status a client of the coordinator (`query`, `status`) got, as an error:
/// its fault, a refusal of its credentials, or a cluster that cannot serve now.
impl From<tonic::Status> for CoordinatorError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument => CoordinatorError::InvalidRequest(s.message().to_string()),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                CoordinatorError::Denied(format!("{:?}: {}", s.code(), s.message()))
            }
            // The cluster cannot serve until its operator acts: retrying does not help.
            tonic::Code::FailedPrecondition => CoordinatorError::Halted(s.message().to_string()),
            code => CoordinatorError::Unavailable(format!("{code:?}: {}", s.message())),
        }
    }
}
