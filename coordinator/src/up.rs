//! `zeroshard up`: a coordinator in this process and N worker processes on
//! this machine (embedded membership). Prints `ready grpcs://HOST:PORT` once the
//! cluster serves, and stops every worker when asked to stop. A worker that
//! fails to start or load fails `up`; one that dies later is re-planned
//! around, and the cluster keeps serving.
//!
//! Secure by default: `up` makes an ephemeral CA in a private temporary
//! folder, gives the coordinator and every worker its own certificate (mTLS
//! on every connection, loopback included), and leaves a client bundle that
//! `query` and `status` find by endpoint ([`zeroshard_security::bundle`]); all of it
//! is removed when `up` stops. `insecure` runs plaintext (`grpc://`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use zeroshard_security::{Role, Security};

use crate::client::ClientAuth;
use crate::error::{CoordinatorError, Result};
use crate::launcher::Fleet;
use crate::membership::embedded::EmbeddedMembership;
use crate::run::{Listeners, Serving};
use crate::server::{self, ClusterConfig, Coordinator};
use zeroshard_security::bundle::{find_bundle_in, UpCredentials};

fn unavailable(e: zeroshard_security::TlsError) -> CoordinatorError {
    CoordinatorError::Unavailable(e.to_string())
}

/// What `up` starts.
#[derive(Clone, Debug)]
pub struct UpConfig {
    pub cluster: ClusterConfig,
    /// The `zeroshard` binary the workers run.
    pub exe: PathBuf,
    /// Extra arguments for every worker (`--prefetch-layers`, `--max-live-bytes`…).
    pub worker_args: Vec<String>,
    /// Plaintext everywhere instead of mTLS with an ephemeral CA.
    pub insecure: bool,
    /// The HTTP front's key `up` made (also in `cluster.api_keys`), left in
    /// the client bundle beside the client certificate.
    pub http_key: Option<String>,
}

/// A running local cluster: the coordinator served from this process and its
/// worker processes.
pub struct LocalCluster {
    pub addr: SocketAddr,
    /// `grpcs://HOST:PORT` (`grpc://` when insecure).
    pub endpoint: String,
    /// What a client of this machine presents (the bundle's certificate).
    pub client: ClientAuth,
    /// Where the client bundle is (`None` when insecure).
    pub bundle: Option<PathBuf>,
    /// The certificates; dropping them removes the bundle and the CA.
    _credentials: Option<UpCredentials>,
    pub coord: Coordinator,
    pub fleet: Fleet,
    serving: Serving,
}

impl LocalCluster {
    /// Starts the coordinator on `listener` (and the HTTP front, where given)
    /// and the workers, and waits until the cluster serves. On failure every
    /// worker is stopped before returning.
    pub async fn start(
        cfg: &UpConfig,
        listener: TcpListener,
        http: Option<server::HttpFront>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Self> {
        let addr =
            listener.local_addr().map_err(|e| CoordinatorError::Unavailable(format!("listener: {e}")))?;
        let n = cfg.cluster.workers;
        let mut cluster_cfg = cfg.cluster.clone();
        let mut credentials = None;
        if !cfg.insecure {
            // Operators' keys replace the client certificate; up's own HTTP key does not.
            let client_cert = cluster_cfg.api_keys.is_none() || cfg.http_key.is_some();
            let mut c = UpCredentials::generate(n, client_cert)
                .map_err(unavailable)?
                .with_api_key(cfg.http_key.clone());
            cluster_cfg.security = Security::load(c.coordinator(), Some(Role::Coordinator))
                .map_err(|e| CoordinatorError::Unavailable(format!("credentials: {e}")))?;
            c.publish(&addr.to_string()).map_err(unavailable)?;
            credentials = Some(c);
        }
        let scheme = cluster_cfg.security.scheme();
        let url = format!("{scheme}://{addr}");
        let endpoint = format!("{}://{addr}", if cluster_cfg.security.is_tls() { "grpcs" } else { "grpc" });
        let bundle = credentials.as_ref().and_then(UpCredentials::bundle);
        let client = ClientAuth { tls: bundle.as_deref().and_then(find_bundle_in), api_key: None };
        let membership = EmbeddedMembership::new(cfg.cluster.lease_ttl);
        let coord =
            Coordinator::start(cluster_cfg, url.clone(), Arc::new(membership.clone()), Some(membership))?;
        let serving = Serving::start(coord.clone(), Listeners { grpc: listener, http, health: None })?;
        let mut fleet = match Fleet::spawn(&cfg.exe, n, |i| {
            let mut a = vec![
                "worker".to_string(),
                "--coordinator".into(),
                url.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ];
            a.extend(credentials.as_ref().map(|c| c.worker_args(i)).unwrap_or_default());
            a.extend(cfg.worker_args.iter().cloned());
            a
        }) {
            Ok(f) => f,
            Err(e) => {
                serving.close().await;
                return Err(CoordinatorError::Unavailable(e.to_string()));
            }
        };
        zeroshard_offload::errln!("starting {n} workers for {}", cfg.cluster.model_dir.display());
        let outcome = tokio::select! {
            r = serving.wait_ready(&mut stop) => match r {
                Ok(true) => Ok(()),
                Ok(false) => Err(CoordinatorError::Unavailable("stopped before ready".into())),
                Err(e) => Err(e),
            },
            e = fleet.any_exit() => Err(CoordinatorError::Unavailable(e.to_string())),
        };
        let cluster =
            Self { addr, endpoint, client, bundle, _credentials: credentials, coord, fleet, serving };
        match outcome {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.stop().await;
                Err(e)
            }
        }
    }

    /// The HTTP front's address, where there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.serving.http_addr
    }

    /// Drains the coordinator (running requests finish, up to the cluster's
    /// drain time; new ones are refused), then stops the workers (SIGTERM,
    /// grace, SIGKILL) and closes the coordinator's listeners.
    pub async fn stop(self) {
        let d = self.serving.drain().await;
        if d.running > 0 {
            zeroshard_offload::errln!("{d}");
        }
        self.fleet.shutdown(Duration::from_secs(5)).await;
        self.serving.close().await;
    }
}

/// Runs the cluster until `stop` turns true. Errors when a worker cannot start
/// or load, after stopping the others; a worker that dies later is logged and
/// the cluster continues without it.
pub async fn run(
    cfg: UpConfig,
    listener: TcpListener,
    http: Option<server::HttpFront>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut cluster = LocalCluster::start(&cfg, listener, http, stop.clone()).await?;
    zeroshard_offload::outln!("ready {}", cluster.endpoint);
    if let Some(addr) = cluster.http_addr() {
        zeroshard_offload::outln!("http http://{addr}");
    }
    match &cluster.bundle {
        Some(b) if cfg.http_key.is_some() => zeroshard_offload::outln!(
            "credentials {} (query and status find them by endpoint; HTTP clients send the key in {})",
            b.display(),
            b.join(zeroshard_security::bundle::API_KEY_FILE).display()
        ),
        Some(b) => {
            zeroshard_offload::outln!("credentials {} (query and status find them by endpoint)", b.display())
        }
        None => {
            zeroshard_offload::errln!("warning: --insecure: plaintext, no authentication between members")
        }
    }
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            e = cluster.fleet.next_exit() => zeroshard_offload::errln!("{e}; the cluster continues without it"),
        }
    }
    let started = std::time::Instant::now();
    zeroshard_offload::errln!("stopping: draining the coordinator and the workers");
    cluster.stop().await;
    zeroshard_offload::errln!("stopped in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
