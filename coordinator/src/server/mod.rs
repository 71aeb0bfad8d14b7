//! The coordinator service: workers join through membership (embedded:
//! `Control`; or etcd), the supervisor plans the partition and installs it on
//! every worker, re-planning when workers leave or join, and it serves clients
//! (`Inference`, health) by routing each sequence to the least-loaded worker,
//! and serves checkpoint ranges to `--pull` workers (`Shards`).
//!
//! ```ignore
//! let membership = EmbeddedMembership::new(config.lease_ttl);
//! let coord = Coordinator::start(config, advertise, Arc::new(membership.clone()), Some(membership))?;
//! tokio::spawn(server::serve(coord.clone(), listener, shutdown));
//! match coord.wait_ready().await { Readiness::Ready => println!("ready"), Readiness::Failed(e) => bail!(e), .. }
//! ```
mod admission;
mod control;
mod deadline;
mod faults;
mod generate;
mod http;
mod inference;
mod metrics;
mod progress;
mod shards;
mod state;
mod supervisor;
mod worker_client;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use zeroshard_proto::v1::control_server::ControlServer;
use zeroshard_proto::v1::inference_server::InferenceServer;
use zeroshard_proto::v1::shards_server::ShardsServer;
use zeroshard_security::{Guard, Role};

pub use http::{serve_http, HttpFront, RenderMetrics};
pub use state::{ClusterConfig, Coordinator, DrainReport, DrainState, Readiness, RequestLimits, WorkerEntry};

use crate::error::{CoordinatorError, Result};

/// Serves the coordinator's services on `listener` until `shutdown`.
pub async fn serve(
    coord: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut ready = coord.readiness();
    let watch_health = async move {
        health.set_not_serving::<InferenceServer<inference::InferenceSvc>>().await;
        loop {
            if matches!(*ready.borrow(), Readiness::Ready) {
                health.set_serving::<InferenceServer<inference::InferenceSvc>>().await;
            }
            if ready.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::spawn(watch_health);
    let security = coord.0.cfg.security.clone();
    let tls = security.is_tls();
    let router = zeroshard_proto::transport::server()
        .add_service(health_service)
        .add_service(InterceptedService::new(
            InferenceServer::new(inference::InferenceSvc(coord.clone())),
            Guard::clients(tls, "Inference", coord.0.cfg.api_keys.clone()),
        ))
        .add_service(InterceptedService::new(
            ControlServer::new(control::ControlSvc(coord.clone())),
            Guard::members(tls, "Control", &[Role::Worker]),
        ))
        .add_service(InterceptedService::new(
            ShardsServer::new(shards::CheckpointShards(coord)),
            Guard::members(tls, "Shards", &[Role::Coordinator, Role::Worker]),
        ));
    security.spawn_reloader();
    security
        .serve(router, listener, shutdown)
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("coordinator server: {e}")))
}

/// Serves plaintext `grpc.health.v1` on `listener` (`--health-listen`):
/// SERVING while the cluster is ready and the coordinator is not draining.
pub fn spawn_health(coord: &Coordinator, listener: TcpListener) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (mut ready, mut drain) = (coord.readiness(), coord.drain_state());
    tokio::spawn(async move {
        loop {
            let serving = matches!(*ready.borrow_and_update(), Readiness::Ready)
                && *drain.borrow_and_update() == DrainState::Serving;
            tx.send_replace(serving);
            tokio::select! {
                r = ready.changed() => if r.is_err() { break },
                d = drain.changed() => if d.is_err() { break },
            }
        }
    });
    zeroshard_proto::health::spawn(listener, rx);
}
