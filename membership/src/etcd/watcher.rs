//! The task behind one [`MemberWatch`](crate::membership::MemberWatch): it
//! owns the etcd watch stream of the workers prefix and turns its events into
//! [`MemberEvent`]s.
//!
//! When the stream breaks (etcd down, the member it talked to stopped, no
//! answer to progress requests, the revision compacted) it lists the prefix
//! again with backoff until etcd answers, reports the difference against what
//! it reported last, and watches again from the new listing. A member missing
//! from that listing gets one lease TTL to register again (its keep-alive may
//! have failed during the outage) before its `Left`.
use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use zeroshard_offload::plan::WorkerId;

use super::{parse_member, Store, CALL_TIMEOUT};
use crate::error::Result;
use crate::{Member, MemberEvent};

/// The members now, by id, and the store revision they were read at.
pub(super) async fn snapshot(store: &Store) -> Result<(Vec<Member>, i64)> {
    let prefix = store.keys.workers_prefix();
    let got = store
        .request("listing workers", |mut c| {
            let prefix = prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
    let revision = got.header().map_or(0, |h| h.revision());
    let mut members: Vec<Member> = got.kvs().iter().filter_map(|kv| parse_member(&store.keys, kv)).collect();
    members.sort_by_key(|m| m.id);
    Ok((members, revision))
}

pub(super) struct Watcher {
    store: Store,
    ttl: Duration,
    /// What the receiver knows: every member reported and not yet left.
    reported: BTreeMap<WorkerId, Member>,
    /// Reported members missing from a listing after an outage, and when their
    /// time to register again ends.
    missing: BTreeMap<WorkerId, Instant>,
    events: mpsc::UnboundedSender<MemberEvent>,
}

impl Watcher {
    pub(super) fn new(
        store: Store,
        ttl: Duration,
        members: &[Member],
        events: mpsc::UnboundedSender<MemberEvent>,
    ) -> Self {
        let reported = members.iter().map(|m| (m.id, m.clone())).collect();
        Self { store, ttl, reported, missing: BTreeMap::new(), events }
    }

    /// Follows the prefix from `revision` until the membership is dropped
    /// (`alive` closes) or the receiver is.
    pub(super) async fn run(mut self, mut revision: i64, mut alive: watch::Receiver<()>) {
        let events = self.events.clone();
        loop {
            let why = tokio::select! {
                why = self.follow(revision) => why,
                _ = alive.changed() => return,
                _ = events.closed() => return,
            };
            tracing::warn!(
                "etcd watch of {} broke ({why}); listing the workers again",
                self.store.describe()
            );
            revision = tokio::select! {
                r = self.resync() => r,
                _ = alive.changed() => return,
                _ = events.closed() => return,
            };
        }
    }

    /// Watches from `revision` until the stream fails; returns why.
    async fn follow(&mut self, revision: i64) -> String {
        let prefix = self.store.keys.workers_prefix();
        let watch = self.store.call(|mut c| {
            let prefix = prefix.clone();
            let options = WatchOptions::new().with_prefix().with_start_revision(revision);
            async move { c.watch(prefix, Some(options)).await }
        });
        let (mut requests, mut responses) = match watch.await {
            Ok(stream) => stream.split(),
            Err(e) => return format!("watching: {e}"),
        };
        // A silent stream is asked for progress every TTL; no answer for two
        // rounds means etcd is gone even if the connection looks open.
        let probe = self.ttl.max(Duration::from_secs(1));
        let mut ticker = tokio::time::interval_at(Instant::now() + probe, probe);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            let grace_end = self.missing.values().min().copied();
            tokio::select! {
                message = responses.message() => match message {
                    Ok(Some(response)) => {
                        heard = Instant::now();
                        if response.canceled() {
                            return format!("watch canceled: {}", response.cancel_reason());
                        }
                        for event in response.events() {
                            self.apply(event);
                        }
                    }
                    Ok(None) => return "etcd closed the stream".into(),
                    Err(e) => return e.to_string(),
                },
                _ = ticker.tick() => {
                    if heard.elapsed() > 2 * probe + CALL_TIMEOUT {
                        return format!("no answer for {:?}", heard.elapsed());
                    }
                    if let Err(e) = requests.request_progress().await {
                        return e.to_string();
                    }
                }
                _ = tokio::time::sleep_until(grace_end.unwrap_or_else(Instant::now)), if grace_end.is_some() => {
                    self.expire_missing();
                }
            }
        }
    }

    /// Lists the prefix until etcd answers, reports what changed since the
    /// last report, and returns the revision to watch from.
    async fn resync(&mut self) -> i64 {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            match snapshot(&self.store).await {
                Ok((members, revision)) => {
                    if failures > 0 {
                        tracing::warn!("etcd {} answers again", self.store.describe());
                    }
                    self.reconcile(members);
                    return revision + 1;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!("{e}; retrying until etcd answers");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.ttl.max(Duration::from_secs(1)));
                }
            }
        }
    }

    /// Reports the difference between a fresh listing and the last report.
    fn reconcile(&mut self, members: Vec<Member>) {
        let listed: BTreeMap<WorkerId, Member> = members.into_iter().map(|m| (m.id, m)).collect();
        for member in listed.values() {
            self.joined(member.clone());
        }
        let grace_end = Instant::now() + self.ttl;
        for id in self.reported.keys().filter(|id| !listed.contains_key(id)) {
            self.missing.entry(*id).or_insert(grace_end);
        }
    }

    fn apply(&mut self, event: &etcd_client::Event) {
        let Some(kv) = event.kv() else { return };
        match event.event_type() {
            EventType::Put => {
                if let Some(member) = parse_member(&self.store.keys, kv) {
                    self.joined(member);
                }
            }
            EventType::Delete => {
                if let Some(id) = self.store.keys.worker_id(kv.key()) {
                    self.left(id);
                }
            }
        }
    }

    /// Reports `member` unless the receiver knows it already as it is.
    fn joined(&mut self, member: Member) {
        self.missing.remove(&member.id);
        if self.reported.get(&member.id) != Some(&member) {
            self.reported.insert(member.id, member.clone());
            let _ = self.events.send(MemberEvent::Joined(member));
        }
    }

    fn left(&mut self, id: WorkerId) {
        self.missing.remove(&id);
        if self.reported.remove(&id).is_some() {
            let _ = self.events.send(MemberEvent::Left(id));
        }
    }

    /// Reports as left the missing members whose time to come back is over.
    fn expire_missing(&mut self) {
        let now = Instant::now();
        let over: Vec<WorkerId> =
            self.missing.iter().filter(|(_, end)| **end <= now).map(|(id, _)| *id).collect();
        for id in over {
            tracing::info!("{id} did not register again within {:?} after etcd came back", self.ttl);
            self.left(id);
        }
    }
}
