//! [`Coordinator`]: the cluster's shared state behind a cloneable handle, in
//! groups, each with one writer:
//! - the configuration and the model's files ([`ModelFiles`]), read once at start;
//! - the cluster — the live workers, the plan of the current epoch, readiness —
//!   written by the [`supervisor`](super::supervisor) task only; request
//!   handlers read it and report failures to it;
//! - client requests ([`Requests`]: numbering, tokenization slots, how many
//!   run, the drain) and what befell them ([`Counters`]);
//! - the request queue, owned by the [admission](super::admission) task.
//!
//! The state itself is private to this file: everything else goes through the
//! handle's methods.
use super::audit::Audits;
use super::faults::Faulty;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use zeroshard_offload::digest::BlockDigests;
use zeroshard_offload::model_file;
use zeroshard_offload::plan::{Plan, TensorMeta, WorkerId};
use zeroshard_offload::spec::checked_specs;
use zeroshard_offload::{Checkpoint, ModelConfig};

use zeroshard_security::Security;

use super::admission::{Admission, Roster};
use super::config::ClusterConfig;
use super::deadline::StepClock;
use super::drain::DrainState;
use super::worker_client::WorkerHandle;
use crate::chat::ChatTemplate;
use crate::error::{CoordinatorError, Result};
use crate::membership::embedded::EmbeddedMembership;
use crate::membership::{Member, Membership};
use crate::tokenizer::Tokenizer;

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
    /// Why the active plan has its placement (`status` shows it).
    pub placement_reason: String,
    /// Why no request can be served now although the cluster started (the
    /// checkpoint changed under it, no worker can load): requests fail at
    /// once with it, `/health` and `status` show it.
    pub unservable: Option<Unservable>,
}

/// Why the cluster cannot serve, and whether waiting helps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unservable {
    pub why: String,
    /// Only a restart helps (else a worker may be tried again later).
    pub until_restart: bool,
}

impl Unservable {
    /// The error requests get.
    pub fn error(&self) -> CoordinatorError {
        let why = format!("cluster cannot serve: {}", self.why);
        if self.until_restart {
            CoordinatorError::Halted(why)
        } else {
            CoordinatorError::Unavailable(why)
        }
    }
}

/// The model as read from its folder at start.
pub(super) struct ModelFiles {
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
}

/// Who is in the cluster and the plan they run: the supervisor writes them,
/// everyone else reads them (through [`Coordinator`]'s methods) and reports
/// failures.
struct Cluster {
    /// The coordinator's own address, for `--pull` workers.
    advertise: String,
    membership: Arc<dyn Membership>,
    /// Set when membership is embedded: `Control` registrations go here.
    embedded: Option<EmbeddedMembership>,
    state: Mutex<State>,
    ready: watch::Sender<Readiness>,
    /// Bumped on every change of members or plan; sequences waiting to resume watch it.
    changes: watch::Sender<u64>,
    /// Failures seen by request handlers: the supervisor probes the workers.
    reports: mpsc::UnboundedSender<WorkerId>,
    /// Workers caught serving bad blocks or bad tokens: the supervisor bans them.
    faulty: mpsc::UnboundedSender<Faulty>,
}

/// Client requests: their numbers, the tokenization slots, how many run, the drain.
pub(super) struct Requests {
    /// Sequence ids on the workers (unique across coordinator restarts).
    pub next_seq: AtomicU64,
    /// Client requests numbered in arrival order (their tracing span's `n`).
    pub next_request: AtomicU64,
    /// Tokenizations running at once, at most (one per core).
    pub tokenizing: tokio::sync::Semaphore,
    /// Serving, draining (new requests refused) or cut (running ones end).
    pub drain: watch::Sender<DrainState>,
    /// Client requests running now (admitted or not).
    pub in_flight: watch::Sender<usize>,
}

/// What befell workers and sequences, for `ClusterStatus`.
#[derive(Default)]
pub(super) struct Counters {
    pub workers_lost: AtomicU64,
    pub sequences_resumed: AtomicU64,
    /// Sequences handed back by draining workers.
    pub sequences_moved: AtomicU64,
    /// Workers that missed an install deadline.
    pub install_deadlines_missed: AtomicU64,
}

struct Inner {
    cfg: ClusterConfig,
    model: ModelFiles,
    cluster: Cluster,
    requests: Requests,
    /// The request queue and the room taken on every worker (its own task).
    admission: Admission,
    counters: Counters,
    audits: Audits,
}

/// A cloneable handle on the cluster state.
#[derive(Clone)]
pub struct Coordinator(Arc<Inner>);

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
            let bytes = model_file::read(dir, name)?;
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
        let (faulty, faulty_rx) = mpsc::unbounded_channel();
        // Sequence ids unique across coordinator restarts: workers may still
        // hold sequences of a previous coordinator for a moment.
        let first_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let admission = Admission::start(cfg.limits.max_queued_requests);
        let model = ModelFiles {
            meta: specs.iter().map(TensorMeta::from).collect(),
            config,
            config_json,
            generation_config_json,
            tokenizer,
            chat_template,
            ckpt,
            digests: OnceLock::new(),
        };
        let cluster = Cluster {
            advertise,
            membership,
            embedded,
            state: Mutex::new(State::default()),
            ready,
            changes: watch::channel(0).0,
            reports,
            faulty,
        };
        let requests = Requests {
            next_seq: AtomicU64::new(first_seq),
            next_request: AtomicU64::new(1),
            tokenizing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            ),
            drain: watch::channel(DrainState::Serving).0,
            in_flight: watch::channel(0).0,
        };
        let coord = Self(Arc::new(Inner {
            cfg,
            model,
            cluster,
            requests,
            admission,
            counters: Counters::default(),
            audits: Audits::default(),
        }));
        tokio::spawn(super::supervisor::run(coord.clone(), reports_rx, faulty_rx));
        Ok(coord)
    }

    /// The checkpoint's block digests: those membership stored for this very
    /// checkpoint (same file names, sizes and modification times), else
    /// computed in one parallel pass over the files and stored there.
    pub(super) async fn load_digests(&self) -> Result<Arc<BlockDigests>> {
        let inner = &self.0;
        if let Some(d) = inner.model.digests.get() {
            return Ok(d.clone());
        }
        let identity = zeroshard_offload::digest::identity(&inner.model.ckpt);
        let membership = &inner.cluster.membership;
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
                let d = tokio::task::spawn_blocking(move || {
                    zeroshard_offload::digest::compute(&coord.0.model.ckpt)
                })
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
        Ok(inner.model.digests.get_or_init(|| digests).clone())
    }

    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.0.cluster.ready.subscribe()
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
        self.0.cluster.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells sequences waiting to resume, and admission, that the members or
    /// the plan changed.
    pub(super) fn bump(&self) {
        self.0.cluster.changes.send_modify(|n| *n += 1);
        let roster = {
            let st = self.lock();
            let workers = st.plan.as_ref().map_or_else(Vec::new, |plan| {
                plan.routable().iter().filter_map(|id| st.members.get(id).cloned()).collect()
            });
            Roster { plan: st.plan.clone(), workers, unservable: st.unservable.clone() }
        };
        self.0.admission.set_roster(roster);
    }

    /// Why nothing can be served now, when that is so (see `State::unservable`).
    pub fn unservable(&self) -> Option<Unservable> {
        self.lock().unservable.clone()
    }

    /// Says why nothing can be served (`None`: it can again); waiting
    /// requests are told at once.
    pub(super) fn set_unservable(&self, why: Option<Unservable>) {
        let changed = {
            let mut st = self.lock();
            let changed = st.unservable != why;
            st.unservable = why;
            changed
        };
        if changed {
            self.bump();
        }
    }

    /// The current plan, or UNAVAILABLE saying why there is none (or why it
    /// cannot serve).
    pub fn plan(&self) -> Result<Arc<Plan>> {
        {
            let st = self.lock();
            if let Some(u) = &st.unservable {
                return Err(u.error());
            }
            if let Some(p) = st.plan.clone() {
                return Ok(p);
            }
        }
        Err(CoordinatorError::Unavailable(match self.0.cluster.ready.borrow().clone() {
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
        let _ = self.0.cluster.reports.send(id);
    }

    /// `f.id` was caught lying: the supervisor bans it and plans around it.
    pub(super) fn report_faulty(&self, f: Faulty) {
        let _ = self.0.cluster.faulty.send(f);
    }

    /// Where the fault watch names faulty workers.
    pub(super) fn faulty_sender(&self) -> mpsc::UnboundedSender<Faulty> {
        self.0.cluster.faulty.clone()
    }

    /// The output audits' counters and verdicts.
    pub(super) fn audits(&self) -> &Audits {
        &self.0.audits
    }

    /// What `RegisterWorker` and `KeepAlive` act on; None under etcd.
    pub fn embedded(&self) -> Option<&EmbeddedMembership> {
        self.0.cluster.embedded.as_ref()
    }

    /// Counters for `ClusterStatus`: workers lost, sequences resumed.
    pub fn failure_counts(&self) -> (u64, u64) {
        let c = &self.0.counters;
        (c.workers_lost.load(Ordering::Relaxed), c.sequences_resumed.load(Ordering::Relaxed))
    }

    /// How this coordinator runs the cluster.
    pub(super) fn cfg(&self) -> &ClusterConfig {
        &self.0.cfg
    }

    /// The model as read from its folder.
    pub(super) fn model(&self) -> &ModelFiles {
        &self.0.model
    }

    /// Client requests: numbers, tokenization slots, running count, drain.
    pub(super) fn requests(&self) -> &Requests {
        &self.0.requests
    }

    /// The admission task's handle.
    pub(super) fn admission(&self) -> &Admission {
        &self.0.admission
    }

    /// What befell workers and sequences.
    pub(super) fn counters(&self) -> &Counters {
        &self.0.counters
    }

    /// Who keeps the cluster's members (embedded or etcd).
    pub(super) fn membership(&self) -> &Arc<dyn Membership> {
        &self.0.cluster.membership
    }

    /// The coordinator's own address (for `--pull` workers and shard fetches).
    pub(super) fn advertise(&self) -> &str {
        &self.0.cluster.advertise
    }

    /// Where the cluster is on its way to serving (the supervisor's to say).
    pub(super) fn set_readiness(&self, r: Readiness) {
        self.0.cluster.ready.send_replace(r);
    }

    /// While waiting for workers: how many have registered.
    pub(super) fn set_registered(&self, registered: usize) {
        let expected = self.0.cfg.workers;
        self.0.cluster.ready.send_if_modified(|r| match r {
            Readiness::Waiting { .. } => {
                *r = Readiness::Waiting { registered, expected };
                true
            }
            _ => false,
        });
    }

    /// Changes of members or plan (each bumps the value).
    pub(super) fn changes(&self) -> watch::Receiver<u64> {
        self.0.cluster.changes.subscribe()
    }
}
