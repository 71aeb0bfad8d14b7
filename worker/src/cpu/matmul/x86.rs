//! AVX2 + FMA + F16C kernels (x86-64). Every function here requires those three features;
//! callers check them once through `Isa::detect`.
use super::OutCols;
use half::f16;
use std::arch::x86_64::*;

const PREFETCH: usize = 0;

/// `out[i, j] = x[i] · w[j]` for the `n = x.len() / k ≤ 4` activation rows and all weight
/// rows of the window, streaming `w` once.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv(x: &[f32], w: &[f16], out: &mut OutCols<'_>, k: usize) {
    // SAFETY (all four arms): the caller guarantees the target features.
    unsafe {
        match x.len() / k {
            1 => gemv_n::<1, 4>(x, w, out, k),
            2 => gemv_n::<2, 4>(x, w, out, k),
            3 => gemv_n::<3, 4>(x, w, out, k),
            4 => gemv_n::<4, 3>(x, w, out, k),
            n => unreachable!("gemv called with {n} activation rows"),
        }
    }
}

/// GEMV over `N` activation rows, `R` weight rows per step (`N * R` accumulators).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_n<const N: usize, const R: usize>(
    x: &[f32],
    w: &[f16],
    out: &mut OutCols<'_>,
    k: usize,
) {
    assert_eq!(x.len(), N * k);
    let rows = w.len() / k;
    let mut j = 0;
    while j + R <= rows {
        // SAFETY: features guaranteed by the caller; `w[j * k..]` holds `R` rows of `k`.
        let dots = unsafe { dots::<N, R>(x, &w[j * k..(j + R) * k], k) };
        for (i, row) in dots.iter().enumerate() {
            for (r, v) in row.iter().enumerate() {
                out.set(i, j + r, *v);
            }
        }
        j += R;
    }
    while j < rows {
        // SAFETY: as above, one row.
        let dots = unsafe { dots::<N, 1>(x, &w[j * k..(j + 1) * k], k) };
        for (i, row) in dots.iter().enumerate() {
            out.set(i, j, row[0]);
        }
        j += 1;
    }
}

/// `[x_i · w_r]` for `N` activation rows `x[N, k]` and `R` weight rows `w[R, k]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dots<const N: usize, const R: usize>(x: &[f32], w: &[f16], k: usize) -> [[f32; R]; N] {
    assert!(x.len() == N * k && w.len() == R * k, "dots: operands are not [N, k] and [R, k]");
    let xp = x.as_ptr();
    let wp = w.as_ptr().cast::<u16>();
    let k8 = k / 8 * 8;
    let k32 = k / 32 * 32;
    let mut acc = [[_mm256_setzero_ps(); R]; N];
    let mut kk = 0;
    while kk < k32 {
        for r in 0..R {
            // SAFETY: prefetching is a hint and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(r * k + kk + PREFETCH).cast()) };
        }
        for u in 0..4 {
            let kk = kk + 8 * u;
            let mut wv = [_mm256_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                // SAFETY: `r * k + kk + 8 <= R * k`: eight f16 inside row `r` of `w`.
                *v = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wp.add(r * k + kk).cast())) };
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                // SAFETY: `i * k + kk + 8 <= N * k`: eight f32 inside row `i` of `x`.
                let xv = unsafe { _mm256_loadu_ps(xp.add(i * k + kk)) };
                for (a, v) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
        }
        kk += 32;
    }
    while kk < k8 {
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            // SAFETY: `r * k + kk + 8 <= R * k`: eight f16 inside row `r` of `w`.
            *v = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wp.add(r * k + kk).cast())) };
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // SAFETY: `i * k + kk + 8 <= N * k`: eight f32 inside row `i` of `x`.
            let xv = unsafe { _mm256_loadu_ps(xp.add(i * k + kk)) };
            for (a, v) in acc_i.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(xv, *v, *a);
            }
        }
        kk += 8;
    }
    let mut res = [[0f32; R]; N];
    for (res_i, acc_i) in res.iter_mut().zip(&acc) {
        for (v, a) in res_i.iter_mut().zip(acc_i) {
            *v = hsum(*a);
        }
    }
    if k8 < k {
        for (i, res_i) in res.iter_mut().enumerate() {
            let xi = &x[i * k + k8..(i + 1) * k];
            for (r, v) in res_i.iter_mut().enumerate() {
                let wr = &w[r * k + k8..(r + 1) * k];
                for (p, q) in xi.iter().zip(wr) {
                    *v = p.mul_add(q.to_f32(), *v);
                }
            }
        }
    }
    res
}

/// Sum of the eight lanes, as `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
