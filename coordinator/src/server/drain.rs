//! Shutdown of a coordinator: [`Coordinator::drain`] refuses new requests,
//! waits for the running ones (counted by [`InFlight`] guards) and cuts those
//! that outlast the drain time.
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Coordinator;

/// Where a coordinator is in its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainState {
    Serving,
    /// New requests are refused with UNAVAILABLE; running ones continue.
    Draining,
    /// The drain time ran out: running requests end with UNAVAILABLE.
    Cut,
}

/// What a drain did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Requests running when the drain began.
    pub running: usize,
    /// Of them, still running when the drain time ran out (ended with UNAVAILABLE).
    pub cut: usize,
    pub elapsed: Duration,
}

impl std::fmt::Display for DrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drained in {:.2} s: {} requests were running, {} cut off",
            self.elapsed.as_secs_f64(),
            self.running,
            self.cut
        )
    }
}

/// Counts a running request until it is dropped, however the request ends.
pub(super) struct InFlight(Coordinator);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests().in_flight.send_modify(|n| *n -= 1);
    }
}

impl Coordinator {
    /// Stops taking requests (each new one gets UNAVAILABLE at once, so a
    /// client retries elsewhere) and waits up to `patience` for the running
    /// ones to finish; those still running then end with UNAVAILABLE. The
    /// services stay up meanwhile: workers keep their leases and gather.
    pub async fn drain(&self, patience: Duration) -> DrainReport {
        let started = Instant::now();
        let running = *self.requests().in_flight.borrow();
        self.requests().drain.send_replace(DrainState::Draining);
        let mut in_flight = self.requests().in_flight.subscribe();
        let finished = tokio::time::timeout(patience, in_flight.wait_for(|n| *n == 0)).await.is_ok();
        let cut = if finished { 0 } else { *self.requests().in_flight.borrow() };
        if !finished {
            self.requests().drain.send_replace(DrainState::Cut);
            // The cut requests send their error and end within moments.
            let _ = tokio::time::timeout(Duration::from_secs(2), in_flight.wait_for(|n| *n == 0)).await;
        }
        DrainReport { running, cut, elapsed: started.elapsed() }
    }

    /// How long a drain gives running requests (the cluster's configuration).
    pub fn drain_timeout(&self) -> Duration {
        self.cfg().drain_timeout
    }

    /// Where the coordinator is in its shutdown.
    pub fn drain_state(&self) -> watch::Receiver<DrainState> {
        self.requests().drain.subscribe()
    }

    /// A client request starts running: counted until the guard is dropped.
    pub(super) fn request_started(&self) -> InFlight {
        self.requests().in_flight.send_modify(|n| *n += 1);
        InFlight(self.clone())
    }

    /// Client requests running now (admitted or not).
    pub(super) fn in_flight(&self) -> usize {
        *self.requests().in_flight.borrow()
    }
}
