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
//!
//! One task owns the queue, the room taken on every worker, what each worker
//! admits and which are avoided ([`queue`](super::queue)); [`Admission`] is its
//! handle. The task looks at the queue only when it is told something that
//! may let a request in — a request arrived or left, room was given back, a
//! capacity was learned, the members or the plan changed — or when a timer of
//! its own runs out (an avoidance ends, a request's patience for a live
//! worker ends): there is no periodic re-check.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use zeroshard_offload::plan::{Plan, WorkerId};

use super::state::WorkerEntry;
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
    pub(super) fn bytes_for(&self, tokens: usize) -> u64 {
        tokens as u64 * self.kv_bytes_per_token
    }
}

/// The plan and its live workers, as the supervisor last published them.
#[derive(Clone, Default)]
pub(super) struct Roster {
    pub plan: Option<Arc<Plan>>,
    /// Live workers of the plan, in id order.
    pub workers: Vec<WorkerEntry>,
    /// Why nothing can be served now: every waiter is refused with it.
    pub unservable: Option<super::state::Unservable>,
}

/// What the admission task is told.
pub(super) enum Command {
    /// A request wants room.
    Admit(Waiter),
    /// The request with this ticket left before it got room.
    Withdraw(u64),
    /// A reservation ended: its room is free again.
    Release { worker: WorkerId, bytes: u64 },
    /// What a worker admits (learned after it activated a plan).
    Capacity { worker: WorkerId, capacity: Capacity },
    /// Send the worker nothing new for [`STALL_FOR`].
    Avoid(WorkerId),
    /// The members or the plan changed.
    Roster(Roster),
}

/// A request waiting for room.
pub(super) struct Waiter {
    pub ticket: u64,
    pub tokens: usize,
    /// A sequence resuming: at the front, past the bound.
    pub resume: bool,
    /// Until when it waits while the plan has no live worker at all.
    pub patience: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<(Reservation, Duration)>>,
}

/// Counters for `ClusterStatus`, kept by the task and read by anyone.
#[derive(Default)]
pub(super) struct Counters {
    pub queued: AtomicUsize,
    pub admitted: AtomicU64,
    pub rejected: AtomicU64,
    pub queue_nanos_total: AtomicU64,
    pub queue_nanos_max: AtomicU64,
    pub deadlines_missed: AtomicU64,
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
    pub worker: WorkerEntry,
    pub plan: Arc<Plan>,
    pub(super) bytes: u64,
    pub(super) tx: mpsc::UnboundedSender<Command>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Release { worker: self.worker.id, bytes: self.bytes });
    }
}

/// A place in the queue, withdrawn when dropped before room was granted (the
/// client left).
struct Ticket<'a> {
    tx: &'a mpsc::UnboundedSender<Command>,
    id: u64,
    granted: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.granted {
            let _ = self.tx.send(Command::Withdraw(self.id));
        }
    }
}

/// The handle on the admission task (see the module docs).
pub(super) struct Admission {
    tx: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
    max_queued: usize,
    next_ticket: AtomicU64,
}

impl Admission {
    /// Starts the task; it ends when the handle and every reservation are gone.
    pub(super) fn start(max_queued: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        tokio::spawn(super::queue::run(rx, tx.downgrade(), counters.clone(), max_queued));
        Self { tx, counters, max_queued, next_ticket: AtomicU64::new(1) }
    }

    /// Waits for room for a sequence of `tokens` KV tokens on a worker of the
    /// plan, in queue order (`resume`: at the front, past the bound). Returns
    /// the reservation and the time spent queued; UNAVAILABLE when the plan
    /// has had no live worker at all past `patience`.
    pub(super) async fn admit(
        &self,
        tokens: usize,
        resume: bool,
        patience: Instant,
    ) -> Result<(Reservation, Duration)> {
        let (reply, answer) = oneshot::channel();
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter { ticket: id, tokens, resume, patience, enqueued: Instant::now(), reply };
        let stopped = || CoordinatorError::Unavailable("the coordinator is stopping".into());
        self.tx.send(Command::Admit(waiter)).map_err(|_| stopped())?;
        let mut ticket = Ticket { tx: &self.tx, id, granted: false };
        let granted = answer.await.map_err(|_| stopped())?;
        ticket.granted = true;
        granted
    }

    /// The members or the plan changed: waiting requests look again.
    pub(super) fn set_roster(&self, roster: Roster) {
        let _ = self.tx.send(Command::Roster(roster));
    }

    /// What `worker` reported it admits (after it activated a plan).
    pub(super) fn set_capacity(&self, worker: WorkerId, capacity: Capacity) {
        let _ = self.tx.send(Command::Capacity { worker, capacity });
    }

    /// `worker` held a sequence past its step deadline: none goes to it for a while.
    pub(super) fn stall(&self, worker: WorkerId) {
        self.counters.deadlines_missed.fetch_add(1, Ordering::Relaxed);
        self.avoid(worker);
    }

    /// No new sequence goes to `worker` for [`STALL_FOR`] (stuck, or draining).
    pub(super) fn avoid(&self, worker: WorkerId) {
        let _ = self.tx.send(Command::Avoid(worker));
    }

    pub(super) fn counts(&self) -> AdmissionCounts {
        let c = &self.counters;
        AdmissionCounts {
            queued: c.queued.load(Ordering::Relaxed),
            max_queued: self.max_queued,
            admitted: c.admitted.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            queue_ms_total: c.queue_nanos_total.load(Ordering::Relaxed) as f64 / 1e6,
            queue_ms_max: c.queue_nanos_max.load(Ordering::Relaxed) as f64 / 1e6,
            deadlines_missed: c.deadlines_missed.load(Ordering::Relaxed),
        }
    }
}
