//! The bookkeeping of a ring of device staging buffers (`--prefetch-layers`
//! deep): which slot the next layer is copied into, and whether that copy must
//! first wait for the slot's previous layer to finish computing.
//!
//! The device side (buffers, the copy stream, one release event per slot) lives
//! in the CUDA backend; this part is pure so that it is tested without a GPU.
//!
//! ```
//! use zeroshard_offload::staging::StagingRing;
//! let mut ring = StagingRing::new(2, 1024);
//! let a = ring.acquire(1024).unwrap();      // layer l   → slot 0
//! let b = ring.acquire(512).unwrap();       // layer l+1 → slot 1, copied while l computes
//! ring.release(a.slot);                      // l done: slot 0 may be overwritten
//! let c = ring.acquire(1024).unwrap();      // layer l+2 → slot 0, after l's release event
//! assert!(c.slot == 0 && c.wait_for_release);
//! # let _ = b;
//! ```
use crate::error::{OffloadError, Result};

/// Round-robin slots of `slot_bytes` each.
#[derive(Clone, Debug)]
pub struct StagingRing {
    held: Vec<bool>,
    used_before: Vec<bool>,
    next: usize,
    slot_bytes: u64,
}

/// A slot handed out for one upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub slot: usize,
    /// The slot held an earlier piece: the copy must wait for that piece's
    /// release (its compute finished) before writing.
    pub wait_for_release: bool,
}

impl StagingRing {
    pub fn new(slots: usize, slot_bytes: u64) -> Self {
        Self { held: vec![false; slots], used_before: vec![false; slots], next: 0, slot_bytes }
    }

    pub fn slots(&self) -> usize {
        self.held.len()
    }

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// Slots currently held (copied or computing).
    pub fn held(&self) -> usize {
        self.held.iter().filter(|h| **h).count()
    }

    /// The next slot in ring order for a piece of `bytes`. Refuses a piece larger
    /// than a slot, and a ring whose next slot is still held (the caller staged
    /// more pieces ahead than the ring is deep).
    pub fn acquire(&mut self, bytes: u64) -> Result<Lease> {
        if self.held.is_empty() {
            return Err(OffloadError::Staging("the staging ring has no slots".into()));
        }
        if bytes > self.slot_bytes {
            return Err(OffloadError::Staging(format!(
                "a piece of {bytes} bytes does not fit a {}-byte staging slot",
                self.slot_bytes
            )));
        }
        let slot = self.next;
        if self.held[slot] {
            return Err(OffloadError::Staging(format!(
                "all {} staging slots are held: more pieces staged ahead than the ring is deep",
                self.held.len()
            )));
        }
        self.held[slot] = true;
        let wait_for_release = std::mem::replace(&mut self.used_before[slot], true);
        self.next = (slot + 1) % self.held.len();
        Ok(Lease { slot, wait_for_release })
    }

    /// The piece in `slot` is done with (its compute is enqueued; the caller
    /// records the slot's release event).
    pub fn release(&mut self, slot: usize) {
        assert!(self.held[slot], "staging slot {slot} released twice");
        self.held[slot] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_round_and_wait_only_once_reused() {
        let mut r = StagingRing::new(3, 100);
        let leases: Vec<Lease> = (0..3).map(|_| r.acquire(100).expect("free")).collect();
        assert_eq!(leases.iter().map(|l| l.slot).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(leases.iter().all(|l| !l.wait_for_release));
        assert_eq!(r.held(), 3);
        r.release(0);
        let again = r.acquire(1).expect("slot 0 free");
        assert_eq!(again, Lease { slot: 0, wait_for_release: true });
    }

    #[test]
    fn a_window_of_depth_plus_one_never_blocks() {
        // The engine's pattern: stage up to `depth` ahead of the layer computing,
        // release each layer after its compute.
        for depth in 0..4 {
            let mut r = StagingRing::new(depth + 1, 10);
            let mut window = std::collections::VecDeque::new();
            let layers = 11;
            let mut next = 0;
            for l in 0..layers {
                while next < layers && next <= l + depth {
                    window.push_back(r.acquire(10).expect("a free slot").slot);
                    next += 1;
                }
                let slot = window.pop_front().expect("layer l staged");
                assert!(r.held() <= depth + 1);
                r.release(slot);
            }
            assert_eq!(r.held(), 0);
        }
    }

    #[test]
    fn refuses_oversized_pieces_and_an_overfull_ring() {
        let mut r = StagingRing::new(2, 64);
        let err = r.acquire(65).expect_err("too big").to_string();
        assert!(err.contains("65 bytes does not fit a 64-byte staging slot"), "{err}");
        r.acquire(64).expect("slot 0");
        r.acquire(64).expect("slot 1");
        let err = r.acquire(1).expect_err("full").to_string();
        assert!(err.contains("all 2 staging slots are held"), "{err}");
        assert!(StagingRing::new(0, 1).acquire(1).is_err());
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn a_double_release_is_a_bug() {
        let mut r = StagingRing::new(1, 1);
        let l = r.acquire(1).expect("free");
        r.release(l.slot);
        r.release(l.slot);
    }
}
