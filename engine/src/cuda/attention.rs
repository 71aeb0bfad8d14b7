//! The KV cache on the device and causal attention over it.
//!
//! A sequence's cache is one buffer `[layers, 2, capacity, kv_dim]` f16 (K then
//! V per layer), grown by doubling when a step would pass its capacity. The
//! kernels read one small table, three i64 per query row: its sequence's cache
//! address and capacity and its absolute position; the table is the same for
//! every layer of a step, so it is uploaded once per step.
use super::device::{Cached, CudaResultExt, DeviceBuf};
use super::ops::launch;
use super::{kernels, CudaTensor, Device};
use crate::backend::{AttentionShape, BatchLayout};
use crate::error::Result;
use cudarc::driver::PushKernelArg;

/// One sequence's keys and values for every layer, on the device.
pub struct CudaKvCache {
    buf: Option<DeviceBuf>,
    layers: usize,
    kv_dim: usize,
    /// Tokens each block can hold.
    capacity: usize,
    /// Tokens admission reserved for the sequence: the first allocation takes
    /// them all, so the cache never grows (or copies) within its reservation.
    max_tokens: usize,
    /// Tokens held per layer.
    lens: Vec<usize>,
}

/// Capacity for `needed` tokens when `current` is too small: double, at least 64.
pub(crate) fn grown_capacity(current: usize, needed: usize) -> usize {
    needed.max(current * 2).max(64).next_multiple_of(64)
}

impl CudaKvCache {
    pub(crate) fn new(layers: usize, kv_dim: usize, max_tokens: usize) -> Self {
        Self { buf: None, layers, kv_dim, capacity: 0, max_tokens, lens: vec![0; layers] }
    }

    pub(crate) fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    /// Makes room for `needed` tokens, copying what every layer holds.
    /// On an error the cache keeps its old buffer and capacity.
    fn reserve(&mut self, dev: &Device, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity =
            if needed <= self.max_tokens { self.max_tokens } else { grown_capacity(self.capacity, needed) };
        let bytes = self.layers * 2 * capacity * self.kv_dim * 2;
        let new = dev.pool.alloc(bytes)?;
        if let Some(old) = &self.buf {
            let block = self.capacity * self.kv_dim * 2;
            for i in 0..self.layers * 2 {
                // SAFETY: both buffers hold layers·2 blocks of their capacity; the copy
                // is ordered on the compute stream after every write to `old`, and
                // `old` returns to the pool only for later compute-stream uses.
                let r = unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        new.ptr + (i * capacity * self.kv_dim * 2) as u64,
                        old.ptr + (i * block) as u64,
                        block,
                        dev.compute.cu_stream(),
                    )
                };
                r.cuda_op("growing the KV cache")?;
            }
        }
        self.buf = Some(new);
        self.capacity = capacity;
        Ok(())
    }
}

/// Appends `k`, `v` to each sequence's cache at `layer`, then attends.
#[allow(clippy::too_many_arguments)] // the op trait's signature
pub(crate) fn attention(
    dev: &Device,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    caches: &mut [&mut CudaKvCache],
    layer: usize,
    layout: &BatchLayout,
    shape: AttentionShape<'_>,
) -> Result<CudaTensor> {
    let hd = shape.head_dim;
    let kv_dim = shape.num_kv_heads * hd;
    assert_eq!(caches.len(), layout.seqs.len(), "one cache per sequence");
    assert!(
        hd <= kernels::MAX_HEAD_DIM,
        "head_dim {hd} is above the CUDA kernel's {}",
        kernels::MAX_HEAD_DIM
    );
    assert!(shape.num_heads.is_multiple_of(shape.num_kv_heads), "heads must be a multiple of kv heads");
    assert_eq!((q.cols, k.cols, v.cols), (shape.num_heads * hd, kv_dim, kv_dim), "q, k, v widths");
    let mut table = Vec::with_capacity(q.rows * 3);
    for (cache, slot) in caches.iter_mut().zip(&layout.seqs) {
        assert_eq!(cache.kv_dim, kv_dim, "cache kv_dim");
        assert_eq!(cache.lens[layer], slot.past, "cache holds the sequence's past tokens");
        cache.reserve(dev, slot.past + slot.len)?;
        let base = cache.buf.as_ref().expect("reserved").ptr;
        for i in 0..slot.len {
            table.extend([base as i64, cache.capacity as i64, (slot.past + i) as i64]);
        }
        cache.lens[layer] += slot.len;
    }
    let out = dev.new_tensor(q.rows, q.cols)?;
    if q.rows == 0 {
        return Ok(out);
    }
    let table_d = dev.upload_cached(Cached::AttentionRows, &table)?;
    let slopes_ptr = match shape.alibi_slopes {
        Some(s) => {
            assert_eq!(s.len(), shape.num_heads, "one ALiBi slope per head");
            dev.upload_cached(Cached::Slopes, s)?
        }
        None => 0u64,
    };
    let kv = i32::try_from(kv_dim).expect("kv_dim fits i32");
    let layer_i = i32::try_from(layer).expect("layer fits i32");
    launch!(dev, kv_append, kernels::per_row(q.rows), &k.ptr(), &v.ptr(), &table_d, &layer_i, &kv)?;
    let window = shape.sliding_window.map_or(0, |w| i32::try_from(w).unwrap_or(i32::MAX));
    let scale = 1.0 / (hd as f32).sqrt();
    let (heads, kv_heads, hd32) = (shape.num_heads as i32, shape.num_kv_heads as i32, hd as i32);
    launch!(
        dev,
        attention,
        kernels::attention(q.rows, shape.num_heads),
        &q.ptr(),
        &out.ptr(),
        &table_d,
        &slopes_ptr,
        &layer_i,
        &heads,
        &kv_heads,
        &hd32,
        &window,
        &scale,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::grown_capacity;

    #[test]
    fn capacity_doubles_in_multiples_of_64() {
        assert_eq!(grown_capacity(0, 1), 64);
        assert_eq!(grown_capacity(64, 65), 128);
        assert_eq!(grown_capacity(128, 1000), 1024);
        assert_eq!(grown_capacity(1024, 1025), 2048);
        for cur in [0, 64, 192, 4096] {
            for need in [cur + 1, cur + 63, 3 * cur + 7] {
                let c = grown_capacity(cur, need);
                assert!(c >= need && c.is_multiple_of(64) && (cur == 0 || c >= 2 * cur));
            }
        }
    }
}
