//! Generation parameters on the wire.
use zeroshard_proto::v1 as pb;

use crate::request::{FinishReason, GenerationParams, SamplingParams, ScoreRequest, TokenScore};

/// Sampling parameters from the wire, with the CLI's defaults for unset fields
/// (greedy, 128 new tokens). Validated later, with the prompt.
pub fn generation_params(p: Option<pb::SamplingParams>) -> GenerationParams {
    let p = p.unwrap_or_default();
    GenerationParams {
        sampling: SamplingParams {
            temperature: p.temperature.unwrap_or(0.0),
            top_k: p.top_k.unwrap_or(0) as usize,
            top_p: p.top_p.unwrap_or(1.0),
            seed: p.seed.unwrap_or(0),
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            resume_draws: 0,
            logit_bias: {
                let mut bias: Vec<(u32, f32)> = p.logit_bias.into_iter().collect();
                bias.sort_unstable_by_key(|b| b.0);
                bias
            },
        },
        max_new_tokens: p.max_new_tokens.unwrap_or(128) as usize,
        ignore_eos: p.ignore_eos,
    }
}

impl From<&GenerationParams> for pb::SamplingParams {
    fn from(p: &GenerationParams) -> Self {
        Self {
            max_new_tokens: Some(p.max_new_tokens as u32),
            temperature: Some(p.sampling.temperature),
            top_k: Some(p.sampling.top_k as u32),
            top_p: Some(p.sampling.top_p),
            seed: Some(p.sampling.seed),
            repetition_penalty: Some(p.sampling.repetition_penalty),
            ignore_eos: p.ignore_eos,
            logit_bias: p.sampling.logit_bias.iter().copied().collect(),
        }
    }
}

impl From<FinishReason> for pb::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Length => Self::Length,
            FinishReason::Eos => Self::Eos,
            FinishReason::Stop => Self::Stop,
        }
    }
}

impl From<pb::ScoreRequest> for ScoreRequest {
    fn from(r: pb::ScoreRequest) -> Self {
        Self {
            from: r.from_position as usize,
            top: (r.top as usize).min(Self::MAX_TOP),
            tolerance: r.tolerance,
            sampled: r.sampled,
        }
    }
}

impl From<&ScoreRequest> for pb::ScoreRequest {
    fn from(r: &ScoreRequest) -> Self {
        Self { from_position: r.from as u32, top: r.top as u32, tolerance: r.tolerance, sampled: r.sampled }
    }
}

impl From<&TokenScore> for pb::TokenScore {
    fn from(s: &TokenScore) -> Self {
        Self {
            token_id: s.token,
            logprob: s.logprob,
            top_token_ids: s.top.iter().map(|t| t.0).collect(),
            top_logprobs: s.top.iter().map(|t| t.1).collect(),
            kept: s.kept,
        }
    }
}

impl From<pb::TokenScore> for TokenScore {
    fn from(s: pb::TokenScore) -> Self {
        Self {
            token: s.token_id,
            logprob: s.logprob,
            top: s.top_token_ids.into_iter().zip(s.top_logprobs).collect(),
            kept: s.kept,
        }
    }
}
