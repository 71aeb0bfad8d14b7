//! The elementwise, row and norm ops and the cuBLAS linear, on the compute
//! stream. Activations are f16 `[rows, cols]`; every kernel computes in f32.
use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::PushKernelArg;
use half::f16;

use super::device::{lock, Cached, CudaResultExt, Device};
use super::kernels;
use super::{CudaTensor, CudaWeight};
use crate::error::{EngineError, Result};

/// Launches kernel `$name` of `$dev.kernels` with `args` (each a `&u64` device
/// address, `&i32`, `&i64` or `&f32`, in the kernel's parameter order) on the
/// compute stream; a `Result<()>`.
macro_rules! launch {
    ($dev:expr, $name:ident, $cfg:expr, $($arg:expr),+ $(,)?) => {
        $crate::cuda::device::CudaResultExt::cuda_op(
            // One expression: the argument temporaries the builder points at live
            // until the launch has read them.
            // SAFETY: the arguments match the kernel's parameter list in order and
            // type (see the kernel sources); every address points into a live
            // allocation of the sizes the kernel indexes, all used on this one stream.
            unsafe { $dev.compute.launch_builder(&$dev.kernels.$name)$(.arg($arg))+.launch($cfg) },
            concat!("launching the ", stringify!($name), " kernel"),
        )
        .map(|_timing_events| ())
    };
}
pub(crate) use launch;

fn i32_of(v: usize) -> i32 {
    i32::try_from(v).expect("a dimension fits in i32")
}

impl Device {
    pub(super) fn new_tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor { buf: self.pool.alloc((rows * cols * 2).max(2))?, rows, cols })
    }

    pub(super) fn embed(&self, table: &CudaWeight, ids: &[u32], dim: usize) -> Result<CudaTensor> {
        let out = self.new_tensor(ids.len(), dim)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let ids_d = self.upload(ids)?;
        let cfg = kernels::per_row(ids.len());
        launch!(self, embed, cfg, &table.ptr, &ids_d.ptr, &out.ptr(), &i32_of(dim))?;
        Ok(out)
    }

    pub(super) fn add_positions(
        &self,
        x: &mut CudaTensor,
        table: &CudaWeight,
        positions: &[usize],
    ) -> Result<()> {
        assert_eq!(positions.len(), x.rows, "one position per row");
        let max = table.len / x.cols.max(1);
        if let Some(p) = positions.iter().find(|p| **p >= max) {
            return Err(EngineError::InvalidRequest(format!(
                "position {p} is outside the {max}-position table"
            )));
        }
        if x.rows == 0 {
            return Ok(());
        }
        let pos: Vec<i32> = positions.iter().map(|&p| i32_of(p)).collect();
        let pos_d = self.upload(&pos)?;
        let cfg = kernels::per_row(x.rows);
        launch!(self, add_positions, cfg, &x.ptr(), &table.ptr, &pos_d.ptr, &i32_of(x.cols))
    }

    pub(super) fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        assert_eq!(w.len, x.cols, "RMSNorm weight length");
        let out = self.new_tensor(x.rows, x.cols)?;
        let cfg = kernels::per_row(x.rows);
        launch!(self, rms_norm, cfg, &x.ptr(), &w.ptr, &out.ptr(), &i32_of(x.cols), &eps)?;
        Ok(out)
    }

    pub(super) fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        b: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        assert_eq!((w.len, b.len), (x.cols, x.cols), "LayerNorm weight and bias lengths");
        let out = self.new_tensor(x.rows, x.cols)?;
        let cfg = kernels::per_row(x.rows);
        let cols = i32_of(x.cols);
        launch!(self, layer_norm, cfg, &x.ptr(), &w.ptr, &b.ptr, &out.ptr(), &cols, &eps)?;
        Ok(out)
    }

    /// `x [rows, in] · wᵀ` with `w` `[out, in]` row-major (+ bias) → `[rows, out]`,
    /// f16 in and out, f32 accumulation (cublasGemmEx, COMPUTE_32F).
    pub(super) fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        out_dim: usize,
    ) -> Result<CudaTensor> {
        assert_eq!(w.len, out_dim * x.cols, "linear weight is [out, in]");
        let y = self.new_tensor(x.rows, out_dim)?;
        if x.rows == 0 {
            return Ok(y);
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: Yᵀ [out, rows] = W [out, in] (stored as colmajor [in, out],
        // hence OP_T) · Xᵀ [in, rows] (colmajor [in, rows], OP_N).
        let blas_h = lock(&self.blas);
        let r16 = blas_sys::cudaDataType::CUDA_R_16F;
        // SAFETY: the pointers address live device buffers of out·in, rows·in and
        // rows·out f16 values; alpha and beta are host f32 (the handle's default
        // pointer mode); the handle is bound to the compute stream.
        let r = unsafe {
            blas::gemm_ex(
                *blas_h.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i32_of(out_dim),
                i32_of(x.rows),
                i32_of(x.cols),
                (&alpha as *const f32).cast::<c_void>(),
                w.ptr as *const c_void,
                r16,
                i32_of(x.cols),
                x.ptr() as *const c_void,
                r16,
                i32_of(x.cols),
                (&beta as *const f32).cast::<c_void>(),
                y.ptr() as *mut c_void,
                r16,
                i32_of(out_dim),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        };
        r.cuda_op("cublasGemmEx")?;
        drop(blas_h);
        if let Some(b) = bias {
            assert_eq!(b.len, out_dim, "bias length");
            let n = y.rows * out_dim;
            let rows = y.rows as i64;
            launch!(self, add_bias, kernels::elementwise(n), &y.ptr(), &b.ptr, &rows, &i32_of(out_dim))?;
        }
        Ok(y)
    }

    pub(super) fn rope(&self, x: &mut CudaTensor, head_dim: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
        let half = head_dim / 2;
        assert!(cos.len() == x.rows * half && sin.len() == cos.len(), "angles are [rows, head_dim / 2]");
        if x.rows == 0 {
            return Ok(());
        }
        // The same angles serve q and k of every layer of a step: uploaded once.
        let (c, s) = (self.upload_cached(Cached::Cos, cos)?, self.upload_cached(Cached::Sin, sin)?);
        let cfg = kernels::per_row(x.rows);
        launch!(self, rope, cfg, &x.ptr(), &c, &s, &i32_of(x.cols), &i32_of(head_dim))
    }

    pub(super) fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols), "silu_mul of mismatched shapes");
        let out = self.new_tensor(gate.rows, gate.cols)?;
        let n = (gate.rows * gate.cols) as i64;
        let cfg = kernels::elementwise(n as usize);
        launch!(self, silu_mul, cfg, &gate.ptr(), &up.ptr(), &out.ptr(), &n)?;
        Ok(out)
    }

    pub(super) fn gelu_tanh(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let out = self.new_tensor(x.rows, x.cols)?;
        let n = (x.rows * x.cols) as i64;
        launch!(self, gelu_tanh, kernels::elementwise(n as usize), &x.ptr(), &out.ptr(), &n)?;
        Ok(out)
    }

    pub(super) fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add of mismatched shapes");
        let n = (x.rows * x.cols) as i64;
        launch!(self, add_assign, kernels::elementwise(n as usize), &x.ptr(), &y.ptr(), &n)
    }

    pub(super) fn split_cols(&self, x: &CudaTensor, widths: &[usize]) -> Result<Vec<CudaTensor>> {
        assert_eq!(widths.iter().sum::<usize>(), x.cols, "split widths must add up to the columns");
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let out = self.new_tensor(x.rows, w)?;
                let cfg = kernels::per_row(x.rows);
                let (cols, s, wd) = (i32_of(x.cols), i32_of(start), i32_of(w));
                launch!(self, split_cols, cfg, &x.ptr(), &out.ptr(), &cols, &s, &wd)?;
                start += w;
                Ok(out)
            })
            .collect()
    }

    pub(super) fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        assert!(rows.iter().all(|&r| r < x.rows), "selected rows inside the tensor");
        let out = self.new_tensor(rows.len(), x.cols)?;
        if rows.is_empty() {
            return Ok(out);
        }
        let idx: Vec<i32> = rows.iter().map(|&r| i32_of(r)).collect();
        let idx_d = self.upload(&idx)?;
        let cfg = kernels::per_row(rows.len());
        launch!(self, select_rows, cfg, &x.ptr(), &idx_d.ptr, &out.ptr(), &i32_of(x.cols))?;
        Ok(out)
    }

    /// Copies `x` to the host as f32 (waits for the compute stream).
    pub(super) fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let mut h = vec![f16::ZERO; x.rows * x.cols];
        self.bind()?;
        // SAFETY: `x` holds rows·cols f16 values; the copy is on the compute stream,
        // after every op that wrote `x`, and `sync_compute` waits for it (on an
        // error too: `h` must outlive a copy that was enqueued).
        let copied =
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut h, x.ptr(), self.compute.cu_stream()) };
        let synced = self.sync_compute();
        copied.cuda_op("copying activations to the host")?;
        synced?;
        Ok(h.iter().map(|v| v.to_f32()).collect())
    }

    /// `x` uploaded from host f32 values (tests and benchmarks).
    pub(super) fn upload_tensor(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        assert_eq!(data.len(), rows * cols, "tensor data must hold rows * cols values");
        let h: Vec<f16> = data.iter().map(|v| f16::from_f32(*v)).collect();
        let buf = self.upload(&h)?;
        Ok(CudaTensor { buf, rows, cols })
    }
}
