//! `zeroshard up`: a coordinator in this process and N worker processes on
//! this machine (embedded membership). Prints `ready grpc://HOST:PORT` once the
//! cluster serves, and stops every worker when asked to stop. A worker that
//! fails to start or load fails `up`; one that dies later is re-planned
//! around, and the cluster keeps serving.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{CoordinatorError, Result};
use crate::launcher::Fleet;
use crate::membership::embedded::EmbeddedMembership;
use crate::server::{self, ClusterConfig, Coordinator, Readiness};

/// What `up` starts.
#[derive(Clone, Debug)]
pub struct UpConfig {
    pub cluster: ClusterConfig,
    /// The `zeroshard` binary the workers run.
    pub exe: PathBuf,
    /// Extra arguments for every worker (`--prefetch-layers`, `--max-live-bytes`…).
    pub worker_args: Vec<String>,
}

/// A running local cluster: the coordinator served from this process and its
/// worker processes.
pub struct LocalCluster {
    pub addr: SocketAddr,
    pub coord: Coordinator,
    pub fleet: Fleet,
    server: JoinHandle<Result<()>>,
    stop_server: watch::Sender<bool>,
}

impl LocalCluster {
    /// Starts the coordinator on `listener` and the workers, and waits until the
    /// cluster serves. On failure every worker is stopped before returning.
    pub async fn start(
        cfg: &UpConfig,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Self> {
        let addr =
            listener.local_addr().map_err(|e| CoordinatorError::Unavailable(format!("listener: {e}")))?;
        let url = format!("http://{addr}");
        let membership = EmbeddedMembership::new(cfg.cluster.lease_ttl);
        let coord = Coordinator::start(
            cfg.cluster.clone(),
            url.clone(),
            Arc::new(membership.clone()),
            Some(membership),
        )?;
        let (stop_server, mut server_rx) = watch::channel(false);
        let server = tokio::spawn(server::serve(coord.clone(), listener, async move {
            let _ = server_rx.wait_for(|s| *s).await;
        }));
        let n = cfg.cluster.workers;
        let mut fleet = Fleet::spawn(&cfg.exe, n, |_| {
            let mut a = vec![
                "worker".to_string(),
                "--coordinator".into(),
                url.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ];
            a.extend(cfg.worker_args.iter().cloned());
            a
        })
        .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        eprintln!("starting {n} workers for {}", cfg.cluster.model_dir.display());
        let outcome = tokio::select! {
            r = coord.wait_ready() => match r {
                Readiness::Ready => Ok(()),
                Readiness::Failed(e) => Err(CoordinatorError::Unavailable(e)),
                other => Err(CoordinatorError::Unavailable(format!("cluster not ready: {other:?}"))),
            },
            e = fleet.any_exit() => Err(CoordinatorError::Unavailable(e.to_string())),
            _ = stop.wait_for(|s| *s) => Err(CoordinatorError::Unavailable("stopped before ready".into())),
        };
        let cluster = Self { addr, coord, fleet, server, stop_server };
        match outcome {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.stop().await;
                Err(e)
            }
        }
    }

    /// Stops the workers (SIGTERM, grace, SIGKILL) and the coordinator.
    pub async fn stop(self) {
        self.fleet.shutdown(Duration::from_secs(5)).await;
        let _ = self.stop_server.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
    }
}

/// Runs the cluster until `stop` turns true. Errors when a worker cannot start
/// or load, after stopping the others; a worker that dies later is logged and
/// the cluster continues without it.
pub async fn run(cfg: UpConfig, listener: TcpListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    let mut cluster = LocalCluster::start(&cfg, listener, stop.clone()).await?;
    println!("ready grpc://{}", cluster.addr);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            e = cluster.fleet.next_exit() => eprintln!("{e}; the cluster continues without it"),
        }
    }
    cluster.stop().await;
    Ok(())
}
