//! ALiBi slopes, as transformers' `build_alibi_tensor` (BLOOM) computes them.
//!
//! For `n` heads let `p` be the largest power of two ≤ `n`. The first `p` heads get
//! `base^1 … base^p` with `base = 2^(-8 / p)`; the remaining `n - p` heads take every
//! other power (`1, 3, 5, …`) of `2^(-4 / p)`, the slopes of a `2p`-head model that
//! fall between the first ones.

/// One slope per head (f32, as transformers: an f32 base raised to integer powers).
pub(crate) fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    assert!(num_heads > 0, "ALiBi needs at least one head");
    let closest = 1usize << num_heads.ilog2(); // 2^floor(log2(n))
                                               // transformers: torch.pow(f32 base, int32 powers); the base's f64 expression is
                                               // rounded to f32 first. Raising the exact f32 base in f64 and rounding once is
                                               // the correctly rounded f32 power.
    let powers = |base_exp: f64, exps: &mut dyn Iterator<Item = i32>| -> Vec<f32> {
        let base = (2f64.powf(base_exp) as f32) as f64;
        exps.map(|e| base.powi(e) as f32).collect::<Vec<_>>()
    };
    let log2 = |x: usize| (x as f64).log2();
    // 2 ** (-(2 ** -(log2(closest) - 3)))
    let mut slopes = powers(-(2f64.powf(-(log2(closest) - 3.0))), &mut (1..=closest as i32));
    if closest != num_heads {
        let remaining = (num_heads - closest).min(closest) as i32;
        let extra_exp = -(2f64.powf(-(log2(2 * closest) - 3.0)));
        slopes.extend(powers(extra_exp, &mut (0..remaining).map(|i| 2 * i + 1)));
    }
    slopes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pow2(exps: &[f32]) -> Vec<f32> {
        exps.iter().map(|e| 2f32.powf(*e)).collect()
    }

    #[test]
    fn powers_of_two() {
        // 4 heads: base 2^-2 (the bloom fixture: 2^-2 … 2^-8); 8 heads: base 2^-1.
        assert_eq!(alibi_slopes(4), pow2(&[-2.0, -4.0, -6.0, -8.0]));
        assert_eq!(alibi_slopes(8), pow2(&[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]));
        assert_eq!(alibi_slopes(1), pow2(&[-8.0]));
    }

    #[test]
    fn heads_that_are_not_powers_of_two() {
        // 6 heads: 4 from base 2^-2, then powers 1 and 3 of 2^-1.
        assert_eq!(alibi_slopes(6), pow2(&[-2.0, -4.0, -6.0, -8.0, -1.0, -3.0]));
        // 3 heads: 2 from base 2^-4, then power 1 of 2^-2.
        assert_eq!(alibi_slopes(3), pow2(&[-4.0, -8.0, -2.0]));
        // 12 heads: 8 from 2^-1, then powers 1, 3, 5, 7 of 2^-0.5.
        let s = alibi_slopes(12);
        assert_eq!(&s[..8], &pow2(&[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0])[..]);
        for (a, e) in s[8..].iter().zip([-0.5f64, -1.5, -2.5, -3.5]) {
            assert!(((*a as f64) - 2f64.powf(e)).abs() < 1e-7, "{s:?}");
        }
        assert_eq!(alibi_slopes(12).len(), 12);
    }
}
