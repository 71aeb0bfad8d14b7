//! A client's request as the coordinator handles it, and what it answers:
//! [`GenerateRequest`] (a prompt as text or ids, generation parameters, stop
//! strings), the [`Chunk`]s a cluster streams back, and [`GenerateOutput`]
//! (tokens, text, finish reason, timings). `generate` on one node and `query`
//! against a cluster share them; inside the coordinator a request stays in
//! these types from the front (gRPC or HTTP) to the worker call.
use serde::Serialize;
pub use zeroshard_offload::request::{FinishReason, GenerationParams, SamplingParams, TokenScore};

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
    /// Rate the tokens (and with `prompt` the prompt's) as they come.
    pub logprobs: Option<Logprobs>,
    /// How `max_new_tokens` meets the model's context.
    pub past_context: PastContext,
}

impl GenerateRequest {
    /// A request with no log-probabilities that stops at the context's end.
    pub fn new(prompt: Prompt, params: GenerationParams, stop: Vec<String>) -> Self {
        Self { prompt, params, stop, logprobs: None, past_context: PastContext::Stop }
    }
}

/// What a request whose prompt + `max_new_tokens` exceeds the model's
/// context gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PastContext {
    /// Generation stops at the context's last position (finish `length`).
    Stop,
    /// Refused before any work, naming both numbers (OpenAI's rule for a
    /// `max_tokens` the client set).
    Refuse,
}

/// The log-probabilities a client asks for: each token's under the model's
/// raw distribution, with the `top` most likely alternatives (at most
/// [`ScoreRequest::MAX_TOP`](zeroshard_offload::request::ScoreRequest::MAX_TOP)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Logprobs {
    pub top: usize,
    /// The prompt's tokens too (OpenAI's `echo`): the first has none.
    pub prompt: bool,
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
    /// With [`GenerateRequest::logprobs`]: one score per token of
    /// `token_ids`, after (on the first chunk, and with `prompt`) one for
    /// each prompt token but the first.
    pub scores: Vec<TokenScore>,
}

/// How a generation ended: why, and its timings.
#[derive(Clone, Debug)]
pub struct End {
    pub finish: FinishReason,
    pub timings: Timings,
}
