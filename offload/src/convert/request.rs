//! Generation parameters on the wire.
use zeroshard_proto::v1 as pb;

use crate::request::{FinishReason, GenerationParams, SamplingParams};

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
