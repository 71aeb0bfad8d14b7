//! How a worker announces itself and stays a member: a [`Registrar`].
//!
//! [`ControlRegistrar`] registers with the coordinator's `Control` service and
//! renews its lease there (embedded membership, `zeroshard up`). The etcd
//! registrar lives with the coordinator's membership code and is injected by
//! the binary; the worker only sees this trait.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Response;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::control_client::ControlClient;

use crate::error::{Result, WorkerError};

/// What a worker tells the cluster about itself.
#[derive(Clone, Debug, Default)]
pub struct Announce {
    /// gRPC address of its `Worker` and `Shards` services, `http://host:port`.
    pub address: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Memory it offers for shards, 0 = unknown.
    pub memory_bytes: u64,
}

/// Registers this worker and keeps it registered.
#[tonic::async_trait]
pub trait Registrar: Send + Sync + 'static {
    /// What to call it in logs.
    fn describe(&self) -> String;
    /// Registers `me` and returns this worker's id once it is a member. Spawns
    /// whatever keeps the registration alive (lease keep-alive at a third of the
    /// TTL, registering again with the same id after the lease was lost) for as
    /// long as the process runs. Errors when the store cannot be reached at all.
    async fn register(self: Arc<Self>, me: Announce) -> Result<u64>;
}

/// Embedded membership: the coordinator's `Control` service holds the lease.
pub struct ControlRegistrar {
    coordinator: String,
}

impl ControlRegistrar {
    pub fn new(coordinator: impl Into<String>) -> Self {
        Self { coordinator: coordinator.into() }
    }

    /// One `RegisterWorker` call, retried for `patience` while the coordinator starts.
    async fn register_once(&self, me: &Announce, id: u64, patience: Duration) -> Result<(u64, Duration)> {
        let deadline = Instant::now() + patience;
        loop {
            let attempt = async {
                let ch = super::connect(&self.coordinator).await?;
                ControlClient::new(ch)
                    .register_worker(pb::RegisterWorkerRequest {
                        address: me.address.clone(),
                        device: me.device.clone(),
                        memory_bytes: me.memory_bytes,
                        worker_id: id,
                    })
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| {
                        WorkerError::Membership(format!(
                            "registering with {}: {}",
                            self.coordinator,
                            s.message()
                        ))
                    })
            };
            match attempt.await {
                Ok(r) => return Ok((r.worker_id, Duration::from_millis(r.lease_ttl_ms.max(300)))),
                Err(e @ WorkerError::Membership(_)) => return Err(e),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[tonic::async_trait]
impl Registrar for ControlRegistrar {
    fn describe(&self) -> String {
        format!("coordinator {}", self.coordinator)
    }

    async fn register(self: Arc<Self>, me: Announce) -> Result<u64> {
        let (id, ttl) = self.register_once(&me, 0, Duration::from_secs(60)).await?;
        tokio::spawn(async move {
            let mut ttl = ttl;
            loop {
                tokio::time::sleep(ttl / 3).await;
                let known = async {
                    let ch = super::connect(&self.coordinator).await?;
                    ControlClient::new(ch)
                        .keep_alive(pb::KeepAliveRequest { worker_id: id })
                        .await
                        .map(|r| r.into_inner().known)
                        .map_err(|s| WorkerError::Membership(s.message().to_string()))
                };
                match known.await {
                    Ok(true) => {}
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
}
