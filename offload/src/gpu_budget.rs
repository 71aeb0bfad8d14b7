//! Sizing device memory (`--gpu-memory BYTES`, like Accelerate's `max_memory`):
//! what must always be on the device (embedding, final norm and head, KV cache,
//! activations), the staging ring for layers that are streamed, and how many
//! layers stay resident in what is left.
//!
//! ```
//! use zeroshard_offload::gpu_budget::{size_gpu_memory, GpuDemand};
//! let demand = GpuDemand {
//!     layer_bytes: vec![100; 10],
//!     outer_bytes: 50,
//!     kv_bytes: 20,
//!     workspace_bytes: 30,
//!     prefetch_layers: 2,
//! };
//! let fit = size_gpu_memory(&demand, 1_100).unwrap();   // everything fits: no staging
//! assert_eq!((fit.resident_layers, fit.staging_slots), (10, 0));
//! let part = size_gpu_memory(&demand, 600).unwrap();    // 3 slots of 100 + 2 resident layers
//! assert_eq!((part.resident_layers, part.staging_slots), (2, 3));
//! assert!(size_gpu_memory(&demand, 350).is_err());      // not even the staging ring fits
//! ```
use crate::error::{OffloadError, Result};

/// What a model needs on the device, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuDemand {
    /// Each decoder layer's weights, in forward order.
    pub layer_bytes: Vec<u64>,
    /// Embedding, final norm, LM head (always resident).
    pub outer_bytes: u64,
    /// The KV cache for the sequences and lengths to be served.
    pub kv_bytes: u64,
    /// Activations and library workspace.
    pub workspace_bytes: u64,
    /// Layers copied ahead of the one computing when layers are streamed.
    pub prefetch_layers: usize,
}

/// How device memory is split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuBudget {
    /// Layers kept on the device, the first `resident_layers` in forward order.
    pub resident_layers: usize,
    /// Their bytes: the device `max_live_bytes`.
    pub resident_bytes: u64,
    /// Staging slots (`prefetch_layers + 1`), 0 when every layer is resident.
    pub staging_slots: usize,
    /// Bytes of one staging slot (the largest layer).
    pub slot_bytes: u64,
    /// Everything that is not a layer: outer weights + KV + workspace.
    pub fixed_bytes: u64,
}

impl GpuBudget {
    /// Total device bytes this budget uses.
    pub fn total_bytes(&self) -> u64 {
        self.fixed_bytes + self.resident_bytes + self.staging_slots as u64 * self.slot_bytes
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Splits `gpu_memory` bytes: all layers resident when they fit, else a staging
/// ring of `prefetch_layers + 1` slots and as many leading layers resident as
/// the rest allows. Refuses, with the numbers, when not even the fixed part plus
/// the ring fits (that is, when no layer could be computed at all).
pub fn size_gpu_memory(d: &GpuDemand, gpu_memory: u64) -> Result<GpuBudget> {
    let fixed = d.outer_bytes + d.kv_bytes + d.workspace_bytes;
    let all_layers: u64 = d.layer_bytes.iter().sum();
    let slot_bytes = d.layer_bytes.iter().copied().max().unwrap_or(0);
    if fixed + all_layers <= gpu_memory {
        return Ok(GpuBudget {
            resident_layers: d.layer_bytes.len(),
            resident_bytes: all_layers,
            staging_slots: 0,
            slot_bytes,
            fixed_bytes: fixed,
        });
    }
    let slots = d.prefetch_layers + 1;
    let ring = slots as u64 * slot_bytes;
    if fixed + ring > gpu_memory {
        return Err(OffloadError::GpuMemory(format!(
            "--gpu-memory {gpu_memory} ({}) is too small to run even one layer: it needs {} = \
             embedding/head {} + KV cache {} + workspace {} + {slots} staging slots × {} \
             (--prefetch-layers {}); the whole model needs {}",
            mib(gpu_memory),
            mib(fixed + ring),
            mib(d.outer_bytes),
            mib(d.kv_bytes),
            mib(d.workspace_bytes),
            mib(slot_bytes),
            d.prefetch_layers,
            mib(fixed + all_layers),
        )));
    }
    let mut left = gpu_memory - fixed - ring;
    let mut resident_layers = 0;
    let mut resident_bytes = 0;
    for &b in &d.layer_bytes {
        if b > left {
            break;
        }
        left -= b;
        resident_bytes += b;
        resident_layers += 1;
    }
    Ok(GpuBudget { resident_layers, resident_bytes, staging_slots: slots, slot_bytes, fixed_bytes: fixed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(layers: usize, prefetch: usize) -> GpuDemand {
        GpuDemand {
            layer_bytes: vec![100; layers],
            outer_bytes: 40,
            kv_bytes: 10,
            workspace_bytes: 50,
            prefetch_layers: prefetch,
        }
    }

    #[test]
    fn everything_resident_when_it_fits_exactly() {
        let b = size_gpu_memory(&demand(4, 2), 500).expect("fits");
        assert_eq!(
            b,
            GpuBudget {
                resident_layers: 4,
                resident_bytes: 400,
                staging_slots: 0,
                slot_bytes: 100,
                fixed_bytes: 100
            }
        );
        assert_eq!(b.total_bytes(), 500);
    }

    #[test]
    fn streams_the_rest_through_a_ring() {
        // 499: one byte short of all resident; ring 3 × 100 leaves 99: no resident layer.
        let b = size_gpu_memory(&demand(4, 2), 499).expect("ring fits");
        assert_eq!((b.resident_layers, b.staging_slots, b.resident_bytes), (0, 3, 0));
        assert!(b.total_bytes() <= 499);
        // Every size from the minimum up never exceeds the budget, and resident layers grow.
        let mut last = 0;
        for mem in 400..=1200 {
            let d = demand(8, 2);
            let b = size_gpu_memory(&d, mem).expect("fits");
            assert!(b.total_bytes() <= mem, "{mem}: {b:?}");
            assert!(b.resident_layers >= last || b.staging_slots == 0);
            last = b.resident_layers;
        }
    }

    #[test]
    fn uneven_layers_use_the_largest_as_slot() {
        let d = GpuDemand {
            layer_bytes: vec![10, 70, 20],
            outer_bytes: 0,
            kv_bytes: 0,
            workspace_bytes: 0,
            prefetch_layers: 0,
        };
        let b = size_gpu_memory(&d, 90).expect("fits");
        // One slot of 70, 20 left: layer 0 (10) is resident, layer 1 (70) is not, so stop.
        assert_eq!((b.slot_bytes, b.staging_slots, b.resident_layers, b.resident_bytes), (70, 1, 1, 10));
    }

    #[test]
    fn refuses_with_the_numbers() {
        let err = size_gpu_memory(&demand(4, 2), 399).expect_err("too small").to_string();
        for needle in
            ["--gpu-memory 399", "too small to run even one layer", "3 staging slots", "--prefetch-layers 2"]
        {
            assert!(err.contains(needle), "{needle:?} in {err}");
        }
        assert_eq!(err.lines().count(), 1);
    }
}
