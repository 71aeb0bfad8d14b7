//! [`Node`]: one worker's state — its id, the model, and the plans it holds.
//!
//! A worker holds up to three epochs at once. A new plan is first *prepared*
//! (`InstallPlan`: its ranges are loaded while the worker keeps computing under
//! the *active* one), then *activated* (`ActivatePlan`: the batching loop
//! switches to it between two steps); the epoch it replaced stays as
//! *previous*, still served to peers whose steps started under it, until the
//! next activation.
//!
//! On a GPU (`NodeConfig::cuda`) the device is opened and sized at the first
//! plan, so a device too small for one layer refuses that plan with the
//! numbers; gathered layers that stay resident (within the device budget for
//! resident layers) are copied to the device once, the others are staged
//! through the backend's ring every step.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use zeroshard_offload::plan::{Assignment, OwnedBytes, WorkerId};
use zeroshard_offload::{Checkpoint, ModelConfig};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::shards_client::ShardsClient;

use super::batcher::{self, BatchStats, Command};
use super::gather::{GatherStats, Gatherer};
use super::weights::ClusterWeights;
use super::{store, NodeConfig};
use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::engine::Engine;
use crate::error::{Result, WorkerError};
use crate::placement::{open_for_cluster, GpuPlacement};
use crate::shards::HostSlices;

/// What one plan gave this worker.
pub(super) struct Installed {
    pub epoch: u64,
    pub slices: Arc<HostSlices>,
    pub owned: OwnedBytes,
    pub weights: Arc<ClusterWeights>,
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
    pub fn slices(&self, epoch: u64) -> Option<Arc<HostSlices>> {
        self.all().find(|i| i.epoch == epoch).map(|i| i.slices.clone())
    }

    pub fn knows(&self, epoch: u64) -> bool {
        self.all().any(|i| i.epoch == epoch)
    }

    pub fn active_epoch(&self) -> Option<u64> {
        self.active.as_ref().map(|i| i.epoch)
    }

    /// `epoch 7 (active), 8 (prepared)`, for error messages.
    pub fn describe(&self) -> String {
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

/// The model, known from the first plan.
struct ModelInfo {
    config: ModelConfig,
    dir: PathBuf,
}

pub(super) struct Node {
    pub cfg: NodeConfig,
    pub id: OnceLock<u64>,
    model: OnceLock<ModelInfo>,
    pub epochs: RwLock<Epochs>,
    commands: Mutex<Sender<Command>>,
    /// The batching loop's end of `commands`, until the first activation starts it.
    batcher_rx: Mutex<Option<Receiver<Command>>>,
    /// The CUDA backend opened at the first plan, until the batching loop takes it.
    gpu: Mutex<Option<CudaBackend>>,
    /// On a GPU: device bytes for resident layers, as sized at the first plan.
    gpu_live_bytes: OnceLock<u64>,
    /// One installation at a time.
    installing: tokio::sync::Mutex<()>,
    pub batch: Arc<BatchStats>,
    pub resident: Arc<AtomicU64>,
    pub gather: Arc<GatherStats>,
    pub served_fetches: AtomicU64,
    pub loads: AtomicU64,
    pub loaded_bytes: AtomicU64,
    /// Bytes loaded so far for the plan being prepared (for progress bars).
    pub loading: Arc<AtomicU64>,
}

fn poisoned<T>(_: T) -> WorkerError {
    WorkerError::Load("worker state lock poisoned".into())
}

impl Node {
    pub fn new(cfg: NodeConfig) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        Self {
            cfg,
            id: OnceLock::new(),
            model: OnceLock::new(),
            epochs: RwLock::new(Epochs::default()),
            commands: Mutex::new(tx),
            batcher_rx: Mutex::new(Some(rx)),
            gpu: Mutex::new(None),
            gpu_live_bytes: OnceLock::new(),
            installing: tokio::sync::Mutex::new(()),
            batch: Arc::new(BatchStats::default()),
            resident: Arc::new(AtomicU64::new(0)),
            gather: Arc::new(GatherStats::default()),
            served_fetches: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            loaded_bytes: AtomicU64::new(0),
            loading: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn send(&self, c: Command) {
        if let Ok(tx) = self.commands.lock() {
            let _ = tx.send(c);
        }
    }

    /// Prepares the plan `a` (loads its ranges) without switching to it.
    /// Returns (owned bytes, load milliseconds); a plan already held answers at once.
    pub async fn prepare(&self, a: Assignment, model: Option<pb::ModelInfo>) -> Result<(u64, f64)> {
        let _one = self.installing.lock().await;
        // The plan can arrive before the answer to our registration is processed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.id.get().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let me = *self.id.get().ok_or_else(|| WorkerError::InvalidRequest("not registered yet".into()))?;
        if a.worker != WorkerId(me) {
            return Err(WorkerError::InvalidRequest(format!(
                "plan is for {}, this is worker {me}",
                a.worker
            )));
        }
        let epoch = a.plan.epoch();
        if let Some(i) = self.epochs.read().map_err(poisoned)?.all().find(|i| i.epoch == epoch) {
            return Ok((i.owned.total(), 0.0));
        }
        let info = self.model_info(model)?;
        if self.cfg.fail_load {
            return Err(WorkerError::Load(
                "injected fault: this worker refuses to load (--fault-fail-load)".into(),
            ));
        }
        let max_live_bytes = self.open_device(&info.config).await?;
        let start = Instant::now();
        let plan = Arc::new(a.plan);
        self.loading.store(0, Ordering::Relaxed);
        // What the active epoch holds already is copied, not loaded again.
        let held = self.epochs.read().map_err(poisoned)?.active.as_ref().map(|i| i.slices.clone());
        let (mut slices, missing, reused) = store::reuse(&plan, a.worker, held.as_deref())?;
        let slices = match &a.pull_from {
            Some(endpoint) => {
                store::pull_ranges(endpoint, plan.epoch(), &missing, &mut slices, &self.loading).await?;
                slices
            }
            None => {
                let dir = self.cfg.model_dir.clone().unwrap_or_else(|| info.dir.clone());
                let progress = self.loading.clone();
                tokio::task::spawn_blocking(move || {
                    let ckpt = Checkpoint::open(&dir)?;
                    store::read_ranges(&ckpt, &missing, &mut slices, &progress)?;
                    Ok::<_, WorkerError>(slices)
                })
                .await
                .map_err(|e| WorkerError::Load(format!("loader task: {e}")))??
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
                let ch = super::connect_lazy(addr)?;
                peers.insert(
                    *id,
                    ShardsClient::new(ch)
                        .max_decoding_message_size(zeroshard_proto::transport::MAX_MESSAGE_BYTES),
                );
            }
        }
        let owned = plan.owned_bytes(a.worker).map_err(|e| WorkerError::Load(e.to_string()))?;
        let gatherer = Arc::new(Gatherer::new(
            plan.clone(),
            a.worker,
            slices.clone(),
            peers,
            self.gather.clone(),
            self.cfg.fetch_timeout,
        ));
        let weights = Arc::new(ClusterWeights::new(
            tokio::runtime::Handle::current(),
            gatherer,
            &info.config,
            self.cfg.prefetch_layers,
            max_live_bytes,
            self.resident.clone(),
        ));
        self.loads.fetch_add(1, Ordering::Relaxed);
        self.loaded_bytes.fetch_add(owned.total(), Ordering::Relaxed);
        self.epochs.write().map_err(poisoned)?.prepared = Some(Installed { epoch, slices, owned, weights });
        tracing::info!(
            "worker {me}: epoch {epoch} prepared, {} bytes owned, loaded in {load_ms:.0} ms",
            owned.total()
        );
        Ok((owned.total(), load_ms))
    }

    /// Switches to the prepared `epoch` (idempotent when it is already active).
    pub fn activate(&self, epoch: u64) -> Result<()> {
        let weights = {
            let mut e = self.epochs.write().map_err(poisoned)?;
            if e.active_epoch() == Some(epoch) {
                return Ok(());
            }
            if e.prepared.as_ref().map(|i| i.epoch) != Some(epoch) {
                return Err(WorkerError::InvalidRequest(format!(
                    "epoch {epoch} was not prepared on this worker ({})",
                    e.describe()
                )));
            }
            let next = e.prepared.take().expect("checked above");
            let weights = next.weights.clone();
            if let Some(old) = e.active.replace(next) {
                old.weights.clear();
                e.previous = Some(old);
            }
            weights
        };
        self.start_batcher()?;
        self.send(Command::Source(weights));
        tracing::info!("worker {}: epoch {epoch} active", self.id.get().copied().unwrap_or(0));
        Ok(())
    }

    /// The model from the first plan that named it.
    fn model_info(&self, model: Option<pb::ModelInfo>) -> Result<&ModelInfo> {
        if let Some(info) = self.model.get() {
            return Ok(info);
        }
        let m =
            model.ok_or_else(|| WorkerError::InvalidRequest("the first plan must name the model".into()))?;
        let info = ModelInfo { config: model_config(&m)?, dir: PathBuf::from(&m.model_dir) };
        Ok(self.model.get_or_init(|| info))
    }

    /// The budget for gathered layers kept resident: `--max-live-bytes` on the
    /// CPU; on a GPU, the device bytes of resident layers, once the device is
    /// opened and sized for `config` (the first time only).
    async fn open_device(&self, config: &ModelConfig) -> Result<u64> {
        let Some(ordinal) = self.cfg.cuda else { return Ok(self.cfg.max_live_bytes) };
        if let Some(bytes) = self.gpu_live_bytes.get() {
            return Ok(*bytes);
        }
        let p = GpuPlacement::cluster_worker(
            config,
            self.cfg.gpu_memory,
            self.cfg.max_live_bytes,
            self.cfg.prefetch_layers,
        );
        let config = config.clone();
        // Opening compiles the kernels: off the async runtime.
        let placed = tokio::task::spawn_blocking(move || open_for_cluster(ordinal, &config, &p))
            .await
            .map_err(|e| WorkerError::Backend(format!("opening cuda:{ordinal}: {e}")))??;
        tracing::info!("cuda:{ordinal}: {}", placed.summary);
        *self.gpu.lock().map_err(poisoned)? = Some(placed.backend);
        Ok(*self.gpu_live_bytes.get_or_init(|| placed.budget.resident_bytes))
    }

    /// Starts the batching loop once, with the model's engine on this worker's device.
    fn start_batcher(&self) -> Result<()> {
        let mut rx = self.batcher_rx.lock().map_err(poisoned)?;
        if rx.is_none() {
            return Ok(());
        }
        let info = self.model.get().ok_or_else(|| WorkerError::Load("no model before activation".into()))?;
        let (stats, delay) = (self.batch.clone(), self.cfg.step_delay);
        match self.cfg.cuda {
            None => {
                let engine = Engine::without_weights(CpuBackend::new(), info.config.clone());
                spawn_batcher(engine, rx.take().expect("checked above"), stats, delay)
            }
            Some(n) => {
                let backend = self.gpu.lock().map_err(poisoned)?.take().ok_or_else(|| {
                    WorkerError::Backend(format!("cuda:{n} was not opened before activation"))
                })?;
                let engine = Engine::without_weights(backend, info.config.clone());
                spawn_batcher(engine, rx.take().expect("checked above"), stats, delay)
            }
        }
    }
}

/// Runs the batching loop over `engine` on a thread of its own.
fn spawn_batcher<B: Backend + 'static>(
    engine: Engine<B>,
    rx: Receiver<Command>,
    stats: Arc<BatchStats>,
    delay: Duration,
) -> Result<()> {
    std::thread::Builder::new()
        .name("batcher".into())
        .spawn(move || batcher::run(engine, rx, stats, delay))
        .map_err(|e| WorkerError::Load(format!("batcher thread: {e}")))?;
    Ok(())
}

/// The model config from the texts of its files that a plan carries.
fn model_config(m: &pb::ModelInfo) -> Result<ModelConfig> {
    let dir = Path::new(&m.model_dir);
    let parse = |s: &str, name: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .map_err(|e| WorkerError::Load(format!("{name} from the coordinator: {e}")))
    };
    let config = parse(&m.config_json, "config.json")?;
    let gen_path = dir.join("generation_config.json");
    let gen = if m.generation_config_json.is_empty() {
        None
    } else {
        Some(parse(&m.generation_config_json, "generation_config.json")?)
    };
    Ok(ModelConfig::from_json(
        &dir.join("config.json"),
        &config,
        gen.as_ref().map(|g| (gen_path.as_path(), g)),
    )?)
}
