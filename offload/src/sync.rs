//! Locks, taken one way everywhere in the engine and the worker.
//!
//! A lock is poisoned only when a thread panicked while holding it. The release
//! binary aborts on panic (`panic = "abort"` in the workspace profile: a panic
//! ends the worker process, its lease lapses and the cluster re-plans, so no
//! member stays registered without stepping), so poisoning is seen only under
//! the test harness, which unwinds. Every guarded value here is replaced by
//! whole assignments, never left half-updated, so a poisoned lock's data is
//! taken as it is; the CUDA backend's `Drop` impls, which take locks, must
//! not panic either. A device a panicking thread left broken reports that with
//! the error of its next CUDA call.
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
