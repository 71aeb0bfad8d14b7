//! f16-weight matrix products with f32 activations: the hot op of the CPU backend.
//!
//! [`matmul_f16`] computes `out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m])` with `w` in the
//! safetensors `nn.Linear` layout `[out_features, in_features]`. Weights are widened to f32
//! exactly, activations stay f32 and sums are f32.
//!
//! Two regimes, by the number of activation rows `n`:
//! - decode and small batches (`n ≤ 32`, [`kernel::decode`]): dot products that stream
//!   each weight row once, a few long runs of rows side by side, against tiles of up to
//!   eight activation rows (four on AVX2); beyond one tile, weight rows are taken an
//!   L2-sized block at a time and every tile meets the block ([`kernel::blocked`]). Bound
//!   by memory bandwidth, then by arithmetic with little overhead.
//! - prefill and large batches (`n > 32`, [`gemm`]): activations packed once, weights
//!   widened and transposed a cache-sized panel at a time, and a register-blocked
//!   outer-product micro-kernel (6×16 on AVX2, 8×48 on AVX-512) over them; bound by
//!   arithmetic. (Below 33 rows the packing costs more than it saves: measured with
//!   `examples/matmul_bench`.)
//!
//! The instruction set is detected once: AVX-512 (F/BW/VL), else AVX2 + FMA + F16C, else a
//! portable scalar loop. `ZEROSHARD_CPU_ISA=avx2` (or `scalar`) caps the choice, to compare
//! kernels or rule one out; `scalar` also keeps the backend's vectorized row ops
//! ([`vectorized`]) to portable code. Products of more than `PARALLEL_MIN_WORK` are split by weight
//! rows over rayon's global pool (each weight read once whatever `n`); smaller ones run on
//! the calling thread.
//!
//! ```ignore
//! // x: [n, k] f32, w: [m, k] f16, bias: [m] f16, out: [n, m] f32
//! matmul_f16(&x, &w, Some(&bias), &mut out, n, k, m);
//! ```
use half::f16;
use out_cols::OutCols;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod gemm;
mod kernel;
mod out_cols;
#[cfg(test)]
mod tests;

/// Work (weight elements × activation rows / 4) from which a product is split over the
/// rayon pool: about 5 µs on one thread, several times rayon's cost of waking a thread.
const PARALLEL_MIN_WORK: usize = 256 * 1024;

/// Work each parallel task should have at least, so that scheduling stays negligible.
const TASK_MIN_WORK: usize = 128 * 1024;

/// Weight rows per parallel task are a multiple of this (of every panel and lane count).
const TASK_ROW_MULTIPLE: usize = 48;

/// Activation rows up to which a product is dot products (tiles of a few activation rows
/// against blocks of weight rows); more go through the packed GEMM.
const DECODE_ROWS: usize = 32;

/// `out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m] if given)`.
///
/// `x` and `out` are row-major f32, `w` is row-major f16 `[out_features = m, in_features = k]`
/// (the safetensors `nn.Linear` layout) and `bias` is `[m]`. Sums are f32 over weights
/// widened exactly; activations are never rounded to f16.
///
/// Runs on the calling thread for small products and on rayon's global pool for large ones
/// (best called from inside that pool, so that the caller works too).
///
/// # Panics
/// If a slice length disagrees with `n`, `k` and `m`.
pub fn matmul_f16(x: &[f32], w: &[f16], bias: Option<&[f16]>, out: &mut [f32], n: usize, k: usize, m: usize) {
    matmul_with(Isa::detect(), x, w, bias, out, n, k, m);
}

/// Whether the kernels' instruction set is a vector one (AVX2 + FMA + F16C or better, within
/// `ZEROSHARD_CPU_ISA`): the CPU backend's row ops then run their AVX2 versions too.
pub(crate) fn vectorized() -> bool {
    Isa::detect() != Isa::Scalar
}

/// Instruction sets the kernels can use; detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 with AVX-512 F, BW and VL.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best instruction set of this CPU, at most `ZEROSHARD_CPU_ISA` if set; detected on
    /// first use.
    fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = std::env::var("ZEROSHARD_CPU_ISA").ok();
            let mut isas = Isa::available();
            if let Some(at) = cap.as_deref().and_then(|cap| isas.iter().position(|i| i.name() == cap)) {
                isas.truncate(at + 1);
            }
            let isa = *isas.last().expect("the portable loop is always there");
            tracing::debug!(isa = isa.name(), cap, "cpu matmul kernels");
            isa
        })
    }

    /// The value of `ZEROSHARD_CPU_ISA` that selects this instruction set.
    fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// Every instruction set this CPU supports, from the portable one to the best.
    fn available() -> Vec<Isa> {
        #[allow(unused_mut)] // only pushed to on x86-64
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                isas.push(Isa::Avx2);
            }
            // The GEMM packs weights with AVX2 + F16C on every x86 instruction set.
            if isas.contains(&Isa::Avx2)
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }
}

/// The peak f32 arithmetic rate of this machine, in GFLOP/s: independent FMA chains of
/// the kernels' instruction set, run on every thread of rayon's global pool at once for
/// about `millis` milliseconds (best of three). The arithmetic bound of a product.
pub fn peak_gflops(millis: u64) -> f64 {
    let isa = Isa::detect();
    // Flops of one round of `fma_chains` (12 vectors × lanes × 2), and the scalar loop's.
    let (flops_per_iter, chains): (usize, fn(usize, f32) -> f32) = match isa {
        // SAFETY: `Isa::Avx512` is only produced after detecting AVX-512.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (12 * 16 * 2, |i, s| unsafe { avx512::fma_chains(i, s) }),
        // SAFETY: `Isa::Avx2` is only produced after detecting AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (12 * 8 * 2, |i, s| unsafe { avx2::fma_chains(i, s) }),
        Isa::Scalar => (12 * 2, scalar_chains),
    };
    let threads = rayon::current_num_threads();
    // Calibrate one thread's rounds per millisecond, then time every thread together.
    let t = std::time::Instant::now();
    std::hint::black_box(chains(100_000, 0.5));
    let per_ms = (100_000.0 / (t.elapsed().as_secs_f64() * 1e3)).max(1.0);
    let iters = (per_ms * millis as f64) as usize;
    (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(rayon::broadcast(|c| chains(iters, 0.5 + c.index() as f32 * 1e-3)));
            (threads * iters * flops_per_iter) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// [`peak_gflops`]' chains in portable Rust: 12 independent multiply-adds per round.
fn scalar_chains(iters: usize, seed: f32) -> f32 {
    let mut acc = [seed; 12];
    for _ in 0..iters {
        for v in &mut acc {
            *v = *v * 0.999 + seed;
        }
    }
    acc.iter().sum()
}

impl Isa {
    /// `x[n, k]` packed for this instruction set's GEMM (`None`: it has none).
    fn pack_activations(self, x: &[f32], n: usize, k: usize) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        use gemm::Gemm;
        match self {
            Isa::Scalar => None,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(gemm::pack_activations(x, n, k, avx2::Avx2::MR)),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(gemm::pack_activations(x, n, k, avx512::Avx512::MR)),
        }
    }
}

/// [`matmul_f16`] with a given instruction set (tests compare them).
#[allow(clippy::too_many_arguments)] // matmul_f16's seven, plus the instruction set
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
    let packed = (n > DECODE_ROWS).then(|| isa.pack_activations(x, n, k)).flatten();
    let task = |mut cols: OutCols<'_>| {
        let rows = &w[cols.start() * k..cols.end() * k];
        window(isa, x, packed.as_deref(), rows, &mut cols, k);
        if let Some(bias) = bias {
            add_bias(&bias[cols.start()..cols.end()], &mut cols);
        }
    };
    let work = (m * k).saturating_mul(n.div_ceil(4));
    if work < PARALLEL_MIN_WORK || rayon::current_num_threads() == 1 {
        task(OutCols::whole(out, n, m));
        return;
    }
    // A few tasks per thread, so that a thread the OS interrupts does not hold up the rest.
    let tasks = (work / TASK_MIN_WORK).clamp(2, 4 * rayon::current_num_threads());
    let width = m.div_ceil(tasks).next_multiple_of(TASK_ROW_MULTIPLE).min(m);
    use rayon::prelude::*;
    OutCols::split(out, n, m, width).into_par_iter().for_each(task);
}

/// `out = x · wᵀ` for the window's weight rows `w[width, k]`, on this thread: through the
/// GEMM when the activations were packed for it, else the GEMV.
fn window(isa: Isa, x: &[f32], packed: Option<&[f32]>, w: &[f16], out: &mut OutCols<'_>, k: usize) {
    let n = x.len() / k;
    match (isa, packed) {
        // SAFETY (both AVX-512 arms): `Isa::Avx512` is only produced after detecting AVX-512
        // F, BW and VL, as well as AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Some(p)) => unsafe { gemm::gemm::<avx512::Avx512>(p, n, w, out, k) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, None) => unsafe { avx512::decode(x, w, out, k) },
        // SAFETY (both AVX2 arms): `Isa::Avx2` is only produced after detecting AVX2, FMA and
        // F16C.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Some(p)) => unsafe { gemm::gemm::<avx2::Avx2>(p, n, w, out, k) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, None) => unsafe { avx2::decode(x, w, out, k) },
        (Isa::Scalar, _) => scalar(x, w, out, k),
    }
}

/// Portable product: each activation row dotted with each weight row, weights
/// widened on the fly.
fn scalar(x: &[f32], w: &[f16], out: &mut OutCols<'_>, k: usize) {
    for (j, wj) in w.chunks_exact(k).enumerate() {
        for (i, xi) in x.chunks_exact(k).enumerate() {
            out.set(i, j, dot_scalar(xi, wj));
        }
    }
}

/// Σ x·w in f32 with eight partial sums, like the lanes of the SIMD kernels.
fn dot_scalar(x: &[f32], w: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (x8, x_tail) = x.split_at(x.len() / 8 * 8);
    let (w8, w_tail) = w.split_at(x8.len());
    for (cx, cw) in x8.chunks_exact(8).zip(w8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += cx[l] * cw[l].to_f32();
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (p, q) in x_tail.iter().zip(w_tail) {
        sum += p * q.to_f32();
    }
    sum
}

/// `out[i, j] += bias[j]` for every row `i` of the window.
fn add_bias(bias: &[f16], out: &mut OutCols<'_>) {
    let bias: Vec<f32> = bias.iter().map(|b| b.to_f32()).collect();
    for i in 0..out.rows() {
        out.row_mut(i).iter_mut().zip(&bias).for_each(|(o, b)| *o += b);
    }
}
