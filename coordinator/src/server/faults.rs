//! The fault watch: which workers serve blocks that fail the checkpoint's
//! digests. Every worker counts, per holder, the blocks it received that failed
//! their digest (and never used); this task polls every worker's counts
//! (`Stats`, so it works with embedded and etcd membership alike), sums them
//! per holder, and names each holder that reaches [`EVICT_AFTER_BLOCKS`] to the
//! supervisor, which bans it from planning and re-plans around it.
//!
//! It polls because workers report these counts only when asked (`Stats`);
//! what a worker admits is read by the supervisor when a plan activates, not
//! here.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::mpsc;
use zeroshard_offload::plan::WorkerId;

use super::state::Coordinator;

/// A holder whose served blocks failed their digest this often is evicted.
pub(super) const EVICT_AFTER_BLOCKS: u64 = 3;

/// How often every worker's counts are read.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// A worker that does not answer this fast is skipped this round.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// A worker to ban, and what it did (the digest watch names holders whose
/// blocks failed; the output audits, workers whose tokens failed).
pub(super) struct Faulty {
    pub id: WorkerId,
    pub why: String,
    pub cause: Cause,
}

/// What a faulty worker was caught at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cause {
    /// Serving blocks that failed the checkpoint's digests.
    Blocks,
    /// Returning tokens that failed output audits.
    Audits,
}

/// Polls until the supervisor is gone; names each faulty holder once.
pub(super) async fn watch(coord: Coordinator, faulty: mpsc::UnboundedSender<Faulty>) {
    let mut named = BTreeSet::new();
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        if faulty.is_closed() {
            return;
        }
        let workers = coord.workers();
        let polls = workers.iter().map(|w| async { (w.id, w.client.report(POLL_TIMEOUT).await) });
        let mut by_holder: BTreeMap<WorkerId, u64> = BTreeMap::new();
        for (_, report) in futures::future::join_all(polls).await {
            let Some(report) = report else { continue };
            for (holder, n) in report.rejected_blocks {
                *by_holder.entry(holder).or_default() += n;
            }
        }
        for (id, blocks) in by_holder {
            if blocks >= EVICT_AFTER_BLOCKS && named.insert(id) {
                let why = format!("{id} served {blocks} block(s) that failed the checkpoint's digest");
                if faulty.send(Faulty { id, why, cause: Cause::Blocks }).is_err() {
                    return;
                }
            }
        }
    }
}
