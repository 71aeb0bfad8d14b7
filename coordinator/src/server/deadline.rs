//! Step deadlines: liveness beyond leases. A worker can keep renewing its
//! lease and still never step; every running sequence therefore expects its
//! next token within a deadline measured from that worker's own steps:
//! eight times its recent step time, with a floor (`--step-deadline-ms`),
//! plus, for a message that first prefills tokens, four times the measured
//! prefill time of that many tokens. A sequence that misses it resumes on
//! another worker (see `generate`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Recent step figures of one worker, as its sequences saw them.
#[derive(Debug, Default)]
pub struct StepClock {
    /// Moving average of the gap between two tokens of a sequence (µs; 0: none yet).
    step_us: AtomicU64,
    /// Moving average of the prefill time per prompt token (ns; 0: none yet).
    prefill_ns_per_token: AtomicU64,
}

/// Weight of the newest sample in the moving averages, in 1/8ths.
const NEW: u64 = 2;

fn blend(avg: &AtomicU64, sample: u64) {
    let old = avg.load(Ordering::Relaxed);
    let new = if old == 0 { sample } else { (old * (8 - NEW) + sample * NEW) / 8 };
    avg.store(new.max(1), Ordering::Relaxed);
}

impl StepClock {
    /// A sequence's next token came `gap` after its previous one.
    pub fn record_step(&self, gap: Duration) {
        blend(&self.step_us, gap.as_micros() as u64);
    }

    /// A sequence's first token came `took` after it was sent with `tokens` to prefill.
    pub fn record_prefill(&self, took: Duration, tokens: usize) {
        if tokens > 0 {
            blend(&self.prefill_ns_per_token, took.as_nanos() as u64 / tokens as u64);
        }
    }

    /// How long to wait for the next message of a sequence that has
    /// `prefill_tokens` to prefill first (0: a decode step).
    pub fn deadline(&self, floor: Duration, prefill_tokens: usize) -> Duration {
        let step = Duration::from_micros(self.step_us.load(Ordering::Relaxed)) * 8;
        let prefill = Duration::from_nanos(self.prefill_ns_per_token.load(Ordering::Relaxed))
            .saturating_mul(4 * prefill_tokens as u32);
        floor.max(step) + prefill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_follows_the_measured_steps_above_its_floor() {
        let c = StepClock::default();
        let floor = Duration::from_secs(2);
        assert_eq!(c.deadline(floor, 100), floor, "nothing measured: the floor");
        c.record_step(Duration::from_millis(10));
        assert_eq!(c.deadline(floor, 0), floor);
        for _ in 0..50 {
            c.record_step(Duration::from_millis(500));
        }
        let d = c.deadline(floor, 0);
        assert!(d > Duration::from_millis(3900) && d <= Duration::from_secs(4), "{d:?}");
        c.record_prefill(Duration::from_millis(100), 10); // 10 ms per token
        let d = c.deadline(floor, 50);
        assert!(d > Duration::from_millis(5900) && d <= Duration::from_secs(6), "{d:?}");
    }
}
