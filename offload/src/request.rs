//! What a client asks of the model, as both sides of the cluster understand it:
//! [`GenerationParams`] (sampling settings and length) with their validation,
//! [`validate_prompt`] against the model's config, and the [`FinishReason`] a
//! sequence ends with. The coordinator validates requests with these before
//! routing them; the worker's engine runs them.
use crate::error::{OffloadError, Result};
use crate::ModelConfig;

/// Sampling parameters for one sequence. The default is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns the filter off, 1 is greedy.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability mass
    /// reaches `top_p`; 1.0 turns the filter off.
    pub top_p: f32,
    /// Seed of the sequence's random number generator.
    pub seed: u64,
    /// Divides positive (multiplies negative) logits of tokens already in the
    /// history; 1.0 turns it off.
    pub repetition_penalty: f32,
    /// Tokens an earlier run of this sequence already sampled: a sequence
    /// resumed on another worker skips that many draws and so continues the
    /// same random stream (each sampled token takes one draw).
    pub resume_draws: u64,
    /// Added to these tokens' logits before sampling, after the repetition
    /// penalty (OpenAI's `logit_bias`), in token order; each within
    /// ±[`Self::MAX_LOGIT_BIAS`].
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: 1.0,
            resume_draws: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks the ranges; the message names the offending field and value.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be finite and >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be finite and > 0, got {}",
                self.repetition_penalty
            ));
        }
        if let Some((id, b)) =
            self.logit_bias.iter().find(|(_, b)| b.is_nan() || b.abs() > Self::MAX_LOGIT_BIAS)
        {
            return Err(format!(
                "logit_bias of token {id} must be within ±{}, got {b}",
                Self::MAX_LOGIT_BIAS
            ));
        }
        if self.logit_bias.len() > Self::MAX_LOGIT_BIASES {
            return Err(format!(
                "logit_bias names {} tokens, more than the {} allowed",
                self.logit_bias.len(),
                Self::MAX_LOGIT_BIASES
            ));
        }
        Ok(())
    }

    /// The largest bias [`Self::logit_bias`] may add or take (OpenAI's).
    pub const MAX_LOGIT_BIAS: f32 = 100.0;

    /// The most tokens [`Self::logit_bias`] may name.
    pub const MAX_LOGIT_BIASES: usize = 1024;

    /// The logits the sampler draws from, before its temperature: `logits`
    /// with the repetition penalty over `history` and the logit bias.
    /// `seen` is scratch.
    pub fn adjust(&self, logits: &mut [f32], history: &[u32], seen: &mut Vec<u32>) {
        repetition_penalty(logits, history, self.repetition_penalty, seen);
        for &(id, bias) in &self.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
    }

    /// True when the next token is the argmax: temperature 0 or top_k 1.
    /// A temperature below [`Self::GREEDY_BELOW`] (or not a number) is treated
    /// as 0: dividing logits by it overflows f32, which would spread the
    /// probability evenly over the overflowed tokens instead of sharpening it.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < Self::GREEDY_BELOW || self.top_k == 1
    }

    /// Temperatures below this are greedy (see [`Self::is_greedy`]): a logit
    /// of 30 over 1e-5 is 3e6, still finite and already an argmax in effect.
    pub const GREEDY_BELOW: f32 = 1e-5;
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every distinct token of
/// `history` gets `logit < 0 ? logit * p : logit / p`, once however often it
/// occurs. `seen` is scratch.
fn repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32, seen: &mut Vec<u32>) {
    if penalty == 1.0 || history.is_empty() {
        return;
    }
    seen.clear();
    seen.extend_from_slice(history);
    seen.sort_unstable();
    seen.dedup();
    for &id in seen.iter() {
        if let Some(logit) = logits.get_mut(id as usize) {
            *logit = if *logit < 0.0 { *logit * penalty } else { *logit / penalty };
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached, or the model's last position.
    Length,
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string matched (decided by the caller, which sees the text).
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::Stop => "stop",
        }
    }
}

/// Per-request generation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
}

/// What a scored sequence returns besides its next token: for every position
/// from `from` on, how the model rates the token that follows there (an
/// output audit re-checks finished sequences this way; log-probabilities are
/// the same numbers).
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreRequest {
    /// The first position whose logits are scored (they rate the token at
    /// `from + 1`). These scores cover the sequence's first forward.
    pub from: usize,
    /// How many of the most likely tokens to list per position (at most
    /// [`ScoreRequest::MAX_TOP`]).
    pub top: usize,
    /// Float noise allowed when judging whether a token is one the sampler
    /// could have chosen: a fraction of the position's largest logit magnitude
    /// (after the repetition penalty). 0.01 is the references' tolerance.
    pub tolerance: f32,
    /// Also rate each token the sequence samples, in the step that samples
    /// it (a client asking for its completion's log-probabilities). The
    /// position that samples is then scored with its sampled token, never
    /// without one.
    pub sampled: bool,
}

impl ScoreRequest {
    pub const MAX_TOP: usize = 20;
}

/// How the model rates the token at one position (see [`ScoreRequest`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenScore {
    /// The token that followed (`None` past the sequence's last token).
    pub token: Option<u32>,
    /// Its log-probability under the model's raw distribution (log-softmax of
    /// the logits; NaN without a token).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
    /// Whether the sequence's sampling could have chosen the token (greedy:
    /// it is the argmax within the tolerance; sampled: it survives top-k and
    /// top-p within the tolerance). False without a token.
    pub kept: bool,
}

/// Tokens a sequence's KV cache holds at most: its prompt and every new token
/// but the last (which is sampled, never fed back), within the model's
/// positions. Admission reserves this much for a sequence from its start.
pub fn kv_tokens(c: &ModelConfig, prompt_len: usize, max_new_tokens: usize) -> usize {
    (prompt_len + max_new_tokens.saturating_sub(1)).min(c.max_position_embeddings)
}

/// Checks a prompt against the model: non-empty, every id in the vocabulary,
/// no longer than the model's positions. The messages name the value at fault.
pub fn validate_prompt(c: &ModelConfig, prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(OffloadError::InvalidRequest("the prompt is empty".into()));
    }
    if let Some((i, id)) = prompt.iter().enumerate().find(|(_, id)| **id as usize >= c.vocab_size) {
        return Err(OffloadError::InvalidRequest(format!(
            "prompt token {id} at index {i} is outside the vocabulary (vocab_size {})",
            c.vocab_size
        )));
    }
    if prompt.len() > c.max_position_embeddings {
        return Err(OffloadError::InvalidRequest(format!(
            "the prompt has {} tokens, more than the model's {} {}",
            prompt.len(),
            c.architecture.max_positions_key(),
            c.max_position_embeddings
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed, ..Default::default() }
    }

    #[test]
    fn temperatures_too_small_to_divide_by_are_greedy() {
        assert!(SamplingParams { temperature: 1e-45, ..Default::default() }.is_greedy());
        assert!(SamplingParams { temperature: 9e-6, ..Default::default() }.is_greedy());
        assert!(!SamplingParams { temperature: 1e-5, ..Default::default() }.is_greedy());
        assert!((30.0f32 / SamplingParams::GREEDY_BELOW).is_finite());
    }

    #[test]
    fn validate_rejects_bad_values_naming_the_field() {
        let cases = [
            (SamplingParams { temperature: -0.5, ..Default::default() }, "temperature", "-0.5"),
            (SamplingParams { temperature: f32::INFINITY, ..Default::default() }, "temperature", "inf"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature", "NaN"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p", "0"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p", "1.5"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty", "0"),
            (
                SamplingParams { repetition_penalty: f32::NAN, ..Default::default() },
                "repetition_penalty",
                "NaN",
            ),
        ];
        for (params, field, value) in cases {
            let message = params.validate().expect_err("invalid parameters");
            assert!(
                message.contains(field) && message.contains(value),
                "{message:?} should name {field} and {value}"
            );
        }
        assert_eq!(sampling(1.2, 40, 0.95, 3).validate(), Ok(()));
    }
}
