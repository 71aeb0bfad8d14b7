//! Host weights onto the device: a resident cache, and a staging ring for the
//! layers that do not stay.
//!
//! Each tensor of a staged piece is found by its host address: when a resident
//! copy of that address exists for the same host store (held by `Weak`, so a
//! freed store can never alias a new one), it is used as is. Otherwise the
//! piece's missing tensors are copied on the copy stream, either into new
//! resident memory (outer pieces always, layers while `max_live_layer_bytes`
//! lasts) or into the next slot of the ring, after that slot's previous layer
//! has finished computing. The compute stream waits for a piece's copies the
//! first time one of its tensors is looked up ([`Backend::weight`]).
//!
//! [`Backend::weight`]: crate::backend::Backend::weight
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{result, CudaEvent};
use half::f16;
use zeroshard_offload::staging::StagingRing;

use super::device::{lock, CudaResultExt, Device, DeviceBuf};
use super::CudaWeight;
use crate::backend::Piece;
use crate::error::Result;
use crate::weights::HostWeights;

/// Tensors inside one device allocation start at multiples of this.
const ALIGN: usize = 256;

/// One piece's tensors as device addresses.
pub struct CudaStaged {
    tensors: HashMap<String, CudaWeight>,
    /// Recorded on the copy stream after this piece's copies, if it had any.
    ready: Option<CudaEvent>,
    waited: AtomicBool,
    slot: Option<usize>,
    /// Keeps the source alive until its copies have run (see `Drop`).
    host: Arc<HostWeights>,
    dev: Arc<Device>,
    state: Arc<Mutex<Residency>>,
}

/// What is on the device, and the ring.
pub(crate) struct Residency {
    resident: HashMap<(usize, usize), Resident>,
    layer_bytes: u64,
    max_live_layer_bytes: u64,
    ring: Option<Ring>,
    ring_slots: usize,
    slot_bytes: usize,
    /// Host stores whose copies may still be running, with the event that ends them.
    retired: Vec<(CudaEvent, Arc<HostWeights>)>,
}

/// A resident tensor: at `offset` in an allocation shared with the rest of its piece.
struct Resident {
    owner: Weak<HostWeights>,
    buf: Arc<DeviceBuf>,
    offset: u64,
    /// Its aligned size, counted against the resident layer budget when `layer`.
    bytes: u64,
    layer: bool,
}

struct Ring {
    plan: StagingRing,
    bufs: Vec<DeviceBuf>,
    released: Vec<CudaEvent>,
}

/// Bytes of a piece laid out with [`ALIGN`]ed tensors.
pub(crate) fn packed_bytes(lens: impl IntoIterator<Item = usize>) -> usize {
    lens.into_iter().map(|n| aligned_bytes(n) as usize).sum()
}

impl Residency {
    pub(super) fn new(max_live_layer_bytes: u64, ring_slots: usize, slot_bytes: usize) -> Self {
        Self {
            resident: HashMap::new(),
            layer_bytes: 0,
            max_live_layer_bytes,
            ring: None,
            ring_slots,
            slot_bytes,
            retired: Vec::new(),
        }
    }

    /// Device bytes of resident layers.
    pub(super) fn resident_layer_bytes(&self) -> u64 {
        self.layer_bytes
    }

    /// Drops resident copies whose host store is gone, and finished retirements.
    fn sweep(&mut self) {
        let layer_bytes = &mut self.layer_bytes;
        self.resident.retain(|_, r| {
            let keep = r.owner.strong_count() > 0;
            if !keep && r.layer {
                *layer_bytes -= r.bytes;
            }
            keep
        });
        self.retired.retain(|(ev, _)| !ev.is_complete());
    }
}

pub(crate) fn stage(
    dev: &Arc<Device>,
    state: &Arc<Mutex<Residency>>,
    host: &Arc<HostWeights>,
    piece: Piece,
    names: &[String],
) -> Result<CudaStaged> {
    dev.bind()?;
    let mut st = lock(state);
    if piece == Piece::Embedding {
        st.sweep();
    }
    let owner = Arc::downgrade(host);
    let mut tensors = HashMap::with_capacity(names.len());
    // Host tensors to copy, once per host address, and the names waiting for them.
    let mut copies: Vec<&[f16]> = Vec::new();
    let mut waiting: Vec<(&str, (usize, usize))> = Vec::new();
    for name in names {
        let Some(data) = host.get(name) else { continue };
        let key = (data.as_ptr() as usize, data.len());
        match st.resident.get(&key) {
            Some(r) if Weak::ptr_eq(&r.owner, &owner) => {
                tensors.insert(name.clone(), CudaWeight { ptr: r.buf.ptr + r.offset, len: data.len() });
            }
            _ => {
                if !waiting.iter().any(|(_, k)| *k == key) {
                    copies.push(data);
                }
                waiting.push((name, key));
            }
        }
    }
    // The staged piece is built only once the residency lock is released: its
    // Drop takes the lock (and an early return must not drop it under the lock).
    let staged = |tensors, ready: Option<CudaEvent>, slot| CudaStaged {
        tensors,
        waited: AtomicBool::new(ready.is_none()),
        ready,
        slot,
        host: host.clone(),
        dev: dev.clone(),
        state: state.clone(),
    };
    if copies.is_empty() {
        drop(st);
        return Ok(staged(tensors, None, None));
    }
    let bytes = packed_bytes(copies.iter().map(|d| d.len()));
    let is_layer = matches!(piece, Piece::Layer(_));
    let resident = !is_layer || st.layer_bytes + bytes as u64 <= st.max_live_layer_bytes;
    let mut slot = None;
    let (base, shared) = if resident {
        let buf = Arc::new(dev.pool.alloc(bytes)?);
        // Pool memory may still be read by compute just enqueued: copy after it.
        let ev = dev.compute.record_event(None).cuda_op("recording a compute event")?;
        dev.copy.wait(&ev).cuda_op("ordering the copy stream")?;
        (buf.ptr, Some(buf))
    } else {
        let (slots, slot_bytes) = (st.ring_slots, st.slot_bytes);
        let ring = match &mut st.ring {
            Some(r) => r,
            None => st.ring.insert(Ring::new(dev, slots, slot_bytes)?),
        };
        let lease = ring.plan.acquire(bytes as u64)?;
        if lease.wait_for_release {
            let waited = dev.copy.wait(&ring.released[lease.slot]).cuda_op("waiting for a staging slot");
            if let Err(e) = waited {
                ring.plan.release(lease.slot);
                return Err(e);
            }
        }
        slot = Some(lease.slot);
        (ring.bufs[lease.slot].ptr, None)
    };
    // Where each host tensor goes in the piece's memory.
    let mut placed: HashMap<(usize, usize), u64> = HashMap::with_capacity(copies.len());
    let mut offset = 0u64;
    let mut enqueued = Ok(());
    for data in &copies {
        // SAFETY: `base + offset` addresses `data.len()` f16 inside an allocation of
        // `packed_bytes` bytes; the copy is ordered on the copy stream after the
        // slot's release (ring) or the compute enqueued so far (new resident memory);
        // the host data outlives the copy (the staged piece, then `retired`, hold it;
        // on an error, the synchronisation below waits for it).
        let r = unsafe { result::memcpy_htod_async(base + offset, data, dev.copy.cu_stream()) };
        if let Err(e) = r.cuda_op("copying weights to the device") {
            enqueued = Err(e);
            break;
        }
        placed.insert((data.as_ptr() as usize, data.len()), offset);
        offset += aligned_bytes(data.len());
    }
    let ready = enqueued.and_then(|()| dev.copy.record_event(None).cuda_op("recording a copy event"));
    let ready = match ready {
        Ok(ev) => ev,
        Err(e) => {
            // The copies enqueued so far read `host` and write the new memory or the
            // slot: neither may be freed or reused before they end (the device is
            // broken, so this returns once they are done or abandoned).
            let _ = dev.copy.synchronize();
            if let (Some(s), Some(ring)) = (slot, st.ring.as_mut()) {
                ring.plan.release(s);
            }
            return Err(e);
        }
    };
    // Every copy is enqueued: record the new residents (only now, so an error
    // above leaves the residency as it was).
    if let Some(buf) = &shared {
        for (&key, &offset) in &placed {
            let bytes = aligned_bytes(key.1);
            let r = Resident { owner: owner.clone(), buf: buf.clone(), offset, bytes, layer: is_layer };
            if let Some(old) = st.resident.insert(key, r) {
                if old.layer {
                    st.layer_bytes -= old.bytes; // a copy of a store that is gone
                }
            }
        }
        if is_layer {
            st.layer_bytes += bytes as u64;
        }
    }
    for (name, key) in waiting {
        tensors.insert(name.to_string(), CudaWeight { ptr: base + placed[&key], len: key.1 });
    }
    drop(st);
    Ok(staged(tensors, Some(ready), slot))
}

/// Device bytes of a tensor of `len` f16 inside a piece: rounded up to [`ALIGN`].
fn aligned_bytes(len: usize) -> u64 {
    (len * 2).next_multiple_of(ALIGN) as u64
}

impl Ring {
    fn new(dev: &Device, slots: usize, slot_bytes: usize) -> Result<Self> {
        let bufs = (0..slots).map(|_| dev.pool.alloc(slot_bytes.max(1))).collect::<Result<_>>()?;
        // Pool memory may still be used by compute just enqueued: the first copies wait.
        let ev = dev.compute.record_event(None).cuda_op("recording a compute event")?;
        dev.copy.wait(&ev).cuda_op("ordering the copy stream")?;
        let released = (0..slots)
            .map(|_| dev.ctx.new_event(None).cuda_op("creating a staging event"))
            .collect::<Result<_>>()?;
        Ok(Self { plan: StagingRing::new(slots, slot_bytes as u64), bufs, released })
    }
}

impl CudaStaged {
    /// A tensor by name; the first lookup makes the compute stream wait for the
    /// copies (until that wait is enqueued, every lookup tries it).
    pub(crate) fn get(&self, name: &str) -> Result<Option<&CudaWeight>> {
        let Some(w) = self.tensors.get(name) else { return Ok(None) };
        if !self.waited.load(Ordering::Acquire) {
            if let Some(ev) = &self.ready {
                self.dev.compute.wait(ev).cuda_op("ordering compute after the weight copies")?;
            }
            self.waited.store(true, Ordering::Release);
        }
        Ok(Some(w))
    }
}

impl Drop for CudaStaged {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if let Some(ev) = self.ready.take() {
            if !self.waited.load(Ordering::Acquire) {
                // Never read: nothing on the compute stream orders the slot's reuse.
                let _ = self.dev.compute.wait(&ev);
            }
            st.retired.push((ev, self.host.clone()));
        }
        if let (Some(slot), Some(ring)) = (self.slot, st.ring.as_mut()) {
            // Every kernel reading the slot is enqueued: the next copy into it waits for them.
            let _ = ring.released[slot].record(&self.dev.compute);
            ring.plan.release(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::packed_bytes;

    #[test]
    fn packing_aligns_every_tensor() {
        assert_eq!(packed_bytes([]), 0);
        assert_eq!(packed_bytes([1]), 256);
        assert_eq!(packed_bytes([128, 129]), 256 + 512);
        assert_eq!(packed_bytes([2048 * 2048]), 2048 * 2048 * 2);
    }
}
