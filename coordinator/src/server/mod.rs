//! The coordinator service: workers join through membership (embedded:
//! `Control`; or etcd), the supervisor plans the partition and installs it on
//! every worker, re-planning when workers leave or join, and it serves clients
//! (`Inference`, health, the OpenAI-compatible HTTP front) by routing each
//! sequence to the least-loaded worker, and serves checkpoint ranges to
//! `--pull` workers (`Shards`).
//!
//! Protobuf types and statuses stop at the edges: the gRPC services
//! (`grpc`, `control`, `shards`) and the worker client (`worker_client`);
//! between them a request is a [`GenerateRequest`](crate::request::GenerateRequest)
//! and its answer [`Chunk`](crate::request::Chunk)s or a
//! [`CoordinatorError`](crate::CoordinatorError).
//!
//! ```ignore
//! let membership = EmbeddedMembership::new(config.lease_ttl);
//! let coord = Coordinator::start(config, advertise, Arc::new(membership.clone()), Some(membership))?;
//! tokio::spawn(server::serve(coord.clone(), listener, shutdown));
//! match coord.wait_ready().await { Readiness::Ready => zeroshard_offload::outln!("ready"), Readiness::Failed(e) => bail!(e), .. }
//! ```
mod admission;
mod answer;
mod audit;
mod choose;
mod config;
mod connections;
mod control;
mod deadline;
mod drain;
mod faults;
mod generate;
mod grpc;
mod http;
mod install;
mod metrics;
mod openai;
mod progress;
mod queue;
mod sequence;
mod shards;
mod state;
mod status;
mod supervisor;
mod worker_client;

use tokio::net::TcpListener;

pub use config::{ClusterConfig, Placement, RequestLimits};
pub use drain::{DrainReport, DrainState};
pub use grpc::serve;
pub use http::{serve_http, HttpFront, RenderMetrics};
pub use state::{Coordinator, Readiness, WorkerEntry};

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
