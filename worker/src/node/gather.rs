//! The gather: whole tensors (or element ranges of them) assembled from this
//! worker's own slices and its peers' `Shards` services, verified chunk by chunk.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use half::f16;
use tonic::transport::Channel;
use zeroshard_offload::plan::{Plan, WorkerId};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::shards_client::ShardsClient;

use crate::error::{Result, WorkerError};
use crate::shards::{Assembler, Chunk, HostSlices, TensorRange};

/// Attempts in a row without progress before a peer fetch fails (a bad chunk or
/// a broken stream costs one; what was already verified is kept).
const FETCH_ATTEMPTS: usize = 4;

/// Running totals of what gathers moved from peers.
#[derive(Debug, Default)]
pub struct GatherStats {
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
    in_flight: std::sync::Mutex<(u32, Option<Instant>)>,
}

impl GatherStats {
    fn begin(&self) {
        let mut g = self.in_flight.lock().expect("gather stats lock");
        if g.0 == 0 {
            g.1 = Some(Instant::now());
        }
        g.0 += 1;
    }

    fn end(&self) {
        let mut g = self.in_flight.lock().expect("gather stats lock");
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
    pub fn bytes_per_s(&self) -> f64 {
        let ns = self.nanos.load(Ordering::Relaxed);
        if ns == 0 {
            return 0.0;
        }
        self.bytes.load(Ordering::Relaxed) as f64 / (ns as f64 / 1e9)
    }
}

/// Gathers element ranges under one plan epoch.
pub struct Gatherer {
    plan: Arc<Plan>,
    me: WorkerId,
    own: Arc<HostSlices>,
    peers: HashMap<WorkerId, ShardsClient<Channel>>,
    pub stats: Arc<GatherStats>,
}

impl Gatherer {
    pub fn new(
        plan: Arc<Plan>,
        me: WorkerId,
        own: Arc<HostSlices>,
        peers: HashMap<WorkerId, ShardsClient<Channel>>,
        stats: Arc<GatherStats>,
    ) -> Self {
        Self { plan, me, own, peers, stats }
    }

    /// Fetches each requested range into a new f16 vector (in request order).
    pub async fn gather(&self, requests: &[TensorRange]) -> Result<Vec<Vec<f16>>> {
        let _in_flight = InFlight::new(&self.stats);
        let start = Instant::now();
        let mut outputs: Vec<Vec<f16>> = requests.iter().map(|r| vec![f16::ZERO; r.len() as usize]).collect();
        // Carve every output into the pieces its holders serve.
        let mut remote: HashMap<WorkerId, Vec<(TensorRange, &mut [u8])>> = HashMap::new();
        let mut fetched_bytes = 0u64;
        for (req, out) in requests.iter().zip(outputs.iter_mut()) {
            let pieces = self
                .plan
                .owners(&req.tensor, req.elements.clone())
                .map_err(|e| WorkerError::Gather(format!("plan: {e}")))?;
            let mut rest: &mut [u8] = bytemuck_bytes(out);
            for piece in pieces {
                let len = ((piece.elements.end - piece.elements.start) * 2) as usize;
                let (dest, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                let range = TensorRange::new(req.tensor.clone(), piece.elements.clone());
                if piece.holders.contains(&self.me) {
                    let mut at = 0;
                    for bytes in self.own.pieces(&range).map_err(|e| WorkerError::Gather(e.to_string()))? {
                        dest[at..at + bytes.len()].copy_from_slice(&bytes);
                        at += bytes.len();
                    }
                } else {
                    let holder = piece.holders.first().copied().ok_or_else(|| {
                        WorkerError::Gather(format!("no holder for {} {:?}", req.tensor, piece.elements))
                    })?;
                    fetched_bytes += len as u64;
                    remote.entry(holder).or_default().push((range, dest));
                }
            }
        }
        if !remote.is_empty() {
            let fetches = remote.into_iter().map(|(peer, ranges)| self.fetch(peer, ranges));
            futures::future::try_join_all(fetches).await?;
            self.stats.bytes.fetch_add(fetched_bytes, Ordering::Relaxed);
            self.stats.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(outputs)
    }

    /// One peer's part of a gather, retried from where it broke.
    async fn fetch(&self, peer: WorkerId, ranges: Vec<(TensorRange, &mut [u8])>) -> Result<()> {
        let mut client = self
            .peers
            .get(&peer)
            .cloned()
            .ok_or_else(|| WorkerError::Gather(format!("no connection to worker {peer}")))?;
        let mut asm = Assembler::new(ranges, 2).map_err(|e| WorkerError::Gather(e.to_string()))?;
        let source = format!("worker {peer}");
        fetch_into(&mut client, &source, self.plan.epoch(), &mut asm, &self.stats.rejected_chunks)
            .await
            .map_err(WorkerError::Gather)
    }
}

/// The little-endian bytes of an f16 buffer.
fn bytemuck_bytes(v: &mut [f16]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

/// Fills `asm` from `client`'s `FetchRanges` stream under `epoch`. A rejected
/// chunk (counted in `rejected`) or a broken stream restarts the fetch from what
/// is still missing; it gives up after [`FETCH_ATTEMPTS`] tries in a row without
/// progress, or at once on a stale epoch. Errors name `source`.
pub(super) async fn fetch_into(
    client: &mut ShardsClient<Channel>,
    source: &str,
    epoch: u64,
    asm: &mut Assembler<'_>,
    rejected: &AtomicU64,
) -> std::result::Result<(), String> {
    let mut last_error = String::new();
    let mut failures = 0;
    while failures < FETCH_ATTEMPTS {
        let before = asm.received_bytes();
        let ranges = asm.request().iter().map(pb::TensorRange::from).collect();
        let mut stream =
            match client.fetch_ranges(pb::FetchRangesRequest { epoch, ranges, chunk_bytes: 0 }).await {
                Ok(s) => s.into_inner(),
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    return Err(format!("{source}: {}", status.message()));
                }
                Err(status) => {
                    last_error = format!("{source}: {}", status.message());
                    failures += 1;
                    continue;
                }
            };
        let broke = loop {
            match stream.message().await {
                Ok(Some(c)) => {
                    if let Err(e) = asm.accept(&Chunk::from(c)) {
                        rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("chunk from {source} rejected, refetching: {e}");
                        break Some(e.to_string());
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(format!("{source}: stream broke: {}", status.message())),
            }
        };
        match broke {
            None if asm.is_complete() => return Ok(()),
            None => last_error = format!("{source}: stream ended early"),
            Some(e) => last_error = e,
        }
        failures = if asm.received_bytes() > before { 1 } else { failures + 1 };
        asm.restart();
    }
    Err(format!("gave up after {FETCH_ATTEMPTS} attempts without progress: {last_error}"))
}
