//! The tensor placement through the real binary: `up --placement tensor`
//! (each worker computes a shard of every layer and the group sums
//! activations) answers with `generate`'s greedy tokens over gRPC and HTTP, for
//! every group size the model's KV heads allow and for two groups; a model the
//! workers cannot split so runs gathered and says why; a member killed
//! mid-stream changes nothing the client sees.
use std::time::Duration;

use crate::common::cluster::Cluster;
use crate::common::etcd::Etcd;
use crate::common::fleet::Fleet;
use crate::common::*;
use serde_json::Value;

const PROMPTS: [&str; 2] = ["Once upon a time", "The little dog"];

fn dir(name: &str) -> String {
    model(name).to_str().expect("utf-8").to_string()
}

/// `generate`'s greedy tokens (one process, no cluster).
fn generated(model_dir: &str, prompt: &str, max_new: &str) -> Vec<u32> {
    let mut args = vec!["generate", "--model", model_dir, "--json"];
    args.extend(greedy("--prompt", prompt, max_new));
    ids_of(&run_json(&args)[0]["token_ids"])
}

fn queried(endpoint: &str, prompt: &str, max_new: &str) -> Vec<u32> {
    ids_of(&query(endpoint, &greedy("--prompt", prompt, max_new))["token_ids"])
}

/// Starts `up --placement tensor` with `workers` (and `extra`), checks what
/// status says of the placement, and compares every prompt with `generate`.
fn exact(model_dir: &str, workers: usize, extra: &[&str], placement: &str, degree: u64) -> Cluster {
    exact_under("tensor", model_dir, workers, extra, placement, degree)
}

/// [`exact`] under `--placement flag`.
fn exact_under(
    flag: &str,
    model_dir: &str,
    workers: usize,
    extra: &[&str],
    placement: &str,
    degree: u64,
) -> Cluster {
    let n = workers.to_string();
    let mut args = vec!["--model", model_dir, "--workers", &n, "--placement", flag];
    args.extend_from_slice(extra);
    let c = Cluster::up(&args);
    let s = status(&c.endpoint);
    assert_eq!(
        (s["placement"].as_str(), s["tensor_degree"].as_u64()),
        (Some(placement), Some(degree)),
        "{s}"
    );
    for p in PROMPTS {
        assert_eq!(
            queried(&c.endpoint, p, "48"),
            generated(model_dir, p, "48"),
            "{model_dir}, {workers} workers: {p}"
        );
    }
    c
}

#[test]
fn tensor_groups_answer_with_generates_greedy_tokens() {
    let stories = dir("stories260K");
    // stories260K has 4 KV heads: groups of 1, 2 and 4.
    for workers in [1, 2, 4] {
        exact(&stories, workers, &[], "tensor", workers as u64).stop();
    }
    // Two groups of two: requests at once go to both, each exact.
    let c = exact(&stories, 4, &["--replicas", "2", "--audit-fraction", "1"], "tensor", 2);
    // Each group audits the other's sequences, scored by both of its members.
    assert_audits_pass(&c.endpoint);
    let endpoint = c.endpoint.clone();
    let want: Vec<Vec<u32>> = PROMPTS.iter().map(|p| generated(&stories, p, "64")).collect();
    let runs: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let e = endpoint.clone();
            std::thread::spawn(move || queried(&e, p, "64"))
        })
        .collect();
    let got: Vec<Vec<u32>> = runs.into_iter().map(|r| r.join().expect("query")).collect();
    assert_eq!(got, want);
    let s = status(&c.endpoint);
    let stepped =
        s["workers"].as_array().expect("workers").iter().filter(|w| w["steps_total"].as_u64() > Some(0));
    assert_eq!(stepped.count(), 4, "every member of both groups stepped: {s}");
    c.stop();
    // Architecture fixtures with 2 KV heads (GQA with tied embeddings, Llama-3
    // rope scaling, Qwen2's q/k/v biases) in groups of 2.
    for name in ["fixtures/llama-gqa-tied", "fixtures/llama-rope-scaled", "fixtures/qwen2"] {
        exact(&dir(name), 2, &[], "tensor", 2).stop();
    }
}

#[test]
fn the_http_front_of_a_tensor_group_gives_the_same_text() {
    let stories = dir("stories260K");
    let mut args =
        vec!["--prompt", PROMPTS[0], "--json", "--model", stories.as_str(), "--max-new-tokens", "40"];
    args.extend(["--temperature", "0", "--ignore-eos"]);
    let mut gen = vec!["generate"];
    gen.extend(args);
    let want = run_json(&gen).remove(0);
    let mut c = Cluster::up(&[
        "--model",
        &stories,
        "--workers",
        "2",
        "--placement",
        "tensor",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let base = c.http();
    let auth = c.http_auth();
    let req = format!(
        r#"{{"model":"stories260K","prompt":"{}","max_tokens":40,"temperature":0,"ignore_eos":true}}"#,
        PROMPTS[0]
    );
    let (code, body) = crate::openai::http(&base, "POST", "/v1/completions", Some(&req), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["choices"][0]["text"], want["text"]);
    let (code, metrics) = crate::openai::http(&base, "GET", "/metrics", None, &[]);
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l.starts_with("zeroshard_tensor_parallel_degree{") && l.ends_with(" 2")),
        "{metrics}"
    );
    c.stop();
}

/// `--placement auto`: on a model whose weights are ~1000× a step's
/// activations, two workers on this machine run tensor, and status gives the
/// predictions and the measured figures behind it; on a GPT-2 model (tensor
/// refused) they run gather and say why. Both exact.
#[test]
fn auto_picks_tensor_where_activations_are_cheaper_and_says_why() {
    let (_tmp, ckpt) =
        synthetic_checkpoint("llama:hidden=512,layers=4,heads=8,kv_heads=4,ffn=1536,vocab=8192");
    let ckpt = ckpt.as_str();
    let c = Cluster::up(&["--model", ckpt, "--workers", "2", "--placement", "auto"]);
    let s = status(&c.endpoint);
    assert_eq!((s["placement"].as_str(), s["tensor_degree"].as_u64()), (Some("tensor"), Some(2)), "{s}");
    let why = s["placement_reason"].as_str().expect("a reason");
    for part in [
        "auto: tensor decodes",
        "against gather",
        "predicted gather b1",
        "GFLOP/s",
        "Gb/s checked",
        "round trip",
    ] {
        assert!(why.contains(part), "{part:?} missing from {why:?}");
    }
    let ids = "1,300,4000,25,7,8100,512";
    let want = generated_from_ids(ckpt, ids, "24");
    assert_eq!(ids_of(&query(&c.endpoint, &greedy("--prompt-ids", ids, "24"))["token_ids"]), want);
    c.stop();
    let c = exact_under("auto", &dir("fixtures/gpt2"), 2, &[], "gather", 0);
    let why = status(&c.endpoint)["placement_reason"].as_str().expect("a reason").to_string();
    assert!(why.starts_with("auto: gather, tensor is refused:"), "{why}");
    c.stop();
}

#[test]
fn a_model_the_workers_cannot_split_runs_gathered_and_exact() {
    // Mistral's one KV head cannot be split over 2 workers; GPT-2 is not of the
    // Llama family: both epochs are planned as gather.
    for name in ["fixtures/mistral", "fixtures/gpt2"] {
        exact(&dir(name), 2, &[], "gather", 0).stop();
    }
    // A group size the KV heads do not divide (3 of 4): gather as well.
    exact(&dir("stories260K"), 3, &[], "gather", 0).stop();
}

#[test]
fn tensor_needs_the_checkpoint_on_every_worker() {
    let err =
        run_err(&["up", "--model", &dir("stories260K"), "--workers", "2", "--placement", "tensor", "--pull"]);
    assert!(err.contains("--placement tensor") && err.contains("--pull"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A fleet of `workers` under `--placement tensor` (plus `coordinator_args`),
/// steps slowed to ~15 ms so a 200-token greedy stream of `prompt` is still
/// running when `during` acts on the fleet; returns the fleet and the tokens.
fn disturbed(
    workers: usize,
    coordinator_args: &[&str],
    prompt: &str,
    during: impl FnOnce(&mut Fleet),
) -> (Fleet, Vec<u32>) {
    let mut args = vec!["--placement", "tensor"];
    args.extend_from_slice(coordinator_args);
    let fleet =
        Fleet::start(Etcd::start(), model("stories260K"), workers, &args, &["--fault-step-delay-ms", "15"]);
    let endpoint = fleet.endpoint.clone();
    let fleet = std::sync::Mutex::new(fleet);
    let got = std::thread::scope(|s| {
        let q = s.spawn(|| queried(&endpoint, prompt, "200"));
        std::thread::sleep(Duration::from_millis(800));
        during(&mut fleet.lock().expect("fleet"));
        q.join().expect("query")
    });
    (fleet.into_inner().expect("fleet"), got)
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_member_killed_mid_stream_changes_nothing_the_client_sees() {
    let stories = dir("stories260K");
    let want = generated(&stories, PROMPTS[0], "200");
    // The member that is not rank 0 (it holds no sequence) dies.
    let (fleet, got) = disturbed(2, &[], PROMPTS[0], |f| f.kill_worker(f.worker_by_activity(false)));
    assert_eq!(got, want, "the disturbed stream differs from an undisturbed run");
    let s = fleet.wait_status(Duration::from_secs(30), "epoch 2 on the survivor", |s| {
        s["epoch"] == 2 && s["ready"] == true && s["workers"].as_array().map(Vec::len) == Some(1)
    });
    assert_eq!((s["placement"].as_str(), s["tensor_degree"].as_u64()), (Some("tensor"), Some(1)), "{s}");
    assert!(s["sequences_resumed_total"].as_u64() >= Some(1), "{s}");
    assert_eq!(queried(&fleet.endpoint, PROMPTS[0], "40"), want[..40]);
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn with_two_groups_a_lost_worker_leaves_three_that_run_gathered_and_exact() {
    let stories = dir("stories260K");
    let want = generated(&stories, PROMPTS[1], "200");
    let (fleet, got) = disturbed(4, &["--replicas", "2"], PROMPTS[1], |f| {
        let s = f.status();
        assert_eq!((s["placement"].as_str(), s["tensor_degree"].as_u64()), (Some("tensor"), Some(2)), "{s}");
        f.kill_worker(f.worker_by_activity(false));
    });
    assert_eq!(got, want, "the disturbed stream differs from an undisturbed run");
    // Three survivors make no two equal groups: the next epoch is gathered.
    let s = fleet.wait_status(Duration::from_secs(30), "epoch 2 on 3 workers", |s| {
        s["epoch"] == 2 && s["ready"] == true && s["workers"].as_array().map(Vec::len) == Some(3)
    });
    assert_eq!((s["placement"].as_str(), s["tensor_degree"].as_u64()), (Some("gather"), Some(0)), "{s}");
    assert_eq!(queried(&fleet.endpoint, PROMPTS[1], "40"), want[..40]);
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_sigtermed_member_of_a_group_drains_and_the_stream_stays_exact() {
    let stories = dir("stories260K");
    let want = generated(&stories, PROMPTS[0], "200");
    // SIGTERM to rank 0 (it hands its sequence back), then to the other member
    // (its group breaks when it leaves).
    for lead in [true, false] {
        let mut victim = None;
        let (mut fleet, got) = disturbed(2, &[], PROMPTS[0], |f| {
            let i = f.worker_by_activity(lead);
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(f.worker_pid(i).expect("live") as i32, libc::SIGTERM) };
            victim = Some(i);
        });
        assert_eq!(got, want, "rank 0 drained: {lead}");
        let status =
            fleet.wait_worker_exit(victim.expect("drained"), Duration::from_secs(40)).expect("it exits");
        assert!(status.success(), "a drained member exits 0 (rank 0: {lead}): {status}");
        let s = fleet.wait_status(Duration::from_secs(30), "epoch 2 on the survivor", |s| {
            s["epoch"] == 2 && s["ready"] == true && s["workers"].as_array().map(Vec::len) == Some(1)
        });
        assert_eq!(s["placement"], "tensor", "{s}");
    }
}
