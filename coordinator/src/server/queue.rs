//! The admission task: the one owner of the queue, the room taken on every
//! worker, what each worker admits and which workers are avoided (see
//! [`admission`](super::admission) for the rules and the handle). It wakes
//! when told something (a [`Command`]) or when one of its own deadlines
//! passes, then serves the queue from its front as far as room allows.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use zeroshard_offload::plan::WorkerId;

use super::admission::{Capacity, Command, Counters, Reservation, Roster, Waiter, STALL_FOR};
use super::state::WorkerEntry;
use crate::error::CoordinatorError;

/// What this coordinator has running on a worker.
#[derive(Clone, Copy, Debug, Default)]
struct Used {
    seqs: u32,
    bytes: u64,
}

/// Whether `c` (unknown: the worker enforces its own limits) has room for
/// `tokens` more beside `u`.
fn fits(c: Option<&Capacity>, u: Used, tokens: usize) -> bool {
    c.is_none_or(|c| u.seqs < c.max_active && u.bytes + c.bytes_for(tokens) <= c.kv_cache_bytes)
}

/// KV-cache figures are in MB (10^6 bytes), as `status` shows them.
const MB: f64 = 1e6;

struct Queue {
    /// Requests waiting, in the order they will be served.
    waiting: VecDeque<Waiter>,
    used: HashMap<WorkerId, Used>,
    capacity: HashMap<WorkerId, Capacity>,
    /// Avoided workers, until when.
    stalled: HashMap<WorkerId, Instant>,
    roster: Roster,
    max_queued: usize,
    counters: Arc<Counters>,
    /// For the reservations it grants (weak: the task ends when every
    /// handle and reservation is gone).
    tx: mpsc::WeakUnboundedSender<Command>,
}

/// Runs until every sender is gone.
pub(super) async fn run(
    mut rx: mpsc::UnboundedReceiver<Command>,
    tx: mpsc::WeakUnboundedSender<Command>,
    counters: Arc<Counters>,
    max_queued: usize,
) {
    let mut q = Queue {
        waiting: VecDeque::new(),
        used: HashMap::new(),
        capacity: HashMap::new(),
        stalled: HashMap::new(),
        roster: Roster::default(),
        max_queued,
        counters,
        tx,
    };
    loop {
        let next = q.next_deadline();
        tokio::select! {
            c = rx.recv() => match c {
                Some(c) => q.apply(c),
                None => return,
            },
            _ = sleep_until(next) => {}
        }
        while let Ok(c) = rx.try_recv() {
            q.apply(c);
        }
        q.serve(Instant::now());
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Queue {
    fn apply(&mut self, c: Command) {
        match c {
            Command::Admit(w) => self.enqueue(w),
            Command::Withdraw(ticket) => self.waiting.retain(|w| w.ticket != ticket),
            Command::Release { worker, bytes } => {
                if let Some(u) = self.used.get_mut(&worker) {
                    u.seqs = u.seqs.saturating_sub(1);
                    u.bytes = u.bytes.saturating_sub(bytes);
                }
            }
            Command::Capacity { worker, capacity } => {
                self.capacity.insert(worker, capacity);
            }
            Command::Avoid(worker) => {
                self.stalled.insert(worker, Instant::now() + STALL_FOR);
            }
            Command::Roster(r) => self.roster = r,
        }
        self.counters.queued.store(self.waiting.len(), Ordering::Relaxed);
    }

    /// Queues `w`, or refuses it at once: a request no worker could ever
    /// hold, or a new one that finds the queue full.
    fn enqueue(&mut self, w: Waiter) {
        self.waiting.retain(|w| !w.reply.is_closed());
        if let Err(e) = self.check_fits_anywhere(w.tokens) {
            let _ = w.reply.send(Err(e));
            return;
        }
        if !w.resume && self.waiting.len() >= self.max_queued {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            let _ = w.reply.send(Err(CoordinatorError::Overloaded(format!(
                "the cluster is full: {} requests are queued, the most it holds (--max-queued-requests {})",
                self.waiting.len(),
                self.max_queued
            ))));
            return;
        }
        if w.resume {
            self.waiting.push_front(w);
        } else {
            self.waiting.push_back(w);
        }
    }

    /// A request no worker of the plan could ever hold (by the capacities
    /// known) is the caller's to change.
    fn check_fits_anywhere(&self, tokens: usize) -> crate::error::Result<()> {
        let Some(plan) = &self.roster.plan else { return Ok(()) };
        let caps: Vec<&Capacity> = plan.workers().iter().filter_map(|w| self.capacity.get(w)).collect();
        if caps.len() < plan.workers().len() {
            return Ok(()); // some worker's limits are not known yet: it decides
        }
        match caps.iter().map(|c| c.kv_cache_bytes).max() {
            Some(most) if caps.iter().all(|c| c.bytes_for(tokens) > c.kv_cache_bytes) => {
                Err(CoordinatorError::InvalidRequest(format!(
                    "the request needs {:.1} MB of KV cache ({tokens} tokens of prompt + max_new_tokens), \
                     more than any worker's budget ({:.1} MB, --kv-cache-bytes)",
                    caps[0].bytes_for(tokens) as f64 / MB,
                    most as f64 / MB
                )))
            }
            _ => Ok(()),
        }
    }

    /// When the task must look again unasked: the first avoidance to end, or
    /// (while the plan has no live worker) the first patience to run out.
    fn next_deadline(&self) -> Option<Instant> {
        let stall = self.stalled.values().min().copied();
        let patience =
            if self.roster.workers.is_empty() { self.waiting.iter().map(|w| w.patience).min() } else { None };
        stall.into_iter().chain(patience).min()
    }

    /// Grants room from the front of the queue on, while the front fits
    /// somewhere: on the least loaded live worker of the plan that is not
    /// avoided (avoided ones only when no other has room).
    fn serve(&mut self, now: Instant) {
        self.stalled.retain(|_, until| *until > now);
        self.waiting.retain(|w| !w.reply.is_closed());
        if let Some(u) = &self.roster.unservable {
            for w in self.waiting.drain(..) {
                let _ = w.reply.send(Err(u.error()));
            }
        } else if self.roster.plan.is_none() || self.roster.workers.is_empty() {
            // No live worker: those past their patience are refused.
            let (late, waiting): (VecDeque<Waiter>, VecDeque<Waiter>) =
                self.waiting.drain(..).partition(|w| now > w.patience);
            self.waiting = waiting;
            for w in late {
                let e = CoordinatorError::Unavailable("no live worker in the current plan".into());
                let _ = w.reply.send(Err(e));
            }
        } else {
            while let Some(front) = self.waiting.front() {
                let Some(worker) = self.pick(front.tokens) else { break };
                let Some(w) = self.waiting.pop_front() else { break };
                self.grant(w, worker);
            }
        }
        self.counters.queued.store(self.waiting.len(), Ordering::Relaxed);
    }

    fn pick(&self, tokens: usize) -> Option<WorkerEntry> {
        let pick = |stalled_ok: bool| {
            self.roster
                .workers
                .iter()
                .filter(|w| stalled_ok || !self.stalled.contains_key(&w.id))
                .filter(|w| {
                    fits(self.capacity.get(&w.id), self.used.get(&w.id).copied().unwrap_or_default(), tokens)
                })
                .min_by_key(|w| self.used.get(&w.id).map_or(0, |u| u.seqs))
                .cloned()
        };
        pick(false).or_else(|| pick(true))
    }

    fn grant(&mut self, w: Waiter, worker: WorkerEntry) {
        let (Some(plan), Some(tx)) = (self.roster.plan.clone(), self.tx.upgrade()) else { return };
        let bytes = self.capacity.get(&worker.id).map_or(0, |c| c.bytes_for(w.tokens));
        let u = self.used.entry(worker.id).or_default();
        u.seqs += 1;
        u.bytes += bytes;
        let waited = w.enqueued.elapsed();
        let nanos = waited.as_nanos() as u64;
        let c = &self.counters;
        c.admitted.fetch_add(1, Ordering::Relaxed);
        c.queue_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        c.queue_nanos_max.fetch_max(nanos, Ordering::Relaxed);
        // A receiver gone meanwhile drops the reservation, which gives the room back.
        let _ = w.reply.send(Ok((Reservation { worker, plan, bytes, tx }, waited)));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use zeroshard_offload::plan::{plan, PlanOptions, TensorMeta};
    use zeroshard_security::Security;

    use super::*;
    use crate::membership::Member;
    use crate::server::admission::Admission;

    const SOON: Duration = Duration::from_millis(100);

    /// An admission task over workers `ids`, each with room for `max_active`
    /// sequences of at most 100 tokens.
    fn admission(ids: &[u64], max_active: u32) -> Admission {
        let a = Admission::start(8);
        let workers: Vec<WorkerId> = ids.iter().copied().map(WorkerId).collect();
        let meta = [TensorMeta::new("w", vec![64, 64], Some(0))];
        let options = PlanOptions { epoch: 1, ..PlanOptions::default() };
        let plan = Arc::new(plan(&meta, &workers, &options).expect("a plan"));
        let entries = workers
            .iter()
            .map(|&id| {
                let m = Member {
                    id,
                    address: format!("http://127.0.0.1:{}", 1000 + id.0),
                    device: "cpu".into(),
                    memory_bytes: 0,
                };
                WorkerEntry::new(&m, &Security::plaintext()).expect("a worker entry")
            })
            .collect();
        a.set_roster(Roster { plan: Some(plan), workers: entries, unservable: None });
        for &id in &workers {
            a.set_capacity(id, Capacity { kv_cache_bytes: 100, kv_bytes_per_token: 1, max_active });
        }
        a
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_released_room_admits_the_next_in_line_at_once() {
        let a = admission(&[1], 1);
        let (first, _) = a.admit(50, false, later()).await.expect("room");
        let second = a.admit(50, false, later());
        tokio::pin!(second);
        assert!(tokio::time::timeout(SOON, &mut second).await.is_err(), "no room yet");
        assert_eq!(a.counts().queued, 1);
        drop(first);
        let (room, _) = tokio::time::timeout(SOON, second).await.expect("told at once").expect("room");
        assert_eq!(room.worker.id, WorkerId(1));
        assert_eq!(a.counts().queued, 0);
    }

    #[tokio::test]
    async fn a_request_that_leaves_lets_the_next_one_in() {
        let a = admission(&[1], 2);
        let (_held, _) = a.admit(60, false, later()).await.expect("room");
        {
            // 60 more tokens do not fit beside 60: it waits, then leaves.
            let big = a.admit(60, false, later());
            tokio::pin!(big);
            assert!(tokio::time::timeout(SOON, &mut big).await.is_err());
        }
        let small = tokio::time::timeout(SOON, a.admit(30, false, later())).await;
        assert!(small.expect("not stuck behind a request that left").is_ok());
    }

    #[tokio::test]
    async fn an_avoided_worker_gets_sequences_only_when_no_other_has_room() {
        let a = admission(&[1, 2], 1);
        a.avoid(WorkerId(1));
        let (r, _) = a.admit(10, false, later()).await.expect("room");
        assert_eq!(r.worker.id, WorkerId(2));
        let (r2, _) = a.admit(10, false, later()).await.expect("room");
        assert_eq!(r2.worker.id, WorkerId(1), "the only one with room");
    }

    #[tokio::test]
    async fn a_request_no_worker_could_hold_is_refused_at_once() {
        let a = admission(&[1], 1);
        let e = a.admit(101, false, later()).await.err().expect("refused");
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
    }

    #[tokio::test]
    async fn without_a_live_worker_a_request_waits_out_its_patience() {
        let a = Admission::start(8);
        a.set_roster(Roster::default());
        let e = a.admit(10, false, Instant::now() + Duration::from_secs(1)).await.err().expect("refused");
        assert_eq!(e.kind(), crate::ErrorKind::Unavailable);
    }

    #[tokio::test]
    async fn when_the_cluster_cannot_serve_waiters_are_told_why_at_once() {
        let a = admission(&[1], 1);
        let (held, _) = a.admit(100, false, later()).await.expect("room");
        let waiting = a.admit(100, true, later());
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(SOON, &mut waiting).await.is_err(), "no room yet");
        let why =
            super::super::state::Unservable { why: "the checkpoint changed".into(), until_restart: true };
        a.set_roster(Roster { plan: None, workers: Vec::new(), unservable: Some(why) });
        let e = tokio::time::timeout(SOON, waiting).await.expect("told at once").err().expect("refused");
        assert_eq!(e.kind(), crate::ErrorKind::Halted);
        assert!(e.to_string().contains("cannot serve: the checkpoint changed"), "{e}");
        let e = tokio::time::timeout(SOON, a.admit(10, false, later()))
            .await
            .expect("at once")
            .err()
            .expect("no");
        assert!(e.to_string().contains("the checkpoint changed"), "{e}");
        drop(held);
    }

    #[test]
    fn room_counts_sequences_and_bytes() {
        let c = Capacity { kv_cache_bytes: 1000, kv_bytes_per_token: 10, max_active: 2 };
        assert!(fits(Some(&c), Used::default(), 100));
        assert!(!fits(Some(&c), Used::default(), 101));
        assert!(fits(Some(&c), Used { seqs: 1, bytes: 500 }, 50));
        assert!(!fits(Some(&c), Used { seqs: 1, bytes: 510 }, 50));
        assert!(!fits(Some(&c), Used { seqs: 2, bytes: 0 }, 1));
        // Unknown limits: the worker decides.
        assert!(fits(None, Used { seqs: 1000, bytes: u64::MAX / 2 }, 1));
    }
}
