//! No member stalls the cluster (issue 30): a worker that never answers a plan
//! installation, stopped or faulty, holds up neither the next epoch nor the
//! requests served meanwhile.
use std::time::{Duration, Instant};

use crate::common::etcd::Etcd;
use crate::common::fleet::{Fleet, LEASE_TTL_SECS};
use crate::common::*;
use serde_json::Value;

const PROMPT: &str = "Once upon a time";
const TOKENS: &str = "24";

/// One greedy query through the fleet's coordinator: its token ids.
fn ask(fleet: &Fleet) -> Vec<u32> {
    ids_of(&query(&fleet.endpoint, &greedy("--prompt", PROMPT, TOKENS))["token_ids"])
}

/// What `generate` (one process) produces for the same query.
fn expected() -> Vec<u32> {
    let dir = model("stories260K");
    let mut args = vec!["generate", "--model", dir.to_str().expect("utf-8"), "--json"];
    args.extend(greedy("--prompt", PROMPT, TOKENS));
    ids_of(&run_json(&args)[0]["token_ids"])
}

/// A fleet of two workers on stories260K whose coordinator gives each
/// install `install_timeout_secs`.
fn two_workers(install_timeout_secs: &str) -> Fleet {
    Fleet::start_each_with(
        Etcd::start(),
        model("stories260K"),
        &["--install-timeout-secs", install_timeout_secs],
        &[],
        &[&[], &[]],
    )
}

/// An active epoch after `epoch` on `n` workers, all of which hold it.
fn active_after(s: &Value, epoch: u64, n: usize) -> bool {
    s["epoch"].as_u64() > Some(epoch)
        && s["workers"].as_array().is_some_and(|w| w.len() == n && w.iter().all(|w| w["ready"] == true))
}

/// A worker SIGSTOPped when another joins never answers the new epoch's
/// `InstallPlan`: its lease expires while the epoch installs, the installation
/// is abandoned, and the next epoch runs on the others within about the lease
/// TTL (the install deadline is set far beyond, so only the lease can have
/// done it). Queries answer exactly before and after.
#[test]
fn a_stopped_member_does_not_hold_up_the_next_epoch() {
    let want = expected();
    let mut fleet = two_workers("600");
    assert_eq!(ask(&fleet), want, "before the stop");
    let first = fleet.status()["epoch"].as_u64().expect("epoch");
    let pid = fleet.worker_pid(1).expect("live") as i32;
    // SAFETY: kill(2) on our own child; the fleet resumes it before killing it.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    fleet.add_worker();
    let within = Duration::from_secs(LEASE_TTL_SECS + 30);
    let s =
        fleet.wait_status(within, "a new epoch on the worker that joined and the one still running", |s| {
            active_after(s, first, 2)
        });
    eprintln!(
        "stopped member: epoch {} active on 2 workers {:?} after the stop",
        s["epoch"],
        stopped.elapsed()
    );
    assert_eq!(ask(&fleet), want, "after the re-plan");
}

/// A worker that keeps its lease but never answers `InstallPlan`
/// (`--fault-stall-install`) misses its install deadline: it is counted and
/// evicted, and the cluster keeps answering exactly on the epoch it has.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_member_that_never_installs_misses_its_deadline_and_is_evicted() {
    let want = expected();
    let mut fleet = two_workers("2");
    let first = fleet.status()["epoch"].as_u64().expect("epoch");
    let joined = Instant::now();
    fleet.add_worker_with(&["--fault-stall-install"]);
    let s = fleet.wait_status(Duration::from_secs(30), "an install deadline missed", |s| {
        s["install_deadlines_missed_total"].as_u64() >= Some(1)
    });
    eprintln!("stalled install: deadline missed {:?} after the join", joined.elapsed());
    assert_eq!(s["epoch"].as_u64(), Some(first), "an epoch with the stalled worker activated: {s}");
    for _ in 0..3 {
        assert_eq!(ask(&fleet), want, "while the stalled worker comes and goes");
    }
    let text = run(&["status", "--endpoint", &fleet.endpoint]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(text.contains("install deadlines missed"), "{text}");
}
