//! The worker's gRPC services (`Worker`, `Shards`), its registration with the
//! coordinator, and [`run`]. Errors become `tonic::Status` in one place.
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use zeroshard_offload::plan::{Assignment, OwnedBytes, Plan, WorkerId};
use zeroshard_offload::{Checkpoint, ModelConfig};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::control_client::ControlClient;
use zeroshard_proto::v1::shards_client::ShardsClient;
use zeroshard_proto::v1::shards_server::{Shards, ShardsServer};
use zeroshard_proto::v1::worker_server::{Worker, WorkerServer};

use super::batcher::{self, BatchStats, Command};
use super::gather::{GatherStats, Gatherer};
use super::weights::ClusterWeights;
use super::{store, NodeConfig};
use crate::convert;
use crate::cpu::CpuBackend;
use crate::engine::Engine;
use crate::error::{Result, WorkerError};
use crate::shards::{HostSlices, ShardError, CHUNK_BYTES};

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        match &e {
            WorkerError::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
            WorkerError::Gather(_) => Status::unavailable(e.to_string()),
            WorkerError::Offload(_)
            | WorkerError::Load(_)
            | WorkerError::MissingWeight(_)
            | WorkerError::Backend(_) => Status::internal(e.to_string()),
        }
    }
}

fn shard_status(e: ShardError) -> Status {
    match e {
        ShardError::NotHeld { .. } => Status::not_found(e.to_string()),
        ShardError::InvalidRange { .. } => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// What the current plan gave this worker.
struct Installed {
    epoch: u64,
    slices: Arc<HostSlices>,
    owned: OwnedBytes,
    weights: Arc<ClusterWeights>,
}

/// The model, known once the coordinator answered the registration.
struct ModelInfo {
    config: ModelConfig,
    dir: PathBuf,
}

struct Node {
    cfg: NodeConfig,
    id: OnceLock<u64>,
    model: OnceLock<ModelInfo>,
    installed: RwLock<Option<Installed>>,
    commands: Mutex<Sender<Command>>,
    batch: Arc<BatchStats>,
    resident: Arc<AtomicU64>,
    gather: Arc<GatherStats>,
    served_fetches: AtomicU64,
}

impl Node {
    fn send(&self, c: Command) {
        if let Ok(tx) = self.commands.lock() {
            let _ = tx.send(c);
        }
    }

    /// The installed epoch, or FAILED_PRECONDITION naming both epochs.
    fn check_epoch(&self, epoch: u64) -> std::result::Result<(), Status> {
        let guard = self.installed.read().map_err(|_| Status::internal("state lock poisoned"))?;
        match guard.as_ref() {
            None => Err(Status::failed_precondition("no plan installed on this worker yet")),
            Some(i) if i.epoch != epoch => Err(Status::failed_precondition(format!(
                "epoch {epoch} is not this worker's epoch {}",
                i.epoch
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn install(&self, a: Assignment) -> Result<(u64, f64)> {
        // The plan can arrive before the answer to our registration is processed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.id.get().is_none() || self.model.get().is_none()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let me = *self.id.get().ok_or_else(|| WorkerError::InvalidRequest("not registered yet".into()))?;
        if a.worker != WorkerId(me) {
            return Err(WorkerError::InvalidRequest(format!(
                "plan is for {}, this is worker {me}",
                a.worker
            )));
        }
        let info = self.model.get().ok_or_else(|| WorkerError::InvalidRequest("no model yet".into()))?;
        if self.cfg.fail_load {
            return Err(WorkerError::Load(
                "injected fault: this worker refuses to load (--fault-fail-load)".into(),
            ));
        }
        let start = Instant::now();
        let plan = Arc::new(a.plan);
        let slices = match &a.pull_from {
            Some(endpoint) => store::load_from_pull(endpoint, &plan, a.worker).await?,
            None => {
                let (dir, plan2) =
                    (self.cfg.model_dir.clone().unwrap_or_else(|| info.dir.clone()), plan.clone());
                tokio::task::spawn_blocking(move || load_checkpoint(&dir, &plan2, a.worker))
                    .await
                    .map_err(|e| WorkerError::Load(format!("loader task: {e}")))??
            }
        };
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
        let gatherer =
            Arc::new(Gatherer::new(plan.clone(), a.worker, slices.clone(), peers, self.gather.clone()));
        if let Some(old) = self.installed.read().ok().and_then(|g| g.as_ref().map(|i| i.weights.clone())) {
            old.clear();
        }
        let weights = Arc::new(ClusterWeights::new(
            tokio::runtime::Handle::current(),
            gatherer,
            &info.config,
            self.cfg.prefetch_layers,
            self.cfg.max_live_bytes,
            self.resident.clone(),
        ));
        let epoch = plan.epoch();
        *self.installed.write().map_err(|_| WorkerError::Load("state lock poisoned".into()))? =
            Some(Installed { epoch, slices, owned, weights: weights.clone() });
        self.send(Command::Source(weights));
        tracing::info!(
            "worker {me}: epoch {epoch} installed, {} bytes owned, loaded in {load_ms:.0} ms",
            owned.total()
        );
        Ok((owned.total(), load_ms))
    }
}

fn load_checkpoint(dir: &Path, plan: &Plan, me: WorkerId) -> Result<HostSlices> {
    let ckpt = Checkpoint::open(dir)?;
    store::load_from_checkpoint(&ckpt, plan, me)
}

#[derive(Clone)]
struct Svc(Arc<Node>);

type StepStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::SequenceStep, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::ShardChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Svc {
    async fn install_plan(
        &self,
        req: Request<pb::InstallPlanRequest>,
    ) -> std::result::Result<Response<pb::InstallPlanResponse>, Status> {
        let a =
            Assignment::try_from(req.into_inner()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let epoch = a.plan.epoch();
        let (owned_bytes, load_ms) = self.0.install(a).await.map_err(Status::from)?;
        Ok(Response::new(pb::InstallPlanResponse { epoch, owned_bytes, load_ms }))
    }

    type RunSequenceStream = StepStream;

    async fn run_sequence(
        &self,
        req: Request<pb::RunSequenceRequest>,
    ) -> std::result::Result<Response<StepStream>, Status> {
        let r = req.into_inner();
        self.0.check_epoch(r.epoch)?;
        let mut params = convert::generation_params(r.sampling);
        let mut prompt = r.prompt_token_ids;
        // A resumed sequence: what was produced is prefilled with the prompt.
        params.max_new_tokens = params.max_new_tokens.saturating_sub(r.generated_token_ids.len());
        prompt.extend(r.generated_token_ids);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.0.send(Command::Run { id: r.sequence_id, prompt, params, tx });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> std::result::Result<Response<pb::CancelResponse>, Status> {
        self.0.send(Command::Cancel(req.into_inner().sequence_id));
        Ok(Response::new(pb::CancelResponse { cancelled: true }))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> std::result::Result<Response<pb::WorkerStats>, Status> {
        let n = &self.0;
        let guard = n.installed.read().map_err(|_| Status::internal("state lock poisoned"))?;
        let (epoch, owned) = guard.as_ref().map_or((0, OwnedBytes::default()), |i| (i.epoch, i.owned));
        Ok(Response::new(pb::WorkerStats {
            id: n.id.get().copied().unwrap_or(0),
            epoch,
            owned_partitioned_bytes: owned.partitioned,
            owned_persistent_bytes: owned.persistent,
            resident_bytes: n.resident.load(Ordering::Relaxed),
            active_sequences: n.batch.active.load(Ordering::Relaxed),
            gathered_bytes_total: n.gather.bytes.load(Ordering::Relaxed),
            gather_bytes_per_s: n.gather.bytes_per_s(),
            steps_total: n.batch.steps.load(Ordering::Relaxed),
            rejected_chunks_total: n.gather.rejected_chunks.load(Ordering::Relaxed),
            step_nanos_total: n.batch.step_nanos.load(Ordering::Relaxed),
            gather_wait_nanos_total: n.gather.wait_nanos.load(Ordering::Relaxed),
            gather_busy_nanos_total: n.gather.busy_nanos.load(Ordering::Relaxed),
        }))
    }
}

#[tonic::async_trait]
impl Shards for Svc {
    type FetchRangesStream = ChunkStream;

    async fn fetch_ranges(
        &self,
        req: Request<pb::FetchRangesRequest>,
    ) -> std::result::Result<Response<ChunkStream>, Status> {
        let r = req.into_inner();
        self.0.check_epoch(r.epoch)?;
        let slices = self
            .0
            .installed
            .read()
            .map_err(|_| Status::internal("state lock poisoned"))?
            .as_ref()
            .map(|i| i.slices.clone())
            .ok_or_else(|| Status::failed_precondition("no plan installed"))?;
        let ranges = convert::fetch_ranges(r.ranges).map_err(shard_status)?;
        let chunk_bytes = if r.chunk_bytes == 0 { CHUNK_BYTES } else { r.chunk_bytes as usize };
        let chunks = slices.chunks(&ranges, chunk_bytes).map_err(shard_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Fault injection: the first chunk of every Nth fetch gets a flipped
        // byte under its original checksum (the retry is another fetch).
        let n = self.0.served_fetches.fetch_add(1, Ordering::Relaxed) + 1;
        let mut corrupt = self.0.cfg.corrupt_every > 0 && n.is_multiple_of(self.0.cfg.corrupt_every);
        tokio::spawn(async move {
            for chunk in chunks {
                let mut msg = pb::ShardChunk::from(chunk);
                if corrupt && !msg.data.is_empty() {
                    let mut bad = msg.data.to_vec();
                    bad[0] ^= 0xff;
                    msg.data = bad.into();
                    corrupt = false;
                }
                if tx.send(Ok(msg)).await.is_err() {
                    break; // the requester left
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Serves on `listener` until `shutdown` resolves: prints `listening
/// http://ADDR` on stdout, registers with the coordinator, and runs the batching
/// loop on its own thread.
pub async fn run(
    cfg: NodeConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|e| WorkerError::Load(format!("listener: {e}")))?;
    let advertise = format!("http://{addr}");
    let (tx, rx) = std::sync::mpsc::channel();
    let node = Arc::new(Node {
        cfg: cfg.clone(),
        id: OnceLock::new(),
        model: OnceLock::new(),
        installed: RwLock::new(None),
        commands: Mutex::new(tx),
        batch: Arc::new(BatchStats::default()),
        resident: Arc::new(AtomicU64::new(0)),
        gather: Arc::new(GatherStats::default()),
        served_fetches: AtomicU64::new(0),
    });
    let svc = Svc(node.clone());
    let server = zeroshard_proto::transport::server()
        .add_service(WorkerServer::new(svc.clone()))
        .add_service(
            ShardsServer::new(svc).max_decoding_message_size(zeroshard_proto::transport::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(zeroshard_proto::transport::incoming(listener), shutdown);
    let server = tokio::spawn(server);
    println!("listening {advertise}");

    let reg = register(&cfg.coordinator, &advertise).await?;
    let config = model_config(&reg)?;
    node.id.set(reg.worker_id).ok();
    let engine = Engine::without_weights(CpuBackend, config.clone());
    node.model.set(ModelInfo { config, dir: PathBuf::from(&reg.model_dir) }).ok();
    let stats = node.batch.clone();
    std::thread::Builder::new()
        .name("batcher".into())
        .spawn(move || batcher::run(engine, rx, stats))
        .map_err(|e| WorkerError::Load(format!("batcher thread: {e}")))?;
    tracing::info!("worker {} registered with {}", reg.worker_id, cfg.coordinator);

    server
        .await
        .map_err(|e| WorkerError::Load(format!("server task: {e}")))?
        .map_err(|e| WorkerError::Load(format!("server: {e}")))
}

/// Registers `advertise` with the coordinator, retrying while it starts.
async fn register(coordinator: &str, advertise: &str) -> Result<pb::RegisterWorkerResponse> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let ch = super::connect(coordinator).await?;
            ControlClient::new(ch)
                .register_worker(pb::RegisterWorkerRequest {
                    address: advertise.to_string(),
                    device: "cpu".into(),
                    memory_bytes: 0,
                })
                .await
                .map(Response::into_inner)
                .map_err(|s| WorkerError::Load(format!("registering with {coordinator}: {}", s.message())))
        };
        match attempt.await {
            Ok(r) => return Ok(r),
            Err(WorkerError::Load(m)) => return Err(WorkerError::Load(m)),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn model_config(reg: &pb::RegisterWorkerResponse) -> Result<ModelConfig> {
    let dir = Path::new(&reg.model_dir);
    let parse = |s: &str, name: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .map_err(|e| WorkerError::Load(format!("{name} from the coordinator: {e}")))
    };
    let config = parse(&reg.config_json, "config.json")?;
    let gen_path = dir.join("generation_config.json");
    let gen = if reg.generation_config_json.is_empty() {
        None
    } else {
        Some(parse(&reg.generation_config_json, "generation_config.json")?)
    };
    Ok(ModelConfig::from_json(
        &dir.join("config.json"),
        &config,
        gen.as_ref().map(|g| (gen_path.as_path(), g)),
    )?)
}
