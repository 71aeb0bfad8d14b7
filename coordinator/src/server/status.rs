//! The cluster's [`ClusterStatus`] (for `ClusterStatus` and `/metrics`):
//! every worker's own figures beside the coordinator's counters.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Coordinator;
use crate::status::{ClusterStatus, WorkerStatus};

/// A worker that does not answer `Stats` this fast shows zeros.
const STATS_TIMEOUT: Duration = Duration::from_secs(1);

impl Coordinator {
    /// The cluster as `status` shows it: each worker's own statistics (asked
    /// with a 1 s timeout each; a worker that does not answer shows zeros) and
    /// the coordinator's counters.
    pub(super) async fn status(&self) -> ClusterStatus {
        let plan = self.plan();
        let not_ready_reason = plan.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        let plan = plan.ok();
        let ready = plan.is_some();
        let epoch = plan.as_ref().map_or(0, |p| p.epoch());
        let replicas = plan.as_ref().map_or(0, |p| p.replicas());
        let placement_reason = if ready { self.lock().placement_reason.clone() } else { String::new() };
        let stats = self.workers().into_iter().map(|w| async move {
            let s = w.client.stats(STATS_TIMEOUT).await.ok();
            (w, s)
        });
        let stats = futures::future::join_all(stats).await;
        // Blocks every worker rejected, by the holder that sent them.
        let mut rejected_blocks = HashMap::<u64, u64>::new();
        for (_, s) in &stats {
            for (holder, n) in s.iter().flat_map(|s| &s.rejected_blocks_by_holder) {
                *rejected_blocks.entry(*holder).or_default() += n;
            }
        }
        let workers = stats
            .into_iter()
            .map(|(w, s)| {
                let s = s.unwrap_or_default();
                WorkerStatus {
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
                    audits_failed_total: self.audits().failed_of(w.id),
                }
            })
            .collect();
        let (workers_lost_total, sequences_resumed_total) = self.failure_counts();
        let q = self.admission().counts();
        ClusterStatus {
            epoch,
            ready,
            model: self.model_name(),
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
            sequences_moved_total: self.counters().sequences_moved.load(Ordering::Relaxed),
            install_deadlines_missed_total: self.counters().install_deadlines_missed.load(Ordering::Relaxed),
            audits_passed_total: self.audits().passed.load(Ordering::Relaxed),
            audits_failed_total: self.audits().failed.load(Ordering::Relaxed),
            audits_skipped_total: self.audits().skipped.load(Ordering::Relaxed),
            audit_bans_total: self.audits().banned.load(Ordering::Relaxed),
            placement: plan
                .as_ref()
                .map_or("", |p| if p.tensor_degree().is_some() { "tensor" } else { "gather" })
                .to_string(),
            tensor_degree: plan.as_ref().and_then(|p| p.tensor_degree()).unwrap_or(0) as u32,
            placement_reason,
            not_ready_reason,
        }
    }
}
