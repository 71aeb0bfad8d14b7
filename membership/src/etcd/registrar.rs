//! The worker's half of etcd membership: [`EtcdRegistrar`].
//!
//! `register` grants a lease, allocates the worker's id from the cluster's
//! counter and puts `/zeroshard/<cluster>/workers/<id>` under the lease. A
//! spawned task then renews the lease every third of its TTL. When renewing
//! fails (etcd down, the member it talked to stopped, the lease expired or was
//! revoked) it keeps trying: the same lease if etcd still knows it, else a new
//! lease and the same key again. The worker's id never changes.
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use zeroshard_offload::plan::WorkerId;

use super::{ttl_secs, EtcdCredentials, Failure, MemberRecord, Store};
use crate::error::{MembershipError, Result};
use crate::{Announce, Registrar};

/// Registers a worker in etcd and keeps its lease alive.
pub struct EtcdRegistrar {
    store: Store,
    ttl: Duration,
    /// Set by `leave`: the keep-alive task stops, the lease lapses and the
    /// key is never put again.
    left: tokio::sync::watch::Sender<bool>,
}

impl EtcdRegistrar {
    /// Connects to etcd (a clear error naming `endpoints` when it cannot be
    /// reached within a few seconds). Workers of cluster `cluster` hold leases
    /// of `lease_ttl` (whole seconds, rounded up).
    pub async fn connect(endpoints: &[String], cluster: &str, lease_ttl: Duration) -> Result<Self> {
        Self::connect_with(endpoints, cluster, lease_ttl, &EtcdCredentials::default()).await
    }

    /// [`Self::connect`] to an etcd that needs `credentials` (TLS, a user).
    pub async fn connect_with(
        endpoints: &[String],
        cluster: &str,
        lease_ttl: Duration,
        credentials: &EtcdCredentials,
    ) -> Result<Self> {
        let ttl = Duration::from_secs(ttl_secs(lease_ttl) as u64);
        let store = Store::connect(endpoints, cluster, credentials).await?;
        Ok(Self { store, ttl, left: tokio::sync::watch::channel(false).0 })
    }

    /// A new id: the counter's value (1 when absent), advanced by a
    /// compare-and-swap so that concurrent workers never share one.
    async fn allocate_id(&self) -> Result<WorkerId> {
        let key = self.store.keys.next_worker_id();
        loop {
            let current = self
                .store
                .request("reading the id counter", |mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                })
                .await?;
            let (id, unchanged) = match current.kvs().first() {
                None => (1, Compare::version(key.clone(), CompareOp::Equal, 0)),
                Some(kv) => {
                    let id = std::str::from_utf8(kv.value()).ok().and_then(|v| v.parse::<u64>().ok());
                    let id = id.ok_or_else(|| MembershipError::BadValue {
                        key: key.clone(),
                        endpoints: self.store.endpoints.clone(),
                        reason: format!("{:?} is not a number", String::from_utf8_lossy(kv.value())),
                    })?;
                    (id, Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()))
                }
            };
            let txn =
                Txn::new().when([unchanged]).and_then([TxnOp::put(key.clone(), (id + 1).to_string(), None)]);
            let swapped = self
                .store
                .request("advancing the id counter", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if swapped.succeeded() {
                return Ok(WorkerId(id));
            }
        }
    }

    /// Grants a lease and puts this worker's key under it; returns the lease.
    async fn put_member(&self, id: WorkerId, record: &[u8]) -> Result<i64> {
        let ttl = ttl_secs(self.ttl);
        let granted =
            self.store.request("granting a lease", |mut c| async move { c.lease_grant(ttl, None).await });
        let lease = granted.await?.id();
        let key = self.store.keys.worker(id);
        self.store
            .request("registering", |mut c| {
                let (key, record) = (key.clone(), record.to_vec());
                async move { c.put(key, record, Some(PutOptions::new().with_lease(lease))).await }
            })
            .await?;
        Ok(lease)
    }

    /// Opens the keep-alive stream of `lease`; `Ok(None)` when etcd no longer
    /// knows the lease.
    async fn open_keeper(&self, lease: i64) -> std::result::Result<Option<Keeper>, String> {
        match self.store.call(|mut c| async move { c.lease_keep_alive(lease).await }).await {
            Ok((keeper, responses)) => Ok(Some(Keeper { keeper, responses })),
            // What etcd-client answers when the first renewal reports TTL 0.
            Err(Failure::Etcd(etcd_client::Error::LeaseKeepAliveError(_))) => Ok(None),
            Err(e) => Err(format!("renewing the lease: {e}")),
        }
    }

    /// Renews the lease until that fails; returns why.
    async fn keep_alive(&self, id: WorkerId, keeper: &mut Keeper) -> String {
        let period = self.ttl / 3;
        let patience = period.max(Duration::from_millis(500));
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = keeper.keeper.keep_alive().await {
                return format!("sending a keep-alive: {e}");
            }
            match tokio::time::timeout(patience, keeper.responses.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => tracing::trace!("{id}: lease renewed for {} s", r.ttl()),
                Ok(Ok(Some(_))) => return "the lease expired or was revoked".into(),
                Ok(Ok(None)) => return "etcd closed the keep-alive stream".into(),
                Ok(Err(e)) => return format!("keep-alive: {e}"),
                Err(_) => return format!("no keep-alive answer within {patience:?}"),
            }
        }
    }

    /// Keeps `id` registered with `lease` for as long as the process runs.
    async fn stay_registered(self: Arc<Self>, id: WorkerId, record: Vec<u8>, mut lease: i64) {
        let mut keeper = match self.open_keeper(lease).await {
            Ok(Some(k)) => k,
            Ok(None) => self.recover(id, &record, &mut lease, "the lease expired at once").await,
            Err(e) => self.recover(id, &record, &mut lease, &e).await,
        };
        loop {
            let why = self.keep_alive(id, &mut keeper).await;
            keeper = self.recover(id, &record, &mut lease, &why).await;
        }
    }

    /// After renewing failed for `why`, tries until etcd answers: the old
    /// `lease` if etcd still knows it, else a new one (stored in `lease`) and
    /// the same key again.
    async fn recover(&self, id: WorkerId, record: &[u8], lease: &mut i64, why: &str) -> Keeper {
        let store = self.store.describe();
        tracing::warn!("{id}: keeping the etcd lease alive failed ({why}); renewing it with {store}");
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = match self.open_keeper(*lease).await {
                Ok(Some(k)) => Ok((k, "resumed its lease")),
                Ok(None) => match self.put_member(id, record).await {
                    Ok(new) => {
                        *lease = new;
                        self.open_keeper(new)
                            .await
                            .and_then(|k| k.ok_or_else(|| "the new lease vanished".to_string()))
                            .map(|k| (k, "registered again"))
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e),
            };
            match attempt {
                Ok((keeper, what)) => {
                    tracing::warn!("{id}: {what} with {store}");
                    return keeper;
                }
                Err(e) => {
                    tracing::debug!("{id}: renewing: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.ttl / 3);
                }
            }
        }
    }
}

/// An open keep-alive stream.
struct Keeper {
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

#[async_trait::async_trait]
impl Registrar for EtcdRegistrar {
    fn describe(&self) -> String {
        self.store.describe()
    }

    async fn register(self: Arc<Self>, me: Announce) -> Result<u64> {
        let record = MemberRecord { address: me.address, device: me.device, memory_bytes: me.memory_bytes };
        let record = serde_json::to_vec(&record).expect("a record of strings and numbers serialises");
        let id = self.allocate_id().await?;
        let lease = self.put_member(id, &record).await?;
        tracing::info!("{id}: registered with {} (lease TTL {:?})", self.store.describe(), self.ttl);
        let mut left = self.left.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = self.stay_registered(id, record, lease) => {}
                _ = left.wait_for(|l| *l) => {}
            }
        });
        Ok(id.0)
    }

    /// Deletes this worker's key: the coordinator's watch sees it leave at once.
    async fn leave(&self, id: u64, reason: &str) -> Result<()> {
        tracing::warn!("worker {id}: leaving {}: {reason}", self.store.describe());
        self.left.send_replace(true);
        let key = self.store.keys.worker(WorkerId(id));
        self.store
            .request("leaving", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(())
    }
}
