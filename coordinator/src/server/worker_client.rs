//! [`WorkerHandle`]: the coordinator's client of one worker's `Worker`
//! service, in domain terms, so that nothing else in the coordinator names a
//! protobuf type or reads a status: the supervisor installs and activates
//! plans and reads [`WorkerStats`]; the request loop (`generate.rs`) runs a
//! sequence with [`WorkerHandle::run_sequence`] and reads [`Step`]s, or the
//! [`Interrupted`] that says (from the worker's status) what to do next.
use std::time::Duration;

use tonic::transport::Channel;
use zeroshard_offload::convert::digests_to_pb;
use zeroshard_offload::digest::BlockDigests;
use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_offload::request::{FinishReason, GenerationParams, ScoreRequest, TokenScore};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::worker_client::WorkerClient;
use zeroshard_security::Security;

use super::admission::Capacity;
use super::choose::Link;
use super::Coordinator;
use crate::error::{CoordinatorError, Result};
use crate::status::WorkerStats;

/// A lazily connected client of one worker.
#[derive(Clone)]
pub struct WorkerHandle {
    client: WorkerClient<Channel>,
    /// "worker-N at ADDRESS", for messages.
    who: String,
}

/// One step of a sequence as the worker streamed it.
pub(crate) struct Step {
    pub token_ids: Vec<u32>,
    /// Set on the sequence's last step.
    pub finish: Option<FinishReason>,
    /// A scored sequence's scores (see [`ScoreRequest`]).
    pub scores: Vec<TokenScore>,
}

/// The steps of one run of a sequence on a worker.
pub(crate) struct Steps {
    inner: tonic::Streaming<pb::SequenceStep>,
    who: String,
}

impl Steps {
    /// The next step; `Ok(None)` when the worker ended the stream.
    pub(crate) async fn next(&mut self) -> std::result::Result<Option<Step>, Interrupted> {
        match self.inner.message().await {
            Ok(Some(s)) => Ok(Some(Step {
                token_ids: s.token_ids,
                finish: crate::convert::finish_reason(s.finish_reason),
                scores: s.scores.into_iter().map(TokenScore::from).collect(),
            })),
            Ok(None) => Ok(None),
            Err(s) => Err(Interrupted::from_status(&self.who, &s)),
        }
    }
}

/// Why a worker ended a run of a sequence, read from its status: each variant
/// is a retry rule the request loop follows.
pub(crate) enum Interrupted {
    /// INVALID_ARGUMENT: the request's fault; it ends.
    Invalid(String),
    /// ABORTED: one of its steps failed, the worker lives: resume at once.
    StepFailed(String),
    /// ABORTED marked [`zeroshard_proto::EPOCH_REPLACED`]: the plan changed
    /// under the step (a holder it gathered from left, or the worker took a
    /// new role): continue at once, on any worker; not a failure.
    Replaced(String),
    /// RESOURCE_EXHAUSTED: no room after all (a sequence that ended is not
    /// freed yet): back to the front of the queue.
    Busy(String),
    /// CANCELLED: the worker is draining and handed the sequence back:
    /// continue elsewhere at once; not a failure.
    Moved(String),
    /// Anything else (unreachable, a stale epoch, a crash): the worker failed;
    /// resume elsewhere once membership changes.
    Failed(String),
}

impl Interrupted {
    /// What the worker said.
    pub(crate) fn message(&self) -> &str {
        match self {
            Self::Invalid(m)
            | Self::StepFailed(m)
            | Self::Replaced(m)
            | Self::Busy(m)
            | Self::Moved(m)
            | Self::Failed(m) => m,
        }
    }

    fn from_status(who: &str, s: &tonic::Status) -> Self {
        let why = format!("{who}: {}", s.message());
        match s.code() {
            tonic::Code::InvalidArgument => Self::Invalid(s.message().to_string()),
            tonic::Code::Aborted
                if s.metadata()
                    .get(zeroshard_proto::INTERRUPTED_KEY)
                    .is_some_and(|v| v == zeroshard_proto::EPOCH_REPLACED) =>
            {
                Self::Replaced(why)
            }
            tonic::Code::Aborted => Self::StepFailed(why),
            tonic::Code::ResourceExhausted => Self::Busy(why),
            tonic::Code::Cancelled => Self::Moved(why),
            _ => Self::Failed(why),
        }
    }
}

/// Why a worker gave no progress.
pub(crate) enum Unanswered {
    /// It answered with an error, or could not be reached at all.
    Failed(String),
    /// It said nothing within the timeout (hung, or very busy).
    Silent(Duration),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(why) => f.write_str(why),
            Self::Silent(t) => write!(f, "no answer within {t:?}"),
        }
    }
}

/// What a plan installation tells a worker besides the plan.
pub(crate) struct Install<'a> {
    pub peers: &'a [(WorkerId, String)],
    pub pull_from: Option<String>,
    pub model: pb::ModelInfo,
    /// Every block's digest, and where to fetch a block no holder served intact.
    pub digests: &'a BlockDigests,
    pub coordinator_shards: String,
}

/// The model as plans (and `RegisterWorker` answers) carry it to workers.
/// A worker's `Stats`, as the fault watch uses them.
pub(crate) struct WorkerReport {
    /// Blocks it received that failed their digest, by the holder that sent them.
    pub rejected_blocks: Vec<(WorkerId, u64)>,
    /// What it admits (None before its first plan).
    pub capacity: Option<Capacity>,
}

pub(crate) fn model_info(coord: &Coordinator) -> pb::ModelInfo {
    pb::ModelInfo {
        model_dir: coord.cfg().model_dir.display().to_string(),
        config_json: coord.model().config_json.clone(),
        generation_config_json: coord.model().generation_config_json.clone(),
    }
}

impl WorkerHandle {
    /// A client of the worker at `address`; connects on first use.
    pub(crate) fn new(security: &Security, id: WorkerId, address: &str) -> Result<Self> {
        let ch = security
            .dial(address)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("worker address {address}: {e}")))?
            .connect_lazy();
        Ok(Self { client: WorkerClient::new(ch), who: format!("{id} at {address}") })
    }

    /// The worker's own figures (`Stats`).
    pub(crate) async fn stats(&self, timeout: Duration) -> std::result::Result<WorkerStats, Unanswered> {
        self.stats_request(pb::StatsRequest { calibrate: false }, timeout).await
    }

    /// The worker's figures after it measured its compute again (`Stats`
    /// with `calibrate`).
    pub(super) async fn calibrated_stats(
        &self,
        timeout: Duration,
    ) -> std::result::Result<WorkerStats, Unanswered> {
        self.stats_request(pb::StatsRequest { calibrate: true }, timeout).await
    }

    async fn stats_request(
        &self,
        req: pb::StatsRequest,
        timeout: Duration,
    ) -> std::result::Result<WorkerStats, Unanswered> {
        let mut c = self.client.clone();
        match tokio::time::timeout(timeout, c.stats(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().into()),
            Ok(Err(s)) => Err(Unanswered::Failed(s.message().to_string())),
            Err(_) => Err(Unanswered::Silent(timeout)),
        }
    }

    /// Has the worker measure its link to the worker at `peer_address`
    /// (`Worker.MeasureLink`).
    pub(super) async fn measure_link(
        &self,
        peer_address: &str,
        timeout: Duration,
    ) -> std::result::Result<Link, Unanswered> {
        let mut c = self.client.clone();
        let req = pb::MeasureLinkRequest { peer_address: peer_address.to_string(), probe_bytes: 0 };
        match tokio::time::timeout(timeout, c.measure_link(req)).await {
            Ok(Ok(r)) => {
                let m = r.into_inner();
                Ok(Link {
                    round_trip_s: m.round_trip_us * 1e-6,
                    bytes_per_s: m.bytes_per_s,
                    exchange_s: m.exchange_round_trip_us * 1e-6,
                })
            }
            Ok(Err(s)) => Err(Unanswered::Failed(s.message().to_string())),
            Err(_) => Err(Unanswered::Silent(timeout)),
        }
    }

    /// The worker's active epoch (0: none) and the bytes it has loaded for the
    /// plan it is preparing.
    pub(crate) async fn progress(&self, timeout: Duration) -> std::result::Result<(u64, u64), Unanswered> {
        self.stats(timeout).await.map(|s| (s.epoch, s.loading_bytes))
    }

    /// What the fault watch reads; `None` when the worker does not answer within `timeout`.
    pub(crate) async fn report(&self, timeout: Duration) -> Option<WorkerReport> {
        let s = self.stats(timeout).await.ok()?;
        let capacity = (s.kv_bytes_per_token > 0).then_some(Capacity {
            kv_cache_bytes: s.kv_cache_bytes,
            kv_bytes_per_token: s.kv_bytes_per_token,
            max_active: s.max_active_sequences,
        });
        Some(WorkerReport {
            rejected_blocks: s.rejected_blocks_by_holder.into_iter().map(|(h, n)| (WorkerId(h), n)).collect(),
            capacity,
        })
    }

    /// Starts (or resumes) a sequence on the worker: `prompt` plus the tokens
    /// `generated` before, under `epoch`. The steps come back through
    /// [`Steps::next`]; dropping them cancels the sequence on the worker.
    pub(crate) async fn run_sequence(
        &self,
        sequence_id: u64,
        epoch: u64,
        prompt: &[u32],
        generated: &[u32],
        params: &GenerationParams,
        score: Option<&ScoreRequest>,
    ) -> std::result::Result<Steps, Interrupted> {
        let mut c = self.client.clone();
        let req = pb::RunSequenceRequest {
            sequence_id,
            epoch,
            prompt_token_ids: prompt.to_vec(),
            generated_token_ids: generated.to_vec(),
            sampling: Some(pb::SamplingParams::from(params)),
            score: score.map(pb::ScoreRequest::from),
        };
        match c.run_sequence(req).await {
            Ok(r) => Ok(Steps { inner: r.into_inner(), who: self.who.clone() }),
            Err(s) => Err(Interrupted::from_status(&self.who, &s)),
        }
    }

    /// Scores `tokens` (a prompt and what was generated after it) from
    /// position `req.from` on with one prefill on the worker, under `epoch`
    /// and the sequence's sampling `params` (see [`ScoreRequest`]).
    pub(crate) async fn score(
        &self,
        sequence_id: u64,
        epoch: u64,
        tokens: &[u32],
        params: &GenerationParams,
        req: &ScoreRequest,
    ) -> std::result::Result<Vec<TokenScore>, Interrupted> {
        let mut c = self.client.clone();
        let sampling = pb::SamplingParams {
            max_new_tokens: Some(1),
            ignore_eos: true,
            ..pb::SamplingParams::from(params)
        };
        let req = pb::RunSequenceRequest {
            sequence_id,
            epoch,
            prompt_token_ids: tokens.to_vec(),
            generated_token_ids: vec![],
            sampling: Some(sampling),
            score: Some(pb::ScoreRequest::from(req)),
        };
        let first = match c.run_sequence(req).await {
            Ok(r) => r.into_inner().message().await,
            Err(s) => return Err(Interrupted::from_status(&self.who, &s)),
        };
        match first {
            Ok(Some(step)) => Ok(step.scores.into_iter().map(TokenScore::from).collect()),
            Ok(None) => Err(Interrupted::Failed(format!("{} ended the scored sequence early", self.who))),
            Err(s) => Err(Interrupted::from_status(&self.who, &s)),
        }
    }

    /// Installs (prepares) `plan` for worker `id` within `deadline`; (owned
    /// bytes, load ms).
    pub(crate) async fn install(
        &self,
        id: WorkerId,
        plan: &Plan,
        how: Install<'_>,
        deadline: Duration,
    ) -> std::result::Result<(u64, f64), Unanswered> {
        let req = pb::InstallPlanRequest {
            plan: Some(pb::PartitionPlan::from(plan)),
            worker_id: id.0,
            peers: how
                .peers
                .iter()
                .map(|(id, address)| pb::Peer { id: id.0, address: address.clone() })
                .collect(),
            pull_from: how.pull_from,
            model: Some(how.model),
            digests: digests_to_pb(how.digests),
            coordinator_shards: Some(how.coordinator_shards),
        };
        let mut c = self.client.clone();
        match tokio::time::timeout(deadline, c.install_plan(req)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok((r.owned_bytes, r.load_ms))
            }
            Ok(Err(s)) => Err(Unanswered::Failed(s.message().to_string())),
            Err(_) => Err(Unanswered::Silent(deadline)),
        }
    }

    /// Switches the worker to the prepared `epoch` within `deadline`.
    pub(crate) async fn activate(&self, epoch: u64, deadline: Duration) -> std::result::Result<(), String> {
        let mut c = self.client.clone();
        match tokio::time::timeout(deadline, c.activate_plan(pb::ActivatePlanRequest { epoch })).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err(format!("no answer within {deadline:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Interrupted;

    fn read(s: tonic::Status) -> Interrupted {
        Interrupted::from_status("worker 2", &s)
    }

    #[test]
    fn an_abort_marked_epoch_replaced_is_a_move_and_any_other_a_failed_step() {
        let mut replaced = tonic::Status::aborted("gather abandoned: worker 3 left");
        replaced.metadata_mut().insert(
            zeroshard_proto::INTERRUPTED_KEY,
            tonic::metadata::MetadataValue::from_static(zeroshard_proto::EPOCH_REPLACED),
        );
        assert!(matches!(read(replaced), Interrupted::Replaced(w) if w.contains("worker 3 left")));
        assert!(matches!(read(tonic::Status::aborted("device hiccup")), Interrupted::StepFailed(_)));
        let mut other = tonic::Status::aborted("x");
        other
            .metadata_mut()
            .insert(zeroshard_proto::INTERRUPTED_KEY, tonic::metadata::MetadataValue::from_static("other"));
        assert!(matches!(read(other), Interrupted::StepFailed(_)));
        assert!(matches!(read(tonic::Status::cancelled("draining")), Interrupted::Moved(_)));
        assert!(matches!(read(tonic::Status::unavailable("gone")), Interrupted::Failed(_)));
    }
}
