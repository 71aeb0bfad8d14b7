//! OpenAI's request bodies (`/v1/completions`, `/v1/chat/completions`) and
//! what the HTTP front makes of them: a [`Job`] (the domain
//! [`GenerateRequest`]s, one per prompt, and what the answer shows), or the
//! message saying which field it cannot serve. Fields that would change the
//! result are refused; those that would not are ignored.
use serde::Deserialize;
use serde_json::Value;

use crate::chat::ChatMessage;
use crate::request::{GenerateRequest, GenerationParams, Logprobs, PastContext, Prompt, SamplingParams};
use zeroshard_offload::request::ScoreRequest;

/// The most prompts one completions request may carry (each is admitted as
/// its own request, under the same limits).
pub(super) const MAX_PROMPTS: usize = 256;

/// What one HTTP request runs and how its answer looks.
pub(super) struct Job {
    /// One per prompt, in the order of the answer's choices.
    pub requests: Vec<GenerateRequest>,
    /// The prompt's text goes before each choice's text (`echo`).
    pub echo: bool,
    /// Each token's log-probability and this many alternatives are shown.
    pub logprobs: Option<usize>,
}

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
    top_logprobs: Option<Value>,
}

/// OpenAI's default for /v1/completions.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

impl Common {
    /// The request the cluster runs for each of `prompts`, or what is wrong
    /// with them. `default_max` is used when the request names no token
    /// limit (the answer may then stop at the context's end; a limit the
    /// client set that does not fit is refused).
    fn to_generate(
        &self,
        prompts: Vec<Prompt>,
        default_max: u32,
        logprobs: Option<Logprobs>,
    ) -> std::result::Result<Vec<GenerateRequest>, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("`n` other than 1 is not supported".into());
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
            logit_bias: self.logit_bias()?,
        };
        let limit = self.limit();
        let max_new_tokens = limit.unwrap_or(default_max) as usize;
        let params = GenerationParams { sampling, max_new_tokens, ignore_eos: self.ignore_eos };
        let past_context = if limit.is_some() { PastContext::Refuse } else { PastContext::Stop };
        Ok(prompts
            .into_iter()
            .map(|prompt| GenerateRequest {
                logprobs,
                past_context,
                ..GenerateRequest::new(prompt, params.clone(), stop.clone())
            })
            .collect())
    }

    /// `logit_bias` (`{"token id": bias}`) in token order, each bias clamped
    /// to ±100 as OpenAI does.
    fn logit_bias(&self) -> std::result::Result<Vec<(u32, f32)>, String> {
        let max = SamplingParams::MAX_LOGIT_BIAS;
        let mut out = Vec::new();
        for (key, v) in self.logit_bias.iter().flatten() {
            let id: u32 =
                key.parse().map_err(|_| format!("`logit_bias` keys must be token ids, not {key:?}"))?;
            let bias = v
                .as_f64()
                .filter(|b| b.is_finite())
                .ok_or_else(|| format!("`logit_bias` of token {id} must be a number, not {v}"))?;
            out.push((id, (bias as f32).clamp(-max, max)));
        }
        out.sort_unstable_by_key(|b| b.0);
        Ok(out)
    }

    /// The token limit the client set, if any.
    fn limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub(super) fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// A `top`-style count of alternatives: an integer from 0 to
/// [`ScoreRequest::MAX_TOP`].
fn top_count(name: &str, v: &Value) -> std::result::Result<usize, String> {
    v.as_u64()
        .filter(|&n| n as usize <= ScoreRequest::MAX_TOP)
        .map(|n| n as usize)
        .ok_or_else(|| format!("`{name}` must be an integer from 0 to {}, not {v}", ScoreRequest::MAX_TOP))
}

impl CompletionRequest {
    pub(super) fn to_job(&self) -> std::result::Result<Job, String> {
        if self.best_of.is_some_and(|n| n != 1) {
            return Err("`best_of` other than 1 is not supported".into());
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err("`suffix` (insertion) is not supported".into());
        }
        let logprobs = match &self.common.logprobs {
            None | Some(Value::Null) => None,
            Some(v) => Some(top_count("logprobs", v)?),
        };
        if self.common.limit() == Some(0) && !self.echo {
            return Err("`max_tokens` 0 generates nothing: it needs `echo` (to rate the prompt)".into());
        }
        let prompts = match &self.prompt {
            PromptField::Text(t) => vec![Prompt::Text(t.clone())],
            PromptField::Texts(v) => v.iter().cloned().map(Prompt::Text).collect(),
            PromptField::Ids(ids) => vec![Prompt::Ids(ids.clone())],
            PromptField::IdLists(v) => v.iter().cloned().map(Prompt::Ids).collect(),
        };
        if prompts.is_empty() {
            return Err("`prompt` is an empty list".into());
        }
        if prompts.len() > MAX_PROMPTS {
            return Err(format!(
                "`prompt` has {} prompts, more than the {MAX_PROMPTS} one request may carry",
                prompts.len()
            ));
        }
        let rated = logprobs.map(|top| Logprobs { top, prompt: self.echo });
        let requests = self.common.to_generate(prompts, DEFAULT_COMPLETION_TOKENS, rated)?;
        Ok(Job { requests, echo: self.echo, logprobs })
    }
}

impl ChatRequest {
    /// Without a token limit a chat answer may run to the end of the model's
    /// context, as OpenAI's does (`default_max`: the model's positions).
    pub(super) fn to_job(&self, default_max: u32) -> std::result::Result<Job, String> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err("`tools` are not supported".into());
        }
        let logprobs = match (&self.common.logprobs, &self.top_logprobs) {
            (None | Some(Value::Null) | Some(Value::Bool(false)), None | Some(Value::Null)) => None,
            (Some(Value::Bool(true)), top) => Some(match top {
                None | Some(Value::Null) => 0,
                Some(v) => top_count("top_logprobs", v)?,
            }),
            (None | Some(Value::Null) | Some(Value::Bool(false)), Some(_)) => {
                return Err("`top_logprobs` needs `logprobs`: true".into())
            }
            (Some(v), _) => return Err(format!("`logprobs` must be true or false, not {v}")),
        };
        if self.common.limit() == Some(0) {
            return Err("`max_tokens` must be at least 1".into());
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
        let rated = logprobs.map(|top| Logprobs { top, prompt: false });
        let requests = self.common.to_generate(vec![Prompt::Chat(messages)], default_max, rated)?;
        Ok(Job { requests, echo: false, logprobs })
    }
}
