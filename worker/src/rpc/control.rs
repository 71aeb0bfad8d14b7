//! The `Control` registrar: a worker of an embedded-membership cluster
//! (`zeroshard up`, or `worker --coordinator URL`) registers with the
//! coordinator's `Control` service and renews its lease there.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Response;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::control_client::ControlClient;
use zeroshard_security::Security;

use super::peer::connect;
use zeroshard_membership::{MembershipError, Result};

use crate::node::{Announce, Registrar};

/// Embedded membership: the coordinator's `Control` service holds the lease.
pub struct ControlRegistrar {
    coordinator: String,
    security: Security,
    /// Set by `leave`: the keep-alive task stops and never registers again.
    left: tokio::sync::watch::Sender<bool>,
}

impl ControlRegistrar {
    /// Registers with the coordinator at `coordinator`, over `security`.
    pub fn new(coordinator: impl Into<String>, security: Security) -> Self {
        Self { coordinator: coordinator.into(), security, left: tokio::sync::watch::channel(false).0 }
    }

    fn refused(&self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> MembershipError {
        MembershipError::Coordinator { endpoint: self.coordinator.clone(), source: source.into() }
    }

    /// One `RegisterWorker` call, retried for `patience` while the coordinator starts.
    async fn register_once(&self, me: &Announce, id: u64, patience: Duration) -> Result<(u64, Duration)> {
        let deadline = Instant::now() + patience;
        loop {
            // Not reachable yet (the coordinator may still be starting): try
            // again; an answer refusing the registration: give up.
            let attempt = async {
                let ch =
                    connect(&self.security, &self.coordinator).await.map_err(|e| (true, self.refused(e)))?;
                ControlClient::new(ch)
                    .register_worker(pb::RegisterWorkerRequest {
                        address: me.address.clone(),
                        device: me.device.clone(),
                        memory_bytes: me.memory_bytes,
                        worker_id: id,
                    })
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| (false, self.refused(s)))
            };
            match attempt.await {
                Ok(r) => return Ok((r.worker_id, Duration::from_millis(r.lease_ttl_ms.max(300)))),
                Err((retry, e)) if !retry || Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[async_trait::async_trait]
impl Registrar for ControlRegistrar {
    fn describe(&self) -> String {
        format!("coordinator {}", self.coordinator)
    }

    async fn register(self: Arc<Self>, me: Announce) -> Result<u64> {
        let (id, ttl) = self.register_once(&me, 0, Duration::from_secs(60)).await?;
        let mut left = self.left.subscribe();
        tokio::spawn(async move {
            let mut ttl = ttl;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 3) => {}
                    _ = left.wait_for(|l| *l) => return,
                }
                let known = async {
                    let ch = connect(&self.security, &self.coordinator).await.map_err(|e| self.refused(e))?;
                    ControlClient::new(ch)
                        .keep_alive(pb::KeepAliveRequest { worker_id: id })
                        .await
                        .map(|r| r.into_inner().known)
                        .map_err(|s| self.refused(s))
                };
                match known.await {
                    Ok(true) => {}
                    Ok(false) if *left.borrow() => return,
                    Ok(false) => {
                        tracing::warn!(
                            "worker {id}: the coordinator lost this worker's lease; registering again"
                        );
                        match self.register_once(&me, id, ttl).await {
                            Ok((_, t)) => ttl = t,
                            Err(e) => tracing::warn!("worker {id}: registering again: {e}"),
                        }
                    }
                    Err(e) => tracing::warn!("worker {id}: keep-alive with {}: {e}", self.coordinator),
                }
            }
        });
        Ok(id)
    }

    async fn leave(&self, id: u64, reason: &str) -> Result<()> {
        // First: a keep-alive answered "unknown" after the leave must not register again.
        self.left.send_replace(true);
        let ch = connect(&self.security, &self.coordinator).await.map_err(|e| self.refused(e))?;
        ControlClient::new(ch)
            .leave(pb::LeaveRequest { worker_id: id, reason: reason.to_string() })
            .await
            .map_err(|s| self.refused(s))?;
        Ok(())
    }
}
