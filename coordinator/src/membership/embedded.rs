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
use zeroshard_security::{Credential, KeyId};

/// Why a registration was refused; each names who asked and who holds what
/// was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The id is bound to another key.
    IdTaken { id: WorkerId, holder: Credential },
    /// A live member registered by another key serves at that address.
    AddressTaken { address: String, id: WorkerId, holder: Credential },
    /// The key is banned.
    Banned { why: String },
    /// The key registered more than [`REGISTRATION_BURST`] times, faster
    /// than [`REGISTRATIONS_PER_S`].
    TooOften,
}

/// Registrations one key may make at once (a fleet starting whose workers
/// share one certificate)...
pub const REGISTRATION_BURST: f64 = 32.0;
/// ... and then per second.
pub const REGISTRATIONS_PER_S: f64 = 1.0;

impl Refusal {
    /// The refusal in words, `by` being who asked.
    pub fn describe(&self, by: Option<&Credential>) -> String {
        let by = by.map_or_else(|| "an anonymous caller".to_string(), ToString::to_string);
        match self {
            Self::IdTaken { id, holder } => format!("{id} belongs to {holder}; {by} may not take it"),
            Self::AddressTaken { address, id, holder } => {
                format!("{address} is the address of {id}, registered by {holder}; {by} may not take it")
            }
            Self::Banned { why } => {
                format!("{by} is banned: {why} (a coordinator restart lifts it)")
            }
            Self::TooOften => format!(
                "{by} registers too often (more than {REGISTRATION_BURST} at once, then \
                 {REGISTRATIONS_PER_S} a second): try again later"
            ),
        }
    }
}

struct State {
    /// Live members and when their lease runs out.
    members: BTreeMap<WorkerId, (Member, Instant)>,
    /// The certificate that registered each id (under TLS): an id stays bound
    /// to its key, live or not, for the coordinator's life.
    owners: BTreeMap<WorkerId, Credential>,
    /// Keys that may not register again, and why (for the coordinator's life).
    banned: BTreeMap<KeyId, String>,
    /// Each key's registration allowance: tokens left, and when it was counted.
    allowance: BTreeMap<KeyId, (f64, Instant)>,
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
                banned: BTreeMap::new(),
                allowance: BTreeMap::new(),
                next_id: 1,
                plan: None,
                subscribers: Vec::new(),
            })),
            ttl,
        };
        let weak = Arc::downgrade(&m.state);
        let mut last = Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 4).await;
                let Some(state) = weak.upgrade() else { return };
                let mut st = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                // Overslept by more than half a lease: this process was paused
                // (SIGSTOP, a frozen VM), and the keep-alives sent meanwhile
                // were never read. Leases resume where they were instead of
                // all expiring at once: a worker that is really gone expires
                // within a TTL of the resumption.
                let paused = now.saturating_duration_since(last).saturating_sub(ttl / 4);
                last = now;
                if paused > ttl / 2 {
                    tracing::warn!(
                        "this coordinator was paused for {paused:.1?}: every lease resumes where it was"
                    );
                    for (_, d) in st.members.values_mut() {
                        *d += paused;
                    }
                    continue;
                }
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
    /// id. `owner` is the registering certificate (`None` without TLS): an id
    /// registered by one key cannot be taken by another, nor a live member's
    /// address, and a banned key registers nothing.
    pub fn register(
        &self,
        address: String,
        device: String,
        memory_bytes: u64,
        prior: Option<WorkerId>,
        owner: Option<&Credential>,
    ) -> std::result::Result<WorkerId, Refusal> {
        let mut st = self.lock();
        let key = owner.map(|o| o.key);
        if let Some(why) = key.and_then(|k| st.banned.get(&k)) {
            return Err(Refusal::Banned { why: why.clone() });
        }
        if let Some(k) = key {
            let now = Instant::now();
            let (tokens, at) = st.allowance.entry(k).or_insert((REGISTRATION_BURST, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * REGISTRATIONS_PER_S)
                .min(REGISTRATION_BURST);
            *at = now;
            if *tokens < 1.0 {
                return Err(Refusal::TooOften);
            }
            *tokens -= 1.0;
        }
        let foreign = |bound: &Credential| Some(bound.key) != key;
        if let Some((id, holder)) = st.members.iter().find_map(|(id, (m, _))| {
            let holder = st.owners.get(id).filter(|h| m.address == address && foreign(h))?;
            Some((*id, holder.clone()))
        }) {
            return Err(Refusal::AddressTaken { address, id, holder });
        }
        let id = match prior {
            Some(id) if id.0 < st.next_id => {
                if let Some(holder) = st.owners.get(&id).filter(|h| foreign(h)) {
                    return Err(Refusal::IdTaken { id, holder: holder.clone() });
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
            st.owners.insert(id, o.clone());
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

    /// Whether `key` may act for `id` (renew, leave): the id is bound to it,
    /// or to nobody (registered without TLS).
    pub fn owned_by(&self, id: WorkerId, key: Option<KeyId>) -> bool {
        self.lock().owners.get(&id).is_none_or(|bound| Some(bound.key) == key)
    }

    /// The certificate that registered `id`.
    pub fn owner(&self, id: WorkerId) -> Option<Credential> {
        self.lock().owners.get(&id).cloned()
    }

    /// Refuses every later registration by `key` (the running ones stay until
    /// they leave or are evicted).
    pub fn ban(&self, key: KeyId, why: String) {
        self.lock().banned.insert(key, why);
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

    /// A coordinator that was paused (its runtime blocked here, as by
    /// SIGSTOP) does not expire the leases it could not renew meanwhile; a
    /// worker that stays silent after the pause still expires.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pause_of_the_coordinator_expires_no_lease() {
        let ttl = Duration::from_millis(400);
        let m = EmbeddedMembership::new(ttl);
        let a = m.register("http://a".into(), "cpu".into(), 0, None, None).expect("registers");
        let mut w = m.watch().await.expect("watch");
        std::thread::sleep(ttl * 3); // nothing runs: the process is "stopped"
        tokio::time::sleep(ttl / 2).await;
        assert!(m.keep_alive(a), "the lease expired during the pause");
        // Silent from now on: it expires within a TTL or so.
        let t = Instant::now();
        assert_eq!(w.events.recv().await, Some(MemberEvent::Left(a)));
        assert!(t.elapsed() < ttl * 2, "{:?}", t.elapsed());
    }

    fn cred(name: &str, key: u8) -> Credential {
        let identity =
            zeroshard_security::Identity::new(zeroshard_security::Role::Worker, name).expect("name");
        Credential { identity, key: KeyId([key; 32]) }
    }

    #[tokio::test]
    async fn an_id_and_a_live_address_stay_bound_to_the_key_that_registered_them() {
        let m = EmbeddedMembership::new(Duration::from_secs(5));
        let (w_a, same_name, w_b) = (cred("w-a", 1), cred("w-a", 2), cred("w-b", 3));
        let a = m.register("https://a:1".into(), "cpu".into(), 0, None, Some(&w_a)).expect("registers");
        // Another key, even under the same name, takes neither the id nor the address.
        for other in [&same_name, &w_b] {
            let e =
                m.register("https://rogue:1".into(), "cpu".into(), 0, Some(a), Some(other)).expect_err("id");
            assert_eq!(e, Refusal::IdTaken { id: a, holder: w_a.clone() });
            let words = e.describe(Some(other));
            assert!(
                words.contains(&w_a.key.to_string()) && words.contains(&other.key.to_string()),
                "{words}"
            );
            let e =
                m.register("https://a:1".into(), "cpu".into(), 0, None, Some(other)).expect_err("address");
            assert_eq!(
                e,
                Refusal::AddressTaken { address: "https://a:1".into(), id: a, holder: w_a.clone() }
            );
        }
        let e = m.register("https://rogue:1".into(), "cpu".into(), 0, Some(a), None).expect_err("anonymous");
        assert!(matches!(e, Refusal::IdTaken { .. }));
        assert!(m.owned_by(a, Some(w_a.key)) && !m.owned_by(a, Some(same_name.key)));
        assert_eq!(m.watch().await.expect("watch").members[0].address, "https://a:1");
        // The key itself may move its id, and register more ids.
        assert_eq!(m.register("https://a:2".into(), "cpu".into(), 0, Some(a), Some(&w_a)), Ok(a));
        let b = m.register("https://b:1".into(), "cpu".into(), 0, None, Some(&w_b)).expect("registers");
        assert_ne!(a, b);
        // A banned key registers nothing, under any id; the others are unaffected.
        m.ban(w_b.key, "served 3 blocks that failed the digest".into());
        for prior in [Some(b), None] {
            let e = m.register("https://b:1".into(), "cpu".into(), 0, prior, Some(&w_b)).expect_err("banned");
            assert!(matches!(&e, Refusal::Banned { why } if why.contains("digest")), "{e:?}");
        }
        assert_eq!(m.register("https://a:2".into(), "cpu".into(), 0, Some(a), Some(&w_a)), Ok(a));
        assert_eq!(m.owner(b), Some(w_b));
    }

    #[tokio::test]
    async fn a_key_that_registers_in_a_flood_is_slowed_and_the_others_are_not() {
        let m = EmbeddedMembership::new(Duration::from_secs(5));
        let (rogue, honest) = (cred("rogue", 7), cred("w-a", 1));
        let mut taken = 0;
        for i in 0..100 {
            match m.register(format!("https://10.0.0.1:{}", 1000 + i), "cpu".into(), 0, None, Some(&rogue)) {
                Ok(_) => taken += 1,
                Err(e) => assert_eq!(e, Refusal::TooOften),
            }
        }
        assert_eq!(taken, REGISTRATION_BURST as usize, "the burst, then nothing within the same instant");
        assert!(m.register("https://a:1".into(), "cpu".into(), 0, None, Some(&honest)).is_ok());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(m.register("https://10.0.0.1:2000".into(), "cpu".into(), 0, None, Some(&rogue)).is_ok());
        assert_eq!(
            m.register("https://10.0.0.1:2001".into(), "cpu".into(), 0, None, Some(&rogue)),
            Err(Refusal::TooOften)
        );
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
