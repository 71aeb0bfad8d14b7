//! One CUDA device as the backend uses it: the context (event tracking off: the
//! backend orders its two streams itself), a compute stream and a copy stream,
//! cuBLAS, the compiled kernels, a caching pool of device memory, and a pinned
//! arena for the small per-op uploads (ids, positions, row tables).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::kernels::Kernels;
use crate::error::{Result, WorkerError};

/// Panics with what failed: a CUDA error inside an op leaves the device in an
/// unknown state (the op trait has no error path; see the module docs).
pub(crate) fn ck<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("CUDA {what} failed: {e:?}"),
    }
}

pub(crate) fn backend_err(what: &str) -> impl FnOnce(result::DriverError) -> WorkerError + '_ {
    move |e| WorkerError::Backend(format!("{what}: {e:?}"))
}

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
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let ctx = CudaContext::new(ordinal).map_err(backend_err("creating the CUDA context"))?;
        // SAFETY: no CudaSlice exists yet; from here on this backend orders every
        // use of device memory across its two streams itself (events and stream order).
        unsafe { ctx.disable_event_tracking() };
        let compute = ctx.new_stream().map_err(backend_err("creating the compute stream"))?;
        let copy = ctx.new_stream().map_err(backend_err("creating the copy stream"))?;
        let blas = CudaBlas::new(compute.clone())
            .map_err(|e| WorkerError::Backend(format!("creating the cuBLAS handle: {e:?}")))?;
        let kernels = Kernels::compile(&ctx)?;
        let pool = Arc::new(Pool { ctx: ctx.clone(), free: Mutex::new(HashMap::new()) });
        let uploads = Mutex::new(Uploads::new(&ctx)?);
        let cached = Mutex::new(Default::default());
        Ok(Arc::new(Self { ctx, compute, copy, blas: Mutex::new(blas), kernels, pool, uploads, cached }))
    }

    pub fn bind(&self) {
        ck(self.ctx.bind_to_thread(), "binding the context to this thread");
    }

    /// A device copy of `data` (`T`: plain numbers), ordered on the compute stream.
    pub fn upload<T: Copy>(&self, data: &[T]) -> DeviceBuf {
        let bytes = std::mem::size_of_val(data);
        let buf = self.pool.alloc(bytes.max(1));
        let mut up = self.uploads.lock().expect("upload arena lock");
        up.copy(self, buf.ptr, data);
        buf
    }

    /// The device address of `data`, uploaded unless the last upload of this
    /// kind held the same bytes (a buffer is only ever read after its upload, in
    /// compute-stream order, so reusing or replacing it is ordered too).
    pub fn upload_cached<T: bytemuck::Pod>(&self, kind: Cached, data: &[T]) -> u64 {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut cached = self.cached.lock().expect("upload cache lock");
        let slot = &mut cached[kind as usize];
        match slot {
            Some((held, buf)) if held.as_slice() == bytes => buf.ptr,
            _ => {
                let buf = self.upload(data);
                let ptr = buf.ptr;
                *slot = Some((bytes.to_vec(), buf));
                ptr
            }
        }
    }

    /// Waits for all compute; the upload arena may be reused from the start.
    pub fn sync_compute(&self) {
        ck(self.compute.synchronize(), "synchronising the compute stream");
        self.uploads.lock().expect("upload arena lock").used = 0;
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
        ctx.bind_to_thread().map_err(backend_err("binding the context"))?;
        // SAFETY: the context is current; the arena is freed in Drop.
        let ptr = unsafe { result::malloc_host(Self::BYTES, 0) }
            .map_err(backend_err("allocating the pinned upload arena"))?;
        Ok(Self { ptr: ptr.cast(), cap: Self::BYTES, used: 0 })
    }

    fn copy<T: Copy>(&mut self, dev: &Device, dst: sys::CUdeviceptr, data: &[T]) {
        let bytes = std::mem::size_of_val(data);
        if bytes > self.cap {
            // Too large for the arena: a pageable copy (the driver may synchronise).
            // SAFETY: `dst` holds at least `bytes` (allocated by the caller for `data`).
            ck(unsafe { result::memcpy_htod_async(dst, data, dev.compute.cu_stream()) }, "upload");
            return;
        }
        if self.used + bytes > self.cap {
            ck(dev.compute.synchronize(), "synchronising before reusing the upload arena");
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
        ck(unsafe { result::memcpy_htod_async(dst, region, dev.compute.cu_stream()) }, "upload");
        self.used += bytes.next_multiple_of(256);
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
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> DeviceBuf {
        let class = size_class(bytes);
        let reused = self.free.lock().expect("pool lock").get_mut(&class).and_then(Vec::pop);
        let ptr = match reused {
            Some(p) => p,
            None => {
                ck(self.ctx.bind_to_thread(), "binding the context");
                // SAFETY: the context is current; the memory is returned to the pool on drop.
                match unsafe { result::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        // Out of memory: give back what the pool holds idle, then retry.
                        self.release_idle();
                        // SAFETY: as above.
                        ck(unsafe { result::malloc_sync(class) }, &format!("allocating {class} device bytes"))
                    }
                }
            }
        };
        DeviceBuf { ptr, bytes: class, pool: self.clone() }
    }

    /// Frees every idle buffer (after the device is idle: they may be in flight).
    fn release_idle(&self) {
        let _ = self.ctx.synchronize();
        for ptr in self.free.lock().expect("pool lock").drain().flat_map(|(_, v)| v) {
            // SAFETY: idle pool memory, and the device has finished all work.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for ptr in self.free.get_mut().expect("pool lock").drain().flat_map(|(_, v)| v) {
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
        self.pool.free.lock().expect("pool lock").entry(self.bytes).or_default().push(self.ptr);
    }
}

/// See [`super::CudaBackend::copy_bandwidth`].
pub(crate) fn copy_bandwidth(dev: &Device) -> Result<(f64, f64)> {
    const BYTES: usize = 256 << 20;
    dev.bind();
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let ev = || dev.ctx.new_event(timing).map_err(backend_err("creating a timing event"));
    let (a, b) = (dev.pool.alloc(BYTES), dev.pool.alloc(BYTES));
    // SAFETY: the context is current; the arena is freed below after the stream syncs.
    let host = unsafe { result::malloc_host(BYTES, 0) }.map_err(backend_err("pinning 256 MiB"))?;
    // SAFETY: `host` holds BYTES bytes, initialised here before any copy reads them.
    let host_slice = unsafe {
        std::ptr::write_bytes(host.cast::<u8>(), 1, BYTES);
        std::slice::from_raw_parts(host.cast::<u8>(), BYTES)
    };
    let (mut dtod, mut htod) = (0f64, 0f64);
    for _ in 0..4 {
        let (s, e) = (ev()?, ev()?);
        s.record(&dev.compute).map_err(backend_err("recording"))?;
        // SAFETY: both buffers hold BYTES bytes and are used only on this stream.
        unsafe { result::memcpy_dtod_async(b.ptr, a.ptr, BYTES, dev.compute.cu_stream()) }
            .map_err(backend_err("device copy"))?;
        e.record(&dev.compute).map_err(backend_err("recording"))?;
        let ms = s.elapsed_ms(&e).map_err(backend_err("timing"))? as f64;
        dtod = dtod.max(2.0 * BYTES as f64 / (ms / 1e3));
        let (s, e) = (ev()?, ev()?);
        s.record(&dev.copy).map_err(backend_err("recording"))?;
        // SAFETY: `host_slice` is pinned and outlives the copy (synchronised below).
        unsafe { result::memcpy_htod_async(a.ptr, host_slice, dev.copy.cu_stream()) }
            .map_err(backend_err("host copy"))?;
        e.record(&dev.copy).map_err(backend_err("recording"))?;
        let ms = s.elapsed_ms(&e).map_err(backend_err("timing"))? as f64;
        htod = htod.max(BYTES as f64 / (ms / 1e3));
    }
    dev.copy.synchronize().map_err(backend_err("sync"))?;
    dev.compute.synchronize().map_err(backend_err("sync"))?;
    // SAFETY: no copy uses the arena any more (both streams synchronised).
    unsafe { result::free_host(host) }.map_err(backend_err("freeing pinned memory"))?;
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
