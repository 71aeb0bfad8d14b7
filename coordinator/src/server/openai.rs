//! OpenAI's request bodies (`/v1/completions`, `/v1/chat/completions`) and
//! what the HTTP front makes of them: the domain [`GenerateRequest`], or the
//! message saying which field it cannot serve. Fields that would change the
//! result are refused; those that would not are ignored.
use serde::Deserialize;
use serde_json::Value;

use crate::chat::ChatMessage;
use crate::request::{GenerateRequest, GenerationParams, Prompt, SamplingParams};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completions prompt: text, one text in a list, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields completions and chat completions share: sampling, limits,
/// streaming. Others are refused where they would change the result, and
/// ignored where they would not.
#[derive(Deserialize)]
pub(super) struct Common {
    pub(super) model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    #[serde(default)]
    pub(super) stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    logprobs: Option<Value>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's extension: keep going past end-of-sequence tokens.
    #[serde(default)]
    ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    #[serde(flatten)]
    pub(super) common: Common,
    prompt: PromptField,
    best_of: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
}

/// A chat message's content: text, or a list of parts of which only text
/// parts are understood.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize)]
pub(super) struct ChatRequest {
    #[serde(flatten)]
    pub(super) common: Common,
    messages: Vec<Message>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
    top_logprobs: Option<u32>,
}

/// OpenAI's default for /v1/completions.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// Whether a JSON field asks for something (not absent, null, false or 0).
fn asks(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(_) => true,
    }
}

impl Common {
    /// The request the cluster runs for `prompt`, or what is wrong with it.
    /// `default_max` is used when the request names no token limit.
    fn to_generate(&self, prompt: Prompt, default_max: u32) -> std::result::Result<GenerateRequest, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("`n` other than 1 is not supported".into());
        }
        if asks(&self.logprobs) {
            return Err("`logprobs` is not supported".into());
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err("`logit_bias` is not supported".into());
        }
        for (name, v) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            if v.is_some_and(|v| v != 0.0) {
                return Err(format!(
                    "`{name}` has no exact equivalent here: use `repetition_penalty` (transformers' multiplicative penalty)"
                ));
            }
        }
        let top_k = match self.top_k {
            None | Some(-1) => None,
            Some(k) if k >= 0 => Some(k as u32),
            Some(k) => return Err(format!("`top_k` must be -1 (off) or at least 0, not {k}")),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        let off = SamplingParams::default();
        let sampling = SamplingParams {
            // OpenAI's default temperature is 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_k: top_k.map_or(off.top_k, |k| k as usize),
            top_p: self.top_p.unwrap_or(off.top_p),
            seed: self.seed.unwrap_or(off.seed),
            repetition_penalty: self.repetition_penalty.unwrap_or(off.repetition_penalty),
            resume_draws: 0,
        };
        let max_new_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_max) as usize;
        let params = GenerationParams { sampling, max_new_tokens, ignore_eos: self.ignore_eos };
        Ok(GenerateRequest { prompt, params, stop })
    }

    pub(super) fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    pub(super) fn to_generate(&self) -> std::result::Result<GenerateRequest, String> {
        if self.best_of.is_some_and(|n| n != 1) {
            return Err("`best_of` other than 1 is not supported".into());
        }
        if self.echo {
            return Err("`echo` is not supported".into());
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err("`suffix` (insertion) is not supported".into());
        }
        let prompt = match &self.prompt {
            PromptField::Text(t) => Prompt::Text(t.clone()),
            PromptField::Texts(v) if v.len() == 1 => Prompt::Text(v[0].clone()),
            PromptField::Ids(ids) => Prompt::Ids(ids.clone()),
            PromptField::IdLists(v) if v.len() == 1 => Prompt::Ids(v[0].clone()),
            _ => return Err("`prompt` must be one prompt (a batch of prompts is not supported)".into()),
        };
        self.common.to_generate(prompt, DEFAULT_COMPLETION_TOKENS)
    }
}

impl ChatRequest {
    /// Without a token limit a chat answer may run to the end of the model's
    /// context, as OpenAI's does (`default_max`: the model's positions).
    pub(super) fn to_generate(&self, default_max: u32) -> std::result::Result<GenerateRequest, String> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err("`tools` are not supported".into());
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err("`top_logprobs` is not supported".into());
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err("`response_format` other than {\"type\": \"text\"} is not supported".into());
            }
        }
        if self.messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(format!(
                                    "messages[{i}]: content parts of type {} are not supported (text only)",
                                    kind.unwrap_or("(none)")
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage { role: m.role.clone(), content });
        }
        self.common.to_generate(Prompt::Chat(messages), default_max)
    }
}
