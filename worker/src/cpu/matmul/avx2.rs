//! AVX2 + FMA + F16C kernels (x86-64 from Haswell and Zen 1 on).
use super::kernel::{self, Dots};
use super::OutCols;
use half::f16;
use std::arch::x86_64::*;

/// Eight f32 lanes per vector; weights widened with `vcvtph2ps`.
pub(super) struct Avx2;

/// `out = x · wᵀ` over the window, with tile shapes chosen for 16 vector registers.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
pub(super) unsafe fn matmul(x: &[f32], w: &[f16], out: &mut OutCols<'_>, k: usize) {
    // SAFETY (every arm): the caller guarantees the instruction set.
    unsafe {
        match x.len() / k {
            1 => kernel::decode::<Avx2, 1, 2, 4>(x, w, out, k),
            2 => kernel::decode::<Avx2, 2, 2, 2>(x, w, out, k),
            3 => kernel::decode::<Avx2, 3, 2, 1>(x, w, out, k),
            4 => kernel::decode::<Avx2, 4, 2, 1>(x, w, out, k),
            _ => kernel::tiled::<Avx2, 2, 4, 1>(x, w, out, k),
        }
    }
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
    let mut d = [[0f32; R]; N];
    for ((d_i, acc_i), x_i) in d.iter_mut().zip(&acc).zip(x) {
        for ((v, a), w_r) in d_i.iter_mut().zip(acc_i).zip(w) {
            *v = hsum(a.iter().fold(_mm256_setzero_ps(), |s, p| _mm256_add_ps(s, *p)));
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
