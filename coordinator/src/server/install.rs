//! Installing a plan, the supervisor's part that talks to every worker: take
//! over the stored plan when its workers still hold it, or plan the next epoch
//! and install it in two phases (`InstallPlan` everywhere, then
//! `ActivatePlan` everywhere), each call with a deadline (an install's grows
//! with the bytes the worker loads: `ClusterConfig::install_deadline`), while
//! still following membership and faults; read what each worker admits for
//! admission; and, when an installation fails, end the start or evict the
//! workers that failed (a worker that misses its deadline among them).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use zeroshard_offload::plan::{plan, Plan, PlanOptions, WorkerId};

use super::state::{Readiness, WorkerEntry};
use super::supervisor::{Supervisor, PROBE_TIMEOUT, RETRY_AFTER};
use super::worker_client::{model_info, Install, Unanswered};
use crate::membership::{MemberEvent, StoredPlan};

/// How long a worker may take to switch to an installed epoch.
const ACTIVATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Supervisor {
    /// Takes over the stored plan when every worker of it still holds its epoch.
    pub(super) async fn adopt(&mut self, stored: &StoredPlan) -> bool {
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
        self.activate(Arc::new(stored.plan.clone()), format!("resumed epoch {epoch} from the stored plan"));
        tracing::info!(
            "resumed epoch {epoch} on {} workers from the stored plan; nothing reloaded",
            workers.len()
        );
        true
    }

    /// Plans the next epoch over `live` and installs it (two phases).
    pub(super) async fn replan(&mut self, live: &[WorkerId]) {
        let coord = self.coord.clone();
        if let Err(e) = coord.model().ckpt.verify() {
            return self.checkpoint_changed(e.to_string(), live);
        }
        let epoch = {
            let mut st = coord.lock();
            let last = st.planned_epoch.max(self.stored.as_ref().map_or(0, |s| s.plan.epoch()));
            st.planned_epoch = last + 1;
            last + 1
        };
        if !self.served {
            coord.set_readiness(Readiness::Loading);
        }
        let replicas = coord.cfg().replicas.min(live.len() as u32);
        let placement = self.choose_placement(live, replicas, epoch).await;
        let options = PlanOptions {
            epoch,
            persistence_threshold_bytes: coord.cfg().persistence_threshold_bytes,
            replicas,
            tensor_degree: placement.tensor_degree,
            ..PlanOptions::default()
        };
        let plan = match plan(&coord.model().meta, live, &options) {
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
                pull_from: coord.cfg().pull.then(|| coord.advertise().to_string()),
                model: model_info(&coord),
                digests: coord
                    .model()
                    .digests
                    .get()
                    .expect("the supervisor loads the digests before it plans"),
                coordinator_shards: coord.advertise().to_string(),
            };
            let plan = plan.clone();
            let deadline = coord.cfg().install_deadline(plan.owned_bytes(w.id).map_or(0, |o| o.total()));
            async move { (w, w.client.install(w.id, &plan, how, deadline).await) }
        });
        let total: u64 = live.iter().filter_map(|w| plan.owned_bytes(*w).ok()).map(|o| o.total()).sum();
        let (stop_bar, bar_stopped) = tokio::sync::oneshot::channel();
        let bar = tokio::spawn(super::progress::follow(workers.clone(), total, epoch, bar_stopped));
        let installing: Vec<WorkerId> = workers.iter().map(|w| w.id).collect();
        let results = self.following(futures::future::join_all(installs), &installing).await;
        let _ = stop_bar.send(());
        let _ = bar.await;
        let results = match results {
            Ok(r) => r,
            Err(why) => {
                // The installs are dropped (their calls cancelled); the churn
                // or the retry plans the next epoch without that worker.
                tracing::warn!("epoch {epoch}: installation abandoned: {why}");
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                return;
            }
        };
        let mut failed = Vec::new();
        for (w, r) in results {
            match r {
                Ok((owned_bytes, load_ms)) if load_ms > 0.0 => zeroshard_offload::errln!(
                    "{}: loaded {:.1} MB in {:.2} s ({:.2} GB/s) for epoch {epoch}",
                    w.id,
                    owned_bytes as f64 / 1e6,
                    load_ms / 1e3,
                    owned_bytes as f64 / (load_ms / 1e3).max(1e-9) / 1e9
                ),
                Ok(_) => {}
                Err(Unanswered::Failed(why)) => {
                    failed.push((w.id, format!("{} at {} could not load its ranges: {why}", w.id, w.address)))
                }
                Err(Unanswered::Silent(after)) => {
                    coord.counters().install_deadlines_missed.fetch_add(1, Ordering::Relaxed);
                    failed.push((
                        w.id,
                        format!(
                            "{} at {} did not install epoch {epoch} within its deadline ({after:?})",
                            w.id, w.address
                        ),
                    ))
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
            async move { (w.id, client.activate(epoch, ACTIVATE_TIMEOUT).await) }
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
            pull: coord.cfg().pull,
        };
        if let Err(e) = coord.membership().store_plan(&stored).await {
            tracing::warn!("storing epoch {epoch} in {}: {e}", coord.membership().describe());
        }
        self.stored = None;
        for w in &workers {
            self.held_out.remove(&w.id);
        }
        self.learn_capacity(&workers).await;
        self.activate(plan, placement.reason);
        tracing::info!(
            "epoch {epoch} active on {} workers in {:.2} s",
            workers.len(),
            start.elapsed().as_secs_f64()
        );
    }

    /// Runs `work` (the installs of an epoch over `installing`) while still
    /// following membership and the fault watch: a worker of `installing`
    /// that leaves (its lease expired) or is banned meanwhile abandons the
    /// installation (`Err`, why); other changes are recorded for the next
    /// reconcile.
    async fn following<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        installing: &[WorkerId],
    ) -> Result<T, String> {
        tokio::pin!(work);
        loop {
            let gone = tokio::select! {
                done = &mut work => return Ok(done),
                Some(ev) = self.events.recv() => {
                    let gone = match &ev {
                        MemberEvent::Left(id) if installing.contains(id) => Some(format!("{id} left the cluster")),
                        _ => None,
                    };
                    self.apply(ev);
                    gone
                }
                Some(f) = self.faulty.recv() => {
                    let id = f.id;
                    self.ban(f);
                    installing.contains(&id).then(|| format!("{id} was banned"))
                }
            };
            if let Some(why) = gone {
                return Err(why);
            }
        }
    }

    /// Workers of the active plan that joined again since the last look
    /// (back after a short absence, the plan unchanged): their capacity is
    /// read again, as at activation.
    pub(super) async fn relearn_capacity(&mut self) {
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
                self.coord.admission().set_capacity(id, c);
            }
        }
    }

    fn activate(&mut self, plan: Arc<Plan>, placement_reason: String) {
        {
            let mut st = self.coord.lock();
            st.planned_epoch = st.planned_epoch.max(plan.epoch());
            st.plan = Some(plan);
            st.placement_reason = placement_reason;
        }
        self.degraded.clear();
        self.served = true;
        self.coord.set_readiness(Readiness::Ready);
        self.coord.set_unservable(None);
        self.coord.bump();
    }

    /// The checkpoint changed under the coordinator: no epoch can load from
    /// it again (the workers' copies would fail their digests, and `--pull`
    /// reads fail). The active plan goes on while every worker of it lives;
    /// otherwise nothing can be served until a restart, and requests are told
    /// so at once. Said once; nothing is installed.
    fn checkpoint_changed(&mut self, why: String, live: &[WorkerId]) {
        if !self.served {
            self.failed = true;
            self.coord.set_readiness(Readiness::Failed(why));
            return;
        }
        if !self.checkpoint_changed {
            tracing::error!("{why}: no new epoch can load");
        }
        self.checkpoint_changed = true;
        let plan = self.coord.lock().plan.clone();
        let intact = plan
            .is_some_and(|p| p.workers().iter().all(|w| live.contains(w) && !self.banned.contains_key(w)));
        if !intact {
            self.coord.set_unservable(Some(super::state::Unservable { why, until_restart: true }));
        }
    }

    /// An installation failed: before the cluster ever served this ends it (the
    /// error reaches `up`); afterwards the failed workers are evicted and the
    /// next reconcile plans around them.
    async fn fail(&mut self, msg: String, workers: &[WorkerId]) {
        if !self.served {
            self.failed = true;
            self.coord.set_readiness(Readiness::Failed(msg));
            return;
        }
        for w in workers {
            let failures = self.held_out.get(w).map_or(0, |h| h.failures) + 1;
            let held = super::supervisor::HeldOut::after(failures, msg.clone());
            tracing::warn!(
                "{msg}; evicting {w}, not planned again for {} s (failure {failures} in a row)",
                super::supervisor::HeldOut::hold(failures).as_secs()
            );
            self.held_out.insert(*w, held);
            let _ = self.coord.membership().evict(*w).await;
        }
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
    }
}
