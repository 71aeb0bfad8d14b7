//! Embedded membership: the registry lives in the coordinator process. Workers
//! register over `Control.RegisterWorker` and renew an in-memory lease with
//! `Control.KeepAlive`; a reaper turns missed renewals into `Left` events.
//! The plan is kept in memory only (a restarted `up` starts a new cluster).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use zeroshard_offload::plan::WorkerId;

use super::{Member, MemberEvent, MemberWatch, Membership, StoredPlan};
use zeroshard_membership::Result;

struct State {
    /// Live members and when their lease runs out.
    members: BTreeMap<WorkerId, (Member, Instant)>,
    /// The certificate name that registered each id (under TLS): an id stays
    /// bound to it, live or not, for the coordinator's life.
    owners: BTreeMap<WorkerId, String>,
    next_id: u64,
    plan: Option<StoredPlan>,
    subscribers: Vec<mpsc::UnboundedSender<MemberEvent>>,
}

impl State {
    fn emit(&mut self, ev: &MemberEvent) {
        self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }
}

/// The in-process registry; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedMembership {
    state: Arc<Mutex<State>>,
    ttl: Duration,
}

impl EmbeddedMembership {
    /// A registry whose leases last `ttl`; spawns the reaper on the current runtime.
    pub fn new(ttl: Duration) -> Self {
        let m = Self {
            state: Arc::new(Mutex::new(State {
                members: BTreeMap::new(),
                owners: BTreeMap::new(),
                next_id: 1,
                plan: None,
                subscribers: Vec::new(),
            })),
            ttl,
        };
        let weak = Arc::downgrade(&m.state);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 4).await;
                let Some(state) = weak.upgrade() else { return };
                let mut st = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                let expired: Vec<WorkerId> =
                    st.members.iter().filter(|(_, (_, d))| *d < now).map(|(id, _)| *id).collect();
                for id in expired {
                    st.members.remove(&id);
                    tracing::warn!("{id}: lease expired (no keep-alive for {ttl:?})");
                    st.emit(&MemberEvent::Left(id));
                }
            }
        });
        m
    }

    pub fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a worker (again, when `prior` is its old id) and returns its
    /// id. `owner` is the registering certificate's name (`None` without TLS):
    /// an id registered by one owner cannot be taken by another (`Err` with the
    /// owner it belongs to).
    pub fn register(
        &self,
        address: String,
        device: String,
        memory_bytes: u64,
        prior: Option<WorkerId>,
        owner: Option<&str>,
    ) -> std::result::Result<WorkerId, String> {
        let mut st = self.lock();
        let id = match prior {
            Some(id) if id.0 < st.next_id => {
                if let Some(bound) = st.owners.get(&id) {
                    if Some(bound.as_str()) != owner {
                        return Err(bound.clone());
                    }
                }
                id
            }
            _ => {
                let id = WorkerId(st.next_id);
                st.next_id += 1;
                id
            }
        };
        if let Some(o) = owner {
            st.owners.insert(id, o.to_string());
        }
        let member = Member { id, address, device, memory_bytes };
        let deadline = Instant::now() + self.ttl;
        let changed = st.members.get(&id).is_none_or(|(m, _)| *m != member);
        st.members.insert(id, (member.clone(), deadline));
        if changed {
            st.emit(&MemberEvent::Joined(member));
        }
        Ok(id)
    }

    /// Whether `owner` may act for `id` (renew, leave): the id is bound to it,
    /// or to nobody (registered without TLS).
    pub fn owned_by(&self, id: WorkerId, owner: Option<&str>) -> bool {
        self.lock().owners.get(&id).is_none_or(|bound| Some(bound.as_str()) == owner)
    }

    /// Renews `id`'s lease; false when it is not a member (expired or evicted).
    pub fn keep_alive(&self, id: WorkerId) -> bool {
        let deadline = Instant::now() + self.ttl;
        match self.lock().members.get_mut(&id) {
            Some((_, d)) => {
                *d = deadline;
                true
            }
            None => false,
        }
    }
}

#[async_trait::async_trait]
impl Membership for EmbeddedMembership {
    fn describe(&self) -> String {
        format!("embedded (lease {:?})", self.ttl)
    }

    async fn watch(&self) -> Result<MemberWatch> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut st = self.lock();
        st.subscribers.push(tx);
        Ok(MemberWatch { members: st.members.values().map(|(m, _)| m.clone()).collect(), events })
    }

    async fn load_plan(&self) -> Result<Option<StoredPlan>> {
        Ok(self.lock().plan.clone())
    }

    async fn store_plan(&self, plan: &StoredPlan) -> Result<()> {
        self.lock().plan = Some(plan.clone());
        Ok(())
    }

    async fn evict(&self, id: WorkerId) -> Result<()> {
        let mut st = self.lock();
        if st.members.remove(&id).is_some() {
            st.emit(&MemberEvent::Left(id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn register_watch_expire_evict() {
        let m = EmbeddedMembership::new(Duration::from_millis(200));
        let a = m.register("http://a".into(), "cpu".into(), 0, None, None).expect("registers");
        let mut w = m.watch().await.expect("watch");
        assert_eq!(w.members.len(), 1);
        let b = m.register("http://b".into(), "cpu".into(), 0, None, None).expect("registers");
        assert_ne!(a, b);
        assert!(matches!(w.events.recv().await, Some(MemberEvent::Joined(x)) if x.id == b));
        // Re-registering unchanged is silent; with the old id it keeps the id.
        assert_eq!(m.register("http://b".into(), "cpu".into(), 0, Some(b), None), Ok(b));
        m.evict(a).await.expect("evict");
        assert_eq!(w.events.recv().await, Some(MemberEvent::Left(a)));
        assert!(!m.keep_alive(a));
        // b stops renewing: its lease runs out.
        let t = Instant::now();
        assert_eq!(w.events.recv().await, Some(MemberEvent::Left(b)));
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(m.watch().await.expect("watch").members.is_empty());
    }

    #[tokio::test]
    async fn an_id_stays_bound_to_the_identity_that_registered_it() {
        let m = EmbeddedMembership::new(Duration::from_secs(5));
        let a = m.register("https://a:1".into(), "cpu".into(), 0, None, Some("w-a")).expect("registers");
        assert_eq!(
            m.register("https://rogue:1".into(), "cpu".into(), 0, Some(a), Some("w-b")),
            Err("w-a".into())
        );
        assert_eq!(m.register("https://rogue:1".into(), "cpu".into(), 0, Some(a), None), Err("w-a".into()));
        assert!(m.owned_by(a, Some("w-a")) && !m.owned_by(a, Some("w-b")));
        assert_eq!(m.watch().await.expect("watch").members[0].address, "https://a:1");
        assert_eq!(m.register("https://a:2".into(), "cpu".into(), 0, Some(a), Some("w-a")), Ok(a));
    }

    #[tokio::test]
    async fn keep_alive_holds_the_lease() {
        let m = EmbeddedMembership::new(Duration::from_millis(150));
        let a = m.register("http://a".into(), "cpu".into(), 0, None, None).expect("registers");
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(m.keep_alive(a));
        }
        assert_eq!(m.watch().await.expect("watch").members.len(), 1);
    }
}
