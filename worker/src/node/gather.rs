//! The gather: whole tensors (or element ranges of them) assembled from this
//! worker's own slices and its peers' `Shards` services, verified chunk by chunk.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::f16;
use zeroshard_offload::plan::{Plan, WorkerId};

use zeroshard_offload::shards::{Assembler, HostSlices, TensorRange};

use crate::error::{Result, WorkerError};
use crate::rpc::peer::{FetchPolicy, PeerClient};
use crate::sync;

/// Attempts in a row without progress before a fetch from the last holder of a
/// range fails (a bad chunk or a broken stream costs one; what was already
/// verified is kept). Holders with a replica behind them get one attempt.
pub(super) const FETCH_ATTEMPTS: usize = 4;

/// A holder that failed is tried last for this long.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Running totals of what gathers moved from peers.
#[derive(Debug, Default)]
pub(crate) struct GatherStats {
    /// Bytes received from peers.
    pub bytes: AtomicU64,
    /// Wall-clock nanoseconds spent in gathers that fetched from peers.
    pub nanos: AtomicU64,
    /// Chunks rejected (checksum or order) and refetched.
    pub rejected_chunks: AtomicU64,
    /// Time with at least one gather in flight.
    pub busy_nanos: AtomicU64,
    /// Time steps spent blocked on gathers.
    pub wait_nanos: AtomicU64,
    /// Fetches completed by a replica after the first holder failed.
    pub failovers: AtomicU64,
    in_flight: std::sync::Mutex<(u32, Option<Instant>)>,
}

impl GatherStats {
    fn begin(&self) {
        let mut g = sync::lock(&self.in_flight);
        if g.0 == 0 {
            g.1 = Some(Instant::now());
        }
        g.0 += 1;
    }

    fn end(&self) {
        let mut g = sync::lock(&self.in_flight);
        g.0 -= 1;
        if g.0 == 0 {
            if let Some(t) = g.1.take() {
                self.busy_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Marks a gather in flight for as long as it lives.
struct InFlight<'a>(&'a GatherStats);

impl<'a> InFlight<'a> {
    fn new(s: &'a GatherStats) -> Self {
        s.begin();
        Self(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl GatherStats {
    /// Average bytes per second over all gathers so far.
    pub(crate) fn bytes_per_s(&self) -> f64 {
        let ns = self.nanos.load(Ordering::Relaxed);
        if ns == 0 {
            return 0.0;
        }
        self.bytes.load(Ordering::Relaxed) as f64 / (ns as f64 / 1e9)
    }
}

/// Gathers element ranges under one plan epoch.
pub(super) struct Gatherer {
    plan: Arc<Plan>,
    me: WorkerId,
    own: Arc<HostSlices>,
    peers: HashMap<WorkerId, PeerClient>,
    pub stats: Arc<GatherStats>,
    fetch_timeout: Duration,
    /// Holders that failed recently, and when.
    down: Mutex<HashMap<WorkerId, Instant>>,
}

impl Gatherer {
    pub(super) fn new(
        plan: Arc<Plan>,
        me: WorkerId,
        own: Arc<HostSlices>,
        peers: HashMap<WorkerId, PeerClient>,
        stats: Arc<GatherStats>,
        fetch_timeout: Duration,
    ) -> Self {
        Self { plan, me, own, peers, stats, fetch_timeout, down: Mutex::new(HashMap::new()) }
    }

    /// `holders` in the order to try them: healthy ones first, in plan order.
    fn try_order(&self, holders: &[WorkerId]) -> Vec<WorkerId> {
        let down = sync::lock(&self.down);
        let recent = |w: &WorkerId| down.get(w).is_some_and(|t| t.elapsed() < DOWN_FOR);
        let (mut up, later): (Vec<WorkerId>, Vec<WorkerId>) = holders.iter().partition(|w| !recent(w));
        up.extend(later);
        up
    }

    /// Fetches each requested range into a new f16 vector (in request order).
    pub(super) async fn gather(&self, requests: &[TensorRange]) -> Result<Vec<Vec<f16>>> {
        let _in_flight = InFlight::new(&self.stats);
        let start = Instant::now();
        let mut outputs: Vec<Vec<f16>> = requests.iter().map(|r| vec![f16::ZERO; r.len() as usize]).collect();
        // Carve every output into the pieces its holders serve.
        // Keyed by the holders to try, in order.
        let mut remote: HashMap<Vec<WorkerId>, Vec<(TensorRange, &mut [u8])>> = HashMap::new();
        let mut fetched_bytes = 0u64;
        for (req, out) in requests.iter().zip(outputs.iter_mut()) {
            let pieces = self.plan.owners(&req.tensor, req.elements.clone())?;
            let mut rest: &mut [u8] = bytemuck_bytes(out);
            for piece in pieces {
                let len = ((piece.elements.end - piece.elements.start) * 2) as usize;
                let (dest, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                let range = TensorRange::new(req.tensor.clone(), piece.elements.clone());
                if piece.holders.contains(&self.me) {
                    let mut at = 0;
                    for bytes in self.own.pieces(&range)? {
                        dest[at..at + bytes.len()].copy_from_slice(&bytes);
                        at += bytes.len();
                    }
                } else {
                    if piece.holders.is_empty() {
                        return Err(WorkerError::Gather(format!(
                            "no holder for {} {:?}",
                            req.tensor, piece.elements
                        )));
                    }
                    fetched_bytes += len as u64;
                    remote.entry(self.try_order(piece.holders)).or_default().push((range, dest));
                }
            }
        }
        if !remote.is_empty() {
            let fetches = remote.into_iter().map(|(holders, ranges)| self.fetch(holders, ranges));
            futures::future::try_join_all(fetches).await?;
            self.stats.bytes.fetch_add(fetched_bytes, Ordering::Relaxed);
            self.stats.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(outputs)
    }

    /// The part of a gather that `holders` serve: from the first, then, if it
    /// fails, the rest of it from the next, within the same step.
    async fn fetch(&self, holders: Vec<WorkerId>, ranges: Vec<(TensorRange, &mut [u8])>) -> Result<()> {
        let mut asm = Assembler::new(ranges, 2)?;
        let mut errors = Vec::new();
        for (i, peer) in holders.iter().enumerate() {
            let Some(mut client) = self.peers.get(peer).cloned() else {
                errors.push(format!("no connection to worker {peer}"));
                continue;
            };
            let last = i + 1 == holders.len();
            let policy =
                FetchPolicy { attempts: if last { FETCH_ATTEMPTS } else { 1 }, timeout: self.fetch_timeout };
            let source = peer.to_string();
            match client
                .fetch_into(&source, self.plan.epoch(), &mut asm, &self.stats.rejected_chunks, policy)
                .await
            {
                Ok(()) => {
                    if i > 0 {
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(e) => {
                    if !last {
                        tracing::warn!("{e}; fetching the rest from worker {}", holders[i + 1]);
                    }
                    sync::lock(&self.down).insert(*peer, Instant::now());
                    errors.push(e);
                    asm.restart();
                }
            }
        }
        Err(WorkerError::Gather(errors.join("; ")))
    }
}

/// The little-endian bytes of an f16 buffer.
fn bytemuck_bytes(v: &mut [f16]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}
