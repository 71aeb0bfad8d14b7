//! The worker's gRPC services (`Worker`, `Shards`), its registration with the
//! cluster, and [`run`]. Errors become a `tonic::Status` in one place
//! ([`convert::status`]).
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use zeroshard_offload::plan::Assignment;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::shards_server::{Shards, ShardsServer};
use zeroshard_proto::v1::tensor_group_server::{TensorGroup, TensorGroupServer};
use zeroshard_proto::v1::worker_server::{Worker, WorkerServer};
use zeroshard_security::{Guard, Role};

use zeroshard_offload::convert::{fetch_ranges, generation_params};
use zeroshard_offload::request::ScoreRequest;
use zeroshard_offload::shards::{check_probe, checksum, probe_chunks, CHUNK_BYTES};

use super::convert;
use crate::error::{Result, WorkerError};
use crate::node::{Announce, Command, Node, NodeConfig, Registrar};

/// Largest `Worker` request: a plan with its block digests (a 70B model's
/// are ~4.5 MB).
const PLAN_MESSAGE_BYTES: usize = 64 << 20;

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
        let mut r = req.into_inner();
        let model = r.model.take().map(|m| convert::planned_model(&m)).transpose()?;
        let a = Assignment::try_from(r).map_err(WorkerError::from)?;
        let epoch = a.plan.epoch();
        let (owned_bytes, load_ms) = self.0.prepare(a, model).await?;
        Ok(Response::new(pb::InstallPlanResponse { epoch, owned_bytes, load_ms }))
    }

    async fn activate_plan(
        &self,
        req: Request<pb::ActivatePlanRequest>,
    ) -> std::result::Result<Response<pb::ActivatePlanResponse>, Status> {
        let epoch = req.into_inner().epoch;
        self.0.activate(epoch)?;
        Ok(Response::new(pb::ActivatePlanResponse { epoch }))
    }

    type RunSequenceStream = StepStream;

    async fn run_sequence(
        &self,
        req: Request<pb::RunSequenceRequest>,
    ) -> std::result::Result<Response<StepStream>, Status> {
        let r = req.into_inner();
        self.0.check_routable(r.epoch)?;
        let mut params = generation_params(r.sampling);
        let mut prompt = r.prompt_token_ids;
        // A resumed sequence: what was produced is prefilled with the prompt.
        params.max_new_tokens = params.max_new_tokens.saturating_sub(r.generated_token_ids.len());
        params.sampling.resume_draws = r.generated_token_ids.len() as u64;
        prompt.extend(r.generated_token_ids);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let score = r.score.map(ScoreRequest::from);
        self.0.send(Command::Run { id: r.sequence_id, prompt, params, score, tx });
        // Counted open until tonic drops the stream (its status sent): a drain
        // waits for the hand-backs it caused to go out.
        let open = self.0.stats.sequence_streams.open();
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx).map(move |ev| {
            let _ = &open;
            convert::sequence_step(ev)
        }))))
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
        req: Request<pb::StatsRequest>,
    ) -> std::result::Result<Response<pb::WorkerStats>, Status> {
        if req.into_inner().calibrate {
            self.0.calibrate().await?;
        }
        let (epoch, owned) = self.0.active();
        let n = &self.0.stats;
        Ok(Response::new(pb::WorkerStats {
            id: self.0.id(),
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
            loads_total: n.loads.load(Ordering::Relaxed),
            loaded_bytes_total: n.loaded_bytes.load(Ordering::Relaxed),
            failovers_total: n.gather.failovers.load(Ordering::Relaxed),
            loading_bytes: n.loading.load(Ordering::Relaxed),
            rejected_blocks_by_holder: n.gather.rejected_blocks(),
            kv_cache_bytes: n.batch.kv_cache_bytes.load(Ordering::Relaxed),
            kv_reserved_bytes: n.batch.kv_reserved.load(Ordering::Relaxed),
            kv_bytes_per_token: n.batch.kv_bytes_per_token.load(Ordering::Relaxed),
            // Before the first plan, the configured limit.
            max_active_sequences: match n.batch.max_active.load(Ordering::Relaxed) {
                0 => self.0.cfg.max_active_sequences as u32,
                n => n,
            },
            group_sent_bytes_total: n.gather.group_sent.load(Ordering::Relaxed),
            group_received_bytes_total: n.gather.group_received.load(Ordering::Relaxed),
            calibrated_gflops: self.0.calibration().map_or(0.0, |c| c.peak_gflops),
            calibrated_read_gbs: self.0.calibration().map_or(0.0, |c| c.read_gbs),
            host_id: self.0.host_id.clone(),
        }))
    }

    async fn measure_link(
        &self,
        req: Request<pb::MeasureLinkRequest>,
    ) -> std::result::Result<Response<pb::LinkMeasurement>, Status> {
        let r = req.into_inner();
        let bytes = if r.probe_bytes == 0 { DEFAULT_PROBE_BYTES } else { r.probe_bytes };
        check_probe(bytes).map_err(WorkerError::from)?;
        let m = super::peer::measure_link(&self.0.cfg.security, &r.peer_address, bytes).await?;
        let exchange = super::group::measure_exchange(&self.0.cfg.security, &r.peer_address).await?;
        Ok(Response::new(pb::LinkMeasurement {
            round_trip_us: m.round_trip_s * 1e6,
            bytes_per_s: m.bytes_per_s,
            exchange_round_trip_us: exchange.as_secs_f64() * 1e6,
        }))
    }
}

/// A bulk link probe's bytes unless the coordinator asks for another size.
const DEFAULT_PROBE_BYTES: u64 = 8 << 20;

#[tonic::async_trait]
impl TensorGroup for Svc {
    async fn follow(
        &self,
        req: Request<pb::GroupHello>,
    ) -> std::result::Result<Response<pb::GroupReady>, Status> {
        Ok(Response::new(super::group::follow(&self.0, req).await?))
    }

    async fn echo(
        &self,
        req: Request<pb::EchoRequest>,
    ) -> std::result::Result<Response<pb::GroupReady>, Status> {
        Ok(Response::new(super::group::echo(&self.0, req).await?))
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
        let slices = self.0.slices(r.epoch)?;
        let ranges = fetch_ranges(r.ranges).map_err(WorkerError::from)?;
        let chunk_bytes = if r.chunk_bytes == 0 { CHUNK_BYTES } else { r.chunk_bytes as usize };
        let chunks = slices.chunks(&ranges, chunk_bytes).map_err(WorkerError::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Fault injection: the first chunk of every Nth fetch gets a flipped
        // byte under its original checksum (the retry is another fetch).
        let n = self.0.stats.served_fetches.fetch_add(1, Ordering::Relaxed) + 1;
        self.0.stats.fetch_served.notify_one();
        let mut corrupt = self.0.cfg.faults.corrupt_fetch(n);
        // Fault injection: every chunk's first byte flipped, under a valid
        // checksum of the flipped bytes (a lying holder).
        let lie = self.0.cfg.faults.serve_corrupt();
        tokio::spawn(async move {
            for chunk in chunks {
                let mut msg = pb::ShardChunk::from(chunk);
                if lie && !msg.data.is_empty() {
                    let mut bad = msg.data.to_vec();
                    bad[0] ^= 0x5a;
                    msg.crc32c = checksum(&bad);
                    msg.data = bad.into();
                }
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

    type ProbeStream = ChunkStream;

    async fn probe(
        &self,
        req: Request<pb::ProbeRequest>,
    ) -> std::result::Result<Response<ChunkStream>, Status> {
        let chunks = probe_chunks(req.into_inner().bytes).map_err(WorkerError::from)?;
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks.map(|c| Ok(pb::ShardChunk::from(c)))))))
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains (see [`drain`]): prints `listening
/// http://ADDR` on stdout, then registers through `registrar`. The batching
/// loop starts on its own thread with the first plan. A fatal step error (the
/// device cannot be trusted again) makes the worker leave the cluster at once
/// and return that error, so the process exits non-zero instead of staying
/// registered without stepping.
pub async fn run(
    cfg: NodeConfig,
    registrar: Arc<dyn Registrar>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| WorkerError::Io { path: "listener".into(), source })?;
    let security = cfg.security.clone();
    let advertise = format!("{}://{}", security.scheme(), advertised(cfg.advertise.as_deref(), addr));
    let (healthy, health) = tokio::sync::watch::channel(false);
    if let Some(at) = &cfg.health_listen {
        let l = TcpListener::bind(at)
            .await
            .map_err(|source| WorkerError::Io { path: format!("--health-listen {at}").into(), source })?;
        zeroshard_proto::health::spawn(l, health);
    }
    let node = Arc::new(Node::new(cfg.clone()));
    let svc = Svc(node.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let tls = security.is_tls();
    let router = zeroshard_proto::transport::server()
        .add_service(InterceptedService::new(
            WorkerServer::new(svc.clone()).max_decoding_message_size(PLAN_MESSAGE_BYTES),
            Guard::members(tls, "Worker", &[Role::Coordinator]).revoking(&security),
        ))
        .add_service(InterceptedService::new(
            TensorGroupServer::new(svc.clone()),
            Guard::members(tls, "TensorGroup", &[Role::Worker]).revoking(&security),
        ))
        .add_service(InterceptedService::new(
            ShardsServer::new(svc).max_decoding_message_size(zeroshard_proto::transport::MAX_MESSAGE_BYTES),
            Guard::members(tls, "Shards", &[Role::Coordinator, Role::Worker]).revoking(&security),
        ));
    security.spawn_reloader();
    let mut server = tokio::spawn(async move { security.serve(router, listener, stop).await });
    zeroshard_offload::outln!("listening {advertise}");

    let described = registrar.describe();
    let announce = Announce {
        address: advertise,
        device: cfg.device.clone(),
        memory_bytes: crate::node::available_memory(),
    };
    let id = registrar
        .clone()
        .register(announce)
        .await
        .map_err(|e| WorkerError::Membership { endpoint: described.clone(), source: e.into() })?;
    node.set_id(id);
    // For a launcher (`up`), which names this process by it from now on.
    zeroshard_offload::outln!("registered as worker {id}");
    tracing::info!("worker {id} registered with {described}");
    healthy.send_replace(true);

    tokio::select! {
        served = &mut server => served
            .map_err(|e| WorkerError::Task { what: "server task", source: e.into() })?
            .map_err(|e| WorkerError::Task { what: "gRPC server", source: e.into() }),
        fatal = node.fatal_error() => {
            let reason = format!("fatal step error: {fatal}");
            tracing::error!("worker {id}: {reason}; leaving the cluster");
            if let Err(e) = registrar.leave(id, &reason).await {
                tracing::warn!("worker {id}: leaving {described}: {e} (the lease will lapse)");
            }
            let _ = stop_tx.send(());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server).await;
            Err(WorkerError::Task { what: "batching loop", source: Box::new(fatal) })
        }
        _ = shutdown => {
            healthy.send_replace(false);
            drain(&node, registrar.as_ref(), id, &described).await;
            let _ = stop_tx.send(());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server).await;
            Ok(())
        }
    }
}

/// The `host:port` a worker announces: `advertise` (a host, or host:port)
/// with the bound port when it names none, else the bound address.
fn advertised(advertise: Option<&str>, bound: std::net::SocketAddr) -> String {
    match advertise {
        None => bound.to_string(),
        Some(a) if a.parse::<std::net::SocketAddr>().is_ok() => a.to_string(),
        // An IPv6 literal without a port.
        Some(a) if a.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{a}]:{}", bound.port()),
        Some(a) if a.starts_with('[') && a.ends_with(']') => format!("{a}:{}", bound.port()),
        Some(a) => match a.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => a.to_string(),
            _ => format!("{a}:{}", bound.port()),
        },
    }
}

/// Longest a drain waits for peers to stop fetching from this worker.
const DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a drain waits for its handed-back sequences' streams to close.
const HAND_BACK_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Peers have moved to an epoch without this worker once it served no fetch for this long.
const DRAIN_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// Leaves the cluster gracefully (SIGTERM): hands every sequence back (the
/// coordinator continues each elsewhere from the tokens already sent, and
/// sends this worker no more), leaves membership so that the next epoch is
/// planned without it, and keeps serving its ranges to peers until they no
/// longer fetch from it (the new epoch is active), at most [`DRAIN_MAX`].
async fn drain(node: &Node, registrar: &dyn Registrar, id: u64, described: &str) {
    let started = std::time::Instant::now();
    tracing::info!("worker {id}: draining: handing its sequences back, then leaving {described}");
    node.send(Command::Drain);
    // The hand-backs reach the coordinator before the departure, so it
    // continues the sequences at once instead of waiting on a lost worker:
    // wait until every sequence stream has sent its last status.
    let streams = &node.stats.sequence_streams;
    if tokio::time::timeout(HAND_BACK_MAX, streams.all_closed()).await.is_err() {
        tracing::warn!("worker {id}: sequence streams still open after {HAND_BACK_MAX:?}; leaving anyway");
    }
    let leave = registrar.leave(id, "draining (SIGTERM)");
    match tokio::time::timeout(std::time::Duration::from_secs(2), leave).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("worker {id}: leaving {described}: {e} (the lease will lapse)"),
        Err(_) => {
            tracing::warn!("worker {id}: {described} did not answer the departure (the lease will lapse)")
        }
    }
    // Serve peers until none has fetched for DRAIN_QUIET (they have moved to an
    // epoch without this worker), told of each fetch as it is served.
    let deadline = tokio::time::Instant::now() + DRAIN_MAX.saturating_sub(started.elapsed());
    loop {
        tokio::select! {
            _ = node.stats.fetch_served.notified() => {}
            _ = tokio::time::sleep(DRAIN_QUIET) => break,
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    tracing::info!("worker {id}: drained in {:.2} s", started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod advertise_tests {
    use super::advertised;

    #[test]
    fn a_host_alone_takes_the_bound_port() {
        let bound = "0.0.0.0:41234".parse().expect("address");
        assert_eq!(advertised(None, bound), "0.0.0.0:41234");
        assert_eq!(advertised(Some("node07"), bound), "node07:41234");
        assert_eq!(advertised(Some("node07:9000"), bound), "node07:9000");
        assert_eq!(advertised(Some("10.1.2.3"), bound), "10.1.2.3:41234");
        assert_eq!(advertised(Some("fd00::7"), bound), "[fd00::7]:41234");
        assert_eq!(advertised(Some("[fd00::7]"), bound), "[fd00::7]:41234");
        assert_eq!(advertised(Some("[fd00::7]:9000"), bound), "[fd00::7]:9000");
        assert_eq!(
            advertised(Some("w-0.zeroshard-workers.ns.svc.cluster.local"), bound),
            "w-0.zeroshard-workers.ns.svc.cluster.local:41234"
        );
    }
}
