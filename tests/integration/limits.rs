//! Bounded under hostile input and overload, through the real binary: prompts
//! too large to tokenize, more requests than the cluster holds, a request a
//! worker cannot run amid others it can, bytes that are not a message, and a
//! storm of short-lived registrations. Each gets its own clear status while
//! everything admitted stays exactly the references.

use std::time::{Duration, Instant};

use crate::common::cluster::{children_of, Cluster};
use crate::common::*;
use tonic::Code;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::inference_client::InferenceClient;

fn stories() -> String {
    model("stories260K").to_str().expect("utf-8").to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn http(endpoint: &str) -> String {
    endpoint.replace("grpc://", "http://")
}

async fn client(endpoint: &str) -> InferenceClient<tonic::transport::Channel> {
    InferenceClient::connect(http(endpoint)).await.expect("connect to the coordinator")
}

fn request(prompt: pb::generate_request::Prompt, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(pb::SamplingParams {
            max_new_tokens: Some(max_new),
            ignore_eos: true,
            ..Default::default()
        }),
        stop: vec![],
    }
}

fn text(t: &str) -> pb::generate_request::Prompt {
    pb::generate_request::Prompt::Text(t.into())
}

fn ids(ids: &[u32]) -> pb::generate_request::Prompt {
    pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.to_vec() })
}

/// `generate` in one process (no cluster) for each prompt: their new tokens.
fn expected(prompts: &[Vec<u32>], max_new: u32) -> Vec<Vec<u32>> {
    let (dir, max_new) = (stories(), max_new.to_string());
    let args: Vec<String> = prompts.iter().flat_map(|p| ["--prompt-ids".to_string(), ids_arg(p)]).collect();
    let mut all = vec!["generate", "--model", &dir, "--max-new-tokens", &max_new, "--ignore-eos", "--json"];
    all.extend(args.iter().map(String::as_str));
    run_json(&all).iter().map(|v| ids_of(&v["token_ids"])).collect()
}

/// (VmRSS, VmHWM) of `pid`, in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Two 4 MB prompts at once are refused by their size, before any
/// tokenization, while an unrelated stream keeps its pace.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn huge_prompts_are_refused_before_tokenizing_and_a_running_stream_keeps_its_pace() {
    let mut up = bin();
    up.env("ZEROSHARD_FAULT_STEP_DELAY_MS", "15");
    let c = Cluster::up_with(up, &["--model", &stories(), "--workers", "2", "--insecure"]);
    let want = expected(&[vec![1, 403, 407, 261, 378]], 150).remove(0);
    runtime().block_on(async {
        let mut streaming = client(&c.endpoint).await;
        let mut s = streaming
            .generate_stream(request(ids(&[1, 403, 407, 261, 378]), 150))
            .await
            .expect("stream")
            .into_inner();
        let first = s.message().await.expect("first chunk").expect("a chunk");
        let (rss_before, _) = rss_mb(c.pid());
        let huge = "Once upon a time ".repeat(4_000_000 / 17); // ~4 MB
        let endpoint = c.endpoint.clone();
        let attack = tokio::spawn(async move {
            let started = Instant::now();
            let calls = (0..2).map(|_| {
                let (endpoint, huge) = (endpoint.clone(), huge.clone());
                async move { client(&endpoint).await.generate(request(text(&huge), 4)).await }
            });
            let results = futures::future::join_all(calls).await;
            (results, started.elapsed())
        });
        let mut tokens = first.token_ids;
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        while let Some(chunk) = s.message().await.expect("the stream never fails") {
            worst = worst.max(last.elapsed());
            last = Instant::now();
            tokens.extend(chunk.token_ids);
        }
        assert_eq!(tokens, want, "the stream running beside the attack differs");
        let (results, took) = attack.await.expect("attack task");
        for r in results {
            let e = r.expect_err("a 4 MB prompt must be refused");
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(
                e.message().contains("bytes of text, more than the limit")
                    && e.message().contains("--max-prompt-bytes"),
                "refused by its size, before tokenizing: {}",
                e.message()
            );
        }
        let (rss_after, peak) = rss_mb(c.pid());
        eprintln!(
            "two 4 MB prompts refused in {took:?}; the stream beside them: longest gap {worst:?} \
             (15 ms steps); coordinator RSS {rss_before:.0} → {rss_after:.0} MB (peak {peak:.0} MB)"
        );
    });
}

/// 500 requests of 512 tokens at once against 2 workers that run 64
/// sequences each and a queue of 128: every admitted request is exact, the
/// rest are refused at once with RESOURCE_EXHAUSTED; no worker ever runs more
/// than its cap or reserves more than its KV budget.
#[test]
fn five_hundred_requests_are_queued_or_refused_and_every_admitted_one_is_exact() {
    const REQUESTS: usize = 500;
    const NEW: u32 = 32;
    // Four long prompts: stories the model tells itself, 480 tokens each.
    let openings: Vec<Vec<u32>> =
        [[1, 403, 407, 261, 378], [1, 365, 412, 261, 378], [1, 403, 407, 280, 291], [1, 365, 333, 261, 378]]
            .iter()
            .map(|p| p.to_vec())
            .collect();
    let stories_480: Vec<Vec<u32>> =
        openings.iter().zip(expected(&openings, 475)).map(|(p, t)| [p.clone(), t].concat()).collect();
    let want = expected(&stories_480, NEW);
    let c = Cluster::up(&[
        "--model",
        &stories(),
        "--workers",
        "2",
        "--insecure",
        "--max-active-sequences",
        "64",
        "--max-queued-requests",
        "128",
    ]);
    let workers = children_of(c.pid());
    assert_eq!(workers.len(), 2, "up runs two workers");
    let started = Instant::now();
    let (ok, refused, worst_refusal, peaks) = runtime().block_on(async {
        // Watch the cluster meanwhile: what it runs, queues and reserves.
        let endpoint = c.endpoint.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let watcher = tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let (mut active, mut queued, mut over_budget) = (0u32, 0u32, Vec::new());
            while !*stop_rx.borrow() {
                if let Ok(s) = c.cluster_status(pb::ClusterStatusRequest {}).await {
                    let s = s.into_inner();
                    queued = queued.max(s.queued_requests);
                    for w in &s.workers {
                        active = active.max(w.active_sequences);
                        if w.kv_reserved_bytes > w.kv_cache_bytes {
                            over_budget.push((w.id, w.kv_reserved_bytes, w.kv_cache_bytes));
                        }
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), stop_rx.changed()).await;
            }
            (active, queued, over_budget)
        });
        // Five connections (a connection carries at most ~200 streams at once).
        let mut channels = Vec::new();
        for _ in 0..5 {
            channels.push(client(&c.endpoint).await);
        }
        let calls = (0..REQUESTS).map(|i| {
            let mut ch = channels[i % channels.len()].clone();
            let prompt = stories_480[i % stories_480.len()].clone();
            async move {
                let t = Instant::now();
                (i, ch.generate(request(ids(&prompt), NEW)).await, t.elapsed())
            }
        });
        let results = futures::future::join_all(calls).await;
        let _ = stop_tx.send(true);
        let peaks = watcher.await.expect("watcher");
        let (mut ok, mut refused, mut worst_refusal) = (0, 0, Duration::ZERO);
        for (i, r, took) in results {
            match r {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    assert_eq!(resp.token_ids, want[i % want.len()], "admitted request {i} differs");
                    ok += 1;
                }
                Err(e) if e.code() == Code::ResourceExhausted => {
                    assert!(e.message().contains("--max-queued-requests 128"), "{}", e.message());
                    refused += 1;
                    worst_refusal = worst_refusal.max(took);
                }
                Err(e) => panic!("request {i}: unexpected {e:?}"),
            }
        }
        (ok, refused, worst_refusal, peaks)
    });
    let took = started.elapsed();
    let (active, queued, over_budget) = peaks;
    let s = status(&c.endpoint);
    let rss: Vec<(f64, f64)> = workers.iter().map(|p| rss_mb(*p)).collect();
    let kv: Vec<f64> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["kv_cache_bytes"].as_f64().unwrap_or(0.0) / 1e6)
        .collect();
    eprintln!(
        "{REQUESTS} requests × 512 tokens: {ok} admitted and exact, {refused} refused (the slowest refusal \
         took {worst_refusal:?}), all done in {took:?}; at most {active} sequences on a worker, {queued} queued; \
         queue wait {:.0} ms at most; worker RSS now/peak {rss:?} MB; KV budgets {kv:?} MB (each sequence \
         reserves 511 tokens × 1280 B = 0.65 MB)",
        s["queue_ms_max"].as_f64().unwrap_or(0.0)
    );
    assert_eq!(ok + refused, REQUESTS);
    assert!(refused > 0, "500 requests against 2 × 64 running + 128 queued: none refused");
    assert!(ok >= 128, "fewer admitted than the cluster runs at once: {ok}");
    assert!(active <= 64, "a worker ran {active} sequences, over --max-active-sequences 64");
    assert!(queued <= 128, "{queued} requests queued, over --max-queued-requests 128");
    assert!(over_budget.is_empty(), "KV reservations over budget: {over_budget:?}");
    assert_eq!(s["requests_rejected_total"].as_u64(), Some(refused as u64), "{s}");
}

/// A `RunSequence` a worker cannot run (nothing left to generate; a token
/// outside the vocabulary) fails alone with INVALID_ARGUMENT; the sequences
/// running beside it on that worker finish exactly.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_bad_sequence_fails_alone_and_the_batch_goes_on() {
    let mut up = bin();
    up.env("ZEROSHARD_FAULT_STEP_DELAY_MS", "15");
    let c = Cluster::up_with(up, &["--model", &stories(), "--workers", "1", "--insecure"]);
    let prompt = vec![1, 403, 407, 261, 378];
    let want = expected(std::slice::from_ref(&prompt), 80).remove(0);
    let s = status(&c.endpoint);
    let (epoch, address) = (
        s["epoch"].as_u64().expect("epoch"),
        s["workers"][0]["address"].as_str().expect("address").to_string(),
    );
    runtime().block_on(async {
        let running = (0..3).map(|_| {
            let endpoint = c.endpoint.clone();
            let prompt = prompt.clone();
            tokio::spawn(async move {
                client(&endpoint)
                    .await
                    .generate(request(ids(&prompt), 80))
                    .await
                    .map(|r| r.into_inner().token_ids)
            })
        });
        let running: Vec<_> = running.collect();
        tokio::time::sleep(Duration::from_millis(300)).await; // they are stepping now
        let mut worker = zeroshard_proto::v1::worker_client::WorkerClient::connect(address.clone())
            .await
            .expect("connect to the worker");
        let bad = [
            // Its generated tokens already reach max_new_tokens.
            (vec![1, 403], vec![5; 10], 10, "nothing to generate", None),
            // A token outside the 512-token vocabulary.
            (vec![1, 100_000], vec![], 10, "outside the vocabulary", None),
            // Scoring from past the prompt's end.
            (vec![1, 403], vec![], 1, "scoring from position 5", Some(5)),
        ];
        for (prompt_ids, generated, max_new, why, score_from) in bad {
            let call = worker
                .run_sequence(pb::RunSequenceRequest {
                    sequence_id: 7_000_000
                        + max_new as u64
                        + generated.len() as u64
                        + prompt_ids.len() as u64 * 100,
                    epoch,
                    prompt_token_ids: prompt_ids,
                    generated_token_ids: generated,
                    sampling: Some(pb::SamplingParams {
                        max_new_tokens: Some(max_new),
                        ..Default::default()
                    }),
                    score: score_from
                        .map(|from_position| pb::ScoreRequest { from_position, ..Default::default() }),
                })
                .await;
            let e = match call {
                Err(e) => e,
                Ok(s) => s.into_inner().message().await.expect_err("the bad sequence must fail"),
            };
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains(why), "{}", e.message());
        }
        for r in running {
            assert_eq!(r.await.expect("task").expect("a good sequence beside a bad one"), want);
        }
    });
    assert_eq!(status(&c.endpoint)["sequences_resumed_total"], 0, "a good sequence was interrupted");
}

/// Raw bytes as a gRPC message (for bodies that are not a valid message).
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Bytes that are not a `GenerateRequest` (truncated protobuf; a prompt that
/// is not UTF-8) are the caller's fault: INVALID_ARGUMENT, and the cluster
/// serves the next request exactly.
#[test]
fn malformed_messages_are_invalid_argument() {
    let c = Cluster::up(&["--model", &stories(), "--workers", "1", "--insecure"]);
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(http(&c.endpoint))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/zeroshard.v1.Inference/Generate");
        let bodies: [(&str, Vec<u8>); 3] = [
            // Field 1 (text), length 5, but only 2 bytes follow.
            ("truncated", vec![0x0a, 0x05, b'h', b'i']),
            // Field 1 (text) holding bytes that are not UTF-8.
            ("not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
            // A wire type that does not exist.
            ("bad wire type", vec![0x0f, 0x01]),
        ];
        for (what, body) in bodies {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.expect("ready");
            let e = grpc
                .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(body), path.clone(), RawCodec)
                .await
                .expect_err("a malformed message must be refused");
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
            assert!(e.message().contains("malformed message"), "{what}: {}", e.message());
        }
        // Values the server checks itself, named by field.
        let mut bad_top_p = request(ids(&[1, 403, 407]), 8);
        bad_top_p.sampling.as_mut().expect("sampling").top_p = Some(0.0);
        let mut bad_bias = request(ids(&[1, 403, 407]), 8);
        bad_bias.sampling.as_mut().expect("sampling").logit_bias.insert(9999, 1.0);
        let mut big_bias = request(ids(&[1, 403, 407]), 8);
        big_bias.sampling.as_mut().expect("sampling").logit_bias.insert(5, 101.0);
        for (r, needle) in [(bad_top_p, "top_p"), (bad_bias, "token 9999"), (big_bias, "±100")] {
            let e = client(&c.endpoint).await.generate(r).await.expect_err("refused");
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        }
        let ok = client(&c.endpoint).await.generate(request(ids(&[1, 403, 407]), 8)).await.expect("served");
        assert_eq!(ok.into_inner().token_ids, expected(&[vec![1, 403, 407]], 8).remove(0));
    });
}

/// 30 registrations in 2 s, each leaving again a moment later (a crash-looping
/// pod, a misconfigured script): the cluster re-plans at most a couple of
/// times, not once per event, and serves exactly afterwards.
#[test]
fn a_storm_of_short_lived_registrations_yields_few_replans() {
    let c = Cluster::up(&["--model", &stories(), "--workers", "2", "--insecure"]);
    let before = status(&c.endpoint);
    runtime().block_on(async {
        let mut control = zeroshard_proto::v1::control_client::ControlClient::connect(http(&c.endpoint))
            .await
            .expect("connect");
        let started = Instant::now();
        for i in 0..30u16 {
            let r = control
                .register_worker(pb::RegisterWorkerRequest {
                    address: format!("http://127.0.0.1:{}", 9 + i),
                    device: "cpu".into(),
                    memory_bytes: 1 << 30,
                    worker_id: 0,
                })
                .await
                .expect("registered")
                .into_inner();
            tokio::time::sleep(Duration::from_millis(40)).await;
            control
                .leave(pb::LeaveRequest { worker_id: r.worker_id, reason: "short-lived".into() })
                .await
                .expect("left");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        eprintln!("30 registrations and departures in {:?}", started.elapsed());
    });
    std::thread::sleep(Duration::from_secs(3)); // settle
    let after = status(&c.endpoint);
    let loads: Vec<u64> = after["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["loads_total"].as_u64().unwrap_or(0))
        .collect();
    eprintln!(
        "re-plan storm: epoch {} → {}, loads_total per worker {loads:?}",
        before["epoch"], after["epoch"]
    );
    assert_eq!(after["workers"].as_array().map(Vec::len), Some(2), "{after}");
    assert!(after["epoch"].as_u64() <= Some(3), "the storm re-planned too often: {after}");
    assert!(loads.iter().all(|n| *n <= 3), "workers reloaded their ranges {loads:?} times");
    let want = expected(&[vec![1, 403, 407]], 8).remove(0);
    let got = runtime()
        .block_on(async { client(&c.endpoint).await.generate(request(ids(&[1, 403, 407]), 8)).await });
    assert_eq!(got.expect("served after the storm").into_inner().token_ids, want);
}

/// Raises this test process's open-file limit to at least `needed` (soft up
/// to hard); false when the hard limit is lower.
fn raise_own_open_files(needed: u64) -> bool {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_max < needed {
            return false;
        }
        if lim.rlim_cur < needed {
            lim.rlim_cur = lim.rlim_max;
            return libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0;
        }
    }
    true
}

/// Issue 31 item 3: 1,100 connections that each send half a request head and
/// wait, against `up` held to 1,024 open files (soft and hard: it cannot raise
/// them). gRPC `query` and `status` and a real HTTP request sent after them are
/// served at once, and every half-open connection is closed within the
/// header timeout (10 s; most at once, to make room).
#[test]
fn a_flood_of_half_open_http_connections_leaves_both_fronts_served() {
    use std::io::{Read, Write};
    const FLOOD: usize = 1_100;
    if !raise_own_open_files(FLOOD as u64 + 200) {
        eprintln!("SKIPPED: this test process may not open {} files (hard limit)", FLOOD + 200);
        return;
    }
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_zeroshard"))
        .env("ZEROSHARD_PLACEMENT", "gather")
        .env("ZEROSHARD_AUDIT_FRACTION", "1");
    let mut c =
        Cluster::up_with(cmd, &["--model", &stories(), "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let addr = base.strip_prefix("http://").expect("http://").to_string();
    // A body that never arrives is answered 408 after 30 s.
    let slow_body = {
        let (addr, auth) = (addr.clone(), auth.clone());
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\"")
                .expect("send");
            let sent = Instant::now();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            (out, sent.elapsed())
        })
    };
    let started = Instant::now();
    let mut flood: Vec<std::net::TcpStream> = (0..FLOOD)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: flood\r\nContent-Ty").expect("half a head");
            s
        })
        .collect();
    let opened = started.elapsed();

    let t = Instant::now();
    let q =
        query(&c.endpoint, &["--prompt", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0"]);
    assert_eq!(q["token_ids"].as_array().map(Vec::len), Some(8), "{q}");
    let s = status(&c.endpoint);
    assert_eq!(s["ready"], true, "{s}");
    let grpc = t.elapsed();
    let t = Instant::now();
    let req = r#"{"model":"stories260K","prompt":"Once upon a time","max_tokens":8,"temperature":0}"#;
    let (code, body) = crate::openai::http(&base, "POST", "/v1/completions", Some(req), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let served = t.elapsed();

    // Every flood connection is closed by the server: at once when evicted
    // for a newer one, else at the header timeout.
    let deadline = started + Duration::from_secs(20);
    let mut closed = 0;
    for s in &mut flood {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).expect("timeout");
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(_) => closed += 1, // EOF (or a refusal) from the server
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(_) => {}
        }
    }
    let all_closed = started.elapsed();
    eprintln!(
        "{FLOOD} half-open connections opened in {opened:?}; query + status answered in {grpc:?}, \
         a completion in {served:?}; {closed} closed by the server within {all_closed:?}"
    );
    assert_eq!(closed, FLOOD, "connections left open after {all_closed:?}");
    drop(flood);
    // And the front still serves.
    let (code, body) = crate::openai::http(&base, "POST", "/v1/completions", Some(req), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let (answer, after) = slow_body.join().expect("the slow body");
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("did not arrive within 30 s"), "{answer}");
    assert!(after >= Duration::from_secs(29) && after < Duration::from_secs(40), "{after:?}");
}
