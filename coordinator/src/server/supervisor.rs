//! The supervisor: the one task that changes the cluster's members and plan.
//!
//! It follows the membership's events and the failures request handlers
//! report, and after each change *reconciles*:
//! - no plan yet: resume the stored plan when every worker of it is back and
//!   still holds its epoch (a restarted coordinator; nothing reloads), else plan
//!   once `--workers` workers are there;
//! - a worker of the plan lost: when replicas still cover every range, keep the
//!   epoch (gathers fail over, nothing reloads); else plan the next epoch over
//!   the survivors;
//! - a worker joined: plan the next epoch over everyone.
//!
//! A registered member counts only once it has answered a probe at the
//! address it registered ([`Supervisor::answering`]): a registration at an
//! address nobody serves is never planned.
//!
//! - a worker that served blocks failing the checkpoint's digests (reported by
//!   [`faults`](super::faults)) or tokens failing output audits
//!   ([`audit`](super::audit)): banned by id from planning for good, and the
//!   next epoch planned without it (it stays registered, and gets no sequences).
//!   Bans are stored in membership (etcd: beside the plan), so a restarted
//!   coordinator keeps them.
//!
//! Membership churn is debounced: a burst of joins and departures is
//! reconciled once, [`QUIET`] after the last of them (or [`MOST_DEFERRED`]
//! after the first, if it never quiets), so a storm of short-lived
//! registrations yields one new epoch, not one per event.
//!
//! A new epoch is installed in two phases ([`install`](super::install)) —
//! every worker loads its new ranges (`InstallPlan`) while still computing
//! under the old epoch, then every worker switches (`ActivatePlan`) — so
//! running sequences continue. After a plan activates (and when a worker of it
//! comes back) the supervisor reads what each worker admits and tells admission.
//!
//! It wakes when told something (a membership event, a fault, a failure a
//! request saw) or at a deadline of its own: the end of a churn's quiet
//! time, the end of the wait for a stored plan's workers, the retry after a
//! failed installation. Nothing is re-checked on a timer otherwise.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use zeroshard_offload::plan::WorkerId;

use super::state::{Coordinator, Readiness, Unservable, WorkerEntry};
use super::worker_client::Unanswered;
use super::DrainState;
use crate::membership::{Ban, MemberEvent, MemberWatch, StoredPlan};

/// A worker that does not answer `Stats` this fast is left to its lease.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Membership must be still this long before the supervisor acts on a change.
const QUIET: Duration = Duration::from_millis(300);
/// ... but it acts at the latest this long after the first unsettled change.
const MOST_DEFERRED: Duration = Duration::from_secs(5);
/// After an installation failed (its workers evicted), the next reconcile.
pub(super) const RETRY_AFTER: Duration = Duration::from_millis(200);
/// A member that did not answer at its address is probed again this much later.
const UNANSWERED_RETRY: Duration = Duration::from_secs(2);
/// A worker that failed to load its ranges is left out of planning this long,
/// doubled at each further failure up to [`HOLD_OUT_MOST`]: it re-registers at
/// once, and planning it again at once would only repeat the failure.
const HOLD_OUT_FIRST: Duration = Duration::from_secs(2);
const HOLD_OUT_MOST: Duration = Duration::from_secs(300);

/// A worker left out of planning after its loads failed.
pub(super) struct HeldOut {
    pub until: Instant,
    pub failures: u32,
    pub why: String,
}

impl HeldOut {
    /// How long a worker is held out after `failures` failures in a row.
    pub(super) fn hold(failures: u32) -> Duration {
        HOLD_OUT_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(HOLD_OUT_MOST)
    }

    /// Held out from now, after `failures` failures in a row.
    pub(super) fn after(failures: u32, why: String) -> Self {
        Self { until: Instant::now() + Self::hold(failures), failures, why }
    }
}

pub(super) struct Supervisor {
    pub(super) coord: Coordinator,
    /// The plan membership had stored when this coordinator started.
    pub(super) stored: Option<StoredPlan>,
    /// Until then, wait for the stored plan's workers to re-register.
    pub(super) resume_until: Instant,
    /// A plan was active at some point (later failures do not end the cluster).
    pub(super) served: bool,
    /// Starting failed for good (the error is in `Readiness::Failed`).
    pub(super) failed: bool,
    /// Lost workers already reported as covered by replicas.
    pub(super) degraded: BTreeSet<WorkerId>,
    /// Workers that served corrupt blocks: never planned again.
    /// Banned from planning, and why (stored with the plan under etcd).
    pub(super) banned: BTreeMap<WorkerId, String>,
    /// Unsettled membership: when the first and the last change not yet
    /// reconciled happened.
    pub(super) churn: Option<(Instant, Instant)>,
    /// Reconcile again at this time (an installation failed).
    pub(super) retry_at: Option<Instant>,
    /// Workers that joined since the last reconcile: those of an active plan
    /// (back after a short absence) have their capacity read again.
    pub(super) joined: Vec<WorkerId>,
    /// Members that answered a probe at the address they registered (only
    /// those are planned); forgotten when they leave or move.
    pub(super) answered: BTreeSet<WorkerId>,
    /// Members already reported as not answering (reported once).
    pub(super) silent: BTreeSet<WorkerId>,
    /// Workers whose loads failed, left out of planning for a while.
    pub(super) held_out: BTreeMap<WorkerId, HeldOut>,
    /// The checkpoint changed under this coordinator: no epoch can load
    /// until it is restarted (`State::unservable` says why).
    pub(super) checkpoint_changed: bool,
    /// Links between workers measured for `--placement auto`.
    pub(super) links: super::choose::Links,
    /// Membership's changes, and the workers the fault watch names: followed
    /// between reconciles and while an epoch installs.
    pub(super) events: mpsc::UnboundedReceiver<MemberEvent>,
    pub(super) faulty: mpsc::UnboundedReceiver<super::faults::Faulty>,
}

/// What woke the supervisor.
enum Woke {
    Event(Option<MemberEvent>),
    Fault(super::faults::Faulty),
    Report,
    Time,
}

pub(super) async fn run(
    coord: Coordinator,
    mut reports: mpsc::UnboundedReceiver<WorkerId>,
    faulty: mpsc::UnboundedReceiver<super::faults::Faulty>,
) {
    let membership = coord.membership().clone();
    let MemberWatch { members, events } = match membership.watch().await {
        Ok(w) => w,
        Err(e) => {
            coord.set_readiness(Readiness::Failed(format!("membership {}: {e}", membership.describe())));
            return;
        }
    };
    if let Err(e) = coord.load_digests().await {
        coord.set_readiness(Readiness::Failed(format!("digesting the checkpoint: {e}")));
        return;
    }
    let stored = match membership.load_plan().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("reading the stored plan: {e}; planning anew");
            None
        }
    };
    let banned = match membership.load_bans().await {
        Ok(bans) => {
            for b in &bans {
                tracing::warn!("worker {} stays banned from planning: {}", b.id, b.why);
            }
            bans.into_iter().map(|b| (WorkerId(b.id), b.why)).collect()
        }
        Err(e) => {
            tracing::warn!("reading the stored bans: {e}; none kept");
            BTreeMap::new()
        }
    };
    let ttl = coord.cfg().lease_ttl;
    let mut sup = Supervisor {
        coord,
        stored,
        resume_until: Instant::now() + ttl * 2,
        served: false,
        failed: false,
        degraded: BTreeSet::new(),
        banned,
        churn: None,
        retry_at: None,
        joined: Vec::new(),
        answered: BTreeSet::new(),
        silent: BTreeSet::new(),
        held_out: BTreeMap::new(),
        checkpoint_changed: false,
        links: Default::default(),
        events,
        faulty,
    };
    tokio::spawn(super::faults::watch(sup.coord.clone(), sup.coord.faulty_sender()));
    for m in members {
        sup.apply(MemberEvent::Joined(m));
    }
    loop {
        // Each pass follows something it was told, or a deadline of its own.
        if sup.settled() {
            sup.churn = None;
            sup.retry_at = None;
            sup.reconcile().await;
            sup.relearn_capacity().await;
        }
        let next = sup.next_look();
        let woke = tokio::select! {
            ev = sup.events.recv() => Woke::Event(ev),
            Some(f) = sup.faulty.recv() => Woke::Fault(f),
            Some(_) = reports.recv() => Woke::Report,
            _ = sleep_until(next) => Woke::Time,
        };
        match woke {
            Woke::Event(Some(ev)) => sup.apply(ev),
            Woke::Event(None) => {
                tracing::error!("membership {} stopped reporting", membership.describe());
                return;
            }
            Woke::Fault(f) => sup.ban(f),
            Woke::Report => {
                while reports.try_recv().is_ok() {}
                sup.probe_all().await;
            }
            Woke::Time => {}
        }
        while let Ok(ev) = sup.events.try_recv() {
            sup.apply(ev);
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    /// A worker served blocks failing the checkpoint's digests: banned from
    /// planning, and its certificate's key from registering again (under
    /// embedded membership, which sees the key register; under etcd the ban
    /// holds for the id).
    pub(super) fn ban(&mut self, f: super::faults::Faulty) {
        if self.banned.contains_key(&f.id) {
            return; // already banned (a late audit of an earlier sequence of it)
        }
        if f.cause == super::faults::Cause::Audits {
            self.coord.audits().banned.fetch_add(1, Ordering::Relaxed);
        }
        let why = f.why;
        self.banned.insert(f.id, why.clone());
        let bans: Vec<Ban> = self.banned.iter().map(|(id, why)| Ban { id: id.0, why: why.clone() }).collect();
        let membership = self.coord.membership().clone();
        tokio::spawn(async move {
            if let Err(e) = membership.store_bans(&bans).await {
                tracing::error!("storing the bans in membership {}: {e}", membership.describe());
            }
        });
        let owner = self.coord.embedded().and_then(|m| m.owner(f.id).map(|o| (m, o)));
        match owner {
            Some((m, o)) => {
                tracing::error!("{why}: evicting it; {o} is banned from registering again");
                m.ban(o.key, why);
            }
            None => tracing::error!("{why}: evicting it (banned from planning)"),
        }
    }

    /// Whether membership has been still long enough to act on (see the module docs).
    fn settled(&self) -> bool {
        self.churn.is_none_or(|(first, last)| last.elapsed() >= QUIET || first.elapsed() >= MOST_DEFERRED)
    }

    /// Until when reconcile waits for the stored plan's workers (while there
    /// is no plan yet and one is stored).
    fn waiting_for_stored(&self) -> Option<Instant> {
        let waiting = self.stored.is_some() && !self.served && !self.failed;
        waiting.then_some(self.resume_until)
    }

    /// When to look again unasked: the end of the churn's quiet time, a
    /// retry, or the end of the wait for a stored plan's workers; `None`:
    /// only when told.
    fn next_look(&self) -> Option<Instant> {
        let churn = self.churn.map(|(first, last)| (last + QUIET).min(first + MOST_DEFERRED));
        // A deadline already past is not waited for again (a retry that came
        // while membership was unsettled waits for the churn's end instead).
        let now = Instant::now();
        let retry = self.retry_at.filter(|t| *t > now);
        let stored = self.waiting_for_stored().filter(|t| *t > now);
        let held = self.held_out.values().map(|h| h.until).filter(|t| *t > now).min();
        [churn, retry, stored, held].into_iter().flatten().min()
    }

    /// Membership changed now.
    fn churned(&mut self) {
        let now = Instant::now();
        self.churn = Some(self.churn.map_or((now, now), |(first, _)| (first, now)));
    }

    pub(super) fn apply(&mut self, ev: MemberEvent) {
        let coord = self.coord.clone();
        let coord = &coord;
        match ev {
            MemberEvent::Joined(m) => {
                let mut st = coord.lock();
                if st.members.get(&m.id).is_some_and(|w| w.address == m.address) {
                    return;
                }
                match WorkerEntry::new(&m, &coord.cfg().security) {
                    Ok(w) => {
                        tracing::info!("{} joined at {}", m.id, m.address);
                        st.members.insert(m.id, w);
                        self.joined.push(m.id);
                        self.answered.remove(&m.id);
                        self.silent.remove(&m.id);
                    }
                    Err(e) => tracing::warn!("{} registered a bad address: {e}", m.id),
                }
            }
            MemberEvent::Left(id) => {
                let mut st = coord.lock();
                if st.members.remove(&id).is_none() {
                    return;
                }
                self.answered.remove(&id);
                self.silent.remove(&id);
                let in_plan = st.plan.as_ref().is_some_and(|p| p.rank(id).is_some());
                drop(st);
                if in_plan {
                    coord.counters().workers_lost.fetch_add(1, Ordering::Relaxed);
                }
                let held = if in_plan { " (it held ranges of the plan)" } else { "" };
                // While the coordinator itself stops, its workers leaving is the plan.
                if *coord.drain_state().borrow() == DrainState::Serving {
                    tracing::warn!("{id} left the cluster{held}");
                } else {
                    tracing::info!("{id} left the cluster{held}");
                }
            }
        }
        coord.bump();
        self.churned();
        if !self.served {
            let registered = coord.lock().members.len();
            coord.set_registered(registered);
        }
    }

    /// Brings the plan in line with the members (see the module docs).
    async fn reconcile(&mut self) {
        if self.failed {
            return;
        }
        let (registered, plan) = {
            let st = self.coord.lock();
            let live =
                st.members.keys().copied().filter(|w| !self.banned.contains_key(w)).collect::<Vec<_>>();
            (live, st.plan.clone())
        };
        let answering = self.answering(registered).await;
        let now = Instant::now();
        let (held, live): (Vec<WorkerId>, Vec<WorkerId>) =
            answering.into_iter().partition(|w| self.held_out.get(w).is_some_and(|h| h.until > now));
        if live.is_empty() && self.served && !self.checkpoint_changed {
            // Every worker that could serve failed its loads: say so (requests
            // fail at once) until one is tried again.
            if let Some(h) = held.iter().filter_map(|w| self.held_out.get(w)).min_by_key(|h| h.until) {
                let lacking =
                    plan.as_ref().is_none_or(|p| p.workers().iter().any(|w| !self.coord.is_member(*w)));
                if lacking {
                    self.coord.set_unservable(Some(Unservable {
                        why: format!(
                            "no worker can load the model ({}); the next try is in {} s",
                            h.why,
                            h.until.saturating_duration_since(now).as_secs().max(1)
                        ),
                        until_restart: false,
                    }));
                }
            }
        }
        let Some(plan) = plan else {
            if let Some(stored) = self.stored.clone() {
                let all_back = stored.plan.workers().iter().all(|w| live.contains(w));
                if all_back && self.adopt(&stored).await {
                    return;
                }
                if !all_back && Instant::now() < self.resume_until {
                    return; // its workers may still be re-registering
                }
                if !live.is_empty() {
                    self.replan(&live).await;
                }
                return;
            }
            if live.len() >= self.coord.cfg().workers {
                self.replan(&live).await;
            }
            return;
        };
        let joined = live.iter().any(|w| plan.rank(*w).is_none());
        let banned = plan.workers().iter().any(|w| self.banned.contains_key(w));
        if banned && !live.is_empty() {
            return self.replan(&live).await;
        }
        let lost: Vec<WorkerId> = plan.workers().iter().copied().filter(|w| !live.contains(w)).collect();
        if joined {
            self.replan(&live).await;
        } else if !lost.is_empty() && !live.is_empty() {
            // A tensor-parallel group that lost a member cannot step: always
            // re-plan (gather replicas cover a loss without one).
            if plan.tensor_degree().is_none() && plan.covered_by(&live) {
                for w in lost {
                    if self.degraded.insert(w) {
                        tracing::warn!(
                            "{w} lost; its ranges are still held by replicas: epoch {} continues without it",
                            plan.epoch()
                        );
                    }
                }
            } else {
                self.replan(&live).await;
            }
        }
    }

    /// The members of `registered` that answered a probe (`Stats`) at the
    /// address they registered, probing those not heard from yet: a
    /// registration at an address nobody serves (or a server that is not a
    /// worker of this cluster) is never planned, so it costs no installation.
    /// Those that do not answer are probed again [`UNANSWERED_RETRY`] later.
    async fn answering(&mut self, registered: Vec<WorkerId>) -> Vec<WorkerId> {
        let workers: Vec<_> = self
            .coord
            .workers()
            .into_iter()
            .filter(|w| registered.contains(&w.id) && !self.answered.contains(&w.id))
            .collect();
        let probes = workers.iter().map(|w| {
            let c = w.client.clone();
            async move { (w.id, w.address.clone(), c.progress(PROBE_TIMEOUT).await) }
        });
        for (id, address, r) in futures::future::join_all(probes).await {
            match r {
                Ok(_) => {
                    self.answered.insert(id);
                }
                Err(e) => {
                    if self.silent.insert(id) {
                        tracing::warn!(
                            "{id} registered {address} but does not answer there ({e}): not planned until it does"
                        );
                    }
                    self.retry_at = Some(Instant::now() + UNANSWERED_RETRY);
                }
            }
        }
        registered.into_iter().filter(|w| self.answered.contains(w)).collect()
    }

    /// A request saw a worker fail: evict every worker that no longer answers
    /// at all (a hung one answers nothing either; its lease decides).
    async fn probe_all(&mut self) {
        let workers = self.coord.workers();
        let probes = workers.iter().map(|w| {
            let c = w.client.clone();
            async move { (w.id, c.progress(PROBE_TIMEOUT).await) }
        });
        for (id, r) in futures::future::join_all(probes).await {
            // A hung worker answers nothing: its lease decides.
            if let Err(Unanswered::Failed(why)) = r {
                tracing::warn!("{id} does not answer ({why}): evicting it");
                if let Err(e) = self.coord.membership().evict(id).await {
                    tracing::warn!("evicting {id}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_keeps_failing_is_held_out_twice_as_long_each_time_up_to_five_minutes() {
        let holds: Vec<u64> =
            [1, 2, 3, 4, 8, 9, 10, 40, u32::MAX].into_iter().map(|n| HeldOut::hold(n).as_secs()).collect();
        assert_eq!(holds, [2, 4, 8, 16, 256, 300, 300, 300, 300]);
    }
}
