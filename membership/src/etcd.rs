//! etcd membership: workers register under a lease, the coordinator watches.
//!
//! Keys of a cluster named `NAME`:
//! - `/zeroshard/NAME/workers/<id>`: JSON `{address, device, memory_bytes}`,
//!   put under the worker's lease, so it disappears when the worker stops
//!   renewing it.
//! - `/zeroshard/NAME/next_worker_id`: the next id to hand out (ids start at 1
//!   and are never reused), advanced with a compare-and-swap transaction.
//! - `/zeroshard/NAME/plan`: the plan, a prost-encoded `zeroshard.v1.StoredPlan`.
//! - `/zeroshard/NAME/digests`: which checkpoint the stored block digests are of
//!   (`zeroshard.v1.StoredDigests`), and `/zeroshard/NAME/digests/<i>` the
//!   digests themselves, split into parts under ~1 MiB (`StoredDigestPart`).
//!
//! [`EtcdMembership`] is the coordinator's half (snapshot + watch of the
//! workers prefix, the stored plan, eviction by lease revocation);
//! [`EtcdRegistrar`] the worker's (lease, id, key, keep-alive at a third of the
//! TTL, registering again with the same id after the lease was lost).
//!
//! ```ignore
//! let endpoints = vec!["http://127.0.0.1:2379".to_string()];
//! let registrar = Arc::new(EtcdRegistrar::connect(&endpoints, "prod", ttl).await?);
//! let id = registrar.register(announce).await?;
//! let membership = EtcdMembership::connect(&endpoints, "prod", ttl).await?;
//! let MemberWatch { members, events } = membership.watch().await?;
//! ```
mod membership;
mod registrar;
mod watcher;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use zeroshard_offload::plan::WorkerId;

pub use membership::EtcdMembership;
pub use registrar::EtcdRegistrar;

use crate::error::{MembershipError, Result};
use crate::Member;

/// How long one etcd request (or connecting) may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause before trying a request again that found no usable member.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The keys of one cluster.
#[derive(Clone, Debug)]
struct Keys {
    cluster: String,
}

impl Keys {
    fn new(cluster: &str) -> Self {
        Self { cluster: cluster.to_string() }
    }

    fn workers_prefix(&self) -> String {
        format!("/zeroshard/{}/workers/", self.cluster)
    }

    fn worker(&self, id: WorkerId) -> String {
        format!("{}{}", self.workers_prefix(), id.0)
    }

    fn plan(&self) -> String {
        format!("/zeroshard/{}/plan", self.cluster)
    }

    fn bans(&self) -> String {
        format!("/zeroshard/{}/bans", self.cluster)
    }

    fn digests(&self) -> String {
        format!("/zeroshard/{}/digests", self.cluster)
    }

    fn digest_part(&self, i: u32) -> String {
        format!("/zeroshard/{}/digests/{i}", self.cluster)
    }

    fn next_worker_id(&self) -> String {
        format!("/zeroshard/{}/next_worker_id", self.cluster)
    }

    /// The worker id in a key under [`Self::workers_prefix`].
    fn worker_id(&self, key: &[u8]) -> Option<WorkerId> {
        let rest = key.strip_prefix(self.workers_prefix().as_bytes())?;
        std::str::from_utf8(rest).ok()?.parse().ok().map(WorkerId)
    }
}

/// The value of a worker key.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MemberRecord {
    address: String,
    device: String,
    #[serde(default)]
    memory_bytes: u64,
}

impl MemberRecord {
    fn into_member(self, id: WorkerId) -> Member {
        Member { id, address: self.address, device: self.device, memory_bytes: self.memory_bytes }
    }
}

/// The member a worker key holds; `None` (logged) for keys that are not ours
/// or values that do not parse.
fn parse_member(keys: &Keys, kv: &KeyValue) -> Option<Member> {
    let id = keys.worker_id(kv.key())?;
    match serde_json::from_slice::<MemberRecord>(kv.value()) {
        Ok(record) => Some(record.into_member(id)),
        Err(e) => {
            tracing::warn!("etcd: ignoring {}: bad value: {e}", String::from_utf8_lossy(kv.key()));
            None
        }
    }
}

/// How to reach a secured etcd: TLS (its CA, and a client certificate when
/// etcd asks for one; endpoints are then `https://`) and a user with its
/// password (etcd's `auth enable`). The default is plaintext, no user.
#[derive(Clone, Debug, Default)]
pub struct EtcdCredentials {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl EtcdCredentials {
    fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| MembershipError::Invalid(format!("{}: {e}", p.display())))
        };
        if let Some(ca) = &self.ca {
            let mut tls =
                etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => return Err(MembershipError::Invalid("--etcd-cert and --etcd-key go together".into())),
            }
            options = options.with_tls(tls);
        } else if self.cert.is_some() || self.key.is_some() {
            return Err(MembershipError::Invalid("--etcd-cert needs --etcd-ca".into()));
        }
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => options = options.with_user(u.clone(), p.clone()),
            (None, None) => {}
            _ => return Err(MembershipError::Invalid("--etcd-user and its password go together".into())),
        }
        Ok(options)
    }
}

/// What an etcd connection serves; names it in errors and logs.
#[derive(Clone)]
struct Store {
    client: Client,
    endpoints: String,
    keys: Keys,
}

impl Store {
    /// Connects and proves the connection with a quorum read, all within
    /// [`CALL_TIMEOUT`], so that an unreachable etcd fails here, clearly.
    async fn connect(endpoints: &[String], cluster: &str, credentials: &EtcdCredentials) -> Result<Self> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(MembershipError::Invalid("no etcd endpoint given".into()));
        }
        if cluster.is_empty() || cluster.contains('/') {
            return Err(MembershipError::Invalid(format!(
                "cluster name {cluster:?} must be non-empty and without '/'"
            )));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            // Detect a hung member on open streams (etcd refuses pings more
            // often than every 5 s).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        let options = credentials.apply(options)?;
        let unreachable = |reason: String| MembershipError::Unreachable { endpoints: joined.clone(), reason };
        let client = tokio::time::timeout(CALL_TIMEOUT, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| unreachable(format!("no connection within {CALL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let store = Self { client, endpoints: joined.clone(), keys: Keys::new(cluster) };
        let key = store.keys.plan();
        store
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(store)
    }

    /// One etcd request, made by `request` on a clone of the client, within
    /// [`CALL_TIMEOUT`]. Requests that found no usable member (a stopped
    /// member of a cluster, an election) are tried again meanwhile.
    async fn call<T, F>(&self, mut request: impl FnMut(Client) -> F) -> std::result::Result<T, Failure>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut last = Failure::NoAnswer;
        loop {
            match tokio::time::timeout_at(deadline, request(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if retryable(&e) => last = Failure::Etcd(e),
                Ok(Err(e)) => return Err(Failure::Etcd(e)),
                Err(_) => return Err(last),
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(last);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// [`Self::call`] with the error as a [`MembershipError`] naming the
    /// endpoints and `what` was being done.
    async fn request<T, F>(&self, what: &str, request: impl FnMut(Client) -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.call(request).await.map_err(|source| MembershipError::Request {
            endpoints: self.endpoints.clone(),
            what: what.to_string(),
            source,
        })
    }

    /// The value stored at `key`, if any (`what` names the read in errors).
    async fn value(&self, key: &str, what: &str) -> Result<Option<Vec<u8>>> {
        let got = self
            .request(what, |mut c| {
                let key = key.to_string();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(got.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Replaces the value at `key` (`what` names the write in errors).
    async fn put(&self, key: &str, value: Vec<u8>, what: &str) -> Result<()> {
        self.request(what, |mut c| {
            let (key, value) = (key.to_string(), value.clone());
            async move { c.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd {} cluster {}", self.endpoints, self.keys.cluster)
    }
}

/// Why an etcd request failed.
#[derive(Debug)]
pub enum Failure {
    Etcd(etcd_client::Error),
    NoAnswer,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Etcd(e) => write!(f, "{e}"),
            Self::NoAnswer => write!(f, "no answer within {CALL_TIMEOUT:?}"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Etcd(e) => Some(e),
            Self::NoAnswer => None,
        }
    }
}

/// Errors of a request that another member (or the same one a moment later)
/// may serve: no connection, no leader, leader changed.
fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// Whole seconds for an etcd lease TTL (at least 1).
fn ttl_secs(ttl: Duration) -> i64 {
    (ttl.as_millis().div_ceil(1000) as i64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_worker_ids() {
        let keys = Keys::new("prod");
        assert_eq!(keys.worker(WorkerId(12)), "/zeroshard/prod/workers/12");
        assert_eq!(keys.worker_id(b"/zeroshard/prod/workers/12"), Some(WorkerId(12)));
        assert_eq!(keys.worker_id(b"/zeroshard/prod/workers/x"), None);
        assert_eq!(keys.worker_id(b"/zeroshard/other/workers/1"), None);
        assert_eq!(keys.plan(), "/zeroshard/prod/plan");
    }

    #[test]
    fn ttl_rounds_up_to_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(300)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(2000)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(2500)), 3);
    }
}
