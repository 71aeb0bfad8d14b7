//! Admission: one bounded FIFO queue in front of the workers.
//!
//! A request runs only when a worker of the plan has room for its whole KV
//! cache (prompt + `max_new_tokens`, within the model's positions) and a free
//! sequence slot, as that worker reported them ([`Capacity`], from `Stats`
//! after it activated a plan). Until then it waits in the queue, in arrival
//! order; a sequence resuming after its worker failed goes to the front. A
//! request that finds the queue at `--max-queued-requests` is refused at once
//! (RESOURCE_EXHAUSTED, with the queue length). A [`Reservation`] holds the
//! room until it is dropped, whichever way the sequence ends.
//!
//! Workers enforce the same budget themselves; the coordinator's accounting
//! keeps them from ever having to refuse, but if one does (a sequence it has
//! not freed yet) the request goes back to the front of the queue.
//!
//! A worker that missed a step deadline, or handed its sequences back because
//! it is draining, is *avoided*: no sequence goes to it for [`STALL_FOR`],
//! unless it is the only choice.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use zeroshard_offload::plan::{Plan, WorkerId};

use super::state::{WorkerEntry, PROMPT_BYTES_PER_POSITION};
use super::Coordinator;
use crate::error::{CoordinatorError, Result};

/// How long a worker that missed a step deadline gets no new sequence.
pub(super) const STALL_FOR: Duration = Duration::from_secs(30);

/// What a worker admits, as it reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub kv_cache_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub max_active: u32,
}

impl Capacity {
    fn bytes_for(&self, tokens: usize) -> u64 {
        tokens as u64 * self.kv_bytes_per_token
    }
}

/// What this coordinator has running on a worker.
#[derive(Clone, Copy, Debug, Default)]
struct Used {
    seqs: u32,
    bytes: u64,
}

#[derive(Default)]
struct Queue {
    /// Tickets waiting, in the order they will be served.
    waiting: VecDeque<u64>,
    next_ticket: u64,
    used: HashMap<WorkerId, Used>,
    capacity: HashMap<WorkerId, Capacity>,
    stalled: HashMap<WorkerId, Instant>,
}

/// The queue and the room taken on every worker (see the module docs).
pub(super) struct Admission {
    queue: Mutex<Queue>,
    /// Woken whenever room frees up or the members or the plan change.
    wake: Notify,
    max_queued: usize,
    admitted: AtomicU64,
    rejected: AtomicU64,
    queue_nanos_total: AtomicU64,
    queue_nanos_max: AtomicU64,
    deadlines_missed: AtomicU64,
}

/// Counters for `ClusterStatus`.
pub(super) struct AdmissionCounts {
    pub queued: usize,
    pub max_queued: usize,
    pub admitted: u64,
    pub rejected: u64,
    pub queue_ms_total: f64,
    pub queue_ms_max: f64,
    pub deadlines_missed: u64,
}

/// Room on one worker, held until dropped.
pub(super) struct Reservation {
    coord: Coordinator,
    pub worker: WorkerEntry,
    pub plan: Arc<Plan>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let a = &self.coord.0.admission;
        {
            let mut q = a.lock();
            if let Some(u) = q.used.get_mut(&self.worker.id) {
                u.seqs = u.seqs.saturating_sub(1);
                u.bytes = u.bytes.saturating_sub(self.bytes);
            }
        }
        a.wake.notify_waiters();
    }
}

/// A place in the queue, given up when dropped (a client that leaves).
struct Ticket<'a> {
    admission: &'a Admission,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut q = self.admission.lock();
        if let Some(i) = q.waiting.iter().position(|t| *t == self.id) {
            q.waiting.remove(i);
            drop(q);
            // The next one may be servable now.
            self.admission.wake.notify_waiters();
        }
    }
}

impl Admission {
    pub(super) fn new(max_queued: usize) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            max_queued,
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            queue_nanos_total: AtomicU64::new(0),
            queue_nanos_max: AtomicU64::new(0),
            deadlines_missed: AtomicU64::new(0),
        }
    }

    /// The queue, taken one way (see `Coordinator::lock`: every update is whole).
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Members or the plan changed: waiting requests look again.
    pub(super) fn wake_all(&self) {
        self.wake.notify_waiters();
    }

    /// What `worker` reported it admits (after it activated a plan).
    pub(super) fn set_capacity(&self, worker: WorkerId, c: Capacity) {
        self.lock().capacity.insert(worker, c);
        self.wake.notify_waiters();
    }

    /// `worker` held a sequence past its step deadline: none goes to it for a while.
    pub(super) fn stall(&self, worker: WorkerId) {
        self.deadlines_missed.fetch_add(1, Ordering::Relaxed);
        self.avoid(worker);
    }

    /// No new sequence goes to `worker` for [`STALL_FOR`] (stuck, or draining).
    pub(super) fn avoid(&self, worker: WorkerId) {
        self.lock().stalled.insert(worker, Instant::now() + STALL_FOR);
    }

    pub(super) fn counts(&self) -> AdmissionCounts {
        AdmissionCounts {
            queued: self.lock().waiting.len(),
            max_queued: self.max_queued,
            admitted: self.admitted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            queue_ms_total: self.queue_nanos_total.load(Ordering::Relaxed) as f64 / 1e6,
            queue_ms_max: self.queue_nanos_max.load(Ordering::Relaxed) as f64 / 1e6,
            deadlines_missed: self.deadlines_missed.load(Ordering::Relaxed),
        }
    }
}

/// Whether `c` (unknown: the worker enforces its own limits) has room for
/// `tokens` more beside `u`.
fn fits(c: Option<&Capacity>, u: Used, tokens: usize) -> bool {
    c.is_none_or(|c| u.seqs < c.max_active && u.bytes + c.bytes_for(tokens) <= c.kv_cache_bytes)
}

impl Coordinator {
    /// Waits for room for a sequence of `tokens` KV tokens on a worker of the
    /// current plan, in queue order (`resume`: at the front, past the bound).
    /// Returns the reservation and the time spent queued; UNAVAILABLE when
    /// the plan has had no live worker at all past `patience`.
    pub(super) async fn admit(
        &self,
        tokens: usize,
        resume: bool,
        patience: Instant,
    ) -> Result<(Reservation, Duration)> {
        let a = &self.0.admission;
        let start = Instant::now();
        let ticket = {
            let mut q = a.lock();
            self.check_fits_anywhere(&q, tokens)?;
            if !resume && q.waiting.len() >= a.max_queued {
                a.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(CoordinatorError::Overloaded(format!(
                    "the cluster is full: {} requests are queued, the most it holds (--max-queued-requests {})",
                    q.waiting.len(),
                    a.max_queued
                )));
            }
            q.next_ticket += 1;
            let id = q.next_ticket;
            if resume {
                q.waiting.push_front(id);
            } else {
                q.waiting.push_back(id);
            }
            Ticket { admission: a, id }
        };
        loop {
            let woken = a.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.try_take(&ticket, tokens)? {
                Take::Taken(r) => {
                    let waited = start.elapsed();
                    let nanos = waited.as_nanos() as u64;
                    a.admitted.fetch_add(1, Ordering::Relaxed);
                    a.queue_nanos_total.fetch_add(nanos, Ordering::Relaxed);
                    a.queue_nanos_max.fetch_max(nanos, Ordering::Relaxed);
                    return Ok((*r, waited));
                }
                Take::NoWorker if Instant::now() > patience => {
                    return Err(CoordinatorError::Unavailable("no live worker in the current plan".into()))
                }
                // A stall that ends, or a capacity that arrives, wakes no one: look again now and then.
                Take::Wait | Take::NoWorker => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), woken).await;
                }
            }
        }
    }

    /// A request no worker of the plan could ever hold (by the capacities
    /// known) is the caller's to change.
    fn check_fits_anywhere(&self, q: &Queue, tokens: usize) -> Result<()> {
        let Ok(plan) = self.plan() else { return Ok(()) };
        let caps: Vec<&Capacity> = plan.workers().iter().filter_map(|w| q.capacity.get(w)).collect();
        if caps.len() < plan.workers().len() {
            return Ok(()); // some worker's limits are not known yet: it decides
        }
        match caps.iter().map(|c| c.kv_cache_bytes).max() {
            Some(most) if caps.iter().all(|c| c.bytes_for(tokens) > c.kv_cache_bytes) => {
                Err(CoordinatorError::InvalidRequest(format!(
                    "the request needs {:.1} MiB of KV cache ({tokens} tokens of prompt + max_new_tokens), \
                     more than any worker's budget ({:.1} MiB, --kv-cache-bytes)",
                    caps[0].bytes_for(tokens) as f64 / MIB,
                    most as f64 / MIB
                )))
            }
            _ => Ok(()),
        }
    }

    /// Takes room for `ticket` when it is first in the queue and a worker has
    /// some: the least loaded live worker of the plan that is not stalled
    /// (stalled ones only when no other has room).
    fn try_take(&self, ticket: &Ticket<'_>, tokens: usize) -> Result<Take> {
        let a = &self.0.admission;
        let plan = match self.plan() {
            Ok(p) => p,
            Err(e) => {
                // Before the first plan there is nothing to wait for.
                if self.lock().planned_epoch == 0 {
                    return Err(e);
                }
                return Ok(Take::NoWorker);
            }
        };
        let members: Vec<WorkerEntry> = {
            let st = self.lock();
            plan.workers().iter().filter_map(|id| st.members.get(id).cloned()).collect()
        };
        if members.is_empty() {
            return Ok(Take::NoWorker);
        }
        let mut q = a.lock();
        if q.waiting.front() != Some(&ticket.id) {
            return Ok(Take::Wait);
        }
        let now = Instant::now();
        q.stalled.retain(|_, until| *until > now);
        let pick = |q: &Queue, stalled_ok: bool| {
            members
                .iter()
                .filter(|w| stalled_ok || !q.stalled.contains_key(&w.id))
                .filter(|w| {
                    fits(q.capacity.get(&w.id), q.used.get(&w.id).copied().unwrap_or_default(), tokens)
                })
                .min_by_key(|w| q.used.get(&w.id).map_or(0, |u| u.seqs))
                .cloned()
        };
        let Some(worker) = pick(&q, false).or_else(|| pick(&q, true)) else { return Ok(Take::Wait) };
        let bytes = q.capacity.get(&worker.id).map_or(0, |c| c.bytes_for(tokens));
        let u = q.used.entry(worker.id).or_default();
        u.seqs += 1;
        u.bytes += bytes;
        q.waiting.pop_front();
        drop(q);
        // The next in line may fit too.
        a.wake.notify_waiters();
        Ok(Take::Taken(Box::new(Reservation { coord: self.clone(), worker, plan, bytes })))
    }

    /// The prompt-text bound: `--max-prompt-bytes`, or so many bytes per
    /// position of the model's context.
    pub(super) fn max_prompt_bytes(&self) -> usize {
        let c = &self.0;
        c.cfg.limits.max_prompt_bytes.unwrap_or(c.config.max_position_embeddings * PROMPT_BYTES_PER_POSITION)
    }
}

/// What one look at the queue found.
enum Take {
    Taken(Box<Reservation>),
    /// Not first in line, or no worker has room now.
    Wait,
    /// The plan has no live worker.
    NoWorker,
}

const MIB: f64 = (1u64 << 20) as f64;

#[cfg(test)]
mod tests {
    use super::*;

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
