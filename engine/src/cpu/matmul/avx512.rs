//! AVX-512 kernels (x86-64 with AVX-512 F/BW/VL: Zen 4 and later, Intel server cores).
use super::gemm::{microkernel, Gemm};
use super::kernel::{self, Dots};
use super::OutCols;
use half::f16;
use std::arch::x86_64::*;

/// Sixteen f32 lanes per vector and 32 registers; the tail of a row is a masked load.
pub(super) struct Avx512;

/// `out = x · wᵀ` over the window by dot products (decode and small batches): tiles of up
/// to eight activation rows, with shapes
/// chosen for 32 vector registers.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
pub(super) unsafe fn decode(x: &[f32], w: &[f16], out: &mut OutCols<'_>, k: usize) {
    if x.len() / k > 8 {
        // SAFETY (the closure): the caller guarantees the instruction set.
        return kernel::blocked(x, w, out, k, 8, |x, w, out, at| unsafe { decode_tile(x, w, out, k, at) });
    }
    // SAFETY: as above.
    unsafe { decode_tile(x, w, out, k, (0, 0)) }
}

/// One tile of at most eight rows: [`decode`]'s kernels, `at` as in [`kernel::decode`].
///
/// # Safety
/// As [`decode`].
unsafe fn decode_tile(x: &[f32], w: &[f16], out: &mut OutCols<'_>, k: usize, at: (usize, usize)) {
    // SAFETY (every arm): the caller guarantees the instruction set.
    unsafe {
        match x.len() / k {
            1 => kernel::decode::<Avx512, 1, 2, 2>(x, w, out, k, at),
            2 => kernel::decode::<Avx512, 2, 2, 2>(x, w, out, k, at),
            3 => kernel::decode::<Avx512, 3, 2, 2>(x, w, out, k, at),
            4 => kernel::decode::<Avx512, 4, 2, 2>(x, w, out, k, at),
            5 => kernel::decode::<Avx512, 5, 2, 1>(x, w, out, k, at),
            6 => kernel::decode::<Avx512, 6, 2, 1>(x, w, out, k, at),
            7 => kernel::decode::<Avx512, 7, 2, 1>(x, w, out, k, at),
            8 => kernel::decode::<Avx512, 8, 2, 1>(x, w, out, k, at),
            n => unreachable!("a decode tile of {n} rows: at most eight"),
        }
    }
}

microkernel! {
    /// The AVX-512 micro-kernel: `MR × 16·NV` accumulators in `zmm` registers.
    tile, "avx512f,avx512bw,avx512vl", __m512, 16,
    zero: _mm512_setzero_ps, load: _mm512_loadu_ps, splat: _mm512_set1_ps,
    fma: _mm512_fmadd_ps, store: _mm512_storeu_ps
}

/// 8 × 48: 24 accumulators, three weight vectors and one broadcast of the 32 registers;
/// eight rows split batches of 8 and 32 with no padding.
impl Gemm for Avx512 {
    const MR: usize = 8;
    const NR: usize = 48;
    const KC: usize = 128;

    #[inline]
    unsafe fn tile(a: &[f32], b: &[f32], kc: usize, c: *mut f32, ldc: usize, accumulate: bool) {
        // SAFETY: the caller guarantees the instruction set and the operand lengths.
        unsafe { tile::<8, 3>(a, b, kc, c, ldc, accumulate) }
    }
}

impl Dots for Avx512 {
    #[inline]
    unsafe fn dots<const N: usize, const R: usize, const U: usize>(
        x: [&[f32]; N],
        w: [&[f16]; R],
    ) -> [[f32; R]; N] {
        // SAFETY: the caller guarantees the instruction set.
        unsafe { dots::<N, R, U>(x, w) }
    }
}

/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dots<const N: usize, const R: usize, const U: usize>(
    x: [&[f32]; N],
    w: [&[f16]; R],
) -> [[f32; R]; N] {
    let k = x[0].len();
    assert!(
        x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k),
        "dots: rows of different lengths"
    );
    let xp = x.map(<[f32]>::as_ptr);
    let wp = w.map(|r| r.as_ptr().cast::<u16>());
    let mut acc = [[[_mm512_setzero_ps(); U]; R]; N];
    let mut kk = 0;
    // Loads read 16 consecutive elements of each row at `at`, with `at + 16 <= k` where they
    // are not masked.
    while kk + 16 * U <= k {
        for u in 0..U {
            let at = kk + 16 * u;
            // SAFETY: `at + 16 <= kk + 16 * U <= k`, inside every weight row.
            let wv = wp.map(|p| unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.add(at).cast())) });
            for (acc_i, p) in acc.iter_mut().zip(xp) {
                // SAFETY: as above, inside every activation row.
                let xv = unsafe { _mm512_loadu_ps(p.add(at)) };
                for (a, v) in acc_i.iter_mut().zip(&wv) {
                    a[u] = _mm512_fmadd_ps(xv, *v, a[u]);
                }
            }
        }
        kk += 16 * U;
    }
    while kk < k {
        let mask: __mmask16 = if k - kk >= 16 { !0 } else { (1 << (k - kk)) - 1 };
        // SAFETY: the mask selects elements `kk..min(kk + 16, k)` of each weight row, and
        // masked-off elements are neither read nor able to fault.
        let wv = wp.map(|p| unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.add(kk).cast())) });
        for (acc_i, p) in acc.iter_mut().zip(xp) {
            // SAFETY: as above, for each activation row.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, p.add(kk)) };
            for (a, v) in acc_i.iter_mut().zip(&wv) {
                a[0] = _mm512_fmadd_ps(xv, *v, a[0]);
            }
        }
        kk += 16;
    }
    acc.map(|acc_i| {
        acc_i.map(|a| _mm512_reduce_add_ps(a.iter().fold(_mm512_setzero_ps(), |s, p| _mm512_add_ps(s, *p))))
    })
}

/// `iters` rounds of 12 independent 16-lane FMA chains (384 flops each): the peak rate of
/// the FMA units, with latency hidden.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn fma_chains(iters: usize, seed: f32) -> f32 {
    let (a, b) = (_mm512_set1_ps(seed), _mm512_set1_ps(0.999));
    let mut acc = [_mm512_set1_ps(seed); 12];
    for _ in 0..iters {
        for v in &mut acc {
            *v = _mm512_fmadd_ps(*v, b, a);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(a, |s, v| _mm512_add_ps(s, *v)))
}
