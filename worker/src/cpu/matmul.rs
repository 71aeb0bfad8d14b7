//! f16-weight matrix products with f32 activations: the hot op of the CPU backend.
//!
//! [`matmul_f16`] computes `out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m])`, with `w` in the
//! safetensors `nn.Linear` layout `[out_features, in_features]`. Weights are widened to f32
//! exactly; activations stay f32; accumulation is f32.
//!
//! Two regimes, chosen by the number of activation rows `n`:
//! - decode (`n ≤ GEMV_MAX_N`): a GEMV that streams the weight rows once, a few rows at a
//!   time, with AVX2/FMA/F16C intrinsics when the CPU has them (detected once) and a
//!   portable scalar loop otherwise;
//! - prefill and batches (`n > GEMV_MAX_N`): see [`blocked`].
//!
//! Large matrices are split by weight rows over rayon's global pool; small ones run on the
//! calling thread without allocating.
//!
//! ```ignore
//! // x: [n, k] f32, w: [m, k] f16, bias: [m] f16, out: [n, m] f32
//! matmul_f16(&x, &w, Some(&bias), &mut out, n, k, m);
//! ```
use half::f16;
use std::marker::PhantomData;
use std::sync::OnceLock;

mod blocked;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Largest activation row count served by the GEMV kernels.
const GEMV_MAX_N: usize = 4;

/// Weight elements (`m * k`) from which a product is split over the rayon pool.
const PARALLEL_MIN_ELEMS: usize = 256 * 1024;

/// Weight elements each parallel task should own at least.
const TASK_MIN_ELEMS: usize = 128 * 1024;

/// `out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m] if given)`.
///
/// `x` and `out` are row-major f32, `w` is row-major f16 `[out_features = m, in_features = k]`
/// (the safetensors `nn.Linear` layout) and `bias` is `[m]`. Accumulates in f32.
///
/// # Panics
/// If a slice length disagrees with `n`, `k` and `m`.
pub fn matmul_f16(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    out: &mut [f32],
    n: usize,
    k: usize,
    m: usize,
) {
    matmul_with(Isa::detect(), x, w, bias, out, n, k, m);
}

/// Instruction sets the kernels can use; detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    isa: Isa,
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    out: &mut [f32],
    n: usize,
    k: usize,
    m: usize,
) {
    assert_eq!(x.len(), n * k, "matmul_f16: x has {} elements, expected n*k = {n}*{k}", x.len());
    assert_eq!(w.len(), m * k, "matmul_f16: w has {} elements, expected m*k = {m}*{k}", w.len());
    assert_eq!(out.len(), n * m, "matmul_f16: out has {} elements, expected n*m = {n}*{m}", out.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), m, "matmul_f16: bias has {} elements, expected m = {m}", b.len());
    }
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        // Empty sums: only the bias remains.
        for row in out.chunks_exact_mut(m) {
            match bias {
                Some(b) => row.iter_mut().zip(b).for_each(|(o, b)| *o = b.to_f32()),
                None => row.fill(0.0),
            }
        }
        return;
    }
    let task = |cols: OutCols<'_>| {
        let rows = &w[cols.start() * k..cols.end() * k];
        let bias = bias.map(|b| &b[cols.start()..cols.end()]);
        if n <= GEMV_MAX_N {
            gemv(isa, x, rows, bias, cols, k);
        } else {
            blocked::matmul(isa, x, rows, bias, cols, k);
        }
    };
    let threads = rayon::current_num_threads();
    if threads == 1 || m < 2 || m * k < PARALLEL_MIN_ELEMS {
        task(OutCols::whole(out, n, m));
        return;
    }
    // Enough tasks to balance two threads when one is briefly interrupted, each large
    // enough to amortise its scheduling.
    let tasks = (m * k / TASK_MIN_ELEMS).clamp(2, 4 * threads).min(m);
    let width = m.div_ceil(tasks);
    use rayon::prelude::*;
    OutCols::split(out, n, m, width).into_par_iter().for_each(task);
}

/// Decode-sized product: every weight row is read once and dotted with all `n ≤ 4`
/// activation rows.
fn gemv(isa: Isa, x: &[f32], w: &[f16], bias: Option<&[f16]>, mut out: OutCols<'_>, k: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after detecting AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::gemv(x, w, &mut out, k) },
        Isa::Scalar => gemv_scalar(x, w, &mut out, k),
    }
    add_bias(bias, &mut out);
}

/// Portable GEMV: each weight row dotted with every activation row.
fn gemv_scalar(x: &[f32], w: &[f16], out: &mut OutCols<'_>, k: usize) {
    for (j, wj) in w.chunks_exact(k).enumerate() {
        for (i, xi) in x.chunks_exact(k).enumerate() {
            out.set(i, j, dot_scalar(xi, wj));
        }
    }
}

/// Σ x·w in f32 with eight partial sums, the order the SIMD kernels use.
fn dot_scalar(x: &[f32], w: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (x8, x_tail) = x.split_at(x.len() / 8 * 8);
    let (w8, w_tail) = w.split_at(x8.len());
    for (cx, cw) in x8.chunks_exact(8).zip(w8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = cx[l].mul_add(cw[l].to_f32(), acc[l]);
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (p, q) in x_tail.iter().zip(w_tail) {
        sum = p.mul_add(q.to_f32(), sum);
    }
    sum
}

/// `out[i, j] += bias[j]` for every row `i`.
fn add_bias(bias: Option<&[f16]>, out: &mut OutCols<'_>) {
    let Some(bias) = bias else { return };
    for i in 0..out.rows() {
        for (j, b) in bias.iter().enumerate() {
            out.add(i, j, b.to_f32());
        }
    }
}

/// A window of whole columns `[start, end)` of a row-major `out[n, m]`.
///
/// Windows split from one `&mut` borrow never overlap, so each may be written from its own
/// thread: this is the one place where the output is shared between threads.
struct OutCols<'a> {
    /// `&mut out[0]`: the whole matrix, of which only this window's columns are touched.
    base: *mut f32,
    n: usize,
    m: usize,
    start: usize,
    end: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: an `OutCols` is an exclusive borrow of its columns (no other window or borrow of
// the matrix reaches them while it lives), so moving it to another thread is like moving a
// `&mut [f32]`.
unsafe impl Send for OutCols<'_> {}

impl<'a> OutCols<'a> {
    /// The whole of `out[n, m]` as one window.
    fn whole(out: &'a mut [f32], n: usize, m: usize) -> Self {
        assert_eq!(out.len(), n * m, "OutCols: out is not [{n}, {m}]");
        OutCols { base: out.as_mut_ptr(), n, m, start: 0, end: m, _out: PhantomData }
    }

    /// `out[n, m]` cut into disjoint windows of `width` columns (the last may be narrower).
    fn split(out: &'a mut [f32], n: usize, m: usize, width: usize) -> Vec<Self> {
        assert!(width > 0, "OutCols: zero window width");
        let whole = OutCols::whole(out, n, m);
        (0..m)
            .step_by(width)
            .map(|start| OutCols { start, end: (start + width).min(m), ..whole })
            .collect()
    }

    fn rows(&self) -> usize {
        self.n
    }

    fn start(&self) -> usize {
        self.start
    }

    fn end(&self) -> usize {
        self.end
    }

    fn width(&self) -> usize {
        self.end - self.start
    }

    /// Flat index of `out[i, start + j]`, checked against the window.
    #[inline(always)]
    fn index(&self, i: usize, j: usize) -> usize {
        assert!(i < self.n && j < self.width(), "OutCols: ({i}, {j}) outside the window");
        i * self.m + self.start + j
    }

    /// `out[i, start + j] = v`.
    #[inline(always)]
    fn set(&mut self, i: usize, j: usize, v: f32) {
        let at = self.index(i, j);
        // SAFETY: `index` checked that the element lies in this window, which `&mut self`
        // borrows exclusively; `base` points at `n * m` live elements for `'a`.
        unsafe { *self.base.add(at) = v };
    }

    /// `out[i, start + j] += v`.
    #[inline(always)]
    fn add(&mut self, i: usize, j: usize, v: f32) {
        let at = self.index(i, j);
        // SAFETY: as in `set`.
        unsafe { *self.base.add(at) += v };
    }

    /// Pointer to `out[0, start + j]`, whose rows are `m` elements apart; the caller may write
    /// rows `0..n`, columns `start + j..end` through it while it holds `&mut self`.
    fn col_ptr(&mut self, j: usize) -> *mut f32 {
        let at = self.index(0, j);
        // SAFETY: `at < n * m`, inside the allocation `base` points into.
        unsafe { self.base.add(at) }
    }

    /// Row stride of the matrix, in elements.
    fn row_stride(&self) -> usize {
        self.m
    }
}
