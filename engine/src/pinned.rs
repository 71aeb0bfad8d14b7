//! Host memory for weights: page-locked (pinned) when a GPU is used, so that
//! host → device copies run at full PCIe speed and truly asynchronously, else
//! ordinary heap memory.
//!
//! ```ignore
//! let alloc = HostAlloc::pinned(ctx);            // or HostAlloc::Heap
//! let mut buf = alloc.alloc_f16(n);              // falls back to the heap if pinning fails
//! buf.copy_from_slice(&data);                    // derefs to [f16]
//! assert!(buf.is_pinned());
//! ```
use std::sync::Arc;

use cudarc::driver::{result, CudaContext};
use half::f16;

/// Where [`HostBuffer`]s come from.
#[derive(Clone, Debug, Default)]
pub enum HostAlloc {
    /// Ordinary heap memory (CPU backend, or no CUDA).
    #[default]
    Heap,
    /// `cuMemHostAlloc` in this context (the caller has probed that CUDA exists).
    Pinned(Arc<CudaContext>),
}

impl HostAlloc {
    pub fn pinned(ctx: Arc<CudaContext>) -> Self {
        Self::Pinned(ctx)
    }

    /// A buffer of `len` zeroed f16 values; pinned when this allocator pins and
    /// the driver agrees, else on the heap (a refusal is logged once per call).
    pub fn alloc_f16(&self, len: usize) -> HostBuffer {
        match self {
            Self::Pinned(ctx) if len > 0 => match PinnedRegion::new(ctx, len) {
                Ok(region) => HostBuffer { inner: Inner::Pinned(region) },
                Err(e) => {
                    tracing::warn!("pinning {} bytes failed ({e}); using pageable memory", len * 2);
                    HostBuffer::from(vec![f16::ZERO; len])
                }
            },
            _ => HostBuffer::from(vec![f16::ZERO; len]),
        }
    }

    /// A copy of `data` in memory from this allocator.
    pub fn copy_f16(&self, data: &[f16]) -> HostBuffer {
        let mut buf = self.alloc_f16(data.len());
        buf.copy_from_slice(data);
        buf
    }
}

/// Owned f16 values in host memory, pinned or not; derefs to `[f16]`.
pub struct HostBuffer {
    inner: Inner,
}

enum Inner {
    Heap(Vec<f16>),
    Pinned(PinnedRegion),
}

impl HostBuffer {
    pub fn is_pinned(&self) -> bool {
        matches!(self.inner, Inner::Pinned(_))
    }
}

impl From<Vec<f16>> for HostBuffer {
    fn from(v: Vec<f16>) -> Self {
        Self { inner: Inner::Heap(v) }
    }
}

impl std::ops::Deref for HostBuffer {
    type Target = [f16];
    fn deref(&self) -> &[f16] {
        match &self.inner {
            Inner::Heap(v) => v,
            Inner::Pinned(p) => p.as_slice(),
        }
    }
}

impl std::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [f16] {
        match &mut self.inner {
            Inner::Heap(v) => v,
            Inner::Pinned(p) => p.as_mut_slice(),
        }
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuffer({} f16, pinned: {})", self.len(), self.is_pinned())
    }
}

/// `len` f16 values from `cuMemHostAlloc`, zeroed, freed with `cuMemFreeHost`.
struct PinnedRegion {
    ptr: *mut f16,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the region is plain host memory owned by this value alone; the raw
// pointer is only dereferenced through `&self` / `&mut self`.
unsafe impl Send for PinnedRegion {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for PinnedRegion {}

impl PinnedRegion {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, result::DriverError> {
        ctx.bind_to_thread()?;
        let bytes = len.checked_mul(2).expect("pinned allocation size overflows usize");
        // SAFETY: the context is current on this thread; flags 0 = plain page-locked
        // memory (not write-combined: the CPU may read it back).
        let raw = unsafe { result::malloc_host(bytes, 0) }?;
        let ptr = raw.cast::<f16>();
        assert!(!ptr.is_null() && ptr.is_aligned(), "cuMemHostAlloc returned an unusable pointer");
        // SAFETY: `ptr` points at `bytes` writable bytes just allocated; zero is a valid f16.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(Self { ptr, len, ctx: ctx.clone() })
    }

    fn as_slice(&self) -> &[f16] {
        // SAFETY: `ptr` holds `len` initialised f16 values for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f16] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `cuMemHostAlloc` in this context and is freed once;
        // copies reading it were ordered before this drop by the owner (the backend
        // synchronises its streams before the weights it reads are dropped).
        if let Err(e) = unsafe { result::free_host(self.ptr.cast()) } {
            tracing::warn!("cuMemFreeHost failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_hold_and_copy_values() {
        let alloc = HostAlloc::Heap;
        let mut b = alloc.alloc_f16(4);
        assert!(!b.is_pinned());
        assert_eq!(&b[..], &[f16::ZERO; 4]);
        b[2] = f16::from_f32(1.5);
        assert_eq!(b[2].to_f32(), 1.5);
        let data: Vec<f16> = (0..5).map(|i| f16::from_f32(i as f32)).collect();
        let c = alloc.copy_f16(&data);
        assert_eq!(&c[..], &data[..]);
        assert_eq!(format!("{c:?}"), "HostBuffer(5 f16, pinned: false)");
        assert!(alloc.alloc_f16(0).is_empty());
    }

    #[test]
    fn a_vec_becomes_a_buffer_without_copying() {
        let v = vec![f16::ONE; 3];
        let p = v.as_ptr();
        let b = HostBuffer::from(v);
        assert_eq!(b.as_ptr(), p);
    }
}
