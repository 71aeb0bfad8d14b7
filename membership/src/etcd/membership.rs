//! The coordinator's half of etcd membership: [`EtcdMembership`].
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use zeroshard_offload::digest::BlockDigests;
use zeroshard_offload::plan::WorkerId;

use super::watcher::{snapshot, Watcher};
use super::{ttl_secs, EtcdCredentials, Store};
use crate::error::{MembershipError, Result};
use crate::{Ban, MemberWatch, Membership, StoredPlan};

/// Workers from `/zeroshard/<cluster>/workers/`, the plan at
/// `/zeroshard/<cluster>/plan`.
pub struct EtcdMembership {
    store: Store,
    /// The workers' lease TTL: how long a member that vanished while etcd was
    /// unreachable may take to register again before it counts as left.
    ttl: Duration,
    /// Dropped with the membership, which ends every watch task.
    alive: watch::Sender<()>,
}

impl EtcdMembership {
    /// Connects to etcd (a clear error naming `endpoints` when it cannot be
    /// reached within a few seconds). `lease_ttl` is the workers' lease TTL.
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
        let store = Store::connect(endpoints, cluster, credentials).await?;
        let ttl = Duration::from_secs(ttl_secs(lease_ttl) as u64);
        Ok(Self { store, ttl, alive: watch::Sender::new(()) })
    }
}

#[tonic::async_trait]
impl Membership for EtcdMembership {
    fn describe(&self) -> String {
        self.store.describe()
    }

    async fn watch(&self) -> Result<MemberWatch> {
        let (members, revision) = snapshot(&self.store).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = Watcher::new(self.store.clone(), self.ttl, &members, tx);
        tokio::spawn(watcher.run(revision + 1, self.alive.subscribe()));
        Ok(MemberWatch { members, events: rx })
    }

    async fn load_plan(&self) -> Result<Option<StoredPlan>> {
        let key = self.store.keys.plan();
        let Some(value) = self.store.value(&key, "reading the plan").await? else { return Ok(None) };
        let bad = |reason: String| MembershipError::BadValue {
            key: key.clone(),
            endpoints: self.store.endpoints.clone(),
            reason,
        };
        Ok(Some(crate::convert::decode_plan(&value).map_err(|e| match e {
            MembershipError::Invalid(reason) => bad(reason),
            other => other,
        })?))
    }

    async fn store_plan(&self, plan: &StoredPlan) -> Result<()> {
        self.store.put(&self.store.keys.plan(), crate::convert::encode_plan(plan), "storing the plan").await
    }

    async fn load_bans(&self) -> Result<Vec<Ban>> {
        let key = self.store.keys.bans();
        let Some(value) = self.store.value(&key, "reading the bans").await? else { return Ok(Vec::new()) };
        serde_json::from_slice(&value).map_err(|e| MembershipError::BadValue {
            key,
            endpoints: self.store.endpoints.clone(),
            reason: format!("not a list of bans: {e}"),
        })
    }

    async fn store_bans(&self, bans: &[Ban]) -> Result<()> {
        let value = serde_json::to_vec(bans).unwrap_or_default();
        self.store.put(&self.store.keys.bans(), value, "storing the bans").await
    }

    async fn load_digests(&self, identity: &str) -> Result<Option<BlockDigests>> {
        let key = self.store.keys.digests();
        let bad = |key: &str, reason: String| MembershipError::BadValue {
            key: key.to_string(),
            endpoints: self.store.endpoints.clone(),
            reason,
        };
        let Some(head) = self.store.value(&key, "reading the digests").await? else { return Ok(None) };
        let Some(parts) =
            crate::convert::digest_parts(&head, identity).map_err(|e| bad(&key, e.to_string()))?
        else {
            return Ok(None);
        };
        let mut values = Vec::with_capacity(parts as usize);
        for i in 0..parts {
            let part = self.store.keys.digest_part(i);
            let Some(v) = self.store.value(&part, "reading the digests").await? else { return Ok(None) };
            values.push(v);
        }
        crate::convert::decode_digests(&values, identity).map_err(|e| bad(&key, e.to_string()))
    }

    async fn store_digests(&self, identity: &str, digests: &BlockDigests) -> Result<()> {
        let (head, parts) = crate::convert::encode_digests(identity, digests);
        // The parts first: a header names only parts that are there (each part
        // also names its checkpoint, so a torn write is never taken for another's).
        for (i, value) in parts.into_iter().enumerate() {
            self.store.put(&self.store.keys.digest_part(i as u32), value, "storing the digests").await?;
        }
        self.store.put(&self.store.keys.digests(), head, "storing the digests").await
    }

    async fn evict(&self, id: WorkerId) -> Result<()> {
        let key = self.store.keys.worker(id);
        let got = self
            .store
            .request("reading a worker", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let Some(lease) = got.kvs().first().map(|kv| kv.lease()) else { return Ok(()) };
        tracing::info!("evicting {id} from {}", self.store.describe());
        if lease != 0 {
            let revoked = self.store.call(|mut c| async move { c.lease_revoke(lease).await }).await;
            if revoked.is_ok() {
                return Ok(());
            }
        }
        // No lease, or it expired meanwhile: delete the key itself.
        self.store
            .request("deleting a worker", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(())
    }
}
