//! Test hooks: faults a worker injects into itself so the integration tests can
//! drive the cluster's failure paths (a lying holder, a refused load, a device
//! error mid-step, a stuck or slow batching loop, altered outputs).
//!
//! They exist only with the `fault-injection` cargo feature, which the test
//! command enables. Without it [`Faults`] has no fields and every question it
//! answers is a constant "no fault", so the release binary carries neither the
//! hooks nor their flags.
//!
//! ```ignore
//! let faults = Faults { fail_load: true, ..Faults::default() }; // feature on
//! assert!(faults.fail_load());
//! ```
use std::time::Duration;

use zeroshard_engine::cpu::StepFault;

/// The faults one worker injects (all off by default).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Corrupt one chunk of every Nth fetch this worker serves (0 = never).
    #[cfg(feature = "fault-injection")]
    pub corrupt_every: u64,
    /// Flip a byte of every chunk this worker serves, under a valid CRC-32C of
    /// the flipped bytes (only the block digests can catch it).
    #[cfg(feature = "fault-injection")]
    pub serve_corrupt: bool,
    /// Fail every plan installation.
    #[cfg(feature = "fault-injection")]
    pub fail_load: bool,
    /// Never answer a plan installation (the worker keeps its lease and
    /// answers everything else): a member that stalls an epoch.
    #[cfg(feature = "fault-injection")]
    pub stall_install: bool,
    /// A backend error injected into the CPU backend's `linear` (see [`StepFault`]).
    #[cfg(feature = "fault-injection")]
    pub step_fault: Option<StepFault>,
    /// Sleep this long after every batching step.
    #[cfg(feature = "fault-injection")]
    pub step_delay: Duration,
    /// The batching loop stops stepping after this many steps (the worker keeps
    /// its lease and answers every RPC): a stuck worker.
    #[cfg(feature = "fault-injection")]
    pub hang_after_steps: Option<u64>,
    /// Send a different token than the one computed for every Nth generated
    /// token of a sequence (0 = never): a member that lies about its outputs.
    #[cfg(feature = "fault-injection")]
    pub alter_every: u64,
}

#[cfg(feature = "fault-injection")]
impl Faults {
    /// Whether fetch number `n` (counted from 1) gets a corrupt chunk.
    pub(crate) fn corrupt_fetch(&self, n: u64) -> bool {
        self.corrupt_every > 0 && n.is_multiple_of(self.corrupt_every)
    }
    pub(crate) fn serve_corrupt(&self) -> bool {
        self.serve_corrupt
    }
    pub(crate) fn fail_load(&self) -> bool {
        self.fail_load
    }
    pub(crate) fn stall_install(&self) -> bool {
        self.stall_install
    }
    pub(crate) fn step_fault(&self) -> Option<StepFault> {
        self.step_fault
    }
    pub(crate) fn step_delay(&self) -> Duration {
        self.step_delay
    }
    pub(crate) fn hang_after_steps(&self) -> Option<u64> {
        self.hang_after_steps
    }
    /// Whether the `n`th generated token (counted from 1) is sent altered.
    pub(crate) fn alter_token(&self, n: usize) -> bool {
        self.alter_every > 0 && (n as u64).is_multiple_of(self.alter_every)
    }
}

#[cfg(not(feature = "fault-injection"))]
impl Faults {
    pub(crate) fn corrupt_fetch(&self, _n: u64) -> bool {
        false
    }
    pub(crate) fn serve_corrupt(&self) -> bool {
        false
    }
    pub(crate) fn fail_load(&self) -> bool {
        false
    }
    pub(crate) fn stall_install(&self) -> bool {
        false
    }
    pub(crate) fn step_fault(&self) -> Option<StepFault> {
        None
    }
    pub(crate) fn step_delay(&self) -> Duration {
        Duration::ZERO
    }
    pub(crate) fn hang_after_steps(&self) -> Option<u64> {
        None
    }
    pub(crate) fn alter_token(&self, _n: usize) -> bool {
        false
    }
}
