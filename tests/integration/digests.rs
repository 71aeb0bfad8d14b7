//! Weights verified against the checkpoint, not the sender, through the real
//! binary: a worker that serves corrupt bytes under valid CRC-32Cs is caught
//! by the block digests, never used, and evicted; a worker whose local copy of
//! the checkpoint is corrupt refuses to load, naming the tensor and block.

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::etcd::{free_port, Etcd};
use crate::common::fleet::Fleet;
use crate::common::*;
use serde_json::Value;

fn stories() -> std::path::PathBuf {
    model("stories260K")
}

/// Every stories260K reference case through `endpoint`, all at once (so they
/// spread over the workers): greedy tokens and text exact.
fn assert_refs(endpoint: &str, when: &str) {
    let refs = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    let cases = refs["cases"].as_array().expect("cases").clone();
    let runs: Vec<_> = cases
        .into_iter()
        .map(|case| {
            let endpoint = endpoint.to_string();
            std::thread::spawn(move || {
                let out = run_json(&[
                    "query",
                    "--endpoint",
                    &endpoint,
                    "--json",
                    "--prompt",
                    case["prompt"].as_str().expect("prompt"),
                    "--temperature",
                    "0",
                    "--ignore-eos",
                    "--max-new-tokens",
                    "48",
                ])
                .remove(0);
                (case, out)
            })
        })
        .collect();
    for run in runs {
        let (case, out) = run.join().expect("query thread");
        assert_eq!(ids_of(&out["token_ids"]), ids_of(&case["new_token_ids"]), "{when}: {}", case["name"]);
        assert_eq!(out["text"], crate::common::completion_text(&case), "{when}: {}", case["name"]);
    }
}

/// The status entry of fleet worker `index`.
fn entry<'a>(fleet: &Fleet, s: &'a Value, index: usize) -> Option<&'a Value> {
    s["workers"]
        .as_array()?
        .iter()
        .find(|w| w["address"].as_str().and_then(|a| fleet.worker_index_by_port(a)) == Some(index))
}

#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_holder_serving_corrupt_blocks_is_never_used_and_is_evicted_for_good() {
    // Three workers, one range each (no replica): what the liar holds is
    // refetched from the coordinator, which reads the checkpoint. Every tensor
    // partitioned (stories260K's are all under one block: whole tensors,
    // spread over the ranks), so the liar holds some whatever its rank.
    let mut fleet = Fleet::start_each_with(
        Etcd::start(),
        stories(),
        &["--persistence-threshold-bytes", "0"],
        &[],
        &[&[], &[], &["--fault-serve-corrupt"]],
    );
    liar_evicted(&fleet, &|endpoint, when| assert_refs(endpoint, when));
    // The ban is stored beside the plan in etcd: a restarted coordinator
    // keeps it, adopts the stored plan and plans nothing with the liar
    // (without it, the liar would be a live member outside the plan: a new
    // epoch at once).
    let before = fleet.status();
    let liar = entry(&fleet, &before, 2).expect("the liar")["id"].clone();
    let bans: Value =
        serde_json::from_slice(&fleet.stored("bans").expect("bans stored in etcd")).expect("JSON");
    assert_eq!(bans[0]["id"], liar, "{bans}");
    assert!(bans[0]["why"].as_str().is_some_and(|w| w.contains("failed the checkpoint's digest")), "{bans}");
    fleet.kill_coordinator();
    fleet.start_coordinator();
    std::thread::sleep(Duration::from_secs(3));
    let s = fleet.wait_status(Duration::from_secs(30), "ready again", |s| s["ready"] == true);
    assert_eq!(s["epoch"], before["epoch"], "the restarted coordinator planned again: {s}");
    assert_eq!(entry(&fleet, &s, 2).map(|w| w["ready"].clone()), Some(Value::Bool(false)), "{s}");
    assert_refs(&fleet.endpoint, "after the coordinator restarted");
}

/// The same with fetches of several MiB, whose blocks are checked as they
/// arrive on a thread of their own (a synthetic Llama of 5 MB per layer;
/// exactness against `generate`).
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn blocks_checked_as_they_arrive_catch_a_lying_holder_too() {
    let (_tmp, dir) =
        synthetic_checkpoint("llama:hidden=512,layers=2,heads=8,kv_heads=4,ffn=2048,vocab=4096");
    let ids = "1,300,2000,25,7,4000,512";
    let want = generated_from_ids(&dir, ids, "16");
    let fleet = Fleet::start_each_with(
        Etcd::start(),
        dir.into(),
        &["--persistence-threshold-bytes", "0"],
        &[],
        &[&[], &[], &["--fault-serve-corrupt"]],
    );
    // Three queries at once: least-loaded routing gives each worker one, so
    // honest workers gather from the liar (one query alone may run on the
    // liar itself, which fetches only honest bytes).
    liar_evicted(&fleet, &|endpoint, when| {
        std::thread::scope(|s| {
            let asked: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| ids_of(&query(endpoint, &greedy("--prompt-ids", ids, "16"))["token_ids"]))
                })
                .collect();
            for a in asked {
                assert_eq!(a.join().expect("query thread"), want, "{when}");
            }
        });
    });
}

/// Fleet worker 2 serves corrupt blocks: `exact` holds with it serving, it is
/// evicted (blocks rejected, not ready) while the honest two reject nothing,
/// and `exact` holds on the epoch without it, which stays.
fn liar_evicted(fleet: &Fleet, exact: &dyn Fn(&str, &str)) {
    let start = Instant::now();
    exact(&fleet.endpoint, "with a lying holder");
    let s = fleet.wait_status(Duration::from_secs(30), "the liar evicted", |s| {
        s["epoch"].as_u64() >= Some(2)
            && s["ready"] == true
            && entry(fleet, s, 2)
                .is_some_and(|w| w["rejected_blocks_total"].as_u64() > Some(0) && w["ready"] == false)
    });
    let liar = entry(fleet, &s, 2).expect("the liar is still registered");
    eprintln!(
        "liar {} evicted: {} blocks rejected, epoch {}, {:.1} s after start",
        liar["id"],
        liar["rejected_blocks_total"],
        s["epoch"],
        start.elapsed().as_secs_f64()
    );
    for w in s["workers"].as_array().expect("workers") {
        if w["id"] != liar["id"] {
            assert_eq!(w["rejected_blocks_total"], 0, "honest holders: nothing rejected: {s}");
            assert_eq!(w["ready"], true, "honest workers serve the new epoch: {s}");
        }
    }
    // The new plan holds everything on the honest two: same tokens, and
    // nothing more is rejected.
    let rejected = liar["rejected_blocks_total"].as_u64();
    exact(&fleet.endpoint, "after the eviction");
    let after = fleet.status();
    assert_eq!(entry(fleet, &after, 2).expect("liar")["rejected_blocks_total"].as_u64(), rejected);
    assert_eq!(after["epoch"], s["epoch"], "no further re-plan");
}

/// A copy of stories260K in a temporary folder with one byte of
/// `model.embed_tokens.weight` flipped (the high byte of an f32: the f16
/// conversion changes too).
fn corrupt_copy() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in std::fs::read_dir(stories()).expect("read stories260K") {
        let f = f.expect("entry");
        std::fs::copy(f.path(), dir.path().join(f.file_name())).expect("copy");
    }
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let tensor = "model.embed_tokens.weight";
    assert_eq!(header[tensor]["dtype"], "F32");
    let offset = header[tensor]["data_offsets"][0].as_u64().expect("offset") as usize;
    // Element 1000: bit 6 of byte 2 is the top mantissa bit. The value stays
    // finite and within f16 (an exponent bit could make it overflow f16, which
    // the load refuses before any digest is compared), and f16 keeps the change.
    bytes[8 + n + offset + 1000 * 4 + 2] ^= 0x40;
    std::fs::write(&file, bytes).expect("write");
    (dir, tensor.to_string())
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_corrupted_local_copy_is_refused_at_load_naming_the_tensor() {
    corrupted_copy_refused(&[]);
}

#[test]
fn a_corrupted_local_copy_is_refused_under_the_tensor_placement_too() {
    corrupted_copy_refused(&["--placement", "tensor"]);
}

/// A coordinator (with `placement` flags) and one worker whose checkpoint copy
/// is corrupt: the coordinator exits naming the tensor and its block.
fn corrupted_copy_refused(placement: &[&str]) {
    let (copy, tensor) = corrupt_copy();
    let port = free_port();
    // The coordinator reads (and digests) the good checkpoint; the worker maps its own copy.
    let mut coord = bin()
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}"), "--workers", "1", "--model"])
        .arg(stories())
        .args(placement)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coordinator");
    let mut worker = bin()
        .args(["worker", "--coordinator", &format!("http://127.0.0.1:{port}"), "--model"])
        .arg(copy.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = coord.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            kill(&mut coord);
            kill(&mut worker);
            panic!("the coordinator did not fail within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill(&mut worker);
    let mut coord_err = String::new();
    coord.stderr.take().expect("stderr").read_to_string(&mut coord_err).expect("stderr");
    let mut worker_err = String::new();
    worker.stderr.take().expect("stderr").read_to_string(&mut worker_err).expect("stderr");
    assert!(!status.success(), "{coord_err}");
    let last = coord_err.trim_end().lines().last().unwrap_or_default().to_string();
    eprintln!("coordinator: {last}");
    let named = format!("tensor `{tensor}` block 0");
    for part in [named.as_str(), "could not load", "differs from the coordinator's"] {
        assert!(last.contains(part), "`{part}` not in: {last}");
    }
    assert!(worker_err.contains(&format!("`{tensor}`")), "the worker logs it: {worker_err}");
}

/// A worker whose copy cannot load, joining a cluster that serves: it is
/// refused, evicted, and not planned again for a while that doubles at each
/// failure (2 s, 4 s, 8 s, …), where it used to be re-admitted and reloaded
/// about once a second; the cluster serves exact answers all along.
#[test]
fn a_worker_that_cannot_load_is_held_out_not_readmitted_in_a_loop() {
    let (copy, tensor) = corrupt_copy();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let logs = tempfile::tempdir().expect("tempdir");
    let log = |name: &str| std::fs::File::create(logs.path().join(name)).expect("log file");
    let mut coord = bin()
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}"), "--workers", "1", "--model"])
        .arg(stories())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log("coordinator"))
        .spawn()
        .expect("spawn coordinator");
    let mut good = bin()
        .args(["worker", "--coordinator", &endpoint, "--model"])
        .arg(stories())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker");
    let ready = crate::common::cluster::ready_line(&mut coord).expect("the coordinator's ready line");
    let mut bad = bin()
        .args(["worker", "--coordinator", &endpoint, "--model"])
        .arg(copy.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(log("bad-worker"))
        .spawn()
        .expect("spawn worker");
    let watched = Duration::from_secs(12);
    let start = Instant::now();
    while start.elapsed() < watched {
        assert_refs(&ready, "while a worker that cannot load keeps registering");
        std::thread::sleep(Duration::from_millis(500));
    }
    kill(&mut bad);
    kill(&mut good);
    kill(&mut coord);
    let read = |name: &str| std::fs::read_to_string(logs.path().join(name)).expect("log");
    let (coord_log, bad_log) = (read("coordinator"), read("bad-worker"));
    let refusals = bad_log.lines().filter(|l| l.contains(&format!("`{tensor}`"))).count();
    let held: Vec<&str> = coord_log.lines().filter(|l| l.contains("not planned again for")).collect();
    eprintln!("in {watched:?}: {refusals} refused loads; coordinator: {held:#?}");
    assert!((2..=4).contains(&refusals), "{refusals} loads in {watched:?}:\n{bad_log}");
    assert!(held.iter().any(|l| l.contains("not planned again for 2 s (failure 1 in a row)")), "{coord_log}");
    assert!(held.iter().any(|l| l.contains("not planned again for 4 s (failure 2 in a row)")), "{coord_log}");
}
