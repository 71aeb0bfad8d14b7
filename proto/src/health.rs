//! `grpc.health.v1` alone, in plaintext, on a port of its own
//! (`--health-listen`): launchers probe it (Kubernetes' gRPC probes speak no
//! TLS), and it tells nothing but SERVING or NOT_SERVING.
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

/// Serves health on `listener` in the background: the overall service (`""`)
/// is SERVING while `serving` holds true. Stops when `serving`'s sender is dropped.
pub fn spawn(listener: TcpListener, mut serving: watch::Receiver<bool>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let follow = async move {
        loop {
            let status =
                if *serving.borrow_and_update() { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            if serving.changed().await.is_err() {
                break;
            }
        }
    };
    let serve = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(crate::transport::incoming(listener), follow);
    tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::warn!("health server: {e}");
        }
    });
}
