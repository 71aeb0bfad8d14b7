//! [`Coordinator`]: the cluster's shared state behind a cloneable handle —
//! registered workers, the plan of the current epoch, readiness.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tonic::transport::Channel;
use zeroshard_offload::plan::{plan, Assignment, Plan, PlanOptions, TensorMeta, WorkerId};
use zeroshard_offload::{Checkpoint, ModelConfig};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::worker_client::WorkerClient;
use zeroshard_worker::model::tensor_specs;

use crate::error::{CoordinatorError, Result};
use crate::tokenizer::Tokenizer;

/// How the coordinator runs a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub model_dir: PathBuf,
    /// Workers to wait for before planning.
    pub workers: usize,
    pub persistence_threshold_bytes: u64,
    /// Tell workers to pull their ranges from this coordinator.
    pub pull: bool,
}

/// Where the cluster is on its way to serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Waiting { registered: usize, expected: usize },
    Loading,
    Ready,
    Failed(String),
}

/// A registered worker.
#[derive(Clone)]
pub struct WorkerEntry {
    pub id: WorkerId,
    pub address: String,
    pub client: WorkerClient<Channel>,
    /// Sequences this coordinator has running on it.
    pub active: Arc<AtomicU32>,
}

struct State {
    workers: Vec<WorkerEntry>,
    plan: Option<Arc<Plan>>,
    next_id: u64,
    /// The coordinator's own address, for `--pull` workers.
    advertise: String,
}

pub(super) struct Inner {
    pub cfg: ClusterConfig,
    pub config: ModelConfig,
    pub config_json: String,
    pub generation_config_json: String,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub ckpt: Checkpoint,
    meta: Vec<TensorMeta>,
    state: Mutex<State>,
    ready: watch::Sender<Readiness>,
    pub next_seq: AtomicU64,
}

/// A cloneable handle on the cluster state.
#[derive(Clone)]
pub struct Coordinator(pub(super) Arc<Inner>);

impl Coordinator {
    /// Reads the model folder (config, tokenizer, every checkpoint header, each
    /// tensor's shape) so that a bad checkpoint fails here, before any worker.
    pub fn new(cfg: ClusterConfig, advertise: String) -> Result<Self> {
        if cfg.workers == 0 {
            return Err(CoordinatorError::InvalidRequest("--workers must be at least 1".into()));
        }
        let dir = &cfg.model_dir;
        let config = ModelConfig::from_dir(dir)?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let config_json = read("config.json").map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
        let generation_config_json = read("generation_config.json").unwrap_or_default();
        let ckpt = Checkpoint::open(dir)?;
        let specs = tensor_specs(&config);
        for s in &specs {
            ckpt.expect_shape(&s.name, &s.shape)?;
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            if tok_path.is_file() { Some(Arc::new(Tokenizer::from_file(&tok_path)?)) } else { None };
        let (ready, _) = watch::channel(Readiness::Waiting { registered: 0, expected: cfg.workers });
        Ok(Self(Arc::new(Inner {
            meta: specs.iter().map(TensorMeta::from).collect(),
            cfg,
            config,
            config_json,
            generation_config_json,
            tokenizer,
            ckpt,
            state: Mutex::new(State { workers: Vec::new(), plan: None, next_id: 1, advertise }),
            ready,
            next_seq: AtomicU64::new(1),
        })))
    }

    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.0.ready.subscribe()
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().expect("cluster state lock")
    }

    /// Adds a worker; the last expected one triggers planning and loading.
    pub(super) fn register(&self, address: String) -> Result<WorkerId> {
        let ch = zeroshard_proto::transport::endpoint(&address)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("worker address {address}: {e}")))?
            .connect_lazy();
        let (id, complete) = {
            let mut st = self.lock();
            if st.workers.len() >= self.0.cfg.workers {
                return Err(CoordinatorError::Unavailable(format!(
                    "the cluster already has its {} workers",
                    self.0.cfg.workers
                )));
            }
            let id = WorkerId(st.next_id);
            st.next_id += 1;
            st.workers.push(WorkerEntry {
                id,
                address: address.clone(),
                client: WorkerClient::new(ch),
                active: Arc::new(AtomicU32::new(0)),
            });
            (id, st.workers.len() == self.0.cfg.workers)
        };
        let registered = self.lock().workers.len();
        tracing::info!("{id} registered at {address} ({registered}/{})", self.0.cfg.workers);
        if complete {
            self.0.ready.send_replace(Readiness::Loading);
            let me = self.clone();
            tokio::spawn(async move {
                let r = match me.install_all().await {
                    Ok(()) => Readiness::Ready,
                    Err(e) => Readiness::Failed(e),
                };
                me.0.ready.send_replace(r);
            });
        } else {
            self.0.ready.send_replace(Readiness::Waiting { registered, expected: self.0.cfg.workers });
        }
        Ok(id)
    }

    /// Plans epoch 1 over the registered workers and installs it on each.
    async fn install_all(&self) -> std::result::Result<(), String> {
        let (workers, advertise) = {
            let st = self.lock();
            (st.workers.clone(), st.advertise.clone())
        };
        let ids: Vec<WorkerId> = workers.iter().map(|w| w.id).collect();
        let options = PlanOptions {
            epoch: 1,
            persistence_threshold_bytes: self.0.cfg.persistence_threshold_bytes,
            ..PlanOptions::default()
        };
        let plan = Arc::new(plan(&self.0.meta, &ids, &options).map_err(|e| format!("planning: {e}"))?);
        let peers: Vec<(WorkerId, String)> = workers.iter().map(|w| (w.id, w.address.clone())).collect();
        let start = Instant::now();
        let installs = workers.iter().map(|w| {
            let a = Assignment {
                plan: (*plan).clone(),
                worker: w.id,
                peers: peers.clone(),
                pull_from: self.0.cfg.pull.then(|| advertise.clone()),
            };
            let mut client = w.client.clone();
            let (id, addr) = (w.id, w.address.clone());
            async move {
                let r = client
                    .install_plan(pb::InstallPlanRequest::from(&a))
                    .await
                    .map_err(|s| format!("{id} at {addr} could not load its ranges: {}", s.message()))?
                    .into_inner();
                eprintln!(
                    "{id}: loaded {:.1} MB in {:.2} s ({:.2} GB/s)",
                    r.owned_bytes as f64 / 1e6,
                    r.load_ms / 1e3,
                    r.owned_bytes as f64 / (r.load_ms / 1e3).max(1e-9) / 1e9
                );
                Ok::<(), String>(())
            }
        });
        futures::future::try_join_all(installs).await?;
        tracing::info!(
            "epoch 1 installed on {} workers in {:.2} s",
            workers.len(),
            start.elapsed().as_secs_f64()
        );
        self.lock().plan = Some(plan);
        Ok(())
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

    pub fn workers(&self) -> Vec<WorkerEntry> {
        self.lock().workers.clone()
    }

    /// The worker with the fewest sequences running.
    pub fn least_loaded(&self) -> Result<WorkerEntry> {
        self.lock()
            .workers
            .iter()
            .min_by_key(|w| w.active.load(Ordering::Relaxed))
            .cloned()
            .ok_or_else(|| CoordinatorError::Unavailable("no workers".into()))
    }
}
