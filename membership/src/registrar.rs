//! How a worker announces itself and stays a member: a [`Registrar`].
//!
//! Two implementations: the `Control` registrar (`rpc::control`) registers
//! with the coordinator and renews its lease there (embedded membership,
//! `zeroshard up`); [`EtcdRegistrar`](super::etcd::EtcdRegistrar) puts the
//! worker's key under a lease in etcd. The node only sees this trait.
use std::sync::Arc;

use crate::error::Result;

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
#[async_trait::async_trait]
pub trait Registrar: Send + Sync + 'static {
    /// What to call it in logs.
    fn describe(&self) -> String;
    /// Registers `me` and returns this worker's id once it is a member. Spawns
    /// whatever keeps the registration alive (lease keep-alive at a third of the
    /// TTL, registering again with the same id after the lease was lost) for as
    /// long as the process runs. Errors when the store cannot be reached at all.
    async fn register(self: Arc<Self>, me: Announce) -> Result<u64>;
    /// Leaves the cluster at once (the worker can no longer compute): the
    /// registration is withdrawn so the coordinator re-plans without waiting
    /// for the lease to run out. Best effort: the lease lapses anyway.
    async fn leave(&self, id: u64, reason: &str) -> Result<()>;
}
