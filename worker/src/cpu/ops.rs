//! Elementwise and per-row primitives of the CPU backend.
use half::f16;

/// Llama RMSNorm of one row in place: `x * rsqrt(mean(x²) + eps) * w`, in f32
/// (transformers computes the variance in f32, then scales, then multiplies by w).
pub fn rms_norm_row(x: &mut [f32], w: &[f16], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (v, wi) in x.iter_mut().zip(w) {
        *v = wi.to_f32() * (*v * inv);
    }
}

/// HF rotate-half RoPE of one head vector: pairs `(i, i + d/2)`.
pub fn rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
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
    fn rotate_half_rotates_pairs() {
        let mut h = vec![1.0, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        rotate_half(&mut h, &c, &s);
        // pair (1, 3) rotated by 90°: (-3, 1); pair (2, 4) unrotated.
        assert_eq!(h, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_values() {
        let mut x = vec![1000.0, 1001.0, 999.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
        assert!((silu(0.0)).abs() < 1e-9 && (silu(10.0) - 10.0 / (1.0 + (-10.0f32).exp())).abs() < 1e-6);
    }
}
