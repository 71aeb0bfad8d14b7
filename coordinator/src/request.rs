//! A client's request as the coordinator handles it, and what it answers:
//! [`GenerateRequest`] (a prompt as text or ids, generation parameters, stop
//! strings), the [`Chunk`]s a cluster streams back, and [`GenerateOutput`]
//! (tokens, text, finish reason, timings). `generate` on one node and `query`
//! against a cluster share them; inside the coordinator a request stays in
//! these types from the front (gRPC or HTTP) to the worker call.
use serde::Serialize;
pub use zeroshard_offload::request::{FinishReason, GenerationParams, SamplingParams};

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text, tokenized with the tokenizer's default special tokens.
    Text(String),
    Ids(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<crate::chat::ChatMessage>),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: GenerationParams,
    /// Generation stops when the text contains one of these; it is not returned.
    pub stop: Vec<String>,
}

/// Wall-clock figures of one generation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Time spent in the coordinator's queue before a worker had room.
    pub queue_ms: f64,
}

/// The result of one generation (the `--json` output of `generate`).
#[derive(Clone, Debug, Serialize)]
pub struct GenerateOutput {
    pub prompt_token_ids: Vec<u32>,
    /// New tokens only.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: &'static str,
    pub timings: Timings,
    /// Next-token logits after the prompt, when asked for.
    #[serde(skip)]
    pub prompt_logits: Option<Vec<f32>>,
}

/// A piece of an answer as the cluster streams it: new tokens and their text.
/// The first chunk carries the prompt's ids; the last one its [`End`].
#[derive(Clone, Debug, Default)]
pub struct Chunk {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub prompt_token_ids: Vec<u32>,
    pub end: Option<End>,
}

/// How a generation ended: why, and its timings.
#[derive(Clone, Debug)]
pub struct End {
    pub finish: FinishReason,
    pub timings: Timings,
}
