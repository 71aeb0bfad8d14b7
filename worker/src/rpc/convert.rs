//! Domain types ↔ `zeroshard.v1` messages for the worker's services, and the
//! one `match` that turns a [`WorkerError`] into a status code.
use std::path::{Path, PathBuf};

use tonic::Status;
use zeroshard_offload::shards::ShardError;
use zeroshard_offload::{ModelConfig, OffloadError};
use zeroshard_proto::v1 as pb;

use crate::error::{Result, WorkerError};
use crate::node::{PlannedModel, SeqEvent};
use zeroshard_engine::engine::StepToken;
use zeroshard_engine::EngineError;

/// The status a caller gets for `e`: its fault (INVALID_ARGUMENT, NOT_FOUND,
/// FAILED_PRECONDITION), a step that failed on a device still in use (ABORTED:
/// the coordinator resumes the sequence at once; one ended only because the
/// epoch was replaced also carries [`zeroshard_proto::INTERRUPTED_KEY`]), no room now
/// (RESOURCE_EXHAUSTED: the coordinator queues it again), a sequence handed
/// back by a draining worker (CANCELLED: continued elsewhere at once), a member that cannot serve
/// now (UNAVAILABLE: resumed once membership changes), or this worker's (INTERNAL).
pub(crate) fn status(e: &WorkerError) -> Status {
    use WorkerError as E;
    let msg = e.to_string();
    match e {
        E::InvalidRequest(_) | E::Offload(OffloadError::InvalidRequest(_)) => Status::invalid_argument(msg),
        E::Shard(ShardError::NotHeld { .. }) => Status::not_found(msg),
        E::Shard(ShardError::InvalidRange { .. } | ShardError::ProbeTooLarge { .. }) => {
            Status::invalid_argument(msg)
        }
        E::Plan(_) => Status::invalid_argument(msg),
        E::Epoch(_) => Status::failed_precondition(msg),
        E::Overloaded(_) => Status::resource_exhausted(msg),
        E::Abandoned(_) => {
            let mut s = Status::aborted(msg);
            s.metadata_mut().insert(
                zeroshard_proto::INTERRUPTED_KEY,
                tonic::metadata::MetadataValue::from_static(zeroshard_proto::EPOCH_REPLACED),
            );
            s
        }
        E::Draining(_) => Status::cancelled(msg),
        E::CorruptCopy { .. } => Status::data_loss(msg),
        E::Engine(EngineError::InvalidRequest(_) | EngineError::Offload(OffloadError::InvalidRequest(_))) => {
            Status::invalid_argument(msg)
        }
        E::Engine(EngineError::Device { fatal: false, .. }) => Status::aborted(msg),
        E::Gather(_)
        | E::Rpc { .. }
        | E::Membership { .. }
        | E::Engine(EngineError::Device { .. } | EngineError::Group(_)) => Status::unavailable(msg),
        E::Offload(_) | E::Shard(_) | E::Io { .. } | E::Task { .. } => Status::internal(msg),
        E::Engine(
            EngineError::Offload(_)
            | EngineError::MissingWeight(_)
            | EngineError::Weights(_)
            | EngineError::Setup(_)
            | EngineError::Io { .. },
        ) => Status::internal(msg),
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        status(&e)
    }
}

/// One event of a running sequence as the stream sends it.
pub(crate) fn sequence_step(ev: SeqEvent) -> std::result::Result<pb::SequenceStep, Status> {
    match ev {
        Ok(StepToken { token, finished, scores, .. }) => Ok(pb::SequenceStep {
            token_ids: vec![token],
            finish_reason: finished.map_or(pb::FinishReason::Unspecified, pb::FinishReason::from) as i32,
            scores: scores.iter().map(pb::TokenScore::from).collect(),
        }),
        Err(e) => Err(status(&e)),
    }
}

/// The model config from the texts of its files that a plan carries.
fn model_config(m: &pb::ModelInfo) -> Result<ModelConfig> {
    let dir = Path::new(&m.model_dir);
    let parse = |s: &str, name: &str| {
        serde_json::from_str::<serde_json::Value>(s).map_err(|e| OffloadError::Json {
            path: dir.join(name),
            message: format!("as sent by the coordinator: {e}"),
        })
    };
    let config = parse(&m.config_json, "config.json")?;
    let gen_path = dir.join("generation_config.json");
    let gen = if m.generation_config_json.is_empty() {
        None
    } else {
        Some(parse(&m.generation_config_json, "generation_config.json")?)
    };
    Ok(ModelConfig::from_json(
        &dir.join("config.json"),
        &config,
        gen.as_ref().map(|g| (gen_path.as_path(), g)),
    )?)
}

/// The model a plan names, with its config parsed from the texts it carries.
pub(crate) fn planned_model(m: &pb::ModelInfo) -> Result<PlannedModel> {
    Ok(PlannedModel { config: model_config(m)?, dir: PathBuf::from(&m.model_dir) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_abandoned_step_is_marked_epoch_replaced() {
        let s = status(&WorkerError::Abandoned("worker 3 left the cluster".into()));
        assert_eq!(s.code(), tonic::Code::Aborted);
        assert_eq!(
            s.metadata().get(zeroshard_proto::INTERRUPTED_KEY).and_then(|v| v.to_str().ok()),
            Some(zeroshard_proto::EPOCH_REPLACED)
        );
        let s = status(&WorkerError::Gather("worker 3 unreachable".into()));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.metadata().get(zeroshard_proto::INTERRUPTED_KEY).is_none());
    }
}
