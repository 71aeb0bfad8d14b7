//! The coordinator service: workers register (`Control`), the coordinator
//! plans the partition and installs it on every worker, then serves clients
//! (`Inference`, health) by routing each sequence to the least-loaded worker,
//! and serves checkpoint ranges to `--pull` workers (`Shards`).
//!
//! ```ignore
//! let (coord, ready) = Coordinator::new(config)?;
//! tokio::spawn(server::serve(coord, listener, shutdown));
//! match ready.wait().await { Readiness::Ready => println!("ready"), Readiness::Failed(e) => bail!(e), .. }
//! ```
mod control;
mod generate;
mod inference;
mod shards;
mod state;

use std::future::Future;

use tokio::net::TcpListener;
use zeroshard_proto::v1::control_server::ControlServer;
use zeroshard_proto::v1::inference_server::InferenceServer;
use zeroshard_proto::v1::shards_server::ShardsServer;

pub use state::{ClusterConfig, Coordinator, Readiness};

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
    zeroshard_proto::transport::server()
        .add_service(health_service)
        .add_service(InferenceServer::new(inference::InferenceSvc(coord.clone())))
        .add_service(ControlServer::new(control::ControlSvc(coord.clone())))
        .add_service(ShardsServer::new(shards::CheckpointShards(coord)))
        .serve_with_incoming_shutdown(zeroshard_proto::transport::incoming(listener), shutdown)
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("coordinator server: {e}")))
}
