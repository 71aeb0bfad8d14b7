//! Rotary position embedding frequencies, as transformers computes them.
use zeroshard_offload::{ModelConfig, RopeScaling};

/// Inverse frequencies per rotated pair (`head_dim / 2` of them).
#[derive(Clone, Debug)]
pub(crate) struct RopeTable {
    inv_freq: Vec<f32>,
}

impl RopeTable {
    pub(crate) fn new(c: &ModelConfig) -> Self {
        let dim = c.head_dim;
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in f32.
        let base: Vec<f32> =
            (0..dim / 2).map(|i| 1.0 / (c.rope.theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let inv_freq = match c.rope.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let (factor, low, high, old_ctx) =
                    (factor as f32, low_freq_factor as f32, high_freq_factor as f32, old_ctx as f32);
                let low_freq_wavelen = old_ctx / low;
                let high_freq_wavelen = old_ctx / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        // transformers: ~(wavelen < high) * ~(wavelen > low); wavelengths are finite.
                        let is_medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                        if is_medium {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        };
        Self { inv_freq }
    }

    /// `(cos, sin)`, each `[positions, head_dim / 2]`.
    pub(crate) fn angles(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // transformers multiplies in f32, then takes cos/sin in f32.
                let a = (p as f32) * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    #[cfg(test)]
    pub(crate) fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroshard_offload::{Architecture, RopeConfig};

    fn cfg(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            max_position_embeddings: 512,
            rms_norm_eps: 1e-6,
            rope: RopeConfig { theta: 500000.0, scaling },
            tie_word_embeddings: true,
            ..ModelConfig::synthetic(Architecture::Llama, 64, 1, 8, 2, 16, 16)
        }
    }

    #[test]
    fn llama3_keeps_one_smooths_one_divides_two() {
        // The llama-rope-scaled fixture's settings: wavelengths 6.3, 167, 4443, 118k.
        let plain = RopeTable::new(&cfg(RopeScaling::None));
        let scaled = RopeTable::new(&cfg(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 256.0,
        }));
        let (p, s) = (plain.inv_freq(), scaled.inv_freq());
        assert_eq!(p[0], s[0]);
        // wavelen 167: smooth = (256/167 - 1) / 3 ≈ 0.178; f·(1 - s)/8 + f·s.
        let smooth = (256.0 / (2.0 * std::f32::consts::PI / p[1]) - 1.0) / 3.0;
        assert!((s[1] - (p[1] * (1.0 - smooth) / 8.0 + p[1] * smooth)).abs() < 1e-9);
        assert!(s[1] < p[1] && s[1] > p[1] / 8.0);
        assert_eq!(s[2], p[2] / 8.0);
        assert_eq!(s[3], p[3] / 8.0);
    }

    #[test]
    fn angles_at_position_zero_are_identity() {
        let t = RopeTable::new(&cfg(RopeScaling::None));
        let (c, s) = t.angles(&[0, 3]);
        assert!(c[..4].iter().all(|x| *x == 1.0) && s[..4].iter().all(|x| *x == 0.0));
        assert!((c[4] - 3.0f32.cos()).abs() < 1e-6);
    }
}
