//! etcd membership against real etcd processes: `EtcdRegistrar` registering
//! workers, `EtcdMembership` watching them, the stored plan, and what happens
//! when a worker stops renewing, is evicted, or etcd itself goes away.
//! `RUST_LOG=zeroshard_coordinator=debug` shows the membership's side.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::etcd::{free_port, Etcd};
use tokio::sync::mpsc::UnboundedReceiver;
use zeroshard_coordinator::membership::etcd::{EtcdMembership, EtcdRegistrar};
use zeroshard_coordinator::membership::{Member, MemberEvent, MemberWatch, Membership, StoredPlan};
use zeroshard_offload::plan::{plan, PlanOptions, TensorMeta, WorkerId};
use zeroshard_worker::node::{Announce, Registrar};

const TTL: Duration = Duration::from_secs(2);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

fn announce(port: u16) -> Announce {
    Announce { address: format!("http://10.0.0.1:{port}"), device: "cpu".into(), memory_bytes: 1 << 30 }
}

fn member(id: u64, port: u16) -> Member {
    let a = announce(port);
    Member { id: WorkerId(id), address: a.address, device: a.device, memory_bytes: a.memory_bytes }
}

async fn registrar(endpoints: &[String]) -> Arc<EtcdRegistrar> {
    Arc::new(EtcdRegistrar::connect(endpoints, "test", TTL).await.expect("registrar connects"))
}

async fn membership(endpoints: &[String]) -> EtcdMembership {
    EtcdMembership::connect(endpoints, "test", TTL).await.expect("membership connects")
}

/// The next event within `within`; panics when none comes.
async fn next_event(events: &mut UnboundedReceiver<MemberEvent>, within: Duration) -> MemberEvent {
    match tokio::time::timeout(within, events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the event stream ended"),
        Err(_) => panic!("no member event within {within:?}"),
    }
}

/// Applies every event that arrives within `quiet` of the previous one.
async fn drain(
    state: &mut BTreeMap<WorkerId, Member>,
    events: &mut UnboundedReceiver<MemberEvent>,
    quiet: Duration,
) {
    while let Ok(Some(event)) = tokio::time::timeout(quiet, events.recv()).await {
        match event {
            MemberEvent::Joined(m) => state.insert(m.id, m),
            MemberEvent::Left(id) => state.remove(&id),
        };
    }
}

/// A worker whose registrar runs on its own runtime, so that it can die.
struct Worker {
    id: u64,
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    async fn start(endpoints: Vec<String>, port: u16) -> Self {
        let (id_tx, id_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("worker runtime");
            let id = rt.block_on(async { registrar(&endpoints).await.register(announce(port)).await });
            let _ = id_tx.send(id);
            let _ = stop_rx.recv();
            // Dropping the runtime ends the keep-alive task: the worker is dead.
        });
        let id = id_rx.await.expect("worker thread").expect("worker registers");
        Self { id, stop, thread }
    }

    fn kill(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("worker thread");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_workers_are_seen_by_the_watch() {
    init_tracing();
    let etcd = Etcd::start();
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    assert!(m.describe().contains(&urls[0]) && m.describe().contains("test"), "{}", m.describe());
    let MemberWatch { members, mut events } = m.watch().await.expect("watch");
    assert!(members.is_empty());

    let id = registrar(&urls).await.register(announce(5001)).await.expect("register");
    assert_eq!(id, 1, "ids start at 1");
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, MemberEvent::Joined(member(1, 5001)));
    let id = registrar(&urls).await.register(announce(5002)).await.expect("register");
    assert_eq!(id, 2);
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, MemberEvent::Joined(member(2, 5002)));

    let fresh = m.watch().await.expect("watch").members;
    assert_eq!(fresh, vec![member(1, 5001), member(2, 5002)]);
    // Another cluster name on the same etcd sees none of them.
    let other = EtcdMembership::connect(&urls, "other", TTL).await.expect("connect");
    assert!(other.watch().await.expect("watch").members.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_stops_renewing_leaves_after_the_ttl() {
    init_tracing();
    let etcd = Etcd::start();
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    let MemberWatch { mut events, .. } = m.watch().await.expect("watch");
    let worker = Worker::start(urls.clone(), 5001).await;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await,
        MemberEvent::Joined(member(worker.id, 5001))
    );

    // Alive for several TTLs: the keep-alive renews the lease.
    assert!(tokio::time::timeout(2 * TTL, events.recv()).await.is_err(), "no event while the worker lives");
    let id = worker.id;
    let killed = Instant::now();
    worker.kill();
    let event = next_event(&mut events, TTL + Duration::from_secs(3)).await;
    assert_eq!(event, MemberEvent::Left(WorkerId(id)));
    let after = killed.elapsed();
    assert!(after >= TTL / 3, "left after {after:?}, before its lease could expire");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_worker_leaves_and_registers_again_while_alive() {
    init_tracing();
    let etcd = Etcd::start();
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    let MemberWatch { mut events, .. } = m.watch().await.expect("watch");
    let id = registrar(&urls).await.register(announce(5001)).await.expect("register");
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, MemberEvent::Joined(member(id, 5001)));

    m.evict(WorkerId(id)).await.expect("evict");
    assert_eq!(next_event(&mut events, Duration::from_secs(2)).await, MemberEvent::Left(WorkerId(id)));
    // Its keep-alive finds the lease revoked and registers the same id again.
    assert_eq!(
        next_event(&mut events, TTL + Duration::from_secs(3)).await,
        MemberEvent::Joined(member(id, 5001))
    );
    // Evicting an id nobody holds is not an error.
    m.evict(WorkerId(99)).await.expect("evict unknown");
}

fn sample_plan(epoch: u64) -> StoredPlan {
    let meta = vec![
        TensorMeta::new("model.layers.0.mlp.up_proj.weight", vec![64, 48], Some(0)),
        TensorMeta::new("model.norm.weight", vec![48], None),
    ];
    let options =
        PlanOptions { epoch, persistence_threshold_bytes: 200, replicas: 1, elem_bytes: 2, tensor_degree: 0 };
    let workers = [WorkerId(3), WorkerId(5)];
    StoredPlan {
        plan: plan(&meta, &workers, &options).expect("plan"),
        peers: vec![(WorkerId(3), "http://10.0.0.3:1".into()), (WorkerId(5), "http://10.0.0.5:1".into())],
        pull: epoch.is_multiple_of(2),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plan_round_trips_and_survives_the_coordinator() {
    init_tracing();
    let etcd = Etcd::start();
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    assert_eq!(m.load_plan().await.expect("load"), None);
    m.store_plan(&sample_plan(1)).await.expect("store");
    assert_eq!(m.load_plan().await.expect("load"), Some(sample_plan(1)));
    m.store_plan(&sample_plan(2)).await.expect("store");
    drop(m);
    // A restarted coordinator reads the latest plan.
    let again = membership(&urls).await;
    assert_eq!(again.load_plan().await.expect("load"), Some(sample_plan(2)));
}

/// Digests of a 70B-like checkpoint: 4.5 MB of them, over several tensors.
fn sample_digests(seed: u8) -> zeroshard_offload::digest::BlockDigests {
    use zeroshard_offload::digest::{BlockDigests, TensorDigests};
    let tensors = (0..70u32).map(|i| {
        let bytes = 2_000_000_000u64 + u64::from(i);
        let blocks = (0..TensorDigests::blocks_for(bytes))
            .map(|k| {
                let mut d = [seed; 32];
                d[..8].copy_from_slice(&(k + u64::from(i) * 1_000_000).to_le_bytes());
                d
            })
            .collect();
        (format!("model.layers.{i}.mlp.up_proj.weight"), TensorDigests { bytes, blocks })
    });
    BlockDigests::from_tensors(tensors).expect("valid")
}

#[tokio::test(flavor = "multi_thread")]
async fn digests_are_stored_in_parts_and_reused_for_the_same_checkpoint_only() {
    init_tracing();
    let etcd = Etcd::start();
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    assert_eq!(m.load_digests("a").await.expect("load"), None);
    let big = sample_digests(1);
    assert!(big.block_count() * 32 > 4_000_000, "several MB: split into parts under 1 MiB");
    m.store_digests("model.safetensors:10:1.0", &big).await.expect("store");
    drop(m);
    // A restarted coordinator reuses them for the same files only.
    let again = membership(&urls).await;
    assert_eq!(again.load_digests("model.safetensors:10:1.0").await.expect("load"), Some(big));
    assert_eq!(again.load_digests("model.safetensors:10:2.0").await.expect("load"), None, "file changed");
    // Replaced by a smaller set: the stale parts beyond it are not read.
    let small = zeroshard_offload::digest::BlockDigests::default();
    again.store_digests("other", &small).await.expect("store");
    assert_eq!(again.load_digests("other").await.expect("load"), Some(small));
    assert_eq!(again.load_digests("model.safetensors:10:1.0").await.expect("load"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_etcd_fails_fast_naming_the_endpoint() {
    init_tracing();
    for url in [format!("http://127.0.0.1:{}", free_port()), "http://10.255.255.1:2379".to_string()] {
        let started = Instant::now();
        let err =
            EtcdMembership::connect(std::slice::from_ref(&url), "test", TTL).await.err().expect("fails");
        assert!(err.to_string().contains(&url), "{err}");
        let err = EtcdRegistrar::connect(std::slice::from_ref(&url), "test", TTL).await.err().expect("fails");
        assert!(err.to_string().contains(&url), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_register_again_after_etcd_restarts() {
    init_tracing();
    let mut etcd = Etcd::start();
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    let MemberWatch { mut events, .. } = m.watch().await.expect("watch");
    let id = registrar(&urls).await.register(announce(5001)).await.expect("register");
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, MemberEvent::Joined(member(id, 5001)));

    // Down long enough for the keep-alive and the watch to notice.
    etcd.stop(0);
    tokio::time::sleep(2 * TTL).await;
    etcd.restart(0);

    // Several TTLs later the worker is still (or again) a member: its
    // keep-alive resumed or it registered again.
    let mut state = BTreeMap::from([(WorkerId(id), member(id, 5001))]);
    drain(&mut state, &mut events, 3 * TTL).await;
    assert_eq!(state.get(&WorkerId(id)), Some(&member(id, 5001)), "the watch's view: {state:?}");
    assert_eq!(m.watch().await.expect("watch").members, vec![member(id, 5001)]);

    // The old watch still follows: a new worker shows up on it.
    let id2 = registrar(&urls).await.register(announce(5002)).await.expect("register");
    assert_eq!(id2, id + 1, "the id counter survived the restart");
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, MemberEvent::Joined(member(id2, 5002)));
}

/// Registers through a new registrar while the cluster may be electing a new
/// leader (one member was just stopped: on 2 busy cores an election can take
/// longer than one request's 3 s deadline), retrying for at most 20 s.
async fn register_during_election(endpoints: &[String], a: Announce) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let r = EtcdRegistrar::connect(endpoints, "test", TTL).await.map_err(|e| e.to_string())?;
            Arc::new(r).register(a.clone()).await.map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(id) => return id,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("registering with a member down: {e}; again")
            }
            Err(e) => panic!("register with a member down, for 20 s: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_member_cluster_keeps_working_with_one_member_stopped() {
    init_tracing();
    let mut etcd = Etcd::start_cluster(3);
    let urls = etcd.client_urls();
    let m = membership(&urls).await;
    let MemberWatch { mut events, .. } = m.watch().await.expect("watch");
    let id1 = registrar(&urls).await.register(announce(5001)).await.expect("register");
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, MemberEvent::Joined(member(id1, 5001)));

    // Each member in turn, so that one of them held the watch and keep-alive streams.
    let mut expected = BTreeMap::from([(WorkerId(id1), member(id1, 5001))]);
    let mut state = expected.clone();
    for stopped in 0..3 {
        etcd.stop(stopped);
        let port = 5002 + stopped as u16;
        let id = register_during_election(&urls, announce(port)).await;
        expected.insert(WorkerId(id), member(id, port));
        drain(&mut state, &mut events, TTL + Duration::from_secs(1)).await;
        assert_eq!(state, expected, "member {stopped} stopped: the watch's view");
        m.store_plan(&sample_plan(stopped as u64 + 1)).await.expect("store with a member down");
        etcd.restart(stopped);
    }
    assert_eq!(m.watch().await.expect("watch").members, expected.into_values().collect::<Vec<_>>());
    assert_eq!(m.load_plan().await.expect("load"), Some(sample_plan(3)));
}
