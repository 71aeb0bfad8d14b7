//! [`Node`]: one worker's state — its id, the model, and the plans it holds.
//!
//! A worker holds up to three epochs at once. A new plan is first *prepared*
//! (`InstallPlan`: its ranges are loaded while the worker keeps computing under
//! the *active* one), then *activated* (`ActivatePlan`: the batching loop
//! switches to it between two steps); the epoch it replaced stays as
//! *previous*, still served to peers whose steps started under it, until the
//! next activation.
//!
//! State has one owner per kind: the plans behind one `RwLock` ([`Epochs`]),
//! what the first plan sets up (model, device, the batching loop) behind the
//! async lock that also serialises installations ([`Setup`]), counters in
//! [`NodeStats`], and the id in a `watch` that the first plan awaits.
//!
//! On a GPU (`NodeConfig::cuda`) the device is opened and sized at the first
//! plan, so a device too small for one layer refuses that plan with the
//! numbers; gathered layers that stay resident (within the device budget for
//! resident layers) are copied to the device once, the others are staged
//! through the backend's ring every step.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use zeroshard_offload::plan::{Assignment, OwnedBytes};
use zeroshard_offload::shards::HostSlices;
use zeroshard_offload::Checkpoint;

use super::batcher::{self, BatchStats, Command, Limits, LoopConfig};
use super::gather::{GatherStats, Gatherer};
use super::weights::{ClusterWeights, Prefetch};
use super::{store, NodeConfig, PlannedModel};
use crate::error::{Result, WorkerError};
use crate::rpc::peer::PeerClient;
use zeroshard_engine::bench::Calibration;
use zeroshard_engine::engine::Engine;
use zeroshard_engine::placement::{open_for_cluster, GpuPlacement};
use zeroshard_engine::tensor::TensorShard;
use zeroshard_engine::weights::HostWeights;
use zeroshard_engine::Backend;
use zeroshard_offload::plan::WorkerId;
use zeroshard_offload::sync;
use zeroshard_offload::ModelConfig;

/// What one plan gave this worker.
pub(super) struct Installed {
    pub epoch: u64,
    /// The ranges it serves to peers (none under the tensor placement).
    pub slices: Arc<HostSlices>,
    pub owned: OwnedBytes,
    pub compute: Compute,
}

/// What a worker computes from under one plan.
pub(super) enum Compute {
    /// The gather placement: every layer gathered from its holders.
    Gather(Arc<ClusterWeights>),
    /// The tensor placement: its shard of every layer, held here.
    Tensor(Arc<TensorInstall>),
}

/// A worker's part of a tensor-parallel group under one plan.
pub(super) struct TensorInstall {
    pub config: ModelConfig,
    pub shard: TensorShard,
    pub weights: Arc<HostWeights>,
    /// The members' addresses in rank order (this worker's included).
    pub members: Vec<String>,
}

/// The plans a worker holds (see the module docs).
#[derive(Default)]
pub(super) struct Epochs {
    pub active: Option<Installed>,
    pub prepared: Option<Installed>,
    pub previous: Option<Installed>,
}

impl Epochs {
    fn all(&self) -> impl Iterator<Item = &Installed> {
        [&self.active, &self.prepared, &self.previous].into_iter().flatten()
    }

    /// The ranges this worker holds under `epoch`.
    pub(super) fn slices(&self, epoch: u64) -> Option<Arc<HostSlices>> {
        self.all().find(|i| i.epoch == epoch).map(|i| i.slices.clone())
    }

    pub(super) fn knows(&self, epoch: u64) -> bool {
        self.all().any(|i| i.epoch == epoch)
    }

    pub(super) fn active_epoch(&self) -> Option<u64> {
        self.active.as_ref().map(|i| i.epoch)
    }

    /// `epoch 7 (active), 8 (prepared)`, for error messages.
    pub(super) fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (name, i) in
            [("active", &self.active), ("prepared", &self.prepared), ("previous", &self.previous)]
        {
            if let Some(i) = i {
                parts.push(format!("{} ({name})", i.epoch));
            }
        }
        if parts.is_empty() {
            "no plan".into()
        } else {
            format!("epochs {}", parts.join(", "))
        }
    }
}

/// Where the batching loop reports a fatal step error.
type FatalSender = watch::Sender<Option<Arc<WorkerError>>>;

/// What the first plan sets up, once; guarded by the installation lock.
#[derive(Default)]
struct Setup {
    model: Option<PlannedModel>,
    /// Budget for gathered layers kept resident (device bytes on a GPU).
    live_bytes: Option<u64>,
    /// The batching loop's ends, until the loop is started.
    batcher: Option<(Receiver<Command>, FatalSender)>,
}

/// How many `RunSequence` streams are open. Each stream holds a
/// [`StreamGuard`] and gives it up when tonic drops the stream, i.e. once its
/// last message and status are sent (or the caller went away).
#[derive(Default)]
pub(crate) struct SequenceStreams(Arc<watch::Sender<usize>>);

impl SequenceStreams {
    /// Counts one more open stream until the guard is dropped.
    pub(crate) fn open(&self) -> StreamGuard {
        self.0.send_modify(|n| *n += 1);
        StreamGuard(self.0.clone())
    }

    /// Returns once no stream is open.
    pub(crate) async fn all_closed(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One open `RunSequence` stream (see [`SequenceStreams`]).
pub(crate) struct StreamGuard(Arc<watch::Sender<usize>>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Counters for `Stats`.
#[derive(Default)]
pub(crate) struct NodeStats {
    pub batch: Arc<BatchStats>,
    pub resident: Arc<AtomicU64>,
    pub gather: Arc<GatherStats>,
    pub served_fetches: AtomicU64,
    /// Told on every fetch served (a drain waits for peers to go quiet).
    pub fetch_served: tokio::sync::Notify,
    /// `RunSequence` streams not yet finished: a drain waits for its hand-backs
    /// to be sent before it leaves (see [`SequenceStreams`]).
    pub sequence_streams: SequenceStreams,
    pub loads: AtomicU64,
    pub loaded_bytes: AtomicU64,
    /// Bytes loaded so far for the plan being prepared (for progress bars).
    pub loading: Arc<AtomicU64>,
}

pub(crate) struct Node {
    pub cfg: NodeConfig,
    /// This worker's id, once registered.
    id: watch::Sender<Option<u64>>,
    epochs: RwLock<Epochs>,
    commands: Sender<Command>,
    /// One installation at a time, and what the first one set up.
    setup: tokio::sync::Mutex<Setup>,
    /// A fatal step error, once the batching loop hit one.
    fatal: watch::Receiver<Option<Arc<WorkerError>>>,
    /// The active epoch (0: none yet): a group member's stream waits for it.
    active_epoch: watch::Sender<u64>,
    /// The model, once the first plan named it.
    model_config: std::sync::OnceLock<ModelConfig>,
    /// What the compute threads measured last (a CPU worker's).
    calibration: std::sync::Mutex<Option<Calibration>>,
    /// Which machine this worker runs on ([`host_id`]), read once.
    pub host_id: String,
    pub stats: NodeStats,
}

impl Node {
    pub(crate) fn new(cfg: NodeConfig) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let (fatal_tx, fatal) = watch::channel(None);
        Self {
            cfg,
            id: watch::channel(None).0,
            epochs: RwLock::new(Epochs::default()),
            commands: tx,
            setup: tokio::sync::Mutex::new(Setup { batcher: Some((rx, fatal_tx)), ..Setup::default() }),
            fatal,
            active_epoch: watch::channel(0).0,
            model_config: std::sync::OnceLock::new(),
            calibration: std::sync::Mutex::new(None),
            host_id: host_id(),
            stats: NodeStats::default(),
        }
    }

    /// Measures what this worker's compute threads do now (~0.1 s of them)
    /// and keeps it; a CUDA worker measures nothing.
    pub(crate) async fn calibrate(&self) -> Result<()> {
        if self.cfg.cuda.is_some() {
            return Ok(());
        }
        let c = tokio::task::spawn_blocking(|| {
            zeroshard_engine::engine::compute_pool().install(zeroshard_engine::bench::calibrate)
        })
        .await
        .map_err(|e| WorkerError::Task { what: "calibration", source: e.into() })?;
        tracing::info!("compute: {:.0} GFLOP/s peak, reads {:.1} GB/s", c.peak_gflops, c.read_gbs);
        *zeroshard_offload::sync::lock(&self.calibration) = Some(c);
        Ok(())
    }

    /// What the compute threads measured last; `None` on a CUDA worker.
    pub(crate) fn calibration(&self) -> Option<Calibration> {
        *zeroshard_offload::sync::lock(&self.calibration)
    }

    pub(crate) fn send(&self, c: Command) {
        let _ = self.commands.send(c);
    }

    /// This worker's id (0 before it registered).
    pub(crate) fn id(&self) -> u64 {
        self.id.borrow().unwrap_or(0)
    }

    pub(crate) fn set_id(&self, id: u64) {
        self.id.send_replace(Some(id));
    }

    /// Resolves with the error once the batching loop failed fatally.
    pub(crate) async fn fatal_error(&self) -> Arc<WorkerError> {
        let mut rx = self.fatal.clone();
        let fatal = rx.wait_for(Option::is_some).await.ok().and_then(|e| e.clone());
        match fatal {
            Some(e) => e,
            // The loop ended without an error (the worker is stopping): never.
            None => std::future::pending().await,
        }
    }

    /// Ok when a sequence routed under `epoch` can run here: a plan is active
    /// and `epoch` is one this worker holds.
    pub(crate) fn check_routable(&self, epoch: u64) -> Result<()> {
        let e = sync::read(&self.epochs);
        if e.active.is_none() || !e.knows(epoch) {
            return Err(WorkerError::Epoch(format!(
                "sequence routed under epoch {epoch}, this worker holds {}",
                e.describe()
            )));
        }
        Ok(())
    }

    /// The active epoch (0: none yet) and the bytes it owns.
    pub(crate) fn active(&self) -> (u64, OwnedBytes) {
        let e = sync::read(&self.epochs);
        e.active.as_ref().map_or((0, OwnedBytes::default()), |i| (i.epoch, i.owned))
    }

    /// The ranges this worker holds under `epoch`, to serve to peers.
    pub(crate) fn slices(&self, epoch: u64) -> Result<Arc<HostSlices>> {
        let e = sync::read(&self.epochs);
        e.slices(epoch).ok_or_else(|| {
            WorkerError::Epoch(format!("epoch {epoch} is not held by this worker ({})", e.describe()))
        })
    }

    /// Prepares the plan `a` (loads its ranges) without switching to it.
    /// Returns (owned bytes, load milliseconds); a plan already held answers at once.
    pub(crate) async fn prepare(&self, a: Assignment, model: Option<PlannedModel>) -> Result<(u64, f64)> {
        let mut setup = self.setup.lock().await;
        // The plan can arrive before the answer to our registration is processed.
        let mut id = self.id.subscribe();
        let me = match tokio::time::timeout(Duration::from_secs(10), id.wait_for(Option::is_some)).await {
            Ok(Ok(id)) => id.unwrap_or(0),
            _ => return Err(WorkerError::InvalidRequest("not registered yet".into())),
        };
        if a.worker.0 != me {
            return Err(WorkerError::InvalidRequest(format!(
                "plan is for {}, this is worker {me}",
                a.worker
            )));
        }
        let epoch = a.plan.epoch();
        if let Some(i) = sync::read(&self.epochs).all().find(|i| i.epoch == epoch) {
            return Ok((i.owned.total(), 0.0));
        }
        if setup.model.is_none() {
            setup.model =
                Some(model.ok_or_else(|| {
                    WorkerError::InvalidRequest("the first plan must name the model".into())
                })?);
        }
        if self.cfg.faults.stall_install() {
            std::future::pending::<()>().await; // the injected stall: never answers
        }
        if self.cfg.faults.fail_load() {
            return Err(WorkerError::InvalidRequest(
                "injected fault: this worker refuses to load (--fault-fail-load)".into(),
            ));
        }
        let config = setup.model.as_ref().expect("set above").config.clone();
        let _ = self.model_config.set(config.clone());
        if let Some((members, rank)) = a.plan.tensor_group(a.worker) {
            let members = members.to_vec();
            return self.prepare_tensor(&a, &mut setup, config, &members, rank).await;
        }
        let max_live_bytes = self.open_device(&mut setup, a.plan.owned_bytes(a.worker)?.total()).await?;
        let info = setup.model.as_ref().expect("set above");
        let start = Instant::now();
        let plan = Arc::new(a.plan);
        let stats = &self.stats;
        stats.loading.store(0, Ordering::Relaxed);
        // What the active epoch holds already is copied, not loaded again.
        let held = sync::read(&self.epochs).active.as_ref().map(|i| i.slices.clone());
        let (mut slices, missing, reused) = store::reuse(&plan, a.worker, held.as_deref())?;
        let digests = a.digests.clone();
        let slices = match &a.pull_from {
            Some(endpoint) => {
                store::pull_ranges(
                    &self.cfg.security,
                    endpoint,
                    plan.epoch(),
                    &missing,
                    &digests,
                    &mut slices,
                    &stats.loading,
                )
                .await?;
                slices
            }
            None => {
                let dir = self.cfg.model_dir.clone().unwrap_or_else(|| info.dir.clone());
                let progress = stats.loading.clone();
                let digests = digests.clone();
                tokio::task::spawn_blocking(move || {
                    let ckpt = Checkpoint::open(&dir)?;
                    store::read_ranges(&ckpt, &missing, &digests, &mut slices, &progress)?;
                    Ok::<_, WorkerError>(slices)
                })
                .await
                .map_err(|e| WorkerError::Task { what: "loader task", source: e.into() })??
            }
        };
        if reused > 0 {
            tracing::info!(
                "epoch {epoch}: {:.1} MB of the new ranges were already held",
                reused as f64 / 1e6
            );
        }
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let slices = Arc::new(slices);
        let mut peers = std::collections::HashMap::new();
        for (id, addr) in &a.peers {
            if *id != a.worker {
                peers.insert(*id, PeerClient::lazy(&self.cfg.security, addr)?);
            }
        }
        let owned = plan.owned_bytes(a.worker)?;
        let gatherer = Arc::new(Gatherer::new(
            plan.clone(),
            a.worker,
            slices.clone(),
            peers,
            (
                digests,
                a.coordinator_shards
                    .as_deref()
                    .map(|uri| PeerClient::lazy(&self.cfg.security, uri))
                    .transpose()?,
            ),
            stats.gather.clone(),
            self.cfg.fetch_timeout,
        ));
        let weights = Arc::new(ClusterWeights::new(
            tokio::runtime::Handle::current(),
            gatherer,
            &info.config,
            Prefetch { layers: self.cfg.prefetch_layers, bytes: self.cfg.prefetch_bytes },
            max_live_bytes,
            stats.resident.clone(),
        ));
        stats.loads.fetch_add(1, Ordering::Relaxed);
        stats.loaded_bytes.fetch_add(owned.total(), Ordering::Relaxed);
        sync::write(&self.epochs).prepared =
            Some(Installed { epoch, slices, owned, compute: Compute::Gather(weights) });
        tracing::info!(
            "worker {me}: epoch {epoch} prepared, {} bytes owned, loaded in {load_ms:.0} ms",
            owned.total()
        );
        Ok((owned.total(), load_ms))
    }

    /// Loads this worker's tensor-parallel shard (`rank` of `members`) for the
    /// plan `a` and prepares it.
    async fn prepare_tensor(
        &self,
        a: &Assignment,
        setup: &mut Setup,
        config: ModelConfig,
        members: &[WorkerId],
        rank: usize,
    ) -> Result<(u64, f64)> {
        let epoch = a.plan.epoch();
        if a.pull_from.is_some() {
            return Err(WorkerError::InvalidRequest(
                "the tensor placement reads each shard from the checkpoint on every worker: \
                 --pull is not supported with it"
                    .into(),
            ));
        }
        let shard = TensorShard::new(&config, rank, members.len())?;
        let whole: u64 = a.plan.tensors().iter().map(|t| t.numel() * u64::from(a.plan.elem_bytes())).sum();
        self.open_device(setup, whole / members.len() as u64).await?;
        let dir =
            self.cfg.model_dir.clone().unwrap_or_else(|| setup.model.as_ref().expect("known").dir.clone());
        let start = Instant::now();
        let (c, s, digests) = (config.clone(), shard.clone(), a.digests.clone());
        let weights = tokio::task::spawn_blocking(move || {
            let ckpt = Checkpoint::open(&dir)?;
            // Every block of every tensor read is checked against the
            // coordinator's digests, as a gather-placement load checks its ranges.
            let checked = s.load_checked(&ckpt, &c, |name, data| {
                store::check(&digests, name, 0, bytemuck::cast_slice(data)).map_err(|source| {
                    tracing::error!("refusing the checkpoint at {}: {source}", dir.display());
                    zeroshard_engine::EngineError::Weights(Box::new(WorkerError::CorruptCopy {
                        path: dir.clone(),
                        source,
                    }))
                })
            });
            Ok::<_, WorkerError>(checked?)
        })
        .await
        .map_err(|e| WorkerError::Task { what: "loader task", source: e.into() })??;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let bytes = weights.bytes() as u64;
        let addresses: std::collections::HashMap<WorkerId, &String> =
            a.peers.iter().map(|(w, s)| (*w, s)).collect();
        let members = members
            .iter()
            .map(|w| {
                addresses.get(w).map(|s| (*s).clone()).ok_or_else(|| {
                    WorkerError::InvalidRequest(format!("the plan names {w} in a group but gives no address"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let stats = &self.stats;
        stats.loads.fetch_add(1, Ordering::Relaxed);
        stats.loaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        let install = TensorInstall { config, shard: shard.clone(), weights: Arc::new(weights), members };
        sync::write(&self.epochs).prepared = Some(Installed {
            epoch,
            slices: Arc::new(HostSlices::new(a.plan.elem_bytes() as usize)),
            owned: OwnedBytes { partitioned: bytes, persistent: 0 },
            compute: Compute::Tensor(Arc::new(install)),
        });
        tracing::info!(
            "{}: epoch {epoch} prepared, tensor-parallel shard {rank} of {}: {bytes} bytes, \
             loaded in {load_ms:.0} ms",
            a.worker,
            shard.degree
        );
        Ok((bytes, load_ms))
    }

    /// Switches to the prepared `epoch` (idempotent when it is already active).
    /// Under the tensor placement rank 0 then opens its group's streams.
    pub(crate) fn activate(self: &Arc<Self>, epoch: u64) -> Result<()> {
        let tensor = {
            let mut e = sync::write(&self.epochs);
            if e.active_epoch() == Some(epoch) {
                return Ok(());
            }
            if e.prepared.as_ref().map(|i| i.epoch) != Some(epoch) {
                return Err(WorkerError::Epoch(format!(
                    "epoch {epoch} was not prepared on this worker ({})",
                    e.describe()
                )));
            }
            let next = e.prepared.take().expect("checked above");
            let was_tensor = matches!(e.active.as_ref().map(|i| &i.compute), Some(Compute::Tensor(_)));
            let tensor = match &next.compute {
                Compute::Gather(weights) => {
                    if let (true, Some(config)) = (was_tensor, self.model_config.get()) {
                        self.send(Command::Tensor { config: Box::new(config.clone()), shard: None });
                    }
                    self.send(Command::Source(weights.clone()));
                    None
                }
                Compute::Tensor(t) => {
                    self.send(Command::Tensor {
                        config: Box::new(t.config.clone()),
                        shard: Some((t.shard.clone(), t.weights.clone())),
                    });
                    Some(t.clone())
                }
            };
            let kept = match &next.compute {
                Compute::Gather(w) => w.workers(),
                Compute::Tensor(_) => Default::default(),
            };
            if let Some(old) = e.active.replace(next) {
                if let Compute::Gather(w) = &old.compute {
                    w.retire(&kept);
                }
                e.previous = Some(old);
            }
            tensor
        };
        self.active_epoch.send_replace(epoch);
        if let Some(t) = tensor.filter(|t| t.shard.rank == 0) {
            let node = self.clone();
            tokio::spawn(async move {
                let members: Vec<(usize, String)> = t.members.iter().cloned().enumerate().skip(1).collect();
                match crate::rpc::group::lead(
                    &node.cfg.security,
                    epoch,
                    t.shard.degree,
                    members,
                    node.stats.gather.clone(),
                )
                .await
                {
                    Ok(leader) => {
                        tracing::info!("epoch {epoch}: tensor-parallel group of {} formed", t.shard.degree);
                        node.send(Command::Lead(Arc::new(leader)));
                    }
                    Err(e) => tracing::error!("epoch {epoch}: forming the tensor-parallel group failed: {e}"),
                }
            });
        }
        tracing::info!("worker {}: epoch {epoch} active", self.id());
        Ok(())
    }

    /// Waits (at most `patience`) until `epoch` is active here and this worker
    /// computes shard `rank` of `degree` in it: a group member's stream from
    /// rank 0 starts only then.
    pub(crate) async fn await_group(
        &self,
        epoch: u64,
        rank: usize,
        degree: usize,
        patience: Duration,
    ) -> Result<()> {
        let mut active = self.active_epoch.subscribe();
        let _ = tokio::time::timeout(patience, active.wait_for(|e| *e >= epoch)).await;
        let e = sync::read(&self.epochs);
        match e.active.as_ref() {
            Some(Installed { epoch: at, compute: Compute::Tensor(t), .. })
                if *at == epoch && t.shard.rank == rank && t.shard.degree == degree =>
            {
                Ok(())
            }
            _ => Err(WorkerError::Epoch(format!(
                "rank 0 of epoch {epoch} asked this worker to follow as member {rank} of {degree}; \
                 it holds {}",
                e.describe()
            ))),
        }
    }

    /// Opens this worker's device and starts the batching loop on it, the
    /// first time; returns the budget for gathered layers kept resident:
    /// `--max-live-bytes` on the CPU; on a GPU, the device bytes of resident
    /// layers once the device is sized for the model.
    ///
    /// The batching loop's KV-cache budget is `--kv-cache-bytes`, or by
    /// default: on the CPU half the memory available now less the
    /// `owned_bytes` the first plan gives this worker; on a GPU what the
    /// device placement reserves for the cache.
    async fn open_device(&self, setup: &mut Setup, owned_bytes: u64) -> Result<u64> {
        if let Some(bytes) = setup.live_bytes {
            return Ok(bytes);
        }
        let config = setup.model.as_ref().expect("the model is known before the device opens").config.clone();
        let Some((rx, fatal)) = setup.batcher.take() else {
            return Err(WorkerError::InvalidRequest("the batching loop already ended".into()));
        };
        let stats = self.stats.batch.clone();
        let loop_cfg = |kv_cache_bytes: u64| LoopConfig {
            limits: Limits { kv_cache_bytes, max_active: self.cfg.max_active_sequences },
            faults: self.cfg.faults,
        };
        let live_bytes = match self.cfg.cuda {
            None => {
                let kv_cache_bytes = self.cfg.kv_cache_bytes.unwrap_or_else(|| {
                    (available_memory().saturating_sub(owned_bytes) / 2).max(DEFAULT_KV_FLOOR)
                });
                let engine = Engine::without_weights(self.cfg.cpu_backend(), config);
                tracing::info!(
                    "KV-cache budget {:.1} MB ({} tokens), at most {} sequences",
                    kv_cache_bytes as f64 / 1e6,
                    kv_cache_bytes / engine.kv_bytes_per_token().max(1),
                    self.cfg.max_active_sequences
                );
                spawn_batcher(engine, rx, stats, loop_cfg(kv_cache_bytes), fatal)?;
                self.cfg.max_live_bytes
            }
            Some(ordinal) => {
                let p = GpuPlacement::cluster_worker(
                    &config,
                    self.cfg.gpu_memory,
                    self.cfg.max_live_bytes,
                    self.cfg.prefetch_layers,
                    self.cfg.kv_cache_bytes,
                );
                let kv_cache_bytes =
                    p.kv_tokens as u64 * zeroshard_engine::placement::kv_bytes_per_token(&config);
                let c = config.clone();
                // Opening compiles the kernels: off the async runtime.
                let placed =
                    tokio::task::spawn_blocking(move || open_for_cluster(ordinal, &c, &p)).await.map_err(
                        |e| WorkerError::Task { what: "opening the CUDA device", source: e.into() },
                    )??;
                tracing::info!("cuda:{ordinal}: {}", placed.summary);
                let engine = Engine::without_weights(placed.backend, config);
                spawn_batcher(engine, rx, stats, loop_cfg(kv_cache_bytes), fatal)?;
                placed.budget.resident_bytes
            }
        };
        setup.live_bytes = Some(live_bytes);
        Ok(live_bytes)
    }
}

/// Runs the batching loop over `engine` on a thread of its own.
fn spawn_batcher<B: Backend + 'static>(
    engine: Engine<B>,
    rx: Receiver<Command>,
    stats: Arc<BatchStats>,
    cfg: LoopConfig,
    fatal: FatalSender,
) -> Result<()> {
    std::thread::Builder::new()
        .name("batcher".into())
        .spawn(move || batcher::run(engine, rx, stats, cfg, fatal))
        .map_err(|e| WorkerError::Task { what: "batcher thread", source: e.into() })?;
    Ok(())
}

/// The smallest default KV-cache budget (a host short of memory still runs a
/// few sequences; the operator sets `--kv-cache-bytes` to go lower).
const DEFAULT_KV_FLOOR: u64 = 64 << 20;

/// Which machine this process runs on: the kernel's boot id (the same in
/// every container of one host), else its host name, else empty.
fn host_id() -> String {
    ["/proc/sys/kernel/random/boot_id", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_default()
}

/// Host memory available now (`MemAvailable` of /proc/meminfo), 0 when unknown.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}
