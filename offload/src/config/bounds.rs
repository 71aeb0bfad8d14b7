//! The sane range of every number a `config.json` gives, checked before
//! anything is sized by it.
//!
//! The limits sit one to two orders of magnitude above the largest published
//! models (Llama 3.1 405B: 126 layers, 128 heads, hidden 16 384, FFN 53 248,
//! vocabulary 128 256; Gemma: vocabulary 256 000, head_dim 256; context windows
//! up to ~10M positions), so no real checkpoint meets them, while a hostile one
//! cannot make the process build a billion layers. A config that passes is
//! then checked against the tensors the checkpoint actually holds
//! ([`crate::spec::checked_specs`]).
use super::{Ctx, RopeScaling};
use crate::error::Result;

/// Most decoder layers.
pub const MAX_LAYERS: usize = 4096;
/// Most attention heads (and key/value heads).
pub const MAX_HEADS: usize = 1024;
/// Widest hidden state.
pub const MAX_HIDDEN: usize = 1 << 17;
/// Widest attention head.
pub const MAX_HEAD_DIM: usize = 1024;
/// Widest MLP.
pub const MAX_INTERMEDIATE: usize = 1 << 20;
/// Largest vocabulary (ids stay exact in an f32).
pub const MAX_VOCAB: usize = 1 << 24;
/// Most positions.
pub const MAX_POSITIONS: usize = 1 << 24;
/// Largest RoPE scaling factor.
const MAX_ROPE_FACTOR: f64 = 1e6;

impl Ctx<'_> {
    /// A norm epsilon: finite, in (0, 1], and still > 0 as the f32 the model uses.
    pub(crate) fn eps(&self, eps: f64, key: &str) -> Result<f32> {
        if !(eps.is_finite() && eps > 0.0 && eps <= 1.0 && (eps as f32) > 0.0) {
            return Err(self.err(key, format!("{eps} must be a finite number in (0, 1]")));
        }
        Ok(eps as f32)
    }

    /// `pad_token_id`, which the engine never uses: absent, null or negative
    /// (an old "no padding" convention) is no pad; an id must be below `vocab`.
    pub(crate) fn pad_id(&self, v: &Option<serde_json::Value>, vocab: usize) -> Result<()> {
        let key = "pad_token_id";
        match v {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(x) if x.as_i64().is_some_and(|n| n < 0) => Ok(()),
            Some(x) => match x.as_u64() {
                Some(id) if id < vocab as u64 => Ok(()),
                Some(id) => Err(self.err(key, format!("{id} is not below the vocabulary size {vocab}"))),
                None => Err(self.err(key, format!("{x} is not a token id"))),
            },
        }
    }
}

/// RoPE scaling values that the frequency formulas can use: factors finite and
/// ≥ 1 (transformers' own rule), `low_freq_factor < high_freq_factor` (the
/// smooth band divides by their difference), an original context of whole
/// The largest `rope_theta` accepted: real models use 1e4 (Llama 2) to 1e7
/// (long-context Qwen); 1e9 leaves room without letting the frequencies
/// underflow to nothing.
pub(super) const MAX_ROPE_THETA: f64 = 1e9;

/// positions.
pub(super) fn check_rope_scaling(cx: &Ctx, prefix: &str, scaling: &RopeScaling) -> Result<()> {
    let key = |k: &str| format!("{prefix}.{k}");
    let factor = |k: &str, v: f64| {
        if v.is_finite() && (1.0..=MAX_ROPE_FACTOR).contains(&v) {
            Ok(())
        } else {
            Err(cx.err(&key(k), format!("{v} must be a finite number in [1, {MAX_ROPE_FACTOR:e}]")))
        }
    };
    match *scaling {
        RopeScaling::None => Ok(()),
        RopeScaling::Linear { factor: f } => factor("factor", f),
        RopeScaling::Llama3 {
            factor: f,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            factor("factor", f)?;
            if !(low_freq_factor.is_finite() && low_freq_factor > 0.0 && low_freq_factor <= MAX_ROPE_FACTOR) {
                return Err(
                    cx.err(&key("low_freq_factor"), format!("{low_freq_factor} must be finite and > 0"))
                );
            }
            if !(high_freq_factor.is_finite()
                && high_freq_factor > low_freq_factor
                && high_freq_factor <= MAX_ROPE_FACTOR)
            {
                return Err(cx.err(
                    &key("high_freq_factor"),
                    format!("{high_freq_factor} must be finite and greater than low_freq_factor {low_freq_factor}"),
                ));
            }
            let ctx = original_max_position_embeddings;
            if !(ctx.fract() == 0.0 && ctx >= 1.0 && ctx <= MAX_POSITIONS as f64) {
                return Err(cx.err(
                    &key("original_max_position_embeddings"),
                    format!("{ctx} must be a whole number of positions in 1..={MAX_POSITIONS}"),
                ));
            }
            Ok(())
        }
    }
}
