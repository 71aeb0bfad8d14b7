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
//! - a worker that served blocks failing the checkpoint's digests (reported by
//!   [`faults`](super::faults)): banned by id from planning for good, and the
//!   next epoch planned without it (it stays registered, and gets no sequences).
//!
//! Membership churn is debounced: a burst of joins and departures is
//! reconciled once, [`QUIET`] after the last of them (or [`MOST_DEFERRED`]
//! after the first, if it never quiets), so a storm of short-lived
//! registrations yields one new epoch, not one per event.
//!
//! A new epoch is installed in two phases — every worker loads its new ranges
//! (`InstallPlan`) while still computing under the old epoch, then every
//! worker switches (`ActivatePlan`) — so running sequences continue. After a
//! plan activates (and when a worker of it comes back) the supervisor reads
//! what each worker admits and tells admission ([`Supervisor::learn_capacity`]).
//!
//! It wakes when told something (a membership event, a fault, a failure a
//! request saw) or at a deadline of its own: the end of a churn's quiet
//! time, the end of the wait for a stored plan's workers, the retry after a
//! failed installation. Nothing is re-checked on a timer otherwise.
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use zeroshard_offload::plan::{plan, Plan, PlanOptions, WorkerId};

use super::state::{Coordinator, Readiness, WorkerEntry};
use super::worker_client::{model_info, Install, Unanswered};
use crate::membership::{MemberEvent, MemberWatch, StoredPlan};

/// A worker that does not answer `Stats` this fast is left to its lease.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Membership must be still this long before the supervisor acts on a change.
const QUIET: Duration = Duration::from_millis(300);
/// ... but it acts at the latest this long after the first unsettled change.
const MOST_DEFERRED: Duration = Duration::from_secs(5);
/// After an installation failed (its workers evicted), the next reconcile.
const RETRY_AFTER: Duration = Duration::from_millis(200);

struct Supervisor {
    coord: Coordinator,
    /// The plan membership had stored when this coordinator started.
    stored: Option<StoredPlan>,
    /// Until then, wait for the stored plan's workers to re-register.
    resume_until: Instant,
    /// A plan was active at some point (later failures do not end the cluster).
    served: bool,
    /// Starting failed for good (the error is in `Readiness::Failed`).
    failed: bool,
    /// Lost workers already reported as covered by replicas.
    degraded: BTreeSet<WorkerId>,
    /// Workers that served corrupt blocks: never planned again.
    banned: BTreeSet<WorkerId>,
    /// Unsettled membership: when the first and the last change not yet
    /// reconciled happened.
    churn: Option<(Instant, Instant)>,
    /// Reconcile again at this time (an installation failed).
    retry_at: Option<Instant>,
    /// Workers that joined since the last reconcile: those of an active plan
    /// (back after a short absence) have their capacity read again.
    joined: Vec<WorkerId>,
}

pub(super) async fn run(coord: Coordinator, mut reports: mpsc::UnboundedReceiver<WorkerId>) {
    let membership = coord.0.membership.clone();
    let MemberWatch { members, mut events } = match membership.watch().await {
        Ok(w) => w,
        Err(e) => {
            coord
                .0
                .ready
                .send_replace(Readiness::Failed(format!("membership {}: {e}", membership.describe())));
            return;
        }
    };
    if let Err(e) = coord.load_digests().await {
        coord.0.ready.send_replace(Readiness::Failed(format!("digesting the checkpoint: {e}")));
        return;
    }
    let stored = match membership.load_plan().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("reading the stored plan: {e}; planning anew");
            None
        }
    };
    let ttl = coord.0.cfg.lease_ttl;
    let mut sup = Supervisor {
        coord,
        stored,
        resume_until: Instant::now() + ttl * 2,
        served: false,
        failed: false,
        degraded: BTreeSet::new(),
        banned: BTreeSet::new(),
        churn: None,
        retry_at: None,
        joined: Vec::new(),
    };
    let (faulty_tx, mut faulty) = mpsc::unbounded_channel();
    tokio::spawn(super::faults::watch(sup.coord.clone(), faulty_tx));
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
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => sup.apply(ev),
                None => {
                    tracing::error!("membership {} stopped reporting", membership.describe());
                    return;
                }
            },
            Some(f) = faulty.recv() => {
                tracing::error!(
                    "{} served {} block(s) that failed the checkpoint's digest: evicting it (banned from planning)",
                    f.id,
                    f.blocks
                );
                sup.banned.insert(f.id);
            }
            Some(_) = reports.recv() => {
                while reports.try_recv().is_ok() {}
                sup.probe_all().await;
            }
            _ = sleep_until(next) => {}
        }
        while let Ok(ev) = events.try_recv() {
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
        let stored = self.waiting_for_stored().filter(|t| *t > Instant::now());
        [churn, self.retry_at, stored].into_iter().flatten().min()
    }

    /// Membership changed now.
    fn churned(&mut self) {
        let now = Instant::now();
        self.churn = Some(self.churn.map_or((now, now), |(first, _)| (first, now)));
    }

    fn apply(&mut self, ev: MemberEvent) {
        let coord = self.coord.clone();
        let coord = &coord;
        match ev {
            MemberEvent::Joined(m) => {
                let mut st = coord.lock();
                if st.members.get(&m.id).is_some_and(|w| w.address == m.address) {
                    return;
                }
                match WorkerEntry::new(&m, &coord.0.cfg.security) {
                    Ok(w) => {
                        tracing::info!("{} joined at {}", m.id, m.address);
                        st.members.insert(m.id, w);
                        self.joined.push(m.id);
                    }
                    Err(e) => tracing::warn!("{} registered a bad address: {e}", m.id),
                }
            }
            MemberEvent::Left(id) => {
                let mut st = coord.lock();
                if st.members.remove(&id).is_none() {
                    return;
                }
                let in_plan = st.plan.as_ref().is_some_and(|p| p.rank(id).is_some());
                drop(st);
                if in_plan {
                    coord.0.workers_lost.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(
                    "{id} left the cluster{}",
                    if in_plan { " (it held ranges of the plan)" } else { "" }
                );
            }
        }
        coord.bump();
        self.churned();
        if !self.served {
            let registered = coord.lock().members.len();
            coord.0.ready.send_if_modified(|r| match r {
                Readiness::Waiting { .. } => {
                    *r = Readiness::Waiting { registered, expected: coord.0.cfg.workers };
                    true
                }
                _ => false,
            });
        }
    }

    /// Brings the plan in line with the members (see the module docs).
    async fn reconcile(&mut self) {
        if self.failed {
            return;
        }
        let (live, plan) = {
            let st = self.coord.lock();
            let live = st.members.keys().copied().filter(|w| !self.banned.contains(w)).collect::<Vec<_>>();
            (live, st.plan.clone())
        };
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
            if live.len() >= self.coord.0.cfg.workers {
                self.replan(&live).await;
            }
            return;
        };
        let joined = live.iter().any(|w| plan.rank(*w).is_none());
        let banned = plan.workers().iter().any(|w| self.banned.contains(w));
        if banned && !live.is_empty() {
            return self.replan(&live).await;
        }
        let lost: Vec<WorkerId> = plan.workers().iter().copied().filter(|w| !live.contains(w)).collect();
        if joined {
            self.replan(&live).await;
        } else if !lost.is_empty() && !live.is_empty() {
            if plan.covered_by(&live) {
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

    /// Takes over the stored plan when every worker of it still holds its epoch.
    async fn adopt(&mut self, stored: &StoredPlan) -> bool {
        let epoch = stored.plan.epoch();
        let workers: Vec<WorkerEntry> = {
            let st = self.coord.lock();
            stored.plan.workers().iter().filter_map(|w| st.members.get(w).cloned()).collect()
        };
        let checks = workers.iter().map(|w| {
            let c = w.client.clone();
            async move { matches!(c.progress(PROBE_TIMEOUT * 3).await, Ok((active, _)) if active == epoch) }
        });
        if !futures::future::join_all(checks).await.into_iter().all(|ok| ok) {
            tracing::info!("the stored epoch {epoch} is not active on every worker: planning anew");
            self.stored = None;
            self.coord.lock().planned_epoch = epoch;
            return false;
        }
        self.learn_capacity(&workers).await;
        self.activate(Arc::new(stored.plan.clone()));
        tracing::info!(
            "resumed epoch {epoch} on {} workers from the stored plan; nothing reloaded",
            workers.len()
        );
        true
    }

    /// Plans the next epoch over `live` and installs it (two phases).
    async fn replan(&mut self, live: &[WorkerId]) {
        let coord = self.coord.clone();
        let inner = &coord.0;
        let epoch = {
            let mut st = coord.lock();
            let last = st.planned_epoch.max(self.stored.as_ref().map_or(0, |s| s.plan.epoch()));
            st.planned_epoch = last + 1;
            last + 1
        };
        if !self.served {
            inner.ready.send_replace(Readiness::Loading);
        }
        let options = PlanOptions {
            epoch,
            persistence_threshold_bytes: inner.cfg.persistence_threshold_bytes,
            replicas: inner.cfg.replicas.min(live.len() as u32),
            ..PlanOptions::default()
        };
        let plan = match plan(&inner.meta, live, &options) {
            Ok(p) => Arc::new(p),
            Err(e) => return self.fail(format!("planning epoch {epoch}: {e}"), &[]).await,
        };
        let workers: Vec<WorkerEntry> = {
            let st = coord.lock();
            live.iter().filter_map(|w| st.members.get(w).cloned()).collect()
        };
        let peers: Vec<(WorkerId, String)> = workers.iter().map(|w| (w.id, w.address.clone())).collect();
        let start = Instant::now();
        tracing::info!("epoch {epoch}: installing on {} workers", workers.len());
        let installs = workers.iter().map(|w| {
            let how = Install {
                peers: &peers,
                pull_from: inner.cfg.pull.then(|| inner.advertise.clone()),
                model: model_info(&coord),
                digests: inner.digests.get().expect("the supervisor loads the digests before it plans"),
                coordinator_shards: inner.advertise.clone(),
            };
            let plan = plan.clone();
            async move { (w, w.client.install(w.id, &plan, how).await) }
        });
        let total: u64 = live.iter().filter_map(|w| plan.owned_bytes(*w).ok()).map(|o| o.total()).sum();
        let (stop_bar, bar_stopped) = tokio::sync::oneshot::channel();
        let bar = tokio::spawn(super::progress::follow(workers.clone(), total, epoch, bar_stopped));
        let results = futures::future::join_all(installs).await;
        let _ = stop_bar.send(());
        let _ = bar.await;
        let mut failed = Vec::new();
        for (w, r) in results {
            match r {
                Ok((owned_bytes, load_ms)) if load_ms > 0.0 => eprintln!(
                    "{}: loaded {:.1} MB in {:.2} s ({:.2} GB/s) for epoch {epoch}",
                    w.id,
                    owned_bytes as f64 / 1e6,
                    load_ms / 1e3,
                    owned_bytes as f64 / (load_ms / 1e3).max(1e-9) / 1e9
                ),
                Ok(_) => {}
                Err(why) => {
                    failed.push((w.id, format!("{} at {} could not load its ranges: {why}", w.id, w.address)))
                }
            }
        }
        if !failed.is_empty() {
            let msg = failed.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>().join("; ");
            let ids: Vec<WorkerId> = failed.into_iter().map(|(id, _)| id).collect();
            return self.fail(msg, &ids).await;
        }
        let activations = workers.iter().map(|w| {
            let client = w.client.clone();
            async move { (w.id, client.activate(epoch).await) }
        });
        let failed: Vec<WorkerId> = futures::future::join_all(activations)
            .await
            .into_iter()
            .filter_map(|(id, r)| {
                r.err().map(|why| {
                    tracing::warn!("{id}: activating epoch {epoch}: {why}");
                    id
                })
            })
            .collect();
        if !failed.is_empty() {
            return self.fail(format!("activating epoch {epoch} failed on {failed:?}"), &failed).await;
        }
        let stored = StoredPlan {
            plan: (*plan).clone(),
            peers: workers.iter().map(|w| (w.id, w.address.clone())).collect(),
            pull: inner.cfg.pull,
        };
        if let Err(e) = inner.membership.store_plan(&stored).await {
            tracing::warn!("storing epoch {epoch} in {}: {e}", inner.membership.describe());
        }
        self.stored = None;
        self.learn_capacity(&workers).await;
        self.activate(plan);
        tracing::info!(
            "epoch {epoch} active on {} workers in {:.2} s",
            workers.len(),
            start.elapsed().as_secs_f64()
        );
    }

    /// Workers of the active plan that joined again since the last look
    /// (back after a short absence, the plan unchanged): their capacity is
    /// read again, as at activation.
    async fn relearn_capacity(&mut self) {
        let joined = std::mem::take(&mut self.joined);
        let workers: Vec<WorkerEntry> = {
            let st = self.coord.lock();
            let Some(plan) = &st.plan else { return };
            joined
                .iter()
                .filter(|w| plan.rank(**w).is_some())
                .filter_map(|w| st.members.get(w).cloned())
                .collect()
        };
        if !workers.is_empty() {
            self.learn_capacity(&workers).await;
        }
    }

    /// Reads what each worker admits and tells admission (before the plan
    /// serves, and when a worker of it comes back).
    async fn learn_capacity(&self, workers: &[WorkerEntry]) {
        let reports = workers.iter().map(|w| async move { (w.id, w.client.report(PROBE_TIMEOUT).await) });
        for (id, report) in futures::future::join_all(reports).await {
            if let Some(c) = report.and_then(|r| r.capacity) {
                self.coord.0.admission.set_capacity(id, c);
            }
        }
    }

    fn activate(&mut self, plan: Arc<Plan>) {
        {
            let mut st = self.coord.lock();
            st.planned_epoch = st.planned_epoch.max(plan.epoch());
            st.plan = Some(plan);
        }
        self.degraded.clear();
        self.served = true;
        self.coord.0.ready.send_replace(Readiness::Ready);
        self.coord.bump();
    }

    /// An installation failed: before the cluster ever served this ends it (the
    /// error reaches `up`); afterwards the failed workers are evicted and the
    /// next reconcile plans around them.
    async fn fail(&mut self, msg: String, workers: &[WorkerId]) {
        if !self.served {
            self.failed = true;
            self.coord.0.ready.send_replace(Readiness::Failed(msg));
            return;
        }
        tracing::warn!("{msg}; evicting {workers:?}");
        for w in workers {
            let _ = self.coord.0.membership.evict(*w).await;
        }
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
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
                if let Err(e) = self.coord.0.membership.evict(id).await {
                    tracing::warn!("evicting {id}: {e}");
                }
            }
        }
    }
}
