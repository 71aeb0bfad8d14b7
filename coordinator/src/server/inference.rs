//! `Inference`: the client API.
use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};
use zeroshard_proto::v1 as pb;

use super::{generate, Coordinator};
use crate::error::CoordinatorError;

#[derive(Clone)]
pub(super) struct InferenceSvc(pub Coordinator);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl zeroshard_proto::v1::inference_server::Inference for InferenceSvc {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(generate::run(self.0.clone(), req.into_inner(), tx));
        let mut resp = pb::GenerateResponse::default();
        while let Some(chunk) = rx.recv().await {
            let c = chunk?;
            if !c.prompt_token_ids.is_empty() {
                resp.prompt_token_ids = c.prompt_token_ids;
            }
            resp.token_ids.extend(c.token_ids);
            resp.text.push_str(&c.text);
            if c.finish_reason != 0 {
                resp.finish_reason = c.finish_reason;
                resp.timings = c.timings;
            }
        }
        if resp.finish_reason == 0 {
            return Err(
                CoordinatorError::Unavailable("the sequence ended without a finish reason".into()).into()
            );
        }
        Ok(Response::new(resp))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(generate::run(self.0.clone(), req.into_inner(), tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.0.status().await))
    }
}

impl Coordinator {
    /// The cluster as `status` shows it: each worker's own statistics (asked
    /// with a 1 s timeout each; a worker that does not answer shows zeros) and
    /// the coordinator's counters.
    pub(super) async fn status(&self) -> pb::ClusterStatusResponse {
        let coord = self;
        let plan = coord.plan().ok();
        let ready = plan.is_some();
        let epoch = plan.as_ref().map_or(0, |p| p.epoch());
        let replicas = plan.as_ref().map_or(0, |p| p.replicas());
        let stats = coord.workers().into_iter().map(|w| async move {
            let mut client = w.client.grpc();
            let call = client.stats(pb::StatsRequest {});
            let s = tokio::time::timeout(std::time::Duration::from_secs(1), call)
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(Response::into_inner);
            (w, s)
        });
        let stats = futures::future::join_all(stats).await;
        // Blocks every worker rejected, by the holder that sent them.
        let mut rejected_blocks = std::collections::HashMap::<u64, u64>::new();
        for (_, s) in &stats {
            for (holder, n) in s.iter().flat_map(|s| &s.rejected_blocks_by_holder) {
                *rejected_blocks.entry(*holder).or_default() += n;
            }
        }
        let mut workers = Vec::new();
        for (w, s) in stats {
            let s = s.unwrap_or_default();
            workers.push(pb::WorkerStatus {
                id: w.id.0,
                address: w.address,
                owned_partitioned_bytes: s.owned_partitioned_bytes,
                owned_persistent_bytes: s.owned_persistent_bytes,
                resident_bytes: s.resident_bytes,
                active_sequences: s.active_sequences,
                gather_bytes_per_s: s.gather_bytes_per_s,
                ready: ready && s.epoch == epoch,
                rejected_chunks_total: s.rejected_chunks_total,
                steps_total: s.steps_total,
                loads_total: s.loads_total,
                failovers_total: s.failovers_total,
                rejected_blocks_total: rejected_blocks.get(&w.id.0).copied().unwrap_or(0),
                kv_cache_bytes: s.kv_cache_bytes,
                kv_reserved_bytes: s.kv_reserved_bytes,
                max_active_sequences: s.max_active_sequences,
            });
        }
        let (workers_lost_total, sequences_resumed_total) = coord.failure_counts();
        let q = coord.0.admission.counts();
        pb::ClusterStatusResponse {
            epoch,
            ready,
            model: coord.model_name(),
            workers,
            replicas,
            workers_lost_total,
            sequences_resumed_total,
            queued_requests: q.queued as u32,
            max_queued_requests: q.max_queued as u32,
            requests_admitted_total: q.admitted,
            requests_rejected_total: q.rejected,
            queue_ms_total: q.queue_ms_total,
            queue_ms_max: q.queue_ms_max,
            step_deadlines_missed_total: q.deadlines_missed,
            sequences_moved_total: coord.0.sequences_moved.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}
