//! The ZeRO-3 cluster through the real binary: `up` with N workers on loopback,
//! `query` and `status` against it.
use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::cluster::Cluster;
use crate::common::*;
use serde_json::Value;

const FAMILY: &[&str] = &[
    "llama-gqa-tied",
    "llama-rope-scaled",
    "llama-sharded-bf16",
    "llama-f16",
    "mistral",
    "qwen2",
    "gpt2",
    "bloom",
];

fn path(p: &std::path::Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Every ref through `up --workers n`: stories260K text prompts and each
/// Llama-family fixture's id prompts, greedy tokens exact (and, for stories,
/// the text).
fn refs_through_cluster(n: usize) {
    let n_arg = n.to_string();
    let stories = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    let c = Cluster::up(&["--model", &path(&model("stories260K")), "--workers", &n_arg]);
    // Default settings: mutual TLS between every member (ephemeral CA); `query`
    // finds the client credentials `up` left for the endpoint.
    assert!(c.endpoint.starts_with("grpcs://"), "{}", c.endpoint);
    for w in status(&c.endpoint)["workers"].as_array().expect("workers") {
        assert!(w["address"].as_str().is_some_and(|a| a.starts_with("https://")), "{w}");
    }
    for case in stories["cases"].as_array().expect("cases") {
        let out = query(&c.endpoint, &greedy("--prompt", case["prompt"].as_str().expect("prompt"), "48"));
        assert_eq!(ids_of(&out["prompt_token_ids"]), ids_of(&case["input_ids"]), "N={n} {}", case["name"]);
        assert_eq!(ids_of(&out["token_ids"]), ids_of(&case["new_token_ids"]), "N={n} {}", case["name"]);
        assert_eq!(out["text"], crate::common::completion_text(case), "N={n} {}", case["name"]);
    }
    drop(c);
    for name in FAMILY {
        let refs = read_json(&shared().join(format!("refs/arch/{name}.json")));
        // A low threshold partitions even the small fixtures' fused and
        // transposed tensors (GPT-2 c_attn, BLOOM query_key_value).
        let c = Cluster::up(&[
            "--model",
            &path(&model(&format!("fixtures/{name}"))),
            "--workers",
            &n_arg,
            "--persistence-threshold-bytes",
            "256",
        ]);
        for p in refs["prompts"].as_array().expect("prompts") {
            let want = ids_of(&p["new_token_ids"]);
            let out = query(
                &c.endpoint,
                &greedy("--prompt-ids", &ids_arg(&ids_of(&p["input_ids"])), &want.len().to_string()),
            );
            assert_eq!(ids_of(&out["token_ids"]), want, "N={n} {name}/{}", p["name"]);
        }
    }
}

#[test]
fn refs_through_one_worker() {
    refs_through_cluster(1);
}

#[test]
fn refs_through_two_workers() {
    refs_through_cluster(2);
}

#[test]
fn refs_through_three_workers() {
    refs_through_cluster(3);
}

#[test]
fn refs_through_four_workers() {
    refs_through_cluster(4);
}

#[test]
fn query_equals_generate_with_sampling() {
    let dir = path(&model("stories260K"));
    let c = Cluster::up(&["--model", &dir, "--workers", "3"]);
    let flags = [
        "--prompt",
        "Tom and his mom",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "11",
        "--max-new-tokens",
        "40",
    ];
    let q = query(&c.endpoint, &flags);
    let mut g_args = vec!["generate", "--model", dir.as_str(), "--json"];
    g_args.extend_from_slice(&flags);
    let g = run_json(&g_args).remove(0);
    assert_eq!(q["token_ids"], g["token_ids"]);
    assert_eq!(q["text"], g["text"]);
    assert_eq!(q["finish_reason"], g["finish_reason"]);
}

#[test]
fn status_shows_each_worker_owning_its_share() {
    let dir = model("stories260K");
    let threshold = 4096u64;
    let c = Cluster::up(&[
        "--model",
        &path(&dir),
        "--workers",
        "3",
        "--persistence-threshold-bytes",
        &threshold.to_string(),
    ]);
    // Expected from the checkpoint: tensors ≥ threshold bytes (as f16) are split.
    // Ranges are whole 1 MiB blocks: a worker's share is off by at most one
    // block (or the whole tensor, when smaller) per tensor.
    let (mut partitioned, mut persistent, mut slack) = (0u64, 0u64, 0u64);
    for (_, numel) in tensor_sizes(&dir.join("model.safetensors")) {
        if numel * 2 < threshold {
            persistent += numel * 2;
        } else {
            partitioned += numel * 2;
            slack += (numel * 2).min(1 << 20);
        }
    }
    let s = status(&c.endpoint);
    assert_eq!(s["epoch"], 1);
    assert_eq!(s["ready"], true);
    let workers = s["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 3);
    let mut total = 0;
    for w in workers {
        let owned = w["owned_partitioned_bytes"].as_u64().expect("owned");
        let ideal = partitioned as f64 / 3.0;
        assert!((owned as f64 - ideal).abs() <= slack as f64, "{owned} vs {ideal} ± 1 block per tensor");
        assert_eq!(w["owned_persistent_bytes"].as_u64(), Some(persistent));
        total += owned;
    }
    assert_eq!(total, partitioned, "every partitioned element owned exactly once");
}

/// (name, numel) of every tensor in a safetensors file (f32 or f16).
fn tensor_sizes(file: &std::path::Path) -> Vec<(String, u64)> {
    let bytes = std::fs::read(file).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let numel =
                v["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim")).product();
            (k, numel)
        })
        .collect()
}

#[test]
fn thirty_two_concurrent_streaming_clients_and_a_client_that_leaves() {
    let stories = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    let cases: Vec<Value> = stories["cases"].as_array().expect("cases").clone();
    let c = Cluster::up(&["--model", &path(&model("stories260K")), "--workers", "2"]);
    let children: Vec<(usize, std::process::Child)> = (0..32)
        .map(|i| {
            let case = &cases[i % cases.len()];
            let child = bin()
                .args([
                    "query",
                    "--endpoint",
                    &c.endpoint,
                    "--stream",
                    "--json",
                    "--temperature",
                    "0",
                    "--ignore-eos",
                    "--max-new-tokens",
                    "48",
                    "--prompt",
                    case["prompt"].as_str().expect("prompt"),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn query");
            (i, child)
        })
        .collect();
    for (i, child) in children {
        let out = child.wait_with_output().expect("query output");
        assert!(out.status.success(), "client {i}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let case = &cases[i % cases.len()];
        assert_eq!(ids_of(&v["token_ids"]), ids_of(&case["new_token_ids"]), "client {i}");
        assert_eq!(v["text"], crate::common::completion_text(case), "client {i}");
    }
    // A client that leaves mid-stream frees its sequence.
    let mut leaver = bin()
        .args([
            "query",
            "--endpoint",
            &c.endpoint,
            "--stream",
            "--prompt",
            "Once",
            "--ignore-eos",
            "--max-new-tokens",
            "2000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn query");
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::active_sequences(&status(&c.endpoint)) == 0 {
        assert!(Instant::now() < deadline, "the long sequence never showed up in status");
        std::thread::sleep(Duration::from_millis(20));
    }
    leaver.kill().expect("kill client");
    let _ = leaver.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::active_sequences(&status(&c.endpoint)) != 0 {
        assert!(Instant::now() < deadline, "the departed client's sequence is still active");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pull_workers_match_mapping_workers() {
    let dir = path(&model("fixtures/llama-sharded-bf16"));
    let refs = read_json(&shared().join("refs/arch/llama-sharded-bf16.json"));
    let mapped = Cluster::up(&["--model", &dir, "--workers", "3", "--persistence-threshold-bytes", "256"]);
    let pulled =
        Cluster::up(&["--model", &dir, "--workers", "3", "--persistence-threshold-bytes", "256", "--pull"]);
    for p in refs["prompts"].as_array().expect("prompts") {
        let args = [
            "--prompt-ids",
            &ids_arg(&ids_of(&p["input_ids"])),
            "--temperature",
            "0",
            "--ignore-eos",
            "--max-new-tokens",
            "24",
        ];
        let a = query(&mapped.endpoint, &args);
        let b = query(&pulled.endpoint, &args);
        assert_eq!(a["token_ids"], b["token_ids"]);
        assert_eq!(ids_of(&b["token_ids"]), ids_of(&p["new_token_ids"]));
    }
    assert_eq!(
        status(&pulled.endpoint)["workers"][0]["owned_partitioned_bytes"],
        status(&mapped.endpoint)["workers"][0]["owned_partitioned_bytes"]
    );
}

#[test]
fn bad_requests_get_invalid_argument() {
    let c = Cluster::up(&["--model", &path(&model("stories260K")), "--workers", "2"]);
    for (args, needle) in [
        // Sampling flags are checked by the CLI, named as typed (the server's
        // own check: `limits::malformed_messages_are_invalid_argument`).
        (vec!["--prompt", "Hi", "--top-p=0"], "--top-p"),
        (vec!["--prompt", "Hi", "--temperature=-1"], "--temperature"),
        (vec!["--prompt-ids", "1,2,600"], "vocabulary"),
    ] {
        let mut a = vec!["query", "--endpoint", c.endpoint.as_str()];
        a.extend_from_slice(&args);
        let err = run_err(&a);
        assert!(err.contains("invalid") || err.contains(needle), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn an_empty_prompt_gives_the_same_tokens_from_query_and_generate() {
    let dir = path(&model("stories260K"));
    let c = Cluster::up(&["--model", &dir, "--workers", "2"]);
    let flags = ["--prompt", "", "--max-new-tokens", "16", "--json"];
    let q = query(&c.endpoint, &flags[..4]);
    let mut gen = vec!["generate", "--model", &dir];
    gen.extend_from_slice(&flags);
    let g = run_json(&gen).remove(0);
    assert_eq!(ids_of(&q["prompt_token_ids"]), vec![1], "BOS alone: {q}");
    assert_eq!(q["prompt_token_ids"], g["prompt_token_ids"]);
    assert_eq!(ids_of(&q["token_ids"]), ids_of(&g["token_ids"]));
    assert_eq!(q["text"], g["text"]);
    // A tokenizer that adds no BOS leaves nothing to start from.
    let gpt2 = Cluster::up(&["--model", &path(&model("tiny-random-gpt2")), "--workers", "1"]);
    let err = run_err(&["query", "--endpoint", &gpt2.endpoint, "--prompt", ""]);
    assert!(err.contains("the prompt is empty after tokenization"), "{err}");
}

/// Runs `up` with stderr piped until it is ready, then stops it (SIGTERM);
/// returns what it wrote to stderr.
fn up_stderr(args: &[&str]) -> String {
    let mut child = bin()
        .args(["up", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    let mut pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut s);
        s
    });
    let ready = common::cluster::ready_line(&mut child);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let stderr = reader.join().expect("reader");
    assert!(ready.is_some(), "up was not ready: {stderr}");
    stderr
}

#[test]
fn up_names_each_worker_by_its_id_and_logs_no_colour_to_a_pipe() {
    let stderr = up_stderr(&["--model", &path(&model("stories260K")), "--workers", "2", "-v"]);
    assert!(!stderr.contains("\x1b["), "ANSI escapes in piped logs: {stderr:?}");
    // pid → the id the worker says it registered as (`worker N registered with …`).
    let mut ids = std::collections::HashMap::new();
    let mut prefixed = Vec::new();
    for line in stderr.lines() {
        let Some((prefix, rest)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) else { continue };
        let words: Vec<&str> = prefix.split(' ').collect();
        let (id, pid) = match words.as_slice() {
            ["worker", "pid", pid] => (None, pid.to_string()),
            ["worker", id, "pid", pid] => (Some(id.parse::<u64>().expect("id")), pid.to_string()),
            _ => panic!("a worker's prefix is [worker pid P] or [worker N pid P]: {line}"),
        };
        if let Some(said) = registered_as(rest) {
            ids.insert(pid.clone(), said);
        }
        prefixed.push((id, pid));
    }
    assert_eq!(ids.len(), 2, "both workers log their registration: {stderr}");
    for (id, pid) in &prefixed {
        if let Some(id) = id {
            assert_eq!(
                Some(id),
                ids.get(pid),
                "prefix [worker {id} pid {pid}] vs its registration: {stderr}"
            );
        }
    }
    for (pid, id) in &ids {
        assert!(
            prefixed.iter().any(|(i, p)| p == pid && i == &Some(*id)),
            "no line of pid {pid} prefixed with its id {id}: {stderr}"
        );
    }
}

/// Without `-v` (and RUST_LOG), `up` says what it does in a few lines of its
/// own: no worker's INFO lines, no module paths; the placement it chose is
/// one of them.
#[test]
fn up_is_quiet_unless_asked() {
    let stderr = up_stderr(&["--model", &path(&model("stories260K")), "--workers", "2"]);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() <= 14, "{} lines: {stderr}", lines.len());
    assert!(!stderr.contains("zeroshard_"), "module paths: {stderr}");
    assert!(!stderr.contains("[worker"), "worker lines: {stderr}");
    assert!(stderr.contains("placement"), "the placement it chose: {stderr}");
    assert!(stderr.contains("stopped in"), "{stderr}");
}

/// `… worker N registered with …` (the worker's own log line) → N.
fn registered_as(line: &str) -> Option<u64> {
    let (head, _) = line.split_once(" registered with ")?;
    let mut words = head.rsplit(' ');
    let id = words.next()?.parse().ok()?;
    (words.next()? == "worker").then_some(id)
}

#[test]
fn plain_status_shows_steps_refetched_chunks_and_failovers() {
    let c = Cluster::up(&["--model", &path(&model("stories260K")), "--workers", "2"]);
    query(&c.endpoint, &["--prompt", "Hi", "--max-new-tokens", "8"]);
    // The query's output audit (every one in the tests) steps another worker
    // after the answer: read the table between two equal JSON statuses.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (text, json) = loop {
        let before = status(&c.endpoint);
        let out = run(&["status", "--endpoint", &c.endpoint]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let after = status(&c.endpoint);
        let counts = |s: &Value| -> Vec<Value> {
            let keys = ["steps_total", "rejected_chunks_total", "failovers_total"];
            s["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .flat_map(|w| keys.map(|k| w[k].clone()))
                .collect()
        };
        if counts(&before) == counts(&after) {
            break (String::from_utf8(out.stdout).expect("utf-8"), after);
        }
        assert!(Instant::now() < deadline, "the workers' figures never settled: {after}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().position(|l| l.trim_start().starts_with("id ")).expect("the table's header");
    let workers = json["workers"].as_array().expect("workers");
    let rows = &lines[header + 1..];
    assert_eq!(rows.len(), workers.len(), "{text}");
    // Columns are right-aligned: a value ends where its heading ends.
    for (heading, key) in
        [("steps", "steps_total"), ("refetched", "rejected_chunks_total"), ("fail-overs", "failovers_total")]
    {
        let end = lines[header].find(heading).unwrap_or_else(|| panic!("no {heading} column: {text}"))
            + heading.len();
        for (row, w) in rows.iter().zip(workers) {
            let value = row[..end].split_whitespace().last().expect("a value");
            assert_eq!(value, w[key].to_string(), "{heading} of worker {}: {text}", w["id"]);
        }
    }
    assert!(workers.iter().any(|w| w["steps_total"].as_u64() > Some(0)), "the query ran steps: {json}");
}

#[test]
fn a_request_before_ready_is_unavailable() {
    // A coordinator waiting for 2 workers that never come.
    let mut coord = bin()
        .args([
            "coordinator",
            "--model",
            &path(&model("stories260K")),
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coordinator");
    let stderr = coord.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok);
    let line = lines.find(|l| l.starts_with("coordinator on ")).expect("coordinator announces its address");
    // Keep reading its log (it logs the checkpoint's digests next), as a terminal would.
    std::thread::spawn(move || lines.for_each(drop));
    let addr = line.trim_start_matches("coordinator on ").split(',').next().expect("addr").to_string();
    let err = run_err(&[
        "query",
        "--endpoint",
        &format!("grpc://{addr}"),
        "--prompt",
        "Hi",
        "--retry-for-secs",
        "1",
    ]);
    assert!(err.contains("Unavailable") && err.contains("0 of 2 workers registered"), "{err}");
    let _ = coord.kill();
    let _ = coord.wait();
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn corrupted_chunks_are_refetched_never_used() {
    let dir = path(&model("fixtures/llama-gqa-tied"));
    let refs = read_json(&shared().join("refs/arch/llama-gqa-tied.json"));
    // One chunk of every 3rd fetch each worker serves has a flipped byte under
    // its original checksum.
    let mut cmd = bin();
    cmd.env("ZEROSHARD_FAULT_CORRUPT_EVERY", "3");
    let c =
        Cluster::up_with(cmd, &["--model", &dir, "--workers", "3", "--persistence-threshold-bytes", "256"]);
    for p in refs["prompts"].as_array().expect("prompts") {
        let out = query(&c.endpoint, &greedy("--prompt-ids", &ids_arg(&ids_of(&p["input_ids"])), "24"));
        assert_eq!(ids_of(&out["token_ids"]), ids_of(&p["new_token_ids"]), "{}", p["name"]);
    }
    let rejected: u64 = status(&c.endpoint)["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["rejected_chunks_total"].as_u64().unwrap_or(0))
        .sum();
    assert!(rejected > 0, "the fault injection must have hit some chunks");
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_worker_that_cannot_load_fails_up_and_leaves_no_orphans() {
    let tag = format!("zeroshard-test-{}", std::process::id());
    let mut cmd = bin();
    cmd.env("ZEROSHARD_FAULT_FAIL_LOAD", "true").env("ZEROSHARD_TEST_TAG", &tag);
    let (code, stderr) =
        Cluster::up_fails_with(cmd, &["--model", &path(&model("stories260K")), "--workers", "2"]);
    assert_ne!(code, Some(0), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("error: ") && last.contains("injected fault") && last.contains("could not load"),
        "{stderr}"
    );
    // No process carrying our tag survives `up`.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive = tagged_processes(&tag);
        if alive.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "orphan workers: {alive:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tagged_processes(tag: &str) -> Vec<u32> {
    let needle = format!("ZEROSHARD_TEST_TAG={tag}");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|pid| {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
                    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                    !zombie && String::from_utf8_lossy(&env).split('\0').any(|kv| kv == needle)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_fetch_with_a_stale_epoch_is_failed_precondition() {
    use zeroshard_proto::v1 as pb;
    // Plaintext: this test calls a worker's Shards as a bare client (under mTLS
    // only members may; tests/security.rs covers that).
    let c = Cluster::up(&["--model", &path(&model("stories260K")), "--workers", "2", "--insecure"]);
    let addr = status(&c.endpoint)["workers"][0]["address"].as_str().expect("address").to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut client = pb::shards_client::ShardsClient::connect(addr).await.expect("connect");
        let ranges = vec![pb::TensorRange { tensor: "model.norm.weight".into(), start: 0, end: 8 }];
        let err = client
            .fetch_ranges(pb::FetchRangesRequest { epoch: 99, ranges: ranges.clone(), chunk_bytes: 0 })
            .await
            .expect_err("stale epoch refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("epoch 99"), "{}", err.message());
        // The current epoch serves, and an unknown tensor is NOT_FOUND.
        let mut s = client
            .fetch_ranges(pb::FetchRangesRequest { epoch: 1, ranges, chunk_bytes: 0 })
            .await
            .expect("current epoch")
            .into_inner();
        let chunk = s.message().await.expect("chunk").expect("one chunk");
        assert_eq!(chunk.data.len(), 16);
        assert_eq!(chunk.crc32c, crc32c_of(&chunk.data));
        let bad = vec![pb::TensorRange { tensor: "nope".into(), start: 0, end: 1 }];
        let err = client
            .fetch_ranges(pb::FetchRangesRequest { epoch: 1, ranges: bad, chunk_bytes: 0 })
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    });
}

fn crc32c_of(data: &[u8]) -> u32 {
    zeroshard_offload::shards::checksum(data)
}

#[test]
fn up_keeps_serving_after_a_worker_dies() {
    let c =
        Cluster::up(&["--model", &path(&model("stories260K")), "--workers", "3", "--lease-ttl-secs", "2"]);
    let want = query(&c.endpoint, &["--prompt", "Once upon a time", "--max-new-tokens", "30"]);
    let workers = common::cluster::children_of(c.pid());
    assert_eq!(workers.len(), 3, "three worker processes");
    // A worker that holds partitioned ranges: the survivors no longer cover
    // the plan (one that holds none is only a degraded epoch, no re-plan).
    let before = status(&c.endpoint);
    let holder = before["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["owned_partitioned_bytes"].as_u64() > Some(0))
        .unwrap_or_else(|| panic!("no worker holds partitioned ranges: {before}"));
    let port = holder["address"].as_str().and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse().ok());
    let victim = port
        .and_then(|p| common::cluster::listener_among(&workers, p))
        .unwrap_or_else(|| panic!("which process serves {holder}?"));
    // SAFETY: kill(2) on a worker process of our child.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let got = query(&c.endpoint, &["--prompt", "Once upon a time", "--max-new-tokens", "30"]);
    assert_eq!(got["token_ids"], want["token_ids"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&c.endpoint);
        if s["epoch"] == 2 && s["workers"].as_array().map(Vec::len) == Some(2) && s["ready"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "no re-plan over the 2 survivors: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.stop().success());
}

/// A worker that leaves (`Control.Leave`, what a worker whose device broke
/// calls before it exits) is re-planned around at once, well inside the lease.
#[test]
fn a_worker_that_leaves_is_replanned_around_at_once() {
    use zeroshard_proto::v1 as pb;
    use zeroshard_proto::v1::control_client::ControlClient;

    let stories = path(&model("stories260K"));
    // Plaintext: the test calls Control as the worker would (under mTLS only
    // the worker's own certificate may; tests/security.rs covers that).
    let c = Cluster::up(&["--model", &stories, "--workers", "2", "--lease-ttl-secs", "30", "--insecure"]);
    let before = status(&c.endpoint);
    assert_eq!(before["epoch"], 1, "{before}");
    let id = before["workers"][0]["id"].as_u64().expect("worker id");
    let uri = c.endpoint.replace("grpc://", "http://");
    let left = Instant::now();
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
        let mut client = ControlClient::connect(uri).await.expect("connects");
        client
            .leave(pb::LeaveRequest { worker_id: id, reason: "test".into() })
            .await
            .expect("Leave is accepted");
    });
    // The lease is 30 s: only the Leave can explain a re-plan within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = status(&c.endpoint);
        if s["epoch"].as_u64() >= Some(2) && s["ready"] == true {
            break s;
        }
        assert!(Instant::now() < deadline, "no re-plan within 10 s of Leave: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("Leave: epoch {} ready {:?} after the call", after["epoch"], left.elapsed());
    assert!(after["workers_lost_total"].as_u64() >= Some(1), "{after}");
    // The cluster still answers exactly.
    let want = run_json(&["generate", "--model", &stories, "--prompt", "Once upon a time", "--json"]);
    let got = query(&c.endpoint, &["--prompt", "Once upon a time"]);
    assert_eq!(got["token_ids"], want[0]["token_ids"]);
}

/// `up` whose log reader goes away (its stderr a pipe closed at once, as
/// `up … 2>&1 | head` or a restarting log shipper leave it): every line it
/// writes there fails with EPIPE, and it serves on, exact, and stops cleanly.
#[test]
fn up_outlives_the_reader_of_its_logs() {
    let stories = path(&model("stories260K"));
    let mut child = bin()
        .args(["up", "--listen", "127.0.0.1:0", "--model", &stories, "--workers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    drop(child.stderr.take()); // the reader is gone before the first line
    let endpoint = common::cluster::ready_line(&mut child).expect("ready despite a closed stderr");
    let want = generated_from_ids(&stories, "1,403,407", "24");
    for _ in 0..3 {
        assert_eq!(ids_of(&query(&endpoint, &greedy("--prompt-ids", "1,403,407", "24"))["token_ids"]), want);
    }
    assert!(child.try_wait().expect("try_wait").is_none(), "up died with its log reader");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "up stopped with {status}");
}

/// The `credentials DIR` line `up` prints after its ready line.
fn credentials_line(lines: &std::sync::mpsc::Receiver<String>) -> std::path::PathBuf {
    loop {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("a `credentials` line after `ready`");
        if let Some(rest) = line.strip_prefix("credentials ") {
            return std::path::PathBuf::from(rest.split(" (").next().expect("a folder"));
        }
    }
}

/// The folder of the `--tls-ca` a child of `up` was given (`up`'s temporary
/// credentials).
fn members_credentials(up: u32) -> std::path::PathBuf {
    for pid in common::cluster::children_of(up) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if let Some(i) = args.iter().position(|a| a == "--tls-ca") {
            let ca = std::path::PathBuf::from(&args[i + 1]);
            return ca.parent().expect("a folder").to_path_buf();
        }
    }
    panic!("no child of up {up} was given --tls-ca");
}

/// Issue 31 item 1: the private keys `up` writes go away on every exit it can
/// run, the CA's key never touches the disk, and a start removes what a
/// killed `up` left behind.
#[test]
fn up_leaves_no_keys_behind_and_cleans_up_after_a_killed_one() {
    let stories = path(&model("stories260K"));
    let start = || {
        let mut child = bin()
            .args(["up", "--listen", "127.0.0.1:0", "--model", &stories, "--workers", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn up");
        let (endpoint, lines) = common::cluster::ready_lines(&mut child).expect("ready");
        let bundle = credentials_line(&lines);
        let members = members_credentials(child.id());
        (child, endpoint, bundle, members)
    };
    let signal = |child: &std::process::Child, sig: i32| {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
    };

    // A second stop signal exits at once (143), skipping destructors.
    let (mut child, endpoint, bundle, members) = start();
    assert!(bundle.join("client.key").exists() && members.join("worker-1.key").exists());
    assert!(members.join("ca.pem").exists() && !members.join("ca.key").exists(), "the CA key is on disk");
    assert!(query(&endpoint, &greedy("--prompt-ids", "1,403,407", "4"))["token_ids"].is_array());
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGTERM);
    let status = child.wait().expect("wait");
    assert!(
        !bundle.exists() && !members.exists(),
        "{status}: {} or {} left",
        bundle.display(),
        members.display()
    );

    // A killed `up` (SIGKILL runs nothing) leaves both; the next start removes them.
    let (mut child, _, bundle, members) = start();
    let workers = common::cluster::children_of(child.id());
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    for pid in workers {
        // SAFETY: kill(2) on the workers of the killed `up` (they may outlive it).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(bundle.exists() && members.exists(), "SIGKILL cannot clean up");
    let (mut next, _, _, _) = start();
    assert!(!bundle.exists() && !members.exists(), "stale credentials survived the next start");
    signal(&next, libc::SIGTERM);
    assert!(next.wait().expect("wait").success());
}
