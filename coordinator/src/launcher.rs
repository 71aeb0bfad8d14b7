//! Supervising child processes, the one place this project does it. [`Fleet`]
//! (`zeroshard up`): spawn local workers, wait for each to announce its
//! address, forward their logs, and stop them all — SIGTERM, a grace period,
//! then SIGKILL. [`run_together`] (`zeroshard launch`): a task's roles in the
//! foreground, signals forwarded. Either way no child outlives the launcher.
//!
//! A worker's log lines are prefixed with its process id, and with its worker
//! id once it has registered (`[worker pid 4242]`, then `[worker 2 pid 4242]`):
//! the order processes were started in is not their worker id.
//!
//! ```ignore
//! let mut fleet = Fleet::spawn(&exe, 3, |i| vec!["worker".into(), format!("--index={i}")])?;
//! let addrs = fleet.wait_ready(Duration::from_secs(60)).await?;
//! // ... serve ...
//! fleet.shutdown(Duration::from_secs(5)).await;
//! ```
use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The line a worker prints on stdout once it serves: `listening grpc://HOST:PORT`.
pub(crate) const READY_PREFIX: &str = "listening ";

/// The line a worker prints on stdout once registered: `registered as worker ID`.
pub(crate) const REGISTERED_PREFIX: &str = "registered as worker ";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("spawning worker process {index} of {n}: {source}")]
    Spawn {
        index: usize,
        n: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{worker} exited ({status}); its last message: {last}")]
    Exited { worker: Label, status: String, last: String },
    #[error("workers not ready after {0:?}")]
    Timeout(Duration),
}

/// Names a worker process in logs and errors: `worker pid 4242` until it has
/// registered, then `worker 2 pid 4242`.
#[derive(Clone, Debug)]
pub struct Label {
    pid: u32,
    id: Arc<OnceLock<u64>>,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id.get() {
            Some(id) => write!(f, "worker {id} pid {}", self.pid),
            None => write!(f, "worker pid {}", self.pid),
        }
    }
}

struct Worker {
    child: Child,
    label: Label,
    last_line: Arc<Mutex<String>>,
    /// Its exit was returned by [`Fleet::next_exit`] already.
    reported: bool,
}

/// Child worker processes of this launcher.
pub struct Fleet {
    workers: Vec<Worker>,
    ready_rx: mpsc::UnboundedReceiver<(usize, String)>,
}

impl Fleet {
    /// Starts `n` copies of `program` with `args(i)`. Children die with the
    /// launcher (`PR_SET_PDEATHSIG`) even if it is killed outright.
    pub fn spawn(program: &Path, n: usize, args: impl Fn(usize) -> Vec<String>) -> Result<Self, LaunchError> {
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let mut workers = Vec::with_capacity(n);
        for index in 0..n {
            let mut cmd = Command::new(program);
            // Workers allocate and free multi-MiB layers every step; with one
            // glibc arena per thread the freed memory piles up (measured: peak
            // RSS 510 MB against 436 MB with 1 arena, same gather speed).
            let arenas = std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "1".into());
            cmd.args(args(index))
                .env("MALLOC_ARENA_MAX", arenas)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn { index, n, source })?;
            let label = Label { pid: child.id().unwrap_or_default(), id: Arc::default() };
            let last_line = Arc::new(Mutex::new(String::new()));
            if let Some(out) = child.stdout.take() {
                let tx = ready_tx.clone();
                let label = label.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(out).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(addr) = line.strip_prefix(READY_PREFIX) {
                            let _ = tx.send((index, addr.trim().to_string()));
                        } else if let Some(id) =
                            line.strip_prefix(REGISTERED_PREFIX).and_then(|t| t.trim().parse().ok())
                        {
                            let _ = label.id.set(id);
                        } else {
                            tracing::info!(target: "worker", worker = %label, "{line}");
                        }
                    }
                });
            }
            if let Some(err) = child.stderr.take() {
                let last = last_line.clone();
                let label = label.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(err).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        zeroshard_offload::errln!("[{label}] {line}");
                        if let Ok(mut l) = last.lock() {
                            *l = line;
                        }
                    }
                });
            }
            workers.push(Worker { child, label, last_line, reported: false });
        }
        Ok(Self { workers, ready_rx })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Process ids, in worker order.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// Waits until every worker printed its address; fails as soon as one exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Vec<String>, LaunchError> {
        let mut addrs: Vec<Option<String>> = vec![None; self.workers.len()];
        let deadline = tokio::time::Instant::now() + timeout;
        while addrs.iter().any(Option::is_none) {
            tokio::select! {
                got = self.ready_rx.recv() => {
                    if let Some((i, addr)) = got {
                        addrs[i] = Some(addr);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if let Some(e) = self.check_exited() {
                        return Err(e);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Err(LaunchError::Timeout(timeout)),
            }
        }
        Ok(addrs.into_iter().flatten().collect())
    }

    /// The first worker that has exited, as an error carrying its last message.
    pub fn check_exited(&mut self) -> Option<LaunchError> {
        for w in &mut self.workers {
            if let Ok(Some(status)) = w.child.try_wait() {
                // Let the stderr forwarder catch up with the final lines.
                std::thread::sleep(Duration::from_millis(50));
                let last = w.last_line.lock().map(|l| l.clone()).unwrap_or_default();
                return Some(LaunchError::Exited {
                    worker: w.label.clone(),
                    status: status.to_string(),
                    last,
                });
            }
        }
        None
    }

    /// Resolves when a worker exits that no earlier call reported, with its
    /// error; pending forever once every worker's exit was reported.
    pub async fn next_exit(&mut self) -> LaunchError {
        loop {
            for w in &mut self.workers {
                if w.reported {
                    continue;
                }
                if let Ok(Some(status)) = w.child.try_wait() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    w.reported = true;
                    let last = w.last_line.lock().map(|l| l.clone()).unwrap_or_default();
                    return LaunchError::Exited { worker: w.label.clone(), status: status.to_string(), last };
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Resolves when any worker exits, with that error.
    pub async fn any_exit(&mut self) -> LaunchError {
        loop {
            if let Some(e) = self.check_exited() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM to every child, wait up to `grace`, then SIGKILL the rest.
    pub async fn shutdown(mut self, grace: Duration) {
        for w in &self.workers {
            if let Some(pid) = w.child.id() {
                // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for w in &mut self.workers {
            if tokio::time::timeout_at(deadline, w.child.wait()).await.is_err() {
                let _ = w.child.start_kill();
                let _ = w.child.wait().await;
            }
        }
    }
}

/// Makes the child `cmd` starts die (SIGTERM) when this process does, even
/// if it is killed outright (`PR_SET_PDEATHSIG`).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may already be gone between fork and prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Runs `children` (name, command) together and in the foreground: their
/// output goes where this process's goes, SIGTERM and SIGINT go to each of
/// them, and when one ends the others are asked to stop too (`launch`: a
/// Slurm task is its roles together). Returns the first one's exit status,
/// or the first failure's.
pub async fn run_together(
    children: Vec<(&'static str, std::process::Command)>,
) -> std::io::Result<std::process::ExitStatus> {
    use tokio::signal::unix::{signal, SignalKind};
    let with = |what: String| move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    let mut running = Vec::new();
    for (name, c) in children {
        let mut c = Command::from(c);
        die_with_parent(&mut c);
        running.push((name, c.spawn().map_err(with(format!("starting the {name}")))?, false));
    }
    // SIGTERM to each child; `all`: also those already asked (a second
    // signal from the launcher, which ends them at once).
    let stop = |running: &mut [(&str, Child, bool)], all: bool| {
        for (_, child, asked) in running {
            if let (Some(pid), true) = (child.id(), all || !*asked) {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                *asked = true;
            }
        }
    };
    let mut term = signal(SignalKind::terminate()).map_err(with("SIGTERM handler".into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(with("SIGINT handler".into()))?;
    let mut first: Option<std::process::ExitStatus> = None;
    while !running.is_empty() {
        let event = {
            let waits = running.iter_mut().map(|(_, c, _)| Box::pin(c.wait()));
            tokio::select! {
                _ = term.recv() => None,
                _ = int.recv() => None,
                (done, i, _) = futures::future::select_all(waits) => Some((i, done)),
            }
        };
        let Some((i, done)) = event else {
            stop(&mut running, true);
            continue;
        };
        let (name, _, _) = running.remove(i);
        let status = done.map_err(with(format!("waiting for the {name}")))?;
        zeroshard_offload::errln!("launch: the {name} exited ({status})");
        if first.is_none_or(|f| f.success() && !status.success()) {
            first = Some(status);
        }
        stop(&mut running, false);
    }
    Ok(first.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &'static str) -> impl Fn(usize) -> Vec<String> {
        move |i| vec!["-c".into(), script.replace("{i}", &i.to_string()), "sh".into()]
    }

    #[tokio::test]
    async fn collects_addresses_and_stops_children() {
        let mut fleet =
            Fleet::spawn(Path::new("/bin/sh"), 3, sh("echo 'listening grpc://w{i}'; exec sleep 30"))
                .expect("spawn");
        let addrs = fleet.wait_ready(Duration::from_secs(10)).await.expect("ready");
        assert_eq!(addrs, vec!["grpc://w0", "grpc://w1", "grpc://w2"]);
        let pids: Vec<u32> = fleet.pids().into_iter().flatten().collect();
        let start = std::time::Instant::now();
        fleet.shutdown(Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(4), "sleep dies on SIGTERM");
        for pid in pids {
            // SAFETY: signal 0 only checks existence.
            assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0, "child {pid} still alive");
        }
    }

    #[tokio::test]
    async fn reports_a_worker_that_dies_with_its_last_line() {
        let mut fleet = Fleet::spawn(
            Path::new("/bin/sh"),
            2,
            sh("if [ {i} = 1 ]; then echo 'cannot load ranges: disk on fire' >&2; exit 3; fi; echo 'listening x'; exec sleep 30"),
        )
        .expect("spawn");
        let pid = fleet.pids()[1].expect("pid");
        let err = fleet.wait_ready(Duration::from_secs(10)).await.expect_err("must fail").to_string();
        assert!(err.contains(&format!("worker pid {pid} exited")) && err.contains("disk on fire"), "{err}");
        fleet.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn names_a_worker_by_its_id_once_registered() {
        let mut fleet = Fleet::spawn(
            Path::new("/bin/sh"),
            1,
            sh("echo 'listening x'; echo 'registered as worker 7'; sleep 0.3; echo 'gone' >&2; exit 3"),
        )
        .expect("spawn");
        let pid = fleet.pids()[0].expect("pid");
        fleet.wait_ready(Duration::from_secs(10)).await.expect("ready");
        let err = fleet.any_exit().await.to_string();
        assert!(err.starts_with(&format!("worker 7 pid {pid} exited")) && err.contains("gone"), "{err}");
        fleet.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn sigkills_children_that_ignore_sigterm() {
        let fleet = Fleet::spawn(
            Path::new("/bin/sh"),
            1,
            sh("trap '' TERM; echo 'listening x'; while :; do sleep 0.1; done"),
        )
        .expect("spawn");
        let mut fleet = fleet;
        fleet.wait_ready(Duration::from_secs(10)).await.expect("ready");
        let start = std::time::Instant::now();
        fleet.shutdown(Duration::from_millis(300)).await;
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
