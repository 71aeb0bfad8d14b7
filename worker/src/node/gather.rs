//! The gather: whole tensors (or element ranges of them) assembled from this
//! worker's own slices and its peers' `Shards` services, verified chunk by
//! chunk (CRC-32C: the transfer) and block by block (the checkpoint's BLAKE3
//! digests: the sender). A remote piece is widened to the whole blocks that
//! cover it (its holder has them: shards are made of whole blocks), every
//! block is checked, then the requested part is copied out. A block that fails
//! its digest is never used: it is counted against its holder and fetched from
//! the next holder, or from the coordinator, which reads the checkpoint.
//!
//! When the next epoch activates without some holders of this one (they left
//! the cluster), fetches still aimed at them are abandoned at once
//! ([`Gatherer::abandon`]): the step fails fast and its sequences resume under
//! the new epoch, instead of retrying a holder that is gone.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::f16;
use zeroshard_offload::digest::{covering, BlockDigests, DigestError, StreamCheck, BLOCK_BYTES};
use zeroshard_offload::plan::{Plan, WorkerId};

use zeroshard_offload::shards::{Assembler, HostSlices, TensorRange};

use crate::error::{Result, WorkerError};
use crate::rpc::peer::{FetchPolicy, PeerClient};
use zeroshard_offload::sync;

/// Attempts in a row without progress before a fetch from the last holder of a
/// range fails (a bad chunk or a broken stream costs one; what was already
/// verified is kept). Holders with a replica behind them get one attempt.
pub(super) const FETCH_ATTEMPTS: usize = 4;

/// A fetch from a holder the next epoch left out still gets this long to
/// finish (a draining holder answers; a stopped one does not). 250 ms was
/// too short on 2 busy cores: a sequence moved off a draining worker failed
/// its next step there and was counted as resumed after a failure.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

/// A holder that failed is tried last for this long.
const DOWN_FOR: Duration = Duration::from_secs(10);
/// A fetch this large has its blocks checked as they arrive ([`StreamCheck`]).
const STREAM_CHECK_BYTES: usize = 2 << 20;

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
    /// The tensor placement: bytes sent to and received from the group.
    pub group_sent: AtomicU64,
    pub group_received: AtomicU64,
    /// Blocks that failed their digest, by the holder that sent them.
    rejected_blocks: Mutex<BTreeMap<u64, u64>>,
    in_flight: std::sync::Mutex<(u32, Option<Instant>)>,
}

impl GatherStats {
    /// Blocks rejected so far, by holder id.
    pub(crate) fn rejected_blocks(&self) -> HashMap<u64, u64> {
        sync::lock(&self.rejected_blocks).iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn reject_blocks(&self, holder: WorkerId, blocks: u64) {
        *sync::lock(&self.rejected_blocks).entry(holder.0).or_default() += blocks;
    }

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
    /// The checkpoint's digest of every block.
    digests: Arc<BlockDigests>,
    /// The coordinator's `Shards` (reads the checkpoint): the last source of a
    /// block no holder served intact.
    fallback: Option<PeerClient>,
    pub stats: Arc<GatherStats>,
    fetch_timeout: Duration,
    /// Holders that failed recently, and when.
    down: Mutex<HashMap<WorkerId, Instant>>,
    /// Holders of this epoch that the next one left out: never waited on again.
    departed: tokio::sync::watch::Sender<BTreeSet<WorkerId>>,
}

impl Gatherer {
    pub(super) fn new(
        plan: Arc<Plan>,
        me: WorkerId,
        own: Arc<HostSlices>,
        peers: HashMap<WorkerId, PeerClient>,
        verify: (Arc<BlockDigests>, Option<PeerClient>),
        stats: Arc<GatherStats>,
        fetch_timeout: Duration,
    ) -> Self {
        let (digests, fallback) = verify;
        Self {
            plan,
            me,
            own,
            peers,
            digests,
            fallback,
            stats,
            fetch_timeout,
            down: Mutex::new(HashMap::new()),
            departed: tokio::sync::watch::channel(BTreeSet::new()).0,
        }
    }

    /// The workers of this gatherer's plan.
    pub(super) fn workers(&self) -> &[WorkerId] {
        self.plan.workers()
    }

    /// The epoch is replaced by one whose workers are `kept`: fetches from
    /// every other holder stop now, and none starts again.
    pub(super) fn abandon(&self, kept: &[WorkerId]) {
        let gone: BTreeSet<WorkerId> =
            self.plan.workers().iter().copied().filter(|w| !kept.contains(w)).collect();
        if !gone.is_empty() {
            self.departed.send_replace(gone);
        }
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
        let mut remote: HashMap<Vec<WorkerId>, Vec<Remote<'_>>> = HashMap::new();
        let mut fetched_bytes = 0u64;
        for (req, out) in requests.iter().zip(outputs.iter_mut()) {
            let pieces = self.plan.owners(&req.tensor, req.elements.clone())?;
            let numel = self.plan.tensor(&req.tensor).map_or(0, |t| t.numel());
            let mut rest: &mut [u8] = bytemuck_bytes(out);
            for piece in pieces {
                let len = ((piece.elements.end - piece.elements.start) * 2) as usize;
                let (dest, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                if piece.holders.contains(&self.me) {
                    let range = TensorRange::new(req.tensor.clone(), piece.elements.clone());
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
                    // Whole blocks, so that each can be checked against its digest.
                    let blocks = covering(numel, 2, piece.elements.clone());
                    let skip = ((piece.elements.start - blocks.start) * 2) as usize;
                    fetched_bytes += (blocks.end - blocks.start) * 2;
                    let range = TensorRange::new(req.tensor.clone(), blocks);
                    remote.entry(self.try_order(piece.holders)).or_default().push(Remote {
                        range,
                        skip,
                        dest,
                    });
                }
            }
        }
        if !remote.is_empty() {
            let fetches = remote.into_iter().map(|(holders, ranges)| self.fetch(holders, ranges));
            futures::future::try_join_all(fetches).await?;
            self.stats.bytes.fetch_add(fetched_bytes, Ordering::Relaxed);
            self.stats.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            metrics::counter!("zeroshard_gather_bytes_total").increment(fetched_bytes);
            metrics::histogram!("zeroshard_gather_seconds").record(start.elapsed().as_secs_f64());
        }
        Ok(outputs)
    }

    /// The part of a gather that `holders` serve: whole blocks, fetched
    /// straight into the output when the piece is whole blocks, else into a
    /// scratch buffer the piece is copied out of once every block is checked.
    async fn fetch(&self, holders: Vec<WorkerId>, mut pieces: Vec<Remote<'_>>) -> Result<()> {
        let mut scratch: Vec<Vec<u8>> = pieces
            .iter()
            .map(|p| if p.is_direct() { Vec::new() } else { vec![0u8; p.range.len() as usize * 2] })
            .collect();
        let targets = pieces
            .iter_mut()
            .zip(scratch.iter_mut())
            .map(|(p, s)| {
                let dest: &mut [u8] = if s.is_empty() { &mut *p.dest } else { s.as_mut_slice() };
                (p.range.clone(), dest)
            })
            .collect();
        self.fetch_verified(&holders, targets).await?;
        for (p, s) in pieces.iter_mut().zip(&scratch) {
            if !s.is_empty() {
                let len = p.dest.len();
                p.dest.copy_from_slice(&s[p.skip..p.skip + len]);
            }
        }
        Ok(())
    }

    /// Fills `pending` (whole blocks) from the first of `holders`, then, if it
    /// fails, from the next, within the same step. Every block is checked
    /// against its digest; a block that fails is counted against the holder that
    /// sent it and fetched again from the next holder, or, after the last, from
    /// the coordinator.
    async fn fetch_verified(
        &self,
        holders: &[WorkerId],
        mut pending: Vec<(TensorRange, &mut [u8])>,
    ) -> Result<()> {
        let mut errors = Vec::new();
        let mut rejected_any = false;
        let mut abandoned = false;
        let sources = holders.iter().map(|h| Some(*h)).chain(self.fallback.as_ref().map(|_| None));
        for (i, holder) in sources.enumerate() {
            let (client, source) = match holder {
                Some(peer) => (self.peers.get(&peer).cloned(), peer.to_string()),
                // The coordinator serves only what a holder failed to serve intact.
                None if rejected_any => (self.fallback.clone(), "the coordinator".to_string()),
                None => break,
            };
            let Some(mut client) = client else {
                errors.push(format!("no connection to {source}"));
                continue;
            };
            let mut departed = self.departed.subscribe();
            let gone = move |d: &BTreeSet<WorkerId>| holder.is_some_and(|h| d.contains(&h));
            if gone(&departed.borrow()) {
                abandoned = true;
                errors.push(format!("{source} left the cluster (epoch {} replaced)", self.plan.epoch()));
                continue;
            }
            let last = i + 1 >= holders.len();
            let policy =
                FetchPolicy { attempts: if last { FETCH_ATTEMPTS } else { 1 }, timeout: self.fetch_timeout };
            let check = self.stream_check(&pending)?;
            let mut asm = Assembler::new(pending, 2)?;
            let fetched = tokio::select! {
                r = client.fetch_into(&source, self.plan.epoch(), &mut asm, &self.stats.rejected_chunks, policy, check.as_ref()) => r,
                // A holder that left by draining still answers: its fetch gets a moment to finish.
                _ = async { let _ = departed.wait_for(gone).await; tokio::time::sleep(ABANDON_GRACE).await } => {
                    abandoned = true;
                    Err(format!("{source} left the cluster (epoch {} replaced)", self.plan.epoch()))
                }
            };
            pending = asm.into_targets();
            if let Err(e) = fetched {
                if let Some(next) = holders.get(i + 1) {
                    tracing::warn!("{e}; fetching the rest from worker {next}");
                }
                if let Some(peer) = holder {
                    sync::lock(&self.down).insert(peer, Instant::now());
                }
                errors.push(e);
                continue;
            }
            let (bad, rejected) = self.failed_blocks(pending, check)?;
            if rejected == 0 {
                if i > 0 {
                    self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("zeroshard_gather_failovers_total").increment(1);
                }
                return Ok(());
            }
            rejected_any = true;
            let why = format!("{source}: {rejected} block(s) failed the checkpoint's digest");
            tracing::warn!("{why}; never used, fetching them again elsewhere");
            if let Some(peer) = holder {
                self.stats.reject_blocks(peer, rejected);
                sync::lock(&self.down).insert(peer, Instant::now());
            }
            errors.push(why);
            pending = bad;
        }
        if abandoned {
            return Err(WorkerError::Abandoned(errors.join("; ")));
        }
        Err(WorkerError::Gather(errors.join("; ")))
    }

    /// For a fetch of at least [`STREAM_CHECK_BYTES`]: its blocks hashed as
    /// they arrive, on a thread of the check's own (smaller fetches are
    /// hashed once complete: a thread would cost more than it overlaps).
    fn stream_check(&self, pending: &[(TensorRange, &mut [u8])]) -> Result<Option<StreamCheck>> {
        let bytes: usize = pending.iter().map(|(_, d)| d.len()).sum();
        if bytes < STREAM_CHECK_BYTES {
            return Ok(None);
        }
        let ranges =
            pending.iter().map(|(r, d)| (r.tensor.clone(), r.elements.start * 2, d.len() as u64)).collect();
        StreamCheck::start(self.digests.clone(), ranges)
            .map(Some)
            .map_err(|e| WorkerError::Gather(format!("checking a fetch against its digests: {e}")))
    }

    /// Checks every block of `received` (what `check` did not, when given);
    /// returns the blocks that failed (as ranges to fetch again, with their
    /// destinations) and how many.
    #[allow(clippy::type_complexity)]
    fn failed_blocks<'a>(
        &self,
        received: Vec<(TensorRange, &'a mut [u8])>,
        check: Option<StreamCheck>,
    ) -> Result<(Vec<(TensorRange, &'a mut [u8])>, u64)> {
        let per_block = (BLOCK_BYTES / 2) as u64;
        let failed = |tensor: &str, e: DigestError| {
            WorkerError::Gather(format!("checking `{tensor}` against its digests: {e}"))
        };
        let mut verdicts = match check {
            Some(c) => c.finish().map_err(|e| failed("a fetch", e))?.into_iter().map(Some).collect(),
            None => Vec::new(),
        };
        verdicts.resize_with(received.len(), || None);
        let mut again = Vec::new();
        for ((range, dest), verdict) in received.into_iter().zip(verdicts) {
            let bad = match verdict {
                Some(v) if !v.unchecked => v.bad,
                _ => self
                    .digests
                    .bad_blocks(&range.tensor, range.elements.start * 2, dest)
                    .map_err(|e| failed(&range.tensor, e))?,
            };
            if bad.is_empty() {
                continue;
            }
            let first = range.elements.start / per_block;
            for (k, block) in dest.chunks_mut(BLOCK_BYTES).enumerate() {
                let index = first + k as u64;
                if bad.contains(&index) {
                    let start = index * per_block;
                    let elements = start..start + (block.len() / 2) as u64;
                    again.push((TensorRange::new(range.tensor.clone(), elements), block));
                }
            }
        }
        let n = again.len() as u64;
        Ok((again, n))
    }
}

/// A remote piece of a gather: the whole blocks to fetch, and where the
/// requested part (from byte `skip` of them) goes.
struct Remote<'a> {
    range: TensorRange,
    skip: usize,
    dest: &'a mut [u8],
}

impl Remote<'_> {
    /// The piece is whole blocks: fetched straight into its destination.
    fn is_direct(&self) -> bool {
        self.skip == 0 && self.dest.len() as u64 == self.range.len() * 2
    }
}

/// The little-endian bytes of an f16 buffer.
fn bytemuck_bytes(v: &mut [f16]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}
