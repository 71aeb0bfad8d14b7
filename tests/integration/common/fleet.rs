//! A fleet under test the way one runs on many nodes: etcd, a `zeroshard
//! coordinator` and `zeroshard worker` processes started separately, each of
//! which can be killed, stopped (SIGSTOP) or restarted. Everything is killed on
//! drop.
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::etcd::Etcd;
use super::{bin, run_json};

/// Lease TTL the fleets under test use, seconds.
pub(crate) const LEASE_TTL_SECS: u64 = 2;
/// Fetch timeout of their workers, milliseconds.
pub(crate) const FETCH_TIMEOUT_MS: u64 = 1000;

pub(crate) struct Fleet {
    pub etcd: Etcd,
    model: PathBuf,
    cluster: String,
    coordinator_args: Vec<String>,
    worker_args: Vec<String>,
    coordinator: Option<Child>,
    pub endpoint: String,
    /// Worker processes by index; None once killed.
    workers: Vec<Option<Child>>,
}

fn kill(child: &mut Child) {
    // SIGCONT first: a stopped process would not die of SIGKILL until resumed on some kernels.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    let _ = child.kill();
    let _ = child.wait();
}

impl Fleet {
    /// etcd (`etcd`), `workers` workers, and a coordinator waiting for them,
    /// returned once the coordinator prints its ready line.
    pub(crate) fn start(
        etcd: Etcd,
        model: PathBuf,
        workers: usize,
        coordinator_args: &[&str],
        worker_args: &[&str],
    ) -> Self {
        let cluster = format!("test-{}-{}", std::process::id(), super::etcd::free_port());
        let mut f = Self {
            etcd,
            model,
            cluster,
            coordinator_args: coordinator_args.iter().map(|s| s.to_string()).collect(),
            worker_args: worker_args.iter().map(|s| s.to_string()).collect(),
            coordinator: None,
            endpoint: String::new(),
            workers: Vec::new(),
        };
        f.coordinator_args.extend(["--workers".into(), workers.to_string()]);
        for _ in 0..workers {
            f.add_worker();
        }
        f.start_coordinator();
        f
    }

    fn etcd_args(&self) -> Vec<String> {
        vec![
            "--etcd".into(),
            self.etcd.client_urls().join(","),
            "--cluster".into(),
            self.cluster.clone(),
            "--lease-ttl-secs".into(),
            LEASE_TTL_SECS.to_string(),
        ]
    }

    /// Starts the coordinator and waits (≤ 120 s) for `ready grpc://…`. A
    /// restarted coordinator listens on the same address as before, as a
    /// coordinator behind a fixed address or DNS name would.
    pub(crate) fn start_coordinator(&mut self) {
        let listen = match self.endpoint.strip_prefix("grpc://") {
            Some(addr) => addr.to_string(),
            None => "127.0.0.1:0".to_string(),
        };
        let mut child = bin()
            .args(["coordinator", "--listen", &listen, "--model", self.model.to_str().expect("utf-8")])
            .args(self.etcd_args())
            .args(&self.coordinator_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coordinator");
        let endpoint = super::cluster::ready_line(&mut child);
        self.coordinator = Some(child);
        self.endpoint = endpoint.expect("coordinator: no ready line within 120 s");
    }

    /// Like [`Fleet::start`], with `extra[i]` added to worker `i`'s arguments.
    pub(crate) fn start_each(etcd: Etcd, model: PathBuf, worker_args: &[&str], extra: &[&[&str]]) -> Self {
        Self::start_each_with(etcd, model, &[], worker_args, extra)
    }

    /// [`Fleet::start_each`] with `coordinator_args` too.
    pub(crate) fn start_each_with(
        etcd: Etcd,
        model: PathBuf,
        coordinator_args: &[&str],
        worker_args: &[&str],
        extra: &[&[&str]],
    ) -> Self {
        let cluster = format!("test-{}-{}", std::process::id(), super::etcd::free_port());
        let mut coordinator_args: Vec<String> = coordinator_args.iter().map(|s| s.to_string()).collect();
        coordinator_args.extend(["--workers".into(), extra.len().to_string()]);
        let mut f = Self {
            etcd,
            model,
            cluster,
            coordinator_args,
            worker_args: worker_args.iter().map(|s| s.to_string()).collect(),
            coordinator: None,
            endpoint: String::new(),
            workers: Vec::new(),
        };
        for e in extra {
            f.add_worker_with(e);
        }
        f.start_coordinator();
        f
    }

    /// Starts one more worker; returns its index.
    pub(crate) fn add_worker(&mut self) -> usize {
        self.add_worker_with(&[])
    }

    /// Waits (≤ `within`) for worker `i` to exit by itself; its status.
    pub(crate) fn wait_worker_exit(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        let child = self.workers[i].as_mut()?;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.workers[i] = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts one more worker with `extra` arguments; returns its index.
    pub(crate) fn add_worker_with(&mut self, extra: &[&str]) -> usize {
        let child = bin()
            .args(["worker", "--listen", "127.0.0.1:0"])
            .args(["--fetch-timeout-ms", &FETCH_TIMEOUT_MS.to_string()])
            .args(self.etcd_args())
            .args(&self.worker_args)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn worker");
        self.workers.push(Some(child));
        self.workers.len() - 1
    }

    pub(crate) fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers[i].as_ref().map(Child::id)
    }

    /// Live worker indices.
    pub(crate) fn live_workers(&self) -> Vec<usize> {
        (0..self.workers.len()).filter(|i| self.workers[*i].is_some()).collect()
    }

    /// SIGKILL to worker `i`.
    pub(crate) fn kill_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].take() {
            kill(&mut c);
        }
    }

    /// SIGSTOP to worker `i` (a hung worker); it is killed on drop.
    pub(crate) fn stop_worker(&mut self, i: usize) {
        let pid = self.worker_pid(i).expect("live worker");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    }

    /// Sends `signal` to the coordinator.
    pub(crate) fn signal_coordinator(&self, signal: i32) {
        let c = self.coordinator.as_ref().expect("a running coordinator");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, signal) };
    }

    /// Waits (≤ `within`) for the coordinator to exit; its status.
    pub(crate) fn wait_coordinator_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        let child = self.coordinator.as_mut()?;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.coordinator = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL to the coordinator.
    pub(crate) fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            kill(&mut c);
        }
    }

    /// The value stored under `/zeroshard/CLUSTER/<key>` in the fleet's etcd.
    pub(crate) fn stored(&self, key: &str) -> Option<Vec<u8>> {
        let key = format!("/zeroshard/{}/{key}", self.cluster);
        let urls = self.etcd.client_urls();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let mut c = etcd_client::Client::connect(urls, None).await.expect("etcd");
            let got = c.get(key, None).await.expect("etcd get");
            got.kvs().first().map(|kv| kv.value().to_vec())
        })
    }

    /// `status --json`.
    pub(crate) fn status(&self) -> Value {
        run_json(&["status", "--endpoint", &self.endpoint, "--json"]).remove(0)
    }

    /// Polls `status` until `cond` holds (≤ `within`); returns that status.
    pub(crate) fn wait_status(&self, within: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let s = self.status();
            if cond(&s) {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "status never showed {what}: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index of a worker process with running sequences (`busy`), or of
    /// one without, once status shows some worker running one.
    pub(crate) fn worker_by_activity(&self, busy: bool) -> usize {
        let s = self.wait_status(Duration::from_secs(10), "a busy worker", |s| {
            s["workers"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["active_sequences"].as_u64() > Some(0)))
        });
        let w = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|w| (w["active_sequences"].as_u64() > Some(0)) == busy)
            .unwrap_or_else(|| panic!("a worker {} sequences: {s}", if busy { "with" } else { "without" }))
            .clone();
        self.worker_index_by_port(w["address"].as_str().expect("address")).expect("its process")
    }

    /// The index of a worker process whose address status lists with `active_sequences > 0`.
    pub(crate) fn worker_index_by_port(&self, address: &str) -> Option<usize> {
        let port = address.rsplit(':').next()?.to_string();
        (0..self.workers.len()).find(|&i| {
            let Some(pid) = self.worker_pid(i) else { return false };
            listening_ports(pid).iter().any(|p| p.to_string() == port)
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_coordinator();
        for w in self.workers.iter_mut().flatten() {
            kill(w);
        }
    }
}

/// TCP ports process `pid` listens on (from /proc: its socket inodes matched
/// against /proc/net/tcp listening entries).
pub(crate) fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().to_string();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode(9)
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(port) = f[1].rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok()) {
                    ports.push(port);
                }
            }
        }
    }
    ports
}
