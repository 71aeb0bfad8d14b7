//! Fleets that survive, through the real binary and real etcd: a worker
//! killed (SIGKILL) or hung (SIGSTOP) mid-stream, replicated shards, a
//! coordinator restart, etcd down and back, and a soak of random kills.
use crate::common;

use std::time::{Duration, Instant};

use crate::common::etcd::Etcd;
use crate::common::fleet::{Fleet, FETCH_TIMEOUT_MS};
use crate::common::*;
use serde_json::Value;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::inference_client::InferenceClient;

/// Tokens of the long greedy stream the tests disturb.
const LONG: u32 = 200;
/// Worker step delay (test hook) that makes LONG tokens take ~LONG × 15 ms.
const STEP_DELAY: &str = "15";
const PROMPT: &str = "Once upon a time";

fn stories() -> String {
    model("stories260K").to_str().expect("utf-8").to_string()
}

/// What `generate` (one process, no cluster) produces for `prompt`, greedy.
fn expected(prompt: &str, max_new: u32) -> Vec<u64> {
    expected_with(prompt, max_new, &[])
}

/// The same with extra sampling flags.
fn expected_with(prompt: &str, max_new: u32, sampling: &[&str]) -> Vec<u64> {
    let (max_new, dir) = (max_new.to_string(), stories());
    let mut args = vec![
        "generate",
        "--model",
        &dir,
        "--prompt",
        prompt,
        "--max-new-tokens",
        &max_new,
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(sampling);
    let out = run_json(&args);
    out[0]["token_ids"].as_array().expect("token_ids").iter().map(|v| v.as_u64().expect("id")).collect()
}

/// One streamed request: its tokens and the gaps between chunks.
struct Streamed {
    tokens: Vec<u64>,
    gaps: Vec<Duration>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn client(endpoint: &str) -> InferenceClient<tonic::transport::Channel> {
    let url = endpoint.replace("grpc://", "http://");
    InferenceClient::connect(url).await.expect("connect to the coordinator")
}

fn request(prompt: &str, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        sampling: Some(pb::SamplingParams {
            max_new_tokens: Some(max_new),
            ignore_eos: true,
            ..Default::default()
        }),
        stop: vec![],
    }
}

/// Streams `prompt`; calls `during` once the first tokens arrived.
async fn stream(endpoint: &str, prompt: &str, max_new: u32, during: impl FnOnce()) -> Streamed {
    stream_request(endpoint, request(prompt, max_new), during).await
}

/// Streams `req`; calls `during` once the first tokens arrived.
async fn stream_request(endpoint: &str, req: pb::GenerateRequest, during: impl FnOnce()) -> Streamed {
    let mut c = client(endpoint).await;
    let mut s = c.generate_stream(req).await.expect("stream starts").into_inner();
    let mut out = Streamed { tokens: Vec::new(), gaps: Vec::new() };
    let mut during = Some(during);
    let mut last = Instant::now();
    let mut finished = false;
    while let Some(chunk) = s.message().await.expect("the stream never fails") {
        out.gaps.push(last.elapsed());
        last = Instant::now();
        out.tokens.extend(chunk.token_ids.iter().map(|&t| u64::from(t)));
        if out.tokens.len() >= 20 {
            if let Some(f) = during.take() {
                f();
            }
        }
        finished |= chunk.finish_reason != 0;
    }
    assert!(finished, "the stream ended without a finish reason");
    out
}

fn ids(workers: &Value) -> Vec<u64> {
    workers.as_array().expect("workers").iter().map(|w| w["id"].as_u64().expect("id")).collect()
}

/// The worker process running the stream (the one status shows busy).
fn busy_worker(fleet: &Fleet) -> usize {
    fleet.worker_by_activity(true)
}

/// A fleet of `workers` (steps slowed to ~16 ms) streaming `LONG` greedy
/// tokens of `PROMPT`; `during` runs on the fleet once the first tokens arrived.
fn disturbed_stream(workers: usize, during: impl FnOnce(&mut Fleet)) -> (Fleet, Streamed) {
    let fleet = Fleet::start(
        Etcd::start(),
        model("stories260K"),
        workers,
        &[],
        &["--fault-step-delay-ms", STEP_DELAY],
    );
    let endpoint = fleet.endpoint.clone();
    let fleet = std::sync::Mutex::new(fleet);
    let got =
        runtime().block_on(stream(&endpoint, PROMPT, LONG, || during(&mut fleet.lock().expect("fleet"))));
    (fleet.into_inner().expect("fleet"), got)
}

/// Kills (or hangs) the worker running a long greedy stream: the stream
/// completes with exactly the undisturbed tokens, and the survivors own
/// everything under the next epoch.
fn lose_a_worker_mid_stream(hang: bool) {
    let want = expected(PROMPT, LONG);
    let (fleet, got) = disturbed_stream(3, |f| {
        let i = busy_worker(f);
        if hang {
            f.stop_worker(i);
        } else {
            f.kill_worker(i);
        }
    });
    assert_eq!(got.tokens, want, "the disturbed stream differs from an undisturbed run");
    let worst = got.gaps[1..].iter().max().copied().unwrap_or_default();
    eprintln!("{}: longest pause in the stream {worst:?}", if hang { "SIGSTOP" } else { "SIGKILL" });
    let s = fleet.wait_status(Duration::from_secs(30), "epoch 2 on 2 workers", |s| {
        s["epoch"] == 2 && s["ready"] == true && s["workers"].as_array().map(Vec::len) == Some(2)
    });
    let total: u64 = {
        let ws = s["workers"].as_array().expect("workers");
        assert!(ws.iter().all(|w| w["ready"] == true), "{s}");
        ws.iter().map(|w| w["owned_partitioned_bytes"].as_u64().expect("owned")).sum()
    };
    // Each survivor owns half of the partitioned bytes (± one element per tensor).
    for w in s["workers"].as_array().expect("workers") {
        let owned = w["owned_partitioned_bytes"].as_u64().expect("owned") as i64;
        assert!((owned - total as i64 / 2).abs() < 64, "uneven split after re-plan: {s}");
    }
    assert!(s["workers_lost_total"].as_u64() >= Some(1), "{s}");
    // And the cluster still answers exactly.
    let again = runtime().block_on(stream(&fleet.endpoint, PROMPT, 40, || {}));
    assert_eq!(again.tokens, want[..40]);
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_worker_killed_mid_stream_changes_nothing_the_client_sees() {
    lose_a_worker_mid_stream(false);
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_sampled_stream_resumed_elsewhere_continues_its_random_draws() {
    let sampling = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"];
    let want = expected_with(PROMPT, LONG, &sampling);
    let fleet =
        Fleet::start(Etcd::start(), model("stories260K"), 2, &[], &["--fault-step-delay-ms", STEP_DELAY]);
    let fleet = std::sync::Mutex::new(fleet);
    let endpoint = fleet.lock().expect("fleet").endpoint.clone();
    let mut req = request(PROMPT, LONG);
    let p = req.sampling.as_mut().expect("sampling");
    (p.temperature, p.top_p, p.seed) = (Some(0.9), Some(0.95), Some(7));
    let got = runtime().block_on(stream_request(&endpoint, req, || {
        let mut f = fleet.lock().expect("fleet");
        let i = busy_worker(&f);
        f.kill_worker(i);
    }));
    assert_eq!(got.tokens, want, "a resumed sampled sequence drew differently");
    let s = fleet.lock().expect("fleet").status();
    assert!(s["sequences_resumed_total"].as_u64() >= Some(1), "the sequence was not resumed: {s}");
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_hung_worker_is_dropped_at_lease_expiry() {
    lose_a_worker_mid_stream(true);
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn with_two_replicas_a_lost_worker_causes_no_reload() {
    let want = expected(PROMPT, LONG);
    let fleet = Fleet::start(
        Etcd::start(),
        model("stories260K"),
        3,
        &["--replicas", "2", "--persistence-threshold-bytes", "256"],
        &["--fault-step-delay-ms", STEP_DELAY],
    );
    let before = fleet.status();
    assert_eq!(before["replicas"], 2, "{before}");
    let fleet = std::sync::Mutex::new(fleet);
    let endpoint = fleet.lock().expect("fleet").endpoint.clone();
    // Kill the first holder of a range the stream's worker needs: with R = 2
    // over ranks 0..3, rank r holds ranges r and r - 1, and range r + 1 is held
    // first by rank r + 1. The stream's worker fails over to its replica.
    let got = runtime().block_on(stream(&endpoint, PROMPT, LONG, || {
        let mut f = fleet.lock().expect("fleet");
        let busy = busy_worker(&f);
        let s = f.status();
        let ws = s["workers"].as_array().expect("workers");
        let rank = ws
            .iter()
            .position(|w| f.worker_index_by_port(w["address"].as_str().expect("address")) == Some(busy))
            .expect("busy worker in status");
        let next = &ws[(rank + 1) % ws.len()];
        let victim = f.worker_index_by_port(next["address"].as_str().expect("address")).expect("its process");
        f.kill_worker(victim);
    }));
    assert_eq!(got.tokens, want);
    let fleet = fleet.into_inner().expect("fleet");
    let s = fleet.wait_status(Duration::from_secs(20), "2 live workers", |s| {
        s["workers"].as_array().map(Vec::len) == Some(2)
    });
    assert_eq!(s["epoch"], before["epoch"], "no new epoch: {s}");
    for w in s["workers"].as_array().expect("workers") {
        assert_eq!(w["loads_total"], 1, "a survivor reloaded: {s}");
    }
    assert!(
        s["workers"].as_array().expect("workers").iter().any(|w| w["failovers_total"].as_u64() > Some(0)),
        "no gather failed over: {s}"
    );
    let mut gaps = got.gaps[1..].to_vec();
    gaps.sort();
    let (median, worst) = (gaps[gaps.len() / 2], *gaps.last().expect("gaps"));
    let bound = median + Duration::from_millis(FETCH_TIMEOUT_MS);
    eprintln!("replicas 2: median chunk gap {median:?}, longest {worst:?}, bound {bound:?}");
    assert!(worst < bound, "stall {worst:?} above one step ({median:?}) + the fetch timeout");
}

#[test]
fn a_restarted_coordinator_resumes_the_cluster_without_reloading() {
    let want = expected(PROMPT, 40);
    let mut fleet = Fleet::start(Etcd::start(), model("stories260K"), 3, &[], &[]);
    let before = fleet.status();
    fleet.kill_coordinator();
    let restart = Instant::now();
    fleet.start_coordinator();
    eprintln!("coordinator restart: ready again {:?} after start", restart.elapsed());
    let after = fleet.status();
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(ids(&after["workers"]), ids(&before["workers"]), "{after}");
    for w in after["workers"].as_array().expect("workers") {
        assert_eq!(w["loads_total"], 1, "a worker reloaded: {after}");
    }
    let got = runtime().block_on(stream(&fleet.endpoint, PROMPT, 40, || {}));
    assert_eq!(got.tokens, want);
}

#[test]
fn etcd_unreachable_at_start_is_a_clear_error() {
    let dead = format!("http://127.0.0.1:{}", common::etcd::free_port());
    for role in [&["coordinator", "--model", &stories(), "--workers", "1"][..], &["worker"][..]] {
        let mut args: Vec<&str> = role.to_vec();
        args.extend(["--etcd", &dead, "--listen", "127.0.0.1:0"]);
        let start = Instant::now();
        let err = run_err(&args);
        assert!(err.contains("--etcd") && err.contains(&dead), "{role:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}

#[test]
fn etcd_restarted_while_serving() {
    let want = expected(PROMPT, 40);
    let mut fleet = Fleet::start(Etcd::start(), model("stories260K"), 2, &[], &[]);
    let before = fleet.status();
    fleet.etcd.stop(0);
    // Serving does not need etcd.
    let during = runtime().block_on(stream(&fleet.endpoint, PROMPT, 40, || {}));
    assert_eq!(during.tokens, want);
    std::thread::sleep(Duration::from_secs(3));
    fleet.etcd.restart(0);
    // Workers re-register; the cluster keeps its epoch and answers.
    let after = fleet.wait_status(Duration::from_secs(30), "both workers ready", |s| {
        s["ready"] == true
            && s["workers"].as_array().is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["ready"] == true))
    });
    assert_eq!(ids(&after["workers"]), ids(&before["workers"]), "{after}");
    let got = runtime().block_on(stream(&fleet.endpoint, PROMPT, 40, || {}));
    assert_eq!(got.tokens, want);
}

/// 16 clients for about a minute while workers are killed and started again at
/// random, over a three-member etcd with one member stopped half-way: every
/// request completes with the right tokens, and as many complete as were sent.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn soak_random_kills_and_restarts() {
    const CLIENTS: usize = 16;
    const SOAK: Duration = Duration::from_secs(60);
    let prompts = ["Once upon a time", "The cat", "Lily and Tom", "One day"];
    let wants: Vec<Vec<u64>> = prompts.iter().map(|p| expected(p, 24)).collect();
    let fleet =
        Fleet::start(Etcd::start_cluster(3), model("stories260K"), 3, &[], &["--fault-step-delay-ms", "2"]);
    let endpoint = fleet.endpoint.clone();
    let fleet = std::sync::Arc::new(std::sync::Mutex::new(fleet));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let start = Instant::now();
            let mut etcd_stopped = false;
            let mut kills = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2500));
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let mut f = fleet.lock().expect("fleet");
                let live = f.live_workers();
                if live.len() > 1 {
                    f.kill_worker(live[(rng % live.len() as u64) as usize]);
                    kills += 1;
                }
                if live.len() < 4 {
                    f.add_worker();
                }
                if !etcd_stopped && start.elapsed() > SOAK / 2 {
                    f.etcd.stop(1);
                    etcd_stopped = true;
                }
            }
            kills
        })
    };
    let rt = runtime();
    let (sent, done) = rt.block_on(async {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (endpoint, sent, wants) = (endpoint.clone(), sent.clone(), wants.clone());
                tokio::spawn(async move {
                    let mut done = 0usize;
                    let start = Instant::now();
                    let mut client = client(&endpoint).await;
                    let mut i = c;
                    while start.elapsed() < SOAK {
                        let k = i % prompts.len();
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let r =
                            client.generate(request(prompts[k], 24)).await.expect("every request completes");
                        let got: Vec<u64> = r.into_inner().token_ids.iter().map(|&t| u64::from(t)).collect();
                        assert_eq!(got, wants[k], "client {c}, prompt {k}");
                        done += 1;
                        i += 1;
                    }
                    done
                })
            })
            .collect();
        let mut done = 0;
        for t in tasks {
            done += t.await.expect("client task");
        }
        (sent.load(std::sync::atomic::Ordering::Relaxed), done)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = chaos.join().expect("chaos thread");
    let s = fleet.lock().expect("fleet").status();
    eprintln!("soak: {sent} requests sent, {done} completed, {kills} workers killed; status {s}");
    assert_eq!(sent, done);
    assert!(kills >= 5, "the soak killed only {kills} workers");
    assert!(done > CLIENTS, "too few requests to mean anything: {done}");
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_joining_worker_does_not_disturb_running_streams() {
    let want = expected(PROMPT, LONG);
    let (fleet, got) = disturbed_stream(2, |f| {
        f.add_worker();
    });
    assert_eq!(got.tokens, want);
    let s = fleet.wait_status(Duration::from_secs(30), "epoch 2 on 3 workers", |s| {
        s["epoch"] == 2
            && s["workers"].as_array().is_some_and(|w| w.len() == 3 && w.iter().all(|w| w["ready"] == true))
    });
    assert_eq!(s["sequences_resumed_total"], 0, "a running sequence was interrupted: {s}");
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn query_rides_out_a_coordinator_restart_without_repeating_text() {
    let text = run_json(&[
        "generate",
        "--model",
        &stories(),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        &LONG.to_string(),
        "--ignore-eos",
        "--json",
    ])[0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let mut fleet =
        Fleet::start(Etcd::start(), model("stories260K"), 2, &[], &["--fault-step-delay-ms", STEP_DELAY]);
    let mut q = bin()
        .args(["query", "--endpoint", &fleet.endpoint, "--prompt", PROMPT, "--stream", "--ignore-eos"])
        .args(["--max-new-tokens", &LONG.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn query");
    // Let it print part of the text, then restart the coordinator under it.
    let mut stdout = q.stdout.take().expect("stdout");
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut head).expect("the first bytes of the stream");
    fleet.kill_coordinator();
    fleet.start_coordinator();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).expect("the rest");
    assert!(q.wait().expect("query exits").success());
    let printed = String::from_utf8([head.to_vec(), rest].concat()).expect("utf-8");
    assert_eq!(printed.trim_end_matches('\n'), text, "query printed text twice or lost some");
}

/// A step that fails on a worker (an injected, transient backend error in the
/// middle of the forward) fails only that step's sequences: the coordinator
/// resumes them elsewhere with exactly the undisturbed tokens, and the worker
/// stays a member and keeps serving.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_failed_step_fails_its_sequences_and_the_worker_keeps_serving() {
    let want = expected(PROMPT, LONG);
    // Each worker's 300th `linear` call fails once (stories260K: ~36 per step),
    // in the middle of a forward.
    let fault: &[&str] = &["--fault-backend-error-after", "300"];
    let mut fleet = Fleet::start_each(
        Etcd::start(),
        model("stories260K"),
        &["--fault-step-delay-ms", STEP_DELAY],
        &[fault, fault],
    );
    let got = runtime().block_on(stream(&fleet.endpoint, PROMPT, LONG, || {}));
    assert_eq!(got.tokens, want, "a stream through failed steps differs from an undisturbed run");
    let s = fleet.status();
    eprintln!(
        "transient step errors: {} sequence(s) resumed, longest pause {:?}",
        s["sequences_resumed_total"],
        got.gaps[1..].iter().max().copied().unwrap_or_default()
    );
    assert!(s["sequences_resumed_total"].as_u64() >= Some(1), "no step failed: {s}");
    assert_eq!(s["epoch"], 1, "a transient step error must not re-plan: {s}");
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["workers_lost_total"], 0, "{s}");
    for i in 0..2 {
        assert!(fleet.wait_worker_exit(i, Duration::from_millis(100)).is_none(), "worker {i} exited");
    }
    // And both keep answering exactly.
    let again = runtime().block_on(stream(&fleet.endpoint, PROMPT, 40, || {}));
    assert_eq!(again.tokens, want[..40]);
}

/// A fatal step error (what any CUDA error is: the device cannot be trusted
/// again) makes the worker leave the cluster and exit non-zero, instead of
/// staying registered without stepping; its sequences finish exactly on the
/// survivor, which owns everything under the next epoch.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_fatal_step_error_makes_the_worker_leave_and_exit() {
    let want = expected(PROMPT, LONG);
    let mut fleet = Fleet::start_each(
        Etcd::start(),
        model("stories260K"),
        &["--fault-step-delay-ms", STEP_DELAY],
        &[&["--fault-backend-error-after", "300", "--fault-backend-error-fatal"], &[]],
    );
    let endpoint = fleet.endpoint.clone();
    // Several streams at once: least-loaded routing gives the faulty worker some.
    let started = Instant::now();
    let all = runtime().block_on(async {
        let streams = (0..4).map(|_| stream(&endpoint, PROMPT, LONG, || {}));
        futures::future::join_all(streams).await
    });
    for got in &all {
        assert_eq!(got.tokens, want, "a stream resumed after a fatal step error differs");
    }
    let status = fleet.wait_worker_exit(0, Duration::from_secs(30)).expect("the faulty worker exits");
    let worst = all.iter().filter_map(|g| g.gaps[1..].iter().max().copied()).max().unwrap_or_default();
    eprintln!(
        "fatal step error: worker exited with {status} within {:?} of the first request; longest pause {worst:?}",
        started.elapsed()
    );
    assert!(!status.success(), "a worker that left after a fatal error must exit non-zero: {status}");
    let s = fleet.wait_status(Duration::from_secs(30), "one worker left, epoch 2", |s| {
        s["ready"] == true
            && s["workers"].as_array().map(Vec::len) == Some(1)
            && s["epoch"].as_u64() >= Some(2)
    });
    assert!(s["sequences_resumed_total"].as_u64() >= Some(1), "{s}");
    let again = runtime().block_on(stream(&fleet.endpoint, PROMPT, 40, || {}));
    assert_eq!(again.tokens, want[..40]);
}

/// A worker that keeps its lease and answers every RPC but never steps: the
/// sequences sent to it miss their step deadline and resume on the other
/// worker, exactly; none waits for a client deadline.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_worker_that_keeps_its_lease_but_never_steps_loses_its_sequences() {
    let want = expected(PROMPT, 40);
    let fleet = Fleet::start_each_with(
        Etcd::start(),
        model("stories260K"),
        &["--step-deadline-ms", "1500"],
        &[],
        &[&[], &["--fault-hang-after-steps", "0"]],
    );
    let endpoint = fleet.endpoint.clone();
    let started = Instant::now();
    // Several at once: least-loaded routing sends some to the stuck worker.
    let all = runtime().block_on(async {
        futures::future::join_all((0..4).map(|_| stream(&endpoint, PROMPT, 40, || {}))).await
    });
    let took = started.elapsed();
    for got in &all {
        assert_eq!(got.tokens, want, "a stream moved off a stuck worker differs");
    }
    let s = fleet.status();
    let worst = all.iter().filter_map(|g| g.gaps.iter().max().copied()).max().unwrap_or_default();
    eprintln!(
        "stuck worker: {} step deadline(s) missed (floor 1.5 s), 4 streams done in {took:?}, \
         longest wait for a chunk {worst:?}",
        s["step_deadlines_missed_total"]
    );
    assert!(
        s["step_deadlines_missed_total"].as_u64() >= Some(1),
        "no sequence went to the stuck worker: {s}"
    );
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(2), "the stuck worker keeps its lease: {s}");
}

/// A holder SIGSTOPped for 10 s while another worker streams: the streaming
/// worker's gathers from it are abandoned as soon as the next epoch is
/// active (not retried against the stopped holder), so the stream pauses for
/// about the lease TTL, and completes exactly.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_stopped_holder_pauses_other_streams_for_about_the_lease_ttl() {
    let want = expected(PROMPT, LONG);
    let (fleet, got) = disturbed_stream(3, |f| {
        let busy = busy_worker(f);
        let holder = f.live_workers().into_iter().find(|i| *i != busy).expect("another worker");
        let pid = f.worker_pid(holder).expect("live") as i32;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            // SAFETY: kill(2) on our own child (a no-op if it is gone).
            unsafe { libc::kill(pid, libc::SIGCONT) };
        });
    });
    assert_eq!(got.tokens, want, "the stream paused by a stopped holder differs");
    let worst = got.gaps[1..].iter().max().copied().unwrap_or_default();
    eprintln!(
        "SIGSTOP of a holder for 10 s: longest pause in another worker's stream {worst:?} \
         (lease TTL {}s, fetch timeout {FETCH_TIMEOUT_MS} ms)",
        common::fleet::LEASE_TTL_SECS
    );
    let s = fleet.status();
    assert!(s["workers_lost_total"].as_u64() >= Some(1), "the stopped holder was never dropped: {s}");
}

/// SIGTERM to the worker running a stream (what Slurm and Kubernetes send
/// first): it hands the sequence back and leaves; the stream continues on
/// another worker with exactly the undisturbed tokens, not counted as a
/// failure, and the drained worker exits 0.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_sigtermed_worker_drains_its_sequences_and_exits_cleanly() {
    let want = expected(PROMPT, LONG);
    let mut victim = None;
    let (mut fleet, got) = disturbed_stream(3, |f| {
        let i = busy_worker(f);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(f.worker_pid(i).expect("live") as i32, libc::SIGTERM) };
        victim = Some(i);
    });
    assert_eq!(got.tokens, want, "the stream moved off a draining worker differs");
    let i = victim.expect("a worker was drained");
    let status = fleet.wait_worker_exit(i, Duration::from_secs(40)).expect("the drained worker exits");
    let worst = got.gaps[1..].iter().max().copied().unwrap_or_default();
    let s = fleet.status();
    eprintln!(
        "SIGTERM drain: longest pause {worst:?} (steps ~16 ms), worker exited {status}, moved {}, resumed {}",
        s["sequences_moved_total"], s["sequences_resumed_total"]
    );
    assert!(status.success(), "a drained worker exits 0: {status}");
    assert!(s["sequences_moved_total"].as_u64() >= Some(1), "the sequence was not handed back: {s}");
    assert_eq!(s["sequences_resumed_total"], 0, "a drain counted as a failure: {s}");
}

/// SIGTERM to the coordinator mid-stream (what a launcher sends first, here
/// twice within 50 ms, as scancel plus a forwarding parent do): the running
/// stream finishes with exactly the undisturbed tokens, a new request
/// is refused at once with UNAVAILABLE (a client retries elsewhere), and the
/// coordinator exits 0 once the stream has ended.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_sigtermed_coordinator_finishes_its_streams_and_refuses_new_ones() {
    let want = expected(PROMPT, LONG);
    let mut refused = String::new();
    let mut signalled = None;
    let (mut fleet, got) = disturbed_stream(2, |f| {
        f.signal_coordinator(libc::SIGTERM);
        signalled = Some(Instant::now());
        // A launcher that signals every process of a task while a parent
        // forwards the signal delivers two at once: still one drain.
        std::thread::sleep(Duration::from_millis(50));
        f.signal_coordinator(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(100));
        let out = common::run(&[
            "query",
            "--endpoint",
            &f.endpoint,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "4",
            "--retry-for-secs",
            "0",
        ]);
        assert!(!out.status.success(), "a new request was taken while draining");
        refused = String::from_utf8_lossy(&out.stderr).to_string();
    });
    let ended = Instant::now();
    assert_eq!(got.tokens, want, "the stream running through the drain differs");
    assert!(refused.contains("shutting down"), "the new request was not refused as UNAVAILABLE: {refused}");
    let status = fleet.wait_coordinator_exit(Duration::from_secs(10)).expect("the coordinator exits");
    let signalled = signalled.expect("signalled");
    eprintln!(
        "coordinator SIGTERM: the stream ran {:.2} s more and finished; exit {status} {:.2} s after the signal",
        (ended - signalled).as_secs_f64(),
        signalled.elapsed().as_secs_f64()
    );
    assert!(status.success(), "a drained coordinator exits 0: {status}");
}

/// A stream longer than the coordinator's drain time ends with UNAVAILABLE
/// when the time runs out (after the tokens it had), and the coordinator exits 0.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_coordinator_drain_cuts_streams_that_outlast_it() {
    let fleet = Fleet::start(
        Etcd::start(),
        model("stories260K"),
        1,
        &["--drain-timeout-secs", "1"],
        &["--fault-step-delay-ms", STEP_DELAY],
    );
    let want = expected(PROMPT, LONG);
    let endpoint = fleet.endpoint.clone();
    let fleet = std::sync::Mutex::new(fleet);
    let (tokens, error, cut_after) = runtime().block_on(async {
        let mut c = client(&endpoint).await;
        let mut s = c.generate_stream(request(PROMPT, LONG)).await.expect("stream starts").into_inner();
        let mut tokens = Vec::new();
        let mut signalled = None;
        loop {
            match s.message().await {
                Ok(Some(chunk)) => {
                    assert_eq!(chunk.finish_reason, 0, "the stream finished before the cut");
                    tokens.extend(chunk.token_ids.iter().map(|&t| u64::from(t)));
                    if tokens.len() >= 20 && signalled.is_none() {
                        fleet.lock().expect("fleet").signal_coordinator(libc::SIGTERM);
                        signalled = Some(Instant::now());
                    }
                }
                Ok(None) => panic!("the stream ended without the cut's error"),
                Err(e) => break (tokens, e, signalled.expect("signalled").elapsed()),
            }
        }
    });
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("drain time ran out"), "{error:?}");
    assert_eq!(tokens, want[..tokens.len()], "the tokens before the cut differ");
    assert!(tokens.len() < want.len(), "nothing was cut");
    let mut fleet = fleet.into_inner().expect("fleet");
    let status = fleet.wait_coordinator_exit(Duration::from_secs(10)).expect("the coordinator exits");
    eprintln!("coordinator drain of 1 s: the stream was cut {:.2} s after SIGTERM", cut_after.as_secs_f64());
    assert!(status.success(), "{status}");
}

/// Issue 31 item 2: the checkpoint rewritten in place under a serving cluster
/// (`cp other.safetensors model.safetensors`), then a worker killed. Without
/// `--pull` the survivor would load from the new bytes, with it the
/// coordinator would read them for the survivor: neither crashes, no worker
/// is re-admitted in a loop, `status` says why nothing can be served, and a
/// request fails at once saying so.
#[test]
fn a_checkpoint_rewritten_under_the_cluster_is_detected_never_a_crash() {
    let other = std::fs::read(model("stories260K-f16").join("model.safetensors")).expect("the f16 fixture");
    for pull in [false, true] {
        let dir = common::model_dir::copy_model();
        let http = format!("127.0.0.1:{}", crate::common::etcd::free_port());
        let mut coordinator = vec!["--http-listen", http.as_str()];
        if pull {
            coordinator.push("--pull");
        }
        let workers: &[&str] = if pull { &["--pull"] } else { &[] };
        let workers = [workers, &["--fault-step-delay-ms", STEP_DELAY]].concat();
        let mut fleet = Fleet::start(Etcd::start(), dir.path().to_path_buf(), 2, &coordinator, &workers);
        let base = format!("http://{http}");
        assert_eq!(crate::openai::http(&base, "GET", "/health", None, &[]).0, 200);
        let want = expected(PROMPT, 8);
        let q = query(&fleet.endpoint, &["--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0"]);
        assert_eq!(ids_of(&q["token_ids"]), want.iter().map(|&i| i as u32).collect::<Vec<_>>());

        // A long stream runs while the file is rewritten and its worker killed.
        let endpoint = fleet.endpoint.clone();
        let long = LONG.to_string();
        let streaming = std::thread::spawn(move || {
            let started = Instant::now();
            let out = run(&["query", "--endpoint", &endpoint, "--prompt", PROMPT, "--max-new-tokens", &long]);
            (out, started.elapsed())
        });
        let busy = busy_worker(&fleet);
        std::fs::write(dir.path().join("model.safetensors"), &other).expect("rewrite in place");
        fleet.kill_worker(busy);
        let (out, took) = streaming.join().expect("the streaming query");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("changed while in use"), "{err}");
        eprintln!("pull {pull}: the disturbed stream ended with the error after {took:?}");
        assert!(took < Duration::from_secs(LONG as u64 * 15 / 1000 + 10), "the stream waited {took:?}");
        let s = fleet.wait_status(Duration::from_secs(30), "the reason it cannot serve", |s| {
            s["not_ready_reason"].as_str().is_some_and(|r| r.contains("changed while in use"))
        });
        let reason = s["not_ready_reason"].as_str().unwrap_or_default().to_string();
        eprintln!("pull {pull}: {reason}");
        assert_eq!(s["ready"], false, "{s}");
        assert!(reason.contains("model.safetensors") && reason.contains("restart"), "{reason}");
        let (code, body) = crate::openai::http(&base, "GET", "/health", None, &[]);
        assert_eq!(code, 503, "{body}");
        let health: Value = serde_json::from_str(&body).expect("health JSON");
        assert_eq!(health["until_restart"], true, "{body}");
        assert!(health["reason"].as_str().is_some_and(|r| r.contains("changed while in use")), "{body}");

        let start = Instant::now();
        let err =
            run_err(&["query", "--endpoint", &fleet.endpoint, "--prompt", PROMPT, "--max-new-tokens", "4"]);
        assert!(err.contains("changed while in use"), "{err}");
        eprintln!("pull {pull}: a new request refused in {:?}", start.elapsed());
        assert!(start.elapsed() < Duration::from_secs(5), "the request waited {:?}", start.elapsed());

        // No re-admission loop: the survivor is not made to load again and again.
        let lost = s["workers_lost_total"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_secs(6));
        let later = fleet.status();
        assert!(later["workers_lost_total"].as_u64().unwrap_or(0) <= lost + 1, "{s}\n{later}");
        assert_eq!(fleet.wait_coordinator_exit(Duration::from_millis(10)), None, "the coordinator died");
    }
}
