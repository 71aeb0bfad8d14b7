//! Step deadlines: liveness beyond leases. A worker can keep renewing its
//! lease and still never step; every running sequence therefore expects its
//! next message within a deadline measured from that worker's own steps:
//! eight times its recent step time, with a floor (`--step-deadline-ms`),
//! plus four times the measured prefill time of every prompt token sent to
//! that worker and not yet answered (a batch's prefill delays every
//! sequence of the step). A sequence that misses it resumes on another
//! worker (see `generate`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Recent step figures of one worker, as its sequences saw them.
#[derive(Debug, Default)]
pub struct StepClock {
    /// Moving average of the gap between two tokens of a sequence (µs; 0: none yet).
    step_us: AtomicU64,
    /// Moving average of the prefill time per prompt token (ns; 0: none yet).
    prefill_ns_per_token: AtomicU64,
    /// Prompt tokens sent to the worker whose first token has not come back.
    pending_prefill: AtomicU64,
}

/// Weight of the newest sample in the moving averages, in 1/8ths.
const NEW: u64 = 2;

fn blend(avg: &AtomicU64, sample: u64) {
    let old = avg.load(Ordering::Relaxed);
    let new = if old == 0 { sample } else { (old * (8 - NEW) + sample * NEW) / 8 };
    avg.store(new.max(1), Ordering::Relaxed);
}

/// A prefill in flight on a worker: counted until [`Prefill::done`] or drop.
pub struct Prefill<'a> {
    clock: &'a StepClock,
    tokens: u64,
    /// Tokens in flight on the worker when it was sent (its own included).
    behind: u64,
}

impl Prefill<'_> {
    /// Its first token came `took` after it was sent.
    pub fn done(mut self, took: Duration) {
        if let Some(per_token) = (took.as_nanos() as u64).checked_div(self.behind) {
            blend(&self.clock.prefill_ns_per_token, per_token);
        }
        self.release();
    }

    fn release(&mut self) {
        self.clock.pending_prefill.fetch_sub(std::mem::take(&mut self.tokens), Ordering::Relaxed);
    }
}

impl Drop for Prefill<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl StepClock {
    /// A sequence is sent with `tokens` to prefill.
    pub fn prefill(&self, tokens: usize) -> Prefill<'_> {
        let tokens = tokens as u64;
        let behind = self.pending_prefill.fetch_add(tokens, Ordering::Relaxed) + tokens;
        Prefill { clock: self, tokens, behind }
    }

    /// A sequence's next token came `gap` after its previous one.
    pub fn record_step(&self, gap: Duration) {
        blend(&self.step_us, gap.as_micros() as u64);
    }

    /// How long a sequence on this worker waits for its next message now.
    pub fn deadline(&self, floor: Duration) -> Duration {
        let step = Duration::from_micros(self.step_us.load(Ordering::Relaxed)) * 8;
        let per_token = self.prefill_ns_per_token.load(Ordering::Relaxed);
        let pending = self.pending_prefill.load(Ordering::Relaxed);
        floor.max(step) + Duration::from_nanos(per_token.saturating_mul(pending).saturating_mul(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_follows_the_measured_steps_and_the_prefills_in_flight() {
        let c = StepClock::default();
        let floor = Duration::from_secs(2);
        let p = c.prefill(100);
        assert_eq!(c.deadline(floor), floor, "nothing measured: the floor");
        p.done(Duration::from_millis(1000)); // 10 ms per token
        c.record_step(Duration::from_millis(10));
        assert_eq!(c.deadline(floor), floor, "nothing in flight: the floor");
        for _ in 0..50 {
            c.record_step(Duration::from_millis(500));
        }
        let d = c.deadline(floor);
        assert!(d > Duration::from_millis(3900) && d <= Duration::from_secs(4), "{d:?}");
        // Two prompts in flight at once: each waits for both.
        let (a, b) = (c.prefill(30), c.prefill(20));
        let d = c.deadline(floor);
        assert!(d > Duration::from_millis(5900) && d <= Duration::from_secs(6), "{d:?}");
        drop(a);
        b.done(Duration::from_millis(500)); // 50 tokens were behind it: 10 ms each
        assert!(c.deadline(floor) <= Duration::from_secs(4));
    }
}
