//! [`Coordinator`]: the cluster's shared state behind a cloneable handle —
//! the live workers, the plan of the current epoch, readiness. The
//! [`supervisor`](super::supervisor) task is the only writer of members and
//! plans; request handlers read them and report failures to it.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use zeroshard_offload::digest::BlockDigests;
use zeroshard_offload::model_file;
use zeroshard_offload::plan::{Plan, TensorMeta, WorkerId};
use zeroshard_offload::spec::checked_specs;
use zeroshard_offload::{Checkpoint, ModelConfig};

use zeroshard_security::{ApiKeys, Security};

use super::admission::{Admission, Roster};
use super::deadline::StepClock;
use super::worker_client::WorkerHandle;
use crate::chat::ChatTemplate;
use crate::error::{CoordinatorError, Result};
use crate::membership::embedded::EmbeddedMembership;
use crate::membership::{Member, Membership};
use crate::tokenizer::Tokenizer;

/// How the coordinator runs a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub model_dir: PathBuf,
    /// Workers to wait for before the first plan.
    pub workers: usize,
    pub persistence_threshold_bytes: u64,
    /// Tell workers to pull their ranges from this coordinator.
    pub pull: bool,
    /// Every range is held by this many workers (at most the number of workers).
    pub replicas: u32,
    /// A worker silent for this long is lost (embedded membership's lease).
    pub lease_ttl: Duration,
    /// TLS credentials of the coordinator's server and its channels to workers.
    pub security: Security,
    /// Keys a client may present instead of a client certificate.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// What requests may ask, and how long a step may take.
    pub limits: RequestLimits,
    /// On shutdown, how long running requests may take to finish.
    pub drain_timeout: Duration,
}

/// Bounds on what clients send, each checked before any work.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Requests waiting for room, at most (`--max-queued-requests`).
    pub max_queued_requests: usize,
    /// Bytes of prompt text, at most (None: [`PROMPT_BYTES_PER_POSITION`]
    /// per position of the model's context).
    pub max_prompt_bytes: Option<usize>,
    /// The floor of every step deadline (`--step-deadline-ms`).
    pub step_deadline: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_queued_requests: 256, max_prompt_bytes: None, step_deadline: Duration::from_secs(10) }
    }
}

/// Default prompt-size bound: bytes of text per position of the model's
/// context (tokens of real text average 3–5 bytes; 64 leaves room for any).
pub(super) const PROMPT_BYTES_PER_POSITION: usize = 64;
/// Stop strings per request, and bytes per stop string, at most.
pub(super) const MAX_STOP_STRINGS: usize = 16;
pub(super) const MAX_STOP_BYTES: usize = 1024;

/// Where the cluster is on its way to serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Waiting { registered: usize, expected: usize },
    Loading,
    Ready,
    Failed(String),
}

/// A live worker.
#[derive(Clone)]
pub struct WorkerEntry {
    pub id: WorkerId,
    pub address: String,
    pub client: WorkerHandle,
    /// Its recent step times (step deadlines).
    pub clock: Arc<StepClock>,
}

impl WorkerEntry {
    pub(super) fn new(m: &Member, security: &Security) -> Result<Self> {
        Ok(Self {
            id: m.id,
            address: m.address.clone(),
            client: WorkerHandle::new(security, m.id, &m.address)?,
            clock: Arc::new(StepClock::default()),
        })
    }
}

#[derive(Default)]
pub(super) struct State {
    pub members: BTreeMap<WorkerId, WorkerEntry>,
    /// The active plan: every worker of it has activated its epoch.
    pub plan: Option<Arc<Plan>>,
    /// The highest epoch planned so far (being installed, or active).
    pub planned_epoch: u64,
}

pub(super) struct Inner {
    pub cfg: ClusterConfig,
    pub config: ModelConfig,
    pub config_json: String,
    pub generation_config_json: String,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The model's chat template, when it has one (chat prompts need it).
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub ckpt: Checkpoint,
    /// The checkpoint's digest of every block (workers verify against them):
    /// set by the supervisor before it plans (computed, or reused from membership).
    pub digests: OnceLock<Arc<BlockDigests>>,
    pub meta: Vec<TensorMeta>,
    /// The coordinator's own address, for `--pull` workers.
    pub advertise: String,
    pub membership: Arc<dyn Membership>,
    /// Set when membership is embedded: `Control` registrations go here.
    pub embedded: Option<EmbeddedMembership>,
    pub state: Mutex<State>,
    pub ready: watch::Sender<Readiness>,
    /// Bumped on every change of members or plan; sequences waiting to resume watch it.
    pub changes: watch::Sender<u64>,
    /// Failures seen by request handlers: the supervisor probes the workers.
    pub reports: mpsc::UnboundedSender<WorkerId>,
    pub next_seq: AtomicU64,
    /// Client requests numbered in arrival order (their tracing span's `n`).
    pub next_request: AtomicU64,
    /// The request queue and the room taken on every worker.
    pub admission: Admission,
    /// Tokenizations running at once, at most (one per core).
    pub tokenizing: tokio::sync::Semaphore,
    pub workers_lost: AtomicU64,
    pub sequences_resumed: AtomicU64,
    /// Sequences handed back by draining workers.
    pub sequences_moved: AtomicU64,
    /// Serving, draining (new requests refused) or cut (running ones end).
    pub drain: watch::Sender<DrainState>,
    /// Client requests running now (admitted or not).
    pub in_flight: watch::Sender<usize>,
}

/// Where a coordinator is in its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainState {
    Serving,
    /// New requests are refused with UNAVAILABLE; running ones continue.
    Draining,
    /// The drain time ran out: running requests end with UNAVAILABLE.
    Cut,
}

/// What a drain did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Requests running when the drain began.
    pub running: usize,
    /// Of them, still running when the drain time ran out (ended with UNAVAILABLE).
    pub cut: usize,
    pub elapsed: Duration,
}

impl std::fmt::Display for DrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drained in {:.2} s: {} requests were running, {} cut off",
            self.elapsed.as_secs_f64(),
            self.running,
            self.cut
        )
    }
}

/// A cloneable handle on the cluster state.
#[derive(Clone)]
pub struct Coordinator(pub(super) Arc<Inner>);

impl Coordinator {
    /// Reads the model folder (config, tokenizer, every checkpoint header, each
    /// tensor's shape) so that a bad checkpoint fails here, before any worker,
    /// and starts the supervisor that follows `membership`. `embedded` is the
    /// same registry when membership is embedded (workers register over `Control`).
    pub fn start(
        cfg: ClusterConfig,
        advertise: String,
        membership: Arc<dyn Membership>,
        embedded: Option<EmbeddedMembership>,
    ) -> Result<Self> {
        if cfg.workers == 0 {
            return Err(CoordinatorError::InvalidRequest("--workers must be at least 1".into()));
        }
        if cfg.replicas == 0 || cfg.replicas as usize > cfg.workers {
            return Err(CoordinatorError::InvalidRequest(format!(
                "--replicas must be between 1 and --workers ({}), got {}",
                cfg.workers, cfg.replicas
            )));
        }
        let dir = &cfg.model_dir;
        let config = ModelConfig::from_dir(dir)?;
        // The texts workers parse again: read as every model file is (regular,
        // inside the folder, bounded); `from_dir` checked their contents.
        let read = |name: &str| -> Result<String> {
            let bytes = model_file::read(dir, name, model_file::JSON_LIMIT_BYTES)?;
            String::from_utf8(bytes).map_err(|_| {
                CoordinatorError::InvalidRequest(format!("{}: not UTF-8", dir.join(name).display()))
            })
        };
        let config_json = read("config.json")?;
        let generation_config_json = if model_file::exists(dir, "generation_config.json") {
            read("generation_config.json")?
        } else {
            String::new()
        };
        let ckpt = Checkpoint::open(dir)?;
        // Every tensor the config implies, checked against the checkpoint's
        // layers and shapes before anything is sized by the config.
        let specs = checked_specs(&config, &ckpt)?;
        let tokenizer = Tokenizer::from_model_dir(dir)?.map(Arc::new);
        let chat_template = ChatTemplate::from_model_dir(dir)?.map(Arc::new);
        let (ready, _) = watch::channel(Readiness::Waiting { registered: 0, expected: cfg.workers });
        let (reports, reports_rx) = mpsc::unbounded_channel();
        // Sequence ids unique across coordinator restarts: workers may still
        // hold sequences of a previous coordinator for a moment.
        let first_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let admission = Admission::start(cfg.limits.max_queued_requests);
        let coord = Self(Arc::new(Inner {
            meta: specs.iter().map(TensorMeta::from).collect(),
            cfg,
            config,
            config_json,
            generation_config_json,
            tokenizer,
            chat_template,
            ckpt,
            digests: OnceLock::new(),
            advertise,
            membership,
            embedded,
            state: Mutex::new(State::default()),
            ready,
            changes: watch::channel(0).0,
            reports,
            next_seq: AtomicU64::new(first_seq),
            next_request: AtomicU64::new(1),
            admission,
            tokenizing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            ),
            workers_lost: AtomicU64::new(0),
            sequences_resumed: AtomicU64::new(0),
            sequences_moved: AtomicU64::new(0),
            drain: watch::channel(DrainState::Serving).0,
            in_flight: watch::channel(0).0,
        }));
        tokio::spawn(super::supervisor::run(coord.clone(), reports_rx));
        Ok(coord)
    }

    /// The checkpoint's block digests: those membership stored for this very
    /// checkpoint (same file names, sizes and modification times), else
    /// computed in one parallel pass over the files and stored there.
    pub(super) async fn load_digests(&self) -> Result<Arc<BlockDigests>> {
        let inner = &self.0;
        if let Some(d) = inner.digests.get() {
            return Ok(d.clone());
        }
        let identity = zeroshard_offload::digest::identity(&inner.ckpt)?;
        let membership = &inner.membership;
        let stored = match membership.load_digests(&identity).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("reading stored digests from {}: {e}; computing them", membership.describe());
                None
            }
        };
        let digests = match stored {
            Some(d) => {
                tracing::info!("reusing the stored digests of {} blocks", d.block_count());
                Arc::new(d)
            }
            None => {
                let start = Instant::now();
                let coord = self.clone();
                let d =
                    tokio::task::spawn_blocking(move || zeroshard_offload::digest::compute(&coord.0.ckpt))
                        .await
                        .map_err(|e| CoordinatorError::InvalidRequest(format!("digest task: {e}")))??;
                tracing::info!(
                    "digests of {} blocks computed in {:.2} s",
                    d.block_count(),
                    start.elapsed().as_secs_f64()
                );
                if let Err(e) = membership.store_digests(&identity, &d).await {
                    tracing::warn!("storing the digests in {}: {e}", membership.describe());
                }
                Arc::new(d)
            }
        };
        Ok(inner.digests.get_or_init(|| digests).clone())
    }

    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.0.ready.subscribe()
    }

    /// Stops taking requests (each new one gets UNAVAILABLE at once, so a
    /// client retries elsewhere) and waits up to `patience` for the running
    /// ones to finish; those still running then end with UNAVAILABLE. The
    /// services stay up meanwhile: workers keep their leases and gather.
    pub async fn drain(&self, patience: Duration) -> DrainReport {
        let started = Instant::now();
        let running = *self.0.in_flight.borrow();
        self.0.drain.send_replace(DrainState::Draining);
        let mut in_flight = self.0.in_flight.subscribe();
        let finished = tokio::time::timeout(patience, in_flight.wait_for(|n| *n == 0)).await.is_ok();
        let cut = if finished { 0 } else { *self.0.in_flight.borrow() };
        if !finished {
            self.0.drain.send_replace(DrainState::Cut);
            // The cut requests send their error and end within moments.
            let _ = tokio::time::timeout(Duration::from_secs(2), in_flight.wait_for(|n| *n == 0)).await;
        }
        DrainReport { running, cut, elapsed: started.elapsed() }
    }

    /// How long a drain gives running requests (the cluster's configuration).
    pub fn drain_timeout(&self) -> Duration {
        self.0.cfg.drain_timeout
    }

    /// Where the coordinator is in its shutdown.
    pub fn drain_state(&self) -> watch::Receiver<DrainState> {
        self.0.drain.subscribe()
    }

    /// Waits until the cluster is ready or has failed.
    pub async fn wait_ready(&self) -> Readiness {
        let mut rx = self.readiness();
        loop {
            let r = rx.borrow_and_update().clone();
            if matches!(r, Readiness::Ready | Readiness::Failed(_)) {
                return r;
            }
            if rx.changed().await.is_err() {
                return Readiness::Failed("coordinator stopped".into());
            }
        }
    }

    pub fn model_name(&self) -> String {
        self.0.cfg.model_dir.display().to_string()
    }

    /// The state, taken one way: the release binary aborts on panic, so a
    /// poisoned lock is seen only under the test harness, and every update of
    /// the state is a whole assignment: its data are taken as they are.
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells sequences waiting to resume, and admission, that the members or
    /// the plan changed.
    pub(super) fn bump(&self) {
        self.0.changes.send_modify(|n| *n += 1);
        let roster = {
            let st = self.lock();
            let workers = st.plan.as_ref().map_or_else(Vec::new, |plan| {
                plan.workers().iter().filter_map(|id| st.members.get(id).cloned()).collect()
            });
            Roster { plan: st.plan.clone(), workers }
        };
        self.0.admission.set_roster(roster);
    }

    /// The current plan, or UNAVAILABLE saying why there is none.
    pub fn plan(&self) -> Result<Arc<Plan>> {
        if let Some(p) = self.lock().plan.clone() {
            return Ok(p);
        }
        Err(CoordinatorError::Unavailable(match self.0.ready.borrow().clone() {
            Readiness::Waiting { registered, expected } => {
                format!("cluster not ready: {registered} of {expected} workers registered")
            }
            Readiness::Loading => "cluster not ready: workers are loading their ranges".into(),
            Readiness::Failed(e) => format!("cluster failed to start: {e}"),
            Readiness::Ready => "cluster not ready".into(),
        }))
    }

    /// Live workers, in id order.
    pub fn workers(&self) -> Vec<WorkerEntry> {
        self.lock().members.values().cloned().collect()
    }

    /// Whether `id` is still a live worker.
    pub fn is_member(&self, id: WorkerId) -> bool {
        self.lock().members.contains_key(&id)
    }

    /// A request handler saw `id` fail: the supervisor checks every worker.
    pub fn report_failure(&self, id: WorkerId) {
        let _ = self.0.reports.send(id);
    }

    /// What `RegisterWorker` and `KeepAlive` act on; None under etcd.
    pub fn embedded(&self) -> Option<&EmbeddedMembership> {
        self.0.embedded.as_ref()
    }

    /// Counters for `ClusterStatus`: workers lost, sequences resumed.
    pub fn failure_counts(&self) -> (u64, u64) {
        (self.0.workers_lost.load(Ordering::Relaxed), self.0.sequences_resumed.load(Ordering::Relaxed))
    }
}
