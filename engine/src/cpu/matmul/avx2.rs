//! AVX2 + FMA + F16C kernels (x86-64 from Haswell and Zen 1 on).
use super::gemm::{microkernel, Gemm};
use super::kernel::{self, Dots};
use super::OutCols;
use half::f16;
use std::arch::x86_64::*;

/// Eight f32 lanes per vector; weights widened with `vcvtph2ps`.
pub(super) struct Avx2;

/// `out = x · wᵀ` over the window by dot products (decode and small batches): tiles of up
/// to eight activation rows, each as two halves of up to four against three weight rows
/// ([`kernel::decode`]; 12 accumulators, 7 loads per 12 FMAs, in 16 vector registers).
/// Eight rows against one weight row would load 9 vectors per 8 FMAs and, with `k` in the
/// thousands, keep its activations in L2 rather than L1 (measured at batch 8: about a third
/// slower); the halves one after the other over the whole window, about a fifth slower.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
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
            1 => kernel::decode::<Avx2, 1, 2, 4>(x, w, out, k, at),
            2 => kernel::decode::<Avx2, 2, 2, 2>(x, w, out, k, at),
            3 => kernel::decode::<Avx2, 3, 2, 1>(x, w, out, k, at),
            // A tile of four, and a second of up to four.
            4..=8 => kernel::decode::<Avx2, 4, 3, 1>(x, w, out, k, at),
            n => unreachable!("a decode tile of {n} rows: at most eight"),
        }
    }
}

microkernel! {
    /// The AVX2 micro-kernel: `MR × 8·NV` accumulators in `ymm` registers.
    tile, "avx2,fma,f16c", __m256, 8,
    zero: _mm256_setzero_ps, load: _mm256_loadu_ps, splat: _mm256_set1_ps,
    fma: _mm256_fmadd_ps, store: _mm256_storeu_ps
}

/// 6 × 16: twelve accumulators, two weight vectors and one broadcast in 15 of the 16
/// registers. (4 × 24 needs all 16, and the compiler then keeps one accumulator on the
/// stack: a load and a store per 12 FMAs, measured 10–30% slower.)
impl Gemm for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    const KC: usize = 256;

    #[inline]
    unsafe fn tile(a: &[f32], b: &[f32], kc: usize, c: *mut f32, ldc: usize, accumulate: bool) {
        // SAFETY: the caller guarantees the instruction set and the operand lengths.
        unsafe { tile::<6, 2>(a, b, kc, c, ldc, accumulate) }
    }
}

/// Packs `panel[kk][r] = w[r, kk]` widened to f32, for `kk < k` and `r < nr`, from the
/// first `rows` rows of `w[.., k]` (rows from `rows` to `nr` are zero).
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pack_panel(w: &[f16], k: usize, rows: usize, nr: usize, panel: &mut [f32]) {
    assert!(
        nr.is_multiple_of(8) && rows <= nr && w.len() >= rows * k && panel.len() >= k * nr,
        "pack_panel: {rows} rows of {k} into [{k}][{nr}]"
    );
    let src = w.as_ptr().cast::<u16>();
    let dst = panel.as_mut_ptr();
    for r0 in (0..nr).step_by(8) {
        let mut kk = 0;
        if r0 + 8 <= rows {
            while kk + 8 <= k {
                if kk.is_multiple_of(32) {
                    // The next 8 rows (of this panel or the window's next), at these
                    // columns: read in 8 short runs, they would miss the hardware
                    // prefetcher, so they are fetched while this group computes.
                    for q in 8..16 {
                        let ahead = src.wrapping_add((r0 + q) * k + kk);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                    }
                }
                // SAFETY: rows `r0..r0 + 8 <= rows` and columns `kk..kk + 8 <= k`
                // lie inside `w`.
                let v: [__m256; 8] = std::array::from_fn(|q| unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(src.add((r0 + q) * k + kk).cast()))
                });
                for (c, t) in transpose8(v).into_iter().enumerate() {
                    // SAFETY: `(kk + c) * nr + r0 + 8 <= k * nr <= panel.len()`.
                    unsafe { _mm256_storeu_ps(dst.add((kk + c) * nr + r0), t) };
                }
                kk += 8;
            }
        }
        for kk in kk..k {
            for q in 0..8 {
                let r = r0 + q;
                panel[kk * nr + r] = if r < rows { w[r * k + kk].to_f32() } else { 0.0 };
            }
        }
    }
}

/// The transpose of an 8 × 8 block held as eight rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

impl Dots for Avx2 {
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
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = [[[_mm256_setzero_ps(); U]; R]; N];
    let mut kk = 0;
    while kk + 8 * U <= k {
        for u in 0..U {
            let at = kk + 8 * u;
            // SAFETY: `at + 8 <= kk + 8 * U <= k`, inside every weight row.
            let wv = wp.map(|p| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(at).cast())) });
            for (acc_i, p) in acc.iter_mut().zip(xp) {
                // SAFETY: as above, inside every activation row.
                let xv = unsafe { _mm256_loadu_ps(p.add(at)) };
                for (a, v) in acc_i.iter_mut().zip(&wv) {
                    a[u] = _mm256_fmadd_ps(xv, *v, a[u]);
                }
            }
        }
        kk += 8 * U;
    }
    while kk + 8 <= k {
        // SAFETY: `kk + 8 <= k`, inside every weight row.
        let wv = wp.map(|p| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(kk).cast())) });
        for (acc_i, p) in acc.iter_mut().zip(xp) {
            // SAFETY: as above, inside every activation row.
            let xv = unsafe { _mm256_loadu_ps(p.add(kk)) };
            for (a, v) in acc_i.iter_mut().zip(&wv) {
                a[0] = _mm256_fmadd_ps(xv, *v, a[0]);
            }
        }
        kk += 8;
    }
    // The sums first, in loops of constant length only: a loop of unknown length among
    // them keeps `acc` in memory, and the loops above then store every accumulator on
    // every step.
    // (No closures either: they do not inherit the target features, so `hsum` would be a
    // call.)
    let mut d = [[0f32; R]; N];
    for (d_i, acc_i) in d.iter_mut().zip(&acc) {
        for (v, a) in d_i.iter_mut().zip(acc_i) {
            let mut s = a[0];
            for p in &a[1..] {
                s = _mm256_add_ps(s, *p);
            }
            *v = hsum(s);
        }
    }
    for (d_i, x_i) in d.iter_mut().zip(x) {
        for (v, w_r) in d_i.iter_mut().zip(w) {
            for (p, q) in x_i[kk..].iter().zip(&w_r[kk..]) {
                *v = p.mul_add(q.to_f32(), *v);
            }
        }
    }
    d
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `iters` rounds of 12 independent 8-lane FMA chains (192 flops each): the peak rate of
/// the FMA units, with latency hidden.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fma_chains(iters: usize, seed: f32) -> f32 {
    let (a, b) = (_mm256_set1_ps(seed), _mm256_set1_ps(0.999));
    let mut acc = [_mm256_set1_ps(seed); 12];
    for _ in 0..iters {
        for v in &mut acc {
            *v = _mm256_fmadd_ps(*v, b, a);
        }
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc.iter().fold(a, |s, v| _mm256_add_ps(s, *v))) };
    out[0]
}
