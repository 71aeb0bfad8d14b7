//! A coordinator's lifecycle, once for every command that runs one
//! (`coordinator`, `up`, `bench --workers N`): serve gRPC (and the HTTP front
//! and health port where given), wait until the cluster is ready, run until
//! told to stop, drain, close the listeners.
//!
//! ```ignore
//! let serving = Serving::start(coord, listeners);
//! serving.wait_ready(&mut stop).await?;
//! let _ = stop.wait_for(|s| *s).await;
//! serving.shutdown().await;
//! ```
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{CoordinatorError, Result};
use crate::server::{self, Coordinator, DrainReport, HttpFront, Readiness};

/// What a coordinator listens on.
pub struct Listeners {
    /// The gRPC services (clients, and the workers of embedded membership).
    pub grpc: TcpListener,
    /// The HTTP front (OpenAI API, `/health`, `/metrics`).
    pub http: Option<HttpFront>,
    /// Plaintext `grpc.health.v1` (`--health-listen`).
    pub health: Option<TcpListener>,
}

/// A coordinator being served on its listeners.
pub struct Serving {
    pub coord: Coordinator,
    /// The gRPC address it was bound to.
    pub addr: SocketAddr,
    /// The HTTP front's address, where there is one.
    pub http_addr: Option<SocketAddr>,
    /// Closes every listener (gRPC and HTTP) when sent `true`.
    close: watch::Sender<bool>,
    grpc: JoinHandle<Result<()>>,
}

impl Serving {
    /// Starts serving `coord` on `listeners` (the cluster need not be ready:
    /// until it is, requests are answered UNAVAILABLE / 503).
    pub fn start(coord: Coordinator, listeners: Listeners) -> Result<Self> {
        let local = |l: &TcpListener, what: &str| {
            l.local_addr().map_err(|e| CoordinatorError::Unavailable(format!("{what}: {e}")))
        };
        let addr = local(&listeners.grpc, "listener")?;
        let http_addr = listeners.http.as_ref().map(|f| local(&f.listener, "--http-listen")).transpose()?;
        let (close, closed) = watch::channel(false);
        let until_closed = || {
            let mut closed = closed.clone();
            async move {
                let _ = closed.wait_for(|c| *c).await;
            }
        };
        if let Some(front) = listeners.http {
            tokio::spawn(server::serve_http(coord.clone(), front, until_closed()));
        }
        if let Some(l) = listeners.health {
            server::spawn_health(&coord, l);
        }
        let grpc = tokio::spawn(server::serve(coord.clone(), listeners.grpc, until_closed()));
        Ok(Self { coord, addr, http_addr, close, grpc })
    }

    /// Waits until the cluster serves. `Ok(false)`: `stop` turned true first.
    pub async fn wait_ready(&self, stop: &mut watch::Receiver<bool>) -> Result<bool> {
        tokio::select! {
            r = self.coord.wait_ready() => match r {
                Readiness::Ready => Ok(true),
                Readiness::Failed(e) => Err(CoordinatorError::Unavailable(e)),
                other => Err(CoordinatorError::Unavailable(format!("cluster not ready: {other:?}"))),
            },
            _ = stop.wait_for(|s| *s) => Ok(false),
        }
    }

    /// Refuses new requests and gives the running ones the cluster's drain time.
    pub async fn drain(&self) -> DrainReport {
        self.coord.drain(self.coord.drain_timeout()).await
    }

    /// Closes the listeners and waits (briefly) for the gRPC server to end.
    pub async fn close(self) {
        let _ = self.close.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.grpc).await;
    }

    /// [`drain`](Self::drain), then [`close`](Self::close).
    pub async fn shutdown(self) -> DrainReport {
        let d = self.drain().await;
        self.close().await;
        d
    }
}

/// Serves `coord` until `stop` turns true, then drains and closes: the
/// `coordinator` command. `on_ready` runs once the cluster serves (it prints
/// the endpoint, writes `--endpoint-file`); a stop before that skips it.
pub async fn run(
    coord: Coordinator,
    listeners: Listeners,
    mut stop: watch::Receiver<bool>,
    on_ready: impl FnOnce(&Serving) -> Result<()>,
) -> Result<()> {
    let serving = Serving::start(coord, listeners)?;
    let ready = match serving.wait_ready(&mut stop).await {
        Ok(ready) => ready,
        Err(e) => {
            serving.close().await;
            return Err(e);
        }
    };
    if ready {
        on_ready(&serving)?;
        let _ = stop.wait_for(|s| *s).await;
        zeroshard_offload::errln!(
            "draining: refusing new requests; running ones have {:?} to finish",
            serving.coord.drain_timeout()
        );
    }
    let d = serving.shutdown().await;
    if ready {
        zeroshard_offload::errln!("{d}");
    }
    Ok(())
}
