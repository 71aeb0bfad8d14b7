//! The cluster as `status` and `/metrics` show it: [`ClusterStatus`] (the
//! plan, the queue, the coordinator's counters, one [`WorkerStatus`] per
//! worker) and [`WorkerStats`], what a worker reports of itself.
use std::collections::HashMap;

/// What a worker reports of itself (its `Stats`).
#[derive(Clone, Debug, Default)]
pub struct WorkerStats {
    pub id: u64,
    /// Its active epoch (0: none).
    pub epoch: u64,
    pub owned_partitioned_bytes: u64,
    pub owned_persistent_bytes: u64,
    pub resident_bytes: u64,
    pub active_sequences: u32,
    pub gathered_bytes_total: u64,
    pub gather_bytes_per_s: f64,
    pub steps_total: u64,
    pub rejected_chunks_total: u64,
    pub step_nanos_total: u64,
    pub gather_wait_nanos_total: u64,
    pub gather_busy_nanos_total: u64,
    pub loads_total: u64,
    pub loaded_bytes_total: u64,
    pub failovers_total: u64,
    /// Bytes loaded so far for the plan it is preparing.
    pub loading_bytes: u64,
    /// Blocks it received that failed their digest, by the holder that sent them.
    pub rejected_blocks_by_holder: HashMap<u64, u64>,
    pub kv_cache_bytes: u64,
    pub kv_reserved_bytes: u64,
    /// KV-cache bytes one token takes (0 before its first plan).
    pub kv_bytes_per_token: u64,
    pub max_active_sequences: u32,
    /// The tensor placement: bytes sent to and received from its group.
    pub group_sent_bytes_total: u64,
    pub group_received_bytes_total: u64,
    /// What its compute threads measured at start (0: not measured, a CUDA worker).
    pub calibrated_gflops: f64,
    pub calibrated_read_gbs: f64,
    /// Its machine (the kernel's boot id): workers with the same one share cores.
    pub host_id: String,
}

/// One worker as `status` shows it.
#[derive(Clone, Debug, Default)]
pub struct WorkerStatus {
    pub id: u64,
    pub address: String,
    pub owned_partitioned_bytes: u64,
    pub owned_persistent_bytes: u64,
    pub resident_bytes: u64,
    pub active_sequences: u32,
    pub gather_bytes_per_s: f64,
    /// It has activated the plan's epoch.
    pub ready: bool,
    pub rejected_chunks_total: u64,
    pub steps_total: u64,
    pub loads_total: u64,
    pub failovers_total: u64,
    /// Blocks it served that failed the digest at their receivers.
    pub rejected_blocks_total: u64,
    pub kv_cache_bytes: u64,
    pub kv_reserved_bytes: u64,
    pub max_active_sequences: u32,
    /// Output audits that failed its tokens.
    pub audits_failed_total: u64,
}

/// The cluster as `status` shows it.
#[derive(Clone, Debug, Default)]
pub struct ClusterStatus {
    /// The active plan's epoch (0 before the first plan).
    pub epoch: u64,
    pub ready: bool,
    pub model: String,
    pub workers: Vec<WorkerStatus>,
    pub replicas: u32,
    pub workers_lost_total: u64,
    pub sequences_resumed_total: u64,
    pub queued_requests: u32,
    pub max_queued_requests: u32,
    pub requests_admitted_total: u64,
    pub requests_rejected_total: u64,
    pub queue_ms_total: f64,
    pub queue_ms_max: f64,
    pub step_deadlines_missed_total: u64,
    pub sequences_moved_total: u64,
    pub install_deadlines_missed_total: u64,
    /// Output audits: passed, failed, skipped; workers banned for failing them.
    pub audits_passed_total: u64,
    pub audits_failed_total: u64,
    pub audits_skipped_total: u64,
    pub audit_bans_total: u64,
    /// The active plan's placement (`gather`, `tensor`; empty before the first plan).
    pub placement: String,
    /// Under `tensor`, the workers of each group (0 otherwise).
    pub tensor_degree: u32,
    /// Why that placement: `--placement auto`'s choice and the figures behind
    /// it, a fallback's reason, or the flag.
    pub placement_reason: String,
    /// Why the cluster is not ready (empty when it is).
    pub not_ready_reason: String,
}
