//! Real etcd for the tests: one member or a cluster, each on two free loopback
//! ports with its data in a temp dir; members can be stopped and restarted on
//! the same data; everything is killed on drop.
//!
//! ```ignore
//! let mut etcd = Etcd::start_cluster(3);
//! let endpoints = etcd.client_urls();
//! etcd.stop(0);
//! etcd.restart(0);
//! ```
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a member may take to report itself healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd (one member or a cluster).
pub(crate) struct Etcd {
    dir: TempDir,
    binary: PathBuf,
    initial_cluster: String,
    members: Vec<EtcdMember>,
    /// Serve clients over TLS with this certificate and key.
    tls: Option<(PathBuf, PathBuf)>,
}

impl Etcd {
    /// One member.
    pub(crate) fn start() -> Self {
        Self::start_cluster(1)
    }

    /// `n` members forming one cluster; returns once every member is healthy.
    /// A port taken between choosing it and etcd binding it (other tests open
    /// connections from ephemeral ports) means new ports and another try.
    pub(crate) fn start_cluster(n: usize) -> Self {
        Self::start_with(n, None)
    }

    /// One member serving clients over TLS (`https://`) with `cert` and `key`.
    pub(crate) fn start_tls(cert: PathBuf, key: PathBuf) -> Self {
        Self::start_with(1, Some((cert, key)))
    }

    fn start_with(n: usize, tls: Option<(PathBuf, PathBuf)>) -> Self {
        for attempt in 1..=5 {
            let mut etcd = Self::spawn_cluster(n, tls.clone());
            match (0..n).try_for_each(|i| etcd.healthy_within(i)) {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") && attempt < 5 => {
                    eprintln!("etcd: a chosen port was taken meanwhile; trying other ports");
                }
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn_cluster(n: usize, tls: Option<(PathBuf, PathBuf)>) -> Self {
        let binary = etcd_binary();
        let dir = tempfile::Builder::new().prefix("zeroshard-etcd-").tempdir().expect("temp dir for etcd");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Self { dir, binary, initial_cluster, members, tls };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd
    }

    /// `http://127.0.0.1:PORT` of every member.
    pub(crate) fn client_urls(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.client_url(i)).collect()
    }

    pub(crate) fn client_url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit; its data stays.
    pub(crate) fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir and ports; returns once healthy.
    pub(crate) fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) {
        let client = self.client_url(i);
        let m = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("etcd log file");
        let log_err = log.try_clone().expect("etcd log file");
        let child = Command::new(&self.binary)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.dir.path().display().to_string()])
            .args(self.tls.iter().flat_map(|(c, k)| {
                [
                    "--cert-file".to_string(),
                    c.display().to_string(),
                    "--key-file".to_string(),
                    k.display().to_string(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.members[i].child = Some(child);
    }

    /// Polls `GET /health` until it reports true; panics with the log's tail.
    fn wait_healthy(&mut self, i: usize) {
        if let Err(log) = self.healthy_within(i) {
            panic!("{log}");
        }
    }

    /// Polls `GET /health` until it reports true; else what went wrong and the log's tail.
    fn healthy_within(&mut self, i: usize) -> Result<(), String> {
        let port = self.members[i].client_port;
        let deadline = Instant::now() + HEALTHY_WITHIN;
        while Instant::now() < deadline {
            if let Some(status) = self.members[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("etcd member {i} exited ({status}):\n{}", tail(&self.log_path(i))));
            }
            // Over TLS, the log says when clients are served (GET /health would need TLS).
            let up = match self.tls {
                None => healthy(port),
                Some(_) => std::fs::read_to_string(self.log_path(i))
                    .is_ok_and(|l| l.contains("ready to serve client requests")),
            };
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("etcd member {i} not healthy within {HEALTHY_WITHIN:?}:\n{}", tail(&self.log_path(i))))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

/// The etcd binary on PATH, else `/usr/bin/etcd`; panics saying how to get it.
fn etcd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("etcd")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/bin/etcd")]).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "etcd not found on PATH or at /usr/bin/etcd: install etcd-server \
             (apt-get install -y etcd-server; scripts/test.sh installs it)"
        )
    })
}

/// A loopback port nothing listens on, whose next port is free too (etcd's
/// peer port). Drawn below the kernel's ephemeral range (32768 and up), so an
/// outgoing connection cannot take it between this check and the bind, and
/// never twice in one test run: a port bound with `:0` could be handed to the
/// next connection any process opens, which is how a job's etcd once found
/// its peer port taken.
pub(crate) fn free_port() -> u16 {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN / 2)) as u16 * 2;
    let _ = NEXT.compare_exchange(0, start + 2, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN / 2 {
        let port = FIRST + NEXT.fetch_add(2, Ordering::SeqCst) % SPAN;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 1) {
            return port;
        }
    }
    panic!("no free loopback port pair in {FIRST}..{}", FIRST + SPAN)
}

/// One `GET /health`; true when the member answers `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
