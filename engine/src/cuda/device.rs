//! One CUDA device as the backend uses it: the context (event tracking off: the
//! backend orders its two streams itself), a compute stream and a copy stream,
//! cuBLAS, the compiled kernels, a caching pool of device memory, and a pinned
//! arena for the small per-op uploads (ids, positions, row tables).
//!
//! Every CUDA call's error is returned as a fatal [`EngineError::Device`]
//! ([`CudaResultExt::cuda_op`]); every lock is taken with [`lock`].
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::kernels::Kernels;
use crate::error::{EngineError, Result};

/// A failed CUDA call (driver, cuBLAS, NVRTC) as the error of the backend op `op`.
pub(crate) trait CudaResultExt<T> {
    /// Every CUDA error is fatal: after one, the context may hold a sticky error,
    /// the device may be gone, or the failed op may have left work half enqueued,
    /// so nothing computed on this device can be trusted again.
    fn cuda_op(self, op: &str) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> CudaResultExt<T> for std::result::Result<T, E> {
    fn cuda_op(self, op: &str) -> Result<T> {
        self.map_err(|e| EngineError::Device { op: op.to_string(), fatal: true, source: Box::new(e) })
    }
}

pub(crate) use zeroshard_offload::sync::lock;

/// Everything the backend's ops share.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub compute: Arc<CudaStream>,
    pub copy: Arc<CudaStream>,
    pub blas: Mutex<CudaBlas>,
    pub kernels: Kernels,
    pub pool: Arc<Pool>,
    pub uploads: Mutex<Uploads>,
    /// The last upload of each [`Cached`] kind, reused while its content repeats.
    cached: Mutex<[Option<CachedUpload>; Cached::KINDS]>,
}

/// The bytes last uploaded for a [`Cached`] kind, and where they are.
type CachedUpload = (Vec<u8>, DeviceBuf);

/// Small per-step tables that repeat across the layers of a step.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cached {
    Cos,
    Sin,
    Slopes,
    AttentionRows,
}

impl Cached {
    const KINDS: usize = 4;
}

impl Device {
    pub(super) fn open(ordinal: usize) -> Result<Arc<Self>> {
        let ctx = CudaContext::new(ordinal).cuda_op("creating the CUDA context")?;
        // SAFETY: no CudaSlice exists yet; from here on this backend orders every
        // use of device memory across its two streams itself (events and stream order).
        unsafe { ctx.disable_event_tracking() };
        let compute = ctx.new_stream().cuda_op("creating the compute stream")?;
        let copy = ctx.new_stream().cuda_op("creating the copy stream")?;
        let blas = CudaBlas::new(compute.clone()).cuda_op("creating the cuBLAS handle")?;
        let kernels = Kernels::compile(&ctx)?;
        let pool = Arc::new(Pool { ctx: ctx.clone(), free: Mutex::new(HashMap::new()) });
        let uploads = Mutex::new(Uploads::new(&ctx)?);
        let cached = Mutex::new(Default::default());
        Ok(Arc::new(Self { ctx, compute, copy, blas: Mutex::new(blas), kernels, pool, uploads, cached }))
    }

    pub(super) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().cuda_op("binding the context to this thread")
    }

    /// A device copy of `data` (`T`: plain numbers), ordered on the compute stream.
    pub(super) fn upload<T: Copy>(&self, data: &[T]) -> Result<DeviceBuf> {
        let bytes = std::mem::size_of_val(data);
        let buf = self.pool.alloc(bytes.max(1))?;
        lock(&self.uploads).copy(self, buf.ptr, data)?;
        Ok(buf)
    }

    /// The device address of `data`, uploaded unless the last upload of this
    /// kind held the same bytes (a buffer is only ever read after its upload, in
    /// compute-stream order, so reusing or replacing it is ordered too).
    pub(super) fn upload_cached<T: bytemuck::Pod>(&self, kind: Cached, data: &[T]) -> Result<u64> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut cached = lock(&self.cached);
        let slot = &mut cached[kind as usize];
        match slot {
            Some((held, buf)) if held.as_slice() == bytes => Ok(buf.ptr),
            _ => {
                // On an error the slot keeps its old (or no) upload: it is never stale.
                let buf = self.upload(data)?;
                let ptr = buf.ptr;
                *slot = Some((bytes.to_vec(), buf));
                Ok(ptr)
            }
        }
    }

    /// Waits for all compute; the upload arena may be reused from the start.
    pub(super) fn sync_compute(&self) -> Result<()> {
        self.compute.synchronize().cuda_op("synchronising the compute stream")?;
        lock(&self.uploads).used = 0;
        Ok(())
    }
}

/// Pinned host memory that small uploads pass through, so their copies are truly
/// asynchronous. Reset whenever the compute stream has been synchronised.
pub(crate) struct Uploads {
    ptr: *mut u8,
    cap: usize,
    used: usize,
}

// SAFETY: the arena is plain pinned host memory, used only under the device's mutex.
unsafe impl Send for Uploads {}

impl Uploads {
    const BYTES: usize = 8 << 20;

    fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().cuda_op("binding the context")?;
        // SAFETY: the context is current; the arena is freed in Drop.
        let ptr =
            unsafe { result::malloc_host(Self::BYTES, 0) }.cuda_op("allocating the pinned upload arena")?;
        Ok(Self { ptr: ptr.cast(), cap: Self::BYTES, used: 0 })
    }

    fn copy<T: Copy>(&mut self, dev: &Device, dst: sys::CUdeviceptr, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes > self.cap {
            // Too large for the arena: a pageable copy (the driver may synchronise).
            // SAFETY: `dst` holds at least `bytes` (allocated by the caller for `data`).
            return unsafe { result::memcpy_htod_async(dst, data, dev.compute.cu_stream()) }
                .cuda_op("upload");
        }
        if self.used + bytes > self.cap {
            dev.compute.synchronize().cuda_op("synchronising before reusing the upload arena")?;
            self.used = 0;
        }
        // SAFETY: `used + bytes <= cap`; the region was last read by a copy that the
        // synchronisation above (or an earlier one that reset `used`) saw complete.
        let region = unsafe {
            let p = self.ptr.add(self.used);
            std::ptr::copy_nonoverlapping(data.as_ptr().cast::<u8>(), p, bytes);
            std::slice::from_raw_parts(p, bytes)
        };
        // SAFETY: `dst` holds at least `bytes`; the pinned region stays untouched until
        // the next synchronisation of the compute stream, on which the copy is ordered.
        unsafe { result::memcpy_htod_async(dst, region, dev.compute.cu_stream()) }.cuda_op("upload")?;
        self.used += bytes.next_multiple_of(256);
        Ok(())
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in `new`; the device drops it after
        // synchronising its streams (see `CudaBackend`'s Drop).
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// Device memory in size classes, kept for reuse: activations come and go every
/// op. Reuse is safe because every buffer from the pool is used on the compute
/// stream (copies into pool buffers on the copy stream first wait for the compute
/// enqueued so far), so stream order separates a buffer's old and new uses.
pub(crate) struct Pool {
    ctx: Arc<CudaContext>,
    free: Mutex<HashMap<usize, Vec<sys::CUdeviceptr>>>,
}

/// The size a request of `bytes` is rounded up to: powers of two up to 1 MiB,
/// then eighths of the power-of-two octave (at most 12.5% waste).
pub(crate) fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(256);
    if bytes <= 1 << 20 {
        return bytes.next_power_of_two();
    }
    let step = (bytes.next_power_of_two() / 2) / 8;
    bytes.next_multiple_of(step)
}

impl Pool {
    pub(super) fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuf> {
        let class = size_class(bytes);
        let reused = lock(&self.free).get_mut(&class).and_then(Vec::pop);
        let ptr = match reused {
            Some(p) => p,
            None => {
                self.ctx.bind_to_thread().cuda_op("binding the context")?;
                // SAFETY: the context is current; the memory is returned to the pool on drop.
                match unsafe { result::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        // Out of memory: give back what the pool holds idle, then retry.
                        self.release_idle();
                        // SAFETY: as above.
                        unsafe { result::malloc_sync(class) }
                            .cuda_op(&format!("allocating {class} device bytes"))?
                    }
                }
            }
        };
        Ok(DeviceBuf { ptr, bytes: class, pool: self.clone() })
    }

    /// Frees every idle buffer (after the device is idle: they may be in flight).
    fn release_idle(&self) {
        let _ = self.ctx.synchronize();
        for ptr in lock(&self.free).drain().flat_map(|(_, v)| v) {
            // SAFETY: idle pool memory, and the device has finished all work.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let free = self.free.get_mut().unwrap_or_else(PoisonError::into_inner); // as `lock`
        for ptr in free.drain().flat_map(|(_, v)| v) {
            // SAFETY: every pointer here came from malloc_sync and is no longer used
            // (the backend synchronises before the pool goes).
            let _ = unsafe { result::free_sync(ptr) };
        }
    }
}

/// A device allocation from the [`Pool`], returned to it on drop.
pub(crate) struct DeviceBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
    pool: Arc<Pool>,
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        lock(&self.pool.free).entry(self.bytes).or_default().push(self.ptr);
    }
}

/// See [`super::CudaBackend::copy_bandwidth`]. Timed on the host around each
/// copy and its stream's synchronisation (a 256 MiB copy takes milliseconds, the
/// wait microseconds), not with event timing: `cuEventElapsedTime_v2` is newer
/// than the drivers the backend supports ([`super::versions`]).
pub(crate) fn copy_bandwidth(dev: &Device) -> Result<(f64, f64)> {
    const BYTES: usize = 256 << 20;
    dev.bind()?;
    let (a, b) = (dev.pool.alloc(BYTES)?, dev.pool.alloc(BYTES)?);
    // SAFETY: the context is current; the arena is freed below after the streams sync
    // (an error before then leaves it allocated: a copy may still read it).
    let host = unsafe { result::malloc_host(BYTES, 0) }.cuda_op("pinning 256 MiB")?;
    // SAFETY: `host` holds BYTES bytes, initialised here before any copy reads them.
    let host_slice = unsafe {
        std::ptr::write_bytes(host.cast::<u8>(), 1, BYTES);
        std::slice::from_raw_parts(host.cast::<u8>(), BYTES)
    };
    let (mut dtod, mut htod) = (0f64, 0f64);
    dev.compute.synchronize().cuda_op("sync")?;
    dev.copy.synchronize().cuda_op("sync")?;
    for _ in 0..4 {
        let t = std::time::Instant::now();
        // SAFETY: both buffers hold BYTES bytes and are used only on this stream.
        unsafe { result::memcpy_dtod_async(b.ptr, a.ptr, BYTES, dev.compute.cu_stream()) }
            .cuda_op("device copy")?;
        dev.compute.synchronize().cuda_op("sync")?;
        dtod = dtod.max(2.0 * BYTES as f64 / t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        // SAFETY: `host_slice` is pinned and outlives the copy (synchronised here).
        unsafe { result::memcpy_htod_async(a.ptr, host_slice, dev.copy.cu_stream()) }.cuda_op("host copy")?;
        dev.copy.synchronize().cuda_op("sync")?;
        htod = htod.max(BYTES as f64 / t.elapsed().as_secs_f64());
    }
    // SAFETY: no copy uses the arena any more (both streams synchronised).
    unsafe { result::free_host(host) }.cuda_op("freeing pinned memory")?;
    Ok((dtod, htod))
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_with_bounded_waste() {
        assert_eq!(size_class(0), 256);
        assert_eq!(size_class(257), 512);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 17));
        for bytes in (1usize..64 << 20).step_by(99_991) {
            let c = size_class(bytes);
            assert!(c >= bytes);
            if bytes > 1 << 20 {
                assert!((c - bytes) as f64 <= bytes as f64 / 8.0, "{bytes} -> {c}");
            }
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }
}
