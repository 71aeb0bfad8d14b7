//! Who is in the cluster, and the plan they hold: both halves of membership,
//! shared by the coordinator and the worker (neither links the other).
//!
//! The coordinator learns of workers through a [`Membership`]: a snapshot of
//! the live members plus a stream of joins and departures, and a place to keep
//! the current plan so that a restarted coordinator resumes the same cluster.
//! Two implementations:
//! - `EmbeddedMembership` (in the coordinator crate, `membership::embedded`):
//!   in this process (what `zeroshard up` uses); workers register over the
//!   coordinator's `Control` service and renew an in-memory lease with
//!   `KeepAlive`.
//! - [`etcd::EtcdMembership`]: workers register `/zeroshard/<cluster>/workers/<id>`
//!   under an etcd lease; the coordinator watches the prefix and keeps the plan
//!   at `/zeroshard/<cluster>/plan`.
//!
//! On the worker side the matching half is a [`Registrar`]:
//! [`etcd::EtcdRegistrar`] here; the `Control` one (a gRPC client of the
//! coordinator) lives in the worker crate, and the coordinator's embedded
//! membership in the coordinator crate.
//!
//! The etcd key layout (see [`etcd`]) is defined once, here, for both sides.
//!
//! ```ignore
//! let m: Arc<dyn Membership> = Arc::new(EtcdMembership::connect(&endpoints, "prod", ttl).await?);
//! let MemberWatch { members, mut events } = m.watch().await?;
//! while let Some(ev) = events.recv().await { /* Joined(member) | Left(id) */ }
//! ```
mod convert;
mod error;
pub mod etcd;
mod registrar;

use tokio::sync::mpsc;
use zeroshard_offload::digest::BlockDigests;
use zeroshard_offload::plan::{Plan, WorkerId};

pub use error::{MembershipError, Result};
pub use registrar::{Announce, Registrar};

/// A live worker as membership knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: WorkerId,
    /// gRPC address of its `Worker` and `Shards` services, `http://host:port`.
    pub address: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Memory it offers for shards, 0 = unknown.
    pub memory_bytes: u64,
}

/// A change after a [`MemberWatch`] snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// A worker registered (or registered again with a new address).
    Joined(Member),
    /// A worker's lease expired, it left, or it was evicted.
    Left(WorkerId),
}

/// The members at one moment, and every change after it, in order.
pub struct MemberWatch {
    pub members: Vec<Member>,
    pub events: mpsc::UnboundedReceiver<MemberEvent>,
}

/// The plan a cluster runs, as membership keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredPlan {
    pub plan: Plan,
    /// Every worker of the plan and its address.
    pub peers: Vec<(WorkerId, String)>,
    /// Workers pull their ranges from the coordinator.
    pub pull: bool,
}

/// A worker banned from planning (bad blocks, failed audits), and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ban {
    pub id: u64,
    pub why: String,
}

/// Where the coordinator learns of workers and keeps the plan.
#[async_trait::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// What to call it in logs: `embedded`, `etcd http://… cluster NAME`.
    fn describe(&self) -> String;
    /// The members now and a stream of later changes. The stream survives
    /// connection losses to the store: after reconnecting it emits what changed
    /// meanwhile. It ends only when the membership is dropped.
    async fn watch(&self) -> Result<MemberWatch>;
    /// The plan stored last, if any.
    async fn load_plan(&self) -> Result<Option<StoredPlan>>;
    /// Replaces the stored plan.
    async fn store_plan(&self, plan: &StoredPlan) -> Result<()>;
    /// The block digests stored for the checkpoint `identity`, if any (see
    /// [`zeroshard_offload::digest::identity`]). Stores that keep none: `None`.
    async fn load_digests(&self, _identity: &str) -> Result<Option<BlockDigests>> {
        Ok(None)
    }
    /// Stores the block digests of the checkpoint `identity` (replacing any).
    async fn store_digests(&self, _identity: &str, _digests: &BlockDigests) -> Result<()> {
        Ok(())
    }
    /// Workers banned from planning and why, as stored last ([`Self::store_bans`]).
    /// Stores that keep none (embedded membership lives and dies with the
    /// coordinator): none.
    async fn load_bans(&self) -> Result<Vec<Ban>> {
        Ok(Vec::new())
    }
    /// Replaces the stored bans, so that a restarted coordinator keeps them.
    async fn store_bans(&self, _bans: &[Ban]) -> Result<()> {
        Ok(())
    }
    /// Removes a worker the coordinator found dead (its lease is revoked, so a
    /// `Left` follows); a worker that is still alive registers again.
    async fn evict(&self, id: WorkerId) -> Result<()>;
}
