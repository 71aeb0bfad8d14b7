//! A device failure injected into the CPU backend, so tests can drive the error
//! path a CUDA step takes (a failed op in the middle of a step) on any machine.
//!
//! ```ignore
//! // The 4th `linear` fails once, as a transient device error would.
//! let backend = CpuBackend::with_fault(StepFault { after_calls: 3, fatal: false });
//! ```
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{EngineError, Result};

/// When an injected fault fires: after `after_calls` calls to `linear` succeed,
/// the next one fails; a `fatal` fault then fails every later call too (a broken
/// device stays broken), a non-fatal one only that call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepFault {
    /// Calls to `linear` that succeed before the fault fires.
    pub after_calls: u64,
    /// Reported as [`EngineError::Device`]'s `fatal`; also whether the fault persists.
    pub fatal: bool,
}

/// The source of an injected [`EngineError::Device`].
#[derive(Debug, thiserror::Error)]
#[error("injected {} fault at call {call}", if *.fatal { "fatal" } else { "transient" })]
pub struct InjectedFault {
    /// Which `linear` call failed (0-based, counted over the backend's life).
    pub call: u64,
    pub fatal: bool,
}

/// A [`StepFault`] and the count of `linear` calls, shared by every clone of the
/// backend (an engine's clone fails when the test's would).
#[derive(Clone, Debug)]
pub(crate) struct FaultInjector {
    fault: StepFault,
    calls: Arc<AtomicU64>,
}

impl FaultInjector {
    pub(super) fn new(fault: StepFault) -> Self {
        Self { fault, calls: Arc::new(AtomicU64::new(0)) }
    }

    /// Counts one `linear` call; fails it if the fault fires on it.
    pub(super) fn linear_call(&self) -> Result<()> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let StepFault { after_calls, fatal } = self.fault;
        if call == after_calls || (fatal && call > after_calls) {
            return Err(EngineError::Device {
                op: "linear (injected fault)".into(),
                fatal,
                source: Box::new(InjectedFault { call, fatal }),
            });
        }
        Ok(())
    }

    /// `linear` calls so far, failed ones included.
    pub(super) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}
