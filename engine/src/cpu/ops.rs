//! Elementwise and per-row primitives of the CPU backend.
use half::f16;

/// Llama RMSNorm of one row in place: `x * rsqrt(mean(x²) + eps) * w`, in f32
/// (transformers computes the variance in f32, then scales, then multiplies by w).
pub(super) fn rms_norm_row(x: &mut [f32], w: &[f16], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (v, wi) in x.iter_mut().zip(w) {
        *v = wi.to_f32() * (*v * inv);
    }
}

/// `torch.nn.LayerNorm` of one row in place: `(x - mean) / sqrt(var + eps) * w + b`,
/// with the biased variance, all in f32 (two passes: mean, then squared deviations).
pub(super) fn layer_norm_row(x: &mut [f32], w: &[f16], b: &[f16], eps: f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, wi), bi) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * wi.to_f32() + bi.to_f32();
    }
}

/// GELU, tanh approximation (transformers' `NewGELUActivation`, `gelu_new`).
pub(super) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// HF rotate-half RoPE of one head vector: pairs `(i, i + d/2)`.
pub(super) fn rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

#[inline(always)]
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `e^x` in f32 without a library call, so that loops over it vectorize: `2^n · e^r` with
/// `n = round(x · log₂e)`, `|r| ≤ ln2 / 2`, and a degree-6 polynomial for `e^r` (Cephes'
/// `expf` coefficients); within 2 ulp of `f32::exp` over `[-87, 88]`, inputs clamped there
/// (below, it returns `e^-87` ≈ 1.6e-38 instead of a smaller number or zero).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    /// 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 in two parts, so that `n · ln2` is subtracted exactly.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `n` lies in [-126, 127]: a normal power of two.
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `fn $name(args)`: calls `$body(args)`, an `#[inline(always)]` function, compiled for AVX2
/// and FMA where the matmul kernels run a vector instruction set
/// ([`vectorized`](super::matmul::vectorized)); its loops vectorize eight lanes wide (Rust
/// does not contract `a * b + c` into an FMA, so the results are those of the portable
/// code). Elsewhere it runs as it is.
macro_rules! avx2_version {
    ($(#[$doc:meta])* $vis:vis fn $name:ident = $body:path, ($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::cpu::matmul::vectorized() {
                    // SAFETY: a vector instruction set was detected: AVX2, FMA and F16C at least.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(super) use avx2_version;

avx2_version! {
    /// `g = silu(g) · u`, elementwise over one row.
    pub(super) fn silu_mul_row = silu_mul_portable, (g: &mut [f32], u: &[f32])
}

#[inline(always)]
fn silu_mul_portable(g: &mut [f32], u: &[f32]) {
    g.iter_mut().zip(u).for_each(|(g, u)| *g = silu(*g) * u);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let mut x = vec![1.0, -2.0, 3.0, 0.5];
        let w: Vec<f16> = [1.0, 0.5, 2.0, -1.0].iter().map(|v| f16::from_f32(*v)).collect();
        let ms: f32 = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        let expect = [1.0 * inv, -2.0 * inv * 0.5, 3.0 * inv * 2.0, -0.5 * inv];
        rms_norm_row(&mut x, &w, 1e-6);
        for (a, b) in x.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn layer_norm_matches_hand_computation() {
        // x = [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], biased var 14 / 4 = 3.5.
        let mut x = vec![1.0, 2.0, 3.0, 6.0];
        let f = |v: &[f32]| v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>();
        let (w, b) = (f(&[1.0, 2.0, 0.5, -1.0]), f(&[0.0, 0.5, -1.0, 0.25]));
        let inv = 1.0 / (3.5f32 + 1e-5).sqrt();
        // (x - mean) · inv · w + b per element: (-2 · 1 + 0), (-1 · 2 + 0.5), (0 · 0.5 - 1), (3 · -1 + 0.25).
        let expect = [-2.0 * inv, -2.0 * inv + 0.5, -1.0, -3.0 * inv + 0.25];
        layer_norm_row(&mut x, &w, &b, 1e-5);
        for (a, e) in x.iter().zip(expect) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
        // A constant row is all bias (variance 0, eps keeps it finite).
        let mut c = vec![5.0; 4];
        layer_norm_row(&mut c, &w, &b, 1e-5);
        assert_eq!(c, vec![0.0, 0.5, -1.0, 0.25]);
    }

    #[test]
    fn gelu_tanh_matches_hand_computation() {
        assert_eq!(gelu_tanh(0.0), 0.0);
        // x = 1: 0.5 · (1 + tanh(0.7978846 · 1.044715)) = 0.5 · (1 + tanh(0.8335546)).
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5, "{}", gelu_tanh(1.0));
        // x = -2: -1 · (1 + tanh(0.7978846 · (-2.35772))) = -(1 - 0.977_275) (torch: -0.04540231).
        assert!((gelu_tanh(-2.0) + 0.045_402_3).abs() < 1e-5, "{}", gelu_tanh(-2.0));
        // Saturates to x and to 0.
        assert_eq!(gelu_tanh(20.0), 20.0);
        assert_eq!(gelu_tanh(-20.0), 0.0);
    }

    #[test]
    fn rotate_half_rotates_pairs() {
        let mut h = vec![1.0, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        rotate_half(&mut h, &c, &s);
        // pair (1, 3) rotated by 90°: (-3, 1); pair (2, 4) unrotated.
        assert_eq!(h, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_library() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 2.0 * f32::EPSILON * want, "exp({x}) = {got}, want {want}");
            x += 0.001_7;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), (-87.0f32).exp(), "clamped below");
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_mul_row_is_silu_times_up() {
        let mut g: Vec<f32> = (0..100).map(|i| i as f32 / 10.0 - 5.0).collect();
        let u: Vec<f32> = (0..100).map(|i| 1.0 + i as f32 / 50.0).collect();
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        silu_mul_row(&mut g, &u);
        for (got, want) in g.iter().zip(&want) {
            assert!((got - want).abs() <= 4.0 * f32::EPSILON * want.abs(), "{got} vs {want}");
        }
    }

    #[test]
    fn silu_matches_definition() {
        assert!((silu(0.0)).abs() < 1e-9 && (silu(10.0) - 10.0 / (1.0 + (-10.0f32).exp())).abs() < 1e-6);
    }
}
