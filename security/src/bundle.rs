//! Credentials on this machine: the ephemeral CA `up` makes for its members,
//! and the client bundles `query` and `status` find by endpoint.
//!
//! A bundle is a folder `<state>/clusters/<host>_<port>/` (owner-only) with
//! `ca.pem`, and `client.pem` + `client.key` unless the cluster takes API
//! keys instead. `<state>` is `$ZEROSHARD_STATE_DIR`, else
//! `$XDG_STATE_HOME/zeroshard`, else `~/.local/state/zeroshard`.
//!
//! Private keys `up` writes (its members' and the bundle's) live only as
//! long as the process: each folder is removed when its [`UpCredentials`]
//! drops, by [`remove_now`] on the exits that skip destructors (a second stop
//! signal, a panic), and, for a process that was killed, by the next
//! [`UpCredentials::generate`] on this machine ([`clean_stale`]: folders whose
//! `owner` file names a process that is gone). The CA's own key never
//! touches the disk: members get only `ca.pem`.
//!
//! ```ignore
//! let creds = UpCredentials::generate(3, true)?;          // CA + coordinator + 3 workers + client
//! let bundle = creds.publish("127.0.0.1:50051")?;         // what `query` will find
//! let sec = client_security(&Address::parse("grpcs://127.0.0.1:50051")?, None)?;
//! ```
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::certs::{loopback_sans, Ca};
use crate::tls::TlsError;

type Result<T> = std::result::Result<T, TlsError>;
use crate::{Address, Role, Security, TlsPaths};

fn setup(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("credentials: {e}"))
}

/// Folders of private keys this process wrote and has not removed yet.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The name of the file in each such folder that holds the writer's pid.
const OWNER_FILE: &str = "owner";
/// The prefix of `up`'s temporary credential folders.
const TEMP_PREFIX: &str = "zeroshard-ca-";

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks `dir` as this process's (an `owner` file with the pid) and to be
/// removed on every exit.
fn own(dir: &Path) -> Result<()> {
    crate::certs::write_private(&dir.join(OWNER_FILE), std::process::id().to_string().as_bytes())
        .map_err(setup)?;
    live().push(dir.to_path_buf());
    Ok(())
}

fn disown(dir: &Path) {
    live().retain(|d| d != dir);
}

/// Removes every folder of private keys this process wrote: for the exits
/// that run no destructors (`std::process::exit`, a panic that aborts).
pub fn remove_now() {
    for d in std::mem::take(&mut *live()) {
        let _ = fs::remove_dir_all(d);
    }
}

/// Removes credential folders of processes that are gone (killed before
/// they could clean up): `up`'s temporary folders and client bundles whose
/// `owner` file names a pid that no longer runs, owned by this user. Returns
/// how many it removed.
pub fn clean_stale() -> usize {
    let mut roots: Vec<(PathBuf, Option<&str>)> = vec![(std::env::temp_dir(), Some(TEMP_PREFIX))];
    if let Some(s) = state_dir() {
        roots.push((s.join("clusters"), None));
    }
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut removed = 0;
    for (root, prefix) in roots {
        let Ok(entries) = fs::read_dir(&root) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if prefix.is_some_and(|p| !name.to_string_lossy().starts_with(p)) {
                continue;
            }
            let path = e.path();
            let mine = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == uid);
            let owner =
                fs::read_to_string(path.join(OWNER_FILE)).ok().and_then(|s| s.trim().parse::<i32>().ok());
            if let (true, Some(pid)) = (mine, owner) {
                if pid > 0 && !alive(pid) && fs::remove_dir_all(&path).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    removed
}

/// Whether process `pid` exists (signal 0; EPERM means it does, as another user's).
fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Where client bundles are kept.
pub fn state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("ZEROSHARD_STATE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return Some(PathBuf::from(d).join("zeroshard"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/zeroshard"))
}

/// The bundle folder of the cluster at `authority` (`host:port`).
pub fn bundle_dir(authority: &str) -> Option<PathBuf> {
    let name: String = authority
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    Some(state_dir()?.join("clusters").join(name))
}

/// The credentials of the bundle for `authority`, if there is one.
pub fn find_bundle(authority: &str) -> Option<TlsPaths> {
    find_bundle_in(&bundle_dir(authority)?)
}

/// The credentials of the bundle in `dir`, if there is one.
pub fn find_bundle_in(dir: &Path) -> Option<TlsPaths> {
    let ca = dir.join("ca.pem");
    if !ca.is_file() {
        return None;
    }
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    let has_cert = cert.is_file() && key.is_file();
    Some(TlsPaths { ca, cert: has_cert.then_some(cert), key: has_cert.then_some(key) })
}

/// A client's security towards `addr`: plaintext for `grpc://`; for
/// `grpcs://`, the credentials given, or else the bundle `up` left for that
/// endpoint.
pub fn client_security(addr: &Address, given: Option<TlsPaths>) -> Result<Security> {
    let paths = match (addr.tls, given) {
        (false, Some(_)) => {
            return Err(TlsError::Address(format!(
                "--endpoint {} is plaintext but TLS credentials were given: use grpcs:// (https://)",
                addr.uri()
            )))
        }
        (false, None) => return Ok(Security::plaintext()),
        (true, Some(p)) => p,
        (true, None) => match find_bundle_for(addr) {
            Some(p) => p,
            // Nothing there at all says more than missing credentials would.
            None if !answers(addr) => {
                return Err(TlsError::Address(format!(
                    "cannot reach grpcs://{}: nothing answers there (no cluster listens on that port)",
                    addr.authority()
                )))
            }
            None => {
                return Err(TlsError::Address(format!(
                    "--endpoint grpcs://{} speaks TLS: give --tls-ca (and --tls-cert/--tls-key, or \
                     --api-key); no credentials that `up` left for it were found in {}",
                    addr.authority(),
                    bundle_dir(&addr.authority())
                        .map_or_else(|| "(no state folder)".into(), |d| d.display().to_string())
                )))
            }
        },
    };
    Security::load(paths, None)
}

/// The certificate of `up`'s worker `i` (from 0): `worker-1` for the first,
/// as `up` numbers its workers.
fn worker_name(i: usize) -> String {
    format!("worker-{}", i + 1)
}

/// The socket addresses `addr`'s host resolves to (none when it does not).
fn resolved(addr: &Address) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let host = addr.host.trim_start_matches('[').trim_end_matches(']');
    (host, addr.port).to_socket_addrs().map(Iterator::collect).unwrap_or_default()
}

/// Whether something accepts TCP connections at `addr` (within a second).
fn answers(addr: &Address) -> bool {
    resolved(addr)
        .iter()
        .any(|a| std::net::TcpStream::connect_timeout(a, std::time::Duration::from_secs(1)).is_ok())
}

/// The bundle `up` left for `addr`: under the name as written, else under
/// each address the host resolves to (`up` names bundles by the address it
/// listens on: `localhost:PORT` finds `127.0.0.1_PORT`).
fn find_bundle_for(addr: &Address) -> Option<TlsPaths> {
    find_bundle(&addr.authority()).or_else(|| resolved(addr).iter().find_map(|a| find_bundle(&a.to_string())))
}

/// Creates `dir` (and parents) and makes it owner-only.
fn private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| setup(format!("{}: {e}", dir.display())))
}

/// The certificates of a local cluster, in a private temporary folder that
/// goes away with it.
pub struct UpCredentials {
    dir: tempfile::TempDir,
    ca: Ca,
    workers: usize,
    client_cert: bool,
    /// Written to the bundle as `api-key` (the HTTP front's key).
    api_key: Option<String>,
    bundle: Option<PathBuf>,
}

/// A new random API key: `zs-` and 64 hex digits (256 bits from the OS).
pub fn new_api_key() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| setup("the OS gave no random bytes"))?;
    Ok(format!("zs-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()))
}

/// The bundle's file with the HTTP front's API key, when `up` made one.
pub const API_KEY_FILE: &str = "api-key";

impl UpCredentials {
    /// Also leave `key` in the bundle, as [`API_KEY_FILE`] (owner-only).
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    /// A new CA, a coordinator certificate, `workers` worker certificates
    /// (all for this machine's loopback names) and, when `client_cert`, a
    /// client certificate for the bundle.
    pub fn generate(workers: usize, client_cert: bool) -> Result<Self> {
        let stale = clean_stale();
        if stale > 0 {
            tracing::info!("removed {stale} credential folders left by processes that are gone");
        }
        let dir = tempfile::Builder::new().prefix(TEMP_PREFIX).tempdir().map_err(setup)?;
        private_dir(dir.path())?;
        own(dir.path())?;
        let ca = Ca::generate().map_err(setup)?;
        // The CA's key stays in memory: members need only its certificate.
        crate::certs::write_private(&dir.path().join("ca.pem"), ca.cert_pem().as_bytes()).map_err(setup)?;
        let sans = loopback_sans();
        ca.issue(Role::Coordinator, "coordinator", &sans)
            .map_err(setup)?
            .write(dir.path(), "coordinator")
            .map_err(setup)?;
        for i in 0..workers {
            let name = worker_name(i);
            ca.issue(Role::Worker, &name, &sans).map_err(setup)?.write(dir.path(), &name).map_err(setup)?;
        }
        Ok(Self { dir, ca, workers, client_cert, api_key: None, bundle: None })
    }

    fn paths(&self, name: &str) -> TlsPaths {
        let d = self.dir.path();
        TlsPaths {
            ca: d.join("ca.pem"),
            cert: Some(d.join(format!("{name}.pem"))),
            key: Some(d.join(format!("{name}.key"))),
        }
    }

    /// The client bundle's folder, once published.
    pub fn bundle(&self) -> Option<PathBuf> {
        self.bundle.clone()
    }

    pub fn coordinator(&self) -> TlsPaths {
        self.paths("coordinator")
    }

    /// Worker `i`'s credentials (`i < workers`).
    pub fn worker(&self, i: usize) -> TlsPaths {
        debug_assert!(i < self.workers);
        self.paths(&worker_name(i))
    }

    /// The arguments that give worker `i` its credentials.
    pub fn worker_args(&self, i: usize) -> Vec<String> {
        let p = self.worker(i);
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        vec![
            "--tls-ca".into(),
            p.ca.display().to_string(),
            "--tls-cert".into(),
            path(&p.cert),
            "--tls-key".into(),
            path(&p.key),
        ]
    }

    /// Writes the client bundle for `authority` (replacing an old one) and
    /// returns its folder; it is removed when `self` drops.
    pub fn publish(&mut self, authority: &str) -> Result<PathBuf> {
        let dir = bundle_dir(authority)
            .ok_or_else(|| setup("no state folder (set ZEROSHARD_STATE_DIR or HOME)"))?;
        if let Some(parent) = dir.parent() {
            private_dir(parent)?;
        }
        let _ = fs::remove_dir_all(&dir);
        private_dir(&dir)?;
        own(&dir)?;
        crate::certs::write_private(&dir.join("ca.pem"), self.ca.cert_pem().as_bytes()).map_err(setup)?;
        if self.client_cert {
            let pem = self.ca.issue(Role::Client, "up-client", &[]).map_err(setup)?;
            pem.write(&dir, "client").map_err(setup)?;
        }
        if let Some(key) = &self.api_key {
            crate::certs::write_private(&dir.join(API_KEY_FILE), format!("{key}\n").as_bytes())
                .map_err(setup)?;
        }
        self.bundle = Some(dir.clone());
        Ok(dir)
    }
}

impl Drop for UpCredentials {
    fn drop(&mut self) {
        if let Some(b) = self.bundle.take() {
            let _ = fs::remove_dir_all(&b);
            disown(&b);
        }
        disown(self.dir.path());
    }
}
