//! [`WorkerHandle`]: the coordinator's client of one worker's `Worker` service,
//! in domain terms, so that the supervisor and the shared state never name a
//! protobuf type. The request loop (`generate.rs`) and the `Inference` service
//! stream through [`WorkerHandle::grpc`] directly.
use std::time::Duration;

use tonic::transport::Channel;
use zeroshard_offload::convert::digests_to_pb;
use zeroshard_offload::digest::BlockDigests;
use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::worker_client::WorkerClient;
use zeroshard_security::Security;

use super::admission::Capacity;
use super::Coordinator;
use crate::error::{CoordinatorError, Result};

/// A lazily connected client of one worker.
#[derive(Clone)]
pub struct WorkerHandle {
    client: WorkerClient<Channel>,
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
    let inner = &coord.0;
    pb::ModelInfo {
        model_dir: inner.cfg.model_dir.display().to_string(),
        config_json: inner.config_json.clone(),
        generation_config_json: inner.generation_config_json.clone(),
    }
}

impl WorkerHandle {
    /// A client of the worker at `address`; connects on first use.
    pub(crate) fn new(security: &Security, address: &str) -> Result<Self> {
        let ch = security
            .endpoint(address)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("worker address {address}: {e}")))?
            .connect_lazy();
        Ok(Self { client: WorkerClient::new(ch) })
    }

    /// The generated client, for the services that stream through it.
    pub(crate) fn grpc(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }

    /// The worker's active epoch (0: none) and the bytes it has loaded for the
    /// plan it is preparing.
    pub(crate) async fn progress(&self, timeout: Duration) -> std::result::Result<(u64, u64), Unanswered> {
        let mut c = self.client.clone();
        match tokio::time::timeout(timeout, c.stats(pb::StatsRequest {})).await {
            Ok(Ok(r)) => {
                let s = r.into_inner();
                Ok((s.epoch, s.loading_bytes))
            }
            Ok(Err(s)) => Err(Unanswered::Failed(s.message().to_string())),
            Err(_) => Err(Unanswered::Silent(timeout)),
        }
    }

    /// What the fault watch reads; `None` when the worker does not answer within `timeout`.
    pub(crate) async fn report(&self, timeout: Duration) -> Option<WorkerReport> {
        let mut c = self.client.clone();
        let s = tokio::time::timeout(timeout, c.stats(pb::StatsRequest {})).await.ok()?.ok()?.into_inner();
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

    /// Installs (prepares) `plan` for worker `id`; (owned bytes, load ms).
    pub(crate) async fn install(
        &self,
        id: WorkerId,
        plan: &Plan,
        how: Install<'_>,
    ) -> std::result::Result<(u64, f64), String> {
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
        c.install_plan(req)
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.owned_bytes, r.load_ms)
            })
            .map_err(|s| s.message().to_string())
    }

    /// Switches the worker to the prepared `epoch`.
    pub(crate) async fn activate(&self, epoch: u64) -> std::result::Result<(), String> {
        let mut c = self.client.clone();
        c.activate_plan(pb::ActivatePlanRequest { epoch })
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }
}
