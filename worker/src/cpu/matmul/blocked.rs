//! Products with many activation rows (prefill, batches): blocks of weight rows are widened
//! to f32 into a per-thread scratch buffer, then multiplied with gemm's f32 kernel.
use super::{add_bias, Isa, OutCols};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::cell::RefCell;

/// Scratch size per block of widened weight rows, in f32 elements (512 KiB: half of L2).
const BLOCK_ELEMS: usize = 128 * 1024;

thread_local! {
    /// Widened weight rows `[rows, k]`, reused across calls on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out = x · wᵀ (+ bias)` for the window's weight rows `w[width, k]` and `x[n, k]`.
pub(super) fn matmul(
    _isa: Isa,
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    mut out: OutCols<'_>,
    k: usize,
) {
    let n = out.rows();
    let width = out.width();
    let block_rows = (BLOCK_ELEMS / k).clamp(1, width);
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < block_rows * k {
            scratch.resize(block_rows * k, 0.0);
        }
        for j in (0..width).step_by(block_rows) {
            let rows = block_rows.min(width - j);
            let wf = &mut scratch[..rows * k]; // [rows, k]
            w[j * k..(j + rows) * k].convert_to_f32_slice(wf);
            let dst = out.col_ptr(j);
            // SAFETY: `dst` addresses out[0..n, j..j + rows] with row stride `m`, inside the
            // window `out` borrows exclusively; `x` is [n, k] row-major and `wf` is
            // [rows, k] row-major, read as its transpose [k, rows] (column stride k).
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    k,
                    dst,
                    1,
                    out.row_stride() as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    wf.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    add_bias(bias, &mut out);
}
