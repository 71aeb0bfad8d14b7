//! The fleet launch through a real Slurm: `scripts/local-slurm.sh` starts
//! munged, slurmctld and slurmd on loopback in a temp dir (root needed; the
//! test command installs the Debian packages), then `sbatch
//! deploy/slurm/zeroshard.sbatch` runs three tasks on stories260K; `query`
//! against the endpoint the job wrote reproduces the references, and
//! `scancel` leaves no zeroshard process behind. Once with mTLS and the
//! coordinator's own membership, once plaintext with etcd as a job step.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::etcd::free_port;
use crate::common::{bin, ids_of, model, read_json, repo, run_json, shared};
use serde_json::Value;
use tempfile::TempDir;

/// A one-node Slurm, stopped (by PID) on drop.
struct Slurm {
    dir: TempDir,
}

impl Slurm {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new(repo().join("scripts/local-slurm.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("running scripts/local-slurm.sh (bash)");
        let s = Self { dir };
        assert!(
            out.status.success(),
            "starting a local Slurm failed (it needs root and the Debian packages slurmctld, slurmd, \
             slurm-client and munge, which `scripts/local-slurm.sh install` adds): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.dir.path().join("slurm.conf"));
        c
    }

    /// `sbatch ARGS deploy/slurm/zeroshard.sbatch` in `cwd` with `env`; the job id.
    fn submit(&self, cwd: &Path, args: &[&str], env: &[(&str, String)]) -> u64 {
        let mut c = self.command("sbatch");
        c.current_dir(cwd).args(args).arg(repo().join("deploy/slurm/zeroshard.sbatch"));
        // The job sees only what the test gives it (sbatch exports the
        // submitting environment, and a stray ZEROSHARD_* would change it).
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ZEROSHARD_")) {
            c.env_remove(k);
        }
        c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let out = c.output().expect("sbatch");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "sbatch failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        text.trim().rsplit(' ').next().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("{text}"))
    }

    fn in_queue(&self, job: u64) -> bool {
        let out = self.command("squeue").args(["-h", "-j", &job.to_string(), "-o", "%T"]).output();
        out.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    }

    fn scancel(&self, job: u64) {
        let st = self.command("scancel").arg(job.to_string()).status().expect("scancel");
        assert!(st.success(), "scancel {job}");
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/local-slurm.sh")).arg("stop").arg(self.dir.path()).status();
    }
}

/// PIDs of processes running `exe`.
fn processes_of(exe: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == exe) {
            pids.push(pid);
        }
    }
    pids
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool, log: &Path) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > within {
            let out = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what}: not within {within:?}; the job's output:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every stories260K reference through `endpoint`, greedy tokens and text exact.
fn refs_through(endpoint: &str, auth: &[String]) {
    let stories = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    for case in stories["cases"].as_array().expect("cases") {
        let mut args: Vec<&str> = vec!["query", "--endpoint", endpoint, "--json"];
        args.extend(auth.iter().map(String::as_str));
        let prompt = case["prompt"].as_str().expect("prompt");
        args.extend(["--prompt", prompt, "--temperature", "0", "--ignore-eos", "--max-new-tokens", "48"]);
        let out: Value = run_json(&args).remove(0);
        assert_eq!(ids_of(&out["prompt_token_ids"]), ids_of(&case["input_ids"]), "{}", case["name"]);
        assert_eq!(ids_of(&out["token_ids"]), ids_of(&case["new_token_ids"]), "{}", case["name"]);
        assert_eq!(out["text"], crate::common::completion_text(case), "{}", case["name"]);
    }
}

/// Runs one job to the end: submit, wait for the endpoint, the refs, scancel,
/// nothing left behind.
fn job(slurm: &Slurm, exe: &Path, env: Vec<(&str, String)>, auth: &[String], scheme: &str) {
    let work = tempfile::tempdir().expect("job dir");
    let endpoint_file = work.path().join("endpoint");
    let mut env = env;
    env.extend([
        ("ZEROSHARD_BIN", exe.display().to_string()),
        ("ZEROSHARD_MODEL", model("stories260K").display().to_string()),
        ("ZEROSHARD_PERSISTENCE_THRESHOLD_BYTES", "256".into()),
        ("ZEROSHARD_DEVICE", "cpu".into()),
        ("ZEROSHARD_PORT", free_port().to_string()),
        ("ZEROSHARD_ENDPOINT_FILE", endpoint_file.display().to_string()),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
    ]);
    let id = slurm.submit(work.path(), &["--ntasks=3", "--overcommit"], &env);
    let log = work.path().join(format!("zeroshard-{id}.out"));
    let started = Instant::now();
    wait_for(
        Duration::from_secs(90),
        "the endpoint file",
        || {
            let ended = !slurm.in_queue(id);
            assert!(!ended || endpoint_file.is_file(), "job {id} ended without an endpoint:\n{}", read(&log));
            endpoint_file.is_file()
        },
        &log,
    );
    let endpoint = std::fs::read_to_string(&endpoint_file).expect("endpoint").trim().to_string();
    eprintln!("job {id}: {endpoint} ready in {:.1} s", started.elapsed().as_secs_f64());
    assert!(endpoint.starts_with(&format!("{scheme}://")), "{endpoint}");
    let printed = std::fs::read_to_string(&log).expect("job output");
    assert!(
        printed.contains(&format!("ready {endpoint}")),
        "the job's output lacks the endpoint:\n{printed}"
    );
    // Rank 0: the launcher, its coordinator and worker; ranks 1 and 2: a worker each.
    assert_eq!(
        processes_of(exe).len(),
        5,
        "rank 0 (launcher, coordinator, worker) and two workers:\n{printed}"
    );

    refs_through(&endpoint, auth);

    let cancelled = Instant::now();
    slurm.scancel(id);
    wait_for(
        Duration::from_secs(60),
        "every zeroshard process gone after scancel",
        || processes_of(exe).is_empty() && !slurm.in_queue(id),
        &log,
    );
    let printed = std::fs::read_to_string(&log).expect("job output");
    eprintln!("job {id}: scancel to no process left: {:.1} s", cancelled.elapsed().as_secs_f64());
    // The members drained on Slurm's SIGTERM rather than being killed: none
    // took scancel's signal plus rank 0's forwarded one as a second signal.
    assert!(printed.contains("drained"), "no drain in the job's output:\n{printed}");
    assert!(
        !printed.contains("status: 143") && !printed.contains("exit code 143"),
        "a member exited on a second signal:\n{printed}"
    );
    // A worker that left while draining stays gone: its keep-alive stops at
    // the leave instead of registering it again with the draining coordinator.
    assert!(!printed.contains("registering again"), "a worker registered again after leaving:\n{printed}");
}

#[test]
fn sbatch_serves_the_references_and_scancel_stops_everything() {
    let slurm = Slurm::start();
    // A copy of the binary only these jobs run, so its processes can be counted.
    let bins = tempfile::tempdir().expect("bin dir");
    let exe = bins.path().join("zeroshard");
    std::fs::copy(env!("CARGO_BIN_EXE_zeroshard"), &exe).expect("copying the binary");

    // mTLS: the certificates a site would make once, with this host's name.
    let certs = bins.path().join("certs");
    let certs_arg = certs.display().to_string();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().to_string();
    let make = |args: &[&str]| {
        let out = bin().args(["certs"]).args(args).args(["--dir", &certs_arg]).output().expect("certs");
        assert!(out.status.success(), "certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    make(&["init"]);
    make(&["issue", "--role", "coordinator", "--name", "coordinator", "--san", &host]);
    make(&["issue", "--role", "worker", "--name", "worker", "--san", &host]);
    make(&["issue", "--role", "client", "--name", "tester"]);
    let auth = [
        "--tls-ca".to_string(),
        certs.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        certs.join("tester.pem").display().to_string(),
        "--tls-key".into(),
        certs.join("tester.key").display().to_string(),
    ];
    job(&slurm, &exe, vec![("ZEROSHARD_CERTS_DIR", certs_arg.clone())], &auth, "grpcs");

    // Plaintext, membership in an etcd started as a step of the same job.
    let etcd_port = free_port();
    job(
        &slurm,
        &exe,
        vec![
            ("ZEROSHARD_INSECURE", "1".into()),
            ("ZEROSHARD_ETCD_STEP", "1".into()),
            ("ZEROSHARD_ETCD_PORT", etcd_port.to_string()),
        ],
        &[],
        "grpc",
    );
}
